//! Tansu, an Apache-Kafka-compatible broker, started in its own process on a free loopback port
//! with in-memory storage: the log outlives the service, so the service can be killed and
//! restarted against it. `scripts/setup` installs Tansu when it is missing.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aggregator::config::Config;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// A running Tansu broker; killed when dropped.
pub struct TansuBroker {
    child: Child,
    bootstrap: String,
}

/// The Tansu binary: `$TANSU`, else `tansu` on the PATH, else cargo's bin folder.
fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file());
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    on_path
        .or_else(|| {
            cargo_home
                .map(|c| c.join("bin/tansu"))
                .filter(|p| p.is_file())
        })
        .expect("tansu is not installed: run scripts/setup (it installs tansu 0.6.0) or set TANSU")
}

impl TansuBroker {
    /// Starts Tansu and creates every source topic and the dead-letter topic of `config`, each
    /// with `partitions` partitions.
    pub async fn start(config: &Config, partitions: i32) -> Self {
        let port = super::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_binary())
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let broker = TansuBroker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&broker.bootstrap).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        broker.create_topics(config, partitions).await;
        broker
    }

    async fn create_topics(&self, config: &Config, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client");
        let names: Vec<&str> = config
            .sources
            .iter()
            .map(|s| s.topic.as_str())
            .chain([
                config.kafka.dead_letter_topic.as_str(),
                config.changelog.topic.as_str(),
            ])
            .collect();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .expect("CreateTopics answered");
        for result in results {
            result.expect("topic created");
        }
    }

    /// Sets a session timeout Tansu 0.6.0 can keep. Its coordinator holds a member's JoinGroup
    /// 3 s before answering while another member leads, and dates the member's session from the
    /// request: with the embedded broker's 3 s session, a member that had just joined was
    /// expired half a second after its answer, and Tansu, keeping its id as the group's leader,
    /// refused every later member at SyncGroup ("Unknown member") for minutes.
    pub fn tune_group_timeouts(config: &mut Config) {
        config.kafka.session_timeout_ms = 6_000;
    }

    /// The broker's `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.bootstrap.clone()
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
