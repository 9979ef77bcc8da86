//! Wires the service together: store, actors, Kafka consumer and producer, and the HTTP API; and
//! takes it apart again in an order that loses nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{web, App, HttpServer};
use aggregator_actors::changelog::ChangelogSink;
use aggregator_actors::dead_letter::{DeadLetterSink, DeadLetterer};
use aggregator_actors::dedup_actor::{DedupActor, Release};
use aggregator_actors::entity_actor::Passivate;
use aggregator_actors::fault_injector::FaultInjector;
use aggregator_actors::ledger::Ledger;
use aggregator_actors::metrics::Metrics;
use aggregator_actors::offset_committer::{OffsetCommitter, OffsetSink, Shutdown};
use aggregator_actors::pipeline::Pipeline;
use aggregator_actors::topology::Topology;
use aggregator_actors::view_loader::ViewLoader;
use aggregator_actors::{RulesError, Store, StoreError};

use crate::changelog_producer::{ChangelogSetupError, KafkaChangelog};
use crate::changelog_restorer::ChangelogRestorer;
use crate::config::Config;
use crate::consumer::{ConsumerError, ConsumerThread};
use crate::dead_letter_producer::KafkaDeadLetters;
use crate::http::{routes, ApiState};
use crate::offset_sink::KafkaOffsetSink;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Sources or rules are inconsistent.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The dead-letter producer could not be created.
    #[error("dead-letter producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    /// The consumer could not start.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The changelog topic cannot be used.
    #[error(transparent)]
    Changelog(#[from] ChangelogSetupError),
    /// The view loader's thread could not be started.
    #[error("cannot start the view loader thread: {0}")]
    Loader(std::io::Error),
    /// The HTTP API could not bind.
    #[error("cannot listen on http.bind {bind:?}: {source}")]
    Http {
        /// The configured address.
        bind: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A running service. Dropping it without [`RunningService::shutdown`] leaves work to be
/// redelivered, never lost.
pub struct RunningService {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Live figures of the actor tree.
    pub topology: Arc<Topology>,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    consumer: ConsumerThread,
    http: actix_web::dev::ServerHandle,
    pub(crate) dedup: Addr<DedupActor>,
    dedup_thread: Arbiter,
    pub(crate) committer: Addr<OffsetCommitter>,
    store_faults: FaultInjector,
    rule_faults: FaultInjector,
    store_path: std::path::PathBuf,
    checkpoint_on_shutdown: bool,
}

/// Starts the service with the configured Kafka dead-letter producer. Must run inside an actix
/// system; actors run on the current arbiter.
pub async fn start(config: &Config) -> Result<RunningService, StartError> {
    let dead_letters = Arc::new(KafkaDeadLetters::new(config)?);
    start_with(config, dead_letters).await
}

/// The actor tree with its store and sinks, before any record reaches it: what the service wires
/// to Kafka and the pipeline benchmark feeds directly.
pub struct ActorTree {
    /// The shared context the partition supervisors are started with.
    pub pipeline: Arc<Pipeline>,
    /// Live figures of the tree.
    pub topology: Arc<Topology>,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    /// The dedup actor.
    pub dedup: Addr<DedupActor>,
    /// The thread the dedup actor runs on.
    pub dedup_thread: Arbiter,
    /// The offset committer.
    pub committer: Addr<OffsetCommitter>,
    /// Injects store write faults.
    pub store_faults: FaultInjector,
    /// Injects rule failures.
    pub rule_faults: FaultInjector,
}

/// Starts the actor tree over `store` on the current arbiter (the dedup actor on a thread of its
/// own), committing to `offsets`, dead-lettering to `dead_letters` and publishing written views
/// to `changelog`, if any. Must run inside an actix system.
pub fn start_actors(
    config: &Config,
    store: Store,
    offsets: Arc<dyn OffsetSink>,
    dead_letters: Arc<dyn DeadLetterSink>,
    changelog: Option<Arc<dyn ChangelogSink>>,
) -> Result<ActorTree, StartError> {
    let rules = Arc::new(config.rules()?);
    let store_faults = store.fault_injector();
    let rule_faults = FaultInjector::default();
    let topology = Arc::new(Topology::default());
    let metrics = Arc::new(Metrics::new(&rules));
    // Both run under supervisors that restart them, address and mailbox kept, when they die.
    let committer = OffsetCommitter::new(
        offsets,
        topology.clone(),
        metrics.clone(),
        Config::ms(config.tuning.commit_interval_ms),
    );
    let committer = Supervisor::start(move |_| committer);
    let ledger = Arc::new(Ledger::new(store.clone(), topology.clone()));
    let mut dedup = DedupActor::new(
        store,
        ledger.clone(),
        Arbiter::current(),
        committer.clone().recipient(),
        topology.clone(),
        metrics.clone(),
        Config::ms(config.store.flush_interval_ms),
    );
    if let Some(changelog) = changelog {
        dedup = dedup.with_changelog(changelog);
    }
    // On a thread of its own: encoding views and reading the store leave the entity actors' thread.
    let dedup_thread = Arbiter::new();
    let dedup = Supervisor::start_in_arbiter(&dedup_thread.handle(), move |_| dedup);
    let pipeline = Arc::new(Pipeline {
        rules,
        limits: config.tuning.limits(),
        topology: topology.clone(),
        metrics: metrics.clone(),
        dedup: dedup.clone(),
        loader: ViewLoader::start(ledger.clone()).map_err(StartError::Loader)?,
        ledger,
        committer: committer.clone(),
        dead_letters: DeadLetterer::new(
            dead_letters,
            committer.clone().recipient(),
            metrics.clone(),
        ),
        entity_idle: Config::ms(config.tuning.entity_idle_ms),
        max_live_entities: config.tuning.max_live_entities,
        rule_retries: config.tuning.rule_retries,
        rule_retry_backoff: Config::ms(config.tuning.rule_retry_backoff_ms),
        rule_faults: rule_faults.clone(),
    });
    spawn_idle_sweep(&topology, pipeline.entity_idle);
    Ok(ActorTree {
        pipeline,
        topology,
        metrics,
        dedup,
        dedup_thread,
        committer,
        store_faults,
        rule_faults,
    })
}

/// Passivates idle entity actors every half of `idle`, on the actors' thread (where events are
/// routed, so no actor is sent an event while the sweep decides): one timer for all of them. It
/// ends with the actor tree.
fn spawn_idle_sweep(topology: &Arc<Topology>, idle: Duration) {
    let topology = Arc::downgrade(topology);
    let every = (idle / 2).max(Duration::from_millis(10));
    actix::spawn(async move {
        let mut ticks = actix::clock::interval(every);
        loop {
            ticks.tick().await;
            let Some(topology) = topology.upgrade() else {
                return;
            };
            topology.entities.sweep_idle(Instant::now(), idle);
        }
    });
}

/// Starts the service with `dead_letters` as the dead-letter sink.
pub async fn start_with(
    config: &Config,
    dead_letters: Arc<dyn DeadLetterSink>,
) -> Result<RunningService, StartError> {
    let store = config.store.open()?;
    let sink = Arc::new(KafkaOffsetSink::default());
    let mut changelog: Option<Arc<dyn ChangelogSink>> = None;
    let mut restorer = None;
    if config.changelog.enabled {
        changelog = Some(Arc::new(KafkaChangelog::new(config)?));
        let reader = ChangelogRestorer::new(config).map_err(ChangelogSetupError::Kafka)?;
        restorer = Some((reader, store.clone()));
    }
    let tree = start_actors(config, store, sink.clone(), dead_letters, changelog)?;

    let state = ApiState {
        topology: tree.topology.clone(),
        metrics: tree.metrics.clone(),
        dedup: tree.dedup.clone(),
        max_key_bytes: config.tuning.max_key_bytes,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .configure(routes)
    })
    .workers(1)
    .disable_signals()
    .bind(&config.http.bind)
    .map_err(|source| StartError::Http {
        bind: config.http.bind.clone(),
        source,
    })?;
    let http_addr = server.addrs()[0];
    let server = server.run();
    let http = server.handle();
    actix::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("http server stopped: {e}");
        }
    });

    let consumer =
        ConsumerThread::start(config, tree.pipeline, sink, Arbiter::current(), restorer)?;
    tracing::info!(%http_addr, store = %config.store.path.display(), "aggregator started");
    Ok(RunningService {
        http_addr,
        topology: tree.topology,
        metrics: tree.metrics,
        consumer,
        http,
        dedup: tree.dedup,
        dedup_thread: tree.dedup_thread,
        committer: tree.committer,
        store_faults: tree.store_faults,
        rule_faults: tree.rule_faults,
        store_path: config.store.path.clone(),
        checkpoint_on_shutdown: config.store.checkpoint_on_shutdown,
    })
}

