//! The embedded broker: librdkafka's mock cluster, speaking the Kafka protocol on loopback, with
//! the source, dead-letter and changelog topics created up front (it does not serve CreateTopics).
//! It is not `Send`: keep it on the thread that made it.

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientContext;

use crate::config::Config;

/// A running mock cluster with the configured topics.
pub struct EmbeddedBroker {
    /// The client that owns the mock cluster; the cluster lives as long as it does.
    owner: BaseProducer,
}

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
#[error("embedded broker: {0}")]
pub struct BrokerError(#[from] rdkafka::error::KafkaError);

/// Id of the embedded broker's only broker (`test.mock.num.brokers` = 1 numbers them from 1).
const BROKER_ID: i32 = 1;

/// Group join delay of the embedded broker. Kafka waits 3 s for more members before the first
/// assignment; a single process has no one to wait for.
const INITIAL_REBALANCE_DELAY_MS: i32 = 100;

impl EmbeddedBroker {
    /// Starts a one-broker cluster with every source topic, the dead-letter and the changelog topic, each with
    /// `partitions` partitions (co-partitioned, as the service expects).
    pub fn start(config: &Config, partitions: i32) -> Result<Self, BrokerError> {
        Self::start_with_topics(&Self::topics(config), partitions)
    }

    /// The topics [`EmbeddedBroker::start`] creates for `config`: every source's, the dead-letter
    /// and the changelog topic.
    pub fn topics(config: &Config) -> Vec<String> {
        let sources = config.sources.iter().map(|s| s.topic.clone());
        sources
            .chain([
                config.kafka.dead_letter_topic.clone(),
                config.changelog.topic.clone(),
            ])
            .collect()
    }

    /// Starts a one-broker cluster with `topics`, each with `partitions` partitions.
    pub fn start_with_topics(topics: &[String], partitions: i32) -> Result<Self, BrokerError> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .create()?;
        let broker = EmbeddedBroker { owner };
        {
            let cluster = broker.cluster();
            for topic in topics {
                cluster.create_topic(topic, partitions, 1)?;
            }
        }
        // SAFETY: the handle belongs to `owner`, which is alive, and was created with a mock
        // cluster (test.mock.num.brokers), so the pointer is non-null; the call only sets a field.
        unsafe {
            let handle =
                rdkafka_sys::rd_kafka_handle_mock_cluster(broker.owner.client().native_ptr());
            if !handle.is_null() {
                rdkafka_sys::rd_kafka_mock_group_initial_rebalance_delay_ms(
                    handle,
                    INITIAL_REBALANCE_DELAY_MS,
                );
            }
        }
        Ok(broker)
    }

    /// Sets short group timeouts in `config`. The embedded broker holds a group's next join for
    /// the session timeout (less 1 s) after a member leaves; a short timeout, with a shorter
    /// heartbeat, keeps restarts and rebalances quick.
    pub fn tune_group_timeouts(config: &mut Config) {
        config.kafka.session_timeout_ms = 3_000;
        config
            .kafka
            .consumer_properties
            .insert("heartbeat.interval.ms".into(), "300".into());
    }

    /// How long the embedded broker keeps a group from forming again after its last member left:
    /// it waits for the members to rejoin for the session timeout less 1 s, where Kafka marks a
    /// group that its last member left empty at once.
    pub fn group_hold(config: &Config) -> std::time::Duration {
        let session = config.kafka.session_timeout_ms;
        std::time::Duration::from_millis(if session > 1000 {
            session - 1000
        } else {
            session
        })
    }

    /// Holds back the broker's answers to the next `count` requests of `api` for `delay` each; they
    /// are answered as usual after it (a slow group coordinator, say). Later answers on the same
    /// connection wait behind a held one, as they would behind a slow broker.
    pub fn delay_answers(
        &self,
        api: rdkafka_sys::types::RDKafkaApiKey,
        count: usize,
        delay: std::time::Duration,
    ) -> Result<(), BrokerError> {
        let delay_ms = std::ffi::c_int::try_from(delay.as_millis()).unwrap_or(std::ffi::c_int::MAX);
        let no_error = rdkafka_sys::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR;
        // SAFETY: the handle belongs to `owner`, which is alive.
        let handle =
            unsafe { rdkafka_sys::rd_kafka_handle_mock_cluster(self.owner.client().native_ptr()) };
        assert!(
            !handle.is_null(),
            "the owner was created with test.mock.num.brokers"
        );
        for _ in 0..count {
            // SAFETY: the handle is a live mock cluster (above); the variadic part is one (error
            // code, delay in ms) pair of C ints, as `cnt` = 1 says.
            let err = unsafe {
                rdkafka_sys::rd_kafka_mock_broker_push_request_error_rtts(
                    handle,
                    BROKER_ID,
                    api as i16,
                    1,
                    no_error as std::ffi::c_int,
                    delay_ms,
                )
            };
            if err != no_error {
                return Err(BrokerError(rdkafka::error::KafkaError::MockCluster(
                    err.into(),
                )));
            }
        }
        Ok(())
    }

    /// The cluster's `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// The mock cluster, for fault injection.
    pub fn cluster(&self) -> MockCluster<'_, impl ClientContext> {
        self.owner
            .client()
            .mock_cluster()
            .expect("the owner was created with test.mock.num.brokers")
    }
}
