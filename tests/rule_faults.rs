//! Rule faults: a rule that fails is retried with backoff up to `tuning.rule_retries` times.
//! Failures within the budget leave no trace in the views; an event whose rule keeps failing is
//! dead-lettered with the reason, and its entity carries on with the next event.

mod common;

use std::time::Duration;

use aggregator::config::Config;
use aggregator::generator::{Generated, Kind};
use aggregator::service;
use common::*;

/// Retries in this suite.
const RETRIES: u32 = 3;

/// A well-formed notification event for `key` with message id and `seq`.
fn notification(config: &Config, key: &str, seq: u64) -> Generated {
    let source = config
        .sources
        .iter()
        .position(|s| s.name == "notification-service")
        .expect("the shipped config has the notification service");
    let envelope = serde_json::json!({
        "metadata": {
            "timestamp": "2026-10-01T12:00:00Z",
            "message_id": format!("rule-fault-{key}-{seq}"),
            "original_message_id": null,
            "service_name": "notification-service"
        },
        "code": "EMAIL_SENT",
        "payload": {"customer_id": key, "seq": seq}
    });
    Generated {
        source,
        key: Some(key.to_string()),
        value: Some(envelope.to_string().into_bytes()),
        headers: vec![],
        kind: Kind::Event,
    }
}

/// Produces event `seq` of entity `CRF`, waits until it is committed and returns its origin.
async fn produce_one(
    running: &service::RunningService,
    config: &Config,
    seq: u64,
) -> (String, i32, i64) {
    let one = produce(
        &config.kafka.brokers,
        config,
        &[notification(config, "CRF", seq)],
    )
    .await;
    wait_committed(running, &end_offsets(&one), Duration::from_secs(30)).await;
    (one[0].topic.clone(), one[0].partition, one[0].offset)
}

#[actix_rt::test]
async fn failing_rules_are_retried_then_dead_lettered_and_the_entity_carries_on() {
    let (_dir, mut config, _broker) = setup();
    config.tuning.rule_retries = RETRIES;
    let (produced, expected) = produce_generated(&config, 2_000, 300, 61).await;

    let running = service::start(&config).await.unwrap();
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(120)).await;
    assert_views_exact(&running, &expected).await;

    // As many failures as the budget allows: the event is applied all the same.
    running.rule_faults().fail_next(u64::from(RETRIES));
    let within = produce_one(&running, &config, 1).await;
    // One failure more: the event is dead-lettered after RETRIES + 1 attempts.
    running.rule_faults().fail_next(u64::from(RETRIES) + 1);
    let beyond = produce_one(&running, &config, 2).await;
    // The entity carries on with its next event.
    produce_one(&running, &config, 3).await;

    let dead = read_dead_letters(
        &config,
        expected.dead_letters.len() + 1,
        Duration::from_secs(30),
    );
    assert_eq!(
        dead.len(),
        expected.dead_letters.len() + 1,
        "one more dead letter"
    );
    assert_eq!(dead.get(&beyond).map(String::as_str), Some("rule_failed"));
    assert!(!dead.contains_key(&within), "retried within the budget");
    let view: serde_json::Value =
        serde_json::from_str(&get_text(&running, "/entities/CRF").await).unwrap();
    assert_eq!(view["events_applied"], 2, "{view}");
    assert_eq!(
        view["figures"][seq_rule("notification-service")],
        serde_json::json!([1, 3]),
        "{view}"
    );
    let metrics = get_text(&running, "/metrics").await;
    assert!(
        metric_sum(&metrics, "aggregator_faults_total{kind=\"rule\"}")
            >= f64::from(2 * RETRIES + 1),
        "rule faults are counted"
    );
    running.shutdown().await.unwrap();
}
