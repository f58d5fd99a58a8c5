//! Snapshots of the state for fast, exact restarts: the state, the offsets it reflects
//! and the reducer that made it, written atomically (temp file, fsync, rename) with a
//! checksum. A snapshot that is corrupt, truncated or made by another reducer is
//! reported and skipped, never trusted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use logq_abi::{Entity, Kind, Reader, Source, Update};

use crate::broker::{Partition, Positions};
use crate::fold::sha256_hex;
use crate::state::export::{Frozen, Part};
use crate::state::refused::Refused;

/// Format 5: the refused records are kept too (a swap preview compares them).
/// Format 4 gave each entity its clock (event time), so tombstones still expire
/// after a restart. Format 3 keyed offsets by stream and partition (format 2 by a
/// topic index).
const MAGIC: &[u8; 8] = b"LOGQSNP5";
/// Every format so far starts with this.
const MAGIC_FAMILY: &[u8; 7] = b"LOGQSNP";
/// How many snapshots are kept; older ones are deleted after a new one is written.
const KEEP: usize = 3;

/// Everything a snapshot holds.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// sha256 of the reducer whose states these are.
    pub reducer_sha256: String,
    /// The topics, in order (users first), the offsets refer to.
    pub topics: Vec<String>,
    /// Next offset to fold, per partition.
    pub offsets: Positions,
    /// Every stored entity, and whether `reducer_sha256` rendered its answer (not an
    /// earlier reducer, before a forward swap).
    pub entities: Vec<(Entity, Update, bool)>,
    /// The records that reducer refused.
    pub refused: Refused,
}

/// Why a snapshot was not used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a whole, intact snapshot.
    #[error("corrupt snapshot: {0}")]
    Corrupt(String),
    /// Made by another reducer or for other topics.
    #[error("snapshot does not match: {0}")]
    Mismatch(String),
    /// The state was replaced (a handover) while it was read for the snapshot: no
    /// fault, a snapshot of the new state comes in the next interval.
    #[error("the state was replaced while it was read (a handover)")]
    Cut,
}

/// Writes `snapshot` into `dir` atomically and keeps the newest few.
///
/// # Errors
/// I/O errors; the previous snapshots stay.
pub fn write(
    dir: &Path,
    snapshot: &Snapshot,
    stamp_millis: u128,
) -> Result<PathBuf, SnapshotError> {
    write_with(dir, stamp_millis, |sink| {
        encode_into(sink, snapshot)?;
        Ok(())
    })
}

/// What a snapshot says besides its entities.
#[derive(Debug, Clone)]
pub struct Header {
    /// sha256 of the reducer whose states these are.
    pub reducer_sha256: String,
    /// The topics, in order (users first), the offsets refer to.
    pub topics: Vec<String>,
    /// Next offset to fold, per partition.
    pub offsets: Positions,
}

/// Writes a snapshot of `frozen` (with `header` and `refused`) into `dir` as
/// [`write`] does, encoding each entity straight from the store into the file: no
/// copy of the state, and no copy of the file, is held meanwhile. Returns the path
/// and how many entities it holds.
///
/// # Errors
/// I/O errors, or [`SnapshotError::Cut`]; the previous snapshots stay.
pub fn write_frozen(
    dir: &Path,
    header: &Header,
    frozen: Frozen,
    refused: &Refused,
    stamp_millis: u128,
) -> Result<(PathBuf, usize), SnapshotError> {
    let count = frozen.len();
    let mut cut = false;
    let written = write_with(dir, stamp_millis, |sink| {
        let mut e = Encoder::new(sink);
        e.header(header, count as u64);
        let mut io = Ok(());
        let read = frozen.each(|part| {
            if io.is_ok() {
                e.entity(&part);
                io = e.spill_if_full();
            }
        });
        io?;
        if let Err(replaced) = read {
            cut = true;
            return Err(std::io::Error::other(replaced.to_string()));
        }
        e.finish(refused)
    });
    match written {
        Err(_) if cut => Err(SnapshotError::Cut),
        written => Ok((written?, count)),
    }
}

/// Which file of a split snapshot (a sharing host's, one per partition) an entity
/// goes to. A partition that comes to a host is restored from its own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Share {
    /// The users of one partition of the users topic.
    Users(i32),
    /// Every organization (every host holds them all).
    Organizations,
}

