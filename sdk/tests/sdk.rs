//! The SDK natively: its own reducers' plumbing (rejections, arrays, state round
//! trips, forgetting, refused folds) and the differential test that the default rules
//! behind an empty [`Tweak`] answer exactly what the hand-tuned default reducer does.

use logq_reducer_sdk::native::{Model, Native};
use logq_reducer_sdk::{
    Answer, Custom, Defaults, Entity, Event, Kind, Record, Reducer, Source, Tweak, Value, json,
    serde_json,
};
use proptest::prelude::*;

/// Counts each user's events; "forget" drops it; "boom" fails the fold.
#[derive(Default)]
struct Counter;

impl Reducer for Counter {
    type State = (u32, String);

    fn entity(&self, event: &Event) -> Result<Entity, String> {
        let id = event.str("id").ok_or("missing field `id`")?;
        Ok(Entity {
            kind: Kind::User,
            key: id.to_owned(),
        })
    }

    fn apply(
        &self,
        state: Option<(u32, String)>,
        event: &Event,
    ) -> Result<Option<(u32, String)>, String> {
        match event.event_type() {
            Some("forget") => Ok(None),
            Some("boom") => Err("boom is not an event".into()),
            _ => {
                let (n, _) = state.unwrap_or_default();
                let org = event.str("org").unwrap_or_default().to_owned();
                Ok(Some((n + 1, org)))
            }
        }
    }

    fn answer(&self, state: &(u32, String)) -> Option<Answer> {
        (state.0 > 1).then(|| Answer::new().with("events", state.0))
    }

    fn join(&self, state: &(u32, String)) -> Option<String> {
        Some(state.1.clone())
    }

    fn clock(&self, state: &(u32, String)) -> Option<i64> {
        Some(i64::from(state.0))
    }
}

fn users(values: &[&str]) -> Vec<Record<'static>> {
    let owned: Vec<&'static [u8]> = values
        .iter()
        .map(|v| &*Box::leak(v.as_bytes().to_vec().into_boxed_slice()))
        .collect();
    Record::sequence(owned.into_iter().map(|v| (Source::Users, v)))
}

