//! Simulates the seven upstream services: a deterministic stream of realistic envelopes keyed by
//! customer id, with upstream duplicates (re-sent at once or at a later offset) and a few malformed
//! records. Used by the demo, the benchmarks and the end-to-end tests.

use std::collections::VecDeque;

use chrono::{DateTime, SecondsFormat};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use aggregator_actors::SourceConfig;

/// What the generator makes.
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    /// Seed: the same seed gives the same stream.
    pub seed: u64,
    /// Distinct customer ids.
    pub customers: u32,
    /// Share of records that re-send an earlier record unchanged.
    pub duplicate_rate: f64,
    /// Share of records that are malformed on purpose.
    pub malformed_rate: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 42,
            customers: 10_000,
            duplicate_rate: 0.03,
            malformed_rate: 0.002,
        }
    }
}

/// What a generated record is, as the generator meant it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A new, well-formed event.
    Event,
    /// An exact re-send of an earlier record.
    Duplicate,
    /// A record made malformed on purpose.
    Malformed,
}

/// One record to produce.
#[derive(Clone, Debug)]
pub struct Generated {
    /// Index of the source (and topic) in the configuration.
    pub source: usize,
    /// Record key.
    pub key: Option<String>,
    /// Record value.
    pub value: Option<Vec<u8>>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// What it is.
    pub kind: Kind,
}

/// Recent well-formed records kept for re-sending as duplicates.
const RECENT: usize = 512;
/// Event time of the first record: 2026-10-01T00:00:00Z.
const EPOCH_MS: i64 = 1_790_812_800_000;

/// The deterministic record stream.
pub struct Generator {
    cfg: GeneratorConfig,
    sources: Vec<SourceConfig>,
    rng: SmallRng,
    /// Each source's last sequence number per customer: 4 bytes each, since with a million
    /// customers they are 7 million (the bench's process counts them in its peak RSS), and a
    /// customer would need billions of one source's events to outgrow them.
    seqs: Vec<Vec<u32>>,
    registered: Vec<bool>,
    recent: VecDeque<Generated>,
    count: u64,
}

impl Generator {
    /// A generator for `sources` (the configuration's, in order).
    pub fn new(cfg: GeneratorConfig, sources: &[SourceConfig]) -> Self {
        let customers = cfg.customers.max(1) as usize;
        Generator {
            rng: SmallRng::seed_from_u64(cfg.seed),
            seqs: vec![vec![0; customers]; sources.len()],
            registered: vec![false; customers],
            sources: sources.to_vec(),
            recent: VecDeque::with_capacity(RECENT),
            count: 0,
            cfg,
        }
    }

