//! One step of the data path, for every loop that folds the log: poll a batch ->
//! fold it -> apply it to a target -> say how far each partition has advanced.
//!
//! The consumer loop (following the topics into the live store) and a replay
//! (rebuilding a shadow store with a new reducer, and its handover tail) both step
//! with a [`Stepper`]; neither polls, folds or advances positions in a way of its
//! own. Before they shared it the two had drifted apart: the live loop moved a
//! partition past a compaction tombstone (a record with a null value) while the
//! replay dropped tombstones before advancing, so a replay over a log ending in
//! tombstones never reached its goal. Here every record moves its partition on,
//! whatever becomes of it: folded, refused (the caller dead-letters it), or skipped
//! as a tombstone.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use logq_abi::{PerSource, Source};

use crate::broker::consumer::{Polled, TopicConsumer};
use crate::broker::{KafkaError, Partition, Positions, Record};
use crate::fold::lanes::{LaneUse, MIN_RECORDS_PER_LANE};
use crate::fold::sizing::FIRST_RECORDS;
use crate::fold::{BatchSize, DeadLetter, Reducer, Target, fold_in_lanes};

/// What one step did to the records of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records read.
    pub consumed: u64,
    /// Events the reducer applied.
    pub applied: u64,
    /// Compaction tombstones skipped (null values: nothing to fold, nothing wrong).
    pub tombstones: u64,
    /// Records wholly or partly refused.
    pub refused: u64,
}

/// How far one step moved one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    /// The next offset to read: one past the last record of the step, folded or not.
    pub next: i64,
    /// Events applied from it.
    pub applied: u64,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct Step {
    /// Every partition the batch read from, with how far it moved.
    pub advanced: BTreeMap<Partition, Advance>,
    /// Per stream.
    pub counts: PerSource<Counts>,
    /// Records in the batch.
    pub records: usize,
    /// Reducer calls that failed as a whole (the batch was split around them).
    pub failures: u64,
    /// Time spent in successful reducer calls.
    pub elapsed: Duration,
    /// How the batch was shared among lanes (`None` when nothing was folded).
    pub lanes: Option<LaneUse>,
    /// When its oldest record was stamped, polled and folded.
    pub timing: Timing,
}

/// Where the time of a batch's oldest record went on its way into the target: the
/// freshness breakdown (`logq_event_wait_seconds` of the live loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The oldest record timestamp of the batch (milliseconds since the epoch: the
    /// producer's send or the broker's append); `None` when no record carries one.
    pub stamped_ms: Option<i64>,
    /// When the poll returned the batch.
    pub polled: SystemTime,
    /// When its fold began.
    pub fold_began: SystemTime,
    /// When the target had it.
    pub folded: SystemTime,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            stamped_ms: None,
            polled: UNIX_EPOCH,
            fold_began: UNIX_EPOCH,
            folded: UNIX_EPOCH,
        }
    }
}

impl Timing {
    /// From the oldest record's timestamp to the poll that returned it (zero when
    /// the clocks disagree the other way, or without a timestamp).
    pub fn reach(&self) -> Duration {
        self.since_stamp(self.polled)
    }

    /// From the poll to the start of the fold.
    pub fn queue(&self) -> Duration {
        self.fold_began
            .duration_since(self.polled)
            .unwrap_or_default()
    }

    /// The fold, and the apply to the target.
    pub fn fold(&self) -> Duration {
        self.folded
            .duration_since(self.fold_began)
            .unwrap_or_default()
    }

    /// From the oldest record's timestamp to `then`.
    pub fn since_stamp(&self, then: SystemTime) -> Duration {
        let Some(ms) = self.stamped_ms.and_then(|ms| u64::try_from(ms).ok()) else {
            return Duration::ZERO;
        };
        then.duration_since(UNIX_EPOCH + Duration::from_millis(ms))
            .unwrap_or_default()
    }
}

impl Step {
    /// Moves `positions` on by this step. A partition never moves back.
    pub fn advance(&self, positions: &mut Positions) {
        for (p, a) in &self.advanced {
            let at = positions.entry(*p).or_insert(a.next);
            *at = (*at).max(a.next);
        }
    }

