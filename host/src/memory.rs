//! Giving memory back to the operating system.
//!
//! Catching up on a long history allocates and frees far more than the state it
//! leaves behind (record copies, reducer buffers, librdkafka's prefetched batches).
//! glibc keeps freed heap pages mapped, so without a trim the process would hold its
//! peak for good.

/// glibc malloc arenas the process may use, unless `MALLOC_ARENA_MAX` says otherwise.
const ARENAS: i32 = 4;

/// Caps glibc's malloc arenas at [`ARENAS`] (its default is eight per core); call it
/// first thing, before any thread starts. Each thread that allocates gets an arena of
/// its own while there are fewer than the cap, and memory freed in one arena stays
/// with it: the fold lanes, a replay's thread and librdkafka's threads each left a
/// heap of their own, half empty and scattered with live entries that no trim can
/// give back, so every replay or rollback left the process larger. Measured on 1.2M
/// records over 30k users, six rollbacks after a forward swap: RSS 65 -> 268 MiB with
/// glibc's default, 84 -> 118-127 MiB with four arenas; catch-up 530k events/s with
/// the default, 465-495k with four, 403-418k with two (fewer arenas, more waiting
/// on their locks). Four is the trade: `MALLOC_ARENA_MAX=16` for a host that never
/// swaps and wants the last tenth of catch-up speed.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt takes two integers, no pointers; called before any other
        // thread exists, as glibc asks of it.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// Returns the free pages of every malloc arena to the OS (glibc `malloc_trim`).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and only walks glibc's own free
        // lists under its arena locks; it is safe to call from any thread.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!("malloc_trim released memory: {}", released != 0);
    }
}

/// The process's resident memory (RSS) in bytes, from `/proc/self/statm`; `None`
/// where there is no such file.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads a constant of the running system; no pointers.
        #[allow(unsafe_code)]
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(size) = u64::try_from(size)
            && size > 0
        {
            return size;
        }
    }
    4096
}
