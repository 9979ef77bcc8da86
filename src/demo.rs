//! `aggregator demo`: the embedded broker, the seven services simulated at a chosen rate, the
//! service and its HTTP API, all in one process, with a live progress line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::chaos::{Chaos, Kills};
use crate::config::Config;
use crate::embedded_broker::EmbeddedBroker;
use crate::event_producer::{Deliveries, EventProducer};
use crate::generator::{Generator, GeneratorConfig};
use crate::service::{self, RunningService};

/// Options of the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Stop producing after this many records, wait until all are committed, and exit.
    pub events: Option<u64>,
    /// Records produced per second.
    pub rate: u64,
    /// Partitions of every topic.
    pub partitions: i32,
    /// What to generate.
    pub generator: GeneratorConfig,
    /// Store directory; a temporary one when unset.
    pub store: Option<PathBuf>,
    /// Whether to draw the progress line.
    pub progress: bool,
    /// Busy entity actors killed per second (0: no chaos).
    pub chaos_per_sec: u32,
}

/// Figures of a finished demo.
#[derive(Debug)]
pub struct DemoSummary {
    /// Records produced and acknowledged.
    pub produced: u64,
    /// Events applied.
    pub applied: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Kills made by the chaos option.
    pub kills: Kills,
    /// Records replayed after kills.
    pub replayed: u64,
}

/// Produces generated records at `rate` per second on its own thread, `limit` at most.
struct ProducerThread {
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    deliveries: Arc<Deliveries>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl ProducerThread {
    fn start(
        producer: EventProducer,
        generator: Generator,
        rate: u64,
        limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicU64::new(0));
        let deliveries = producer.deliveries.clone();
        let (stop2, produced2) = (stop.clone(), produced.clone());
        let handle = std::thread::Builder::new()
            .name("demo-producer".into())
            .spawn(move || {
                let started = Instant::now();
                let mut generator = generator;
                let limit = limit.unwrap_or(u64::MAX);
                let mut sent = 0u64;
                while sent < limit && !stop2.load(Ordering::Relaxed) {
                    let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                    if sent >= due {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    for g in generator
                        .by_ref()
                        .take((due - sent).min(limit - sent) as usize)
                    {
                        producer.send(&g)?;
                        sent += 1;
                    }
                    produced2.store(sent, Ordering::Relaxed);
                }
                producer.flush(Duration::from_secs(30))?;
                Ok(())
            })?;
        Ok(ProducerThread {
            stop,
            produced,
            deliveries,
            handle,
        })
    }
}

/// Runs the demo until `options.events` are committed, or until Ctrl-C.
pub async fn run(mut config: Config, options: DemoOptions) -> anyhow::Result<DemoSummary> {
    let broker = EmbeddedBroker::start(&config, options.partitions)?;
    config.kafka.brokers = broker.bootstrap_servers();
    let _temp_store;
    if let Some(path) = &options.store {
        config.store.path = path.clone();
    } else {
        let dir = tempfile::tempdir().context("creating a temporary store directory")?;
        config.store.path = dir.path().join("aggregator.sled");
        _temp_store = dir;
    }
    let started = Instant::now();
    let service = service::start(&config).await?;
    eprintln!(
        "aggregator demo: embedded broker at {}, HTTP API at http://{}/topology",
        config.kafka.brokers, service.http_addr
    );
    let producer = EventProducer::new(&config.kafka.brokers, config.rules()?.topics())?;
    let generator = Generator::new(options.generator.clone(), &config.sources);
    let producing = ProducerThread::start(producer, generator, options.rate, options.events)?;

    let bar = if options.progress {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {elapsed_precise} {msg}",
    )?);
    if options.chaos_per_sec > 0 {
        crate::chaos::quiet_injected_panics();
    }
    let mut chaos = Chaos::new(&service, options.generator.seed);
    let chaos_every = Duration::from_secs_f64(1.0 / f64::from(options.chaos_per_sec.max(1)));
    let mut next_kill = Instant::now() + chaos_every;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if options.chaos_per_sec > 0 && Instant::now() >= next_kill {
            chaos.strike();
            next_kill += chaos_every;
        }
        bar.set_message(progress_line(
            &service,
            producing.produced.load(Ordering::Relaxed),
        ));
        bar.tick();
        if producing.handle.is_finished()
            && all_committed(&service, &producing.deliveries.end_offsets())
        {
            break;
        }
        tokio::select! {
            _ = actix::clock::sleep(Duration::from_millis(20)) => {}
            _ = &mut ctrl_c => { interrupted = true; break; }
        }
    }
    producing.stop.store(true, Ordering::Relaxed);
    let produced_result = producing
        .handle
        .join()
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?;
    let acked = producing.deliveries.acked.load(Ordering::Relaxed);
    bar.finish_with_message(progress_line(&service, acked));
    produced_result?;
    if interrupted {
        eprintln!("interrupted: shutting down gracefully");
    }
    let metrics = service.metrics.clone();
    service.shutdown().await?;
    let (_, applied, duplicates) = metrics.totals();
    let dead_lettered = metrics.dead_lettered_total();
    drop(broker);
    Ok(DemoSummary {
        produced: acked,
        applied,
        duplicates,
        dead_lettered,
        elapsed: started.elapsed(),
        kills: chaos.kills(),
        replayed: metrics.replayed.get(),
    })
}

fn progress_line(service: &RunningService, produced: u64) -> String {
    let (_, applied, duplicates) = service.metrics.totals();
    let lag: i64 = service
        .topology
        .partitions
        .iter()
        .filter_map(|p| p.lag())
        .sum();
    format!(
        "produced {} | applied {} | duplicates dropped {} | dead-lettered {} | lag {} | entities {}",
        produced,
        applied,
        duplicates,
        service.metrics.dead_lettered_total(),
        lag,
        service.topology.entities.len(),
    )
}

/// Whether every (topic, partition) in `ends` has its committed offset at its end offset.
pub fn all_committed(service: &RunningService, ends: &BTreeMap<(String, i32), i64>) -> bool {
    reached_ends(ends, |topic, partition| {
        service
            .topology
            .partitions
            .iter()
            .find(|p| &*p.tp.topic == topic && p.tp.partition == partition)
            .map(|p| p.committed.load(Ordering::Relaxed))
    })
}

/// Whether every (topic, partition) in `ends` has reached its end offset, where `reached` tells
/// how far a partition got (`None` when it is not known).
pub fn reached_ends(
    ends: &BTreeMap<(String, i32), i64>,
    reached: impl Fn(&str, i32) -> Option<i64>,
) -> bool {
    ends.iter().all(|((topic, partition), end)| {
        reached(topic, *partition).is_some_and(|offset| offset >= *end)
    })
}
