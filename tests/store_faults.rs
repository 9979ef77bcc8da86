//! Store faults: batch writes fail for a while. The dedup actor keeps the staged events and
//! retries, `/health` and `/metrics` show the fault, and when the store recovers every view is
//! exact and every offset committed.

mod common;

use std::time::{Duration, Instant};

use aggregator::service;
use common::*;

#[actix_rt::test]
async fn failed_store_writes_are_retried_until_the_store_recovers() {
    let (_dir, config, _broker) = setup();
    let (produced, expected) = produce_generated(&config, 20_000, 1_000, 43).await;

    let running = service::start(&config).await.unwrap();
    let base = format!("http://{}", running.http_addr);
    wait_applied(&running, 2_000).await;
    // Every write fails for the next 100 attempts (about 1 s at a 10 ms flush interval).
    running.store_faults().fail_next(100);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = health(&base);
        if status == 503 {
            assert!(body["faults"]["store"].is_string(), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store fault never showed in /health"
        );
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(240)).await;
    assert_views_exact(&running, &expected).await;
    let metrics = get_text(&running, "/metrics").await;
    eprintln!(
        "store faults: 100 failed writes injected; {} store write faults counted in /metrics; \
         {} events applied, views exact",
        metric_sum(&metrics, "aggregator_faults_total{kind=\"store_write\"}"),
        running.metrics.totals().1
    );
    assert!(
        metrics.contains("aggregator_faults_total{kind=\"store_write\"}"),
        "no store fault counted"
    );
    assert_eq!(health(&base).0, 200, "health did not recover");
    running.shutdown().await.unwrap();
}
