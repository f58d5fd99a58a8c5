//! Dead letters: a record the reducer refused (wholly or partly) goes to
//! `<topic><dlq suffix>` with its key and value and headers saying why and where from,
//! once per cause:
//!
//! - a record below the offset the consumer group had committed at start was
//!   dead-lettered by an earlier run (commits never pass an unacknowledged dead
//!   letter), so it is counted and not sent again;
//! - every dead letter is kept until the broker acknowledges it (idempotent producer,
//!   `acks=all`); a failed one is sent again with backoff, and [`DeadLetters::safe`]
//!   keeps the loop from committing (or snapshotting) past it meanwhile.
//!
//! The crash window: a host killed between a dead letter's acknowledgement and the
//! next offset commit (`auto.commit.interval.ms`, 5 s by default) sends it once more
//! after the restart. Consumers of the dead-letter topic can drop such a copy by its
//! `logq.topic`/`logq.partition`/`logq.offset` headers.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use logq_abi::{PerSource, Source};

use crate::broker::producer::{LetterKey, LetterProducer};
use crate::broker::{KafkaError, Partition, Record, Topics};
use crate::config::RunConfig;
use crate::fold::DeadLetter;
use crate::metrics::Metrics;

/// Longest wait between two attempts at a dead letter that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where a dead letter says its record came from: the record itself, or for a
/// re-keyed one the producer's record (the re-keyed record's own place is in the
/// header `logq.rekeyed`), with the refused events' positions in it.
struct Place<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    events: String,
}

