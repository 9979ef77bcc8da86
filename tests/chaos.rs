//! Chaos: while 200,000 events with duplicates flow, entity actors and partition supervisors with
//! work in flight are killed at random, by stopping them and by panics inside their handlers. Every
//! view still equals the independent expectation (nothing lost, nothing applied twice, order
//! kept), and the committed offsets reach the end offsets.

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
    let mut chaos = Chaos::new(running.topology.clone(), 99);
    let ends = end_offsets(&produced);
    let mut round = 0u64;
    while !all_committed(&running, &ends) && chaos.kills().total() < 2 * KILLS {
        round += 1;
        // One kill in ten is a partition supervisor.
        if round % 10 == 0 {
            chaos.kill_busy_supervisor();
        } else {
            chaos.kill_busy_entity();
        }
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let kills = chaos.kills();
    wait_committed(&running, &ends, Duration::from_secs(300)).await;
    let replayed = running.metrics.replayed.get();
    let deaths = running.metrics.entity_deaths.get();
    let restarts = running.metrics.supervisor_restarts.get();
    eprintln!(
        "chaos: entity actors {} stopped, {} panicked ({deaths} died with work pending, {replayed} records replayed); partition supervisors {} stopped, {} panicked ({restarts} restarted)",
        kills.entity_stopped, kills.entity_panicked, kills.supervisor_stopped, kills.supervisor_panicked
    );
    assert!(kills.total() >= KILLS, "only {} kills", kills.total());
    assert!(
        kills.entity_stopped > 0 && kills.entity_panicked > 0,
        "{kills:?}"
    );
    assert!(
        kills.supervisor_stopped > 0 && kills.supervisor_panicked > 0,
        "{kills:?}"
    );
    assert!(restarts > 0, "no supervisor was restarted");
    assert!(replayed > 0, "no record was replayed");

    assert_views_exact(&running, &expected).await;
    let (_, applied, duplicates) = running.metrics.totals();
    assert_eq!(applied, expected.applied, "applied exactly once");
    assert!(
        duplicates >= expected.duplicates,
        "replays are dropped as duplicates"
    );
    running.shutdown().await.unwrap();
}
