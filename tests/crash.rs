//! Crashes: against Tansu in its own process, with the generator producing, the service process
//! is SIGKILLed at random moments and restarted on the same store each time. The store opens
//! after every kill, and at the end the verifier finds no difference. A store that cannot be
//! opened makes the service refuse to start with an error naming the store path.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::config::Config;
use aggregator::event_producer::EventProducer;
use aggregator::generator::{Generator, GeneratorConfig};
use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// SIGKILLs to make.
const KILLS: usize = 10;
/// Records produced per second while the service is being killed.
const RATE: u64 = 1_500;

/// The service binary as a child process, its log in `log`.
fn spawn_service(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["run", "--config"])
        .arg(config)
        // Assignment, restore and supervisors at info for a failure's report; not each dead letter.
        .env(
            "RUST_LOG",
            "warn,aggregator=info,aggregator_actors=info,aggregator_actors::dead_letter=warn",
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the service starts")
}

/// Waits until the service answers `/ready` with 200; fails with its log if it exits first.
async fn wait_ready(child: &mut Child, http: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            panic!(
                "the service exited with {status} before it was ready:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(r) = reqwest::get(format!("{http}/ready")).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "not ready within 60 s");
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
}

/// The service's `/metrics` text.
async fn metrics_text(http: &str) -> String {
    reqwest::get(format!("{http}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics body")
}

/// Panics with `what`, the service's `/topology` and the end of its log.
async fn fail_with(what: &str, http: &str, log: &Path) -> ! {
    let topology = match reqwest::get(format!("{http}/topology")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("unavailable: {e}"),
    };
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(200)..].join("\n");
    panic!("{what}\n--- /topology:\n{topology}\n--- the service's log, last 200 lines:\n{tail}");
}

/// Records this run of the service applied or dropped as seen before.
async fn processed(http: &str) -> f64 {
    let metrics = metrics_text(http).await;
    metric_sum(&metrics, "aggregator_applied_total")
        + metric_sum(&metrics, "aggregator_duplicates_total")
}

/// Writes `config` where `aggregator run --config` reads it.
fn write_config(config: &Config, dir: &Path) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, toml::to_string(config).expect("config as TOML")).expect("config file");
    path
}

#[actix_rt::test]
async fn sigkilled_while_producing_then_restarted_on_the_same_store_loses_and_doubles_nothing() {
    let (dir, mut config, _broker) = setup_tansu().await;
    let port = free_port();
    config.http.bind = format!("127.0.0.1:{port}");
    let http = format!("http://127.0.0.1:{port}");
    let config_path = write_config(&config, dir.path());
    let log = dir.path().join("service.log");

    // The generator produces at a steady rate on its own thread until the kills are done.
    let generator = Generator::new(
        GeneratorConfig {
            seed: 31,
            customers: 2_000,
            duplicate_rate: 0.03,
            malformed_rate: 0.004,
        },
        &config.sources,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (brokers, topics, stop_producing) = (
        config.kafka.brokers.clone(),
        config.sources.iter().map(|s| s.topic.clone()).collect(),
        stop.clone(),
    );
    let producer = std::thread::spawn(move || {
        // Tansu 0.6.0 answers a fetch from an offset inside a record batch with nothing of that
        // batch, so a consumer resuming there would skip the rest of it; one record per batch
        // keeps every committed offset at a batch start.
        let producer =
            EventProducer::with_properties(&brokers, topics, &[("batch.num.messages", "1")])
                .expect("producer");
        let started = Instant::now();
        let mut produced = 0u64;
        for g in generator {
            if stop_producing.load(Ordering::Relaxed) {
                break;
            }
            let due = started + Duration::from_millis(produced * 1_000 / RATE);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            producer.send(&g).expect("enqueued");
            produced += 1;
        }
        producer.flush(Duration::from_secs(60)).expect("flushed");
        (produced, producer.deliveries.end_offsets())
    });

    let mut rng = SmallRng::seed_from_u64(5);
    let mut kills = 0;
    while kills < KILLS {
        let mut child = spawn_service(&config_path, &log);
        wait_ready(&mut child, &http, &log).await;
        let committed_before = committed_total(&config);
        // A random moment once this run is processing.
        let deadline = Instant::now() + Duration::from_secs(60);
        while processed(&http).await == 0.0 {
            if Instant::now() > deadline {
                fail_with("no record processed within 60 s", &http, &log).await;
            }
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
        actix::clock::sleep(Duration::from_millis(rng.random_range(100..2_000))).await;
        let metrics = metrics_text(&http).await;
        child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
        child.wait().expect("reaped");
        kills += 1;
        // Tansu 0.6.0 does not re-form a group whose leader died while another member joined:
        // the newcomer stayed in the dead leader's generation with nothing assigned, for
        // minutes. Once the killed member's session is over, the next start finds the group
        // without it and leads it.
        actix::clock::sleep(Duration::from_millis(config.kafka.session_timeout_ms + 500)).await;
        eprintln!(
            "SIGKILL {kills}: this run applied {} events and dropped {} as seen before; committed {committed_before} -> {}",
            metric_sum(&metrics, "aggregator_applied_total"),
            metric_sum(&metrics, "aggregator_duplicates_total"),
            committed_total(&config)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (produced, ends) = producer.join().expect("producer thread");

    // The last run catches up, commits to the end and is stopped gracefully.
    let mut child = spawn_service(&config_path, &log);
    wait_ready(&mut child, &http, &log).await;
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        let committed = group_committed(&config);
        if ends
            .iter()
            .all(|(tp, end)| committed.get(tp).is_some_and(|c| c >= end))
        {
            break;
        }
        if Instant::now() > deadline {
            let what = format!("not committed to the end: {committed:?} vs {ends:?}");
            fail_with(&what, &http, &log).await;
        }
        actix::clock::sleep(Duration::from_millis(200)).await;
    }

    let report = verify(&config, &http).await;
    eprintln!(
        "after {kills} SIGKILLs, {produced} records produced meanwhile:\n{}",
        aggregator::verifier::render(&report)
    );
    assert!(
        report.is_clean(),
        "{}",
        aggregator::verifier::render(&report)
    );
    assert!(report.events_expected > produced * 9 / 10);
    assert_eq!(report.events_applied, report.events_expected);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = child.wait().expect("reaped");
    assert!(exit.success(), "graceful stop exited with {exit}");
}

#[test]
fn a_store_that_cannot_be_opened_is_refused_by_path() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut config = test_config(&dir.path().join("store"));
    config.kafka.brokers = format!("127.0.0.1:{}", free_port()); // never reached
                                                                 // Garbage where sled keeps its own configuration.
    std::fs::create_dir_all(&config.store.path).expect("store dir");
    std::fs::write(config.store.path.join("conf"), b"\x00\x01 not a sled store").expect("conf");
    let config_path = write_config(&config, dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["run", "--config"])
        .arg(&config_path)
        .output()
        .expect("the service runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a broken store: {stderr}");
    assert!(
        stderr.contains(&config.store.path.display().to_string()),
        "the error names the store path: {stderr}"
    );
}
