//! `aggregator verify`: reads the source topics from the beginning, recomputes every entity's
//! expected view, and compares it with the service's. The expected view is computed differently
//! from the service's fold on purpose: all accepted events of an entity are collected first, and
//! each figure is then computed from the whole list, so a shared bug cannot hide itself.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{json, Map, Value};

use aggregator_actors::{RuleConfig, RuleKind};

use crate::config::Config;

/// Why verification could not run (differences are not errors: they are in the report).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The cluster could not be read.
    #[error("reading the source topics: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A partition gave no record and no end for 10 s.
    #[error("reading {topic} stalled: partitions {partitions:?} neither delivered nor reached their end for 10 s")]
    Stalled {
        /// The topic being read.
        topic: String,
        /// Its partitions not read to the end.
        partitions: Vec<i32>,
    },
    /// The service's views could not be read.
    #[error("reading the service's views at {url}: {reason}")]
    Views {
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// One accepted event, as the verifier sees it.
#[derive(Clone, Debug)]
struct Accepted {
    source: usize,
    partition: i32,
    offset: i64,
    message_id: String,
    code: String,
    timestamp_ms: i64,
    envelope: Value,
}

/// What the topics say the views must be.
#[derive(Debug, Default)]
pub struct Expectation {
    /// Expected view per entity key.
    pub views: BTreeMap<String, Value>,
    /// Events that must be applied.
    pub events: u64,
    /// Records that must be dropped as duplicates.
    pub duplicates: u64,
    /// Records that must be dead-lettered, by reason.
    pub dead_lettered: BTreeMap<String, u64>,
}

/// The verifier's findings.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Entities compared.
    pub entities: u64,
    /// Events the topics say must be applied.
    pub events_expected: u64,
    /// Events the service's views say were applied.
    pub events_applied: u64,
    /// Events missing from views (summed over entities).
    pub missing: u64,
    /// Events applied more than once (summed over entities).
    pub applied_twice: u64,
    /// Entities whose history or latest section shows events applied out of order.
    pub order_violations: u64,
    /// Entities whose view differs in any other field.
    pub other_differences: u64,
    /// Expected dead letters by reason.
    pub dead_lettered: BTreeMap<String, u64>,
    /// The first differences found, for a human to read.
    pub examples: Vec<String>,
}

impl Report {
    /// Whether the service's views match the topics exactly.
    pub fn is_clean(&self) -> bool {
        self.missing == 0
            && self.applied_twice == 0
            && self.order_violations == 0
            && self.other_differences == 0
    }
}

/// Why a record is refused, judged from the envelope rules (see README, "Input").
fn accept(
    config: &Config,
    source: usize,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    header_id: Option<String>,
) -> Result<(String, String, String, i64, Value), &'static str> {
    let key = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    let Some(value) = value else {
        return Err("tombstone");
    };
    if value.len() > config.tuning.max_value_bytes {
        return Err("too_large");
    }
    let text = std::str::from_utf8(value).map_err(|_| "invalid_utf8")?;
    let envelope: Value = serde_json::from_str(text).map_err(|_| "invalid_json")?;
    let meta = match &envelope {
        Value::Object(o) => match o.get("metadata") {
            Some(Value::Object(m)) => m,
            _ => return Err("missing_metadata"),
        },
        _ => return Err("not_an_object"),
    };
    let id = header_id
        .filter(|h| !h.is_empty())
        .or_else(|| meta.get("message_id")?.as_str().map(str::to_string))
        .filter(|id| !id.is_empty())
        .ok_or("missing_message_id")?;
    let code = envelope
        .get("code")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .ok_or("missing_code")?
        .to_string();
    let src = &config.sources[source];
    match meta.get("service_name") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if *s == src.name => {}
        Some(_) => return Err("service_mismatch"),
    }
    let ts = match meta.get("timestamp") {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|_| "bad_timestamp")?
            .timestamp_millis(),
        Some(_) => return Err("bad_timestamp"),
    };
    let key = match &src.key_pointer {
        None => key.ok_or("missing_key")?,
        Some(p) => match envelope.pointer(p) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            None => return Err("missing_key"),
            Some(_) => return Err("bad_key"),
        },
    };
    if key.len() > config.tuning.max_key_bytes || key.chars().any(char::is_control) {
        return Err("bad_key");
    }
    for rule in rules_for(config, source, &code) {
        if matches!(
            rule.kind,
            RuleKind::Sum | RuleKind::Min | RuleKind::Max | RuleKind::Avg
        ) {
            let field = rule.field.as_deref().unwrap_or("");
            if !envelope.pointer(field).is_some_and(Value::is_number) {
                return Err("rule_failed");
            }
        }
    }
    Ok((key, id, code, ts, envelope))
}

