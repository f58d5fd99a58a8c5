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

/// Allocations of this many bytes or more get a mapping of their own from glibc,
/// given back to the system as soon as they are freed: the buffers of a catch-up
/// batch or a replay (records framed for the reducer, prior states, its answers)
/// leave nothing in the arenas for the RSS to carry until the next trim. glibc's own
/// threshold starts at 128 KiB but rises to the size of any mapped block freed (up
/// to 32 MiB), after which they all stay in the arenas. A lower threshold maps and
/// unmaps librdkafka's fetch buffers on every fetch: 128 KiB cost a tenth of the
/// catch-up speed. With this one, 2 lanes caught up at 0.48, 0.49, 0.48 and 0.42 of
/// the plain consumer against 0.48, 0.53, 0.46 and 0.37 with glibc's rule, and at
/// 440-452k events/s against 446-464k with the threshold fixed at 32 MiB (and the
/// store's chunks mapped by the store) (`bench/run.sh --catch-up-only`, the builds
/// in turn, 4 runs each): no difference beyond the machine's noise.
///
/// The users' store does not rely on it: its chunks are mappings of their own
/// ([`Mapped`]), whatever their size.
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

/// A byte buffer of fixed capacity in an anonymous mapping of its own: resident only
/// as far as it is written, and given back to the system whole when dropped, whatever
/// malloc's thresholds are (the users' store keeps its states in these: a replaced
/// store or a compacted chunk leaves no hole in a malloc arena). Grows like a `Vec`
/// up to its capacity, never past it. Where the system refuses another mapping (a
/// store of tens of GiB against `vm.max_map_count`), the buffer comes from the heap
/// instead.
pub struct Mapped {
    /// The mapping; dangling when `cap` is 0.
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    cap: usize,
    /// From the heap (the system refused the mapping), not mapped.
    heap: bool,
}

// SAFETY: a `Mapped` owns its mapping alone, as a `Vec<u8>` owns its buffer; shared
// references only read it.
#[allow(unsafe_code)]
unsafe impl Send for Mapped {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Mapped {}

impl Default for Mapped {
    fn default() -> Self {
        Self {
            ptr: std::ptr::NonNull::dangling(),
            len: 0,
            cap: 0,
            heap: false,
        }
    }
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Mapped {
    /// An empty buffer with room for `cap` bytes (rounded up to whole pages).
    ///
    /// # Panics
    /// When the system refuses both the mapping and the heap allocation (as a failed
    /// allocation aborts a `Vec`).
    pub fn with_capacity(cap: usize) -> Self {
        if cap == 0 {
            return Self::default();
        }
        let cap = cap.next_multiple_of(Self::page());
        // SAFETY: a fresh private anonymous mapping: no address given, no file, no
        // memory of ours touched. The result is checked before use.
        #[allow(unsafe_code)]
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if let Some(ptr) = (ptr != libc::MAP_FAILED)
            .then_some(ptr.cast::<u8>())
            .and_then(std::ptr::NonNull::new)
        {
            return Self {
                ptr,
                len: 0,
                cap,
                heap: false,
            };
        }
        Self::from_heap(cap)
    }

    /// As [`Mapped::with_capacity`], from the heap: where the system refuses a
    /// mapping. `cap` is whole pages, not zero.
    fn from_heap(cap: usize) -> Self {
        let layout = Self::layout(cap);
        // SAFETY: the layout's size is not zero (`cap` > 0); the result is checked.
        #[allow(unsafe_code)]
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            len: 0,
            cap,
            heap: true,
        }
    }

    /// The heap layout of a buffer of `cap` bytes (whole pages, page-aligned).
    ///
    /// # Panics
    /// When `cap` is too large for any allocation (a layout of another size would
    /// let the buffer write past its block).
    fn layout(cap: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(cap, Self::page())
            .unwrap_or_else(|e| panic!("a buffer of {cap} bytes: {e}"))
    }

    /// The page size, the unit of its capacity.
    fn page() -> usize {
        usize::try_from(page_size()).unwrap_or(4096)
    }