    fn message_id(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.rng.random())
            .into_uuid()
            .to_string()
    }

    fn event(&mut self) -> Generated {
        let source = self.rng.random_range(0..self.sources.len());
        let customer = self.rng.random_range(0..self.cfg.customers.max(1)) as usize;
        let customer_id = format!("C{customer:06}");
        let last = &mut self.seqs[source][customer];
        *last = last.saturating_add(1);
        let seq = u64::from(*last);
        let n = self.count;
        let name = self.sources[source].name.clone();
        let r: f64 = self.rng.random();
        let (code, payload) = match name.as_str() {
            "customer-service" if !self.registered[customer] => {
                self.registered[customer] = true;
                (
                    "CUSTOMER_REGISTERED",
                    Payload {
                        name: Some(format!("Customer {customer}")),
                        email: Some(format!("c{customer}@example.com")),
                        address: Some(Address {
                            city: CITIES[customer % CITIES.len()],
                            street: format!("{} Main St", n % 500),
                        }),
                        ..Payload::default()
                    },
                )
            }
            "customer-service" if r < 0.03 => {
                self.registered[customer] = false;
                ("CUSTOMER_DELETED", Payload::default())
            }
            "customer-service" => (
                "CUSTOMER_UPDATED",
                Payload {
                    address: Some(Address {
                        city: CITIES[(customer + n as usize) % CITIES.len()],
                        street: format!("{} Oak Ave", n % 700),
                    }),
                    ..Payload::default()
                },
            ),
            "order-service" if r < 0.8 => (
                "ORDER_CREATED",
                Payload {
                    order_id: Some(format!("ORD{n}")),
                    total_amount: Some(self.rng.random_range(4..4000) as f64 * 0.25),
                    ..Payload::default()
                },
            ),
            "order-service" => (
                "ORDER_CANCELLED",
                Payload {
                    order_id: Some(format!("ORD{}", n / 2)),
                    ..Payload::default()
                },
            ),
            "payment-service" => (
                if r < 0.85 {
                    "PAYMENT_CAPTURED"
                } else {
                    "PAYMENT_REFUNDED"
                },
                Payload {
                    payment_id: Some(format!("PAY{n}")),
                    amount: Some(self.rng.random_range(4..4000) as f64 * 0.25),
                    ..Payload::default()
                },
            ),
            "shipping-service" => {
                let (code, status) = if r < 0.5 {
                    ("SHIPMENT_DISPATCHED", "DISPATCHED")
                } else {
                    ("SHIPMENT_DELIVERED", "DELIVERED")
                };
                (
                    code,
                    Payload {
                        shipment_id: Some(format!("SHP{n}")),
                        status: Some(status),
                        ..Payload::default()
                    },
                )
            }
            "review-service" => (
                "REVIEW_POSTED",
                Payload {
                    review_id: Some(format!("REV{n}")),
                    product_id: Some(format!("P{}", self.rng.random_range(0..500))),
                    rating: Some(self.rng.random_range(1..=5)),
                    ..Payload::default()
                },
            ),
            "notification-service" => (
                if r < 0.7 { "EMAIL_SENT" } else { "SMS_SENT" },
                Payload {
                    notification_id: Some(format!("NTF{n}")),
                    template: Some("order-update"),
                    ..Payload::default()
                },
            ),
            "loyalty-service" => (
                if r < 0.7 {
                    "POINTS_EARNED"
                } else {
                    "POINTS_REDEEMED"
                },
                Payload {
                    points: Some(self.rng.random_range(1..500)),
                    ..Payload::default()
                },
            ),
            _ => ("EVENT", Payload::default()),
        };
        let message_id = self.message_id();
        let envelope = Envelope {
            code,
            metadata: Metadata {
                message_id: &message_id,
                original_message_id: None,
                service_name: &name,
                timestamp: timestamp(EPOCH_MS + n as i64 * 10),
            },
            payload: Payload {
                customer_id: &customer_id,
                seq,
                ..payload
            },
        };
        let value = serde_json::to_vec(&envelope).expect("plain fields serialize");
        let mut headers = Vec::new();
        if self.rng.random_bool(0.3) {
            headers.push(("message_id".to_string(), message_id.into_bytes()));
        }
        Generated {
            source,
            key: Some(customer_id),
            value: Some(value),
            headers,
            kind: Kind::Event,
        }
    }

    fn malformed(&mut self) -> Generated {
        let mut g = self.event();
        g.kind = Kind::Malformed;
        let mut envelope: Value =
            serde_json::from_slice(g.value.as_deref().unwrap_or_default()).unwrap_or_default();
        g.headers.clear();
        match self.rng.random_range(0..8) {
            0 => g.value = Some(b"{\"metadata\": {\"message_id\": \"broken".to_vec()),
            1 => g.value = Some(b"[\"not\", \"an\", \"object\"]".to_vec()),
            2 => {
                envelope["metadata"]["message_id"] = Value::Null;
                g.value = Some(envelope.to_string().into_bytes());
            }
            3 => g.key = None,
            4 => g.value = Some(vec![0xff, 0xfe, b'{', b'}']),
            5 => {
                envelope["metadata"]["timestamp"] = json!("yesterday at noon");
                g.value = Some(envelope.to_string().into_bytes());
            }
            6 => {
                envelope["metadata"]["service_name"] = json!("imposter-service");
                g.value = Some(envelope.to_string().into_bytes());
            }
            _ => {
                // A field that a rule sums, with the wrong type; sources without one get bad JSON.
                let numeric = ["total_amount", "amount", "points", "rating"]
                    .into_iter()
                    .find(|f| envelope["payload"].get(*f).is_some());
                g.value = Some(match numeric {
                    Some(field) => {
                        envelope["payload"][field] = json!("lots");
                        envelope.to_string().into_bytes()
                    }
                    None => b"{\"code\": ".to_vec(),
                });
            }
        }
        g
    }
}