fn rules_for<'c>(
    config: &'c Config,
    source: usize,
    code: &'c str,
) -> impl Iterator<Item = &'c RuleConfig> {
    let name = &config.sources[source].name;
    config.rules.iter().filter(move |r| {
        r.source == *name && (r.codes.is_empty() || r.codes.iter().any(|c| c == code))
    })
}

/// Builds an entity's expected view from all its accepted events, in the order they were read.
fn view_of(config: &Config, key: &str, partition: i32, events: &[Accepted]) -> Value {
    let mut sources = Map::new();
    for (index, source) in config.sources.iter().enumerate() {
        let mine: Vec<&Accepted> = events.iter().filter(|e| e.source == index).collect();
        let after_delete = mine
            .iter()
            .rposition(|e| source.delete_codes.contains(&e.code))
            .map_or(0, |i| i + 1);
        let kept = &mine[after_delete..];
        if let Some(last) = kept.last() {
            let mut state = Value::Null;
            for e in kept {
                let payload = e.envelope.get("payload").cloned().unwrap_or(Value::Null);
                state = match (state, payload) {
                    (Value::Object(mut a), Value::Object(b)) => {
                        a.extend(b);
                        Value::Object(a)
                    }
                    (_, b) => b,
                };
            }
            sources.insert(
                source.name.clone(),
                json!({"code": last.code, "message_id": last.message_id, "partition": last.partition,
                       "offset": last.offset, "timestamp_ms": last.timestamp_ms, "state": state}),
            );
        }
    }
    let mut counters: BTreeMap<&str, u64> = BTreeMap::new();
    for e in events {
        *counters.entry(&e.code).or_default() += 1;
    }
    let mut figures = Map::new();
    for rule in &config.rules {
        // Tombstones (no envelope) feed no rule.
        let inputs: Vec<&Accepted> = events
            .iter()
            .filter(|e| {
                !e.envelope.is_null()
                    && config.sources[e.source].name == rule.source
                    && (rule.codes.is_empty() || rule.codes.contains(&e.code))
            })
            .collect();
        if inputs.is_empty() {
            continue;
        }
        // Rules that share a name add up (a balance fed by two codes).
        let field = rule.field.as_deref().unwrap_or("");
        let numbers: Vec<f64> = inputs
            .iter()
            .filter_map(|e| e.envelope.pointer(field).and_then(Value::as_f64))
            .collect();
        let prior = figures
            .get(&rule.name)
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let figure = match rule.kind {
            RuleKind::Count => json!(prior + rule.factor * inputs.len() as f64),
            RuleKind::Sum => json!(numbers.iter().fold(prior, |acc, x| acc + rule.factor * x)),
            RuleKind::Min => json!(numbers.iter().copied().fold(f64::INFINITY, f64::min)),
            RuleKind::Max => json!(numbers.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
            RuleKind::Avg => {
                let sum: f64 = numbers.iter().sum();
                let n = numbers.len() as f64;
                json!({"count": n, "sum": sum, "avg": sum / n})
            }
            RuleKind::Latest => inputs
                .last()
                .and_then(|e| e.envelope.pointer(field).cloned())
                .unwrap_or(Value::Null),
            RuleKind::History => {
                let all: Vec<Value> = inputs
                    .iter()
                    .map(|e| e.envelope.pointer(field).cloned().unwrap_or(Value::Null))
                    .collect();
                Value::Array(all[all.len().saturating_sub(rule.limit)..].to_vec())
            }
        };
        figures.insert(rule.name.clone(), figure);
    }
    json!({
        "key": key,
        "partition": partition,
        "events_applied": events.len(),
        "updated_at_ms": events.iter().map(|e| e.timestamp_ms).max().unwrap_or(0),
        "sources": sources,
        "counters": counters,
        "figures": figures,
    })
}

/// Reads every source topic from the beginning up to its current end and computes what the
/// views must be.
pub fn expect_from_topics(config: &Config) -> Result<Expectation, VerifyError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", "aggregator-verify")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    let mut by_key: BTreeMap<String, (i32, Vec<Accepted>)> = BTreeMap::new();
    let mut seen: HashSet<(i32, String)> = HashSet::new();
    let mut out = Expectation::default();
    // One topic at a time, each partition up to the end the broker reports when the fetch reaches
    // it: an end-of-partition event names the partition only, and some brokers' ListOffsets
    // answers are not to be trusted.
    for t in metadata.topics() {
        if !config.sources.iter().any(|s| s.topic == t.name()) {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        let mut open: HashSet<i32> = HashSet::new();
        for p in t.partitions() {
            tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)?;
            open.insert(p.id());
        }
        consumer.assign(&tpl)?;
        let mut idle = 0;
        while !open.is_empty() {
            let m = match consumer.poll(Duration::from_millis(100)) {
                None => {
                    idle += 1;
                    if idle >= 100 {
                        return Err(VerifyError::Stalled {
                            topic: t.name().to_string(),
                            partitions: open.into_iter().collect(),
                        });
                    }
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                    continue;
                }
                Some(message) => message?,
            };
            idle = 0;
            let Some(source) = config.sources.iter().position(|s| s.topic == m.topic()) else {
                continue;
            };
            let header_id = m.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == "message_id")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            let tombstone = m.payload().is_none();
            let judged = if tombstone {
                match m
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .filter(|k| !k.is_empty())
                {
                    Some(k) => Ok((
                        k.to_string(),
                        header_id.clone().unwrap_or_else(|| {
                            format!("tombstone/{}[{}]/{}", m.topic(), m.partition(), m.offset())
                        }),
                        "TOMBSTONE".to_string(),
                        m.timestamp().to_millis().unwrap_or(0),
                        Value::Null,
                    )),
                    None => Err("missing_key"),
                }
            } else {
                accept(config, source, m.key(), m.payload(), header_id)
            };
            match judged {
                Err(reason) => *out.dead_lettered.entry(reason.to_string()).or_default() += 1,
                Ok((key, id, code, ts, envelope)) => {
                    let entry = by_key
                        .entry(key)
                        .or_insert_with(|| (m.partition(), Vec::new()));
                    if !seen.insert((entry.0, id.clone())) {
                        out.duplicates += 1;
                        continue;
                    }
                    out.events += 1;
                    let mut code = code;
                    // A tombstone deletes like a delete code does.
                    if tombstone {
                        code = "TOMBSTONE".into();
                    }
                    entry.1.push(Accepted {
                        source,
                        partition: m.partition(),
                        offset: m.offset(),
                        message_id: id,
                        code,
                        timestamp_ms: ts,
                        envelope,
                    });
                }
            }
        }
    }
    let mut config = config.clone();
    for s in &mut config.sources {
        s.delete_codes.push("TOMBSTONE".into());
    }
    for (key, (partition, events)) in by_key {
        out.views
            .insert(key.clone(), view_of(&config, &key, partition, &events));
    }
    Ok(out)
}

