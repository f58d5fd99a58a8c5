//! Entity state: how events fold into a user or an organization, and how that state
//! is encoded for the host and rendered as the JSON answer.
//!
//! Every fold here is a merge in a join-semilattice: each piece of state only moves
//! "up" (a later [`Stamp`]: event time, then place in the log), so folding a set of
//! records gives the same state whatever their order and however often each arrives.
//!
//! Encoding: `[body][header][u32 header length]`. The body is the JSON answer followed
//! by whatever strings the answer does not show verbatim; the header (tag, times,
//! where each field's value is in the body) is binary. The answer and the join key are
//! ranges of the state, so the host keeps each string once. A stamp the header would
//! repeat (a field set by the same event as the field before it, the creation's for
//! the first; the touched time when it is the creation's) is a flag bit, not 8-13
//! bytes: most users are only ever created, and their header carries one stamp.
//! A visible user's answer ends with its creation and touched times; the header
//! keeps only the creation's place in the log, and the times are read back from
//! the answer.

use std::borrow::Cow;
use std::ops::Range;

use crate::event::{Action, ORGANIZATION_NAME, USER_FIELDS};
use crate::json;
use crate::stamp::{Pos, Stamp};
use crate::time::{self, Micros};

/// One user field and the event time that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    /// The value.
    pub value: Cow<'a, str>,
    /// The event that set it.
    pub at: Stamp,
}

/// Everything known about one user id, including a deleted one: the deletion time is
/// kept so that older events never bring the user back. Strings are borrowed from the
/// prior state or the batch's events where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserState<'a> {
    /// The user's id.
    pub id: &'a str,
    /// The newest "User Created".
    pub created: Option<Stamp>,
    /// The newest "User Deleted".
    pub deleted: Option<Stamp>,
    /// Time of the newest "User Created" or "User Updated".
    pub touched: Option<Micros>,
    /// Field values, in the order of [`USER_FIELDS`].
    pub fields: [Option<Field<'a>>; 4],
}

/// An encoded state, with where its answer and join key are inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The state bytes.
    pub state: Vec<u8>,
    /// The JSON answer's range in `state`, when visible.
    pub view: Option<Range<u32>>,
    /// The join key's range in `state`.
    pub join: Option<Range<u32>>,
    /// The newest event time the state has seen (the host's event-time clock, and
    /// when a tombstone may expire).
    pub clock: Micros,
}

impl<'a> UserState<'a> {
    /// A user nothing is known about yet.
    pub fn new(id: &'a str) -> Self {
        Self {
            id,
            created: None,
            deleted: None,
            touched: None,
            fields: Default::default(),
        }
    }

