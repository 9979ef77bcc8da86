//! Restart: the service is stopped gracefully mid-stream and started again on the same store and
//! consumer group while more events arrive; the final views are still exact.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use aggregator::service;
use common::*;

#[actix_rt::test]
async fn graceful_stop_mid_stream_and_restart_keep_views_exact() {
    let (_dir, mut config, _broker) = setup();
    // A small in-flight window: the consumer pauses, so a stop finds records not yet delivered.
    config.tuning.max_in_flight_per_partition = 100;
    let records = generate(&config, 40_000, 1_500, 11);
    let (first, second) = records.split_at(20_000);

    let mut produced = produce(&config.kafka.brokers, &config, first).await;
    let running = service::start(&config).await.unwrap();
    let (mut saw_paused, mut most_in_flight) = (false, 0);
    while running.metrics.totals().1 < 6_000 {
        for p in running.topology.partitions.iter() {
            saw_paused |= p.paused.load(Ordering::Relaxed);
            most_in_flight = most_in_flight.max(p.in_flight.load(Ordering::Relaxed));
        }
        actix::clock::sleep(Duration::from_millis(2)).await;
    }
    // Backpressure: full partitions were paused, and in flight stayed within the window plus
    // at most one poll round.
    assert!(saw_paused, "no partition was ever paused");
    let bound = (config.tuning.max_in_flight_per_partition + config.tuning.poll_batch) as i64;
    assert!(
        most_in_flight <= bound,
        "{most_in_flight} in flight, bound {bound}"
    );
    running.shutdown().await.unwrap();
    // Every partition was drained and committed on the way out; the run stopped mid-stream.
    let committed = committed_total(&config);
    assert!(
        committed > 0 && committed < first.len() as i64,
        "stopped after committing {committed} of {} records",
        first.len()
    );

    produced.extend(produce(&config.kafka.brokers, &config, second).await);
    let expected = expected(&config, &produced);
    let running = service::start(&config).await.unwrap();
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(240)).await;
    assert_views_exact(&running, &expected).await;
    running.shutdown().await.unwrap();
}
