//! The canary every candidate reducer must pass before it is swapped in (and the
//! start-up reducer before the first event): fold the sample data and the most recent
//! records under the normal limits. Also `logq reducer check`, the same validation
//! offline.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use logq_abi::driver::NoPrior;
use logq_abi::{OwnedRecord, Record, Source};

use crate::fold::{Limits, Reducer, Runtime, sha256_hex};

/// The sample user events shipped with the repository.
pub const SAMPLE_USERS: &str = include_str!("../../../data/users.json");
/// The sample organization events shipped with the repository.
pub const SAMPLE_ORGANIZATIONS: &str = include_str!("../../../data/organizations.json");

/// How many recent records the canary folds besides the sample data.
const RECENT: usize = 256;

/// The most recent records seen, for the canary of the next candidate.
#[derive(Debug, Default)]
pub struct Recent {
    records: VecDeque<OwnedRecord>,
}

impl Recent {
    /// Keeps the tail of a batch.
    pub fn remember(&mut self, records: &[Record<'_>]) {
        let tail = &records[records.len().saturating_sub(RECENT)..];
        let room = RECENT - tail.len();
        while self.records.len() > room {
            self.records.pop_front();
        }
        self.records.extend(tail.iter().map(Record::to_owned));
    }

    /// A copy of what is kept, oldest first.
    pub fn to_vec(&self) -> Vec<OwnedRecord> {
        self.records.iter().cloned().collect()
    }
}

/// Folds the built-in sample data and `recent` records with `reducer` under its normal
/// limits. A trap, a limit hit, a refused batch or a view that is not a JSON object
/// fails the canary. Rejected events are fine: bad input exists.
///
/// # Errors
/// The reason, in words.
pub fn canary(reducer: &Reducer, recent: &[OwnedRecord]) -> Result<(), String> {
    let samples = Record::sequence([
        (Source::Users, SAMPLE_USERS.as_bytes()),
        (Source::Organizations, SAMPLE_ORGANIZATIONS.as_bytes()),
    ]);
    let recent: Vec<Record<'_>> = recent.iter().map(OwnedRecord::as_record).collect();
    for (name, batch) in [("the sample data", &samples), ("recent records", &recent)] {
        if batch.is_empty() {
            continue;
        }
        let (_, updates) = reducer
            .fold(batch, &NoPrior)
            .map_err(|e| format!("on {name}: {e}"))?;
        for view in updates.iter().filter_map(|u| u.view()) {
            let parsed: Result<serde_json::Map<String, serde_json::Value>, _> =
                serde_json::from_str(view);
            if let Err(e) = parsed {
                return Err(format!("on {name}: a view is not a JSON object ({e})"));
            }
        }
    }
    Ok(())
}

/// The verdict of `logq reducer check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    /// Whether a hot swap would accept it.
    pub ok: bool,
    /// Hex sha256 of the file.
    pub sha256: String,
    /// Where it failed: `load` or `canary`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<&'static str>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    /// The `logq:reducer/fold` version it exports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub world_version: Option<String>,
    /// Milliseconds to compile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile_ms: Option<u64>,
    /// Whether the compile cache had it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_cache: Option<bool>,
    /// Milliseconds the canary took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_ms: Option<u64>,
}

impl Verdict {
    fn refused(sha256: String, stage: Option<&'static str>, reason: String) -> Self {
        Self {
            ok: false,
            sha256,
            stage,
            reason: Some(reason),
            size: None,
            world_version: None,
            compile_ms: None,
            from_cache: None,
            canary_ms: None,
        }
    }
}

/// `logq reducer check`: the validation a hot swap runs (compile, world, canary on
/// the sample data), offline.
pub fn check(bytes: &[u8], limits: Limits, cache_dir: Option<std::path::PathBuf>) -> Verdict {
    let sha256 = sha256_hex(bytes);
    let runtime = match Runtime::new(limits, cache_dir) {
        Ok(r) => r,
        Err(e) => return Verdict::refused(sha256, None, e.to_string()),
    };
    let start = Instant::now();
    let reducer = match runtime.load(bytes) {
        Ok(r) => r,
        Err(e) => return Verdict::refused(sha256, Some("load"), e.to_string()),
    };
    let compile_ms = millis(start.elapsed());
    let start = Instant::now();
    let meta = reducer.meta().clone();
    match canary(&reducer, &[]) {
        Ok(()) => Verdict {
            ok: true,
            sha256: meta.sha256,
            stage: None,
            reason: None,
            size: Some(meta.size),
            world_version: Some(meta.world_version),
            compile_ms: Some(compile_ms),
            from_cache: Some(meta.from_cache),
            canary_ms: Some(millis(start.elapsed())),
        },
        Err(reason) => Verdict::refused(sha256, Some("canary"), reason),
    }
}

/// Whole milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keeps_the_newest_records_in_order() {
        let values: Vec<String> = (0..300).map(|i| i.to_string()).collect();
        let records = Record::sequence(values.iter().map(|v| (Source::Users, v.as_bytes())));
        let mut recent = Recent::default();
        recent.remember(&records[..10]);
        assert_eq!(recent.to_vec().len(), 10);
        recent.remember(&records[10..]);
        let kept = recent.to_vec();
        assert_eq!(kept.len(), RECENT);
        assert_eq!(kept[0].value, b"44", "the oldest kept is record 300-256");
        assert_eq!(kept[RECENT - 1].value, b"299");
        recent.remember(&records[..1]);
        assert_eq!(recent.to_vec()[RECENT - 1].value, b"0");
        assert_eq!(recent.to_vec()[0].value, b"45");
    }
}
