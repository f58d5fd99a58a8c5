//! Giving memory back to the operating system.
//!
//! Catching up on a long history allocates and frees far more than the state it
//! leaves behind (record copies, reducer buffers, librdkafka's prefetched batches).
//! glibc keeps freed heap pages mapped, so without a trim the process would hold its
//! peak for good.

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
