//! The changelog sink of the service: an idempotent Kafka producer that writes each bundle of views
//! to its partition of the changelog topic and reports how far each partition got.

use std::collections::HashMap;
use std::time::Duration;

use aggregator_actors::changelog::{
    Acks, ChangelogError, ChangelogRecord, ChangelogSink, SendFuture,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::Config;

/// Why the changelog topic cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangelogSetupError {
    /// The client could not be created or the metadata not read.
    #[error("changelog: {0}")]
    Kafka(#[from] KafkaError),
    /// The topic is missing or smaller than the sources.
    #[error("changelog topic {topic:?} has {found} partitions, the source topics have up to {needed}: create it with {needed} partitions, or set changelog.enabled = false when only one instance runs")]
    Partitions {
        /// The configured topic.
        topic: String,
        /// Its partitions (0 when it does not exist).
        found: usize,
        /// The most partitions of a source topic.
        needed: usize,
    },
}

/// Publishes views to the changelog topic.
pub struct KafkaChangelog {
    producer: FutureProducer,
    topic: String,
}

/// Wait before offering a record again to a full producer queue.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(2);

impl KafkaChangelog {
    /// A producer for the configured changelog topic, after checking that the topic has a
    /// partition for every source partition.
    pub fn new(config: &Config) -> Result<Self, ChangelogSetupError> {
        check_topic(config)?;
        let client = config.kafka.client(&[
            // In order and once per partition, so the last record of a view is its latest state.
            ("enable.idempotence", "true"),
            ("acks", "all"),
            // A write's store stage waits for its send: batch what one write hands over, no more.
            ("linger.ms", "1"),
        ]);
        Ok(KafkaChangelog {
            producer: client.create()?,
            topic: config.changelog.topic.clone(),
        })
    }
}

fn check_topic(config: &Config) -> Result<(), ChangelogSetupError> {
    let client: BaseConsumer = config
        .kafka
        .consumer_client(&[("allow.auto.create.topics", "false")])
        .create()?;
    let metadata = client.fetch_metadata(None, Duration::from_secs(10))?;
    let partitions = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map_or(0, |t| t.partitions().len())
    };
    let needed = config
        .sources
        .iter()
        .map(|s| partitions(&s.topic))
        .max()
        .unwrap_or(0)
        .max(1);
    let found = partitions(&config.changelog.topic);
    if found < needed {
        return Err(ChangelogSetupError::Partitions {
            topic: config.changelog.topic.clone(),
            found,
            needed,
        });
    }
    Ok(())
}

impl ChangelogSink for KafkaChangelog {
    fn send(&self, records: Vec<ChangelogRecord>) -> SendFuture {
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        Box::pin(async move {
            let mut deliveries = Vec::with_capacity(records.len());
            for r in &records {
                let mut record = FutureRecord::<(), [u8]>::to(&topic)
                    .partition(r.partition)
                    .payload(r.value.as_slice());
                loop {
                    match producer.send_result(record) {
                        Ok(delivery) => {
                            deliveries.push(delivery);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                        }
                        Err((e, _)) => return Err(ChangelogError::Send(e.to_string())),
                    }
                }
            }
            let acks: Acks = Box::pin(async move {
                let mut ends: HashMap<i32, i64> = HashMap::new();
                for delivery in deliveries {
                    match delivery.await {
                        Ok(Ok(delivered)) => {
                            let end = ends.entry(delivered.partition).or_insert(0);
                            *end = (*end).max(delivered.offset + 1);
                        }
                        Ok(Err((e, _))) => return Err(ChangelogError::Send(e.to_string())),
                        Err(_) => {
                            return Err(ChangelogError::Send(
                                "the producer dropped a delivery".into(),
                            ))
                        }
                    }
                }
                Ok(ends)
            });
            Ok(acks)
        })
    }
}
