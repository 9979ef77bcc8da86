//! The service configuration: `config.toml`, every key overridable from the environment
//! (`AGGREGATOR_<SECTION>__<KEY>`, for example `AGGREGATOR_KAFKA__BROKERS`). One struct per
//! section; the doc comments are the user documentation and `defaults` names every default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aggregator_actors::{ParseLimits, RuleConfig, Rules, RulesError, SourceConfig};
use figment::providers::{Data, Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every default, named in one place.
pub mod defaults {
    /// Kafka bootstrap servers.
    pub const BROKERS: &str = "127.0.0.1:9092";
    /// Consumer group id.
    pub const GROUP_ID: &str = "aggregator";
    /// Where a new consumer group starts reading.
    pub const AUTO_OFFSET_RESET: &str = "earliest";
    /// Topic for records that cannot be processed.
    pub const DEAD_LETTER_TOPIC: &str = "shop.aggregator.private.dead-letter.prod";
    /// Consumer session timeout.
    pub const SESSION_TIMEOUT_MS: u64 = 45_000;
    /// Store directory.
    pub const STORE_PATH: &str = "data/aggregator.sled";
    /// Interval of the store's group commit.
    pub const FLUSH_INTERVAL_MS: u64 = 5;
    /// Store page cache in MiB.
    pub const STORE_CACHE_MIB: u64 = 256;
    /// Message ids remembered per partition.
    pub const DEDUP_WINDOW: u64 = aggregator_actors::store::DEFAULT_DEDUP_WINDOW;
    /// Checkpoint the store at a clean shutdown.
    pub const CHECKPOINT_ON_SHUTDOWN: bool = true;
    /// HTTP listen address.
    pub const HTTP_BIND: &str = "127.0.0.1:8080";
    /// Interval between offset commits.
    pub const COMMIT_INTERVAL_MS: u64 = 200;
    /// In-flight records per partition before it is paused.
    pub const MAX_IN_FLIGHT_PER_PARTITION: usize = 2_000;
    /// Idle time after which an entity actor passivates.
    pub const ENTITY_IDLE_MS: u64 = 30_000;
    /// Live entity actors beyond which the least recently used idle ones passivate.
    pub const MAX_LIVE_ENTITIES: usize = 100_000;
    /// Largest record value accepted.
    pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
    /// Longest entity key accepted.
    pub const MAX_KEY_BYTES: usize = 256;
    /// Records handed to the actors per poll round.
    pub const POLL_BATCH: usize = 1000;
    /// Longest wait for a revoked partition to drain.
    pub const DRAIN_TIMEOUT_MS: u64 = 30_000;
    /// Retries of a failing rule before its record is dead-lettered.
    pub const RULE_RETRIES: u32 = 3;
    /// Wait before the first retry of a failing rule.
    pub const RULE_RETRY_BACKOFF_MS: u64 = 10;
    /// Whether written views are published to the changelog topic.
    pub const CHANGELOG_ENABLED: bool = true;
    /// Topic holding every partition's state changes.
    pub const CHANGELOG_TOPIC: &str = "shop.aggregator.private.changelog.prod";
    /// Longest time an assignment may spend replaying the changelog.
    pub const CHANGELOG_RESTORE_TIMEOUT_MS: u64 = 120_000;
}

/// Prefix of the environment variables that override keys.
pub const ENV_PREFIX: &str = "AGGREGATOR_";

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[kafka]`: the cluster and consumer group.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// `[store]`: the durable store.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[http]`: the HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// `[tuning]`: throughput, memory and latency trade-offs.
    #[serde(default)]
    pub tuning: TuningConfig,
    /// `[changelog]`: how a partition's state follows it between instances.
    #[serde(default)]
    pub changelog: ChangelogConfig,
    /// `[[sources]]`: the upstream services, one topic each.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// `[[rules]]`: the figures derived from the events.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// `[kafka]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Consumer group id; instances sharing it share the partitions.
    pub group_id: String,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Topic that receives records that cannot be processed, with the reason in headers.
    pub dead_letter_topic: String,
    /// Consumer session timeout in milliseconds.
    pub session_timeout_ms: u64,
    /// Extra librdkafka properties for the consumer and producer (for example `security.protocol`).
    pub properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for the consumers only (for example `heartbeat.interval.ms`
    /// or `fetch.min.bytes`), which the producers would otherwise log as ignored; they win over
    /// `properties`.
    pub consumer_properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: defaults::BROKERS.into(),
            group_id: defaults::GROUP_ID.into(),
            auto_offset_reset: defaults::AUTO_OFFSET_RESET.into(),
            dead_letter_topic: defaults::DEAD_LETTER_TOPIC.into(),
            session_timeout_ms: defaults::SESSION_TIMEOUT_MS,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// A client for the cluster with the service's `settings`, then the user's `properties`
    /// (which win, so that security and tuning set by the user always apply).
    pub fn client(&self, settings: &[(&str, &str)]) -> rdkafka::config::ClientConfig {
        let mut client = rdkafka::config::ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        for (k, v) in settings {
            client.set(*k, *v);
        }
        for (k, v) in &self.properties {
            client.set(k, v);
        }
        client
    }

    /// As [`KafkaConfig::client`], for a consumer: the user's `consumer_properties` apply last.
    pub fn consumer_client(&self, settings: &[(&str, &str)]) -> rdkafka::config::ClientConfig {
        let mut client = self.client(settings);
        for (k, v) in &self.consumer_properties {
            client.set(k, v);
        }
        client
    }
}

/// `[store]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the sled store holding views and message-id markers.
    pub path: PathBuf,
    /// Milliseconds between group commits: staged events are written in one atomic batch and
    /// flushed, and only then may their offsets be committed. An event waits for the next one
    /// (half of this on average) before its write begins; at full load a write starts when the
    /// one before is prepared, whatever this is. Shorter ones write more, smaller batches.
    pub flush_interval_ms: u64,
    /// sled's page cache, in MiB of stored bytes. What does not fit is read back from disk when
    /// it is needed again: a smaller cache holds less memory and costs a read when an entity
    /// comes back (with 1,000,000 entities, 64 took about 150 MiB off the peak and a quarter of
    /// the throughput; docs/benchmarks.md, "The broker in a process of its own, and sled's
    /// epoch garbage").
    pub cache_mib: u64,
    /// Message ids remembered per partition for duplicate detection; the oldest are forgotten
    /// beyond this, so a duplicate that arrives after this many newer ids of its partition is
    /// applied again. Bounds the store's marker count.
    pub dedup_window: u64,
    /// After a clean shutdown, open and close the store once more so that the next start does
    /// not replay the store's whole log (sled snapshots only while opening): a slower stop for a
    /// faster start, seconds of each with a million entities stored.
    pub checkpoint_on_shutdown: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: defaults::STORE_PATH.into(),
            flush_interval_ms: defaults::FLUSH_INTERVAL_MS,
            cache_mib: defaults::STORE_CACHE_MIB,
            dedup_window: defaults::DEDUP_WINDOW,
            checkpoint_on_shutdown: defaults::CHECKPOINT_ON_SHUTDOWN,
        }
    }
}

