//! The HTTP API: topology, entity views, health, readiness and metrics, and JSON errors (never a
//! 500) for unknown keys, malformed keys and unknown paths.

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

    let topology: Value = get("/topology").await.unwrap().json().await.unwrap();
    let partitions = topology["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 7 * PARTITIONS as usize);
    for p in partitions {
        for field in [
            "topic",
            "partition",
            "committed",
            "watermark",
            "in_flight",
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
