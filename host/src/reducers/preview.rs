//! Swap preview: what a candidate reducer would do to the answers, learned before
//! anything changes. A preview is a replay (`PUT /admin/reducer?mode=preview`): the
//! candidate folds the log from the earliest offsets into a shadow state, with the
//! same machinery and the same handover. Where a replay would flip, the consumer loop
//! compares the shadow with the live state at the same position (it reads the tail
//! up to its own position first, between two batches) and keeps the [`Report`] in
//! the swap's history entry; the shadow is dropped at once. A preview never writes a
//! dead letter (a replay never does), never touches the live state, the position or
//! the active reducer, and is cancelled like a replay.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::broker::{Partition, Positions};
use crate::state::StateStore;
use crate::state::export::Export;
use crate::state::refused::Refused;

/// Samples kept per category.
pub const SAMPLES: usize = 5;

/// Refused records kept with their reason per category.
pub const REFUSALS: usize = 20;

/// An answer before and after.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Sample {
    /// The user id or organization key.
    pub id: String,
    /// The live answer (`None`: not visible now).
    pub before: Option<serde_json::Value>,
    /// The candidate's answer (`None`: it would not show it).
    pub after: Option<serde_json::Value>,
    /// The difference: each top-level field whose value differs, before and after
    /// (a side is left out where the field or the answer is absent).
    pub diff: BTreeMap<String, FieldChange>,
}

/// One field's value before and after; a side without the field (or without an
/// answer) is left out.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldChange {
    /// In the live answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    /// In the candidate's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

/// How the answers of one kind of entity would change.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Changes {
    /// Ids visible in either state.
    pub compared: usize,
    /// The same answer, byte for byte.
    pub unchanged: usize,
    /// Visible in both, another answer.
    pub changed: usize,
    /// Visible only with the candidate.
    pub newly_visible: usize,
    /// Visible now, not with the candidate (deleted or refused).
    pub newly_hidden: usize,
    /// Top-level fields that differ, with how many answers differ in each (an
    /// answer that appears or disappears counts for each of its fields).
    pub fields: BTreeMap<String, usize>,
    /// Up to [`SAMPLES`] ids per category.
    pub samples: BTreeMap<&'static str, Vec<Sample>>,
}

/// A refused record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Refusal {
    /// `topic/partition`.
    pub partition: String,
    /// Its offset.
    pub offset: i64,
    /// Why, in the reducer's words (the candidate's for a refusal it would add, the
    /// live reducer's for one it would remove).
    pub reason: String,
}

/// How the refused records (the dead letters) would change: the live reducer's
/// refusals against the candidate's, over the same records.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeadLetterChanges {
    /// Refused by both.
    pub unchanged: usize,
    /// Refused by the candidate, folded by the live reducer.
    pub added: usize,
    /// Refused by the live reducer, folded by the candidate.
    pub removed: usize,
    /// Whether both sides kept every refusal (each keeps at most
    /// [`crate::state::refused::LIMIT`]); when not, the counts are lower bounds.
    pub complete: bool,
    /// Up to [`REFUSALS`] records per category (`added`, `removed`), in log order.
    pub samples: BTreeMap<&'static str, Vec<Refusal>>,
}

/// What a preview found, kept in its history entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// The position both states were compared at (`topic/partition` -> next offset).
    pub position: BTreeMap<String, i64>,
    /// The users' answers (as `GET /users/{id}` gives them, joined).
    pub users: Changes,
    /// The organizations' answers.
    pub organizations: Changes,
    /// Records the candidate refused while folding the whole log.
    pub records_refused: u64,
    /// Its refusals against the live reducer's.
    pub dead_letters: DeadLetterChanges,
    /// Seconds from the request to the report.
    pub seconds: f64,
    /// The process's resident memory when the report was written (both states
    /// held), bytes.
    pub rss_bytes: Option<u64>,
    /// Seconds the comparison took, on its own thread (the loop goes on).
    pub compare_seconds: f64,
    /// Seconds the consumer loop spent on the handover, folding nothing: reading
    /// the tail up to its position and freezing the live answers there.
    pub loop_seconds: f64,
}

