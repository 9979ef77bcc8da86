//! Helpers shared by the end-to-end suites: a test configuration, producing a generated data set
//! with its offsets, an expected view computed independently of the service's fold, and checks
//! against the running service's HTTP API.

#![allow(dead_code)] // each suite uses its own subset

pub mod tansu;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use aggregator::config::Config;
use aggregator::demo::all_committed;
use aggregator::embedded_broker::EmbeddedBroker;
use aggregator::event_producer::record_headers;
use aggregator::generator::{Generated, Generator, GeneratorConfig};
use aggregator::service::RunningService;
use aggregator_actors::{RuleConfig, RuleKind};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

/// Logs to the test's output when `RUST_LOG` is set (for example `RUST_LOG=aggregator=info`).
pub fn log_if_asked() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A fresh store directory, the test configuration and an embedded broker it points at.
pub fn setup() -> (tempfile::TempDir, Config, EmbeddedBroker) {
    log_if_asked();
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut config = test_config(&dir.path().join("store"));
    let broker = EmbeddedBroker::start(&config, PARTITIONS).expect("embedded broker");
    config.kafka.brokers = broker.bootstrap_servers();
    (dir, config, broker)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The consumer group's committed offsets of every source partition, from the broker.
pub fn group_committed(config: &Config) -> BTreeMap<(String, i32), i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for source in &config.sources {
        for p in 0..PARTITIONS {
            tpl.add_partition(&source.topic, p);
        }
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets")
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
            _ => None,
        })
        .collect()
}

/// A fresh store directory, the test configuration and a Tansu broker in its own process.
pub async fn setup_tansu() -> (tempfile::TempDir, Config, tansu::TansuBroker) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut config = test_config(&dir.path().join("store"));
    tansu::TansuBroker::tune_group_timeouts(&mut config);
    let broker = tansu::TansuBroker::start(&config, PARTITIONS).await;
    config.kafka.brokers = broker.bootstrap_servers();
    (dir, config, broker)
}

/// Generates `n` records over `customers`, produces them and computes what the views must be.
pub async fn produce_generated(
    config: &Config,
    n: usize,
    customers: u32,
    seed: u64,
) -> (Vec<Produced>, Expected) {
    let records = generate(config, n, customers, seed);
    let produced = produce(&config.kafka.brokers, config, &records).await;
    let expected = expected(config, &produced);
    (produced, expected)
}

/// Waits until the service has applied at least `n` events (it is consuming a backlog).
pub async fn wait_applied(service: &RunningService, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while service.metrics.totals().1 < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} events applied in 120 s"
        );
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts that every expected view is served exactly, in order.
pub async fn assert_views_exact(service: &RunningService, expected: &Expected) {
    let differences = compare_views(service, expected).await;
    assert!(
        differences.is_empty(),
        "{} differences, first: {:#?}",
        differences.len(),
        &differences[..differences.len().min(20)]
    );
}

/// Partitions of every topic in the suites.
pub const PARTITIONS: i32 = 4;

/// The shipped configuration, tuned for tests, with one extra history rule per source that keeps
/// every applied `payload.seq`: the order in which the service applied each source's events.
pub fn test_config(store: &std::path::Path) -> Config {
    let mut config = Config::from_toml(include_str!("../../config.toml")).expect("shipped config");
    config.store.path = store.to_path_buf();
    config.store.flush_interval_ms = 10;
    config.tuning.commit_interval_ms = 50;
    config.tuning.entity_idle_ms = 2_000;
    config.http.bind = "127.0.0.1:0".into();
    EmbeddedBroker::tune_group_timeouts(&mut config);
    for source in config.sources.clone() {
        config.rules.push(RuleConfig {
            name: seq_rule(&source.name),
            kind: RuleKind::History,
            source: source.name.clone(),
            codes: vec![],
            field: Some("/payload/seq".into()),
            factor: 1.0,
            limit: 10_000,
        });
    }
    config.validate().expect("test config is valid");
    config
}

/// Name of the test rule that records the applied sequence numbers of `source`.
pub fn seq_rule(source: &str) -> String {
    format!("seq_{source}")
}

