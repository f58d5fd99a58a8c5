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
    fn new(inputs: Vec<wit::Input>) -> Self {
        #[cfg(feature = "test-triggers")]
        for i in &inputs {
            crate::test_triggers::misbehave(&i.value);
        }
        Self(crate::Batch::new(inputs.iter().map(|i| {
            let source = match i.source {
                wit::Source::Users => crate::Source::Users,
                wit::Source::Organizations => crate::Source::Organizations,
            };
            (source, i.value.as_slice())
        })))
    }

    fn plan(&self) -> wit::Plan {
        let plan = self.0.plan();
        wit::Plan {
            entities: plan
                .entities
                .iter()
                .map(|e| wit::Entity {
                    kind: match e.kind {
                        crate::Kind::User => wit::Kind::User,
                        crate::Kind::Organization => wit::Kind::Organization,
                    },
                    key: e.key.clone(),
                })
                .collect(),
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

    fn fold(&self, prior: Vec<Option<Vec<u8>>>) -> Result<Vec<wit::Update>, String> {
        let prior: Vec<Option<&[u8]>> = prior.iter().map(Option::as_deref).collect();
        let updates = self.0.fold(&prior)?;
        Ok(updates
            .into_iter()
            .map(|u| wit::Update {
                state: u.state,
                view: u.view,
                join: u.join,
            })
            .collect())
    }
}

export!(Component);
