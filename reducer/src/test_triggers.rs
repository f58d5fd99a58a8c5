//! TEST FIXTURE ONLY (feature `test-triggers`): a record whose value contains a marker
//! makes the reducer misbehave on purpose, so tests can prove that the host contains
//! a reducer that traps, loops or eats memory. The default build has none of this.

/// Marker that makes the reducer panic (a trap).
pub const TRAP: &str = "logq-test:trap";
/// Marker that makes the reducer loop forever (cut by the time limit).
pub const LOOP: &str = "logq-test:loop";
/// Marker that makes the reducer allocate without end (cut by the memory limit).
pub const OOM: &str = "logq-test:oom";

/// Misbehaves if `value` carries a marker; returns otherwise.
pub fn misbehave(value: &[u8]) {
    let has = |marker: &str| value.windows(marker.len()).any(|w| w == marker.as_bytes());
    if has(TRAP) {
        panic!("test reducer: trap requested");
    }
    if has(LOOP) {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    if has(OOM) {
        // Reserved, not written: the memory limit cuts it after a few grows, long
        // before a time limit could, even on a loaded machine.
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(Vec::with_capacity(4 << 20));
            std::hint::black_box(&hoard);
        }
    }
}
