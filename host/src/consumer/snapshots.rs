//! Snapshots from the consumer loop's side: written on a thread of their own so the
//! loop never waits on disk, and restored at start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::broker::consumer::Watermarks;
use crate::broker::{Partition, Positions};
use crate::metrics::Metrics;
use crate::state::Writer;
use crate::state::export::Frozen;
use crate::state::refused::Refused;
use crate::state::snapshot::{Header, Share, SnapshotError, write_frozen, write_frozen_split};

/// A snapshot taken but not yet read out of the state: what it describes, and the
/// state frozen at its offsets (read out on the writer's thread).
pub struct Taken {
    /// The active reducer, the topics and the offsets.
    pub header: Header,
    /// What that reducer refused.
    pub refused: Refused,
    /// The state at the header's offsets.
    pub state: Frozen,
    /// For a host that shares partitions: the users partition of an id. Its snapshot
    /// is then split, a file per partition (see [`Share`]), so a partition that comes
    /// back to it is restored alone.
    pub split: Option<PartitionOf>,
}

/// The users partition an id belongs to.
pub type PartitionOf = Arc<dyn Fn(&str) -> Option<i32> + Send + Sync>;

/// Writes snapshots on a thread of its own, so the consumer loop never waits on disk
/// nor on copying the state.
pub struct SnapshotWriter {
    tx: std::sync::mpsc::SyncSender<Taken>,
    /// A snapshot is being read out or written.
    busy: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotWriter {
    /// Starts the writer thread for snapshots in `dir`; each written or failed one is
    /// counted in `metrics` (a failure is logged and the service goes on).
    pub fn start(dir: std::path::PathBuf, metrics: Arc<Metrics>) -> Self {
        // A split snapshot's files are in subdirectories.
        let subdirs = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir());
        let removed = std::iter::once(dir.clone())
            .chain(subdirs)
            .map(|d| crate::state::snapshot::remove_leftovers(&d))
            .sum::<usize>();
        if removed > 0 {
            tracing::info!(
                "removed {removed} half-written snapshot(s) from {} (a previous run was killed while writing)",
                dir.display()
            );
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Taken>(1);
        let busy = Arc::new(AtomicBool::new(false));
        let working = Arc::clone(&busy);
        let spawned = std::thread::Builder::new()
            .name("logq-snapshot".into())
            .spawn(move || {
                background_priority();
                for taken in rx {
                    write(&dir, taken, &metrics);
                    working.store(false, Ordering::Release);
                }
            });
        let thread = spawned
            .map_err(|e| tracing::error!("snapshots disabled: {e}"))
            .ok();
        Self { tx, busy, thread }
    }

    /// Whether the writer would take a snapshot now (it is not busy with the last
    /// one): ask before freezing the state for one.
    pub fn idle(&self) -> bool {
        !self.busy.load(Ordering::Acquire)
    }

    /// Hands a snapshot over unless the writer is still busy with the last one.
    pub fn offer(&self, taken: Taken) -> bool {
        if self.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        let sent = self.tx.try_send(taken).is_ok();
        if !sent {
            self.busy.store(false, Ordering::Release);
        }
        sent
    }

    /// Writes `last` and waits until it is on disk: the process may exit right after.
    pub fn finish(self, last: Taken) {
        let Self { tx, thread, .. } = self;
        let _ = tx.send(last);
        drop(tx);
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("the snapshot writer panicked");
        }
    }
}

/// Lowers the calling thread's CPU priority (nice 10): a snapshot is background work
/// and must not take the cores from the loop and the reads.
fn background_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take and return integers only; they change
        // the scheduling priority of this thread alone.
        #[allow(unsafe_code)]
        let done = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10)
        };
        if done != 0 {
            tracing::debug!("snapshot thread priority unchanged");
        }
    }
}

/// Writes `taken` into `dir`, read straight from the state, counting it in `metrics`.
fn write(dir: &std::path::Path, taken: Taken, metrics: &Metrics) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let written = match &taken.split {
        None => write_frozen(dir, &taken.header, taken.state, &taken.refused, stamp)
            .map(|(path, n)| (path.display().to_string(), n)),
        Some(of) => write_frozen_split(
            dir,
            &taken.header,
            taken.state,
            &taken.refused,
            stamp,
            of.as_ref(),
        )
        .map(|(files, n)| (format!("in {files} files under {}", dir.display()), n)),
    };
    if let Err(SnapshotError::Cut) = written {
        tracing::info!(
            "snapshot skipped: {}; the next one is taken in the next interval",
            SnapshotError::Cut
        );
        return;
    }
    metrics.snapshot_written(written.is_ok());
    match written {
        Ok((path, n)) => tracing::info!("snapshot {path} written ({n} entities)"),
        Err(e) => tracing::error!(
            "snapshot in {} failed: {e}; the service goes on, the next one is tried in the next interval",
            dir.display()
        ),
    }
}

/// What a snapshot to restore must have been made by and for: the active reducer
/// (its sha256; its states are stored as renderer `renderer`) and the topics, users
/// first.
#[derive(Debug, Clone, Copy)]
pub struct Made<'a> {
    /// sha256 of the active reducer.
    pub sha256: &'a str,
    /// The renderer the active reducer runs as.
    pub renderer: u32,
    /// The topics the offsets refer to.
    pub topics: [&'a str; 2],
}