    /// Events applied, both streams.
    pub fn applied(&self) -> u64 {
        self.counts.users.applied + self.counts.organizations.applied
    }

    /// Records refused, both streams.
    pub fn refused(&self) -> u64 {
        self.counts.users.refused + self.counts.organizations.refused
    }
}

/// What a loop does with what a step saw, while the records are still borrowed.
pub trait Observer {
    /// `record` (of `source`) was refused, wholly or partly (`applied` of its events
    /// were applied): the live loop dead-letters it; a replay only counts it.
    fn refused(&mut self, source: Source, record: &Record<'_>, why: &DeadLetter, applied: u64);

    /// The reducer's view of the batch just folded (tombstones left out).
    fn folded(&mut self, _batch: &[logq_abi::Record<'_>]) {}
}

/// Which fold lane a record goes to: a hash of its key (the entity's key when the
/// producer keys by it), else of its partition.
fn route(r: &Record<'_>) -> u64 {
    crate::fold::lanes::route(r.key.unwrap_or(&r.partition.to_le_bytes()))
}

/// Whether a stepper may poll the next batch while one is being folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Overlap polling with folding: for a loop that steps until it is stopped (the
    /// batch polled ahead is the next step's).
    Poll,
    /// Never hold a batch that is not folded: for a loop that stops at a goal and
    /// goes on later with another stepper (a batch polled ahead and dropped would
    /// be skipped, since the client has read past it).
    Never,
}

/// Steps through the topics one batch at a time, for one loop: the live consumer
/// loop or a replay. Sizes its batches by how fast the reducer folds.
pub struct Stepper<'c> {
    consumer: &'c TopicConsumer,
    size: BatchSize,
    max_bytes: usize,
    lanes: usize,
    ahead: Ahead,
    /// The batch polled while the one before it was being folded.
    polled: Option<Result<Polled<'c>, KafkaError>>,
    /// The last batch folded: its messages are given back to the client while the
    /// next batch is folded (16k messages took about 1.3 ms to free, and a
    /// catch-up batch holds up to 64k: time the lanes would otherwise wait for), or
    /// when nothing comes.
    spent: Option<Polled<'c>>,
}

impl<'c> Stepper<'c> {
    /// A stepper reading from `consumer` in batches of at most `max_records` records
    /// and `max_bytes` of values, sized within that by how fast the reducer folds
    /// against its `time_limit` (the first batch, before that is known, at most
    /// [`FIRST_RECORDS`]), folding in up to `lanes` lanes.
    pub fn new(
        consumer: &'c TopicConsumer,
        max_records: usize,
        max_bytes: usize,
        time_limit: Duration,
        lanes: usize,
        ahead: Ahead,
    ) -> Self {
        Self {
            consumer,
            size: BatchSize::new(FIRST_RECORDS, max_records, time_limit),
            max_bytes,
            lanes: lanes.max(1),
            ahead,
            polled: None,
            spent: None,
        }
    }

    /// Polls a batch (waiting up to `wait` for its first record), folds it with
    /// `reducer` into `target` and returns what it did; `Ok(None)` when nothing
    /// arrived. The caller moves its positions on with [`Step::advance`] after the
    /// target has the batch.
    ///
    /// # Errors
    /// A broker error reported instead of a batch (nothing was folded).
    pub fn step<T: Target + Sync>(
        &mut self,
        reducer: &Reducer,
        target: &T,
        wait: Duration,
        observer: &mut dyn Observer,
    ) -> Result<Option<Step>, KafkaError> {
        let (max_records, max_bytes, consumer) = (self.size.get(), self.max_bytes, self.consumer);
        let polled = match self.polled.take() {
            Some(ahead) => ahead?,
            None => consumer.poll(max_records, max_bytes, wait)?,
        };
        let spent = self.spent.take();
        if polled.is_empty() {
            return Ok(None);
        }
        let records = polled.records();
        let ahead = self.ahead == Ahead::Poll;
        let fold_began = SystemTime::now();
        let (mut step, next) = self.fold(&records, reducer, target, observer, || {
            drop(spent);
            ahead.then(|| consumer.poll(max_records, max_bytes, Duration::ZERO))
        });
        step.timing = Timing {
            stamped_ms: polled.oldest_stamp_ms(),
            polled: polled.received(),
            fold_began,
            folded: SystemTime::now(),
        };
        self.polled = next.flatten();
        drop(records);
        self.spent = Some(polled);
        Ok(Some(step))
    }