impl RunningService {
    /// Injects store write faults (tests of fault handling).
    pub fn store_faults(&self) -> &FaultInjector {
        &self.store_faults
    }

    /// Injects rule failures (tests of the retry budget).
    pub fn rule_faults(&self) -> &FaultInjector {
        &self.rule_faults
    }

    /// Drains every partition and commits, stops the HTTP API, flushes and closes the store.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        tracing::info!("shutting down: draining partitions");
        self.consumer.shutdown().await;
        self.http.stop(true).await;
        for h in self.topology.entities.handles() {
            h.addr.do_send(Passivate);
        }
        let released = self.dedup.send(Release).await;
        // Its thread ends whether or not the store came back.
        self.dedup_thread.stop();
        let store = released.map_err(|_| StoreError::Released)??;
        self.committer.do_send(Shutdown);
        drop(store);
        if self.checkpoint_on_shutdown {
            // The next start then opens the store at once instead of replaying all it wrote.
            let path = self.store_path;
            let checkpointed =
                actix_web::rt::task::spawn_blocking(move || Store::checkpoint(&path))
                    .await
                    .map_err(|panicked| panicked.to_string())
                    .and_then(|result| result.map_err(|e| e.to_string()));
            match checkpointed {
                Ok(took) => tracing::info!(ms = took.as_millis() as u64, "store checkpointed"),
                Err(e) => tracing::warn!("store not checkpointed, the next start recovers it: {e}"),
            }
        }
        tracing::info!("shut down cleanly");
        Ok(())
    }
}