/// The newest valid snapshot in `dir` `made` as asked, if its every offset `fits`
/// the log; one that does not (the topic recreated?) is logged with what is done
/// `instead` and not used.
fn newest_fitting(
    dir: &std::path::Path,
    made: &Made<'_>,
    fits: impl Fn(&Partition, i64) -> bool,
    instead: &str,
) -> Option<(crate::state::snapshot::Snapshot, std::path::PathBuf)> {
    let (snap, path) = crate::state::snapshot::load_newest(dir, made.sha256, &made.topics)?;
    if let Some((p, o)) = snap.offsets.iter().find(|(p, o)| !fits(p, **o)) {
        tracing::warn!(
            "skipping snapshot {}: offset {o} of partition {p} is not in the log (topic recreated?); {instead}",
            path.display()
        );
        return None;
    }
    Some((snap, path))
}

/// Loads the newest valid snapshot of `dir` `made` as asked into `store`; returns
/// the positions to read on from. `None`: no usable snapshot, replay from the
/// earliest offsets.
pub fn restore(
    dir: &std::path::Path,
    made: &Made<'_>,
    targets: &BTreeMap<Partition, Watermarks>,
    store: &Writer,
) -> Option<Positions> {
    let (snap, path) = newest_fitting(
        dir,
        made,
        |p, o| targets.get(p).is_some_and(|w| o <= w.high),
        "replaying from the earliest offsets",
    )?;
    let positions: Positions = targets
        .iter()
        .map(|(p, w)| (*p, snap.offsets.get(p).copied().unwrap_or(w.low).max(w.low)))
        .collect();
    let n = snap.entities.len();
    let restored = Writer::from_dump(snap.entities, made.renderer);
    *restored.refused() = snap.refused;
    store.replace(restored);
    tracing::info!(
        "loaded snapshot {} ({n} entities); reading on from its offsets",
        path.display()
    );
    Some(positions)
}

