//! The wasm-facing layer: exports [`crate::Batch`] through the WIT world. Nothing but
//! type conversion lives here, so everything that matters is testable natively.

// The generated export glue is `unsafe` (it is the canonical ABI); nothing else is.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    world: "explaining-reducer",
    path: "../wit",
});

use exports::logq::reducer::fold as wit;

struct Component;

impl wit::Guest for Component {
    type Batch = GuestBatch;
}

/// The resource behind `batch`: the decoded batch, held between `plan` and `fold`.
struct GuestBatch {
    batch: crate::Batch,
    /// The test fixture's misbehaviour asked for by a record, if any.
    #[cfg(feature = "test-triggers")]
    trigger: Option<(crate::test_triggers::Behaviour, crate::test_triggers::Phase)>,
}

impl GuestBatch {
    /// The test fixture's behaviour for `phase`, if a record asked for one there.
    #[cfg(feature = "test-triggers")]
    fn trigger(
        &self,
        phase: crate::test_triggers::Phase,
    ) -> Option<crate::test_triggers::Behaviour> {
        let (behaviour, at) = self.trigger?;
        (at == phase).then(|| {
            crate::test_triggers::misbehave(behaviour);
            behaviour
        })
    }
}

impl wit::GuestBatch for GuestBatch {
    fn new(records: Vec<u8>) -> Self {
        #[cfg(feature = "test-triggers")]
        let trigger = crate::test_triggers::requested(&records);
        #[cfg(feature = "test-triggers")]
        if let Some((behaviour, crate::test_triggers::Phase::Constructor)) = trigger {
            crate::test_triggers::misbehave(behaviour);
        }
        Self {
            // The host frames the records; broken framing is a host bug: trap.
            batch: crate::Batch::from_records(&records).unwrap_or_else(|e| panic!("{e}")),
            #[cfg(feature = "test-triggers")]
            trigger,
        }
    }

    fn plan(&self) -> wit::Plan {
        let plan = self.batch.plan();
        #[allow(unused_mut)]
        let mut accepted = plan.accepted.clone();
        #[cfg(feature = "test-triggers")]
        if self.trigger(crate::test_triggers::Phase::Plan).is_some() {
            // Broken contract: counts for one record too few.
            accepted.pop();
        }
        wit::Plan {
            entities: self.batch.entities_framed(),
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
            accepted,
        }
    }

    fn fold(&self, prior: Vec<u8>) -> Result<Vec<u8>, String> {
        #[allow(unused_mut)]
        let mut out = self.batch.fold_framed(&prior)?;
        #[cfg(feature = "test-triggers")]
        if self.trigger(crate::test_triggers::Phase::Fold).is_some() {
            // Broken contract: the last update cut short.
            out.pop();
        }
        Ok(out)
    }
}

impl exports::logq::reducer::explain::Guest for Component {
    fn explain(kind: u8, key: String, state: Vec<u8>) -> Result<String, String> {
        crate::explain::explain(kind, &key, &state)
    }
}

export!(Component);
