//! The wasm-facing layer: exports [`crate::Batch`] through the WIT world. Nothing but
//! type conversion lives here, so everything that matters is testable natively.

// The generated export glue is `unsafe` (it is the canonical ABI); nothing else is.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    world: "reducer",
    path: "../wit",
});

use exports::logq::reducer::fold as wit;

struct Component;

impl wit::Guest for Component {
    type Batch = GuestBatch;
}

/// The resource behind `batch`: the decoded batch, held between `plan` and `fold`.
struct GuestBatch(crate::Batch);

impl wit::GuestBatch for GuestBatch {
    fn new(records: Vec<u8>) -> Self {
        #[cfg(feature = "test-triggers")]
        crate::test_triggers::misbehave(&records);
        // The host frames the records; broken framing is a host bug: trap.
        Self(crate::Batch::from_records(&records).unwrap_or_else(|e| panic!("{e}")))
    }

    fn plan(&self) -> wit::Plan {
        let plan = self.0.plan();
        wit::Plan {
            entities: self.0.entities_framed(),
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
        self.0.fold_framed(&prior)
    }
}

export!(Component);
