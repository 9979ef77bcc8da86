//! The benchmark in its short mode: both workloads complete and every event is applied exactly
//! once. No timing is asserted; figures come from `aggregator bench` runs, not from tests.

use aggregator::bench::{self, BenchOptions};
use aggregator::config::Config;

#[actix_rt::test]
async fn short_benchmark_completes_and_applies_every_event() {
    let config = Config::from_toml(include_str!("../config.toml")).unwrap();
    let options = BenchOptions {
        events: 20_000,
        keys: 2_000,
        partitions: 2,
        duplicates: 0.03,
        rate: None,
        commit_interval_ms: 200,
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
}