/// An envelope as the upstream services write it. Its fields, and those of the types below,
/// are declared in name order, the order a JSON map writes them in: the stream is the one
/// earlier versions built as `serde_json::Value` trees, at a fraction of the cost (the bench
/// generates events while it measures).
#[derive(Serialize)]
struct Envelope<'a> {
    code: &'a str,
    metadata: Metadata<'a>,
    payload: Payload<'a>,
}

/// The envelope's metadata.
#[derive(Serialize)]
struct Metadata<'a> {
    message_id: &'a str,
    original_message_id: Option<&'a str>,
    service_name: &'a str,
    timestamp: String,
}

/// Every source's payload fields; each source sets its own.
#[derive(Default, Serialize)]
struct Payload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<Address>,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<f64>,
    customer_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    points: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    product_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rating: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    review_id: Option<String>,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    shipment_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_amount: Option<f64>,
}

/// A customer's address.
#[derive(Serialize)]
struct Address {
    city: &'static str,
    street: String,
}

const CITIES: [&str; 6] = ["Hanoi", "Berlin", "Lagos", "Lima", "Osaka", "Austin"];

/// RFC 3339 time with milliseconds, UTC.
fn timestamp(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        self.count += 1;
        let r: f64 = self.rng.random();
        if r < self.cfg.duplicate_rate && !self.recent.is_empty() {
            // Half at once (two copies in flight together), half from further back.
            let i = if self.rng.random_bool(0.5) {
                self.recent.len() - 1
            } else {
                self.rng.random_range(0..self.recent.len())
            };
            let mut g = self.recent[i].clone();
            g.kind = Kind::Duplicate;
            return Some(g);
        }
        if r < self.cfg.duplicate_rate + self.cfg.malformed_rate {
            return Some(self.malformed());
        }
        let g = self.event();
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(g.clone());
        Some(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn sources() -> Vec<SourceConfig> {
        Config::from_toml(include_str!("../config.toml"))
            .unwrap()
            .sources
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<_> = Generator::new(GeneratorConfig::default(), &sources())
            .take(500)
            .map(|g| g.value)
            .collect();
        let b: Vec<_> = Generator::new(GeneratorConfig::default(), &sources())
            .take(500)
            .map(|g| g.value)
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn envelopes_write_their_fields_in_the_order_a_json_map_does() {
        let every_field = Envelope {
            code: "C",
            metadata: Metadata {
                message_id: "m",
                original_message_id: Some("o"),
                service_name: "s",
                timestamp: timestamp(EPOCH_MS),
            },
            payload: Payload {
                address: Some(Address {
                    city: CITIES[0],
                    street: "1 Main St".into(),
                }),
                amount: Some(1.25),
                customer_id: "C000001",
                email: Some("e".into()),
                name: Some("n".into()),
                notification_id: Some("NTF1".into()),
                order_id: Some("ORD1".into()),
                payment_id: Some("PAY1".into()),
                points: Some(7),
                product_id: Some("P1".into()),
                rating: Some(5),
                review_id: Some("REV1".into()),
                seq: 3,
                shipment_id: Some("SHP1".into()),
                status: Some("DELIVERED"),
                template: Some("t"),
                total_amount: Some(2.5),
            },
        };
        let typed = serde_json::to_string(&every_field).unwrap();
        let as_map = serde_json::to_value(&every_field).unwrap().to_string();
        assert_eq!(typed, as_map);
    }

    #[test]
    fn rates_are_roughly_as_configured_and_envelopes_are_small() {
        let cfg = GeneratorConfig {
            malformed_rate: 0.01,
            ..GeneratorConfig::default()
        };
        let all: Vec<_> = Generator::new(cfg, &sources()).take(20_000).collect();
        let share = |k| all.iter().filter(|g| g.kind == k).count() as f64 / all.len() as f64;
        assert!(
            (0.02..0.04).contains(&share(Kind::Duplicate)),
            "{}",
            share(Kind::Duplicate)
        );
        assert!(
            (0.005..0.015).contains(&share(Kind::Malformed)),
            "{}",
            share(Kind::Malformed)
        );
        let events: Vec<_> = all.iter().filter(|g| g.kind == Kind::Event).collect();
        let mean = events
            .iter()
            .map(|g| g.value.as_ref().unwrap().len())
            .sum::<usize>()
            / events.len();
        assert!((150..350).contains(&mean), "mean envelope {mean} bytes");
        let sources: std::collections::HashSet<_> = events.iter().map(|g| g.source).collect();
        assert_eq!(sources.len(), 7);
    }
}