    /// Folds one event in: `fields` in the order of [`USER_FIELDS`].
    ///
    /// Rules (each holds in any order):
    /// - a field takes a value only from an event newer than the one that set it
    ///   (newer by [`Stamp`]: equal event times are decided by the log);
    /// - "User Created" carries the whole record: fields set before the newest Created
    ///   are dropped;
    /// - "User Deleted" drops every field set at or before it; the user is visible
    ///   only while its newest Created is newer than its newest Deleted.
    pub fn apply(&mut self, action: Action, at: Stamp, fields: [Option<&'a str>; 4]) {
        match action {
            Action::Created => {
                raise(&mut self.created, at);
                raise(&mut self.touched, at.at);
                self.set_fields(fields, at);
            }
            Action::Updated => {
                raise(&mut self.touched, at.at);
                self.set_fields(fields, at);
            }
            Action::Deleted => raise(&mut self.deleted, at),
        }
        self.prune();
    }

    fn set_fields(&mut self, fields: [Option<&'a str>; 4], at: Stamp) {
        for (slot, value) in self.fields.iter_mut().zip(fields) {
            let Some(value) = value else { continue };
            let newer = match slot {
                None => true,
                Some(old) => (at, value) > (old.at, old.value.as_ref()),
            };
            if newer {
                *slot = Some(Field {
                    value: Cow::Borrowed(value),
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

    /// The newest event time of any event folded in so far (pruned fields included:
    /// their times are at most a kept created or deleted time).
    pub fn clock(&self) -> Micros {
        let stamps = [self.created, self.deleted]
            .into_iter()
            .flatten()
            .map(|s| s.at);
        let fields = self.fields.iter().flatten().map(|f| f.at.at);
        stamps
            .chain(fields)
            .chain(self.touched)
            .max()
            .unwrap_or(Micros::MIN)
    }

    /// Whether GET shows this user: created, and not deleted since.
    pub fn visible(&self) -> bool {
        match (self.created, self.deleted) {
            (Some(c), Some(d)) => c > d,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The organization name the user joins on.
    pub fn organization_name(&self) -> Option<&str> {
        self.fields[ORGANIZATION_NAME]
            .as_ref()
            .map(|f| f.value.as_ref())
    }

    /// Encodes the state; while visible, its answer (without the organization, which
    /// the host joins in) is the start of the body.
    pub fn encode(&self) -> Encoded {
        let mut body = String::with_capacity(384);
        let mut spans: [Option<Span>; 4] = [None; 4];
        let view = self.visible().then(|| {
            body.push_str("{\"id\":");
            push_json_str(&mut body, self.id);
            for ((name, field), span) in USER_FIELDS.iter().zip(&self.fields).zip(&mut spans) {
                body.push_str(",\"");
                body.push_str(name);
                body.push_str("\":");
                match field {
                    Some(f) => *span = Some(push_json_str(&mut body, &f.value)),
                    None => body.push_str("null"),
                }
            }
            push_time(&mut body, "created_at", self.created.map(|s| s.at));
            push_time(&mut body, "updated_at", self.touched);
            body.push('}');
            range(0, body.len())
        });
        for (field, span) in self.fields.iter().zip(&mut spans) {
            if let (Some(f), None) = (field, &span) {
                *span = Some(push_raw(&mut body, &f.value));
            }
        }
        let join = join_span(
            &mut body,
            spans[ORGANIZATION_NAME],
            self.organization_name(),
        );

        // A visible user's answer ends the body (unless the join key needed a raw copy)
        // and ends with its creation and touched times: they are read from there.
        let times_in_answer = view.as_ref().is_some_and(|v| v.end as usize == body.len())
            && self.created.is_some_and(|c| time::renders_exactly(c.at))
            && self.touched.is_none_or(time::renders_exactly);
        let tag = if times_in_answer {
            USER_TAG_TIMES_IN_ANSWER
        } else {
            USER_TAG
        };
        let mut h = Header::start(body, tag);
        let times = [
            self.created.is_some(),
            self.deleted.is_some(),
            self.touched.is_some(),
        ];
        // Most users are only ever created, so most stamps are the same: the touched
        // time is often the creation's, and a field's stamp often the one before it
        // in the header (the creation's for the first). Those are flagged, not written.
        let touched_is_created =
            self.touched.is_some() && self.touched == self.created.map(|c| c.at);
        let mut flags = u8::from(touched_is_created) << 7;
        for (i, t) in times.iter().enumerate() {
            flags |= u8::from(*t) << i;
        }
        let mut escaped = 0u8;
        let mut last = self.created;
        for (i, (field, span)) in self.fields.iter().zip(spans).enumerate() {
            flags |= u8::from(span.is_some()) << (3 + i);
            if let (Some(f), Some(span)) = (field, span) {
                escaped |= u8::from(span.escaped) << i;
                if last == Some(f.at) {
                    escaped |= 1 << (4 + i);
                }
                last = Some(f.at);
            }
        }
        h.u8(flags);
        h.u8(escaped);
        match (self.created, times_in_answer) {
            (Some(c), true) => h.pos(c.pos),
            (Some(c), false) => h.stamp(c),
            (None, _) => {}
        }
        if let Some(d) = self.deleted {
            h.stamp(d);
        }
        if let (Some(t), false, false) = (self.touched, touched_is_created, times_in_answer) {
            h.time(t);
        }
        for (i, (field, span)) in self.fields.iter().zip(spans).enumerate() {
            if let (Some(f), Some(span)) = (field, span) {
                if escaped & (1 << (4 + i)) == 0 {
                    h.stamp(f.at);
                }
                h.span(span);
            }
        }
        Encoded {
            state: h.finish(),
            view,
            join,
            clock: self.clock(),
        }
    }

    /// Decodes what [`UserState::encode`] wrote for user `id`, borrowing its strings
    /// from `bytes`. The id is not stored in the state: the host keys the state by it
    /// and hands it back with the entity.
    ///
    /// # Errors
    /// When `bytes` is not a user state of this encoding.
    pub fn decode(bytes: &'a [u8], id: &'a str) -> Result<Self, String> {
        let tags = [USER_TAG_TIMES_IN_ANSWER, USER_TAG, USER_TAG_FULL_STAMPS];
        let (tag, body, mut r) = split(bytes, &tags)?;
        let flags = r.u8()?;
        let escaped = r.u8()?;
        let missing = || "state refers to a stamp it does not have".to_owned();
        let in_answer = if tag == USER_TAG_TIMES_IN_ANSWER {
            if flags & 1 == 0 {
                return Err(missing());
            }
            Some(answer_times(body, flags & 4 != 0)?)
        } else {
            None
        };
        let created = if flags & 1 == 0 {
            None
        } else if let Some((at, _)) = in_answer {
            Some(Stamp::new(at, r.pos()?))
        } else {
            Some(r.stamp()?)
        };
        let deleted = if flags & 2 != 0 {
            Some(r.stamp()?)
        } else {
            None
        };
        let touched = match (in_answer, flags & 4 != 0, flags & 0x80 != 0) {
            (Some((_, touched)), _, _) => touched,
            (None, false, _) => None,
            (None, true, false) => Some(r.time()?),
            (None, true, true) => Some(created.ok_or_else(missing)?.at),
        };
        let mut fields: [Option<Field<'a>>; 4] = Default::default();
        let mut last = created;
        for (i, slot) in fields.iter_mut().enumerate() {
            if flags & (1 << (3 + i)) != 0 {
                let at = if escaped & (1 << (4 + i)) != 0 {
                    last.ok_or_else(missing)?
                } else {
                    r.stamp()?
                };
                last = Some(at);
                let value = r.value(body, escaped & (1 << i) != 0)?;
                *slot = Some(Field { value, at });
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

/// One organization record: the winning event of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Org<'a> {
    /// `organization_key`.
    pub key: Cow<'a, str>,
    /// `organization_name`: what users join on.
    pub name: Cow<'a, str>,
    /// `organization_tier`, if given.
    pub tier: Option<Cow<'a, str>>,
    /// `created_at`.
    pub created_at: Micros,
    /// The version that decides between two records (see [`crate::event::OrgEvent`]).
    pub version: Stamp,
}

/// The current record of one organization key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgState<'a> {
    /// The event that won.
    pub current: Org<'a>,
}

impl<'a> OrgState<'a> {
    /// The state after its first event.
    pub fn new(event: Org<'a>) -> Self {
        Self { current: event }
    }

    /// Replaces the organization if `event` is newer (by version, a [`Stamp`]: on equal
    /// times the later in the log wins; only a duplicate of the same record compares
    /// equal, and then the larger record wins so that the order never matters).
    pub fn apply(&mut self, event: Org<'a>) {
        if order_key(&event) > order_key(&self.current) {
            self.current = event;
        }
    }

    /// Encodes the state; its answer is the start of the body.
    pub fn encode(&self) -> Encoded {
        let o = &self.current;
        let mut body = String::with_capacity(192);
        body.push_str("{\"organization_key\":");
        let key = push_json_str(&mut body, &o.key);
        body.push_str(",\"organization_name\":");
        let name = push_json_str(&mut body, &o.name);
        body.push_str(",\"organization_tier\":");
        let tier = match &o.tier {
            Some(t) => Some(push_json_str(&mut body, t)),
            None => {
                body.push_str("null");
                None
            }
        };
        push_time(&mut body, "created_at", Some(o.created_at));
        body.push('}');
        let view = range(0, body.len());
        let join = join_span(&mut body, Some(name), Some(o.name.as_ref()));

        let mut h = Header::start(body, ORG_TAG);
        let escaped = |s: Option<Span>| u8::from(s.is_some_and(|s| s.escaped));
        h.u8(u8::from(tier.is_some())
            | escaped(Some(key)) << 1
            | escaped(Some(name)) << 2
            | escaped(tier) << 3);
        h.time(o.created_at);
        h.stamp(o.version);
        h.span(key);
        h.span(name);
        if let Some(t) = tier {
            h.span(t);
        }
        Encoded {
            state: h.finish(),
            view: Some(view),
            join,
            clock: o.version.at,
        }
    }

    /// Decodes what [`OrgState::encode`] wrote, borrowing its strings from `bytes`.
    ///
    /// # Errors
    /// When `bytes` is not an organization state of this encoding.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, String> {
        let (_, body, mut r) = split(bytes, &[ORG_TAG])?;
        let flags = r.u8()?;
        let created_at = r.time()?;
        let version = r.stamp()?;
        let key = r.value(body, flags & 2 != 0)?;
        let name = r.value(body, flags & 4 != 0)?;
        let tier = if flags & 1 != 0 {
            Some(r.value(body, flags & 8 != 0)?)
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            current: Org {
                key,
                name,
                tier,
                created_at,
                version,
            },
        })
    }
}

fn order_key<'b>(o: &'b Org<'_>) -> (Stamp, &'b str, Option<&'b str>, Micros) {
    (o.version, &o.name, o.tier.as_deref(), o.created_at)
}

fn raise<T: Ord + Copy>(slot: &mut Option<T>, at: T) {
    if slot.is_none_or(|old| at > old) {
        *slot = Some(at);
    }
}

/// Where a string is in a state's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    start: usize,
    len: usize,
    /// Stored JSON-escaped (inside the answer) rather than raw.
    escaped: bool,
}

fn range(start: usize, end: usize) -> Range<u32> {
    // States are bounded by the record size, far below 4 GiB.
    let at = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    at(start)..at(end)
}

/// The join key's range: the name inside the answer when it is stored raw there,
/// else a raw copy appended to the body.
fn join_span(body: &mut String, span: Option<Span>, name: Option<&str>) -> Option<Range<u32>> {
    match (span, name) {
        (Some(s), _) if !s.escaped => Some(range(s.start, s.start + s.len)),
        (_, Some(name)) => {
            let s = push_raw(body, name);
            Some(range(s.start, s.start + s.len))
        }
        (_, None) => None,
    }
}

fn push_raw(body: &mut String, s: &str) -> Span {
    let start = body.len();
    body.push_str(s);
    Span {
        start,
        len: s.len(),
        escaped: false,
    }
}

/// Appends `s` as a JSON string; returns where its content (inside the quotes) is.
pub(crate) fn push_json_str(out: &mut String, s: &str) -> Span {
    out.push('"');
    let start = out.len();
    // Most strings need no escaping: copy them whole.
    let escaped = json::plain_run(s.as_bytes(), 0) < s.len();
    if !escaped {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    out.push_str("\\u00");
                    let hex = b"0123456789abcdef";
                    out.push(char::from(hex[(c as usize) >> 4]));
                    out.push(char::from(hex[(c as usize) & 15]));
                }
                c => out.push(c),
            }
        }
    }
    let len = out.len() - start;
    out.push('"');
    Span {
        start,
        len,
        escaped,
    }
}

fn push_time(out: &mut String, name: &str, t: Option<Micros>) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
    match t {
        Some(t) => {
            out.push('"');
            time::render_into(out, t);
            out.push('"');
        }
        None => out.push_str("null"),
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Tags of this encoding. `U` and `O` were the encoding before stamps carried the
/// log position: such a state is refused with a hint, not misread.
const USER_TAG: u8 = b'v';
/// Users visible whose creation and touched times are read from the answer.
const USER_TAG_TIMES_IN_ANSWER: u8 = b'w';
/// Users as written before the shared stamps were flagged: every stamp written out,
/// the flag bits clear, so the one decoder reads both.
const USER_TAG_FULL_STAMPS: u8 = b'u';
const ORG_TAG: u8 = b'o';
const EARLIER_TAGS: [u8; 2] = [b'U', b'O'];

/// Writes the header after the body: little-endian times, LEB128 numbers.
struct Header {
    out: Vec<u8>,
    start: usize,
}

impl Header {
    fn start(body: String, tag: u8) -> Self {
        let mut out = body.into_bytes();
        out.reserve(64);
        let start = out.len();
        out.push(tag);
        Self { out, start }
    }
    fn u8(&mut self, b: u8) {
        self.out.push(b);
    }
    fn time(&mut self, t: Micros) {
        self.out.extend_from_slice(&t.to_le_bytes());
    }
    fn varint(&mut self, n: usize) {
        self.varint64(n as u64);
    }
    fn varint64(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.out.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.out.push(n as u8);
    }
    /// Time, then partition and offset zigzag-encoded (small and non-negative in
    /// practice), then the element index.
    fn stamp(&mut self, s: Stamp) {
        self.time(s.at);
        self.pos(s.pos);
    }
    fn pos(&mut self, p: Pos) {
        self.varint64(zigzag(i64::from(p.partition)));
        self.varint64(zigzag(p.offset));
        self.varint64(u64::from(p.item));
    }
    fn span(&mut self, s: Span) {
        self.varint(s.start);
        self.varint(s.len);
    }
    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.out.len() - self.start).unwrap_or(u32::MAX);
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out
    }
}

/// The creation and touched times at the end of a visible user's answer (the body
/// of a state tagged [`USER_TAG_TIMES_IN_ANSWER`]), as [`UserState::encode`] renders
/// them.
fn answer_times(body: &str, touched: bool) -> Result<(Micros, Option<Micros>), String> {
    let bad = || "state answer does not end with its times".to_owned();
    let last_time = |rest: &str| -> Result<(usize, Micros), String> {
        let at = rest.len().checked_sub(time::RENDERED_LEN).ok_or_else(bad)?;
        let text = rest.get(at..).ok_or_else(bad)?;
        Ok((at, time::parse_rendered(text).ok_or_else(bad)?))
    };
    let rest = body.strip_suffix('}').ok_or_else(bad)?;
    let (rest, touched) = if touched {
        let rest = rest.strip_suffix('"').ok_or_else(bad)?;
        let (at, t) = last_time(rest)?;
        let rest = rest[..at].strip_suffix("\",\"updated_at\":\"");
        (rest.ok_or_else(bad)?, Some(t))
    } else {
        let rest = rest.strip_suffix("\",\"updated_at\":null");
        (rest.ok_or_else(bad)?, None)
    };
    let (at, created) = last_time(rest)?;
    if !rest[..at].ends_with("\"created_at\":\"") {
        return Err(bad());
    }
    Ok((created, touched))
}

/// Splits a state into its tag, its body (UTF-8) and a reader of its header.
fn split<'b>(bytes: &'b [u8], tags: &[u8]) -> Result<(u8, &'b str, Reader<'b>), String> {
    let (rest, len) = bytes.split_last_chunk::<4>().ok_or("state is truncated")?;
    let len = u32::from_le_bytes(*len) as usize;
    let at = rest
        .len()
        .checked_sub(len)
        .ok_or("state header length is out of range")?;
    let (body, header) = rest.split_at(at);
    let body = std::str::from_utf8(body).map_err(|_| "state body is not UTF-8")?;
    match header.split_first() {
        Some((t, header)) if tags.contains(t) => Ok((*t, body, Reader { bytes: header })),
        Some((t, _)) if EARLIER_TAGS.contains(t) => Err(
            "state written by an earlier version of this reducer (without log positions): \
             swap with mode=replay to rebuild it"
                .into(),
        ),
        _ => Err(format!(
            "state does not have tag {:?}",
            tags.first().map_or('?', |t| *t as char)
        )),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("state is truncated".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn time(&mut self) -> Result<Micros, String> {
        let raw: [u8; 8] = self.take(8)?.try_into().map_err(|_| "short time")?;
        Ok(Micros::from_le_bytes(raw))
    }
    fn varint(&mut self) -> Result<usize, String> {
        usize::try_from(self.varint64()?).map_err(|_| "state number is too large".into())
    }
    fn varint64(&mut self) -> Result<u64, String> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("state number is too long".into())
    }
    fn stamp(&mut self) -> Result<Stamp, String> {
        let at = self.time()?;
        Ok(Stamp::new(at, self.pos()?))
    }
    fn pos(&mut self) -> Result<Pos, String> {
        let partition = i32::try_from(unzigzag(self.varint64()?))
            .map_err(|_| "state partition is out of range")?;
        let offset = unzigzag(self.varint64()?);
        let item = u32::try_from(self.varint64()?).map_err(|_| "state item is out of range")?;
        Ok(Pos {
            partition,
            offset,
            item,
        })
    }
    /// A string of `body` at the next span, unescaped if it is stored escaped.
    fn value<'b>(&mut self, body: &'b str, escaped: bool) -> Result<Cow<'b, str>, String> {
        let start = self.varint()?;
        let len = self.varint()?;
        let end = start.checked_add(len).ok_or("state span overflows")?;
        if !escaped {
            return body
                .get(start..end)
                .map(Cow::Borrowed)
                .ok_or_else(|| "state span is out of range".into());
        }
        let quoted = start
            .checked_sub(1)
            .and_then(|s| body.get(s..end + 1))
            .ok_or("state span is out of range")?;
        json::string_literal(quoted).map_err(|e| format!("state string: {e}"))
    }
    fn finish(self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes after state", self.bytes.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Micros = 1_600_000_000_000_001;

    /// The user [`EVERY_STAMP_WRITTEN`] holds: visible, touched after its creation,
    /// one field set by the creation, one by an update, one missing, the last by the
    /// creation again.
    fn user() -> UserState<'static> {
        let created = Stamp::of(T, 1, 300, 0);
        let field = |value: &'static str, at| {
            Some(Field {
                value: Cow::Borrowed(value),
                at,
            })
        };
        UserState {
            id: "u-1",
            created: Some(created),
            deleted: Some(Stamp::of(1_500_000_000_000_000, 0, 7, 2)),
            touched: Some(T + 8),
            fields: [
                field("snake", created),
                field("a\"b", Stamp::of(T + 8, 2, 9, 1)),
                None,
                field("MGS", created),
            ],
        }
    }

    /// [`user`] as the reducer wrote it before shared stamps were flagged (tag `u`,
    /// every stamp written out): printed by that build, not by this code.
    const EVERY_STAMP_WRITTEN: (&str, &[u8]) = (
        r#"{"id":"u-1","username":"snake","user_email":"a\"b","user_type":null,"organization_name":"MGS","created_at":"2020-09-13T12:26:40.000001Z","updated_at":"2020-09-13T12:26:40.000009Z"}"#,
        b"\x75\x5f\x02\x01\x00\xa4\x07\x31\xaf\x05\x00\x02\xd8\x04\x00\x00\xc0\x29\xf7\x3d\x54\x05\x00\x00\x0e\x02\x09\x00\xa4\x07\x31\xaf\x05\x00\x01\x00\xa4\x07\x31\xaf\x05\x00\x02\xd8\x04\x00\x18\x05\x09\x00\xa4\x07\x31\xaf\x05\x00\x04\x12\x01\x2d\x04\x01\x00\xa4\x07\x31\xaf\x05\x00\x02\xd8\x04\x00\x59\x03\x4b\x00\x00\x00",
    );

    #[test]
    fn a_state_with_every_stamp_written_still_decodes_and_is_rewritten_shorter() {
        let (body, header) = EVERY_STAMP_WRITTEN;
        let old = [body.as_bytes(), header].concat();
        let decoded = UserState::decode(&old, "u-1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(decoded, user());
        let again = decoded.encode();
        assert_eq!(&again.state[..body.len()], body.as_bytes(), "the same body");
        assert_eq!(again.state[body.len()], USER_TAG_TIMES_IN_ANSWER);
        // Field 0's stamp is the creation's, so it is not written (8-byte time,
        // partition, offset 300 in 2 bytes, item: 12 bytes); field 3 follows the
        // update's, so it is. The creation's and the touched times are read from the
        // answer (8 bytes each).
        assert_eq!(again.state.len(), old.len() - 12 - 8 - 8);
        assert_eq!(UserState::decode(&again.state, "u-1"), Ok(user()));
    }

    /// Every pattern of stamps a user can have (each time present or not, each
    /// field missing, from the creation, from the same event as the field before
    /// or from one of its own, the touched time the creation's or not) decodes to
    /// what was encoded.
    #[test]
    fn every_pattern_of_shared_stamps_round_trips() {
        let created = Stamp::of(T, 3, 1_000, 0);
        let update = |n: i64| Stamp::of(T + n, 0, 2_000 + n, 1);
        let mut checked = 0;
        for times in 0..8u8 {
            for touched_at in [T, T + 5] {
                for pattern in 0..4u32.pow(4) {
                    let mut fields: [Option<Field<'_>>; 4] = Default::default();
                    let mut p = pattern;
                    for (i, f) in fields.iter_mut().enumerate() {
                        let at = match p % 4 {
                            0 => None,
                            1 => Some(created),
                            2 => Some(update(1)),
                            _ => Some(update(i as i64 + 2)),
                        };
                        p /= 4;
                        *f = at.map(|at| Field {
                            value: Cow::Owned(format!("v{i}")),
                            at,
                        });
                    }
                    let user = UserState {
                        id: "u",
                        created: (times & 1 != 0).then_some(created),
                        deleted: (times & 2 != 0).then_some(update(9)),
                        touched: (times & 4 != 0).then_some(touched_at),
                        fields,
                    };
                    let e = user.encode();
                    assert_eq!(
                        UserState::decode(&e.state, "u").as_ref(),
                        Ok(&user),
                        "pattern {pattern} times {times}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 8 * 2 * 256);
    }

    #[test]
    fn a_user_only_created_carries_one_stamp() {
        let created = Stamp::of(T, 1, 1_000_000, 0);
        let mut user = UserState::new("u");
        user.apply(
            crate::event::Action::Created,
            created,
            [Some("a"), Some("b"), Some("c"), Some("d")],
        );
        let e = user.encode();
        let header = u32::from_le_bytes(*e.state.last_chunk::<4>().unwrap_or(&[0; 4])) as usize;
        // Tag, flags, escapes, the stamp's place in the log (partition, offset in 3
        // bytes, item: its time is the answer's created_at), then a start and a
        // length per field.
        assert_eq!(
            e.state[e.state.len() - 4 - header],
            USER_TAG_TIMES_IN_ANSWER
        );
        assert_eq!(header, 1 + 2 + (1 + 3 + 1) + 4 * 2);
        assert_eq!(UserState::decode(&e.state, "u"), Ok(user));
    }

    #[test]
    fn a_flag_pointing_at_a_stamp_that_is_not_there_is_an_error() {
        // Tag `v`, flags: touched present, touched = the creation's time, but no
        // creation.
        let bytes = b"v\x84\x00\x03\x00\x00\x00";
        let err = UserState::decode(bytes, "u").unwrap_err();
        assert!(err.contains("stamp it does not have"), "{err}");
    }

    /// Where the answer does not end the body (the organization name needs a raw
    /// copy for the join) or a time does not render back to itself, the times stay
    /// in the header.
    #[test]
    fn a_visible_user_whose_answer_cannot_give_its_times_back_keeps_them() {
        let year_10000 = 253_402_300_800_000_000;
        for (name, at) in [("Outer \"Heaven\"", T), ("MGS", year_10000)] {
            let mut user = UserState::new("u");
            user.apply(
                crate::event::Action::Created,
                Stamp::of(at, 0, 1, 0),
                [Some("a"), None, None, Some(name)],
            );
            user.apply(
                crate::event::Action::Updated,
                Stamp::of(at + 1, 0, 2, 0),
                [None, Some("b"), None, None],
            );
            let e = user.encode();
            assert!(e.view.is_some(), "visible");
            let header = u32::from_le_bytes(*e.state.last_chunk::<4>().unwrap_or(&[0; 4]));
            let tag = e.state[e.state.len() - 4 - header as usize];
            assert_eq!(tag, USER_TAG, "{name} {at}");
            assert_eq!(UserState::decode(&e.state, "u"), Ok(user));
        }
    }

    #[test]
    fn an_answer_that_does_not_end_with_its_times_is_an_error() {
        let user = user();
        let e = user.encode();
        assert_eq!(UserState::decode(&e.state, "u-1"), Ok(user));
        // The same state with the answer's last time cut short by one digit.
        let view_end = e.view.map_or(0, |v| v.end as usize);
        let mut cut = e.state.clone();
        cut.remove(view_end - 3);
        let err = UserState::decode(&cut, "u-1").unwrap_err();
        assert!(
            err.contains("does not end with its times") || err.contains("timestamp"),
            "{err}"
        );
    }
}