    /// Bytes written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes it can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Appends `bytes`.
    ///
    /// # Panics
    /// When they do not fit (the caller checks the room first).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let end = self.grow_to(self.len + bytes.len());
        self.as_mut_slice()[end - bytes.len()..].copy_from_slice(bytes);
    }

    /// Appends a copy of `range` of its own bytes.
    ///
    /// # Panics
    /// When the range is out of bounds or the copy does not fit.
    pub fn extend_from_within(&mut self, range: std::ops::Range<usize>) {
        assert!(range.end <= self.len, "range past the end");
        let at = self.len;
        self.grow_to(at + range.len());
        self.as_mut_slice().copy_within(range, at);
    }

    /// Grows or shrinks to `len` bytes; new bytes are `value`.
    ///
    /// # Panics
    /// When `len` is past the capacity.
    pub fn resize(&mut self, len: usize, value: u8) {
        let old = self.len;
        self.grow_to(len.max(old));
        self.len = len;
        if len > old {
            self.as_mut_slice()[old..].fill(value);
        }
    }

    /// Sets the length to `len` (at least the current one), checking the capacity;
    /// the new bytes are zero (a fresh mapping) or what was written before a
    /// shrink. Returns `len`.
    fn grow_to(&mut self, len: usize) -> usize {
        assert!(
            len <= self.cap,
            "{len} bytes do not fit a mapping of {}",
            self.cap
        );
        self.len = self.len.max(len);
        len
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the first `len` bytes lie inside the mapping, readable and
        // writable, borrowed mutably through `self` alone.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len)
        }
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes lie inside the mapping (or `len` is 0 and the
        // pointer dangling but aligned), borrowed shared through `self`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
        }
    }
}

impl std::ops::DerefMut for Mapped {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        // SAFETY: the mapping or heap block made in `with_capacity`, of `cap` bytes
        // (with the same layout), given back once; no borrow of it outlives `self`.
        #[allow(unsafe_code)]
        unsafe {
            if self.heap {
                std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap));
            } else {
                libc::munmap(self.ptr.as_ptr().cast(), self.cap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Mapped;

    #[test]
    fn a_mapped_buffer_grows_like_a_vec_up_to_its_capacity() {
        let m = Mapped::with_capacity(10_000);
        assert!(!m.heap, "mapped");
        // Whole pages.
        assert!(m.capacity() >= 10_000 && m.capacity().is_multiple_of(4096));
        grows_like_a_vec(m);
        // The same where the system refused the mapping.
        grows_like_a_vec(Mapped::from_heap(3 * 4096));
    }

    fn grows_like_a_vec(mut m: Mapped) {
        assert!(m.is_empty());
        m.extend_from_slice(b"hello ");
        m.extend_from_within(0..5);
        assert_eq!(&m[..], b"hello hello");
        m.resize(14, b'!');
        assert_eq!(&m[..], b"hello hello!!!");
        m[0] = b'j';
        m.resize(5, 0);
        assert_eq!(&m[..], b"jello");
        // Grown again: the bytes come back as the resize says, not as they were.
        m.resize(8, b'.');
        assert_eq!(&m[..], b"jello...");
        let cap = m.capacity();
        m.resize(cap, 7);
        assert_eq!(m.len(), cap);
        assert_eq!(m[cap - 1], 7);
        assert_eq!(
            format!("{m:?}"),
            format!("Mapped {{ len: {cap}, cap: {cap} }}")
        );
    }

    #[test]
    fn a_mapped_buffer_refuses_to_grow_past_its_capacity() {
        let mut m = Mapped::with_capacity(4096);
        m.resize(4096, 1);
        let full = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.extend_from_slice(b"x");
        }));
        assert!(full.is_err(), "a byte past the mapping was written");
        let empty = Mapped::default();
        assert_eq!((empty.len(), empty.capacity()), (0, 0));
        assert!(empty.is_empty());
        assert_eq!(&Mapped::with_capacity(0)[..], b"");
    }
}
