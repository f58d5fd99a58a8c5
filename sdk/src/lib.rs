//! Write a `logq` reducer in plain Rust.
//!
//! A reducer folds the user and organization events of the log into one state per
//! entity and renders each state's JSON answer. The host owns the states, hands a
//! batch of records and the prior states across the WIT boundary, and stores what
//! comes back. This crate does all of that plumbing (record framing, the plan, the
//! state encoding, rejections that become dead letters, the WIT export); you write one
//! of two things:
//!
//! - a [`Reducer`]: your own state type (anything serde can serialize), which entity
//!   an event belongs to, how an event changes a state, and how a state answers; export
//!   it with [`export_reducer!`];
//! - a [`Tweak`] of the default rules (the ones the README describes): change the
//!   answer they render (add, mask or drop a field) and nothing else; export it with
//!   [`export_tweak!`].
//!
//! ```ignore
//! #[derive(Default)]
//! struct MaskEmails;
//!
//! impl logq_reducer_sdk::Tweak for MaskEmails {
//!     fn user(&self, answer: &mut logq_reducer_sdk::Answer) {
//!         if let Some(email) = answer.get_str("user_email") {
//!             let masked = format!("{}***", &email[..1]);
//!             answer.set("user_email", masked);
//!         }
//!     }
//! }
//!
//! logq_reducer_sdk::export_tweak!(MaskEmails);
//! ```
//!
//! Build it with `logq reducer build` (cargo for `wasm32-unknown-unknown`, then the
//! component encoding and the same checks a hot swap runs).
//!
//! Everything runs natively too: [`native`] folds with your code and no wasm, which is
//! how you unit-test a reducer (see the examples under `examples/`).

mod answer;
mod custom;
mod defaults;
pub mod native;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

pub use answer::Answer;
pub use custom::{Custom, Event, Reducer};
pub use defaults::{Defaults, Tweak};
pub use logq_abi::{Entity, Kind, Plan, Record, Source, Update};
pub use serde_json::{self, Value, json};

/// One batch as the WIT `batch` resource sees it: decoded once, planned, folded.
/// [`Custom`] (your [`Reducer`]) and [`Defaults`] (the default rules with your
/// [`Tweak`]) implement it; the export macros and [`native`] drive it.
pub trait Folder: 'static {
    /// Decodes the records of a batch; what cannot be decoded becomes a rejection.
    fn new(records: &[Record<'_>]) -> Self;
    /// The entities the batch touches, the refused events, the accepted counts.
    fn plan(&self) -> &Plan;
    /// Folds the batch into `prior` (one entry per entity of the plan, in order).
    ///
    /// # Errors
    /// Why the batch cannot be folded; the host then folds its records one by one
    /// and dead-letters the one that fails, with this reason.
    fn fold(&self, prior: &[Option<&[u8]>]) -> Result<Vec<Update>, String>;
}

/// Exports a [`Reducer`] as the component's fold: `export_reducer!(MyReducer);` at
/// the root of a `cdylib` crate built for `wasm32-unknown-unknown`.
#[macro_export]
macro_rules! export_reducer {
    ($reducer:ty) => {
        $crate::__export_folder!($crate::Custom<$reducer>);
    };
}

/// Exports the default rules with a [`Tweak`] as the component's fold:
/// `export_tweak!(MyTweak);`.
#[macro_export]
macro_rules! export_tweak {
    ($tweak:ty) => {
        $crate::__export_folder!($crate::Defaults<$tweak>);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_folder {
    ($folder:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct LogqReducerComponent;
            impl $crate::guest::exports::logq::reducer::fold::Guest for LogqReducerComponent {
                type Batch = $crate::guest::Resource<$folder>;
            }
    $crate::guest::export!(LogqReducerComponent with_types_in $crate::guest);
        };
    };
}

/// The state bytes of one entity as this crate lays them out: a 4-byte tag naming
/// the layout, then `parts` one after another; returns the bytes and where each part
/// starts. The view and join ranges the host reads point inside these bytes.
fn lay_out(tag: &[u8; 4], parts: &[&[u8]]) -> (Vec<u8>, Vec<u32>) {
    let mut out = Vec::with_capacity(4 + parts.iter().map(|p| 4 + p.len()).sum::<usize>());
    out.extend_from_slice(tag);
    let mut starts = Vec::with_capacity(parts.len());
    for part in parts {
        logq_abi::put_u32(&mut out, u32::try_from(part.len()).unwrap_or(u32::MAX));
        starts.push(u32::try_from(out.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(part);
    }
    (out, starts)
}

/// The parts of state bytes [`lay_out`] wrote with `tag`.
fn parts<'a>(tag: &[u8; 4], bytes: &'a [u8], count: usize) -> Result<Vec<&'a [u8]>, String> {
    let Some(rest) = bytes.strip_prefix(tag.as_slice()) else {
        return Err(format!(
            "a state this reducer did not write (it starts with {:?}, not {:?}): swap it in with mode=replay",
            String::from_utf8_lossy(&bytes[..bytes.len().min(4)]),
            String::from_utf8_lossy(tag)
        ));
    };
    let mut reader = logq_abi::Reader::new(rest);
    (0..count).map(|_| reader.frame()).collect()
}

/// A range of `len` bytes from `start`, as the host reads it.
fn range(start: u32, len: usize) -> std::ops::Range<u32> {
    start..start.saturating_add(u32::try_from(len).unwrap_or(u32::MAX))
}