/// Restores one share of a split snapshot (see [`Taken::split`]): the newest valid
/// snapshot under [`Share::dir`] of `root` `made` as asked, whose offsets are all
/// within `targets`' logs.
/// Its entities are added to `store` and its refusals to the store's. Returns the
/// offsets the snapshot is at; `None`: no usable one (the share is folded from its
/// beginning).
pub fn restore_share(
    root: &std::path::Path,
    share: Share,
    made: &Made<'_>,
    targets: &BTreeMap<Partition, Watermarks>,
    store: &Writer,
) -> Option<Positions> {
    let (snap, path) = newest_fitting(
        &share.dir(root),
        made,
        |p, o| share.reads(*p) && targets.get(p).is_some_and(|w| o <= w.high),
        &format!("folding {share:?} from its beginning"),
    )?;
    let n = snap.entities.len();
    store.adopt(snap.entities, made.renderer);
    {
        let mut refused = store.refused();
        for (p, offset, why) in snap.refused.iter() {
            refused.insert(p, offset, why);
        }
    }
    tracing::info!(
        "loaded snapshot {} ({n} entities of {share:?}); reading on from its offsets",
        path.display()
    );
    Some(snap.offsets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::Snapshot;
    use logq_abi::{Entity, Kind, Source};

    #[test]
    fn the_last_snapshot_is_on_disk_when_finish_returns() {
        let dir = std::env::temp_dir().join(format!("logq-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let view = format!("{{\"id\":\"{}\"}}", "x".repeat(300));
        // Big enough that reading it out and writing it takes a while.
        let store = Writer::new_store();
        let (keys, updates): (Vec<_>, Vec<_>) = (0..50_000)
            .map(|i| {
                let entity = Entity {
                    kind: Kind::User,
                    key: format!("user-{i}"),
                };
                (entity, crate::state::test_update(Some(&view), Some("Org")))
            })
            .unzip();
        store.apply(&keys, updates);
        let offsets = Positions::from([(
            Partition {
                source: Source::Users,
                id: 0,
            },
            42,
        )]);
        let taken = Taken {
            state: store.freeze(&offsets, 1),
            header: Header {
                reducer_sha256: "0".repeat(64),
                topics: vec!["users".into(), "organizations".into()],
                offsets,
            },
            refused: Default::default(),
            split: None,
        };
        // Changed after the freeze, before the writer reads it out: not in the
        // snapshot.
        assert_eq!(store.forget_users(|_| true), 50_000);
        SnapshotWriter::start(
            dir.clone(),
            Arc::new(Metrics::new(["users", "organizations"])),
        )
        .finish(taken);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.len() == 1 && names[0].starts_with("snapshot-") && names[0].ends_with(".bin"),
            "{names:?}"
        );
        let (written, _) =
            crate::state::snapshot::load_newest(&dir, &"0".repeat(64), &["users", "organizations"])
                .expect("the snapshot written");
        assert_eq!(written.entities.len(), 50_000);
        assert_eq!(written.offsets.values().copied().collect::<Vec<_>>(), [42]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restore_brings_back_the_state_and_what_its_reducer_refused() {
        let dir = std::env::temp_dir().join(format!("logq-restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let users = |id| Partition {
            source: Source::Users,
            id,
        };
        let mut refused = crate::state::refused::Refused::default();
        refused.insert(users(0), 3, "invalid JSON");
        let sha = "1".repeat(64);
        let snapshot = Snapshot {
            reducer_sha256: sha.clone(),
            topics: vec!["users".into(), "organizations".into()],
            offsets: Positions::from([(users(0), 10)]),
            entities: vec![(
                Entity {
                    kind: Kind::User,
                    key: "u".into(),
                },
                crate::state::test_update(Some(r#"{"id":"u"}"#), None),
                true,
            )],
            refused: refused.clone(),
        };
        crate::state::snapshot::write(&dir, &snapshot, 1).unwrap();
        let store = Writer::new_store();
        let targets = BTreeMap::from([(users(0), Watermarks { low: 0, high: 12 })]);
        let made = Made {
            sha256: &sha,
            renderer: 1,
            topics: ["users", "organizations"],
        };
        let positions = restore(&dir, &made, &targets, &store);
        assert_eq!(positions, Some(Positions::from([(users(0), 10)])));
        assert!(store.user("u").is_some());
        assert_eq!(*store.refused(), refused);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_split_snapshot_restores_each_partition_alone_with_its_refusals() {
        let dir = std::env::temp_dir().join(format!("logq-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let part = |source, id| Partition { source, id };
        let of = |id: &str| {
            id.strip_prefix("u")
                .and_then(|n| n.parse::<i32>().ok())
                .map(|n| n % 3)
        };
        let store = Writer::new_store();
        let entity = |kind, key: String| Entity { kind, key };
        let keys: Vec<Entity> = (0..30)
            .map(|i| entity(Kind::User, format!("u{i}")))
            .chain([entity(Kind::Organization, "o".into())])
            .collect();
        let updates: Vec<_> = keys
            .iter()
            .map(|e| crate::state::test_update(Some(&format!("{{\"id\":\"{}\"}}", e.key)), None))
            .collect();
        store.apply(&keys, updates);
        {
            let mut refused = store.refused();
            refused.insert(part(Source::Users, 0), 4, "invalid JSON");
            refused.insert(part(Source::Users, 1), 5, "missing field `id`");
            refused.insert(part(Source::Organizations, 0), 6, "invalid JSON");
        }
        // Partitions 0 and 1 held here; 2 handed over (its users still answer here).
        let offsets = Positions::from([
            (part(Source::Users, 0), 10),
            (part(Source::Users, 1), 11),
            (part(Source::Organizations, 0), 12),
        ]);
        let sha = "2".repeat(64);
        let topics = ["users", "organizations"];
        write(
            &dir,
            Taken {
                header: Header {
                    reducer_sha256: sha.clone(),
                    topics: topics.map(str::to_owned).to_vec(),
                    offsets: offsets.clone(),
                },
                refused: store.refused().clone(),
                state: store.freeze(&offsets, 1),
                split: Some(Arc::new(of)),
            },
            &Metrics::new(["users", "organizations"]),
        );
        assert!(!Share::Users(2).dir(&dir).exists());
        let targets: BTreeMap<Partition, Watermarks> = offsets
            .keys()
            .map(|p| (*p, Watermarks { low: 0, high: 20 }))
            .collect();
        // Partition 1 alone, into an empty store.
        let made = Made {
            sha256: &sha,
            renderer: 1,
            topics,
        };
        let restored = Writer::new_store();
        let at = restore_share(&dir, Share::Users(1), &made, &targets, &restored);
        assert_eq!(at, Some(Positions::from([(part(Source::Users, 1), 11)])));
        let ids: Vec<String> = restored
            .dump(1)
            .into_iter()
            .map(|(e, _, _)| e.key)
            .collect();
        let want: Vec<String> = (0..30)
            .filter(|i| i % 3 == 1)
            .map(|i| format!("u{i}"))
            .collect();
        assert_eq!(
            ids.iter().collect::<std::collections::BTreeSet<_>>(),
            want.iter().collect()
        );
        assert_eq!(
            restored
                .refused()
                .iter()
                .map(|(p, o, _)| (p, o))
                .collect::<Vec<_>>(),
            [(part(Source::Users, 1), 5)]
        );
        // The organizations next to it.
        let at = restore_share(&dir, Share::Organizations, &made, &targets, &restored);
        assert_eq!(
            at,
            Some(Positions::from([(part(Source::Organizations, 0), 12)]))
        );
        assert_eq!(restored.dump(1).len(), want.len() + 1);
        // Another reducer's, or offsets past the log: not used.
        assert_eq!(
            restore_share(
                &dir,
                Share::Users(0),
                &Made {
                    sha256: &"3".repeat(64),
                    ..made
                },
                &targets,
                &restored
            ),
            None
        );
        let short = BTreeMap::from([(part(Source::Users, 0), Watermarks { low: 0, high: 9 })]);
        assert_eq!(
            restore_share(&dir, Share::Users(0), &made, &short, &restored),
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
