//! What the rest of the service asks of the consumer loop, the one writer of the
//! active reducer and the store. Commands are applied between two batches, in the
//! order they arrive; nothing else calls into the loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use super::active::{Active, ReducerInfo};
use super::replay::Tail;
use crate::fold::ReducerError;

/// A request to the consumer loop.
pub enum Command {
    /// Fold with `active` from the next batch on (forward swap, file watch).
    Activate {
        /// The swap this is.
        swap: u64,
        /// The new reducer.
        active: Arc<Active>,
        /// Where the loop says what it did.
        done: Reply,
    },
    /// A replay (or a rollback, which is a replay of the previous reducer) has caught
    /// up with the log: read the last records up to where the loop stands, then flip
    /// state and reducer together (unless it was cancelled or superseded meanwhile).
    Handover(Box<Tail>),
}

/// The loop's answer to a forward swap.
pub type Reply = SyncSender<Result<Switched, SwapError>>;

/// What a forward swap did, as the loop saw it.
#[derive(Debug, Clone)]
pub struct Switched {
    /// The reducer now active.
    pub active: ReducerInfo,
    /// The next offset of every partition when it took effect.
    pub offsets: BTreeMap<String, i64>,
    /// Visible answers that earlier reducers rendered, at that moment.
    pub stale_answers: usize,
}

/// Why a candidate was not swapped in, or a rollback not done.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// Not WebAssembly at all.
    #[error("{0}")]
    NotWasm(ReducerError),
    /// Does not compile or does not match the world.
    #[error("{0}")]
    Invalid(ReducerError),
    /// Trapped or hit a limit on the canary events.
    #[error("canary failed: {0}")]
    Canary(String),
    /// Another swap or replay is in progress.
    #[error("{0}")]
    Busy(String),
    /// Nothing to roll back to.
    #[error("there is no previous reducer to roll back to")]
    NoPrevious,
    /// The consumer loop has stopped (the service is shutting down).
    #[error("the consumer loop has stopped; nothing was changed")]
    Stopped,
}
