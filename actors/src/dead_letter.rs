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
        actix::spawn(async move {
            let mut delay = RETRY_FIRST;
            while let Err(e) = this.sink.publish(&letter).await {
                tracing::warn!(origin = %letter.record.origin, "dead-letter publish failed, retrying in {delay:?}: {e}");
                this.metrics.fault("dead_letter");
                actix::clock::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
            this.metrics.dead_lettered(&letter.source, letter.reason);
            this.committer.do_send(Completed {
                origins: vec![letter.record.origin],
            });
        });
    }
}
