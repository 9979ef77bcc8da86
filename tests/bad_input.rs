//! Bad input, table-driven: each unprocessable record goes to the dead-letter topic with its
//! reason and origin in headers and is counted, and the records after it in the same partition
//! are still applied. A tombstone is not bad input: it deletes the source's section.

mod common;

use std::time::Duration;

use aggregator::generator::{Generated, Kind};
use aggregator::service;
use common::*;
use serde_json::{json, Value};

const KEY: &str = "C-BAD";

fn envelope(id: &str, code: &str, payload: Value) -> Value {
    json!({"metadata": {"timestamp": "2026-10-01T12:00:00Z", "message_id": id,
                        "service_name": "order-service"},
           "code": code, "payload": payload})
}

fn record(source: usize, key: Option<&str>, value: Option<Vec<u8>>) -> Generated {
    Generated {
        source,
        key: key.map(str::to_string),
        value,
        headers: vec![],
        kind: Kind::Malformed,
    }
}

#[actix_rt::test]
async fn each_bad_record_is_dead_lettered_with_its_reason_and_later_records_apply() {
    let (_dir, mut config, _broker) = setup();
    config.tuning.max_value_bytes = 2_048;
    let orders = config
        .sources
        .iter()
        .position(|s| s.name == "order-service")
        .unwrap();
    let good = |n: usize| {
        let e = envelope(
            &format!("good-{n}"),
            "ORDER_CREATED",
            json!({"order_id": format!("O{n}"), "total_amount": 10.0, "seq": n}),
        );
        record(orders, Some(KEY), Some(e.to_string().into_bytes()))
    };
    let bytes = |v: Value| Some(v.to_string().into_bytes());
    let mut no_metadata = envelope("x", "ORDER_CREATED", json!({}));
    no_metadata.as_object_mut().unwrap().remove("metadata");
    let mut bad_time = envelope("t1", "ORDER_CREATED", json!({"total_amount": 1.0}));
    bad_time["metadata"]["timestamp"] = json!("31/12/2026 25:61");
    let mut imposter = envelope("s1", "ORDER_CREATED", json!({"total_amount": 1.0}));
    imposter["metadata"]["service_name"] = json!("billing-service");
    let cases: Vec<(&str, Generated)> = vec![
        (
            "invalid_utf8",
            record(orders, Some(KEY), Some(vec![0xc3, 0x28, 0xa0, 0xa1])),
        ),
        (
            "invalid_json",
            record(orders, Some(KEY), Some(b"{\"metadata\": ".to_vec())),
        ),
        (
            "not_an_object",
            record(orders, Some(KEY), Some(b"[1, 2, 3]".to_vec())),
        ),
        (
            "missing_metadata",
            record(orders, Some(KEY), bytes(no_metadata)),
        ),
        (
            "missing_message_id",
            record(
                orders,
                Some(KEY),
                bytes(envelope("", "ORDER_CREATED", json!({}))),
            ),
        ),
        ("missing_message_id", {
            let mut e = envelope("x", "ORDER_CREATED", json!({}));
            e["metadata"].as_object_mut().unwrap().remove("message_id");
            record(orders, Some(KEY), bytes(e))
        }),
        (
            "missing_key",
            record(
                orders,
                None,
                bytes(envelope(
                    "k1",
                    "ORDER_CREATED",
                    json!({"total_amount": 1.0}),
                )),
            ),
        ),
        (
            "too_large",
            record(
                orders,
                Some(KEY),
                bytes(envelope(
                    "big",
                    "ORDER_CREATED",
                    json!({"note": "x".repeat(4_000)}),
                )),
            ),
        ),
        (
            "service_mismatch",
            record(orders, Some(KEY), bytes(imposter)),
        ),
        (
            "rule_failed",
            record(
                orders,
                Some(KEY),
                bytes(envelope(
                    "w1",
                    "ORDER_CREATED",
                    json!({"total_amount": "ten"}),
                )),
            ),
        ),
        ("bad_timestamp", record(orders, Some(KEY), bytes(bad_time))),
    ];
    let mut records = vec![good(0)];
    for (n, (_, bad)) in cases.iter().enumerate() {
        records.push(bad.clone());
        records.push(good(n + 1));
    }
    // A tombstone deletes the order-service section; the next good record brings it back.
    records.push(record(orders, Some(KEY), None));
    let tombstone_at = records.len() - 1;
    records.push(good(cases.len() + 1));

    let produced = produce(&config.kafka.brokers, &config, &records).await;
    let running = service::start(&config).await.unwrap();
    wait_committed(&running, &end_offsets(&produced), Duration::from_secs(120)).await;

    let view: Value = reqwest::get(format!("http://{}/entities/{KEY}", running.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let goods = cases.len() as u64 + 2;
    assert_eq!(view["figures"]["orders_created"], json!(goods), "{view}");
    assert_eq!(view["counters"]["TOMBSTONE"], json!(1), "{view}");
    assert_eq!(view["events_applied"], json!(goods + 1), "{view}");
    assert_eq!(
        view["sources"]["order-service"]["message_id"],
        json!(format!("good-{}", cases.len() + 1))
    );

    let metrics = get_text(&running, "/metrics").await;
    let mut want = std::collections::BTreeMap::new();
    for (n, (reason, _)) in cases.iter().enumerate() {
        let p = &produced[2 * n + 1];
        want.insert((p.topic.clone(), p.partition, p.offset), reason.to_string());
    }
    for reason in cases.iter().map(|(r, _)| *r) {
        let expected = cases.iter().filter(|(r, _)| *r == reason).count();
        let line = format!(
            "aggregator_dead_lettered_total{{reason=\"{reason}\",source=\"order-service\"}} {expected}"
        );
        assert!(metrics.contains(&line), "metrics lack {line}");
    }
    assert!(!want.contains_key(&(
        produced[tombstone_at].topic.clone(),
        produced[tombstone_at].partition,
        produced[tombstone_at].offset
    )));
    let dead = read_dead_letters(&config, want.len(), Duration::from_secs(60));
    assert_eq!(
        dead, want,
        "dead letters by origin (topic, partition, offset) and reason"
    );
    running.shutdown().await.unwrap();
}