/// `n` generated records over `customers` customers.
pub fn generate(config: &Config, n: usize, customers: u32, seed: u64) -> Vec<Generated> {
    let cfg = GeneratorConfig {
        seed,
        customers,
        duplicate_rate: 0.03,
        malformed_rate: 0.004,
    };
    Generator::new(cfg, &config.sources).take(n).collect()
}

/// A produced record: what was sent and where the broker put it.
#[derive(Clone, Debug)]
pub struct Produced {
    /// The record.
    pub record: Generated,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// Produces `records` in order and returns each with its partition and offset.
pub async fn produce(brokers: &str, config: &Config, records: &[Generated]) -> Vec<Produced> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("partitioner", "consistent_random")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let topics: Vec<String> = config.sources.iter().map(|s| s.topic.clone()).collect();
    let mut deliveries = Vec::with_capacity(records.len());
    for g in records {
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(&topics[g.source]).headers(record_headers(g));
        if let Some(k) = &g.key {
            record = record.key(k.as_str());
        }
        if let Some(v) = &g.value {
            record = record.payload(v.as_slice());
        }
        deliveries.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("enqueued"),
        );
    }
    let mut out = Vec::with_capacity(records.len());
    for (g, d) in records.iter().zip(deliveries) {
        let delivery = d.await.expect("delivery answered").expect("delivered");
        out.push(Produced {
            record: g.clone(),
            topic: topics[g.source].clone(),
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    out
}

/// One past the highest offset produced, per (topic, partition).
pub fn end_offsets(produced: &[Produced]) -> BTreeMap<(String, i32), i64> {
    let mut ends = BTreeMap::new();
    for p in produced {
        let end = ends.entry((p.topic.clone(), p.partition)).or_insert(0);
        *end = (*end).max(p.offset + 1);
    }
    ends
}

/// Waits until the service has committed every partition up to its end offset.
pub async fn wait_committed(
    service: &RunningService,
    ends: &BTreeMap<(String, i32), i64>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while !all_committed(service, ends) {
        assert!(
            Instant::now() < deadline,
            "not committed within {timeout:?}: ends {ends:?}, {} dead letters pending\n{}",
            service.metrics.dead_letters_pending.get(),
            serde_json::to_string_pretty(&service.topology.snapshot(5)).unwrap_or_default()
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
}

/// Status and body of `GET {base}/health`, sent from a thread of its own: the suite's thread also
/// runs the service's actors, and a request that thread writes late is refused by the server's
/// request timeout.
pub fn health(base: &str) -> (u16, Value) {
    let url = format!("{base}/health");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let response = reqwest::get(&url).await.expect("HTTP answer");
            let status = response.status().as_u16();
            (status, response.json().await.expect("JSON body"))
        })
    })
    .join()
    .expect("health request thread")
}

/// The body of `GET path` from the service's HTTP API.
pub async fn get_text(service: &RunningService, path: &str) -> String {
    reqwest::get(format!("http://{}{path}", service.http_addr))
        .await
        .expect("HTTP answer")
        .text()
        .await
        .expect("HTTP body")
}

/// What the test expects, computed from the produced records without the service's code.
#[derive(Default, Debug)]
pub struct Expected {
    /// Expected view per entity key.
    pub views: BTreeMap<String, Value>,
    /// Records that must be dead-lettered: (topic, partition, offset) to reason.
    pub dead_letters: BTreeMap<(String, i32, i64), &'static str>,
    /// Events that must be applied.
    pub applied: u64,
    /// Records that must be dropped as duplicates.
    pub duplicates: u64,
}

/// Numeric fields the shipped rules sum, per code.
fn numeric_field(code: &str) -> Option<&'static str> {
    match code {
        "ORDER_CREATED" => Some("total_amount"),
        "PAYMENT_CAPTURED" | "PAYMENT_REFUNDED" => Some("amount"),
        "REVIEW_POSTED" => Some("rating"),
        "POINTS_EARNED" | "POINTS_REDEEMED" => Some("points"),
        _ => None,
    }
}

