//! The end-to-end tests' oracle: the answers the README's "Event rules" give, written
//! from those rules alone. It shares no code with the reducer (no `logq_reducer`, no
//! `logq_abi`): it keeps every user's events, sorts them and applies the rules one by
//! one, where the reducer merges states in a semilattice; its clock arithmetic counts
//! years and months, where the reducer's uses a closed formula. `logq_reducer::Batch`
//! stays the reference of the differential tests, not of these.
//!
//! Input: record values with their place in the log ([`Logged`]: partition, offset),
//! as read back from the broker, or ([`answers`], [`Oracle::fold_keyed`]) values in
//! the order they were produced keyed by id, so that a later value is a later offset of
//! the entity's one partition. Values are good records only: the oracle panics on
//! anything the README refuses (refused records are the dead-letter tests' business).
//!
//! The rules, each with where it is applied here (the README's table "Each rule and
//! the test that exercises it" names the end-to-end tests):
//!
//! | README rule | here |
//! |---|---|
//! | one event or an array of events a record; no key needed | [`events`] |
//! | event time: the seed format (UTC) or RFC 3339 (`T`/`t`, `Z`/`z`, offsets, up to 9 fraction digits truncated, a leap second) | [`instant`], [`render`] |
//! | newer = later time; equal: later offset, later array element, higher partition | [`Place`], the sort in [`user_answer`] |
//! | a field changes only from a newer event; `null` is not given; Updated keeps the rest | [`set_given`] |
//! | Created carries the whole record | [`user_answer`] |
//! | Deleted removes; older events never bring back; newer Created re-creates from nothing; newer Updated does not | [`user_answer`] |
//! | `event_type` ignoring case, `_`/`-` for the space, surrounding blanks | [`action`] |
//! | organizations: newest by `updated_at`, else `received_at`, else `created_at`; a shared name joins the smallest key | [`Oracle::fold_logged`], [`Oracle::answers`] |
//! | unknown fields ignored | [`set_given`] reads only the four fields |
//! | tombstones forgotten past `--tombstone-retention` of event time; the clock capped a day past the wall clock | [`Oracle::expire`] |

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A record value and its place in its topic's log.
#[derive(Debug, Clone)]
pub struct Logged {
    /// The partition it is in.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The value as produced.
    pub value: String,
}

/// Where an event is in the log: (partition, offset, element of its array). Ordered
/// as the README decides equal times: within a partition the later offset and then
/// the later element; across partitions the higher partition.
pub type Place = (i32, i64, usize);

/// Microseconds since the Unix epoch.
type Micros = i64;

const USER_FIELDS: [&str; 4] = ["username", "user_email", "user_type", "organization_name"];
const DAY: Micros = 86_400 * 1_000_000;

/// One user event: its time, its place, what it does and the fields it gives.
#[derive(Debug, Clone)]
struct Event {
    at: Micros,
    place: Place,
    action: Action,
    given: BTreeMap<&'static str, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Created,
    Updated,
    Deleted,
}

/// One organization's newest event: version time, place, the event.
type Organization = (Micros, Place, Value);

/// The README's rules over everything folded so far, in phases: after each
/// [`Oracle::fold_keyed`] or [`Oracle::fold_logged`] the tombstones past the retention
/// are forgotten, as the host does after each batch it applies. A test that relies on
/// expiry gives its late events in a later phase than the events that move the clock.
#[derive(Debug, Default)]
pub struct Oracle {
    /// `--tombstone-retention`; `None` keeps every tombstone.
    retention: Option<Micros>,
    /// The newest event time folded, each capped a day past the wall clock.
    clock: Option<Micros>,
    /// Every event of every user not forgotten.
    users: BTreeMap<String, Vec<Event>>,
    /// Per organization key, its newest event.
    organizations: BTreeMap<String, Organization>,
    /// Values given to [`Oracle::fold_keyed`] so far, per topic: their offsets.
    keyed: (i64, i64),
}

/// `GET /users/{id}` for every visible user (`id` -> answer), from values produced
/// keyed by id in this order, all at once, with every tombstone kept.
pub fn answers(users: &[String], organizations: &[String]) -> BTreeMap<String, Value> {
    let mut oracle = Oracle::default();
    oracle.fold_keyed(users, organizations);
    oracle.answers()
}

