//! CPU time of processes, from `/proc`: how many cores each side of a figure took,
//! and the broker and the load generator beside it.

use anyhow::Context as _;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`: 100 on every Linux
/// architecture this runs on; part of the kernel's ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of `/proc/<pid>/stat` after the command name, from field 3 (`state`).
fn stat_fields(pid: &str) -> anyhow::Result<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse(&stat)
}

/// Numbers of a `stat` line after the command name (which may hold spaces and
/// parentheses, so it ends at the last `)`); the state letter reads as 0.
fn parse(stat: &str) -> anyhow::Result<Vec<u64>> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no `)` in a stat line")?;
    Ok(rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect())
}

/// User + system seconds `fields` (from [`stat_fields`]) hold at 1-based stat
/// positions `user` and `user + 1`.
fn seconds_at(fields: &[u64], user: usize) -> anyhow::Result<f64> {
    let at = |field: usize| fields.get(field - 3).copied().context("short stat line");
    Ok((at(user)? + at(user + 1)?) as f64 / TICKS_PER_SECOND)
}

/// CPU seconds (user + system, all threads) process `pid` has used so far.
pub fn seconds(pid: u32) -> anyhow::Result<f64> {
    seconds_at(&stat_fields(&pid.to_string())?, 14)
}

/// CPU seconds this process has used so far.
pub fn own_seconds() -> anyhow::Result<f64> {
    seconds_at(&stat_fields("self")?, 14)
}

/// CPU seconds of this process's children that have ended and been waited for (wrk,
/// oha).
pub fn children_seconds() -> anyhow::Result<f64> {
    seconds_at(&stat_fields("self")?, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_times_after_an_odd_command_name() {
        // utime 250, stime 50, cutime 7, cstime 3 (fields 14-17).
        let line = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 7 3 20 0 1 0 100 200 300";
        let fields = parse(line).unwrap();
        assert_eq!(seconds_at(&fields, 14).unwrap(), 3.0);
        assert_eq!(seconds_at(&fields, 16).unwrap(), 0.1);
        assert!(seconds_at(&fields[..12], 14).is_err());
    }

    #[test]
    fn own_seconds_grow_with_work() {
        let before = own_seconds().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 300 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let used = own_seconds().unwrap() - before;
        assert!(
            (0.15..2.0).contains(&used),
            "{used} s for 0.3 s of spinning"
        );
    }
}