/// Why a record cannot be processed, judged from the envelope rules of the README.
fn judge(p: &Produced, source_name: &str) -> Result<(String, String, Value, i64), &'static str> {
    let g = &p.record;
    let Some(raw) = &g.value else {
        return Err("tombstone");
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return Err("invalid_utf8");
    };
    let Ok(envelope) = serde_json::from_str::<Value>(text) else {
        return Err("invalid_json");
    };
    if !envelope.is_object() {
        return Err("not_an_object");
    }
    let Some(meta) = envelope.get("metadata").filter(|m| m.is_object()) else {
        return Err("missing_metadata");
    };
    let header_id = g
        .headers
        .iter()
        .find(|(k, _)| k == "message_id")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .filter(|s| !s.is_empty());
    let id = match header_id {
        Some(id) => id,
        None => match meta.get("message_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => return Err("missing_message_id"),
        },
    };
    let code = match envelope.get("code").and_then(Value::as_str) {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => return Err("missing_code"),
    };
    if let Some(name) = meta.get("service_name").and_then(Value::as_str) {
        if name != source_name {
            return Err("service_mismatch");
        }
    }
    let ts = meta.get("timestamp").and_then(Value::as_str).unwrap_or("");
    let Ok(ts) = chrono::DateTime::parse_from_rfc3339(ts) else {
        return Err("bad_timestamp");
    };
    if g.key.as_deref().unwrap_or("").is_empty() {
        return Err("missing_key");
    }
    if let Some(field) = numeric_field(&code) {
        if !envelope["payload"][field].is_number() {
            return Err("rule_failed");
        }
    }
    Ok((id, code, envelope, ts.timestamp_millis()))
}

fn add(figure: &mut Value, x: f64) {
    *figure = json!(figure.as_f64().unwrap_or(0.0) + x);
}

/// Folds the produced records, in offset order, into the customer-360 views of the shipped
/// configuration (plus the test's seq history), written out by hand from the README's rules.
pub fn expected(config: &Config, produced: &[Produced]) -> Expected {
    let mut ex = Expected::default();
    let mut seen: HashSet<String> = HashSet::new();
    for p in produced {
        let source = &config.sources[p.record.source].name;
        let (id, code, envelope, ts) = match judge(p, source) {
            Ok(ok) => ok,
            Err(reason) => {
                ex.dead_letters
                    .insert((p.topic.clone(), p.partition, p.offset), reason);
                continue;
            }
        };
        if !seen.insert(id.clone()) {
            ex.duplicates += 1;
            continue;
        }
        ex.applied += 1;
        let key = p.record.key.clone().unwrap_or_default();
        let view = ex.views.entry(key.clone()).or_insert_with(|| {
            json!({"key": key, "partition": p.partition, "events_applied": 0, "updated_at_ms": 0,
                   "sources": {}, "counters": {}, "figures": {}})
        });
        let payload = envelope["payload"].clone();
        add(&mut view["events_applied"], 1.0);
        view["updated_at_ms"] = json!(view["updated_at_ms"].as_i64().unwrap_or(0).max(ts));
        add(&mut view["counters"][&code], 1.0);
        if code == "CUSTOMER_DELETED" {
            view["sources"].as_object_mut().unwrap().remove(source);
        } else {
            let mut state = view["sources"][source]["state"].clone();
            match (&mut state, &payload) {
                (Value::Object(s), Value::Object(new)) => {
                    for (k, v) in new {
                        s.insert(k.clone(), v.clone());
                    }
                }
                _ => state = payload.clone(),
            }
            view["sources"][source] = json!({"code": code, "message_id": id, "partition": p.partition,
                                             "offset": p.offset, "timestamp_ms": ts, "state": state});
        }
        let f = &mut view["figures"];
        let num = |name: &str| payload[name].as_f64().unwrap_or(f64::NAN);
        match code.as_str() {
            "ORDER_CREATED" => {
                add(&mut f["orders_created"], 1.0);
                add(&mut f["order_total"], num("total_amount"));
                let largest = f["largest_order"].as_f64().unwrap_or(f64::MIN);
                f["largest_order"] = json!(largest.max(num("total_amount")));
                let mut recent = f["recent_orders"].as_array().cloned().unwrap_or_default();
                recent.push(payload["order_id"].clone());
                if recent.len() > 5 {
                    recent.remove(0);
                }
                f["recent_orders"] = Value::Array(recent);
            }
            "ORDER_CANCELLED" => add(&mut f["orders_cancelled"], 1.0),
            "PAYMENT_CAPTURED" => add(&mut f["payments_captured"], num("amount")),
            "PAYMENT_REFUNDED" => add(&mut f["payments_refunded"], num("amount")),
            "SHIPMENT_DISPATCHED" | "SHIPMENT_DELIVERED" => {
                f["last_shipment_status"] = payload["status"].clone()
            }
            "REVIEW_POSTED" => {
                add(&mut f["reviews"], 1.0);
                let count = f["rating"]["count"].as_f64().unwrap_or(0.0) + 1.0;
                let sum = f["rating"]["sum"].as_f64().unwrap_or(0.0) + num("rating");
                f["rating"] = json!({"count": count, "sum": sum, "avg": sum / count});
            }
            "EMAIL_SENT" | "SMS_SENT" => add(&mut f["notifications_sent"], 1.0),
            "POINTS_EARNED" => add(&mut f["points_balance"], num("points")),
            "POINTS_REDEEMED" => add(&mut f["points_balance"], -num("points")),
            _ => {}
        }
        let seqs = &mut f[seq_rule(source)];
        let mut list = seqs.as_array().cloned().unwrap_or_default();
        list.push(payload["seq"].clone());
        *seqs = Value::Array(list);
    }
    ex
}

