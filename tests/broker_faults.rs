//! Broker faults on the embedded broker: failed offset commits and fetches, added round-trip
//! time, and the broker down and up again while the service works. The service reports the fault
//! in `/health` and `/metrics`, never commits past unapplied work, and recovers by itself.

mod common;

use std::time::{Duration, Instant};

use aggregator::service;
use common::*;
use rdkafka_sys::types::{RDKafkaApiKey, RDKafkaRespErr};

#[actix_rt::test]
async fn commits_fetches_and_the_broker_fail_and_the_service_recovers() {
    let (_dir, mut config, broker) = setup();
    // A small window keeps the service reading during the faults.
    config.tuning.max_in_flight_per_partition = 200;
    let (produced, expected) = produce_generated(&config, 40_000, 2_000, 41).await;

    let running = service::start(&config).await.unwrap();
    let base = format!("http://{}", running.http_addr);
    wait_applied(&running, 4_000).await;
    let cluster = broker.cluster();
    let timeouts = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 4];
    cluster.request_errors(RDKafkaApiKey::OffsetCommit, &timeouts);
    cluster.request_errors(RDKafkaApiKey::Fetch, &timeouts);
    cluster
        .broker_round_trip_time(1, Duration::from_millis(50))
        .unwrap();
    actix::clock::sleep(Duration::from_secs(2)).await;
    cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();

    cluster.broker_down(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = health(&base);
        if status == 503 {
            assert_eq!(body["status"], "degraded", "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outage never showed in /health: {body}"
        );
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    cluster.broker_up(1).unwrap();
    drop(cluster);

    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(240)).await;
    assert_views_exact(&running, &expected).await;
    let (_, applied, _) = running.metrics.totals();
    assert_eq!(applied, expected.applied, "applied exactly once");

    let metrics = get_text(&running, "/metrics").await;
    let faults = metric_sum(&metrics, "aggregator_faults_total");
    eprintln!(
        "broker faults: 4 OffsetCommit and 4 Fetch timeouts, 50 ms round trips for 2 s, the broker \
         down until /health said so; {faults} faults counted in /metrics; {applied} events applied \
         once of {} records produced (duplicates and malformed ones included), views exact",
        produced.len()
    );
    assert!(faults > 0.0, "no fault counted in /metrics");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = health(&base);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/health never recovered: {body}");
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await.unwrap();
}

/// An offset commit that the broker is slow to answer holds up no reading: the consumer polls and
/// hands records on while the commit waits.
#[actix_rt::test]
async fn a_slow_commit_holds_up_no_reading() {
    let (_dir, mut config, broker) = setup();
    // While a commit waits, at most the in-flight windows and one poll batch can be read but not
    // yet counted: 28 partitions x 20 + 100 records.
    config.tuning.max_in_flight_per_partition = 20;
    config.tuning.poll_batch = 100;
    let unseen_bound = 28 * 20 + 100;
    let (produced, expected) = produce_generated(&config, 20_000, 2_000, 43).await;

    let running = service::start(&config).await.unwrap();
    wait_applied(&running, 2_000).await;
    broker
        .delay_answers(RDKafkaApiKey::OffsetCommit, 1, Duration::from_secs(2))
        .unwrap();
    let waiting_since = || *running.topology.committer.waiting_since.lock().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        // The commits the broker answers at once are done in a few milliseconds.
        if let Some(since) = waiting_since().filter(|s| s.elapsed() > Duration::from_millis(300)) {
            break since;
        }
        assert!(Instant::now() < deadline, "no commit was held back");
        actix::clock::sleep(Duration::from_millis(5)).await;
    };
    let consumed_then = running.metrics.totals().0;
    loop {
        let consumed = running.metrics.totals().0;
        if consumed > consumed_then + unseen_bound {
            eprintln!(
                "{} records read in the {:?} a commit has waited",
                consumed - consumed_then,
                held.elapsed()
            );
            break;
        }
        assert_eq!(
            waiting_since(),
            Some(held),
            "the held commit was answered after {:?}, and meanwhile only {} records were read",
            held.elapsed(),
            consumed - consumed_then
        );
        actix::clock::sleep(Duration::from_millis(5)).await;
    }

    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(240)).await;
    assert_views_exact(&running, &expected).await;
    let (_, applied, _) = running.metrics.totals();
    assert_eq!(applied, expected.applied, "applied exactly once");
    running.shutdown().await.unwrap();
}
