//! The reducer runtime: the only file of the host that touches wasmtime.
//!
//! A component is compiled and linked once ([`Reducer::load`]); every batch then gets
//! a fresh, cheap instance in a fresh `Store` with a memory limit and a time budget.
//! A new store per batch means no guest state survives a batch (the reducer stays a
//! pure fold) and a trapped instance is simply thrown away.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, ComponentExportIndex, Linker, ResourceAny};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};

mod bindings {
    wasmtime::component::bindgen!({
        world: "reducer",
        path: "../wit",
    });
}

use bindings::ReducerPre;
use logq_abi::{Fold, Folded, Kind, Plan, Record, Rejection, States, Updates};

use crate::config::LimitsConfig;

/// The reducer built from `reducer/`, embedded at build time.
pub const DEFAULT_REDUCER: &[u8] = include_bytes!(env!("LOGQ_REDUCER_WASM"));

/// How often the epoch ticks: the resolution of the time limit.
const TICK: Duration = Duration::from_millis(5);

/// Hard limits of one reducer call.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most linear memory one instance may hold.
    pub memory_bytes: usize,
    /// Longest one call may run.
    pub time: Duration,
}

impl From<&LimitsConfig> for Limits {
    fn from(c: &LimitsConfig) -> Self {
        Self {
            memory_bytes: usize::try_from(c.reducer_memory_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            time: Duration::from_millis(c.reducer_time_limit_ms),
        }
    }
}

/// Why a reducer could not be loaded or a call did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ReducerError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly component (the bytes do not start with \\0asm)")]
    NotWasm,
    /// The bytes are not a component that implements the `reducer` world.
    #[error("invalid reducer component: {0}")]
    Invalid(String),
    /// The call ran past the time limit and was interrupted.
    #[error("reducer exceeded its time limit of {0:?}")]
    TimeLimit(Duration),
    /// The instance asked for more memory than the limit.
    #[error("reducer exceeded its memory limit of {0} MiB")]
    MemoryLimit(usize),
    /// The guest trapped (panicked, hit `unreachable`, ...).
    #[error("reducer trapped: {0}")]
    Trap(String),
    /// The guest returned an error for the whole batch.
    #[error("reducer refused the batch: {0}")]
    Refused(String),
    /// The guest broke the contract (e.g. a wrong number of updates).
    #[error("reducer broke the contract: {0}")]
    Contract(String),
}

/// Per-store data: the memory limiter.
struct Limiter {
    memory_bytes: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_bytes;
        self.hit |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; the reducer needs a handful.
        Ok(desired <= 100_000)
    }
}

/// Ticks the engine's epoch so that calls past their deadline are interrupted.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("logq-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Instances of one engine that can exist at once: every fold lane (at most 64), a
/// replay, a canary, with room to spare. More would fail to instantiate.
const POOL_INSTANCES: u32 = 128;

/// Each batch gets a fresh instance, so where its memory comes from matters: from a
/// pool of slots that stay mapped, and are reset by `memset` up to this many bytes
/// (no page faults when the slot is used again; beyond it, `madvise`). Every slot
/// that has held an instance keeps up to this much RSS until the process ends: the
/// live lanes' slots, and those of every replay, preview and rollback since. At 8 MiB
/// that was 10-15 MiB of the RSS after a rollback (`bench/run.sh --swaps-only`,
/// 100k users: after the default reducer's rollbacks 100-106 MiB at 8 MiB, 85-95 at
/// 2 MiB, 86-97 at 4 MiB), and it cost no speed to give back: catch-up from the
/// broker, the three builds in turn, 4 runs each, 2 lanes 393-417k events/s at 8
/// MiB, 395-413k at 2 MiB, 403-411k at 4 MiB.
pub const KEEP_RESIDENT: usize = 2 << 20;

/// The pooling allocator's settings: room for the largest reducers the kit builds (a
/// JavaScript one carries an engine with many functions and core instances), memory
/// capped by the reducer limit.
fn pool(limits: Limits) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(4 * POOL_INSTANCES)
        .total_memories(POOL_INSTANCES)
        .total_tables(4 * POOL_INSTANCES)
        .max_core_instances_per_component(64)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .table_elements(100_000)
        .max_core_instance_size(4 << 20)
        .max_memory_size(limits.memory_bytes)
        .linear_memory_keep_resident(KEEP_RESIDENT.min(limits.memory_bytes))
        .max_unused_warm_slots(0)
        .table_keep_resident(1 << 20);
    pool
}