impl Share {
    /// The directory of this share's snapshots under `root` (the `--state-dir`).
    pub fn dir(self, root: &Path) -> PathBuf {
        match self {
            Share::Users(p) => root.join(format!("users-{p}")),
            Share::Organizations => root.join("organizations"),
        }
    }

    /// Whether `p` is read for this share.
    pub fn reads(self, p: Partition) -> bool {
        match self {
            Share::Users(id) => p.source == Source::Users && p.id == id,
            Share::Organizations => p.source == Source::Organizations,
        }
    }
}

/// Writes a snapshot of `frozen` split by [`Share`]: one file per users partition in
/// `header`'s offsets (the users `partition_of` puts there), one of the
/// organizations, each under [`Share::dir`] of `root` with that share's offsets and
/// refusals, written as [`write_frozen`] writes one (in one pass over the state; no
/// copy of it is held). Users of partitions not in the offsets (handed over, still
/// answering here) are left out. Returns how many files and entities.
///
/// # Errors
/// I/O errors, or [`SnapshotError::Cut`]; the previous snapshots stay.
pub fn write_frozen_split(
    root: &Path,
    header: &Header,
    frozen: Frozen,
    refused: &Refused,
    stamp_millis: u128,
    partition_of: &dyn Fn(&str) -> Option<i32>,
) -> Result<(usize, usize), SnapshotError> {
    let shares: Vec<Share> = header
        .offsets
        .keys()
        .map(|p| match p.source {
            Source::Users => Share::Users(p.id),
            Source::Organizations => Share::Organizations,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let share_of = |kind: Kind, key: &str| match kind {
        Kind::Organization => shares.binary_search(&Share::Organizations).ok(),
        Kind::User => partition_of(key).and_then(|p| shares.binary_search(&Share::Users(p)).ok()),
    };
    let mut counts = vec![0u64; shares.len()];
    frozen.each_key(|kind, key| {
        if let Some(i) = share_of(kind, key) {
            counts[i] += 1;
        }
    });
    let mut files = Vec::with_capacity(shares.len());
    for share in &shares {
        match Pending::create(&share.dir(root), stamp_millis) {
            Ok(f) => files.push(f),
            Err(e) => {
                files.into_iter().for_each(Pending::abandon);
                return Err(e.into());
            }
        }
    }
    let mut cut = false;
    let encoded = (|| {
        let mut encoders: Vec<Encoder<'_>> = files
            .iter_mut()
            .zip(&shares)
            .zip(&counts)
            .map(|((f, share), n)| {
                let mut e = Encoder::new(&mut f.sink);
                e.header(
                    &Header {
                        offsets: header
                            .offsets
                            .iter()
                            .filter(|(p, _)| share.reads(**p))
                            .map(|(p, o)| (*p, *o))
                            .collect(),
                        ..header.clone()
                    },
                    *n,
                );
                e
            })
            .collect();
        let mut io = Ok(());
        let read = frozen.each(|part| {
            if io.is_ok()
                && let Some(i) = share_of(part.kind, part.key)
            {
                encoders[i].entity(&part);
                io = encoders[i].spill_if_full();
            }
        });
        io?;
        if read.is_err() {
            cut = true;
            return Err(std::io::Error::other("the state was replaced"));
        }
        for (e, share) in encoders.into_iter().zip(&shares) {
            let theirs: Vec<(Partition, i64, String)> = refused
                .iter()
                .filter(|(p, _, _)| share.reads(*p))
                .map(|(p, o, why)| (p, o, why.to_owned()))
                .collect();
            e.finish(&Refused::from_parts(theirs, refused.complete()))?;
        }
        Ok(())
    })();
    if let Err(e) = encoded {
        files.into_iter().for_each(Pending::abandon);
        return Err(if cut { SnapshotError::Cut } else { e.into() });
    }
    let n = files.len();
    let mut failed = None;
    for f in files {
        if failed.is_some() {
            f.abandon();
        } else if let Err(e) = f.commit() {
            failed = Some(e);
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok((n, counts.iter().sum::<u64>() as usize)),
    }
}

/// A snapshot file being written: a temp file, renamed when whole.
struct Pending {
    dir: PathBuf,
    tmp: PathBuf,
    path: PathBuf,
    sink: std::io::BufWriter<std::fs::File>,
}

impl Pending {
    fn create(dir: &Path, stamp_millis: u128) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("snapshot-{stamp_millis:020}.bin"));
        let tmp = dir.join(format!(".snapshot-{stamp_millis:020}.tmp"));
        let f = std::fs::File::create(&tmp)?;
        Ok(Self {
            dir: dir.to_owned(),
            tmp,
            path,
            sink: std::io::BufWriter::with_capacity(1 << 16, f),
        })
    }

    /// Syncs and renames the file, syncs its directory, and deletes all but the newest
    /// few snapshots there. On an error the temp file is deleted.
    fn commit(self) -> std::io::Result<PathBuf> {
        let Self {
            dir,
            tmp,
            path,
            sink,
        } = self;
        let written = sink
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            // A full disk must not also keep the half-written file.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        for old in list(&dir)?.into_iter().skip(KEEP) {
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }

    /// Deletes the temp file (a cut read or a failed sibling).
    fn abandon(self) {
        drop(self.sink);
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes a snapshot file through `fill` into `dir` atomically (a temp file, fsync,
/// rename) and keeps the newest few.
fn write_with(
    dir: &Path,
    stamp_millis: u128,
    fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<PathBuf, SnapshotError> {
    let mut file = Pending::create(dir, stamp_millis)?;
    if let Err(e) = fill(&mut file.sink) {
        // A full disk (or a cut read) must not also keep the half-written file.
        file.abandon();
        return Err(e.into());
    }
    Ok(file.commit()?)
}

/// Deletes half-written snapshots a killed process left in `dir` (they are never
/// read: only renamed, complete files count); returns how many.
pub fn remove_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".snapshot-") && n.ends_with(".tmp"))
        })
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// The newest snapshot in `dir` that is intact and matches `reducer_sha256` and
/// `topics`; every one skipped on the way is logged with the reason.
pub fn load_newest(
    dir: &Path,
    reducer_sha256: &str,
    topics: &[&str],
) -> Option<(Snapshot, PathBuf)> {
    let files = match list(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("snapshots in {}: {e}", dir.display());
            return None;
        }
    };
    for path in files {
        let checked = std::fs::read(&path)
            .map_err(SnapshotError::from)
            .and_then(|b| decode(&b))
            .and_then(|s| {
                if s.reducer_sha256 != reducer_sha256 {
                    Err(SnapshotError::Mismatch(format!(
                        "made by reducer {}, the active one is {reducer_sha256}",
                        s.reducer_sha256
                    )))
                } else if s.topics != topics {
                    Err(SnapshotError::Mismatch(format!(
                        "made for topics {:?}, consuming {topics:?}",
                        s.topics
                    )))
                } else {
                    Ok(s)
                }
            });
        match checked {
            Ok(s) => return Some((s, path)),
            Err(e) => tracing::warn!("skipping snapshot {}: {e}", path.display()),
        }
    }
    None
}

