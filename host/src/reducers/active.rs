//! A loaded reducer as the service knows it: the compiled code, how it arrived and
//! when.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::fold::Reducer;

/// A small number per reducer (by sha256) for this process, so a store can tag each
/// answer with the code that rendered it. 0 is the store's "an earlier reducer".
fn renderer_id(sha256: &str) -> u32 {
    static IDS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
    let mut ids = IDS.lock().unwrap_or_else(|p| p.into_inner());
    let ids = ids.get_or_insert_with(HashMap::new);
    let next = u32::try_from(ids.len() + 1).unwrap_or(u32::MAX);
    *ids.entry(sha256.to_owned()).or_insert(next)
}

/// How a reducer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Loaded at start (`--reducer` or the built-in one).
    Startup,
    /// The `--reducer` file changed on disk.
    File,
    /// `PUT /admin/reducer`.
    Http,
    /// `POST /admin/reducer/rollback`.
    Rollback,
    /// Sent to another host of the group (`--sharded`), which announced it.
    Group,
}

/// A reducer that is (or was) active, and how it got there.
pub struct Active {
    /// The tag of the answers it renders in a store: the same for every `Active`
    /// of the same component (same sha256), so a rollback to it or a forward swap to
    /// the same code leaves nothing stale.
    pub id: u32,
    /// The compiled reducer.
    pub reducer: Reducer,
    /// How it arrived.
    pub origin: Origin,
    /// When it was loaded (RFC 3339).
    pub loaded_at: String,
}

/// A description of a reducer for the admin API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReducerInfo {
    /// Hex sha256 of the component.
    pub sha256: String,
    /// Bytes.
    pub size: usize,
    /// `logq:reducer/fold` version it exports.
    pub world_version: String,
    /// When it was loaded.
    pub loaded_at: String,
    /// How it arrived.
    pub origin: Origin,
}

impl Active {
    /// `reducer`, arrived now by `origin`.
    pub fn new(reducer: Reducer, origin: Origin) -> Self {
        Self {
            id: renderer_id(&reducer.meta().sha256),
            reducer,
            origin,
            loaded_at: now(),
        }
    }

    /// What the admin API shows of it.
    pub fn info(&self) -> ReducerInfo {
        let m = self.reducer.meta();
        ReducerInfo {
            sha256: m.sha256.clone(),
            size: m.size,
            world_version: m.world_version.clone(),
            loaded_at: self.loaded_at.clone(),
            origin: self.origin,
        }
    }

    /// Hex sha256 of the component.
    pub fn sha256(&self) -> &str {
        &self.reducer.meta().sha256
    }
}

/// Now, RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
