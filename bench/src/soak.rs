//! The soak (`bench/run.sh --soak 60`): wrk against `GET /users/{id}` while a producer
//! keeps streaming events, with the host's resident memory sampled every second. Fails
//! on any error or on memory that keeps growing after the warm-up.

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
}

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
pub fn run(events: usize, users: u64, secs: u64, work: &std::path::Path) -> anyhow::Result<Soak> {
    anyhow::ensure!(
        secs >= MIN_SECS,
        "a soak of {secs} s would pass by construction (10 s of warm-up, then two halves to compare): use --soak {MIN_SECS} or more"
    );
    let h = history::generate(7, events, users);
    let loaded = broker::load(&h);
    let host = broker::start_host(&loaded, "soak", &[]);
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
    let producer = {
        let (stop, produced) = (stop.clone(), produced.clone());
        let bootstrap = loaded.broker.bootstrap.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let more = history::generate(1000 + round, 20_000, users);
                let n = broker::produce_updates(&bootstrap, &more)?;
                produced.fetch_add(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })
    };
    let sampler = {
        let stop = stop.clone();
        let pid = host.host.pid();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(rss) = broker::rss(pid) {
                    out.push((start.elapsed().as_secs_f64(), rss));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            out
        })
    };
    let load = reads::wrk(host.host.addr.port(), &script, secs);
    stop.store(true, Ordering::Relaxed);
    let rss = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;
    let consumed = broker::metric(&host.host, "logq_records_consumed_total{topic=\"users\"}")?;
    Ok(Soak {
        load: load?,
        rss,
        produced: produced.load(Ordering::Relaxed),
        consumed,
    })
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
        let e = run(10, 10, MIN_SECS - 1, std::path::Path::new("/nonexistent"))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("pass by construction"), "{e}");
    }
}
