//! The dedup window: each partition remembers only its latest `store.dedup_window` message ids,
//! so the store's markers stay bounded however many events flow, and expiry takes nothing from
//! the views. (Whether a duplicate is still caught depends on how many ids of its partition,
//! from all seven topics, were written since its original; the benchmark's smoke test covers
//! duplicates within the window.)

mod common;

use std::time::Duration;

use aggregator::generator::{Generator, GeneratorConfig};
use aggregator::service;
use common::*;

/// Message ids remembered per partition in this suite, well below the ids each receives.
const WINDOW: u64 = 2_000;

#[actix_rt::test]
async fn markers_stay_within_the_window_and_views_stay_exact() {
    let (_dir, mut config, _broker) = setup();
    config.store.dedup_window = WINDOW;
    // No upstream duplicates: all seven topics are read at once, so an original and its
    // duplicate may be further apart in their partition's ids than the window.
    let records: Vec<_> = Generator::new(
        GeneratorConfig {
            seed: 17,
            customers: 1_000,
            duplicate_rate: 0.0,
            malformed_rate: 0.004,
        },
        &config.sources,
    )
    .take(20_000)
    .collect();
    let produced = produce(&config.kafka.brokers, &config, &records).await;
    let expected = expected(&config, &produced);

    let running = service::start(&config).await.unwrap();
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(240)).await;
    assert_views_exact(&running, &expected).await;
    let (_, applied, duplicates) = running.metrics.totals();
    assert_eq!(
        (applied, duplicates),
        (expected.applied, expected.duplicates)
    );
    let expired = running.topology.snapshot(0).dedup.markers_expired;
    running.shutdown().await.unwrap();

    let store = config.store.open().unwrap();
    let kept: u64 = (0..PARTITIONS)
        .map(|p| {
            let n = store.marker_count(p).unwrap();
            assert!(n <= WINDOW, "partition {p} keeps {n} markers");
            n
        })
        .sum();
    assert_eq!(kept, PARTITIONS as u64 * WINDOW);
    assert_eq!(
        kept + expired,
        expected.applied,
        "every applied id was marked once"
    );
}
