//! Rebalances: while the service processes, bare consumers join its group (taking partitions
//! without processing them) and leave again. Each revocation drains and commits before the
//! partitions move; each assignment resumes from the committed offsets; the views stay exact.

mod common;

use std::collections::BTreeMap;
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

/// Changelog records an instance has replayed into its store.
fn restored(topology: &aggregator_actors::topology::Topology) -> u64 {
    topology.dedup.changelog_restored.load(Ordering::Relaxed)
}

/// A second aggregator instance joins the group, takes its share of the partitions with their
/// state (read from the changelog), processes, and is stopped gracefully: its partitions come back
/// to the first instance with what the second applied, and the verifier finds every view exact.
/// Events arrive in three waves so that each instance surely has work: before the second joins,
/// while both run, and after the second left (the embedded broker keeps 5 MB per partition, which
/// bounds how much changelog a run may write).
#[actix_rt::test]
async fn a_second_instance_takes_partitions_with_their_state_and_hands_them_back() {
    let (dir, mut config, _broker) = setup();
    // Drains short enough for the group's rejoin deadline (the session timeout on this broker).
    config.tuning.max_in_flight_per_partition = 200;
    config.kafka.session_timeout_ms = 10_000;
    let records = generate(&config, 12_000, 1_500, 47);
    let (waves, last) = records.split_at(8_000);
    let (before, during) = waves.split_at(4_000);
    let mut produced = produce(&config.kafka.brokers, &config, before).await;

    let first = service::start(&config).await.unwrap();
    wait_committed(&first, &end_offsets(&produced), Duration::from_secs(120)).await;
    let mut second_config = config.clone();
    second_config.store.path = dir.path().join("second-store");
    let second = service::start(&second_config).await.unwrap();
    // Both hold half of the 28 partitions (range assignment: partition numbers 0-1 and 2-3).
    let deadline = Instant::now() + Duration::from_secs(120);
    while first.topology.partitions.len() != 14 || second.topology.partitions.len() != 14 {
        assert!(
            Instant::now() < deadline,
            "no even split: first holds {}, second {}",
            first.topology.partitions.len(),
            second.topology.partitions.len()
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    produced.extend(produce(&config.kafka.brokers, &config, during).await);
    let ends = end_offsets(&produced);
    let (first_ends, second_ends): (BTreeMap<_, _>, BTreeMap<_, _>) =
        ends.clone().into_iter().partition(|((topic, p), _)| {
            first
                .topology
                .partitions
                .contains_key(&aggregator_actors::TopicPartition::new(topic.as_str(), *p))
        });
    wait_committed(&first, &first_ends, Duration::from_secs(120)).await;
    wait_committed(&second, &second_ends, Duration::from_secs(120)).await;
    let restored_by_second = restored(second.topology.as_ref());
    let applied_by_second = second.metrics.totals().1;
    second.shutdown().await.unwrap();

    produced.extend(produce(&config.kafka.brokers, &config, last).await);
    wait_committed(&first, &end_offsets(&produced), Duration::from_secs(120)).await;
    let restored_by_first = restored(first.topology.as_ref());
    let applied_by_first = first.metrics.totals().1;
    let expected = expected(&config, &produced);
    let report = verify(&config, &format!("http://{}", first.http_addr)).await;
    eprintln!(
        "second instance: restored {restored_by_second} changelog records, applied \
         {applied_by_second} events, stopped; first instance: applied {applied_by_first}, \
         restored {restored_by_first} records on taking its partitions back\n{}",
        aggregator::verifier::render(&report)
    );
    assert!(
        restored_by_second > 0,
        "the second instance started from the first one's state"
    );
    assert!(
        applied_by_second > 0 && restored_by_first > 0,
        "the first instance took back the second one's state"
    );
    assert!(
        report.is_clean(),
        "{}",
        aggregator::verifier::render(&report)
    );
    assert_eq!(report.events_applied, expected.applied);
    // Across the group every event was applied once, by one instance or the other.
    assert_eq!(applied_by_first + applied_by_second, expected.applied);
    assert_views_exact(&first, &expected).await;
    first.shutdown().await.unwrap();
}
