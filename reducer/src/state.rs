//! Entity state: how events fold into a user or an organization, and how that state
//! is encoded for the host and rendered as the JSON answer.
//!
//! Every fold here is a merge in a join-semilattice: each piece of state only moves
//! "up" (a later time, or a larger value on a tie), so folding a set of events gives
//! the same state whatever their order and however often each arrives.

use crate::event::{Action, ORGANIZATION_NAME, OrgEvent, USER_FIELDS, UserEvent, UserFields};
use crate::time::{self, Micros};

/// One user field and the event time that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The value.
    pub value: String,
    /// Event time of the event that set it.
    pub at: Micros,
}

/// Everything known about one user id, including a deleted one: the deletion time is
/// kept so that older events never bring the user back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserState {
    /// The user's id.
    pub id: String,
    /// Time of the newest "User Created".
    pub created: Option<Micros>,
    /// Time of the newest "User Deleted".
    pub deleted: Option<Micros>,
    /// Time of the newest "User Created" or "User Updated".
    pub touched: Option<Micros>,
    /// Field values, in the order of [`USER_FIELDS`].
    pub fields: [Option<Field>; 4],
}

impl UserState {
    /// A user nothing is known about yet.
    pub fn new(id: String) -> Self {
        Self {
            id,
            created: None,
            deleted: None,
            touched: None,
            fields: Default::default(),
        }
    }

    /// Folds one event in.
    ///
    /// Rules (each holds in any order):
    /// - a field takes a value only from an event newer than the one that set it
    ///   (equal times: the larger value wins, so the answer does not depend on order);
    /// - "User Created" carries the whole record: fields set before the newest Created
    ///   are dropped;
    /// - "User Deleted" drops every field set at or before it; the user is visible
    ///   only while its newest Created is newer than its newest Deleted.
    pub fn apply(&mut self, event: &UserEvent) {
        match event.action {
            Action::Created => {
                raise(&mut self.created, event.at);
                raise(&mut self.touched, event.at);
                self.set_fields(&event.fields, event.at);
            }
            Action::Updated => {
                raise(&mut self.touched, event.at);
                self.set_fields(&event.fields, event.at);
            }
            Action::Deleted => raise(&mut self.deleted, event.at),
        }
        self.prune();
    }

    fn set_fields(&mut self, fields: &UserFields, at: Micros) {
        for (slot, value) in self.fields.iter_mut().zip(fields) {
            let Some(value) = value else { continue };
            let newer = match slot {
                None => true,
                Some(old) => (at, value.as_str()) > (old.at, old.value.as_str()),
            };
            if newer {
                *slot = Some(Field {
                    value: value.clone(),
                    at,
                });
            }
        }
    }

    /// Drops what can never be visible again. Both bounds only rise, so a dropped
    /// field stays dropped whatever arrives later: pruning early changes nothing.
    fn prune(&mut self) {
        let (created, deleted) = (self.created, self.deleted);
        for slot in &mut self.fields {
            if slot.as_ref().is_some_and(|f| {
                created.is_some_and(|c| f.at < c) || deleted.is_some_and(|d| f.at <= d)
            }) {
                *slot = None;
            }
        }
    }

    /// Whether GET shows this user: created, and not deleted since.
    pub fn visible(&self) -> bool {
        match (self.created, self.deleted) {
            (Some(c), Some(d)) => c > d,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The organization name the user joins on, while visible.
    pub fn organization_name(&self) -> Option<&str> {
        self.fields[ORGANIZATION_NAME]
            .as_ref()
            .map(|f| f.value.as_str())
    }

    /// The JSON answer without the organization (the host joins that in), or `None`
    /// while the user is not visible.
    pub fn view(&self) -> Option<String> {
        if !self.visible() {
            return None;
        }
        let mut out = String::with_capacity(256);
        out.push_str("{\"id\":");
        push_json_str(&mut out, &self.id);
        for (name, field) in USER_FIELDS.iter().zip(&self.fields) {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":");
            match field {
                Some(f) if cfg!(feature = "mask-emails") && *name == "user_email" => {
                    push_json_str(&mut out, &mask_email(&f.value));
                }
                Some(f) => push_json_str(&mut out, &f.value),
                None => out.push_str("null"),
            }
        }
        push_time(&mut out, "created_at", self.created);
        push_time(&mut out, "updated_at", self.touched);
        out.push('}');
        Some(out)
    }

    /// Encodes the state for the host to keep.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(128));
        w.0.push(USER_TAG);
        w.str(&self.id);
        w.opt_time(self.created);
        w.opt_time(self.deleted);
        w.opt_time(self.touched);
        for field in &self.fields {
            match field {
                Some(f) => {
                    w.0.push(1);
                    w.time(f.at);
                    w.str(&f.value);
                }
                None => w.0.push(0),
            }
        }
        w.0
    }