impl<'a> Place<'a> {
    fn of(topic: &'a str, record: &Record<'a>, events: &str) -> Self {
        match record.origin {
            None => Self {
                topic,
                partition: record.partition,
                offset: record.offset,
                events: events.to_owned(),
            },
            // Refused as a whole: every event of it.
            Some(o) if events.is_empty() => Self {
                topic: o.topic,
                partition: o.partition,
                offset: o.offset,
                events: o.elements.to_owned(),
            },
            Some(o) => Self {
                topic: o.topic,
                partition: o.partition,
                offset: o.offset,
                events: events
                    .split(',')
                    .filter(|e| !e.is_empty())
                    .map(|e| {
                        e.parse()
                            .ok()
                            .and_then(|i| o.element(i))
                            .unwrap_or(e)
                            .to_owned()
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            },
        }
    }
}

/// A dead letter kept until the broker acknowledges it.
struct Letter {
    topic: String,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, String)>,
    /// A re-keyed record's origin and key (see `DeadLetters::origins`).
    origin: Option<(i32, i64, Vec<u8>)>,
}

/// Sends dead letters, counts them, and knows which are safe.
pub struct DeadLetters {
    producer: LetterProducer,
    topics: Topics,
    /// The dead-letter topic of each stream, users first.
    dlq_topics: PerSource<String>,
    metrics: Arc<Metrics>,
    /// The group's committed offsets at start: below them, an earlier run sent the
    /// dead letters already.
    sent_before: BTreeMap<Partition, i64>,
    /// Sent, not acknowledged yet.
    in_flight: BTreeMap<LetterKey, Letter>,
    /// Failed, to be sent again at `next_retry`.
    retry: Vec<LetterKey>,
    next_retry: Instant,
    backoff: Duration,
    last_error: Option<String>,
    /// Whether new letters wait for [`DeadLetters::release`] (see
    /// [`DeadLetters::hold_new`]).
    holding: bool,
    /// Letters kept, not sent yet.
    held: BTreeSet<LetterKey>,
    /// The re-keyed records dead-lettered (or found below the committed offset), by
    /// origin and key: a copy the re-key stage wrote again is not sent twice.
    origins: HashSet<(i32, i64, Vec<u8>)>,
    /// Partitions folded as a standby: their letters are kept, not sent (see
    /// [`DeadLetters::promote`]).
    standing: BTreeSet<Partition>,
    /// Letters of standby partitions, kept.
    kept: BTreeSet<LetterKey>,
}

impl DeadLetters {
    /// A producer for the dead-letter topics of `config`; `sent_before` are the
    /// committed offsets found at start.
    ///
    /// # Errors
    /// When librdkafka refuses the settings.
    pub fn new(
        config: &RunConfig,
        topics: Topics,
        metrics: Arc<Metrics>,
        sent_before: BTreeMap<Partition, i64>,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: LetterProducer::new(&config.kafka)?,
            // Re-keyed users' dead letters go where the users topic's would.
            dlq_topics: PerSource::from_fn(|s| config.dead_letter_topic(s)),
            topics,
            metrics,
            sent_before,
            in_flight: BTreeMap::new(),
            retry: Vec::new(),
            next_retry: Instant::now(),
            backoff: Duration::from_millis(100),
            last_error: None,
            holding: false,
            held: BTreeSet::new(),
            origins: HashSet::new(),
            standing: BTreeSet::new(),
            kept: BTreeSet::new(),
        })
    }

    /// From now on, letters are kept until [`DeadLetters::release`] (or dropped by
    /// [`DeadLetters::discard`]): a host that shares partitions sends a step's letters
    /// only once it knows it still held the partitions while it folded them (see
    /// `Sharing::in_doubt`). Held letters count as unacknowledged: progress is not
    /// committed past them.
    pub fn hold_new(&mut self) {
        self.holding = true;
    }

    /// Sends every held letter.
    pub fn release(&mut self) {
        for key in std::mem::take(&mut self.held) {
            self.produce(key);
        }
    }

    /// Drops the held letters of `partitions`, which this host lost while it could
    /// not know: the host that holds them now sends them.
    pub fn discard(&mut self, partitions: &[Partition]) {
        let gone: Vec<LetterKey> = self
            .held
            .iter()
            .chain(&self.kept)
            .filter(|(p, _)| partitions.contains(p))
            .copied()
            .collect();
        for key in gone {
            self.held.remove(&key);
            self.kept.remove(&key);
            // Never sent: a copy of it read later is not one.
            if let Some(origin) = self.in_flight.remove(&key).and_then(|l| l.origin) {
                self.origins.remove(&origin);
            }
        }
    }

    /// Partition `p` is folded here as a standby: its letters are kept until the
    /// group gives it to this host ([`DeadLetters::promote`]) or it stops standing by
    /// ([`DeadLetters::discard`], [`DeadLetters::stand_down`]).
    pub fn stand_by(&mut self, p: Partition) {
        self.standing.insert(p);
    }

    /// Partition `p` is no longer folded here as a standby.
    pub fn stand_down(&mut self, p: Partition) {
        self.standing.remove(&p);
    }

    /// The group gave partition `p`, folded here as a standby, to this host, with
    /// its committed offset: the kept letters at or past it are sent now (the last
    /// holder sent those below it), counted as sent.
    pub fn promote(&mut self, p: Partition, committed: Option<i64>) {
        self.standing.remove(&p);
        let mine: Vec<LetterKey> = self
            .kept
            .iter()
            .filter(|(at, _)| *at == p)
            .copied()
            .collect();
        for key in mine {
            self.kept.remove(&key);
            if committed.is_some_and(|c| key.1 < c) {
                self.in_flight.remove(&key);
                self.metrics
                    .topic(p.source)
                    .dead_letters_known
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            tracing::warn!(
                partition = p.id,
                offset = key.1,
                "dead-lettered on taking over from a standby"
            );
            self.metrics
                .topic(p.source)
                .dead_lettered
                .fetch_add(1, Ordering::Relaxed);
            if self.holding {
                self.held.insert(key);
            } else {
                self.produce(key);
            }
        }
    }

    /// The group's committed offset of partition `p`, given to this host after start:
    /// below it, another host (or an earlier run) sent the dead letters already.
    pub fn known(&mut self, p: Partition, committed: Option<i64>) {
        match committed {
            Some(c) => {
                self.sent_before.insert(p, c);
            }
            None => {
                self.sent_before.remove(&p);
            }
        }
    }

    /// Logs, counts and sends `record` (of stream `source`), refused as `d` says, with
    /// `applied` of its events applied, unless an earlier run sent it (or, for a
    /// re-keyed record, a copy of it was sent).
    pub fn send(&mut self, source: Source, record: &Record<'_>, d: &DeadLetter, applied: u64) {
        let partition = Partition {
            source,
            id: record.partition,
        };
        let counters = self.metrics.topic(source);
        let origin = record.origin.map(|o| {
            (
                o.partition,
                o.offset,
                record.key.unwrap_or_default().to_vec(),
            )
        });
        let copy = origin
            .as_ref()
            .is_some_and(|o| !self.origins.insert(o.clone()));
        if copy
            || self
                .sent_before
                .get(&partition)
                .is_some_and(|committed| record.offset < *committed)
        {
            tracing::debug!(
                topic = self.topics.name(source),
                partition = record.partition,
                offset = record.offset,
                "refused again, dead-lettered already: {}",
                d.reason
            );
            counters.dead_letters_known.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dlq_topic = self.dlq_topics.get(source).clone();
        let place = Place::of(self.topics.name(source), record, &d.events);
        let standby = self.standing.contains(&partition);
        if !standby {
            tracing::warn!(
                topic = place.topic,
                partition = place.partition,
                offset = place.offset,
                "dead-lettered to {dlq_topic}: {}",
                d.reason
            );
            counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            counters.note_dead_letter(place.partition, place.offset, &d.reason);
        }
        let mut headers = vec![
            ("logq.reason", d.reason.clone()),
            ("logq.topic", place.topic.to_owned()),
            ("logq.partition", place.partition.to_string()),
            ("logq.offset", place.offset.to_string()),
            ("logq.events.rejected", place.events),
            ("logq.events.applied", applied.to_string()),
        ];
        if record.origin.is_some() {
            headers.push((
                "logq.rekeyed",
                format!(
                    "{}/{}@{}",
                    self.topics.name(source),
                    record.partition,
                    record.offset
                ),
            ));
        }
        let headers = headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let key = (partition, record.offset);
        self.in_flight.insert(
            key,
            Letter {
                topic: dlq_topic,
                key: record.key.map(<[u8]>::to_vec),
                value: record.value.unwrap_or_default().to_vec(),
                headers,
                origin,
            },
        );
        if standby {
            self.kept.insert(key);
        } else if self.holding {
            self.held.insert(key);
        } else {
            self.produce(key);
        }
    }

    fn produce(&mut self, key: LetterKey) {
        let Some(letter) = self.in_flight.get(&key) else {
            return;
        };
        if let Err(e) = self.producer.send(
            key,
            &letter.topic,
            letter.key.as_deref(),
            &letter.value,
            &letter.headers,
        ) {
            self.failed(key, e.to_string());
        }
    }

    fn failed(&mut self, key: LetterKey, error: String) {
        self.metrics.dlq_failed();
        tracing::error!(
            "dead letter of {}/{} at offset {} not delivered ({error}); retrying",
            self.topics.name(key.0.source),
            key.0.id,
            key.1
        );
        self.last_error = Some(error);
        self.retry.push(key);
    }

    /// Takes the broker's outcomes, sends failed letters again when their backoff is
    /// over, and publishes how many are pending. Called every loop iteration.
    pub fn poll(&mut self) {
        let (acked, failed) = self.producer.take_outcomes();
        for key in acked {
            self.in_flight.remove(&key);
        }
        for (key, error) in failed {
            self.failed(key, error);
        }
        if !self.retry.is_empty() && Instant::now() >= self.next_retry {
            for key in std::mem::take(&mut self.retry) {
                self.produce(key);
            }
            self.next_retry = Instant::now() + self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        } else if self.retry.is_empty() && self.in_flight.is_empty() {
            self.backoff = Duration::from_millis(100);
            self.last_error = None;
        }
        let trouble = self.last_error.as_ref().map(|e| {
            format!(
                "{} dead letters not delivered yet (last error: {e}); retrying, progress held",
                self.in_flight.len() - self.kept.len()
            )
        });
        // Kept letters of standby partitions are not pending: nothing sends them yet.
        self.metrics
            .set_dlq_pending(self.in_flight.len() - self.kept.len(), trouble);
    }

    /// How far progress `next` of partition `p` may be committed (and snapshotted):
    /// up to the first offset whose dead letter the broker has not acknowledged, not
    /// past it.
    pub fn safe(&self, p: Partition, next: i64) -> i64 {
        self.in_flight
            .range((p, i64::MIN)..=(p, i64::MAX))
            .next()
            .map_or(next, |((_, held), _)| next.min(*held))
    }

    /// Waits (up to `timeout`) until every dead letter is acknowledged or failed,
    /// then takes the outcomes.
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), KafkaError> {
        let flushed = self.producer.flush(timeout);
        self.poll();
        flushed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use clap::Parser as _;

    use super::*;
    use crate::broker::rekey::Origin;
    use crate::config::{Cli, Command};

    /// A sharded host's settings with the re-key stage, as `service::start_rekey`
    /// leaves them; the broker is never reached (letters are held).
    fn rekeyed() -> RunConfig {
        let cli = Cli::try_parse_from(["logq", "run", "--brokers", "127.0.0.1:1", "--sharded"])
            .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(config) = cli.command else {
            panic!("not run")
        };
        let mut config = *config;
        config.users_topic = "users.by-id".into();
        config.rekeyed_from = Some("users".into());
        config
    }

    /// Dead letters of a re-keying host that hold every new letter (nothing reaches
    /// the absent broker), and the metrics they count in.
    fn holding() -> (DeadLetters, Arc<Metrics>) {
        let config = rekeyed();
        let metrics = Arc::new(Metrics::new(config.topics()));
        let mut dlq = DeadLetters::new(
            &config,
            Topics::from(&config),
            metrics.clone(),
            BTreeMap::new(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        dlq.hold_new();
        (dlq, metrics)
    }

    fn header<'l>(letter: &'l Letter, name: &str) -> Option<&'l str> {
        letter
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_re_keyed_record_written_twice_is_dead_lettered_once_naming_the_producers_record() {
        let (mut dlq, metrics) = holding();
        let origin = Origin::parse(b"users/1@7#0,2").unwrap_or_else(|| panic!("origin"));
        let record = |offset, key: &'static [u8]| Record {
            topic: "users.by-id",
            partition: 3,
            offset,
            key: Some(key),
            value: Some(br#"[{"id":"u1"},{"id":"u1"}]"#),
            origin: Some(origin),
        };
        let refused = DeadLetter {
            input: 0,
            reason: "event 1: bad".into(),
            events: "1".into(),
        };
        let counters = metrics.topic(Source::Users);
        let sent = || counters.dead_lettered.load(Relaxed);
        dlq.send(Source::Users, &record(10, b"u1"), &refused, 1);
        // The stage wrote the record again (a member died before committing).
        dlq.send(Source::Users, &record(25, b"u1"), &refused, 1);
        assert_eq!(sent(), 1);
        assert_eq!(counters.dead_letters_known.load(Relaxed), 1);
        let at = Partition {
            source: Source::Users,
            id: 3,
        };
        let letter = &dlq.in_flight[&(at, 10)];
        assert_eq!(letter.topic, "users.dlq");
        for (name, want) in [
            ("logq.topic", "users"),
            ("logq.partition", "1"),
            ("logq.offset", "7"),
            // Event 1 of the re-keyed record is event 2 of the producer's.
            ("logq.events.rejected", "2"),
            ("logq.rekeyed", "users.by-id/3@10"),
        ] {
            assert_eq!(header(letter, name), Some(want), "{name}");
        }
        // Another user's events of the same record: another cause.
        dlq.send(Source::Users, &record(11, b"u2"), &refused, 1);
        assert_eq!(sent(), 2);
        // A letter dropped unsent (the partition was lost in doubt) is no copy: the
        // record read again is dead-lettered.
        dlq.discard(&[at]);
        dlq.send(Source::Users, &record(40, b"u1"), &refused, 1);
        assert_eq!(sent(), 3);
    }

    #[test]
    fn a_standby_keeps_its_letters_and_sends_those_past_the_commit_when_promoted() {
        let (mut dlq, metrics) = holding();
        let at = Partition {
            source: Source::Users,
            id: 2,
        };
        let record = |offset| Record {
            topic: "users.by-id",
            partition: 2,
            offset,
            key: Some(b"u"),
            value: Some(b"{}"),
            origin: None,
        };
        let refused = DeadLetter {
            input: 0,
            reason: "bad".into(),
            events: String::new(),
        };
        let counters = metrics.topic(Source::Users);
        dlq.stand_by(at);
        dlq.send(Source::Users, &record(5), &refused, 0);
        dlq.send(Source::Users, &record(12), &refused, 0);
        // Kept: not sent, not counted, not pending, and nothing else released sends them.
        assert_eq!(counters.dead_lettered.load(Relaxed), 0);
        assert_eq!(dlq.kept.len(), 2);
        dlq.release();
        assert!(dlq.held.is_empty());
        dlq.poll();
        assert!(
            metrics
                .render(crate::state::Sizes::default())
                .contains("logq_dead_letters_pending 0\n")
        );
        // The group gives it here, committed at 10: the last holder sent offset 5's.
        dlq.promote(at, Some(10));
        assert_eq!(counters.dead_lettered.load(Relaxed), 1);
        assert_eq!(counters.dead_letters_known.load(Relaxed), 1);
        assert_eq!(
            dlq.in_flight.keys().copied().collect::<Vec<_>>(),
            [(at, 12)]
        );
        assert!(dlq.held.contains(&(at, 12)));
        // A partition stood down drops what it kept.
        let other = Partition {
            source: Source::Users,
            id: 3,
        };
        dlq.stand_by(other);
        dlq.send(
            Source::Users,
            &Record {
                partition: 3,
                ..record(1)
            },
            &refused,
            0,
        );
        dlq.discard(&[other]);
        dlq.stand_down(other);
        assert!(dlq.kept.is_empty() && !dlq.in_flight.contains_key(&(other, 1)));
    }
}