/// The major version of `logq:reducer/fold` this host speaks.
pub const WORLD_MAJOR: u64 = 3;
const FOLD_EXPORT: &str = "logq:reducer/fold@";
/// The optional interface (since 3.2) that explains a state.
const EXPLAIN_EXPORT: &str = "logq:reducer/explain@";

/// The shared compiler and epoch clock. Create once per process; load many reducers.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    limits: Limits,
    cache_dir: Option<PathBuf>,
    ticker: Arc<Ticker>,
}

/// What is known about a loaded reducer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReducerMeta {
    /// Hex sha256 of the component bytes.
    pub sha256: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// The version of `logq:reducer/fold` it exports (e.g. `2.0.0`).
    pub world_version: String,
    /// Whether the machine code came from the on-disk compile cache.
    pub from_cache: bool,
}

/// A compiled, linked reducer, ready to fold batches. Cloning is cheap (shared
/// compiled code).
#[derive(Clone)]
pub struct Reducer {
    engine: Engine,
    pre: ReducerPre<Limiter>,
    limits: Limits,
    meta: ReducerMeta,
    /// The `explain` function, when the component exports `logq:reducer/explain@3.x`.
    explain: Option<ComponentExportIndex>,
    _ticker: Arc<Ticker>,
}

impl Runtime {
    /// A runtime whose reducers run under `limits`. With `cache_dir`, compiled machine
    /// code is kept there by sha256 so a restart or a rollback does not recompile.
    ///
    /// # Errors
    /// When the engine cannot be created.
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Self, ReducerError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool(limits)));
        // For `perf record`: /tmp/perf-<pid>.map names the reducer's functions.
        if std::env::var_os("LOGQ_PERF_MAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| ReducerError::Invalid(format!("{e:#}")))?;
        let ticker = Arc::new(Ticker::start(engine.clone()));
        Ok(Self {
            engine,
            limits,
            cache_dir,
            ticker,
        })
    }

    /// Compiles (or takes from the cache) and links `bytes`, checking that it is a
    /// component of this host's world: it must export `logq:reducer/fold@3.x` and
    /// import nothing. Everything that can be checked before the first event is.
    ///
    /// # Errors
    /// [`ReducerError::Invalid`] with the reason.
    pub fn load(&self, bytes: &[u8]) -> Result<Reducer, ReducerError> {
        let sha256 = sha256_hex(bytes);
        let (component, from_cache) = self.compile(bytes, &sha256)?;
        let ty = component.component_type();
        let imports: Vec<&str> = ty.imports(&self.engine).map(|(name, _)| name).collect();
        if !imports.is_empty() {
            return Err(ReducerError::Invalid(format!(
                "the component imports {}; a reducer may import nothing (no WASI, no host functions)",
                imports.join(", ")
            )));
        }
        let exports: Vec<&str> = ty.exports(&self.engine).map(|(name, _)| name).collect();
        let world_version = exports
            .iter()
            .find_map(|name| name.strip_prefix(FOLD_EXPORT))
            .ok_or_else(|| {
                ReducerError::Invalid(format!(
                    "the component does not export {FOLD_EXPORT}{WORLD_MAJOR}.x (it exports: {})",
                    if exports.is_empty() {
                        "nothing".to_string()
                    } else {
                        exports.join(", ")
                    }
                ))
            })?
            .to_string();
        let major = world_version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u64>().ok());
        if major != Some(WORLD_MAJOR) {
            return Err(ReducerError::Invalid(format!(
                "the component is built against {FOLD_EXPORT}{world_version}; this host speaks {WORLD_MAJOR}.x"
            )));
        }
        // An empty linker: the reducer gets no capabilities at all.
        let linker = Linker::<Limiter>::new(&self.engine);
        let pre = linker
            .instantiate_pre(&component)
            .and_then(ReducerPre::new)
            .map_err(|e| {
                ReducerError::Invalid(format!(
                    "the component does not match the reducer world: {e:#}"
                ))
            })?;
        let explain = exports
            .iter()
            .find(|name| {
                name.strip_prefix(EXPLAIN_EXPORT)
                    .and_then(|v| v.split('.').next())
                    .and_then(|m| m.parse::<u64>().ok())
                    == Some(WORLD_MAJOR)
            })
            .and_then(|name| component.get_export_index(None, name))
            .and_then(|interface| component.get_export_index(Some(&interface), "explain"));
        Ok(Reducer {
            engine: self.engine.clone(),
            pre,
            explain,
            limits: self.limits,
            meta: ReducerMeta {
                sha256,
                size: bytes.len(),
                world_version,
                from_cache,
            },
            _ticker: self.ticker.clone(),
        })
    }

    /// Bytes of linear memory the instance pool keeps resident in slots no instance
    /// uses now: each slot keeps up to [`KEEP_RESIDENT`] of its last instance's
    /// memory (zeroed, so the next instance there takes no page faults). Part of what
    /// an idle host holds; `logq_reducer_pool_resident_bytes` of `/metrics`.
    pub fn pool_resident_bytes(&self) -> usize {
        self.engine
            .pooling_allocator_metrics()
            .map_or(0, |m| m.unused_memory_bytes_resident())
    }

    fn compile(&self, bytes: &[u8], sha256: &str) -> Result<(Component, bool), ReducerError> {
        let invalid = |e: wasmtime::Error| ReducerError::Invalid(format!("{e:#}"));
        if !bytes.starts_with(b"\0asm") {
            return Err(ReducerError::NotWasm);
        }
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes)
                .map(|c| (c, false))
                .map_err(invalid);
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let path = dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
        if path.exists() {
            // SAFETY: the file was written by `Component::serialize` below into our own
            // cache directory, named by the sha256 of the source and the engine's
            // compatibility hash, and wasmtime checks its header. Whoever can write
            // there can already replace this binary.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(c) => return Ok((c, true)),
                Err(e) => tracing::warn!("compile cache entry {} unusable: {e:#}", path.display()),
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(invalid)?;
        if let Err(e) = write_cache(dir, &path, &component) {
            tracing::warn!("could not write compile cache {}: {e}", path.display());
        }
        Ok((component, false))
    }
}

