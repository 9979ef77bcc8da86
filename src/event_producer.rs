//! Produces generated records to Kafka and tracks, per partition, the end offset that the
//! broker acknowledged, so that a run can wait until everything produced is committed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::generator::Generated;

/// Acknowledged end offsets per (topic, partition), and failures.
#[derive(Default)]
pub struct Deliveries {
    ends: Mutex<BTreeMap<(String, i32), i64>>,
    /// Records the broker acknowledged.
    pub acked: AtomicU64,
    /// Records that could not be delivered.
    pub failed: AtomicU64,
}

impl Deliveries {
    /// One past the highest acknowledged offset of each partition written to.
    pub fn end_offsets(&self) -> BTreeMap<(String, i32), i64> {
        self.ends.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// Producer callbacks: record each delivery.
pub struct DeliveryContext(Arc<Deliveries>);

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                self.0.acked.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut ends) = self.0.ends.lock() {
                    let end = ends
                        .entry((m.topic().to_string(), m.partition()))
                        .or_insert(0);
                    *end = (*end).max(m.offset() + 1);
                }
            }
            Err((e, _)) => {
                tracing::warn!("delivery failed: {e}");
                self.0.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The Kafka headers of a generated record.
pub fn record_headers(g: &Generated) -> OwnedHeaders {
    g.headers
        .iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// A producer for generated records.
pub struct EventProducer {
    producer: ThreadedProducer<DeliveryContext>,
    topics: Vec<String>,
    /// What the broker acknowledged.
    pub deliveries: Arc<Deliveries>,
}

impl EventProducer {
    /// A producer to `brokers`, writing source `i`'s records to `topics[i]`.
    pub fn new(brokers: &str, topics: Vec<String>) -> Result<Self, KafkaError> {
        Self::with_properties(brokers, topics, &[])
    }

    /// As [`EventProducer::new`], with librdkafka `properties` set on top of the defaults.
    pub fn with_properties(
        brokers: &str,
        topics: Vec<String>,
        properties: &[(&str, &str)],
    ) -> Result<Self, KafkaError> {
        let deliveries = Arc::new(Deliveries::default());
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("partitioner", "consistent_random");
        for (key, value) in properties {
            config.set(*key, *value);
        }
        let producer = config.create_with_context(DeliveryContext(deliveries.clone()))?;
        Ok(EventProducer {
            producer,
            topics,
            deliveries,
        })
    }

    /// Waits until the broker has answered for every topic this producer writes to, so that the
    /// first records sent do not wait for a connection and the topics' leaders.
    pub fn connect(&self, timeout: Duration) -> Result<(), KafkaError> {
        for topic in &self.topics {
            self.producer
                .client()
                .fetch_metadata(Some(topic), timeout)?;
        }
        Ok(())
    }

    /// Enqueues `g`, waiting while the local queue is full.
    pub fn send(&self, g: &Generated) -> Result<(), KafkaError> {
        let mut record: BaseRecord<'_, str, [u8]> =
            BaseRecord::to(&self.topics[g.source]).headers(record_headers(g));
        if let Some(key) = &g.key {
            record = record.key(key.as_str());
        }
        if let Some(value) = &g.value {
            record = record.payload(value.as_slice());
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits until every enqueued record is acknowledged or failed.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
