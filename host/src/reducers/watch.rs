//! Watches the `--reducer` file and swaps it in (forward mode) when it changes, after
//! the file has stopped changing (a partial write is never loaded).
//!
//! What counts is the **active** reducer: a file whose content differs from it is
//! swapped in, even one tried before (putting the start-up reducer back after an
//! HTTP swap swaps it back); a file equal to it is skipped. A refused file is tried
//! again only once it changes. Every decision is logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::{Mode, Origin, Registry};
use crate::fold::sha256_hex;

/// How often the file is looked at.
const POLL: Duration = Duration::from_millis(200);
/// How many polls in a row the file must look the same before it is loaded.
const STABLE_POLLS: u32 = 2;

/// What identifies a version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn signature(path: &std::path::Path) -> Option<Signature> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Signature {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}

/// Starts the watcher thread; it ends when `stop` is set.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn spawn(
    path: PathBuf,
    reducers: Arc<Registry>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("logq-watch".into())
        .spawn(move || {
            let mut loaded = signature(&path);
            let mut seen = loaded;
            let mut same_for = 0u32;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(POLL);
                let now = signature(&path);
                if now != seen {
                    seen = now;
                    same_for = 0;
                    continue;
                }
                same_for += 1;
                if now == loaded || now.is_none() || same_for < STABLE_POLLS {
                    continue;
                }
                loaded = now;
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!("reading {}: {e}", path.display());
                        continue;
                    }
                };
                let sha = sha256_hex(&bytes);
                if sha == reducers.current().sha256() {
                    tracing::info!(
                        "{} changed; skipped: its reducer {sha} is the active one",
                        path.display()
                    );
                    continue;
                }
                tracing::info!(
                    "{} changed: swapping in its reducer {sha} (forward)",
                    path.display()
                );
                match reducers.submit(&bytes, Origin::File, Mode::Forward) {
                    Ok(_) => tracing::info!("reducer {} from {} is active", sha, path.display()),
                    Err(e) => tracing::warn!(
                        "reducer {} from {} refused, the previous one keeps running: {e}",
                        sha,
                        path.display()
                    ),
                }
            }
        })
}