/// Snapshot files, newest first.
fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(".bin"))
        })
        .collect();
    files.sort();
    files.reverse();
    Ok(files)
}

#[cfg(test)]
fn encode(s: &Snapshot) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, s).expect("a Vec takes every byte");
    out
}

/// Encodes `s` into `sink`.
fn encode_into(sink: &mut dyn std::io::Write, s: &Snapshot) -> std::io::Result<()> {
    let mut e = Encoder::new(sink);
    let header = Header {
        reducer_sha256: s.reducer_sha256.clone(),
        topics: s.topics.clone(),
        offsets: s.offsets.clone(),
    };
    e.header(&header, s.entities.len() as u64);
    for (entity, u, mine) in &s.entities {
        e.entity(&Part::of(entity, u, *mine));
        e.spill_if_full()?;
    }
    e.finish(&s.refused)
}

/// Bytes an [`Encoder`] gathers before it hands them on.
const SPILL_AT: usize = 1 << 16;

/// Encodes a snapshot a piece at a time into a sink, hashing what it hands on for
/// the checksum at the end (the sha256 of every byte before it, in hex).
struct Encoder<'w> {
    sink: &'w mut dyn std::io::Write,
    out: Vec<u8>,
    hash: sha2::Sha256,
}

impl<'w> Encoder<'w> {
    fn new(sink: &'w mut dyn std::io::Write) -> Self {
        use sha2::Digest as _;
        Self {
            sink,
            out: Vec::with_capacity(SPILL_AT + 4096),
            hash: sha2::Sha256::new(),
        }
    }

