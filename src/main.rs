//! The `aggregator` command: `run` the service against a Kafka cluster, or `demo` it on an
//! embedded broker with the seven services simulated.

use std::path::PathBuf;

use aggregator::bench::{self, BenchOptions};
use aggregator::config::Config;
use aggregator::demo::{self, DemoOptions};
use aggregator::generator::GeneratorConfig;
use aggregator::pipeline_bench;
use aggregator::{service, verifier};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Folds the events of upstream services from Kafka into one live view per entity.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service against the Kafka cluster of the configuration, until SIGINT or SIGTERM.
    Run {
        /// Configuration file; every key can be overridden with AGGREGATOR_<SECTION>__<KEY>.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Run everything in one process: embedded broker, simulated services, service and HTTP API.
    Demo {
        /// Configuration file (its sources and rules; the broker is the embedded one). The
        /// shipped customer-360 configuration when unset. Either way every key can be
        /// overridden with AGGREGATOR_<SECTION>__<KEY>.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Stop producing after N records, wait until all are applied and committed, and exit.
        #[arg(long)]
        events: Option<u64>,
        /// Records produced per second.
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        /// Partitions of every topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Distinct customer ids.
        #[arg(long, default_value_t = 10_000)]
        customers: u32,
        /// Share of records re-sent as upstream duplicates.
        #[arg(long, default_value_t = 0.03)]
        duplicates: f64,
        /// Share of records made malformed on purpose.
        #[arg(long, default_value_t = 0.002)]
        malformed: f64,
        /// Seed of the simulated services.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
        /// Store directory (a temporary one when unset).
        #[arg(long)]
        store: Option<PathBuf>,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
        /// Chaos: kill this many busy actors per second (entity actors, and one in ten a
        /// partition supervisor; by stop or by panic) while events flow; the views stay exact.
        #[arg(long, default_value_t = 0)]
        chaos: u32,
    },
    /// Recompute every view from the source topics and compare with the running service's.
    /// Exits non-zero on any difference.
    Verify {
        /// Configuration file (brokers, sources, rules).
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
        /// Base URL of the service's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Measure the pipeline against a bare consumer on the embedded broker, both workloads in
    /// one process (the broker in a child process of its own).
    Bench {
        /// Configuration file (sources and rules); the shipped one when unset. Either way every
        /// key can be overridden with AGGREGATOR_<SECTION>__<KEY>.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Events per workload.
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
        /// Distinct entity keys.
        #[arg(long, default_value_t = 100_000)]
        keys: u32,
        /// Partitions per topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Share of upstream duplicates.
        #[arg(long, default_value_t = 0.03)]
        duplicates: f64,
        /// Offered rate in events per second (unlimited when unset).
        #[arg(long)]
        rate: Option<u64>,
        /// Offset commit interval in milliseconds.
        #[arg(long, default_value_t = 200)]
        commit_interval_ms: u64,
        /// How long the producer waits to fill a batch, in milliseconds (librdkafka's
        /// `linger.ms`, as upstream producers set it; at most 900000).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=900_000))]
        linger_ms: u64,
        /// Most records produced ahead of the consumer; on one partition never more than 8,000
        /// whatever this says (the embedded broker keeps about 5 MB per partition).
        #[arg(long, default_value_t = 100_000)]
        ahead: u64,
        /// Message ids remembered per partition (the configuration's store.dedup_window when
        /// unset).
        #[arg(long)]
        dedup_window: Option<u64>,
        /// Generator seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Measure the actor pipeline alone: generated records handed straight to the partition
        /// supervisors, no broker and no Kafka client (changelog records are encoded, not sent),
        /// against parsing the same records. For changes inside the pipeline; under `valgrind
        /// --tool=callgrind --fair-sched=yes` it counts instructions. The records are made before
        /// the run and held in memory (about 400 bytes each): pass a smaller `--events`, such as
        /// 200000. `--rate`, `--linger-ms` and `--ahead` do not apply.
        #[arg(long)]
        pipeline_only: bool,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve the embedded broker until stdin closes, printing its address first: `bench` runs
    /// its broker so, in a process of its own.
    #[command(hide = true)]
    EmbeddedBroker {
        /// Partitions per topic.
        #[arg(long)]
        partitions: i32,
        /// A topic to create; repeat for each.
        #[arg(long = "topic")]
        topics: Vec<String>,
    },
}

/// glibc's allocator was a quarter of the profile (many small, short-lived JSON allocations);
/// mimalloc serves them from thread-local pages.
#[global_allocator]
static GLOBAL: aggregator::allocator::Allocator = aggregator::allocator::Allocator;

/// The shipped configuration, used by the demo when no file is given.
const SHIPPED_CONFIG: &str = include_str!("../config.toml");

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    aggregator::allocator::keep_freed_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            init_logging("info");
            let config = Config::load(&config).with_context(|| {
                format!("refusing to start: bad configuration {}", config.display())
            })?;
            actix::System::new().block_on(run(config))
        }
        Command::Demo {
            config,
            events,
            rate,
            partitions,
            customers,
            duplicates,
            malformed,
            seed,
            http,
            store,
            quiet,
            chaos,
        } => {
            init_logging("warn");
            let mut config = load_or_shipped(&config)?;
            config.http.bind = http;
            config.validate().context("refusing to start: bad --http")?;
            if !(0.0..1.0).contains(&duplicates) || !(0.0..1.0).contains(&malformed) {
                anyhow::bail!("--duplicates and --malformed must be in [0, 1): got {duplicates} and {malformed}");
            }
            if rate == 0 || partitions < 1 || customers == 0 {
                anyhow::bail!("--rate, --partitions and --customers must be at least 1");
            }
            let options = DemoOptions {
                events,
                rate,
                partitions,
                generator: GeneratorConfig {
                    seed,
                    customers,
                    duplicate_rate: duplicates,
                    malformed_rate: malformed,
                },
                store,
                progress: !quiet,
                chaos_per_sec: chaos,
            };
            let summary = actix::System::new().block_on(demo::run(config, options))?;
            if summary.kills.total() > 0 {
                println!(
                    "chaos: {}; {} records replayed",
                    summary.kills, summary.replayed
                );
            }
            let secs = summary.elapsed.as_secs_f64();
            println!(
                "demo finished: produced {} records, applied {} events, dropped {} duplicates, dead-lettered {} in {:.1}s ({:.0} records/s)",
                summary.produced,
                summary.applied,
                summary.duplicates,
                summary.dead_lettered,
                secs,
                summary.produced as f64 / secs
            );
            Ok(())
        }
        Command::Verify { config, url, json } => {
            init_logging("warn");
            let config = Config::load(&config).context("bad configuration")?;
            let expectation = verifier::expect_from_topics(&config)?;
            let report = actix::System::new().block_on(verifier::compare(&expectation, &url))?;
            print!("{}", verifier::render(&report));
            if let Some(path) = &json {
                write_json(&report, path)?;
            }
            if !report.is_clean() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::EmbeddedBroker { partitions, topics } => {
            init_logging("warn");
            Ok(aggregator::broker_process::serve(&topics, partitions)?)
        }
        Command::Bench {
            config,
            events,
            keys,
            partitions,
            duplicates,
            rate,
            commit_interval_ms,
            linger_ms,
            ahead,
            dedup_window,
            seed,
            pipeline_only,
            json,
        } => {
            init_logging("warn");
            let mut config = load_or_shipped(&config)?;
            if !(0.0..1.0).contains(&duplicates) {
                anyhow::bail!("--duplicates must be in [0, 1): got {duplicates}");
            }
            if let Some(window) = dedup_window {
                if window == 0 {
                    anyhow::bail!("--dedup-window must be > 0: got 0");
                }
                config.store.dedup_window = window;
            }
            let options = BenchOptions {
                events,
                keys,
                partitions,
                duplicates,
                rate,
                commit_interval_ms,
                linger_ms,
                ahead,
                seed,
                broker_exe: std::env::current_exe()
                    .context("finding this executable, to run the embedded broker")?,
            };
            if pipeline_only {
                let report = actix::System::new().block_on(pipeline_bench::run(config, options))?;
                let text = pipeline_bench::render(&report);
                return publish_report(&text, &report, report.verified, "record", json.as_deref());
            }
            let report = actix::System::new().block_on(bench::run(config, options))?;
            publish_report(
                &bench::render(&report),
                &report,
                report.verified,
                "event",
                json.as_deref(),
            )
        }
    }
}

/// Prints a bench report, writes it as JSON to `json` if asked, and fails unless every `unit`
/// was applied exactly once (the figures of such a run are void).
fn publish_report(
    text: &str,
    report: &impl serde::Serialize,
    verified: bool,
    unit: &str,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    println!("{text}");
    if let Some(path) = json {
        write_json(report, path)?;
    }
    if !verified {
        anyhow::bail!("not every {unit} was applied exactly once: the figures are void");
    }
    Ok(())
}

/// Writes a report as pretty JSON to `path`.
fn write_json(report: &impl serde::Serialize, path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn load_or_shipped(config: &Option<PathBuf>) -> anyhow::Result<Config> {
    match config {
        Some(path) => Config::load(path),
        None => Config::from_toml_and_env(SHIPPED_CONFIG),
    }
    .context("refusing to start: bad configuration")
}

async fn run(config: Config) -> anyhow::Result<()> {
    let running = service::start(&config).await.context("refusing to start")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    running.shutdown().await.context("shutting down")?;
    Ok(())
}
