//! Rebalances: while the service processes, bare consumers join its group (taking partitions
//! without processing them) and leave again. Each revocation drains and commits before the
//! partitions move; each assignment resumes from the committed offsets; the views stay exact.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::service;
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A group member that takes partitions and never processes or commits; it records how many it
/// holds and leaves when told.
fn idle_member(
    brokers: String,
    config: &aggregator::config::Config,
    leave: Arc<AtomicBool>,
    holding: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    let topics: Vec<String> = config.sources.iter().map(|s| s.topic.clone()).collect();
    let group = config.kafka.group_id.clone();
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "3000")
            .set("heartbeat.interval.ms", "300")
            .create()
            .expect("idle member");
        consumer
            .subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())
            .expect("subscribe");
        while !leave.load(Ordering::Relaxed) {
            let _ = consumer.poll(Duration::from_millis(50));
            let now = consumer.assignment().map(|a| a.count()).unwrap_or(0);
            holding.fetch_max(now, Ordering::Relaxed);
        }
    })
}

#[actix_rt::test]
async fn members_joining_and_leaving_move_partitions_without_loss() {
    let (_dir, mut config, _broker) = setup();
    // A small window keeps work in flight at every rebalance.
    config.tuning.max_in_flight_per_partition = 200;
    let (produced, expected) = produce_generated(&config, 60_000, 2_000, 31).await;

    let running = service::start(&config).await.unwrap();
    let ends = end_offsets(&produced);
    let mut members_took = Vec::new();
    for round in 0..3 {
        // Let the service work, then a member joins, holds its share for a while, and leaves.
        let target = (round + 1) * 12_000;
        let deadline = Instant::now() + Duration::from_secs(120);
        while running.metrics.totals().1 < target && Instant::now() < deadline {
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        let leave = Arc::new(AtomicBool::new(false));
        let holding = Arc::new(AtomicUsize::new(0));
        let member = idle_member(
            config.kafka.brokers.clone(),
            &config,
            leave.clone(),
            holding.clone(),
        );
        // The member must actually take partitions away from the service before it leaves.
        let deadline = Instant::now() + Duration::from_secs(60);
        while holding.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the member never got partitions"
            );
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
        actix::clock::sleep(Duration::from_millis(500)).await;
        leave.store(true, Ordering::Relaxed);
        member.join().unwrap();
        members_took.push(holding.load(Ordering::Relaxed));
    }
    wait_committed(&running, &ends, Duration::from_secs(240)).await;
    let revoked = running.metrics.partitions_revoked.get();
    eprintln!("rebalance: idle members took {members_took:?} partitions; {revoked} partitions revoked from the service");
    // Under the eager protocol the service gives up partitions before a member gets any.
    assert!(revoked >= 3 * 14, "only {revoked} partitions revoked");

    assert_views_exact(&running, &expected).await;
    let (_, applied, _) = running.metrics.totals();
    assert_eq!(applied, expected.applied, "applied exactly once");
    running.shutdown().await.unwrap();
}
