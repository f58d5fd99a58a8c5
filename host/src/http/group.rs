//! Swaps across the hosts of a group (`--sharded`): a swap or a rollback sent to any
//! host reaches every host. The host it was sent to applies it as always, then
//! announces it on the members topic ([`Cluster::announce`]); every other host (and
//! any host that starts later: the topic is read from its beginning) applies the
//! newest announcement once: a rollback where its own previous reducer is the one
//! asked for, else the same component in the same mode, fetched from a host that
//! has it (`GET /admin/reducer/components/{sha256}`, with the admin token the hosts
//! of a group share) and checked against its sha256. Each host validates it with its
//! own canary, so a host that refuses it keeps its reducer and its history says why;
//! a host that starts after a forward swap applies it as a replay (its state is being
//! built: it must be built whole by the group's reducer);
//! `GET /admin/reducer` on any host lists which reducer each host runs.
//!
//! Previews and replay cancels stay with the host they are sent to (a preview
//! changes nothing; a replay runs per host).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::admin::SwapControl;
use crate::cluster::{Cluster, Desired};
use crate::fold::sha256_hex;
use crate::reducers::{Active, Mode, Origin, Registry, Submitted, SwapError};

/// Components kept to hand to other hosts (the start-up one and the newest swaps).
const KEEP: usize = 4;
/// How often a host looks for a newer group reducer.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// Longest a fetch of a component from another host may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The reducers of one host of a group: its own registry, and what the group asked.
pub struct GroupSwaps {
    local: Arc<Registry>,
    cluster: Arc<Cluster>,
    token: Option<String>,
    /// Components by sha256, newest last.
    kept: Mutex<VecDeque<(String, Arc<[u8]>)>>,
    /// The last group reducer this process announced itself (it applied it already).
    announced: AtomicU64,
    /// When this host started (ms since the Unix epoch; a [`Desired::seq`] is the
    /// announcing host's clock or later).
    started_ms: u64,
}

/// Why a group reducer was not applied this time.
enum NotYet {
    /// Try again shortly (no host has the component yet, a replay runs here).
    Retry(String),
    /// This host refused it: its history says why; wait for the next one.
    Refused(String),
}

impl GroupSwaps {
    /// `local`'s swaps, shared through `cluster`; `startup` is the component this
    /// host started with (kept for hosts that roll back to it).
    pub fn new(
        local: Arc<Registry>,
        cluster: Arc<Cluster>,
        token: Option<String>,
        startup: &[u8],
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            local,
            cluster,
            token,
            kept: Mutex::default(),
            announced: AtomicU64::new(0),
            started_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
        me.keep(startup);
        me
    }

