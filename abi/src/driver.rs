//! The one driver of a fold for tests and tools: batch -> plan -> prior -> fold ->
//! apply, against an in-memory map of entity states. The reducer's own tests, the
//! differential tests, the fuzz targets, the benchmark and the end-to-end harness all
//! fold through [`Model::apply`], with the native fold or with a component.

use std::collections::HashMap;

use crate::{Entity, Fold, Kind, Plan, Record, States, Update};

/// Every entity's latest update, as a host would keep it (without the join).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    // A hash map, as in the host: the benchmark's fold figures go through here.
    entities: HashMap<Entity, Update>,
}

impl Model {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one batch with `fold` and keeps the updates (an update without a state
    /// forgets its entity). Returns the fold's plan.
    ///
    /// # Errors
    /// When `fold` fails on the batch as a whole; the model is unchanged then.
    pub fn apply<F: Fold + ?Sized>(
        &mut self,
        fold: &F,
        records: &[Record<'_>],
    ) -> Result<Plan, F::Error> {
        let folded = fold.fold(records, self)?;
        for (entity, update) in folded.plan.entities.iter().zip(folded.updates) {
            if update.state.is_some() {
                self.entities.insert(entity.clone(), update);
            } else {
                self.entities.remove(entity);
            }
        }
        Ok(folded.plan)
    }

    /// The latest update of an entity, if it is kept.
    pub fn get(&self, kind: Kind, key: &str) -> Option<&Update> {
        self.entities.get(&Entity {
            kind,
            key: key.to_owned(),
        })
    }

    /// Every kept entity, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Entity, &Update)> {
        self.entities.iter()
    }

    /// How many entities are kept.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }
}

/// No prior states: a host that has never seen the entities (a canary, a check).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPrior;

impl States for NoPrior {
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        for _ in entities {
            each(None);
        }
    }
}

impl States for Model {
    fn states(&self, entities: &[Entity], each: &mut dyn FnMut(Option<&[u8]>)) {
        for e in entities {
            each(self.entities.get(e).and_then(|u| u.state.as_deref()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Folded, Source};

    /// A fold that keys each record by its value and keeps the record count as the
    /// state: enough to see what the driver hands in and keeps.
    struct Count;

    impl Fold for Count {
        type Error = String;
        fn fold(&self, records: &[Record<'_>], states: &dyn States) -> Result<Folded, String> {
            let entities: Vec<Entity> = records
                .iter()
                .map(|r| Entity {
                    kind: Kind::User,
                    key: String::from_utf8_lossy(r.value).into_owned(),
                })
                .collect();
            let mut updates = Vec::new();
            states.states(&entities, &mut |prior| {
                let n = prior.map_or(0, |s| s[0]) + 1;
                // The third sighting forgets the entity.
                updates.push(Update {
                    state: (n < 3).then(|| vec![n]),
                    view: None,
                    join: None,
                    clock: None,
                });
            });
            Ok(Folded {
                plan: Plan {
                    entities,
                    rejections: vec![],
                    accepted: vec![1; records.len()],
                },
                updates,
            })
        }
    }

    #[test]
    fn the_model_hands_back_what_it_kept_and_forgets_on_request() {
        let mut model = Model::new();
        let a = Record::sequence([(Source::Users, &b"a"[..])]);
        model.apply(&Count, &a).unwrap();
        model.apply(&Count, &a).unwrap();
        assert_eq!(model.get(Kind::User, "a").unwrap().state, Some(vec![2]));
        model.apply(&Count, &a).unwrap();
        assert!(model.get(Kind::User, "a").is_none());
        assert!(model.is_empty());
    }
}
