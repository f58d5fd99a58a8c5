//! `logq`: consumes user and organization events from a Kafka-API log, folds them in a
//! sandboxed WebAssembly reducer, keeps the latest joined state in memory and serves it
//! over HTTP.
//!
//! The modules follow the data path, and each may import only those above it here
//! (`tests/layering.rs` checks it):
//!
//! | layer | module | what |
//! |---|---|---|
//! | 0 | [`config`], [`memory`] | flags; giving memory back to the OS |
//! | 1 | [`broker`] | the only rdkafka user: records in, dead letters out |
//! | 2 | [`fold`] | the only wasmtime user: records -> entity updates |
//! | 3 | [`state`] | the store, the join, snapshots |
//! | 3 | [`step`] | one batch: poll -> fold -> apply -> advance, for the live loop and replays |
//! | 4 | [`metrics`] | counters and readiness |
//! | 5 | [`reducers`] | which reducer is active; swaps, replays, the watcher (commands only) |
//! | 6 | [`consumer`] | the loop: the one writer of the store and the active reducer |
//! | 7 | [`http`] | the only warp/hyper user: reads and admin |
//! | 8 | [`service`] | `run`: wires it all |
//! | 9 | [`cli`] | `produce`, `dev`, `reducer check` |

pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod consumer;
pub mod fold;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod reducers;
pub mod service;
pub mod state;
pub mod step;

pub use service::{run, shutdown_signal};
