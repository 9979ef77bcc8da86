//! The embedded broker: librdkafka's mock cluster, speaking the Kafka protocol on loopback, with
//! the source topics and the dead-letter topic created up front (it does not serve CreateTopics).
//! It is not `Send`: keep it on the thread that made it.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::config::Config;

/// A running mock cluster with the configured topics.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
#[error("embedded broker: {0}")]
pub struct BrokerError(#[from] rdkafka::error::KafkaError);

impl EmbeddedBroker {
    /// Starts a one-broker cluster with every source topic and the dead-letter topic, each with
    /// `partitions` partitions (co-partitioned, as the service expects).
    pub fn start(config: &Config, partitions: i32) -> Result<Self, BrokerError> {
        let cluster = MockCluster::new(1)?;
        for source in &config.sources {
            cluster.create_topic(&source.topic, partitions, 1)?;
        }
        cluster.create_topic(&config.kafka.dead_letter_topic, partitions, 1)?;
        Ok(EmbeddedBroker { cluster })
    }

    /// The cluster's `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The mock cluster, for fault injection.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
