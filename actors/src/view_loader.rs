//! The view loader: reads the views of entity actors that start, on a thread of its own, and
//! hands them back on the actors' thread, many at a time.
//!
//! Why not a message to the dedup actor and its reply: the reply wakes the asking actor from
//! another thread, and tokio's `LocalSet`, which runs the actors, polls a task woken from another
//! thread only once in 31 polls while local tasks are ready. With tens of thousands of entity
//! actors ready, a view loaded in microseconds reached its actor about a second later. Here one
//! task on the actors' thread is woken for a whole batch of answers and completes each from
//! there, so every asking actor is woken locally.
//!
//! The views of passivating actors are dropped here too: freeing a view (its maps and their
//! strings, one allocation each) took an eighth of the actors' thread, and most views were
//! decoded, so allocated, on this thread, where freeing them is cheapest.

use std::future::Future;
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::aggregate::Aggregate;
use crate::ledger::Ledger;
use crate::store::StoreError;

/// Most answers handed back at once, so that early answers need not wait for a long queue.
const MAX_BATCH: usize = 1024;

/// What a load answers: the latest view of the key (staged, being written or stored), if any.
pub type Loaded = Result<Option<Arc<Aggregate>>, StoreError>;

struct Request {
    key: String,
    reply: oneshot::Sender<Loaded>,
}

/// What the loader thread is asked to do.
enum Work {
    Load(Request),
    Retire(Arc<Aggregate>),
}

/// Why a load got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The loader thread is gone (the service is stopping).
    #[error("the view loader has stopped")]
    Stopped,
}

/// Handle to the loader; cheap to clone. Its thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct ViewLoader {
    requests: mpsc::Sender<Work>,
}

impl ViewLoader {
    /// Starts the loader thread over `ledger`. Must be called on the actors' arbiter: answers
    /// are handed back by a task spawned there.
    pub fn start(ledger: Arc<Ledger>) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Work>();
        let (answer, mut answers) =
            tokio::sync::mpsc::unbounded_channel::<Vec<(Request, Loaded)>>();
        std::thread::Builder::new()
            .name("view-loader".into())
            .spawn(move || {
                while let Ok(first) = incoming.recv() {
                    let mut requests = Vec::new();
                    for work in
                        std::iter::once(first).chain(incoming.try_iter().take(MAX_BATCH - 1))
                    {
                        match work {
                            Work::Load(request) => requests.push(request),
                            Work::Retire(view) => drop(view),
                        }
                    }
                    if requests.is_empty() {
                        continue;
                    }
                    // One turn for the whole round: each read alone would wait for a batch.
                    let batch = ledger.reading(|| {
                        requests
                            .into_iter()
                            .map(|request| {
                                let loaded = ledger.load(&request.key);
                                (request, loaded)
                            })
                            .collect()
                    });
                    if answer.send(batch).is_err() {
                        return;
                    }
                }
            })?;
        actix::spawn(async move {
            while let Some(batch) = answers.recv().await {
                for (request, loaded) in batch {
                    // The asking actor may have stopped meanwhile; nobody is left to tell.
                    let _ = request.reply.send(loaded);
                }
            }
        });
        Ok(ViewLoader { requests })
    }

    /// The latest view of `key`, read on the loader's thread.
    pub fn load(&self, key: String) -> impl Future<Output = Result<Loaded, LoadError>> + 'static {
        let (reply, answer) = oneshot::channel();
        let asked = self
            .requests
            .send(Work::Load(Request { key, reply }))
            .is_ok();
        async move {
            if !asked {
                return Err(LoadError::Stopped);
            }
            answer.await.map_err(|_| LoadError::Stopped)
        }
    }

    /// Drops `view` on the loader's thread (here if the loader has stopped).
    pub fn retire(&self, view: Arc<Aggregate>) {
        let _ = self.requests.send(Work::Retire(view));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Applied;
    use crate::record::{Origin, TopicPartition};
    use crate::store::{Store, WriteBatch};

    #[actix_rt::test]
    async fn loads_the_staged_view_first_then_the_stored_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let mut stored = Aggregate::new("a", 1);
        stored.events_applied = 4;
        let mut batch = WriteBatch::default();
        batch.put_view(&stored).expect("encodes");
        store.write(batch).expect("written");
        let ledger = Arc::new(Ledger::new(store, Arc::default()));
        let loader = ViewLoader::start(ledger.clone()).expect("thread");

        let loaded = loader.load("a".into()).await.expect("answered");
        assert_eq!(loaded.expect("read").map(|v| v.events_applied), Some(4));
        assert!(loader
            .load("nobody".into())
            .await
            .expect("answered")
            .expect("read")
            .is_none());

        let mut newer = Aggregate::new("a", 1);
        newer.events_applied = 5;
        let staged = ledger.fold_and_stage(&mut Arc::new(newer), 1, |_| {
            Ok::<_, String>(Applied {
                partition: 1,
                message_id: "m5".into(),
                origin: Origin {
                    tp: TopicPartition::new("t", 1),
                    offset: 9,
                },
                source: 0,
            })
        });
        assert_eq!(staged, Ok(true));
        let loaded = loader.load("a".into()).await.expect("answered");
        assert_eq!(
            loaded.expect("read").map(|v| v.events_applied),
            Some(5),
            "what is staged is newer than the store"
        );

        ledger.release();
        let loaded = loader.load("b".into()).await.expect("answered");
        assert!(matches!(loaded, Err(StoreError::Released)));
    }
}
