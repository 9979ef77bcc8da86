//! Records that cannot be processed go to the dead-letter sink with their reason; the offset
//! completes only once the sink has accepted the record, so nothing is dropped silently.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;

use crate::envelope::Rejection;
use crate::metrics::Metrics;
use crate::offset_committer::Completed;
use crate::record::Record;

/// A record that cannot be processed, with why.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The record as consumed.
    pub record: Record,
    /// Name of the record's source (the topic when no source matches).
    pub source: String,
    /// Stable reason label (see [`Rejection::reason`]).
    pub reason: &'static str,
    /// Human-readable detail with the offending value.
    pub detail: String,
}

/// Future a sink returns: resolves once the dead letter is stored.
pub type PublishFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// Where dead letters go: a Kafka topic in the service, memory in tests.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Publishes `letter`; resolves when it is stored, or with the error.
    fn publish(&self, letter: &DeadLetter) -> PublishFuture;
}

/// First and longest wait between attempts to publish a dead letter.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Sends rejected records to the sink, retrying with backoff, then completes their offsets.
#[derive(Clone)]
pub struct DeadLetterer {
    sink: Arc<dyn DeadLetterSink>,
    committer: Recipient<Completed>,
    metrics: Arc<Metrics>,
}

impl DeadLetterer {
    /// A dead-letterer publishing to `sink` and completing offsets at `committer`.
    pub fn new(
        sink: Arc<dyn DeadLetterSink>,
        committer: Recipient<Completed>,
        metrics: Arc<Metrics>,
    ) -> Self {
        DeadLetterer {
            sink,
            committer,
            metrics,
        }
    }

    /// Dead-letters `record` of `source` for `rejection`. Must run inside an actix system.
    pub fn send(&self, record: Record, source: &str, rejection: &Rejection) {
        tracing::info!(origin = %record.origin, reason = rejection.reason(), "dead-lettering: {rejection}");
        let letter = DeadLetter {
            record,
            source: source.to_string(),
            reason: rejection.reason(),
            detail: rejection.to_string(),
        };
        let this = self.clone();
        this.metrics.dead_letters_pending.inc();
        actix::spawn(async move {
            let mut delay = RETRY_FIRST;
            while let Err(e) = this.sink.publish(&letter).await {
                tracing::warn!(origin = %letter.record.origin, "dead-letter publish failed, retrying in {delay:?}: {e}");
                this.metrics.fault("dead_letter");
                actix::clock::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
            this.metrics.dead_letters_pending.dec();
            this.metrics.dead_lettered(&letter.source, letter.reason);
            this.committer.do_send(Completed {
                origins: vec![letter.record.origin],
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use actix::prelude::*;
    use tokio::sync::mpsc;

    use super::*;
    use crate::record::{Origin, RecordValue, TopicPartition};
    use crate::rules::{Rules, SourceConfig};

    /// A sink that refuses every dead letter while `down` is set.
    struct Flaky {
        down: Arc<AtomicBool>,
    }

    impl DeadLetterSink for Flaky {
        fn publish(&self, _: &DeadLetter) -> PublishFuture {
            let down = self.down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    Err("broker unreachable".to_string())
                } else {
                    Ok(())
                }
            })
        }
    }

    /// Forwards the completed origins to the test.
    struct Completions(mpsc::UnboundedSender<Vec<Origin>>);

    impl Actor for Completions {
        type Context = Context<Self>;
    }

    impl Handler<Completed> for Completions {
        type Result = ();

        fn handle(&mut self, msg: Completed, _: &mut Self::Context) {
            let _ = self.0.send(msg.origins);
        }
    }

    #[actix_rt::test]
    async fn a_dead_letter_is_pending_until_stored_and_only_then_completes_its_offset() {
        let orders = SourceConfig {
            name: "orders".into(),
            topic: "orders".into(),
            key_pointer: None,
            delete_codes: vec![],
        };
        let metrics = Arc::new(Metrics::new(
            &Rules::new(vec![orders], vec![]).expect("rules"),
        ));
        let down = Arc::new(AtomicBool::new(true));
        let (tx, mut completed) = mpsc::unbounded_channel();
        let letters = DeadLetterer::new(
            Arc::new(Flaky { down: down.clone() }),
            Completions(tx).start().recipient(),
            metrics.clone(),
        );
        let origin = Origin {
            tp: TopicPartition::new("orders", 1),
            offset: 1_100,
        };
        let record = Record {
            origin: origin.clone(),
            key: Some(b"C1".to_vec()),
            value: Some(RecordValue::from(b"{".to_vec())),
            headers: vec![],
            timestamp_ms: None,
            finished: Default::default(),
        };
        letters.send(record, "orders", &Rejection::RuleFailed("bad".into()));
        assert_eq!(metrics.dead_letters_pending.get(), 1);

        // Two refused attempts (50 ms apart): still pending, nothing completed.
        actix::clock::sleep(Duration::from_millis(120)).await;
        assert_eq!(metrics.dead_letters_pending.get(), 1);
        assert!(
            completed.try_recv().is_err(),
            "completed before it was stored"
        );

        down.store(false, Ordering::SeqCst);
        let origins = tokio::time::timeout(Duration::from_secs(10), completed.recv())
            .await
            .expect("completed once the sink took it")
            .expect("the completions actor is alive");
        assert_eq!(origins, vec![origin]);
        assert_eq!(metrics.dead_letters_pending.get(), 0);
        assert_eq!(metrics.dead_lettered_total(), 1);
    }
}
