//! The dead-letter sink of the service: a Kafka producer that writes each unprocessable record to
//! the dead-letter topic, unchanged, with the reason and its origin in headers.

use aggregator_actors::dead_letter::{DeadLetter, DeadLetterSink, PublishFuture};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::Config;

/// Header with the stable reason label.
pub const REASON_HEADER: &str = "dlq.reason";
/// Header with the human-readable detail.
pub const DETAIL_HEADER: &str = "dlq.detail";
/// Header with the record's source.
pub const SOURCE_HEADER: &str = "dlq.source";
/// Header with the record's topic.
pub const TOPIC_HEADER: &str = "dlq.origin.topic";
/// Header with the record's partition.
pub const PARTITION_HEADER: &str = "dlq.origin.partition";
/// Header with the record's offset.
pub const OFFSET_HEADER: &str = "dlq.origin.offset";

/// Publishes dead letters to the configured topic.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl KafkaDeadLetters {
    /// A producer for the configured cluster and dead-letter topic.
    pub fn new(config: &Config) -> Result<Self, rdkafka::error::KafkaError> {
        let client = config.kafka.client(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
        ]);
        Ok(KafkaDeadLetters {
            producer: client.create()?,
            topic: config.kafka.dead_letter_topic.clone(),
        })
    }
}

impl DeadLetterSink for KafkaDeadLetters {
    fn publish(&self, letter: &DeadLetter) -> PublishFuture {
        let origin = &letter.record.origin;
        let (partition, offset) = (origin.tp.partition.to_string(), origin.offset.to_string());
        let mut headers = OwnedHeaders::new();
        for (key, value) in [
            (REASON_HEADER, letter.reason),
            (DETAIL_HEADER, letter.detail.as_str()),
            (SOURCE_HEADER, letter.source.as_str()),
            (TOPIC_HEADER, &*origin.tp.topic),
            (PARTITION_HEADER, partition.as_str()),
            (OFFSET_HEADER, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        for (key, value) in &letter.record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &letter.record.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &letter.record.value {
            record = record.payload(value.as_bytes());
        }
        match self.producer.send_result(record) {
            Ok(delivery) => Box::pin(async move {
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("the producer dropped the delivery".to_string()),
                }
            }),
            Err((e, _)) => Box::pin(std::future::ready(Err(e.to_string()))),
        }
    }
}