/// Relative tolerance of number comparisons: the verifier may add in another order than the
/// service does.
const RELATIVE_TOLERANCE: f64 = 1e-9;

/// Appends to `out` every difference between the JSON values `want` and `got` under `path`;
/// numbers agree when within `tolerance` of each other, relative to the larger.
pub fn differences(path: &str, want: &Value, got: &Value, tolerance: f64, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            if a != b && (a - b).abs() > tolerance * a.abs().max(b.abs()).max(1.0) {
                out.push(format!("{path}: expected {a}, got {b}"));
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                differences(
                    &format!("{path}.{k}"),
                    v,
                    b.get(k).unwrap_or(&Value::Null),
                    tolerance,
                    out,
                );
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: unexpected {}", b[k]));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, tolerance, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: expected {a}, got {b}")),
    }
}

/// Compares every expected view with the service's, read from its HTTP API at `base`
/// (for example `http://127.0.0.1:8080`).
pub async fn compare(expectation: &Expectation, base: &str) -> Result<Report, VerifyError> {
    let client = reqwest::Client::new();
    let mut report = Report {
        events_expected: expectation.events,
        dead_lettered: expectation.dead_lettered.clone(),
        ..Report::default()
    };
    for (key, want) in &expectation.views {
        report.entities += 1;
        let url = format!("{base}/entities/{key}");
        let fail = |reason: String| VerifyError::Views {
            url: url.clone(),
            reason,
        };
        let response = client
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let got: Value = match response.status().as_u16() {
            200 => response.json().await.map_err(|e| fail(e.to_string()))?,
            404 => Value::Null,
            other => return Err(fail(format!("HTTP {other}"))),
        };
        let expected_n = want["events_applied"].as_u64().unwrap_or(0);
        let applied_n = got["events_applied"].as_u64().unwrap_or(0);
        report.events_applied += applied_n;
        report.missing += expected_n.saturating_sub(applied_n);
        report.applied_twice += applied_n.saturating_sub(expected_n);
        let mut found = Vec::new();
        differences(key, want, &got, RELATIVE_TOLERANCE, &mut found);
        if found.is_empty() {
            continue;
        }
        let reordered = found
            .iter()
            .any(|d| d.contains(".offset:") || d.contains("]:"))
            && applied_n == expected_n;
        if reordered {
            report.order_violations += 1;
        } else if applied_n == expected_n {
            report.other_differences += 1;
        }
        if report.examples.len() < 20 {
            report.examples.extend(found.into_iter().take(3));
        }
    }
    Ok(report)
}

