//! The fold: records in, entity updates out. Second stage of the data path.
//!
//! - [`runtime`]: compiles and runs reducer components (the only wasmtime user);
//! - [`lanes`]: one batch folded by several reducer instances at once, with the
//!   result of one;
//! - [`sizing`]: how large the next batch may be;
//! - [`batch`]: how a batch is folded into a [`Target`], and what happens when the
//!   reducer cannot fold it as a whole (split until each bad record costs only
//!   itself).
//!
//! It knows nothing of the broker or of where states are kept: a [`Target`] lends
//! the prior states and takes the updates.

pub mod batch;
pub mod lanes;
pub mod runtime;
pub mod sizing;

pub use batch::{DeadLetter, Folding, Lend, Note, Target, fold_into};
pub use lanes::fold_in_lanes;
pub use runtime::{
    DEFAULT_REDUCER, Limits, Reducer, ReducerError, ReducerMeta, Runtime, sha256_hex,
};
pub use sizing::BatchSize;