#[test]
fn a_custom_reducer_gets_decoded_events_and_its_state_back() {
    let fold = Native::<Custom<Counter>>::default();
    let mut model = Model::new();
    let plan = model
        .apply(
            &fold,
            &users(&[
                r#"{"id":"a","org":"FOX"}"#,
                "not json",
                r#"[{"id":"a"},{"no":"id"},7,{"id":"b"}]"#,
                "42",
            ]),
        )
        .unwrap();
    assert_eq!(plan.accepted, [1, 0, 2, 0]);
    let reasons: Vec<(u32, Option<u32>, &str)> = plan
        .rejections
        .iter()
        .map(|r| (r.input, r.event, r.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].2.starts_with("invalid JSON"), "{reasons:?}");
    assert_eq!(
        (reasons[1].0, reasons[1].1, reasons[1].2),
        (2, Some(1), "missing field `id`")
    );
    assert_eq!((reasons[2].1, reasons[2].2), (Some(2), "not a JSON object"));
    assert_eq!(reasons[3].2, "not a JSON object or an array of them");
    let a = model.get(Kind::User, "a").unwrap();
    assert_eq!(a.view(), Some(r#"{"events":2}"#));
    assert_eq!(a.join(), Some(""), "the last event's org");
    assert_eq!(a.clock, Some(2));
    assert_eq!(
        model.get(Kind::User, "b").unwrap().view(),
        None,
        "one event: no answer"
    );

    // The next batch starts from the stored state.
    model
        .apply(&fold, &users(&[r#"{"id":"b","org":"MGS"}"#]))
        .unwrap();
    let b = model.get(Kind::User, "b").unwrap();
    assert_eq!((b.view(), b.join()), (Some(r#"{"events":2}"#), Some("MGS")));
    // Forgetting drops the entity; a failing event fails the whole batch.
    model
        .apply(&fold, &users(&[r#"{"id":"a","event_type":"forget"}"#]))
        .unwrap();
    assert!(model.get(Kind::User, "a").is_none());
    let err = model
        .apply(&fold, &users(&[r#"{"id":"b","event_type":"boom"}"#]))
        .unwrap_err();
    assert!(
        err.contains("boom is not an event") && err.contains("\"b\""),
        "{err}"
    );
}

#[test]
fn a_state_written_by_another_reducer_is_refused_with_a_reason() {
    let mut model = Model::new();
    let record =
        users(&[r#"{"id":"a","event_type":"User Created","received_at":"2021-01-01 00:00:00"}"#]);
    model.apply(&logq_reducer::Native, &record).unwrap();
    let err = model
        .apply(&Native::<Custom<Counter>>::default(), &record)
        .unwrap_err();
    assert!(err.contains("mode=replay"), "{err}");
    // The default rules behind a tweak read the default reducer's states as they are.
    model
        .apply(&Native::<Defaults<Shout>>::default(), &record)
        .unwrap();
    let view: Value =
        serde_json::from_str(model.get(Kind::User, "a").unwrap().view().unwrap()).unwrap();
    assert_eq!(view["shout"], "A!");
}

/// Adds a member and drops one.
#[derive(Default)]
struct Shout;

impl Tweak for Shout {
    fn user(&self, answer: &mut Answer) {
        let id = answer.get_str("id").unwrap_or_default().to_uppercase();
        answer.set("shout", format!("{id}!"));
        answer.remove("user_type");
    }
}

#[test]
fn a_tweak_changes_the_answer_and_keeps_the_join_and_clock() {
    let record = users(&[
        r#"{"id":"a","event_type":"User Created","user_type":"Admin","organization_name":"FOX","received_at":"2021-01-01 00:00:00"}"#,
    ]);
    let mut plain = Model::new();
    plain.apply(&logq_reducer::Native, &record).unwrap();
    let mut tweaked = Model::new();
    tweaked
        .apply(&Native::<Defaults<Shout>>::default(), &record)
        .unwrap();
    let (p, t) = (
        plain.get(Kind::User, "a").unwrap(),
        tweaked.get(Kind::User, "a").unwrap(),
    );
    let mut want: serde_json::Map<String, Value> = serde_json::from_str(p.view().unwrap()).unwrap();
    want.remove("user_type");
    want.insert("shout".into(), json!("A!"));
    let got: serde_json::Map<String, Value> = serde_json::from_str(t.view().unwrap()).unwrap();
    assert_eq!(got, want);
    assert_eq!((t.join(), t.clock), (p.join(), p.clock));
    assert!(
        t.view().unwrap().ends_with(r#","shout":"A!"}"#),
        "members keep their order"
    );
}

/// An empty tweak: the default rules as they are.
#[derive(Default)]
struct Nothing;

impl Tweak for Nothing {}

fn event() -> impl Strategy<Value = (bool, String)> {
    let user = (
        0..6u8,
        prop::sample::select(vec![
            "User Created",
            "User Updated",
            "User Deleted",
            "User Exploded",
        ]),
        prop::option::of(prop::sample::select(vec!["Snake", "Ötacon", "\"Q\"", ""])),
        prop::option::of(prop::sample::select(vec!["a@b.c", "x@y"])),
        prop::option::of(prop::sample::select(vec!["FOX", "MGS"])),
        0..40u32,
    )
        .prop_map(|(id, kind, name, email, org, t)| {
            let mut e = json!({"id": format!("u{id}"), "event_type": kind,
                "received_at": format!("2021-01-01 00:00:{:02}", t % 60)});
            for (k, v) in [
                ("username", name),
                ("user_email", email),
                ("organization_name", org),
            ] {
                if let Some(v) = v {
                    e[k] = json!(v);
                }
            }
            (false, e.to_string())
        });
    let org =
        (0..3u8, prop::sample::select(vec!["FOX", "MGS"]), 0..40u32).prop_map(|(k, name, t)| {
            let e = json!({"organization_key": format!("o{k}"), "organization_name": name,
            "organization_tier": "Small", "created_at": format!("2020-01-01 00:00:{:02}", t % 60)});
            (true, e.to_string())
        });
    prop_oneof![4 => user, 1 => org, 1 => Just((false, "{broken".to_owned()))]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn the_default_rules_behind_an_empty_tweak_answer_as_the_default_reducer(
        events in prop::collection::vec(event(), 1..60),
        cut in 1..8usize,
    ) {
        let records: Vec<Record<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, (org, v))| Record {
                source: if *org { Source::Organizations } else { Source::Users },
                partition: i32::try_from(i % 2).unwrap(),
                offset: i64::try_from(i).unwrap(),
                value: v.as_bytes(),
            })
            .collect();
        let (mut hand, mut sdk) = (Model::new(), Model::new());
        for batch in records.chunks(cut) {
            let a = hand.apply(&logq_reducer::Native, batch).unwrap();
            let b = sdk.apply(&Native::<Defaults<Nothing>>::default(), batch).unwrap();
            prop_assert_eq!(a, b, "the same plan: entities, rejections, counts");
        }
        prop_assert_eq!(hand.len(), sdk.len());
        for (entity, h) in hand.iter() {
            let s = sdk.get(entity.kind, &entity.key).unwrap();
            let parse = |v: Option<&str>| v.map(|v| serde_json::from_str::<Value>(v).unwrap());
            prop_assert_eq!(parse(h.view()), parse(s.view()), "{:?}", entity);
            prop_assert_eq!(h.view(), s.view(), "even the text: members keep their order");
            prop_assert_eq!((h.join(), h.clock), (s.join(), s.clock));
        }
    }
}
