//! The offset committer's sink for Kafka: the offsets it hands over are committed by a thread of
//! their own, one commit at a time, so that a commit the broker is slow to answer (through a whole
//! outage, when the coordinator is down) never holds up the consumer's poll loop.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use aggregator_actors::offset_committer::OffsetSink;
use aggregator_actors::TopicPartition;
use rdkafka::consumer::Consumer;

use crate::consumer::AggregatorConsumer;

/// Wait before committing again after a commit failed: librdkafka answers at once when the group
/// has no coordinator, and the committer hands newer offsets every commit interval anyway.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Offsets due for commit, and whether the commit thread should stop.
#[derive(Default)]
struct Due {
    offsets: HashMap<TopicPartition, i64>,
    stopping: bool,
}

/// Offsets due for commit, taken by the commit thread (`spawn_commit_thread`).
#[derive(Default)]
pub struct KafkaOffsetSink {
    due: Mutex<Due>,
    changed: Condvar,
    /// Held through each commit, the commit thread's and a drain's: a partition's commits reach
    /// the broker in the order they were made, and a drain's final offsets come last.
    turn: Mutex<()>,
}

impl KafkaOffsetSink {
    fn due(&self) -> MutexGuard<'_, Due> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for offsets to commit; `None` once the sink is stopped.
    fn next(&self) -> Option<HashMap<TopicPartition, i64>> {
        let mut due = self
            .changed
            .wait_while(self.due(), |d| d.offsets.is_empty() && !d.stopping)
            .unwrap_or_else(|p| p.into_inner());
        (!due.stopping).then(|| std::mem::take(&mut due.offsets))
    }

    /// Waits `pause`, or less if the sink is stopped meanwhile.
    fn pause(&self, pause: Duration) {
        let _ = self
            .changed
            .wait_timeout_while(self.due(), pause, |d| !d.stopping);
    }

    /// Puts back offsets whose commit failed, unless a newer one is already due.
    pub(crate) fn retry(&self, offsets: HashMap<TopicPartition, i64>) {
        let mut due = self.due();
        for (tp, offset) in offsets {
            due.offsets.entry(tp).or_insert(offset);
        }
    }

    /// Drops what is due for `tps`, whose final offsets a drain commits.
    pub(crate) fn forget(&self, tps: &[TopicPartition]) {
        let mut due = self.due();
        for tp in tps {
            due.offsets.remove(tp);
        }
    }

    /// The turn to commit, held through one commit.
    pub(crate) fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the commit thread once its commit under way, if any, is answered.
    pub(crate) fn stop(&self) {
        self.due().stopping = true;
        self.changed.notify_all();
    }
}

impl OffsetSink for KafkaOffsetSink {
    fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), String> {
        let mut due = self.due();
        for (tp, offset) in offsets {
            due.offsets.insert(tp.clone(), *offset);
        }
        drop(due);
        self.changed.notify_all();
        Ok(())
    }
}

/// Starts the thread that commits what `sink` is handed, until the sink is stopped.
pub(crate) fn spawn_commit_thread(
    consumer: Arc<AggregatorConsumer>,
    sink: Arc<KafkaOffsetSink>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("offset-commit".into())
        .spawn(move || {
            while let Some(offsets) = sink.next() {
                let turn = sink.turn();
                if let Err(e) = consumer.context().commit(&consumer, &offsets) {
                    tracing::warn!("offset commit failed, will retry: {e}");
                    sink.retry(offsets);
                    drop(turn);
                    sink.pause(RETRY_AFTER);
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(partition: i32) -> TopicPartition {
        TopicPartition::new("orders", partition)
    }

    #[test]
    fn offsets_handed_over_are_taken_once_newest_first_and_retried_below_newer() {
        let sink = KafkaOffsetSink::default();
        sink.commit(&[(tp(0), 10), (tp(1), 5)]).unwrap();
        sink.commit(&[(tp(0), 12)]).unwrap();
        let taken = sink.next().unwrap();
        assert_eq!(taken, HashMap::from([(tp(0), 12), (tp(1), 5)]));
        // A newer offset handed over while the commit failed is not put back below.
        sink.commit(&[(tp(0), 20)]).unwrap();
        sink.retry(taken);
        sink.forget(&[tp(2)]);
        assert_eq!(
            sink.next().unwrap(),
            HashMap::from([(tp(0), 20), (tp(1), 5)])
        );
        sink.commit(&[(tp(1), 7)]).unwrap();
        sink.forget(&[tp(1)]);
        sink.stop();
        assert_eq!(sink.next(), None, "a stopped sink hands nothing more");
    }

    #[test]
    fn a_waiting_commit_thread_wakes_for_offsets_and_for_stop() {
        let sink = Arc::new(KafkaOffsetSink::default());
        let waiter = {
            let sink = sink.clone();
            std::thread::spawn(move || (sink.next(), sink.next()))
        };
        sink.commit(&[(tp(3), 1)]).unwrap();
        // The first wait ends with the offset or, if the stop came first, with nothing.
        sink.stop();
        let (first, second) = waiter.join().unwrap();
        assert!(
            first == Some(HashMap::from([(tp(3), 1)])) || first.is_none(),
            "{first:?}"
        );
        assert_eq!(second, None);
        let started = std::time::Instant::now();
        sink.pause(Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a stopped sink's pause waits"
        );
    }
}
