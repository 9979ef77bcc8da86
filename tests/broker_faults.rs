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
