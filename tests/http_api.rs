//! The HTTP API: topology, entity views, health, readiness and metrics, and JSON errors (never a
//! 500) for unknown keys, malformed keys, unknown paths and damaged stored views.

mod common;

use std::time::Duration;

use aggregator::service;
use common::*;
use serde_json::Value;

#[actix_rt::test]
async fn endpoints_answer_json_and_errors_are_4xx() {
    let (_dir, config, _broker) = setup();
    let records = generate(&config, 2_000, 100, 3);
    let produced = produce(&config.kafka.brokers, &config, &records).await;

    let running = service::start(&config).await.unwrap();
    let base = format!("http://{}", running.http_addr);
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(120)).await;
    let get = |path: &str| reqwest::get(format!("{base}{path}"));

    let ready = get("/ready").await.unwrap();
    assert_eq!(ready.status(), 200);
    let health = get("/health").await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");

    // Once every record is committed, no supervisor holds any for replay, though none arrive to
    // make it look.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let topology: Value = loop {
        let topology: Value = get("/topology").await.unwrap().json().await.unwrap();
        let held: Vec<i64> = topology["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["held"].as_i64().unwrap())
            .collect();
        if held.iter().all(|h| *h == 0) {
            break topology;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "records still held 10 s after the last commit: {held:?}"
        );
        actix::clock::sleep(Duration::from_millis(100)).await;
    };
    let partitions = topology["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 7 * PARTITIONS as usize);
    for p in partitions {
        for field in [
            "topic",
            "partition",
            "committed",
            "watermark",
            "in_flight",
            "held",
            "lag",
            "paused",
        ] {
            assert!(p.get(field).is_some(), "partition lacks {field}: {p}");
        }
        assert_eq!(p["in_flight"], 0);
    }
    assert!(topology["entities"]["actors"].as_u64().unwrap() > 0);
    assert!(topology["dedup"]["hits"].as_u64().unwrap() > 0);
    assert!(topology["dedup"]["store_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        topology["committer"]["last_commit"]
            .as_array()
            .unwrap()
            .len(),
        7 * PARTITIONS as usize
    );

    let key = produced.iter().find_map(|p| p.record.key.clone()).unwrap();
    let view = get(&format!("/entities/{key}")).await.unwrap();
    assert_eq!(view.status(), 200);
    assert_eq!(view.json::<Value>().await.unwrap()["key"], key.as_str());

    let cases = [
        ("/entities/NOBODY", 404),
        (&*format!("/entities/{}", "K".repeat(300)), 400),
        ("/entities/a%07b", 400),
        ("/no/such/path", 404),
        ("/entities/", 404),
    ];
    for (path, status) in cases {
        let response = get(path).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    // Watermarks come with the client's statistics, once a second: wait for the first.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running
        .topology
        .partitions
        .iter()
        .any(|p| p.lag().is_none())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no watermarks reported"
        );
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    for name in [
        "aggregator_consumed_total{source=\"order-service\"}",
        "aggregator_applied_total{source=\"order-service\"}",
        "aggregator_duplicates_total{source=\"order-service\"}",
        "aggregator_lag{",
        "aggregator_mailbox_depth",
        "aggregator_commit_latency_seconds_count",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    assert_eq!(
        metric_sum(&metrics, "aggregator_consumed_total") as usize,
        produced.len()
    );
    running.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_damaged_stored_view_is_a_json_error_not_a_500() {
    use aggregator_actors::aggregate::{Aggregate, SourceSection};
    use aggregator_actors::view_codec;

    let (_dir, config, _broker) = setup();
    // A view whose section holds a payload field that is no longer JSON: the store reads its
    // sections as stored, so only serving it decodes the field.
    let mut view = Aggregate::new("C_DAMAGED", 0);
    view.sources.insert(
        "order-service".into(),
        SourceSection {
            code: "ORDER_CREATED".into(),
            message_id: "m1".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            state: serde_json::from_str(r#"{"items":[1]}"#).unwrap(),
        }
        .into(),
    );
    let mut bytes = view_codec::encode(&view).unwrap();
    let at = bytes.windows(3).position(|w| w == b"[1]").unwrap();
    bytes[at..at + 3].copy_from_slice(b"[1,");
    {
        let db = sled::open(&config.store.path).unwrap();
        db.insert(b"e/C_DAMAGED", bytes).unwrap();
        db.flush().unwrap();
    }

    let running = service::start(&config).await.unwrap();
    let response = reqwest::get(format!("http://{}/entities/C_DAMAGED", running.http_addr))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("the view of \"C_DAMAGED\" does not decode"),
        "{body}"
    );
    running.shutdown().await.unwrap();
}