/// Fetches every expected view over HTTP and returns the differences (empty when all match),
/// checking also that each source's applied sequence numbers are in increasing order.
pub async fn compare_views(service: &RunningService, expected: &Expected) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    for (key, want) in &expected.views {
        let url = format!("http://{}/entities/{key}", service.http_addr);
        let response = client.get(&url).send().await.expect("HTTP answer");
        if !response.status().is_success() {
            out.push(format!("{key}: HTTP {}", response.status()));
            continue;
        }
        let got: Value = response.json().await.expect("JSON view");
        for (name, seqs) in got["figures"].as_object().into_iter().flatten() {
            if let Some(list) = seqs.as_array().filter(|_| name.starts_with("seq_")) {
                let nums: Vec<i64> = list.iter().filter_map(Value::as_i64).collect();
                if nums.windows(2).any(|w| w[0] >= w[1]) {
                    out.push(format!("{key}: order violation in {name}: {nums:?}"));
                }
            }
        }
        // Exact: the expectation adds in the same order as the service.
        aggregator::verifier::differences(key, want, &got, 0.0, &mut out);
    }
    out
}

/// The verifier's report on the views served at `base`: it reads the topics itself (on a thread
/// of its own, as its client blocks) and recomputes every view with its own fold.
pub async fn verify(config: &Config, base: &str) -> aggregator::verifier::Report {
    let verify_config = config.clone();
    let expectation =
        std::thread::spawn(move || aggregator::verifier::expect_from_topics(&verify_config))
            .join()
            .expect("verifier thread")
            .expect("topics read");
    aggregator::verifier::compare(&expectation, base)
        .await
        .expect("views read")
}

/// Reads the dead-letter topic from the beginning until `expected` records arrived (or `timeout`)
/// and returns them as origin (topic, partition, offset) to reason.
pub fn read_dead_letters(
    config: &Config,
    expected: usize,
    timeout: Duration,
) -> BTreeMap<(String, i32, i64), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", "dead-letter-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&config.kafka.dead_letter_topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while out.len() < expected && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let header = |name: &str| -> String {
            m.headers()
                .and_then(|hs| {
                    hs.iter()
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_default()
        };
        out.insert(
            (
                header("dlq.origin.topic"),
                header("dlq.origin.partition").parse().unwrap_or(-1),
                header("dlq.origin.offset").parse().unwrap_or(-1),
            ),
            header("dlq.reason"),
        );
    }
    out
}

/// Counts of events by a metric name in the Prometheus text, summed over labels.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The offsets the broker holds as committed for the service's group, summed over partitions.
pub fn committed_total(config: &Config) -> i64 {
    group_committed(config).values().sum()
}
