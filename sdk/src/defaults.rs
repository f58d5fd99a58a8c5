//! The default rules (the `logq-reducer` crate, as the README describes them) with
//! the author's [`Tweak`] applied to every answer they render.
//!
//! Each state holds the default rules' own state unchanged, followed by the tweaked
//! answer: the rules fold exactly as they do alone, and the answer costs its bytes
//! once more per entity. States of the default reducer itself are read as they are,
//! so a forward swap from it keeps the state; back to it takes a replay.

use logq_abi::{Kind, Plan, Record, Update};

use crate::{Answer, Folder, lay_out, parts, range};

/// The tag of a tweaked state's layout.
const TAG: &[u8; 4] = b"lqt1";

/// What changes of the default rules: their answers. Both methods leave the answer as
/// it is unless you override them. The answer of a user is its members without
/// `organization`, which the host joins in.
pub trait Tweak: Default + 'static {
    /// Changes a user's answer (add, mask or drop members).
    fn user(&self, answer: &mut Answer) {
        let _ = answer;
    }

    /// Changes an organization's answer.
    fn organization(&self, answer: &mut Answer) {
        let _ = answer;
    }
}

/// The default rules' batch with `T` applied to its answers: a [`Folder`].
pub struct Defaults<T> {
    inner: logq_reducer::Batch,
    tweak: T,
}

impl<T: Tweak> Folder for Defaults<T> {
    fn new(records: &[Record<'_>]) -> Self {
        Self {
            inner: logq_reducer::Batch::new(records),
            tweak: T::default(),
        }
    }

    fn plan(&self) -> &Plan {
        self.inner.plan()
    }

    fn fold(&self, prior: &[Option<&[u8]>]) -> Result<Vec<Update>, String> {
        // The default rules see their own states, as if they ran alone. A state
        // without the tag is theirs already: a forward swap from the default reducer
        // to a tweak keeps every state.
        let inner_prior = prior
            .iter()
            .map(|p| match p {
                Some(bytes) if bytes.starts_with(TAG) => parts(TAG, bytes, 2).map(|p| Some(p[0])),
                other => Ok(*other),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let updates = self.inner.fold(&inner_prior)?;
        self.plan()
            .entities
            .iter()
            .zip(updates)
            .map(|(entity, update)| self.tweaked(entity.kind, update))
            .collect()
    }
}

impl<T: Tweak> Defaults<T> {
    fn tweaked(&self, kind: Kind, update: Update) -> Result<Update, String> {
        let Some(state) = update.state.as_deref() else {
            return Ok(update);
        };
        let answer = match update.view() {
            Some(view) => {
                let mut answer = Answer::parse(view)
                    .map_err(|e| format!("the default rules' answer is not an object: {e}"))?;
                match kind {
                    Kind::User => self.tweak.user(&mut answer),
                    Kind::Organization => self.tweak.organization(&mut answer),
                }
                Some(answer.to_json())
            }
            None => None,
        };
        let view_bytes = answer.as_deref().unwrap_or_default().as_bytes();
        let (bytes, starts) = lay_out(TAG, &[state, view_bytes]);
        let shift = starts[0];
        Ok(Update {
            view: answer.as_ref().map(|a| range(starts[1], a.len())),
            join: update.join.as_ref().map(|j| j.start + shift..j.end + shift),
            clock: update.clock,
            state: Some(bytes),
        })
    }
}
