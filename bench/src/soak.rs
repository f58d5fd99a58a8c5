//! The soak (`bench/run.sh --soak 60`): wrk against `GET /users/{id}` while a producer
//! keeps streaming events (updates of existing users, and create/delete churn of new
//! ones), with the host's resident memory and stored users sampled every second. Fails
//! on any error, on memory that keeps growing after the warm-up, or on users stored
//! that grow with the churn (tombstones must expire).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{broker, history, reads};

/// What the soak saw.
pub struct Soak {
    /// The wrk run.
    pub load: reads::Load,
    /// (seconds since start, RSS bytes).
    pub rss: Vec<(f64, u64)>,
    /// Events produced while it ran.
    pub produced: usize,
    /// Records the host consumed from `users` by the end.
    pub consumed: f64,
    /// Users created and deleted again by the churn.
    pub churned: usize,
    /// (seconds since start, users stored) every second.
    pub stored: Vec<(f64, u64)>,
    /// Tombstones the host forgot by the end.
    pub expired: f64,
}

/// Users created and deleted per churn round.
pub const CHURN_PER_ROUND: usize = 2_000;

/// The users stored may grow by at most this many churn rounds after the warm-up
/// (rounds in flight, and the two a tombstone lives); without expiry it grows by one
/// round every round.
pub const STORED_ROUNDS_MAX: f64 = 4.0;

/// Memory after the warm-up may not grow by more than this fraction.
pub const FLAT: f64 = 0.10;

/// The shortest soak that can see anything: the first 10 s are warm-up, and the
/// growth check compares the halves of what follows.
pub const MIN_SECS: u64 = 20;

/// Runs the soak for `secs` on a history of `events` events over `users` ids.
///
/// # Errors
/// A soak shorter than [`MIN_SECS`] is refused (it would pass by construction), and
/// any failure to run the parts.
///
/// `retention` is the host's `--tombstone-retention`: each churn round is two hours of
/// event time after the one before, so with `1h` a round's tombstones expire a round
/// or two later and the users stored stay within a few rounds of churn.
pub fn run(
    events: usize,
    users: u64,
    secs: u64,
    retention: &str,
    work: &std::path::Path,
) -> anyhow::Result<Soak> {
    anyhow::ensure!(
        secs >= MIN_SECS,
        "a soak of {secs} s would pass by construction (10 s of warm-up, then two halves to compare): use --soak {MIN_SECS} or more"
    );
    let h = history::generate(7, events, users);
    let loaded = broker::load(&h);
    let host = broker::start_host(&loaded, "soak", &["--tombstone-retention", retention]);
    let expected = logq_e2e::expected_answers(&h.users, &h.organizations);
    let paths: Vec<String> = expected
        .keys()
        .step_by((expected.len() / 5000).max(1))
        .map(|id| format!("/users/{id}"))
        .collect();
    let script = reads::script(work, &paths)?;

    // Ingest load: updates, produced in rounds until the soak ends.
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicUsize::new(0));
    let churned = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (stop, produced, churned) = (stop.clone(), produced.clone(), churned.clone());
        let bootstrap = loaded.broker.bootstrap.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let more = history::generate(1000 + round, 20_000, users);
                let n = broker::produce_updates(&bootstrap, &more)?;
                let c = broker::produce_lines(&bootstrap, "users", &churn(round))?;
                produced.fetch_add(n + c, Ordering::Relaxed);
                churned.fetch_add(CHURN_PER_ROUND, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })
    };
    let sampler = {
        let stop = stop.clone();
        let pid = host.host.pid();
        let addr = host.host.addr;
        std::thread::spawn(move || {
            let start = Instant::now();
            let (mut rss, mut stored) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let t = start.elapsed().as_secs_f64();
                if let Ok(r) = broker::rss(pid) {
                    rss.push((t, r));
                }
                if let Some(n) = logq_e2e::metric_at(addr, "logq_users_stored") {
                    stored.push((t, n as u64));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            (rss, stored)
        })
    };
    let load = reads::wrk(host.host.addr.port(), &script, secs);
    stop.store(true, Ordering::Relaxed);
    let (rss, stored) = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;
    let consumed = broker::metric(&host.host, "logq_records_consumed_total{topic=\"users\"}")?;
    let expired = broker::metric(&host.host, "logq_tombstones_expired_total")?;
    Ok(Soak {
        load: load?,
        rss,
        produced: produced.load(Ordering::Relaxed),
        consumed,
        churned: churned.load(Ordering::Relaxed),
        stored,
        expired,
    })
}

