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
///
/// It also fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] (see there).
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, option, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, ARENAS),
        (
            "MALLOC_MMAP_THRESHOLD_",
            libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD as i32,
        ),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt takes two integers, no pointers; called before any
            // other thread exists, as glibc asks of it.
            #[allow(unsafe_code)]
            unsafe {
                libc::mallopt(option, value);
            }
        }
    }
}

/// Allocations of this many bytes or more get a mapping of their own, given back
/// to the system whole when freed: the store's full chunks (the users' store
/// checks that they are this large), which hold most of its memory, and little else.
/// glibc's own threshold starts at 128 KiB but rises to the size of any mapped
/// block freed, so after the first replaced store or compacted chunk every chunk
/// went to an arena, where the next state is built among the holes. Measured with
/// `bench/run.sh --swaps-only` (100k users, 10 rollbacks, the builds in turn): RSS
/// before 113-118 MiB and after the default reducer's rollbacks up to 139-141
/// (1.23) with glibc's rule, 91-95 and up to 104-105 (1.14) with this one; at 1M
/// ids (`--memory-only`) 763 -> 737 bytes per live user. A lower threshold maps and
/// unmaps librdkafka's fetch buffers on every fetch: 128 KiB cost a tenth of the
/// catch-up speed; with this one, 2 lanes caught up at 0.48, 0.49, 0.48 and 0.42 of
/// the plain consumer against 0.48, 0.53, 0.46 and 0.37 (`--catch-up-only`, in
/// turn): no difference beyond the machine's noise.
pub const MMAP_THRESHOLD: usize = 1 << 20;

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