    fn header(&mut self, h: &Header, entities: u64) {
        let out = &mut self.out;
        out.extend_from_slice(MAGIC);
        put_bytes(out, h.reducer_sha256.as_bytes());
        out.extend_from_slice(&(h.topics.len() as u32).to_le_bytes());
        for t in &h.topics {
            put_bytes(out, t.as_bytes());
        }
        out.extend_from_slice(&(h.offsets.len() as u32).to_le_bytes());
        for (p, &o) in &h.offsets {
            out.push(p.source.byte());
            out.extend_from_slice(&p.id.to_le_bytes());
            out.extend_from_slice(&o.to_le_bytes());
        }
        out.extend_from_slice(&entities.to_le_bytes());
    }

    fn entity(&mut self, p: &Part<'_>) {
        let out = &mut self.out;
        out.push(p.kind.byte());
        out.push(u8::from(p.mine));
        put_bytes(out, p.key.as_bytes());
        put_opt(out, p.state);
        for range in [p.view, p.join] {
            match range {
                Some(r) => {
                    out.push(1);
                    out.extend_from_slice(&r.start.to_le_bytes());
                    out.extend_from_slice(&r.end.to_le_bytes());
                }
                None => out.push(0),
            }
        }
        match p.clock {
            Some(c) => {
                out.push(1);
                out.extend_from_slice(&c.to_le_bytes());
            }
            None => out.push(0),
        }
    }

    /// Hands on what was gathered once it is [`SPILL_AT`] bytes.
    fn spill_if_full(&mut self) -> std::io::Result<()> {
        if self.out.len() >= SPILL_AT {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> std::io::Result<()> {
        use sha2::Digest as _;
        self.hash.update(&self.out);
        self.sink.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// The refused records and the checksum.
    fn finish(mut self, refused: &Refused) -> std::io::Result<()> {
        use sha2::Digest as _;
        let out = &mut self.out;
        out.push(u8::from(refused.complete()));
        out.extend_from_slice(&(refused.len() as u64).to_le_bytes());
        for (p, offset, reason) in refused.iter() {
            out.push(p.source.byte());
            out.extend_from_slice(&p.id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            put_bytes(out, reason.as_bytes());
        }
        self.spill()?;
        let sum: String = std::mem::take(&mut self.hash)
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.sink.write_all(sum.as_bytes())
    }
}

fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let corrupt = |m: String| SnapshotError::Corrupt(m);
    if bytes.len() >= MAGIC.len()
        && bytes.starts_with(MAGIC_FAMILY)
        && &bytes[..MAGIC.len()] != MAGIC
    {
        return Err(SnapshotError::Mismatch(format!(
            "written by another version of logq (format {:?}, this one reads {:?})",
            String::from_utf8_lossy(&bytes[MAGIC_FAMILY.len()..MAGIC.len()]),
            String::from_utf8_lossy(&MAGIC[MAGIC_FAMILY.len()..]),
        )));
    }
    if bytes.len() < MAGIC.len() + 64 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt(
            "not a logq snapshot (bad magic or too short)".into(),
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 64);
    if sha256_hex(body).as_bytes() != sum {
        return Err(corrupt("checksum mismatch (truncated or damaged)".into()));
    }
    let mut r = Reader::new(&body[MAGIC.len()..]);
    let reducer_sha256 = string(&mut r)?;
    let topics = (0..r.u32().map_err(corrupt)?)
        .map(|_| string(&mut r))
        .collect::<Result<_, _>>()?;
    let mut offsets = BTreeMap::new();
    for _ in 0..r.u32().map_err(corrupt)? {
        let source = Source::from_byte(r.u8().map_err(corrupt)?).map_err(corrupt)?;
        let id = i32::from_le_bytes(r.array().map_err(corrupt)?);
        let o = i64::from_le_bytes(r.array().map_err(corrupt)?);
        offsets.insert(Partition { source, id }, o);
    }
    let n = u64::from_le_bytes(r.array().map_err(corrupt)?);
    let mut entities = Vec::new();
    for _ in 0..n {
        let kind = Kind::from_byte(r.u8().map_err(corrupt)?).map_err(corrupt)?;
        let mine = match r.u8().map_err(corrupt)? {
            0 => false,
            1 => true,
            f => return Err(corrupt(format!("bad renderer flag {f}"))),
        };
        let key = string(&mut r)?;
        let state = match r.u8().map_err(corrupt)? {
            0 => None,
            1 => Some(r.frame().map_err(corrupt)?.to_vec()),
            f => return Err(corrupt(format!("bad flag {f}"))),
        };
        let view = range(&mut r, state.as_deref())?;
        let join = range(&mut r, state.as_deref())?;
        let clock = match r.u8().map_err(corrupt)? {
            0 => None,
            1 => Some(i64::from_le_bytes(r.array().map_err(corrupt)?)),
            f => return Err(corrupt(format!("bad clock flag {f}"))),
        };
        let update = Update {
            state,
            view,
            join,
            clock,
        };
        entities.push((Entity { kind, key }, update, mine));
    }
    let complete = match r.u8().map_err(corrupt)? {
        0 => false,
        1 => true,
        f => return Err(corrupt(format!("bad refusals flag {f}"))),
    };
    let mut refused = Vec::new();
    for _ in 0..u64::from_le_bytes(r.array().map_err(corrupt)?) {
        let source = Source::from_byte(r.u8().map_err(corrupt)?).map_err(corrupt)?;
        let id = i32::from_le_bytes(r.array().map_err(corrupt)?);
        let offset = i64::from_le_bytes(r.array().map_err(corrupt)?);
        refused.push((Partition { source, id }, offset, string(&mut r)?));
    }
    if !r.is_empty() {
        return Err(corrupt("trailing bytes".into()));
    }
    Ok(Snapshot {
        reducer_sha256,
        topics,
        offsets,
        entities,
        refused: Refused::from_parts(refused, complete),
    })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    logq_abi::put_frame(out, b);
}

fn put_opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
        None => out.push(0),
    }
}

fn string(r: &mut Reader<'_>) -> Result<String, SnapshotError> {
    let bytes = r.frame().map_err(SnapshotError::Corrupt)?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| SnapshotError::Corrupt("text is not UTF-8".into()))
}

