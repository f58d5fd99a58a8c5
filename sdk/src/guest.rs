//! The WIT glue, for `wasm32` only: bindings generated once here, and one resource
//! type for every [`Folder`]. The export macros name them; nothing else does.

// The generated export glue is `unsafe` (it is the canonical ABI); nothing else is.
#![allow(unsafe_code, missing_docs)]

wit_bindgen::generate!({
    world: "reducer",
    path: "../wit",
    pub_export_macro: true,
    default_bindings_module: "logq_reducer_sdk::guest",
});

use exports::logq::reducer::fold as wit;

use crate::Folder;

/// The `batch` resource around a [`Folder`].
pub struct Resource<F>(F);

impl<F: Folder> wit::GuestBatch for Resource<F> {
    fn new(records: Vec<u8>) -> Self {
        // The host frames the records; broken framing is a host bug: trap.
        let records = logq_abi::records::decode(&records).unwrap_or_else(|e| panic!("{e}"));
        Self(F::new(&records))
    }

    fn plan(&self) -> wit::Plan {
        let plan = self.0.plan();
        wit::Plan {
            entities: logq_abi::entities::encode(&plan.entities),
            entity_count: u32::try_from(plan.entities.len()).unwrap_or(u32::MAX),
            rejections: plan
                .rejections
                .iter()
                .map(|r| wit::Rejection {
                    input: r.input,
                    event: r.event,
                    reason: r.reason.clone(),
                })
                .collect(),
            accepted: plan.accepted.clone(),
        }
    }

    fn fold(&self, prior: Vec<u8>) -> Result<Vec<u8>, String> {
        let states = logq_abi::prior::decode(&prior)?;
        Ok(logq_abi::updates::encode(&self.0.fold(&states)?))
    }
}