/// The report as text.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "entities compared {}\nevents expected {}\nevents applied {}\nmissing {}\napplied twice {}\norder violations {}\nother differences {}\n",
        r.entities, r.events_expected, r.events_applied, r.missing, r.applied_twice,
        r.order_violations, r.other_differences
    );
    for (reason, n) in &r.dead_lettered {
        out.push_str(&format!("dead-lettered {reason}: {n}\n"));
    }
    for e in &r.examples {
        out.push_str(&format!("  {e}\n"));
    }
    out.push_str(if r.is_clean() {
        "no differences\n"
    } else {
        "DIFFERENCES FOUND\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(source: usize, offset: i64, code: &str, payload: Value) -> Accepted {
        Accepted {
            source,
            partition: 0,
            offset,
            message_id: format!("m{offset}"),
            code: code.into(),
            timestamp_ms: offset,
            envelope: json!({"metadata": {}, "code": code, "payload": payload}),
        }
    }

    #[test]
    fn view_recomputes_figures_from_the_whole_event_list() {
        let config = Config::from_toml(include_str!("../config.toml")).unwrap();
        let loyalty = config
            .sources
            .iter()
            .position(|s| s.name == "loyalty-service")
            .unwrap();
        let customers = config
            .sources
            .iter()
            .position(|s| s.name == "customer-service")
            .unwrap();
        let events = vec![
            accepted(loyalty, 0, "POINTS_EARNED", json!({"points": 100})),
            accepted(customers, 1, "CUSTOMER_REGISTERED", json!({"name": "A"})),
            accepted(loyalty, 2, "POINTS_REDEEMED", json!({"points": 30})),
            accepted(customers, 3, "CUSTOMER_DELETED", json!({})),
        ];
        let view = view_of(&config, "C1", 0, &events);
        assert_eq!(view["figures"]["points_balance"], json!(70.0));
        assert_eq!(view["events_applied"], json!(4));
        assert!(view["sources"].get("customer-service").is_none(), "{view}");
        assert_eq!(view["sources"]["loyalty-service"]["offset"], json!(2));
    }

    #[test]
    fn differences_tolerate_summation_order_but_not_other_values() {
        let mut out = Vec::new();
        differences(
            "k",
            &json!({"a": 0.1 + 0.2, "h": [1, 2]}),
            &json!({"a": 0.3, "h": [1, 2]}),
            RELATIVE_TOLERANCE,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        differences(
            "k",
            &json!({"a": 0.1 + 0.2}),
            &json!({"a": 0.3}),
            0.0,
            &mut out,
        );
        assert_eq!(out.len(), 1, "exact comparison sees the last bit: {out:?}");
        out.clear();
        differences(
            "k",
            &json!({"h": [1, 2]}),
            &json!({"h": [2, 1]}),
            RELATIVE_TOLERANCE,
            &mut out,
        );
        assert_eq!(
            out,
            vec!["k.h[0]: expected 1, got 2", "k.h[1]: expected 2, got 1"]
        );
    }
}