    fn keep(&self, bytes: &[u8]) {
        let sha = sha256_hex(bytes);
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(s, _)| *s != sha);
        if kept.len() == KEEP {
            kept.pop_front();
        }
        kept.push_back((sha, bytes.into()));
    }

    fn kept(&self, sha256: &str) -> Option<Arc<[u8]>> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter()
            .find(|(s, _)| s == sha256)
            .map(|(_, b)| b.clone())
    }

    fn announce(&self, sha256: &str, mode: &str, rollback: bool) {
        let d = self.cluster.announce(sha256, mode, rollback);
        self.announced.store(d.seq, Ordering::Relaxed);
        tracing::info!(
            "announced reducer {sha256} ({mode}{}) to the group as #{}",
            if rollback { ", a rollback" } else { "" },
            d.seq
        );
    }

    /// Applies the newest group reducer until `stop`: every [`FOLLOW_EVERY`], and
    /// says in this host's advert which reducer it runs.
    pub async fn follow(self: Arc<Self>, stop: Arc<AtomicBool>) {
        let mut applied = 0;
        let mut said = Instant::now() - Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) {
            self.cluster.set_reducer(self.local.current().sha256());
            if let Some(d) = self.cluster.desired()
                && d.seq > applied
            {
                if d.seq == self.announced.load(Ordering::Relaxed)
                    && d.by == self.cluster.instance()
                {
                    applied = d.seq;
                } else {
                    // Announced before this host started: its state is being built
                    // now, and the group's reducer must build it whole.
                    let before_start = d.seq < self.started_ms;
                    match self.apply(&d, before_start).await {
                        Ok(()) => applied = d.seq,
                        Err(NotYet::Refused(why)) => {
                            tracing::warn!(
                                "group reducer #{} ({}) refused here: {why}",
                                d.seq,
                                d.sha256
                            );
                            applied = d.seq;
                        }
                        Err(NotYet::Retry(why)) => {
                            if said.elapsed() > Duration::from_secs(5) {
                                tracing::warn!(
                                    "group reducer #{} ({}) not applied yet: {why}",
                                    d.seq,
                                    d.sha256
                                );
                                said = Instant::now();
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }

    async fn apply(&self, d: &Desired, rebuild: bool) -> Result<(), NotYet> {
        let current = self.local.current();
        if current.sha256() == d.sha256 {
            return Ok(());
        }
        let local = self.local.clone();
        let submitted = if d.rollback
            && self
                .local
                .previous()
                .is_some_and(|p| p.sha256() == d.sha256)
        {
            tokio::task::spawn_blocking(move || local.rollback()).await
        } else {
            let bytes = match self.kept(&d.sha256) {
                Some(b) => b,
                None => self.fetch(&d.sha256).await?,
            };
            let mode = if d.mode == "forward" && !rebuild {
                Mode::Forward
            } else {
                Mode::Replay
            };
            tokio::task::spawn_blocking(move || local.submit(&bytes, Origin::Group, mode)).await
        };
        match submitted {
            Ok(Ok(_)) => {
                tracing::info!("applied group reducer #{} ({})", d.seq, d.sha256);
                Ok(())
            }
            Ok(Err(SwapError::Busy(why))) => Err(NotYet::Retry(why)),
            Ok(Err(e)) => Err(NotYet::Refused(e.to_string())),
            Err(e) => Err(NotYet::Retry(e.to_string())),
        }
    }

    /// The component `sha256` from another host, the ones that run it first.
    async fn fetch(&self, sha256: &str) -> Result<Arc<[u8]>, NotYet> {
        let Some(token) = &self.token else {
            return Err(NotYet::Refused(
                "this host has no --admin-token, so it cannot fetch the component from the others"
                    .into(),
            ));
        };
        let path = format!("/admin/reducer/components/{sha256}");
        let auth = [("authorization", format!("Bearer {token}"))];
        let mut why = String::from("no other host is known");
        for url in self.cluster.peers_for(sha256) {
            let authority = url.trim_start_matches("http://");
            let answer = tokio::time::timeout(
                FETCH_TIMEOUT,
                super::forward::fetch(authority, &path, &auth, self.cluster.instance()),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            let body = match answer {
                Ok(a) if a.status == 200 => a.body,
                Ok(a) => {
                    why = format!("{url} answered {}", a.status);
                    continue;
                }
                Err(e) => {
                    why = format!("{url}: {e}");
                    continue;
                }
            };
            if sha256_hex(&body) != sha256 {
                why = format!("{url} sent bytes whose sha256 is not {sha256}");
                continue;
            }
            self.keep(&body);
            return Ok(body.into());
        }
        Err(NotYet::Retry(format!("fetching the component: {why}")))
    }
}

impl SwapControl for GroupSwaps {
    fn submit(&self, bytes: &[u8], origin: Origin, mode: Mode) -> Result<Submitted, SwapError> {
        let done = self.local.submit(bytes, origin, mode)?;
        if mode != Mode::Preview {
            self.keep(bytes);
            let mode = if mode == Mode::Forward {
                "forward"
            } else {
                "replay"
            };
            self.announce(&sha256_hex(bytes), mode, false);
        }
        Ok(done)
    }

    fn rollback(&self) -> Result<Submitted, SwapError> {
        let done = self.local.rollback()?;
        self.announce(&done.swap.sha256, "replay", true);
        Ok(done)
    }

    fn cancel_replay(&self) -> bool {
        self.local.cancel_replay()
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.local.describe();
        d["group"] = serde_json::json!({
            "hosts": self.cluster.reducers(),
            "reducer": self.cluster.desired(),
        });
        d
    }

    fn active(&self) -> Option<Arc<Active>> {
        Some(self.local.current())
    }

    fn component(&self, sha256: &str) -> Option<Arc<[u8]>> {
        self.kept(sha256)
    }
}
