//! Where the consumer loop stands: readiness (caught up with the high watermarks seen
//! at start), consumer lag, and what `/readyz` says meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::broker::consumer::Watermarks;
use crate::broker::{Partition, Positions, Topics};
use crate::metrics::Metrics;

/// Catch-up tracking: which partitions are still below their start watermark.
pub struct CatchUp {
    metrics: Arc<Metrics>,
    topics: Topics,
    /// High watermark at start, per partition (for the lag estimate between refreshes).
    highs: BTreeMap<Partition, i64>,
    /// Partitions not caught up yet, with the offset they must reach.
    pending: HashMap<Partition, i64>,
    started: Instant,
    applied: u64,
    /// Why the host is not ready whatever the partitions say (see [`CatchUp::hold`]).
    waiting: Option<String>,
    /// Why the users' partitions are all behind: the re-key stage has not caught up
    /// with the users topic yet (see [`CatchUp::wait_for_stage`]).
    stage: Option<String>,
}

impl CatchUp {
    /// Tracks `targets` from `positions`, and says so.
    pub fn new(
        metrics: Arc<Metrics>,
        topics: Topics,
        targets: &BTreeMap<Partition, Watermarks>,
        positions: &Positions,
    ) -> Self {
        let me = Self {
            pending: targets
                .iter()
                .filter(|(p, w)| w.high > positions[*p])
                .map(|(p, w)| (*p, w.high))
                .collect(),
            highs: targets.iter().map(|(p, w)| (*p, w.high)).collect(),
            metrics,
            topics,
            started: Instant::now(),
            applied: 0,
            waiting: None,
            stage: None,
        };
        me.report();
        me
    }

    /// Also tracks partition `p` (given to this host by its group), from `from`,
    /// until it reaches `high`.
    pub fn track(&mut self, p: Partition, high: i64, from: i64) {
        self.highs.insert(p, high);
        if high > from {
            self.pending.insert(p, high);
        }
        self.waiting = None;
        self.report();
    }

    /// No longer tracks partition `p` (it went to another host).
    pub fn forget(&mut self, p: Partition) {
        self.highs.remove(&p);
        self.pending.remove(&p);
        self.metrics.forget_lag(self.topics.name(p.source), p.id);
        self.report();
    }

    /// Not ready, whatever the partitions say, until [`CatchUp::track`] or
    /// [`CatchUp::release`]: `why`.
    pub fn hold(&mut self, why: &str) {
        self.waiting = Some(why.to_owned());
        self.report();
    }

    /// Ends a [`CatchUp::hold`].
    pub fn release(&mut self) {
        self.waiting = None;
        self.report();
    }

    /// Not ready, and every users partition behind, until
    /// [`CatchUp::stage_caught_up`]: the re-key stage has not written the users
    /// topic's history into the partitions yet, so a user missing here may exist.
    pub fn wait_for_stage(&mut self, why: &str) {
        self.stage = Some(why.to_owned());
        self.report();
    }

    /// Ends [`CatchUp::wait_for_stage`]; the caller tracks the partitions again
    /// against their watermarks now.
    pub fn stage_caught_up(&mut self) {
        self.stage = None;
        self.report();
    }

    /// Whether partition `p` has not caught up yet.
    pub fn is_behind(&self, p: Partition) -> bool {
        self.pending.contains_key(&p)
            || (self.stage.is_some() && p.source == logq_abi::Source::Users)
    }

    /// Whether every tracked partition has caught up (and nothing holds readiness).
    pub fn caught_up(&self) -> bool {
        self.pending.is_empty() && self.waiting.is_none() && self.stage.is_none()
    }

    /// A batch moved partition `p` to `next`.
    pub fn advanced(&mut self, p: Partition, next: i64) {
        if self.pending.get(&p).is_some_and(|high| next >= *high) {
            self.pending.remove(&p);
        }
        // Until the next refresh from the broker, the start watermark is the best
        // estimate of the lag.
        if let Some(high) = self.highs.get(&p) {
            self.metrics
                .set_lag(self.topics.name(p.source), p.id, high - next);
        }
    }

    /// A batch applied `events` events; readiness is re-evaluated. Returns whether
    /// this made the host ready.
    pub fn applied(&mut self, events: u64) -> bool {
        self.applied += events;
        if self.metrics.status().0 {
            return false;
        }
        self.report();
        self.metrics.status().0
    }

    fn report(&self) {
        if let Some(why) = self.stage.as_ref().or(self.waiting.as_ref()) {
            self.metrics.set_status(false, why.clone());
        } else if self.pending.is_empty() {
            let secs = self.started.elapsed().as_secs_f64();
            tracing::info!(
                "caught up: {} events folded in {secs:.3} s ({:.0} events/s)",
                self.applied,
                self.applied as f64 / secs.max(1e-9)
            );
            self.metrics.set_status(true, "caught up");
            crate::memory::trim();
        } else {
            self.metrics.set_status(
                false,
                format!(
                    "replaying: {} partitions not caught up yet",
                    self.pending.len()
                ),
            );
        }
    }
}
