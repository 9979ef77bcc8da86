//! Passivation under the live-actor bound: with far more entities than `tuning.max_live_entities`,
//! idle actors passivate, least recently used first, while their keys keep receiving events. Every
//! view stays exact and in order, every duplicate is dropped once, and no record is replayed (an
//! actor that passivated had finished its work, so its successor is not sent it again). Below the
//! bound, actors idle for `tuning.entity_idle_ms` passivate by themselves.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aggregator::service;
use common::*;

#[actix_rt::test]
async fn many_more_entities_than_live_actors_give_exact_views_without_replays() {
    let (_dir, mut config, _broker) = setup();
    const LIVE: usize = 50;
    const CUSTOMERS: u32 = 1_500;
    config.tuning.max_live_entities = LIVE;
    // An actor with events queued cannot passivate: few records in flight keep most actors idle.
    config.tuning.max_in_flight_per_partition = 4;
    config.tuning.poll_batch = 20;
    let (produced, expected) = produce_generated(&config, 15_000, CUSTOMERS, 11).await;
    assert!(
        expected.duplicates > 100,
        "{} duplicates",
        expected.duplicates
    );

    let running = service::start(&config).await.unwrap();
    let most_live = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (topology, most_live) = (running.topology.clone(), most_live.clone());
        actix::spawn(async move {
            loop {
                most_live.fetch_max(topology.entities.len(), Ordering::Relaxed);
                actix::clock::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(240)).await;
    sampler.abort();
    // Every record is processed now, so no actor starts after this last look.
    let most_live = most_live
        .load(Ordering::Relaxed)
        .max(running.topology.entities.len());
    // Busy actors may exceed the bound (at most one per record in flight), but nowhere near
    // every entity is live at once, as it would be without it.
    assert!(
        most_live < CUSTOMERS as usize / 3,
        "{most_live} entity actors live at once under a bound of {LIVE}"
    );

    assert_views_exact(&running, &expected).await;
    let (_, applied, duplicates) = running.metrics.totals();
    assert_eq!(applied, expected.applied);
    assert_eq!(duplicates, expected.duplicates, "duplicates dropped");

    let metrics = get_text(&running, "/metrics").await;
    let passivations = metric_sum(&metrics, "aggregator_entity_passivations_total");
    // Every entity had an actor, and at most `most_live` were live at the end.
    assert!(
        passivations >= f64::from(CUSTOMERS) - most_live as f64,
        "{passivations} passivations of {CUSTOMERS} entities, at most {most_live} live at once"
    );
    assert_eq!(metric_sum(&metrics, "aggregator_replayed_total"), 0.0);
    assert_eq!(metric_sum(&metrics, "aggregator_entity_deaths_total"), 0.0);
    running.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn idle_actors_passivate_on_their_own_and_their_views_are_served_from_the_store() {
    let (_dir, mut config, _broker) = setup();
    const CUSTOMERS: u32 = 40;
    // Far above the entities: only the idle timeout can passivate them.
    config.tuning.max_live_entities = 10_000;
    config.tuning.entity_idle_ms = 300;
    let (produced, expected) = produce_generated(&config, 400, CUSTOMERS, 5).await;

    let running = service::start(&config).await.unwrap();
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(120)).await;
    // Nothing more arrives: every actor is idle from here and must stop by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !running.topology.entities.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} entity actors still live a minute after the last event, idle timeout 300 ms",
            running.topology.entities.len()
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }

    let metrics = get_text(&running, "/metrics").await;
    let passivations = metric_sum(&metrics, "aggregator_entity_passivations_total");
    assert!(
        passivations >= expected.views.len() as f64,
        "{passivations} passivations for {} entities",
        expected.views.len()
    );
    assert_eq!(metric_sum(&metrics, "aggregator_entity_deaths_total"), 0.0);
    // With no actor live, every view is read back from the store.
    assert_views_exact(&running, &expected).await;
    running.shutdown().await.unwrap();
}