impl StoreConfig {
    /// Opens the configured store: its path, page cache and dedup window (the markers kept, and
    /// so counted, depend on the window it is opened with).
    pub fn open(&self) -> Result<aggregator_actors::Store, aggregator_actors::StoreError> {
        aggregator_actors::Store::open_with(
            &self.path,
            self.cache_mib * 1024 * 1024,
            self.dedup_window,
        )
    }
}

/// `[changelog]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChangelogConfig {
    /// Publish every written view, with the message ids it newly holds, to `topic` before it is
    /// stored, and replay what other instances published when a partition is assigned. Needed
    /// whenever more than one instance shares the consumer group; a single instance may turn it
    /// off to save the produce per view (in the benchmark about 5 us of CPU per event and 70 MiB
    /// of peak memory: docs/benchmarks.md).
    pub enabled: bool,
    /// The changelog topic: as many partitions as the source topics (partition *p* holds the state
    /// of partition *p*), `cleanup.policy=delete`, retention at least as long as the sources'.
    pub topic: String,
    /// Milliseconds an assignment may spend reading the changelog before it gives up with an error
    /// (the partitions are then processed on the state the store has).
    pub restore_timeout_ms: u64,
}

impl Default for ChangelogConfig {
    fn default() -> Self {
        ChangelogConfig {
            enabled: defaults::CHANGELOG_ENABLED,
            topic: defaults::CHANGELOG_TOPIC.into(),
            restore_timeout_ms: defaults::CHANGELOG_RESTORE_TIMEOUT_MS,
        }
    }
}

