//! The benchmark in its short mode: both workloads complete and every event is applied exactly
//! once. No timing is asserted; figures come from `aggregator bench` runs, not from tests.

use aggregator::bench::{self, BenchOptions};
use aggregator::config::Config;

#[actix_rt::test]
async fn short_benchmark_completes_and_applies_every_event() {
    let mut config = Config::from_toml(include_str!("../config.toml")).unwrap();
    // About 9,700 ids per partition; the producer runs at most `ahead` records ahead, which
    // bounds how far apart a duplicate and its original are consumed to well within the window.
    config.store.dedup_window = 8_000;
    let options = BenchOptions {
        events: 20_000,
        keys: 2_000,
        partitions: 2,
        duplicates: 0.03,
        rate: None,
        commit_interval_ms: 200,
        linger_ms: 5,
        ahead: 5_000,
        seed: 5,
    };
    let report = bench::run(config, options).await.unwrap();
    assert!(report.verified, "{}", bench::render(&report));
    assert_eq!(report.baseline.events, 20_000);
    assert_eq!(report.aggregator.events, 20_000);
    assert_eq!(report.entities, 2_000);
    let latency = report.latency_ms.expect("latencies recorded");
    assert_eq!(latency.count, 20_000);
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    let floor = report
        .baseline_latency_ms
        .expect("the bare consumer's latencies recorded");
    assert_eq!(
        floor.count, 20_000,
        "one per event the bare consumer parsed"
    );
    assert_eq!(report.markers_kept, 2 * 8_000, "{}", bench::render(&report));
    assert_eq!(
        report.markers_kept + report.markers_expired,
        report.counts[2],
        "one marker per applied event"
    );
}
