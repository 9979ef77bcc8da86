//! Per-partition bookkeeping of in-flight offsets: what may be committed is the lowest offset not
//! yet fully processed, or one past the highest seen when nothing is in flight.

use std::collections::{BTreeMap, HashMap};

use crate::record::{Origin, TopicPartition};
use crate::KeyHasher;

/// When a record in flight was produced and when the actors got it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamps {
    /// The record's timestamp, ms since the epoch (0 when unknown).
    pub produced_ms: i64,
    /// When its partition supervisor got it, ms since the epoch.
    pub delivered_ms: i64,
}

#[derive(Default, Debug)]
struct PartitionOffsets {
    /// In-flight offsets with their stamps.
    in_flight: BTreeMap<i64, Stamps>,
    /// One past the highest offset registered.
    next: Option<i64>,
    /// Last offset handed out for commit.
    committed: Option<i64>,
}

impl PartitionOffsets {
    fn committable(&self) -> Option<i64> {
        self.in_flight.keys().next().copied().or(self.next)
    }
}

/// In-flight offsets of every tracked partition.
#[derive(Default, Debug)]
pub struct OffsetTracker {
    parts: HashMap<TopicPartition, PartitionOffsets, KeyHasher>,
}

impl OffsetTracker {
    /// Records that `offset` of `tp`, with its `stamps`, is now in flight.
    pub fn register(&mut self, tp: &TopicPartition, offset: i64, stamps: Stamps) {
        self.register_all(tp, [(offset, stamps)]);
    }

    /// Records that each offset of `tp`, with its stamps, is now in flight; the partition is
    /// looked up once for them all (a poll hands over hundreds).
    pub fn register_all(
        &mut self,
        tp: &TopicPartition,
        offsets: impl IntoIterator<Item = (i64, Stamps)>,
    ) {
        let p = match self.parts.get_mut(tp) {
            Some(p) => p,
            None => self.parts.entry(tp.clone()).or_default(),
        };
        for (offset, stamps) in offsets {
            p.in_flight.insert(offset, stamps);
            p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        }
    }

    /// Records that `origin` is fully processed; its stamps, or `None` if it was not in flight.
    pub fn complete(&mut self, origin: &Origin) -> Option<Stamps> {
        let mut stamps = None;
        self.complete_all(&origin.tp, [origin.offset], |s| stamps = Some(s));
        stamps
    }

    /// Records that each of `offsets` of `tp` is fully processed, handing `each` the stamps of
    /// those that were in flight; the partition is looked up once for them all (a write
    /// completes hundreds). Returns how many were in flight.
    pub fn complete_all(
        &mut self,
        tp: &TopicPartition,
        offsets: impl IntoIterator<Item = i64>,
        mut each: impl FnMut(Stamps),
    ) -> usize {
        let Some(p) = self.parts.get_mut(tp) else {
            return 0;
        };
        let mut completed = 0;
        for offset in offsets {
            if let Some(stamps) = p.in_flight.remove(&offset) {
                each(stamps);
                completed += 1;
            }
        }
        completed
    }

    /// The offset that may be committed for `tp`: nothing before it is unfinished.
    pub fn committable(&self, tp: &TopicPartition) -> Option<i64> {
        self.parts.get(tp).and_then(PartitionOffsets::committable)
    }

    /// Offsets in flight for `tp`.
    pub fn in_flight(&self, tp: &TopicPartition) -> usize {
        self.parts.get(tp).map_or(0, |p| p.in_flight.len())
    }