/// A range of `state` holding UTF-8 text (an answer or a join key), checked.
fn range(
    r: &mut Reader<'_>,
    state: Option<&[u8]>,
) -> Result<Option<std::ops::Range<u32>>, SnapshotError> {
    let corrupt = SnapshotError::Corrupt;
    if r.u8().map_err(corrupt)? == 0 {
        return Ok(None);
    }
    let range = r.u32().map_err(corrupt)?..r.u32().map_err(corrupt)?;
    let state = state.ok_or_else(|| corrupt("a range without a state".into()))?;
    logq_abi::text_in(state, &range).map_err(|e| corrupt(e.to_string()))?;
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            reducer_sha256: "abc".into(),
            topics: vec!["users".into(), "organizations".into()],
            offsets: [
                (Source::Users, 0, 10),
                (Source::Users, 1, 7),
                (Source::Organizations, 0, 3),
            ]
            .into_iter()
            .map(|(source, id, o)| (Partition { source, id }, o))
            .collect(),
            entities: vec![
                (
                    Entity {
                        kind: Kind::User,
                        key: "u".into(),
                    },
                    super::super::test_update(Some("{\"id\":\"u\"}"), Some("MGS")),
                    true,
                ),
                (
                    Entity {
                        kind: Kind::Organization,
                        key: "k".into(),
                    },
                    Update {
                        state: Some(vec![]),
                        view: None,
                        join: None,
                        clock: Some(-42),
                    },
                    false,
                ),
            ],
            refused: {
                let mut r = Refused::default();
                let p = |id| Partition {
                    source: Source::Users,
                    id,
                };
                r.insert(p(1), 5, "not JSON");
                r.insert(p(0), 2, "events 0,2: no id");
                r
            },
        }
    }

    fn same(a: &Snapshot, b: &Snapshot) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert!(same(&decode(&encode(&s)).unwrap(), &s));
    }

    /// A store of `n` users (a few of them tombstones) and an organization, with
    /// renderer 1 the active one for most.
    fn store_of(n: usize) -> crate::state::Writer {
        let store = crate::state::Writer::new_store();
        let (keys, updates): (Vec<_>, Vec<_>) = (0..n)
            .map(|i| {
                let key = format!("user-{i:06}");
                let view = format!("{{\"id\":\"{key}\",\"pad\":\"{}\"}}", "x".repeat(i % 200));
                let update = if i % 17 == 0 {
                    super::super::test_update(None, None)
                } else {
                    super::super::test_update(Some(&view), Some("MGS"))
                };
                (
                    Entity {
                        kind: Kind::User,
                        key,
                    },
                    update,
                )
            })
            .chain([(
                Entity {
                    kind: Kind::Organization,
                    key: "k".into(),
                },
                super::super::test_update(Some("{\"organization_key\":\"k\"}"), None),
            )])
            .unzip();
        store.apply(&keys, updates);
        store
    }

    /// Its entities in one order, for comparing.
    fn sorted(mut s: Snapshot) -> Snapshot {
        s.entities
            .sort_by(|a, b| (a.0.kind.byte(), &a.0.key).cmp(&(b.0.kind.byte(), &b.0.key)));
        s
    }

    #[test]
    fn a_frozen_state_written_straight_from_the_store_reads_back_as_its_dump() {
        let dir = std::env::temp_dir().join(format!("logq-frozen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Several hundred kilobytes: the encoder hands its bytes on many times.
        let store = store_of(5000);
        let mut dumped = sample();
        dumped.entities = store.dump(1);
        let header = Header {
            reducer_sha256: dumped.reducer_sha256.clone(),
            topics: dumped.topics.clone(),
            offsets: dumped.offsets.clone(),
        };
        let frozen = store.freeze(&dumped.offsets, 1);
        // Changed after the freeze: not in the file.
        store.forget_users(|k| k.ends_with('3'));
        let (path, n) = write_frozen(&dir, &header, frozen, &dumped.refused, 7).unwrap();
        assert_eq!(n, 5001);
        assert!(std::fs::metadata(&path).unwrap().len() > 4 * SPILL_AT as u64);
        let read = decode(&std::fs::read(&path).unwrap()).unwrap();
        assert!(same(&sorted(read), &sorted(dumped)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_frozen_state_replaced_while_written_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("logq-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = store_of(100);
        let header = Header {
            reducer_sha256: "abc".into(),
            topics: vec!["users".into(), "organizations".into()],
            offsets: Positions::new(),
        };
        let frozen = store.freeze(&Positions::new(), 1);
        store.replace(crate::state::Writer::new_store());
        let cut = write_frozen(&dir, &header, frozen, &Refused::default(), 8);
        assert!(matches!(cut, Err(SnapshotError::Cut)), "{cut:?}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "no file, no temp file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_snapshot_of_another_format_says_so() {
        let mut bytes = encode(&sample());
        bytes[7] = b'4';
        let e = decode(&bytes).unwrap_err();
        assert!(matches!(e, SnapshotError::Mismatch(_)), "{e}");
        assert!(
            e.to_string()
                .contains("another version of logq (format \"4\", this one reads \"5\")"),
            "{e}"
        );
    }

    #[test]
    fn every_truncation_and_any_flipped_byte_is_refused() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flipped byte {i}");
        }
    }

    #[test]
    fn newest_matching_snapshot_wins_and_bad_ones_are_skipped() {
        let dir = std::env::temp_dir().join(format!("logq-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let topics = ["users", "organizations"];
        let good = sample();
        write(&dir, &good, 1).unwrap();
        let mut other = sample();
        other.reducer_sha256 = "other".into();
        write(&dir, &other, 2).unwrap();
        let p3 = write(&dir, &good, 3).unwrap();
        // The newest is truncated: skipped; the next is another reducer's: skipped.
        let b = std::fs::read(&p3).unwrap();
        std::fs::write(&p3, &b[..b.len() / 2]).unwrap();
        let (s, path) = load_newest(&dir, "abc", &topics).expect("the oldest is good");
        assert!(same(&s, &good));
        assert!(
            path.ends_with("snapshot-00000000000000000001.bin"),
            "{path:?}"
        );
        assert!(
            load_newest(&dir, "abc", &["a", "b"]).is_none(),
            "other topics"
        );
        // Only the newest few are kept.
        for t in 4..10 {
            write(&dir, &good, t).unwrap();
        }
        assert_eq!(list(&dir).unwrap().len(), KEEP);
        // What a killed writer left is removed, and only that.
        let leftover = dir.join(".snapshot-00000000000000000011.tmp");
        std::fs::write(&leftover, b"half").unwrap();
        assert_eq!(remove_leftovers(&dir), 1);
        assert!(!leftover.exists());
        assert_eq!(list(&dir).unwrap().len(), KEEP);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