impl Oracle {
    /// The rules with `--tombstone-retention never` (the host's default is 7 days,
    /// which no test's history spans unless it says so).
    pub fn new() -> Self {
        Self::default()
    }

    /// The rules with `--tombstone-retention` set to `retention`.
    pub fn with_retention(retention: Duration) -> Self {
        Self {
            retention: Some(micros(retention)),
            ..Self::default()
        }
    }

    /// One phase: values produced keyed by id, after everything before, in order.
    pub fn fold_keyed(&mut self, users: &[String], organizations: &[String]) {
        let place = |offset: &mut i64, value: &String| {
            *offset += 1;
            Logged {
                partition: 0,
                offset: *offset,
                value: value.clone(),
            }
        };
        let (mut u, mut o) = self.keyed;
        let users: Vec<Logged> = users.iter().map(|v| place(&mut u, v)).collect();
        let orgs: Vec<Logged> = organizations.iter().map(|v| place(&mut o, v)).collect();
        self.keyed = (u, o);
        self.fold_logged(&users, &orgs);
    }

    /// One phase: records with their places in the log.
    pub fn fold_logged(&mut self, users: &[Logged], organizations: &[Logged]) {
        let cap = micros(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("the clock is after 1970"),
        ) + DAY;
        for record in users {
            for (element, event) in events(&record.value).into_iter().enumerate() {
                let id = text(&event, "id").expect("user event without id");
                let at = instant(&text(&event, "received_at").expect("received_at"));
                let kind = text(&event, "event_type").expect("event_type");
                let action = action(&kind)
                    .unwrap_or_else(|| panic!("an event type the README refuses: {kind:?}"));
                let given = USER_FIELDS
                    .iter()
                    .filter_map(|&name| text(&event, name).map(|v| (name, v)))
                    .collect();
                self.clock = self.clock.max(Some(at.min(cap)));
                self.users.entry(id).or_default().push(Event {
                    at,
                    place: (record.partition, record.offset, element),
                    action,
                    given,
                });
            }
        }
        for record in organizations {
            for (element, event) in events(&record.value).into_iter().enumerate() {
                let key = text(&event, "organization_key").expect("organization_key");
                let version = ["updated_at", "received_at", "created_at"]
                    .iter()
                    .find_map(|f| text(&event, f))
                    .map(|t| instant(&t))
                    .expect("an organization event has created_at");
                let place = (record.partition, record.offset, element);
                self.clock = self.clock.max(Some(version.min(cap)));
                let newer = self
                    .organizations
                    .get(&key)
                    .is_none_or(|(v, p, _)| (version, place) > (*v, *p));
                if newer {
                    self.organizations.insert(key, (version, place, event));
                }
            }
        }
        self.expire();
    }

    /// Forgets every user that is not visible and whose newest event is older than
    /// the clock minus the retention.
    fn expire(&mut self) {
        let (Some(retention), Some(clock)) = (self.retention, self.clock) else {
            return;
        };
        let horizon = clock - retention;
        self.users.retain(|_, history| {
            let newest = history.iter().map(|e| e.at).max().unwrap_or(Micros::MIN);
            newest >= horizon || live(history).is_some()
        });
    }

    /// Which events decide user `id`'s answer; `None` for a user not remembered.
    pub fn provenance(&self, id: &str) -> Option<Provenance> {
        let history = self.users.get(id)?;
        let newest = |action: Action| {
            history
                .iter()
                .filter(|e| e.action == action)
                .max_by_key(|e| (e.at, e.place))
                .map(|e| e.place)
        };
        Some(Provenance {
            created: newest(Action::Created),
            deleted: newest(Action::Deleted),
            fields: live(history).map(|l| l.set_by).unwrap_or_default(),
        })
    }

    /// The organization key users named `name` join, and the place of its winning
    /// event.
    pub fn joined(&self, name: &str) -> Option<(String, Place)> {
        self.organizations
            .iter()
            .find(|(_, (_, _, e))| text(e, "organization_name").as_deref() == Some(name))
            .map(|(key, (_, place, _))| (key.clone(), *place))
    }

    /// Users the oracle still remembers (visible or not): what `logq_users_stored`
    /// counts.
    pub fn remembered(&self) -> usize {
        self.users.len()
    }

