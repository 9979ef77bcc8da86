//! The benchmark in its short modes, on the embedded broker and the actor pipeline alone: every
//! workload completes and every event is applied exactly once. No timing is asserted; figures
//! come from `aggregator bench` runs, not from tests.

use aggregator::bench::{self, BenchOptions};
use aggregator::config::Config;
use aggregator::pipeline_bench;
use aggregator::thread_cpu::ServiceParts;

/// The service's parts summed: what they make up of its share, CPU or wake-ups.
fn parts_summed(p: &ServiceParts) -> f64 {
    p.actors + p.dedup + p.blocking_pool + p.sled_io + p.consumer + p.view_loader + p.other
}

/// 20,000 events over 2,000 keys and 2 partitions per topic.
fn short_options() -> BenchOptions {
    BenchOptions {
        events: 20_000,
        keys: 2_000,
        partitions: 2,
        duplicates: 0.03,
        rate: None,
        commit_interval_ms: 200,
        linger_ms: 5,
        ahead: 5_000,
        seed: 5,
        broker_exe: env!("CARGO_BIN_EXE_aggregator").into(),
    }
}

#[actix_rt::test]
async fn short_benchmark_completes_and_applies_every_event() {
    let mut config = Config::from_toml(include_str!("../config.toml")).unwrap();
    // About 9,700 ids per partition; the producer runs at most `ahead` records ahead, which
    // bounds how far apart a duplicate and its original are consumed to well within the window.
    config.store.dedup_window = 8_000;
    // Fewer live actors than keys, so that the service passivates and loads views again.
    config.tuning.max_live_entities = 500;
    // The bound is looked at again after every 50 new actors, and passivates only actors with
    // nothing unfinished. With the default window a fast consumer could start all 2,000 actors
    // before any had finished an event, and none was passivated. A partition is paused once
    // its window is full, which a poll overshoots by its own size at most: with 14 partitions
    // of 100 in flight and polls of 50, at most 1,450 actors can be busy, so a look made
    // before the 2,000th starts finds an idle one.
    config.tuning.max_in_flight_per_partition = 100;
    config.tuning.poll_batch = 50;
    let options = short_options();
    let report = bench::run(config, options).await.unwrap();
    assert!(report.verified, "{}", bench::render(&report));
    assert_eq!(
        report.baseline_runs.each_ref().map(|w| w.events),
        [20_000, 20_000],
        "the bare consumer ran before and after the service"
    );
    assert_eq!(report.baseline.events, 40_000, "its two runs taken as one");
    assert_eq!(report.aggregator.events, 20_000);
    let by_thread = report.aggregator_cpu_by_thread;
    let parts = by_thread.service
        + by_thread.kafka_clients
        + by_thread.embedded_broker
        + by_thread.bench_producer;
    assert!(
        by_thread.service > 0.0
            && (0.5..=1.5).contains(&(parts / report.aggregator.cpu_us_per_event)),
        "the threads' shares make up the process's CPU: {}",
        bench::render(&report)
    );
    let p = by_thread.service_parts;
    assert!(
        (parts_summed(&p) - by_thread.service).abs() < 1e-6 && p.actors > 0.0,
        "the service's parts make up its share: {}",
        bench::render(&report)
    );
    let wakeups = report.aggregator_wakeups_by_thread;
    let w = wakeups.service_parts;
    assert!(
        wakeups.service > 0.0
            && (parts_summed(&w) - wakeups.service).abs() < 1e-9
            && w.blocking_pool > 0.0,
        "the service's threads wait and are woken (each write's store stage on the blocking \
         pool), and its parts make up its wake-ups: {}",
        bench::render(&report)
    );
    // Its CPU share is counted too, but a run this short can take less than one of /proc's
    // 10 ms ticks of it; `thread_cpu`'s unit tests pin that a child's threads are counted.
    assert!(
        report.broker_peak_rss_mib > 0.0,
        "the embedded broker's process is measured apart: {}",
        bench::render(&report)
    );
    assert_eq!(report.entities, 2_000);
    assert_eq!(report.live_bound, 500);
    assert!(
        report.passivations > 0,
        "2,000 keys under a bound of 500 passivate: {}",
        bench::render(&report)
    );
    assert!(
        report.view_loads >= report.entities,
        "every entity's first actor loads its view: {}",
        bench::render(&report)
    );
    assert!(
        report.views_written >= report.entities && report.views_written <= report.counts[2],
        "at least one view per entity, at most one per event applied: {}",
        bench::render(&report)
    );
    let latency = report.latency_ms.expect("latencies recorded");
    assert_eq!(latency.count, 20_000);
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    // Each record is delivered after it is produced, so the service's part is never the larger.
    let own = report
        .service_latency_ms
        .expect("the service's part recorded");
    assert_eq!(own.count, 20_000, "one per event");
    assert!(
        own.p50 <= latency.p50 && own.p99 <= latency.p99 && own.max <= latency.max,
        "{own:?} against {latency:?}"
    );
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

#[actix_rt::test]
async fn pipeline_only_benchmark_completes_and_applies_every_record() {
    let mut config = Config::from_toml(include_str!("../config.toml")).unwrap();
    // Fewer live actors than keys, so that views are passivated and loaded again meanwhile.
    config.tuning.max_live_entities = 500;
    let options = short_options();
    let report = pipeline_bench::run(config, options).await.unwrap();
    let text = pipeline_bench::render(&report);
    assert!(report.verified, "{text}");
    let [fed, consumed, applied, dropped, duplicates_sent, dead_lettered] = report.counts;
    assert_eq!((fed, consumed), (20_000, 20_000), "{text}");
    assert!(duplicates_sent > 0, "the stream holds duplicates: {text}");
    assert_eq!(dropped, duplicates_sent, "{text}");
    assert_eq!(applied + dropped, fed, "{text}");
    assert_eq!(dead_lettered, 0, "{text}");
    assert_eq!(report.pipeline.events, 20_000);
    assert!(report.ratio > 0.0, "{text}");
}
