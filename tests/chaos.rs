//! Chaos: while 200,000 events with duplicates flow, actors of every kind are killed at random
//! moments, by stopping them and by panics inside their handlers: entity actors and partition
//! supervisors with work in flight, the dedup actor and the offset committer. Every view still
//! equals the independent expectation (nothing lost, nothing applied twice, order kept), and the
//! committed offsets reach the end offsets.

mod common;

use std::time::Duration;

use aggregator::chaos::{quiet_injected_panics, Chaos};
use aggregator::demo::all_committed;
use aggregator::service;
use common::*;

/// Kills to make at least; the run stops killing at twice this.
const KILLS: u64 = 200;

#[actix_rt::test]
async fn actors_killed_mid_processing_lose_nothing_and_double_nothing() {
    quiet_injected_panics();
    let (_dir, config, _broker) = setup();
    let (produced, expected) = produce_generated(&config, 200_000, 3_000, 23).await;
    assert!(
        expected.duplicates > 4_000,
        "{} duplicates",
        expected.duplicates
    );

    let running = service::start(&config).await.unwrap();
    let mut chaos = Chaos::new(&running, 99);
    let ends = end_offsets(&produced);
    while !all_committed(&running, &ends) && chaos.kills().total() < 2 * KILLS {
        chaos.strike();
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let kills = chaos.kills();
    wait_committed(&running, &ends, Duration::from_secs(300)).await;
    let m = &running.metrics;
    let (replayed, deaths, restarts) = (
        m.replayed.get(),
        m.entity_deaths.get(),
        m.supervisor_restarts.get(),
    );
    let topology = running.topology.snapshot(0);
    eprintln!(
        "chaos over {} events: {kills}; {deaths} entity actors died with work pending, \
         {replayed} records replayed, {restarts} partition supervisors restarted, dedup actor \
         restarted {} times, offset committer {} times",
        produced.len(),
        topology.dedup.restarts,
        topology.committer.restarts,
    );
    assert!(kills.total() >= KILLS, "only {} kills", kills.total());
    for (kind, of) in [
        ("entity", kills.entity),
        ("supervisor", kills.supervisor),
        ("dedup", kills.dedup),
        ("committer", kills.committer),
    ] {
        assert!(of.both_ways(), "{kind} not killed both ways: {kills}");
    }
    assert_eq!(topology.dedup.restarts, kills.dedup.total());
    assert_eq!(topology.committer.restarts, kills.committer.total());
    assert!(restarts > 0, "no supervisor was restarted");
    // Records are replayed only when an actor died with them unfinished in its mailbox and its
    // partition was not rewound meanwhile, which the timing decides; the views below show that
    // whatever was lost was made good.
    assert!(deaths > 0, "no entity actor died with work pending");

    assert_views_exact(&running, &expected).await;
    let (_, applied, duplicates) = running.metrics.totals();
    assert_eq!(applied, expected.applied, "applied exactly once");
    assert!(
        duplicates >= expected.duplicates,
        "replays are dropped as duplicates"
    );
    running.shutdown().await.unwrap();
}