    /// `GET /users/{id}` for every visible user: `id` -> answer.
    pub fn answers(&self) -> BTreeMap<String, Value> {
        let orgs = self.by_name();
        self.users
            .iter()
            .filter_map(|(id, history)| {
                let user = live(history)?;
                Some((id.clone(), user_answer(id, &user, &orgs)))
            })
            .collect()
    }

    /// The organization each name joins to: of the keys whose newest event has that
    /// name, the smallest.
    fn by_name(&self) -> BTreeMap<String, Value> {
        let mut by_name: BTreeMap<String, Value> = BTreeMap::new();
        // Keys in ascending order: the first key seen for a name is the smallest.
        for (key, (_, _, event)) in &self.organizations {
            let name = text(event, "organization_name").expect("organization_name");
            by_name.entry(name.clone()).or_insert_with(|| {
                serde_json::json!({
                    "organization_key": key,
                    "organization_name": name,
                    "organization_tier": text(event, "organization_tier"),
                    "created_at": render(instant(&text(event, "created_at").expect("created_at"))),
                })
            });
        }
        by_name
    }
}

/// A visible user's record after the rules are applied in order.
#[derive(Debug, Default)]
struct Live {
    fields: BTreeMap<&'static str, String>,
    created_at: Micros,
    updated_at: Micros,
    /// Where the event that set each field is.
    set_by: BTreeMap<&'static str, Place>,
}

/// Which events decide a user's answer, by the rules: what `?explain=1` must cite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The newest "User Created": its place.
    pub created: Option<Place>,
    /// The newest "User Deleted": its place.
    pub deleted: Option<Place>,
    /// For a visible user, per field given, the place of the event that set it.
    pub fields: BTreeMap<&'static str, Place>,
}

/// The user's events sorted by time (equal times by place) and applied one by one;
/// `None` when the user is not visible at the end.
fn live(history: &[Event]) -> Option<Live> {
    let mut sorted: Vec<&Event> = history.iter().collect();
    sorted.sort_by_key(|e| (e.at, e.place));
    let mut live: Option<Live> = None;
    for event in sorted {
        match event.action {
            // Created carries the whole record: nothing from before survives.
            Action::Created => {
                let mut user = Live {
                    created_at: event.at,
                    updated_at: event.at,
                    ..Live::default()
                };
                set_given(&mut user, event);
                live = Some(user);
            }
            // Updated changes the given fields of a live user only.
            Action::Updated => {
                if let Some(user) = &mut live {
                    set_given(user, event);
                    user.updated_at = event.at;
                }
            }
            Action::Deleted => live = None,
        }
    }
    live
}

fn user_answer(id: &str, user: &Live, orgs: &BTreeMap<String, Value>) -> Value {
    let mut answer = serde_json::json!({ "id": id });
    for name in USER_FIELDS {
        answer[name] = user
            .fields
            .get(name)
            .map_or(Value::Null, |v| v.clone().into());
    }
    answer["created_at"] = render(user.created_at).into();
    answer["updated_at"] = render(user.updated_at).into();
    answer["organization"] = user
        .fields
        .get("organization_name")
        .and_then(|name| orgs.get(name))
        .cloned()
        .unwrap_or(Value::Null);
    answer
}

/// Sets every field the event gives (`null` or absent means "not given"; the other
/// fields of the event are not read).
fn set_given(user: &mut Live, event: &Event) {
    for (name, value) in &event.given {
        user.fields.insert(name, value.clone());
        user.set_by.insert(name, event.place);
    }
}

/// A record value is one event or an array of events.
fn events(value: &str) -> Vec<Value> {
    match serde_json::from_str(value).expect("the oracle gets valid JSON") {
        Value::Array(items) => items,
        one => vec![one],
    }
}