/// Churn round `round`: [`CHURN_PER_ROUND`] users never seen before, each created and
/// deleted a second later, two hours of event time after the previous round (and
/// after the history, which spans less than a day of 2021).
pub fn churn(round: u64) -> Vec<String> {
    let at = |second: u64| {
        let t = (1_609_459_200 + 86_400 + round * 7_200 + second) as i64 * 1_000_000;
        logq_reducer::time::render(t)
    };
    (0..CHURN_PER_ROUND)
        .flat_map(|i| {
            let id = format!("churn-{round}-{i}");
            [
                format!(
                    r#"{{"id":"{id}","event_type":"User Created","username":"{id}","received_at":"{}"}}"#,
                    at(0)
                ),
                format!(
                    r#"{{"id":"{id}","event_type":"User Deleted","received_at":"{}"}}"#,
                    at(1)
                ),
            ]
        })
        .collect()
}

/// How much the users stored grew from the first sample after `warmup` to the
/// largest later one, in churn rounds: tombstones that expire keep it to a few.
pub fn stored_growth_rounds(stored: &[(f64, u64)], warmup: f64) -> f64 {
    let after: Vec<u64> = stored
        .iter()
        .filter(|(t, _)| *t >= warmup)
        .map(|s| s.1)
        .collect();
    let (Some(first), Some(max)) = (after.first(), after.iter().max()) else {
        return 0.0;
    };
    max.saturating_sub(*first) as f64 / CHURN_PER_ROUND as f64
}

/// How much the peak resident memory of the second half of the run (after `warmup`
/// seconds) exceeds the peak of the first half, as a fraction. Peaks, not single
/// samples: freed memory goes back to the OS in steps (after catching up and every
/// 30 s), so RSS is a sawtooth whose peaks stay level unless something leaks.
pub fn growth(rss: &[(f64, u64)], warmup: f64) -> f64 {
    let after: Vec<&(f64, u64)> = rss.iter().filter(|(t, _)| *t >= warmup).collect();
    let (Some(first), Some(last)) = (after.first(), after.last()) else {
        return 0.0;
    };
    let middle = (first.0 + last.0) / 2.0;
    let peak = |keep: &dyn Fn(f64) -> bool| {
        after
            .iter()
            .filter(|(t, _)| keep(*t))
            .map(|r| r.1)
            .max()
            .unwrap_or(0)
    };
    let (early, late) = (peak(&|t| t < middle), peak(&|t| t >= middle));
    if early == 0 {
        return 0.0;
    }
    (late as f64 - early as f64) / early as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_compares_the_peaks_of_the_two_halves() {
        let saw: Vec<(f64, u64)> = (0..120)
            .map(|t| (f64::from(t), 30 + u64::try_from(t % 30).unwrap()))
            .collect();
        assert!(growth(&saw, 10.0).abs() < 1e-9, "a level sawtooth is flat");
        let leak: Vec<(f64, u64)> = (0..120).map(|t| (f64::from(t), 30 + t as u64)).collect();
        assert!(growth(&leak, 10.0) > 0.4, "a steady climb is growth");
    }

    #[test]
    fn a_soak_too_short_to_see_growth_is_refused_before_it_starts() {
        let e = run(
            10,
            10,
            MIN_SECS - 1,
            "1h",
            std::path::Path::new("/nonexistent"),
        )
        .err()
        .expect("refused");
        assert!(e.to_string().contains("pass by construction"), "{e}");
    }

    #[test]
    fn stored_growth_counts_churn_rounds_after_the_warm_up() {
        let round = CHURN_PER_ROUND as u64;
        // Before the warm-up anything goes; after it, the peak over the first sample.
        let flat = [
            (1.0, 0),
            (10.0, 5 * round),
            (11.0, 6 * round),
            (12.0, 5 * round),
        ];
        assert_eq!(stored_growth_rounds(&flat, 10.0), 1.0);
        let leaking: Vec<(f64, u64)> = (10..30).map(|t| (f64::from(t), t as u64 * round)).collect();
        assert_eq!(stored_growth_rounds(&leaking, 10.0), 19.0);
    }

    #[test]
    fn churn_rounds_are_new_users_created_then_deleted_two_hours_apart() {
        let (a, b) = (churn(1), churn(2));
        assert_eq!(a.len(), 2 * CHURN_PER_ROUND);
        assert!(a[0].contains("\"churn-1-0\"") && a[0].contains("User Created"));
        assert!(a[1].contains("\"churn-1-0\"") && a[1].contains("User Deleted"));
        assert!(a[0].contains("2021-01-02T02:00:00"), "{}", a[0]);
        assert!(b[0].contains("2021-01-02T04:00:00"), "{}", b[0]);
    }
}