/// Compares the answers of `live` (frozen at the preview's position, while the
/// consumer loop goes on) and `candidate`, entity by entity, in key order, so the
/// samples are the first ids of each category. The users are split among the cores
/// but one, which the consumer loop keeps.
pub fn compare(live: &Export, candidate: &StateStore) -> (Changes, Changes) {
    let keys = sorted(
        live.user_keys()
            .iter()
            .map(Box::from)
            .chain(candidate.user_keys()),
    );
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .saturating_sub(1)
        .clamp(1, 4);
    let chunk = keys.len().div_ceil(threads).max(1);
    let parts: Vec<Changes> = std::thread::scope(|s| {
        let running: Vec<_> = keys
            .chunks(chunk)
            .map(|part| s.spawn(move || changes(part, |id| live.user(id), |id| candidate.user(id))))
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut users = Changes::default();
    for part in parts {
        users.merge(part);
    }
    let before: std::collections::HashMap<&str, &str> = live
        .organizations()
        .iter()
        .map(|(k, v)| (&**k, v.as_str()))
        .collect();
    let organizations = changes(
        &sorted(
            before
                .keys()
                .map(|k| Box::from(*k))
                .chain(candidate.organization_keys()),
        ),
        |k| before.get(k).map(|v| (*v).to_owned()),
        |k| candidate.organization(k),
    );
    (users, organizations)
}

/// Compares the records `live` and `candidate` refused, from `from` on (the
/// candidate read each partition from there: what the live state refused before is
/// not in the log any more). `name` writes a partition as `topic/partition`.
pub fn dead_letters(
    live: &Refused,
    candidate: &Refused,
    from: &Positions,
    name: impl Fn(Partition) -> String,
) -> DeadLetterChanges {
    let mut out = DeadLetterChanges {
        complete: live.complete() && candidate.complete(),
        ..DeadLetterChanges::default()
    };
    let mut sample = |category: &'static str, p: Partition, offset: i64, reason: &str| {
        let kept = out.samples.entry(category).or_default();
        if kept.len() < REFUSALS {
            kept.push(Refusal {
                partition: name(p),
                offset,
                reason: reason.to_owned(),
            });
        }
    };
    let read = |p: Partition, offset: i64| offset >= from.get(&p).copied().unwrap_or(0);
    let (mut added, mut removed, mut unchanged) = (0, 0, 0);
    for (p, offset, reason) in candidate.iter() {
        if live.get(p, offset).is_some() {
            unchanged += 1;
        } else {
            added += 1;
            sample("added", p, offset, reason);
        }
    }
    for (p, offset, reason) in live.iter().filter(|(p, o, _)| read(*p, *o)) {
        if candidate.get(p, offset).is_none() {
            removed += 1;
            sample("removed", p, offset, reason);
        }
    }
    out.added = added;
    out.removed = removed;
    out.unchanged = unchanged;
    out
}

fn sorted(keys: impl Iterator<Item = Box<str>>) -> Vec<Box<str>> {
    let mut keys: Vec<Box<str>> = keys.collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

impl Changes {
    /// Adds `later` (ids after all of these) to these.
    fn merge(&mut self, later: Changes) {
        self.compared += later.compared;
        self.unchanged += later.unchanged;
        self.changed += later.changed;
        self.newly_visible += later.newly_visible;
        self.newly_hidden += later.newly_hidden;
        for (field, n) in later.fields {
            *self.fields.entry(field).or_default() += n;
        }
        for (category, samples) in later.samples {
            let kept = self.samples.entry(category).or_default();
            let room = SAMPLES.saturating_sub(kept.len());
            kept.extend(samples.into_iter().take(room));
        }
    }
}

/// The changes among `keys` (sorted, distinct).
fn changes(
    keys: &[Box<str>],
    before: impl Fn(&str) -> Option<String>,
    after: impl Fn(&str) -> Option<String>,
) -> Changes {
    let mut out = Changes::default();
    for key in keys {
        let (b, a) = (before(key), after(key));
        let category = match (&b, &a) {
            (None, None) => continue,
            (Some(b), Some(a)) if b == a => {
                out.compared += 1;
                out.unchanged += 1;
                continue;
            }
            (Some(_), Some(_)) => {
                out.changed += 1;
                "changed"
            }
            (None, Some(_)) => {
                out.newly_visible += 1;
                "newly_visible"
            }
            (Some(_), None) => {
                out.newly_hidden += 1;
                "newly_hidden"
            }
        };
        out.compared += 1;
        let parse = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        };
        let (b, a) = (parse(&b), parse(&a));
        let fields = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .and_then(serde_json::Value::as_object)
                .cloned()
                .unwrap_or_default()
        };
        let (bf, af) = (fields(&b), fields(&a));
        let names: std::collections::BTreeSet<&String> = bf.keys().chain(af.keys()).collect();
        let differing: Vec<&String> = names
            .into_iter()
            .filter(|name| bf.get(*name) != af.get(*name))
            .collect();
        for name in &differing {
            *out.fields.entry((*name).clone()).or_default() += 1;
        }
        let samples = out.samples.entry(category).or_default();
        if samples.len() < SAMPLES {
            let diff = differing
                .into_iter()
                .map(|name| {
                    let change = FieldChange {
                        before: bf.get(name).cloned(),
                        after: af.get(name).cloned(),
                    };
                    (name.clone(), change)
                })
                .collect();
            samples.push(Sample {
                id: key.to_string(),
                before: b,
                after: a,
                diff,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Writer;
    use crate::state::test_update;
    use logq_abi::{Entity, Kind};

    fn user(store: &Writer, id: &str, answer: Option<&str>) {
        store.apply(
            &[Entity {
                kind: Kind::User,
                key: id.into(),
            }],
            vec![test_update(answer, None)],
        );
    }

    /// `store`'s answers frozen as a preview freezes them.
    fn frozen(store: &Writer) -> Export {
        let mut image = store.image(&Positions::new());
        image.sort();
        image
    }

    #[test]
    fn the_live_answers_are_compared_as_they_were_at_the_position_not_later() {
        let (live, candidate) = (Writer::new_store(), Writer::new_store());
        user(&live, "a", Some(r#"{"id":"a","email":"old@x"}"#));
        user(&live, "gone", Some(r#"{"id":"gone"}"#));
        user(&candidate, "a", Some(r#"{"id":"a","email":"old@x"}"#));
        user(&candidate, "gone", Some(r#"{"id":"gone"}"#));
        let at_position = frozen(&live);
        // The loop goes on after the position: a change, a deletion, a new user.
        user(&live, "a", Some(r#"{"id":"a","email":"new@x"}"#));
        user(&live, "gone", None);
        user(&live, "later", Some(r#"{"id":"later"}"#));
        let (users, _) = compare(&at_position, &candidate);
        assert_eq!(
            (users.compared, users.unchanged, users.changed),
            (2, 2, 0),
            "{users:?}"
        );
        // Against the live store as it is now, all three would differ.
        let now = frozen(&live);
        let (users, _) = compare(&now, &candidate);
        assert_eq!(
            (users.changed, users.newly_visible, users.newly_hidden),
            (1, 1, 1),
            "{users:?}"
        );
    }

    #[test]
    fn split_among_threads_it_reports_what_one_pass_does() {
        let (live, candidate) = (Writer::new_store(), Writer::new_store());
        for i in 0..200 {
            let id = format!("u{i:03}");
            let answer = |v: usize| format!(r#"{{"id":"{id}","v":{v}}}"#);
            match i % 4 {
                0 => {
                    user(&live, &id, Some(&answer(1)));
                    user(&candidate, &id, Some(&answer(1)));
                }
                1 => {
                    user(&live, &id, Some(&answer(1)));
                    user(&candidate, &id, Some(&answer(2)));
                }
                2 => user(&candidate, &id, Some(&answer(1))),
                _ => user(&live, &id, Some(&answer(1))),
            }
        }
        let (split, _) = compare(&frozen(&live), &candidate);
        let keys = sorted(live.user_keys().into_iter().chain(candidate.user_keys()));
        let one = changes(&keys, |id| live.user(id), |id| candidate.user(id));
        assert_eq!(split, one);
        assert_eq!(
            (split.changed, split.newly_visible, split.newly_hidden),
            (50, 50, 50)
        );
        // The first ids of each category, in key order.
        assert_eq!(split.samples["changed"][0].id, "u001");
        assert_eq!(split.samples["changed"].len(), SAMPLES);
    }

    #[test]
    fn dead_letters_are_compared_by_place_from_where_the_candidate_read() {
        use logq_abi::Source;
        let p = |id| Partition {
            source: Source::Users,
            id,
        };
        let (mut live, mut candidate) = (Refused::default(), Refused::default());
        live.insert(p(0), 0, "gone from the log");
        live.insert(p(0), 5, "live: no id");
        live.insert(p(1), 2, "not JSON");
        candidate.insert(p(1), 2, "not JSON either");
        candidate.insert(p(0), 7, "candidate: no e-mail");
        let from = Positions::from([(p(0), 1), (p(1), 0)]);
        let name = |p: Partition| format!("users/{}", p.id);
        let d = dead_letters(&live, &candidate, &from, name);
        assert_eq!(
            (d.unchanged, d.added, d.removed, d.complete),
            (1, 1, 1, true)
        );
        let one = |category: &str| {
            let s = &d.samples[category];
            assert_eq!(s.len(), 1, "{category}");
            (s[0].partition.clone(), s[0].offset, s[0].reason.clone())
        };
        assert_eq!(
            one("added"),
            ("users/0".into(), 7, "candidate: no e-mail".into())
        );
        assert_eq!(one("removed"), ("users/0".into(), 5, "live: no id".into()));
        // Either side incomplete: the counts are lower bounds, and the report says so.
        let full = Refused::from_parts(Vec::new(), false);
        assert!(!dead_letters(&full, &candidate, &from, name).complete);
        assert!(!dead_letters(&live, &full, &from, name).complete);
    }

    #[test]
    fn each_id_lands_in_one_category_and_fields_are_counted_once() {
        let (live, candidate) = (Writer::new_store(), Writer::new_store());
        user(&live, "same", Some(r#"{"id":"same","email":"a@x"}"#));
        user(&candidate, "same", Some(r#"{"id":"same","email":"a@x"}"#));
        user(&live, "masked", Some(r#"{"id":"masked","email":"b@x"}"#));
        user(
            &candidate,
            "masked",
            Some(r#"{"id":"masked","email":"b***"}"#),
        );
        user(&candidate, "new", Some(r#"{"id":"new"}"#));
        user(&live, "gone", Some(r#"{"id":"gone","email":"c@x"}"#));
        // Kept but not visible on both sides: not compared.
        user(&live, "hidden", None);
        user(&candidate, "hidden", None);
        let (users, orgs) = compare(&frozen(&live), &candidate);
        assert_eq!(
            (
                users.compared,
                users.unchanged,
                users.changed,
                users.newly_visible,
                users.newly_hidden
            ),
            (4, 1, 1, 1, 1)
        );
        // email: changed in "masked", gone with "gone"; id: "new" and "gone".
        assert_eq!(users.fields.get("email"), Some(&2));
        assert_eq!(users.fields.get("id"), Some(&2));
        assert_eq!(users.fields.get("organization"), Some(&2));
        let changed = &users.samples["changed"][0];
        assert_eq!(changed.id, "masked");
        assert_eq!(changed.before.as_ref().unwrap()["email"], "b@x");
        assert_eq!(changed.after.as_ref().unwrap()["email"], "b***");
        // The diff names only what differs.
        assert_eq!(
            changed.diff,
            BTreeMap::from([(
                "email".to_owned(),
                FieldChange {
                    before: Some("b@x".into()),
                    after: Some("b***".into()),
                }
            )])
        );
        let gone = &users.samples["newly_hidden"][0];
        assert_eq!(gone.diff["email"].after, None);
        assert_eq!(gone.diff.len(), 3, "{gone:?}");
        assert_eq!(users.samples["newly_hidden"][0].after, None);
        assert_eq!(orgs, Changes::default());
    }
}