fn text(event: &Value, field: &str) -> Option<String> {
    event.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// `event_type` ignoring case and blanks around it, with `_` or `-` for the space.
fn action(t: &str) -> Option<Action> {
    let t: String = t
        .trim()
        .chars()
        .map(|c| match c {
            '_' | '-' => ' ',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    match t.as_str() {
        "user created" => Some(Action::Created),
        "user updated" => Some(Action::Updated),
        "user deleted" => Some(Action::Deleted),
        _ => None,
    }
}

fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).expect("a duration in range")
}

/// An event time, from the forms the README accepts: `2020-12-08 20:03:16.759617`
/// (UTC), or RFC 3339: `T` or `t` (or a blank) between date and time, `Z`, `z` or an
/// offset `+hh:mm`/`-hh:mm` (also `+hhmm`, `+hh`), up to 9 fraction digits of which those past the sixth
/// are dropped, and a leap second `:60` that counts as the next minute's first.
///
/// # Panics
/// On anything else (1970 and later only: no test produces earlier times).
pub fn instant(t: &str) -> Micros {
    let refuse = || -> ! { panic!("a time the README refuses: {t:?}") };
    let number = |s: &str| -> i64 {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            refuse()
        }
        s.parse().unwrap_or_else(|_| refuse())
    };
    if t.len() < 19 || !t.is_char_boundary(19) {
        refuse()
    }
    let (date, rest) = t.split_at(10);
    let (sep, rest) = rest.split_at(1);
    if !matches!(sep, " " | "T" | "t") {
        refuse()
    }
    let fields: Vec<&str> = date.split('-').collect();
    let [y, mo, d] = fields[..] else { refuse() };
    let (year, month, day) = (number(y), number(mo), number(d));
    let (clock, after) = rest.split_at(8);
    let fields: Vec<&str> = clock.split(':').collect();
    let [h, mi, s] = fields[..] else { refuse() };
    let (hour, minute, second) = (number(h), number(mi), number(s));
    let (fraction, zone) = match after.strip_prefix('.') {
        Some(z) => {
            let (fraction, zone) =
                z.split_at(z.find(|c: char| !c.is_ascii_digit()).unwrap_or(z.len()));
            if !(1..=9).contains(&fraction.len()) {
                refuse()
            }
            (fraction, zone)
        }
        None => ("", after),
    };
    let offset_minutes = match zone {
        "" | "Z" | "z" => 0,
        _ => {
            // `+hh:mm` (RFC 3339), also `+hhmm` and `+hh`.
            let (sign, offset) = zone.split_at(1);
            let (oh, om) = match offset.len() {
                5 if &offset[2..3] == ":" => (&offset[..2], &offset[3..]),
                4 => offset.split_at(2),
                2 => (offset, "00"),
                _ => refuse(),
            };
            if number(oh) > 23 || number(om) > 59 {
                refuse()
            }
            let minutes = number(oh) * 60 + number(om);
            match sign {
                "+" => minutes,
                "-" => -minutes,
                _ => refuse(),
            }
        }
    };
    if year < 1970
        || !(1..=12).contains(&month)
        || day < 1
        || day > month_days(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        refuse()
    }
    let mut days = (1970..year).map(year_days).sum::<i64>();
    days += (1..month).map(|m| month_days(year, m)).sum::<i64>() + day - 1;
    let seconds = days * 86_400 + hour * 3_600 + (minute - offset_minutes) * 60 + second;
    // The first six fraction digits; the rest are below a microsecond.
    let micros: i64 = format!("{:0<6}", &fraction[..fraction.len().min(6)])
        .parse()
        .expect("digits");
    seconds * 1_000_000 + micros
}

/// An event time as the answers render it: RFC 3339 in UTC with six fraction digits.
pub fn render(t: Micros) -> String {
    let (mut days, of_day) = (t.div_euclid(DAY), t.rem_euclid(DAY));
    let mut year = 1970;
    while days >= year_days(year) {
        days -= year_days(year);
        year += 1;
    }
    let mut month = 1;
    while days >= month_days(year, month) {
        days -= month_days(year, month);
        month += 1;
    }
    let seconds = of_day / 1_000_000;
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        days + 1,
        seconds / 3_600,
        seconds / 60 % 60,
        seconds % 60,
        of_day % 1_000_000
    )
}

/// A time as the answers render it, from any form [`instant`] reads.
pub fn event_time(t: &str) -> String {
    render(instant(t))
}

fn year_days(year: i64) -> i64 {
    if month_days(year, 2) == 29 { 366 } else { 365 }
}