    /// Folds one polled batch. A batch large enough to share among lanes is folded
    /// on other threads while this one runs `meanwhile` (polls the next batch); a
    /// small one is folded here.
    fn fold<T: Target + Sync, N>(
        &mut self,
        records: &[Record<'_>],
        reducer: &Reducer,
        target: &T,
        observer: &mut dyn Observer,
        meanwhile: impl FnOnce() -> N,
    ) -> (Step, Option<N>) {
        let mut step = Step {
            records: records.len(),
            ..Step::default()
        };
        let mut kept = Vec::with_capacity(records.len());
        let mut batch = Vec::with_capacity(records.len());
        let mut routes = Vec::with_capacity(records.len());
        for r in records {
            let Some(source) = self.consumer.topics().source_of(r.topic) else {
                tracing::error!("record from unexpected topic {} ignored", r.topic);
                continue;
            };
            step.counts.get_mut(source).consumed += 1;
            let p = Partition {
                source,
                id: r.partition,
            };
            // Every record moves its partition on, tombstones too.
            let at = step.advanced.entry(p).or_insert(Advance {
                next: r.offset + 1,
                applied: 0,
            });
            at.next = at.next.max(r.offset + 1);
            match r.for_reducer(source) {
                Some(record) => {
                    routes.push(route(r));
                    kept.push(r);
                    batch.push(record);
                }
                None => step.counts.get_mut(source).tombstones += 1,
            }
        }
        if batch.is_empty() {
            return (step, None);
        }
        let lanes = self.lanes;
        let ((folding, lane_use), next) = if batch.len() >= MIN_RECORDS_PER_LANE {
            std::thread::scope(|s| {
                let fold = s.spawn(|| fold_in_lanes(reducer, target, &batch, &routes, lanes));
                let next = meanwhile();
                let folded = fold
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (folded, Some(next))
            })
        } else {
            (fold_in_lanes(reducer, target, &batch, &routes, lanes), None)
        };
        self.size
            .folded(records.len(), lane_use.used, folding.elapsed);
        step.lanes = Some(lane_use);
        step.failures = folding.failures;
        step.elapsed = folding.elapsed;
        // By the partition read (a re-keyed record's reducer view names its origin).
        for ((r, kept), accepted) in batch.iter().zip(&kept).zip(&folding.accepted) {
            step.counts.get_mut(r.source).applied += accepted;
            let p = Partition {
                source: r.source,
                id: kept.partition,
            };
            if let Some(a) = step.advanced.get_mut(&p) {
                a.applied += accepted;
            }
        }
        for d in &folding.dead {
            let source = batch[d.input].source;
            step.counts.get_mut(source).refused += 1;
            observer.refused(source, kept[d.input], d, folding.accepted[d.input]);
        }
        observer.folded(&batch);
        (step, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_timing_splits_the_wait_from_the_stamp_and_never_goes_negative() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(1_000_000 + ms);
        let timing = Timing {
            stamped_ms: Some(1_000_000),
            polled: at(12),
            fold_began: at(13),
            folded: at(16),
        };
        assert_eq!(timing.reach(), Duration::from_millis(12));
        assert_eq!(timing.queue(), Duration::from_millis(1));
        assert_eq!(timing.fold(), Duration::from_millis(3));
        assert_eq!(timing.since_stamp(at(20)), Duration::from_millis(20));
        // A producer whose clock runs ahead of the host's: zero, not a panic.
        let ahead = Timing {
            stamped_ms: Some(1_000_050),
            ..timing
        };
        assert_eq!(ahead.reach(), Duration::ZERO);
        // No timestamp: nothing to measure from.
        let unstamped = Timing {
            stamped_ms: None,
            ..timing
        };
        assert_eq!(unstamped.since_stamp(at(20)), Duration::ZERO);
    }
}