/// Writes atomically (temp file, rename) so a crash never leaves half an entry.
fn write_cache(dir: &Path, path: &Path, component: &Component) -> std::io::Result<()> {
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Reducer {
    /// What is known about this reducer.
    pub fn meta(&self) -> &ReducerMeta {
        &self.meta
    }

    /// Folds one batch. `states` is asked once for the current state of the entities
    /// the batch touches (in plan order). The new states stay in the buffer the
    /// guest's answer came in ([`Updates`]): nothing is copied per entity.
    ///
    /// # Errors
    /// When the reducer traps, runs out of time or memory, refuses the batch, or
    /// breaks the contract. Nothing of the batch should be applied then.
    pub fn fold(
        &self,
        records: &[Record<'_>],
        states: &dyn States,
    ) -> Result<(Plan, Updates), ReducerError> {
        let (mut store, ticks) = self.store();

        let framed = logq_abi::records::encode(records);
        store.set_epoch_deadline(ticks);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.error(&store, e))?;
        let batch = instance.logq_reducer_fold().batch();

        store.set_epoch_deadline(ticks);
        let handle: ResourceAny = batch
            .call_constructor(&mut store, &framed)
            .map_err(|e| self.error(&store, e))?;
        drop(framed);
        store.set_epoch_deadline(ticks);
        let raw = batch
            .call_plan(&mut store, handle)
            .map_err(|e| self.error(&store, e))?;
        let plan = read_plan(raw, records.len())?;

        let mut prior = Vec::new();
        states.states(&plan.entities, &mut |s| logq_abi::prior::put(&mut prior, s));
        store.set_epoch_deadline(ticks);
        let out = batch
            .call_fold(&mut store, handle, &prior)
            .map_err(|e| self.error(&store, e))?
            .map_err(ReducerError::Refused)?;
        drop(prior);
        // The guest is not trusted: every range is checked inside its state.
        let updates = logq_abi::updates::decode_batch(out, plan.entities.len())
            .map_err(|e| ReducerError::Contract(format!("updates: {e}")))?;
        Ok((plan, updates))
    }

    /// A fresh store under this reducer's limits, and the epoch ticks one call may
    /// take.
    fn store(&self) -> (Store<Limiter>, u64) {
        let mut store = Store::new(
            &self.engine,
            Limiter {
                memory_bytes: self.limits.memory_bytes,
                hit: false,
            },
        );
        store.limiter(|l| l);
        store.epoch_deadline_trap();
        let ticks = (self.limits.time.as_micros() / TICK.as_micros()).max(1) as u64 + 1;
        (store, ticks)
    }

    /// Whether the component can explain its states (`logq:reducer/explain@3.x`).
    pub fn explains(&self) -> bool {
        self.explain.is_some()
    }

    /// Asks the reducer why the state of entity `key` of `kind` is what it is: the
    /// JSON text its `explain` returns, under the same limits as a fold, in a fresh
    /// instance. `Ok(None)` when the component does not export `explain`.
    ///
    /// # Errors
    /// When the reducer traps, runs out of time or memory, or says why it cannot.
    pub fn explain(
        &self,
        kind: Kind,
        key: &str,
        state: &[u8],
    ) -> Result<Option<String>, ReducerError> {
        let Some(index) = self.explain else {
            return Ok(None);
        };
        let (mut store, ticks) = self.store();
        store.set_epoch_deadline(ticks);
        let instance = self
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .map_err(|e| self.error(&store, e))?;
        let func = instance
            .get_typed_func::<(u8, &str, &[u8]), (Result<String, String>,)>(&mut store, index)
            .map_err(|e| ReducerError::Contract(format!("explain: {e:#}")))?;
        store.set_epoch_deadline(ticks);
        let (out,) = func
            .call(&mut store, (kind.byte(), key, state))
            .map_err(|e| self.error(&store, e))?;
        out.map(Some).map_err(ReducerError::Refused)
    }

    fn error(&self, store: &Store<Limiter>, e: wasmtime::Error) -> ReducerError {
        if store.data().hit {
            return ReducerError::MemoryLimit(self.limits.memory_bytes >> 20);
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => ReducerError::TimeLimit(self.limits.time),
            _ => ReducerError::Trap(format!("{e:#}")),
        }
    }
}

impl Fold for Reducer {
    type Error = ReducerError;

    fn fold(&self, records: &[Record<'_>], states: &dyn States) -> Result<Folded, ReducerError> {
        let (plan, updates) = Reducer::fold(self, records, states)?;
        Ok(Folded {
            plan,
            updates: updates.to_vec(),
        })
    }
}

/// Reads the guest's plan, checking that it describes the records it was given.
fn read_plan(
    raw: bindings::exports::logq::reducer::fold::Plan,
    records: usize,
) -> Result<Plan, ReducerError> {
    let contract = |e: String| ReducerError::Contract(format!("plan: {e}"));
    let entities = logq_abi::entities::decode(&raw.entities, raw.entity_count).map_err(contract)?;
    if raw.accepted.len() != records {
        return Err(contract(format!(
            "accepted counts for {} records, expected {records}",
            raw.accepted.len()
        )));
    }
    if let Some(r) = raw.rejections.iter().find(|r| r.input as usize >= records) {
        return Err(contract(format!(
            "rejection names record {} of {records}",
            r.input
        )));
    }
    Ok(Plan {
        entities,
        rejections: raw
            .rejections
            .into_iter()
            .map(|r| Rejection {
                input: r.input,
                event: r.event,
                reason: r.reason,
            })
            .collect(),
        accepted: raw.accepted,
    })
}

#[cfg(test)]
mod tests {
    use logq_abi::driver::NoPrior;
    use logq_abi::{Record, Source};

    use super::*;

    #[test]
    fn a_slot_keeps_no_more_than_keep_resident_of_a_batch_that_used_more() {
        let runtime = Runtime::new(
            Limits {
                memory_bytes: 64 << 20,
                time: Duration::from_secs(10),
            },
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let reducer = runtime
            .load(DEFAULT_REDUCER)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(runtime.pool_resident_bytes(), 0, "no instance yet");
        // 20k distinct users: the framed records alone are past 2 MiB of guest memory.
        let values: Vec<String> = (0..20_000)
            .map(|i| {
                format!(
                    r#"{{"id":"user-{i:08}","event_type":"User Created","username":"someone-{i}","organization_name":"Outer Heaven","received_at":"2021-01-01 00:00:00"}}"#
                )
            })
            .collect();
        let records = Record::sequence(values.iter().map(|v| (Source::Users, v.as_bytes())));
        let (plan, _) = reducer
            .fold(&records, &NoPrior)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.entities.len(), 20_000);
        // The instance is gone; its slot kept some of its memory, and no more than
        // the bound, though the batch used more.
        let kept = runtime.pool_resident_bytes();
        assert!(kept > 0, "the slot keeps its first pages resident");
        assert!(kept <= KEEP_RESIDENT, "{kept} bytes kept");
    }
}
