//! End to end, on the embedded broker and on Tansu in its own process: 50,000 generated events
//! over the seven topics, with duplicates and malformed records; every view is compared field by
//! field with one computed independently, per-entity order is checked, dead letters are checked by
//! origin and reason, the committed offsets reach the end offsets, and the verifier agrees.

mod common;

use std::time::Duration;

use aggregator::service;
use common::*;

#[actix_rt::test]
async fn on_the_embedded_broker() {
    let (_dir, config, _broker) = setup();
    fifty_thousand_events_give_exact_views_in_order_with_dead_letters_and_commits(config).await;
}

#[actix_rt::test]
async fn on_tansu() {
    let (_dir, config, _broker) = setup_tansu().await;
    fifty_thousand_events_give_exact_views_in_order_with_dead_letters_and_commits(config).await;
}

async fn fifty_thousand_events_give_exact_views_in_order_with_dead_letters_and_commits(
    config: aggregator::config::Config,
) {
    let (produced, expected) = produce_generated(&config, 50_000, 2_000, 7).await;
    assert!(
        expected.duplicates > 1_000,
        "{} duplicates",
        expected.duplicates
    );
    assert!(
        expected.dead_letters.len() > 100,
        "{} dead letters",
        expected.dead_letters.len()
    );

    let running = service::start(&config).await.unwrap();
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(240)).await;

    assert_views_exact(&running, &expected).await;
    let (_, applied, duplicates) = running.metrics.totals();
    assert_eq!(applied, expected.applied);
    assert_eq!(duplicates, expected.duplicates);

    let metrics = get_text(&running, "/metrics").await;
    assert_eq!(
        metric_sum(&metrics, "aggregator_dead_lettered_total") as usize,
        expected.dead_letters.len()
    );

    let dead = read_dead_letters(
        &config,
        expected.dead_letters.len(),
        Duration::from_secs(60),
    );
    let want: std::collections::BTreeMap<_, _> = expected
        .dead_letters
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    assert_eq!(dead, want, "dead letters by origin and reason");

    // The verifier, with its own reading of the topics and its own fold, agrees.
    let report = verify(&config, &format!("http://{}", running.http_addr)).await;
    assert!(
        report.is_clean(),
        "{}",
        aggregator::verifier::render(&report)
    );
    assert_eq!(report.events_expected, expected.applied);
    assert_eq!(report.events_applied, expected.applied);
    assert_eq!(
        report.dead_lettered.values().sum::<u64>() as usize,
        expected.dead_letters.len()
    );
    running.shutdown().await.unwrap();
}