    /// Decodes what [`UserState::encode`] wrote.
    ///
    /// # Errors
    /// When `bytes` is not a user state of this encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes, USER_TAG)?;
        let id = r.str()?;
        let created = r.opt_time()?;
        let deleted = r.opt_time()?;
        let touched = r.opt_time()?;
        let mut fields: [Option<Field>; 4] = Default::default();
        for slot in &mut fields {
            if r.flag()? {
                let at = r.time()?;
                *slot = Some(Field {
                    value: r.str()?,
                    at,
                });
            }
        }
        r.finish()?;
        Ok(Self {
            id,
            created,
            deleted,
            touched,
            fields,
        })
    }
}

/// The current record of one organization key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgState {
    /// The event that won.
    pub current: OrgEvent,
}

impl OrgState {
    /// The state after its first event.
    pub fn new(event: &OrgEvent) -> Self {
        Self {
            current: event.clone(),
        }
    }

    /// Replaces the organization if `event` is newer (by version; on equal versions the
    /// larger record wins so that the order of arrival does not matter).
    pub fn apply(&mut self, event: &OrgEvent) {
        if order_key(event) > order_key(&self.current) {
            self.current = event.clone();
        }
    }

    /// The organization's JSON answer.
    pub fn view(&self) -> String {
        let o = &self.current;
        let mut out = String::with_capacity(160);
        out.push_str("{\"organization_key\":");
        push_json_str(&mut out, &o.key);
        out.push_str(",\"organization_name\":");
        push_json_str(&mut out, &o.name);
        out.push_str(",\"organization_tier\":");
        match &o.tier {
            Some(t) => push_json_str(&mut out, t),
            None => out.push_str("null"),
        }
        push_time(&mut out, "created_at", Some(o.created_at));
        out.push('}');
        out
    }

    /// Encodes the state for the host to keep.
    pub fn encode(&self) -> Vec<u8> {
        let o = &self.current;
        let mut w = Writer(Vec::with_capacity(96));
        w.0.push(ORG_TAG);
        w.str(&o.key);
        w.str(&o.name);
        match &o.tier {
            Some(t) => {
                w.0.push(1);
                w.str(t);
            }
            None => w.0.push(0),
        }
        w.time(o.created_at);
        w.time(o.version);
        w.0
    }

    /// Decodes what [`OrgState::encode`] wrote.
    ///
    /// # Errors
    /// When `bytes` is not an organization state of this encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes, ORG_TAG)?;
        let key = r.str()?;
        let name = r.str()?;
        let tier = if r.flag()? { Some(r.str()?) } else { None };
        let created_at = r.time()?;
        let version = r.time()?;
        r.finish()?;
        Ok(Self {
            current: OrgEvent {
                key,
                name,
                tier,
                created_at,
                version,
            },
        })
    }
}

fn order_key(o: &OrgEvent) -> (Micros, &str, Option<&str>, Micros) {
    (o.version, o.name.as_str(), o.tier.as_deref(), o.created_at)
}

/// `snake@outerheaven.com` -> `s***@outerheaven.com`: the proof reducer's visible
/// difference (feature `mask-emails`).
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

fn raise(slot: &mut Option<Micros>, at: Micros) {
    if slot.is_none_or(|old| at > old) {
        *slot = Some(at);
    }
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_time(out: &mut String, name: &str, t: Option<Micros>) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
    match t {
        Some(t) => {
            out.push('"');
            out.push_str(&time::render(t));
            out.push('"');
        }
        None => out.push_str("null"),
    }
}

const USER_TAG: u8 = b'U';
const ORG_TAG: u8 = b'O';

/// A little-endian, length-prefixed encoding: compact, and cheap to read back.
struct Writer(Vec<u8>);

impl Writer {
    fn time(&mut self, t: Micros) {
        self.0.extend_from_slice(&t.to_le_bytes());
    }
    fn opt_time(&mut self, t: Option<Micros>) {
        match t {
            Some(t) => {
                self.0.push(1);
                self.time(t);
            }
            None => self.0.push(0),
        }
    }
    fn str(&mut self, s: &str) {
        let len = u32::try_from(s.len()).expect("strings are bounded by the record size");
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], tag: u8) -> Result<Self, String> {
        match bytes.split_first() {
            Some((&t, rest)) if t == tag => Ok(Self { bytes: rest }),
            _ => Err(format!("state does not start with tag {:?}", tag as char)),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("state is truncated".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn flag(&mut self) -> Result<bool, String> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("bad flag byte {other}")),
        }
    }
    fn time(&mut self) -> Result<Micros, String> {
        let raw: [u8; 8] = self.take(8)?.try_into().map_err(|_| "short time")?;
        Ok(Micros::from_le_bytes(raw))
    }
    fn opt_time(&mut self) -> Result<Option<Micros>, String> {
        if self.flag()? {
            self.time().map(Some)
        } else {
            Ok(None)
        }
    }
    fn str(&mut self) -> Result<String, String> {
        let raw: [u8; 4] = self.take(4)?.try_into().map_err(|_| "short length")?;
        let len = u32::from_le_bytes(raw) as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "state string is not UTF-8".into())
    }
    fn finish(self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes after state", self.bytes.len()))
        }
    }
}