    /// The partitions whose committable offset moved past their last commit, with that offset;
    /// they are recorded as committed.
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.parts {
            if let Some(c) = p.committable() {
                if p.committed.is_none_or(|done| c > done) {
                    p.committed = Some(c);
                    out.push((tp.clone(), c));
                }
            }
        }
        out.sort();
        out
    }

    /// Undoes `take_commits` for `offsets` whose commit failed, so the next round retries them.
    pub fn forget_commits(&mut self, offsets: &[(TopicPartition, i64)]) {
        for (tp, _) in offsets {
            if let Some(p) = self.parts.get_mut(tp) {
                p.committed = None;
            }
        }
    }

    /// Stops tracking `tp`, returning its committable offset.
    pub fn remove(&mut self, tp: &TopicPartition) -> Option<i64> {
        self.parts.remove(tp).and_then(|p| p.committable())
    }

    /// Tracked partitions.
    pub fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.parts.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        TopicPartition::new("t", 0)
    }

    fn done(t: &mut OffsetTracker, offset: i64) {
        assert!(t.complete(&Origin { tp: tp(), offset }).is_some());
    }

    #[test]
    fn out_of_order_completions_commit_only_the_lowest_unfinished() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.register(&tp(), o, Stamps::default());
        }
        done(&mut t, 12);
        done(&mut t, 14);
        assert_eq!(t.committable(&tp()), Some(10));
        done(&mut t, 10);
        assert_eq!(t.committable(&tp()), Some(11));
        done(&mut t, 11);
        assert_eq!(t.committable(&tp()), Some(13));
        done(&mut t, 13);
        assert_eq!(t.committable(&tp()), Some(15));
    }

    #[test]
    fn a_batch_completes_each_offset_in_flight_once_and_hands_over_its_stamps() {
        let mut t = OffsetTracker::default();
        for o in 0..4 {
            let stamps = Stamps {
                produced_ms: 100 + o,
                delivered_ms: 200 + o,
            };
            t.register(&tp(), o, stamps);
        }
        let mut seen = Vec::new();
        // 9 was never in flight, and 2 comes twice: each counts once.
        let n = t.complete_all(&tp(), [2, 0, 9, 2], |s| seen.push(s.produced_ms));
        assert_eq!(n, 2);
        assert_eq!(seen, vec![102, 100]);
        assert_eq!(t.committable(&tp()), Some(1));
        assert_eq!(t.in_flight(&tp()), 2);
        let other = TopicPartition::new("t", 1);
        assert_eq!(t.complete_all(&other, [1], |_| panic!("not tracked")), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_back_commits() {
        let mut t = OffsetTracker::default();
        for o in [3, 7, 20] {
            t.register(&tp(), o, Stamps::default());
        }
        done(&mut t, 3);
        assert_eq!(t.committable(&tp()), Some(7));
        done(&mut t, 20);
        assert_eq!(t.committable(&tp()), Some(7));
        done(&mut t, 7);
        assert_eq!(t.committable(&tp()), Some(21));
    }

    #[test]
    fn take_commits_reports_each_advance_once_and_never_moves_back() {
        let mut t = OffsetTracker::default();
        t.register(&tp(), 0, Stamps::default());
        t.register(&tp(), 1, Stamps::default());
        assert_eq!(t.take_commits(), vec![(tp(), 0)]);
        assert!(t.take_commits().is_empty());
        done(&mut t, 0);
        done(&mut t, 1);
        assert_eq!(t.take_commits(), vec![(tp(), 2)]);
        // A redelivered older offset (after a seek back) must not pull the commit backwards.
        t.register(&tp(), 1, Stamps::default());
        assert!(t.take_commits().is_empty());
    }

    #[test]
    fn revoke_mid_flight_returns_the_offset_before_unfinished_work() {
        let mut t = OffsetTracker::default();
        for o in 0..5 {
            t.register(&tp(), o, Stamps::default());
        }
        done(&mut t, 0);
        done(&mut t, 1);
        done(&mut t, 3);
        assert_eq!(t.in_flight(&tp()), 2);
        assert_eq!(t.remove(&tp()), Some(2));
        assert_eq!(t.committable(&tp()), None);
        // Completions that arrive after the partition left are ignored.
        assert!(t
            .complete(&Origin {
                tp: tp(),
                offset: 2
            })
            .is_none());
    }
}