fn month_days(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 400 == 0 || (year % 4 == 0 && year % 100 != 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `snake@outerheaven.com` -> `s***@outerheaven.com`, as the README describes the proof
/// reducer (`mask-emails`); no `@`: `***`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, kind: &str, at: &str, fields: &[(&str, &str)]) -> String {
        let mut e = serde_json::json!({"id": id, "event_type": kind, "received_at": at});
        for (k, v) in fields {
            e[*k] = (*v).into();
        }
        e.to_string()
    }

    fn org(key: &str, name: &str, tier: &str, created: &str) -> String {
        serde_json::json!({"organization_key": key, "organization_name": name,
            "organization_tier": tier, "created_at": created})
        .to_string()
    }

    fn logged(partition: i32, offset: i64, value: String) -> Logged {
        Logged {
            partition,
            offset,
            value,
        }
    }

    /// The rules, example by example, as the README states them.
    #[test]
    fn the_readme_rules() {
        let users = [
            // Re-created after a delete: nothing from before survives.
            user(
                "a",
                "User Created",
                "2020-01-01 00:00:01",
                &[("username", "old"), ("user_type", "Admin")],
            ),
            user("a", "User Deleted", "2020-01-01 00:00:02", &[]),
            user(
                "a",
                " user_created ",
                "2020-01-01 00:00:03",
                &[("username", "new"), ("organization_name", "MGS")],
            ),
            // Late update: applied in time order, not arrival order.
            user(
                "a",
                "User Updated",
                "2020-01-01 00:00:02.5",
                &[("username", "late")],
            ),
            // Deleted for good; an older Created arriving later does not bring it back.
            user("b", "User Deleted", "2020-01-01 00:00:05", &[]),
            user(
                "b",
                "User Created",
                "2020-01-01 00:00:04",
                &[("username", "b")],
            ),
            // Equal times: the later in the log wins, not the larger value; the same
            // instant written with an offset is the same time.
            user(
                "c",
                "USER-CREATED",
                "2020-01-01T00:00:01Z",
                &[("username", "x")],
            ),
            user(
                "c",
                "User Updated",
                "2020-01-01 00:00:02",
                &[("username", "zulu")],
            ),
            user(
                "c",
                "user-updated",
                "2020-01-01t02:00:02+02:00",
                &[("username", "alpha")],
            ),
            // Updated newer than the deletion does not re-create; Created and Deleted
            // at one instant: the later in the log.
            user("d", "User Created", "2020-01-01 00:00:01", &[]),
            user("d", "User Deleted", "2020-01-01 00:00:02", &[]),
            user(
                "d",
                "User Updated",
                "2020-01-01 00:00:03",
                &[("username", "d")],
            ),
            user("e", "User Deleted", "2020-01-01 00:00:02", &[]),
            user(
                "e",
                "User Created",
                "2020-01-01 00:00:02",
                &[("username", "e")],
            ),
        ];
        let orgs = [
            org("k2", "MGS", "Large", "2018-01-01 00:00:00"),
            // One record, two events at one time: the later element wins.
            format!(
                "[{},{}]",
                org("k1", "MGS", "Small", "2018-01-01 00:00:00"),
                org("k1", "MGS", "Enterprise", "2018-01-01 00:00:00")
            ),
        ];
        let got = answers(&users, &orgs);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "c", "e"]);
        let a = &got["a"];
        assert_eq!(a["username"], "new");
        assert_eq!(a["user_type"], Value::Null, "Created drops older fields");
        assert_eq!(a["created_at"], "2020-01-01T00:00:03.000000Z");
        assert_eq!(a["updated_at"], "2020-01-01T00:00:03.000000Z");
        assert_eq!(a["organization"]["organization_key"], "k1", "smallest key");
        assert_eq!(
            a["organization"]["organization_tier"], "Enterprise",
            "later element in the log"
        );
        assert_eq!(got["c"]["username"], "alpha");
        assert_eq!(got["c"]["organization"], Value::Null);
        assert_eq!(got["e"]["username"], "e");
    }

    /// Equal times across partitions: the higher partition wins, whatever the order
    /// the values are given in; within one, the later offset.
    #[test]
    fn equal_times_across_partitions_go_to_the_higher_partition() {
        let at = "2020-01-01 00:00:01";
        let high = logged(3, 0, user("u", "User Created", at, &[("username", "p3")]));
        let low = logged(1, 9, user("u", "User Created", at, &[("username", "p1")]));
        for order in [[high.clone(), low.clone()], [low, high]] {
            let mut oracle = Oracle::new();
            oracle.fold_logged(&order, &[]);
            assert_eq!(oracle.answers()["u"]["username"], "p3");
        }
        let first = logged(0, 4, org("k", "A", "Small", "2018-01-01 00:00:00"));
        let later = logged(0, 5, org("k", "B", "Large", "2018-01-01T00:00:00z"));
        let renamed = logged(
            1,
            0,
            user("v", "User Created", at, &[("organization_name", "B")]),
        );
        let mut oracle = Oracle::new();
        oracle.fold_logged(&[renamed], &[later, first]);
        assert_eq!(
            oracle.answers()["v"]["organization"]["organization_tier"],
            "Large"
        );
    }

    /// Tombstones are forgotten at the end of a phase once the clock has passed them
    /// by the retention; the clock stops a day past the wall clock.
    #[test]
    fn tombstones_expire_by_event_time_with_the_clock_capped() {
        let hour = |h: u32| format!("2021-01-01 {h:02}:00:00");
        let mut oracle = Oracle::with_retention(Duration::from_secs(3_600));
        oracle.fold_keyed(
            &[
                user("gone", "User Created", &hour(0), &[]),
                user("gone", "User Deleted", &hour(1), &[]),
                user("kept", "User Deleted", &hour(2), &[]),
                user("clock", "User Created", &hour(3), &[]),
            ],
            &[],
        );
        assert_eq!(oracle.remembered(), 2, "gone expired, kept not yet");
        oracle.fold_keyed(
            &[
                user("gone", "User Created", &hour(0), &[("username", "back")]),
                user("kept", "User Created", &hour(1), &[]),
            ],
            &[],
        );
        let got = oracle.answers();
        assert_eq!(got["gone"]["username"], "back", "past the retention: new");
        assert!(!got.contains_key("kept"), "inside it: fenced off");

        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let recent = render(micros(now) - 3_600 * 1_000_000);
        let mut oracle = Oracle::with_retention(Duration::from_secs(2 * 86_400));
        oracle.fold_keyed(
            &[
                user("t", "User Deleted", &recent, &[]),
                user("far", "User Created", "9999-12-31 23:59:59", &[]),
            ],
            &[],
        );
        assert_eq!(
            oracle.remembered(),
            2,
            "the year 9999 moved the clock a day only"
        );
        assert_eq!(
            oracle.answers()["far"]["created_at"],
            "9999-12-31T23:59:59.000000Z"
        );
    }

    #[test]
    fn times_render_as_documented() {
        for (given, rendered) in [
            ("2020-12-08 20:03:16.759617", "2020-12-08T20:03:16.759617Z"),
            ("2018-01-24 17:28:09", "2018-01-24T17:28:09.000000Z"),
            ("2018-01-24T17:28:09.5Z", "2018-01-24T17:28:09.500000Z"),
            (
                "2018-01-24t17:28:09.123456789z",
                "2018-01-24T17:28:09.123456Z",
            ),
            ("2018-01-01T01:30:00+02:00", "2017-12-31T23:30:00.000000Z"),
            ("2016-02-28T23:00:00.1-05:30", "2016-02-29T04:30:00.100000Z"),
            ("2016-12-31 23:59:60", "2017-01-01T00:00:00.000000Z"),
            ("1970-01-01 00:00:00", "1970-01-01T00:00:00.000000Z"),
            ("2000-03-01T00:00:00Z", "2000-03-01T00:00:00.000000Z"),
            ("2100-03-01T00:00:00Z", "2100-03-01T00:00:00.000000Z"),
            ("2018-01-24 17:28:09+0200", "2018-01-24T15:28:09.000000Z"),
            ("2018-01-24 17:28:09-02", "2018-01-24T19:28:09.000000Z"),
        ] {
            assert_eq!(event_time(given), rendered, "{given}");
        }
        assert_eq!(instant("1970-01-02 00:00:00.000001"), 86_400_000_001);
        for refused in [
            "2018-01-24",
            "2018-01-24 17:28",
            "2018-01-24 17:28:09.",
            "2018-01-24 17:28:09.1234567890",
            "2018-01-24 17:28:09+020",
            "2018-01-24 17:28:09+24:00",
            "2018-02-30 00:00:00",
            "2018-01-24X17:28:09",
        ] {
            assert!(
                std::panic::catch_unwind(|| instant(refused)).is_err(),
                "{refused}"
            );
        }
        assert_eq!(mask_email("snake@outerheaven.com"), "s***@outerheaven.com");
    }
}