/// `[http]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of the HTTP API (`host:port`; port 0 picks a free port).
    pub bind: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: defaults::HTTP_BIND.into(),
        }
    }
}

/// `[tuning]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuningConfig {
    /// Milliseconds between offset commits.
    pub commit_interval_ms: u64,
    /// Records in flight per partition before consumption of it pauses (resumes with an eighth
    /// free).
    pub max_in_flight_per_partition: usize,
    /// Milliseconds without events after which an entity actor passivates (its view stays stored).
    pub entity_idle_ms: u64,
    /// Most live entity actors: beyond it, the idle ones that were sent an event least recently
    /// passivate first, which bounds the memory that views take whatever the number of entities.
    /// A live entity takes about 2-4 KB of peak RSS (its view as stored, its actor), so the
    /// default holds 200-400 MB; an event for one that is not live first reads its view back
    /// from the store and starts its actor (about 40 us of the process's CPU, measured), so a
    /// bound above the number of entities in use is the faster setting where memory allows, and
    /// a lower one saves memory.
    pub max_live_entities: usize,
    /// Largest record value accepted; larger records are dead-lettered.
    pub max_value_bytes: usize,
    /// Longest entity key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Most records handed to the actors per poll round.
    pub poll_batch: usize,
    /// Milliseconds a revoked partition may take to drain before it is handed over anyway.
    pub drain_timeout_ms: u64,
    /// Times a rule that fails is retried (the entity waits) before the record is dead-lettered
    /// with the reason and the entity carries on; 0 dead-letters at the first failure.
    pub rule_retries: u32,
    /// Milliseconds before the first retry of a failing rule; each further retry waits twice as
    /// long, at most 5 s.
    pub rule_retry_backoff_ms: u64,
}

impl Default for TuningConfig {
    fn default() -> Self {
        TuningConfig {
            commit_interval_ms: defaults::COMMIT_INTERVAL_MS,
            max_in_flight_per_partition: defaults::MAX_IN_FLIGHT_PER_PARTITION,
            entity_idle_ms: defaults::ENTITY_IDLE_MS,
            max_live_entities: defaults::MAX_LIVE_ENTITIES,
            max_value_bytes: defaults::MAX_VALUE_BYTES,
            max_key_bytes: defaults::MAX_KEY_BYTES,
            poll_batch: defaults::POLL_BATCH,
            drain_timeout_ms: defaults::DRAIN_TIMEOUT_MS,
            rule_retries: defaults::RULE_RETRIES,
            rule_retry_backoff_ms: defaults::RULE_RETRY_BACKOFF_MS,
        }
    }
}

