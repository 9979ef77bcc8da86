//! The dedup window: each partition remembers only its latest `store.dedup_window` message ids,
//! so the store's markers stay bounded however many events flow; duplicates within the window
//! are still dropped and every view stays exact.

mod common;

use std::time::Duration;

use aggregator::service;
use aggregator_actors::Store;
use common::*;

/// Message ids remembered per partition in this suite: well above the distance at which the
/// generator re-sends duplicates, well below the ids each partition receives.
const WINDOW: u64 = 2_000;

#[actix_rt::test]
async fn markers_stay_within_the_window_and_duplicates_within_it_are_dropped() {
    let (_dir, mut config, _broker) = setup();
    config.store.dedup_window = WINDOW;
    let (produced, expected) = produce_generated(&config, 20_000, 1_000, 17).await;

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

    let store = Store::open(&config.store.path).unwrap();
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
