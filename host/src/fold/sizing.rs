//! How many records the next batch may hold: as many as fit in a fraction of the
//! reducer's time limit at the rate the last full batch was folded, within the
//! configured bounds.
//!
//! Large batches pay while catching up: each entity's state is decoded and encoded
//! once per batch, not once per event, and the per-call costs are shared by more
//! records. When following the topics live, a poll returns what has arrived, so
//! batches are small by themselves; the bound only matters when records are
//! waiting. A slow reducer (a JavaScript one folds about 6k events/s) gets batches
//! it can fold well within its time limit instead of failing them.

use std::time::Duration;

/// Share of the time limit one call is sized to take.
const SHARE_OF_TIME_LIMIT: u32 = 8;

/// The bound on a first batch, before the reducer's speed is known (the live loop's
/// and a replay's alike).
pub const FIRST_RECORDS: usize = 2000;

/// The smallest bound it goes down to.
pub const MIN_RECORDS: usize = 256;

/// The bound on the records of the next batch.
#[derive(Debug, Clone)]
pub struct BatchSize {
    max: usize,
    target: Duration,
    now: usize,
}

impl BatchSize {
    /// Starts at `start` records, never above `max`; calls are sized to take an
    /// eighth of `time_limit`.
    pub fn new(start: usize, max: usize, time_limit: Duration) -> Self {
        let max = max.max(1);
        Self {
            max,
            target: time_limit / SHARE_OF_TIME_LIMIT,
            now: start.clamp(MIN_RECORDS.min(max), max),
        }
    }

    /// Records the next batch may hold.
    pub fn get(&self) -> usize {
        self.now
    }

    /// After a batch of `records` folded in `lanes` lanes, whose reducer calls took
    /// `elapsed` in all: moves halfway to what fits the target. Only full batches
    /// say how fast the reducer is (a partial one was cut short by the topics).
    pub fn folded(&mut self, records: usize, lanes: usize, elapsed: Duration) {
        if records < self.now || elapsed.is_zero() {
            return;
        }
        let per_second = records as f64 / elapsed.as_secs_f64();
        let fits = per_second * self.target.as_secs_f64() * lanes.max(1) as f64;
        let next = (self.now as f64 + fits) / 2.0;
        self.now = (next as usize).clamp(MIN_RECORDS.min(self.max), self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_for_a_fast_reducer_and_shrinks_for_a_slow_one_within_bounds() {
        let limit = Duration::from_secs(2);
        let mut fast = BatchSize::new(2000, 65_536, limit);
        // 300k records/s in one lane: a quarter second fits 75k, above the bound.
        for _ in 0..20 {
            let n = fast.get();
            fast.folded(n, 1, Duration::from_secs_f64(n as f64 / 300_000.0));
        }
        assert_eq!(fast.get(), 65_536);
        let mut slow = BatchSize::new(65_536, 65_536, limit);
        // 6k records/s: a quarter second fits 1,500.
        for _ in 0..30 {
            let n = slow.get();
            slow.folded(n, 1, Duration::from_secs_f64(n as f64 / 6_000.0));
        }
        assert!((1400..=1600).contains(&slow.get()), "{}", slow.get());
        // Two lanes fold twice as many in the same time.
        let mut two = BatchSize::new(1500, 65_536, limit);
        for _ in 0..30 {
            let n = two.get();
            two.folded(n, 2, Duration::from_secs_f64(n as f64 / 6_000.0));
        }
        assert!((2900..=3100).contains(&two.get()), "{}", two.get());
        // A partial batch says nothing.
        let before = two.get();
        two.folded(10, 2, Duration::from_secs(1));
        assert_eq!(two.get(), before);
        // Never below the floor.
        let mut stuck = BatchSize::new(300, 65_536, limit);
        stuck.folded(300, 1, Duration::from_secs(100));
        assert_eq!(stuck.get(), MIN_RECORDS);
    }
}