impl TuningConfig {
    /// Parse limits for the partition supervisors.
    pub fn limits(&self) -> ParseLimits {
        ParseLimits {
            max_value_bytes: self.max_value_bytes,
            max_key_bytes: self.max_key_bytes,
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file or an environment variable could not be read or has a wrong type; figment's
    /// message names the key, the value and where it came from.
    #[error("{0}")]
    Load(Box<figment::Error>),
    /// A key has a value that is out of range.
    #[error("{key}: {value:?} is invalid: {reason}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Sources or rules are inconsistent.
    #[error(transparent)]
    Rules(#[from] RulesError),
}

impl Config {
    /// Reads `path` (which must exist) and the environment, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Invalid {
                key: "--config",
                value: path.display().to_string(),
                reason: "no such file",
            });
        }
        Self::from_toml_source_and_env(Toml::file(path))
    }

    /// Parses TOML text (no environment), then validates. Used by tests and the demo.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::empty())).merge(Toml::string(text)),
        )
    }

    /// Parses TOML text and the environment, then validates: a configuration built in, such as
    /// the shipped one the bench runs when no file is given, overridable as a file is.
    pub fn from_toml_and_env(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_source_and_env(Toml::string(text))
    }

    /// The defaults, then `toml`, then the environment, validated.
    fn from_toml_source_and_env(toml: Data<Toml>) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::empty()))
                .merge(toml)
                .merge(Env::prefixed(ENV_PREFIX).split("__")),
        )
    }

    fn empty() -> Self {
        Config {
            kafka: KafkaConfig::default(),
            store: StoreConfig::default(),
            http: HttpConfig::default(),
            tuning: TuningConfig::default(),
            changelog: ChangelogConfig::default(),
            sources: Vec::new(),
            rules: Vec::new(),
        }
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every key's range and the rules; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: String, reason| Err(ConfigError::Invalid { key, value, reason });
        if self.kafka.brokers.trim().is_empty() {
            return invalid(
                "kafka.brokers",
                self.kafka.brokers.clone(),
                "must not be empty",
            );
        }
        if self.kafka.group_id.trim().is_empty() {
            return invalid(
                "kafka.group_id",
                self.kafka.group_id.clone(),
                "must not be empty",
            );
        }
        if !["earliest", "latest"].contains(&self.kafka.auto_offset_reset.as_str()) {
            return invalid(
                "kafka.auto_offset_reset",
                self.kafka.auto_offset_reset.clone(),
                "must be earliest or latest",
            );
        }
        if self.kafka.dead_letter_topic.trim().is_empty() {
            return invalid(
                "kafka.dead_letter_topic",
                self.kafka.dead_letter_topic.clone(),
                "must not be empty",
            );
        }
        if self.changelog.enabled
            && (self.changelog.topic.trim().is_empty()
                || self.changelog.topic == self.kafka.dead_letter_topic
                || self.sources.iter().any(|s| s.topic == self.changelog.topic))
        {
            return invalid(
                "changelog.topic",
                self.changelog.topic.clone(),
                "must be a topic of its own (not empty, not a source or the dead-letter topic)",
            );
        }
        if self.http.bind.parse::<SocketAddr>().is_err() {
            return invalid("http.bind", self.http.bind.clone(), "must be host:port");
        }
        let positive = [
            ("store.flush_interval_ms", self.store.flush_interval_ms),
            ("store.cache_mib", self.store.cache_mib),
            ("store.dedup_window", self.store.dedup_window),
            ("tuning.commit_interval_ms", self.tuning.commit_interval_ms),
            ("tuning.entity_idle_ms", self.tuning.entity_idle_ms),
            ("tuning.drain_timeout_ms", self.tuning.drain_timeout_ms),
            (
                "tuning.rule_retry_backoff_ms",
                self.tuning.rule_retry_backoff_ms,
            ),
            ("kafka.session_timeout_ms", self.kafka.session_timeout_ms),
            (
                "tuning.max_in_flight_per_partition",
                self.tuning.max_in_flight_per_partition as u64,
            ),
            ("tuning.max_value_bytes", self.tuning.max_value_bytes as u64),
            ("tuning.max_key_bytes", self.tuning.max_key_bytes as u64),
            ("tuning.poll_batch", self.tuning.poll_batch as u64),
            (
                "tuning.max_live_entities",
                self.tuning.max_live_entities as u64,
            ),
            (
                "changelog.restore_timeout_ms",
                self.changelog.restore_timeout_ms,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return invalid(key, value.to_string(), "must be greater than 0");
            }
        }
        if self
            .sources
            .iter()
            .any(|s| s.topic == self.kafka.dead_letter_topic)
        {
            return invalid(
                "kafka.dead_letter_topic",
                self.kafka.dead_letter_topic.clone(),
                "is also a source topic",
            );
        }
        self.rules()?;
        Ok(())
    }

    /// The validated sources and rules.
    pub fn rules(&self) -> Result<Rules, RulesError> {
        Rules::new(self.sources.clone(), self.rules.clone())
    }

    /// Milliseconds as a duration.
    pub fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[sources]]
        name = "order-service"
        topic = "orders"
    "#;

    #[test]
    fn shipped_config_is_valid() {
        // Not `load`: another test sets AGGREGATOR_* variables, which are process-wide.
        let config = Config::from_toml(include_str!("../config.toml")).unwrap();
        assert_eq!(config.sources.len(), 7);
        assert_eq!(
            config.tuning.commit_interval_ms,
            defaults::COMMIT_INTERVAL_MS
        );
    }

    #[test]
    fn a_bad_value_is_refused_with_its_key() {
        let err =
            Config::from_toml(&format!("{MINIMAL}\n[tuning]\ncommit_interval_ms = 0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tuning.commit_interval_ms: \"0\" is invalid: must be greater than 0"
        );
        let err = Config::from_toml(&format!("{MINIMAL}\n[http]\nbind = \"nowhere\"")).unwrap_err();
        assert!(
            err.to_string().starts_with("http.bind: \"nowhere\""),
            "{err}"
        );
        let err =
            Config::from_toml(&format!("{MINIMAL}\n[tuning]\npoll_batch = \"many\"")).unwrap_err();
        assert!(err.to_string().contains("poll_batch"), "{err}");
        let err = Config::from_toml("[kafka]\nbrokerz = \"x\"").unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type.
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", MINIMAL)?;
            jail.set_env("AGGREGATOR_KAFKA__BROKERS", "kafka-1:9092");
            jail.set_env("AGGREGATOR_TUNING__COMMIT_INTERVAL_MS", "50");
            let config = Config::load(Path::new("c.toml")).map_err(|e| e.to_string())?;
            assert_eq!(config.kafka.brokers, "kafka-1:9092");
            assert_eq!(config.tuning.commit_interval_ms, 50);
            jail.set_env("AGGREGATOR_TUNING__COMMIT_INTERVAL_MS", "soon");
            let err = Config::load(Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains("\"soon\""), "{err}");
            assert!(
                err.to_lowercase().contains("tuning.commit_interval_ms"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type.
    fn environment_overrides_a_built_in_configuration() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AGGREGATOR_TUNING__MAX_LIVE_ENTITIES", "1234");
            let config = Config::from_toml_and_env(MINIMAL).map_err(|e| e.to_string())?;
            assert_eq!(config.tuning.max_live_entities, 1234);
            let plain = Config::from_toml(MINIMAL).map_err(|e| e.to_string())?;
            assert_ne!(plain.tuning.max_live_entities, 1234);
            Ok(())
        });
    }

    #[test]
    fn consumer_properties_reach_the_consumers_only_and_win() {
        let mut kafka = KafkaConfig::default();
        kafka.properties.insert("client.id".into(), "both".into());
        kafka
            .consumer_properties
            .insert("heartbeat.interval.ms".into(), "300".into());
        let producer = kafka.client(&[]);
        let consumer = kafka.consumer_client(&[("heartbeat.interval.ms", "900")]);
        assert_eq!(producer.get("heartbeat.interval.ms"), None);
        assert_eq!(producer.get("client.id"), Some("both"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("300"));
        assert_eq!(consumer.get("client.id"), Some("both"));
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::load(Path::new("/nonexistent/aggregator.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--config: \"/nonexistent/aggregator.toml\" is invalid: no such file"
        );
    }
}
