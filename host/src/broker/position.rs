//! Position tokens: how far into the log something is, as clients carry it.
//!
//! A token lists, per partition, the next offset (everything below it is included):
//! `users/0@124,users/2@57,organizations/1@3`. Topic names cannot contain `/`, `@`
//! or `,` (Kafka allows only letters, digits, `.`, `_` and `-`), so the token needs
//! no escaping in a header or a query string. Partitions a token does not name are
//! not constrained.

use std::collections::BTreeMap;

use super::{Partition, Positions, Topics};

/// Longest token accepted (a client's header or query parameter).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The token of `(topic, partition, next offset)` entries, in order.
pub fn format<'a>(entries: impl IntoIterator<Item = (&'a str, i32, i64)>) -> String {
    let mut out = String::new();
    for (topic, partition, next) in entries {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&std::format!("{topic}/{partition}@{next}"));
    }
    out
}

/// The entries of a token, as `topic/partition -> next offset` (a partition named
/// twice keeps the larger offset).
///
/// # Errors
/// A reason a client can act on, for anything that is not a token.
pub fn parse(token: &str) -> Result<BTreeMap<(String, i32), i64>, String> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(std::format!(
            "position token longer than {MAX_TOKEN_BYTES} bytes"
        ));
    }
    let mut out = BTreeMap::new();
    for entry in token.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || std::format!("position token entry {entry:?} is not topic/partition@offset");
        let (place, next) = entry.rsplit_once('@').ok_or_else(bad)?;
        let (topic, partition) = place.rsplit_once('/').ok_or_else(bad)?;
        let partition: i32 = partition.parse().map_err(|_| bad())?;
        let next: i64 = next.parse().map_err(|_| bad())?;
        if topic.is_empty() || partition < 0 || next < 0 {
            return Err(bad());
        }
        let slot = out.entry((topic.to_owned(), partition)).or_insert(next);
        *slot = (*slot).max(next);
    }
    if out.is_empty() {
        return Err("the position token is empty".into());
    }
    Ok(out)
}

impl Topics {
    /// The token of `positions`.
    pub fn token(&self, positions: &Positions) -> String {
        format(
            positions
                .iter()
                .map(|(p, o)| (self.name(p.source), p.id, *o)),
        )
    }

    /// A client's token as positions of our streams.
    ///
    /// # Errors
    /// A malformed token, or one naming a topic this host does not read (the users
    /// topic it re-keys included: see [`Topics::parse_wanted`]).
    pub fn parse_token(&self, token: &str) -> Result<Positions, String> {
        let (ours, input) = self.parse_wanted(token)?;
        match &self.rekeyed_from {
            Some(from) if !input.is_empty() => Err(self.not_read(from)),
            _ => Ok(ours),
        }
    }

    /// A client's token as positions of our streams, and (with the re-key stage)
    /// next offsets of the producers' users topic, per partition: what `logq produce`
    /// prints there. Only the stage's progress says where those are in ours (see
    /// `broker::rekey::Written`).
    ///
    /// # Errors
    /// A malformed token, or one naming a topic this host does not read or re-key.
    pub fn parse_wanted(&self, token: &str) -> Result<(Positions, BTreeMap<i32, i64>), String> {
        let (mut ours, mut input) = (Positions::new(), BTreeMap::new());
        for ((topic, id), next) in parse(token)? {
            if let Some(source) = self.source_of(&topic) {
                ours.insert(Partition { source, id }, next);
            } else if self.rekeyed_from.as_deref() == Some(topic.as_str()) {
                input.insert(id, next);
            } else {
                return Err(self.not_read(&topic));
            }
        }
        Ok((ours, input))
    }

    fn not_read(&self, topic: &str) -> String {
        match &self.rekeyed_from {
            Some(from) => std::format!(
                "position token names topic {topic:?}; this host reads {:?} and re-keys {from:?}",
                self.names()
            ),
            None => std::format!(
                "position token names topic {topic:?}; this host reads {:?}",
                self.names()
            ),
        }
    }
}

/// How far `at` still is from `wanted`, per partition that is behind (empty: reached).
pub fn behind(at: &Positions, wanted: &Positions) -> Positions {
    wanted
        .iter()
        .filter_map(|(p, want)| {
            let have = at.get(p).copied().unwrap_or(0);
            (have < *want).then_some((*p, want - have))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use logq_abi::Source;

    fn topics() -> Topics {
        Topics {
            users: "users".into(),
            organizations: "orgs".into(),
            rekeyed_from: None,
        }
    }

    #[test]
    fn tokens_round_trip_and_name_topics() {
        let t = topics();
        let positions: Positions = [
            (
                Partition {
                    source: Source::Users,
                    id: 0,
                },
                124,
            ),
            (
                Partition {
                    source: Source::Users,
                    id: 2,
                },
                57,
            ),
            (
                Partition {
                    source: Source::Organizations,
                    id: 1,
                },
                3,
            ),
        ]
        .into_iter()
        .collect();
        let token = t.token(&positions);
        assert_eq!(token, "users/0@124,users/2@57,orgs/1@3");
        assert_eq!(t.parse_token(&token).unwrap(), positions);
        // A partition named twice keeps the larger offset.
        let twice = t.parse_token("users/0@5, users/0@9").unwrap();
        assert_eq!(twice.values().copied().collect::<Vec<_>>(), [9]);
    }

    #[test]
    fn bad_tokens_get_a_reason() {
        let t = topics();
        for (token, reason) in [
            ("", "empty"),
            ("users/0", "topic/partition@offset"),
            ("users@3", "topic/partition@offset"),
            ("users/x@3", "topic/partition@offset"),
            ("users/0@-1", "topic/partition@offset"),
            ("/0@1", "topic/partition@offset"),
            ("other/0@1", "this host reads"),
        ] {
            let e = t.parse_token(token).unwrap_err();
            assert!(e.contains(reason), "{token:?}: {e}");
        }
        assert!(
            t.parse_token(&"users/0@1,".repeat(1000))
                .unwrap_err()
                .contains("longer")
        );
    }

    #[test]
    fn behind_lists_only_partitions_short_of_the_wanted_offset() {
        let p = |id| Partition {
            source: Source::Users,
            id,
        };
        let at: Positions = [(p(0), 10), (p(1), 5)].into_iter().collect();
        let wanted: Positions = [(p(0), 10), (p(1), 7), (p(2), 1)].into_iter().collect();
        let b = behind(&at, &wanted);
        assert_eq!(b, [(p(1), 2), (p(2), 1)].into_iter().collect());
        assert!(behind(&at, &[(p(0), 3)].into_iter().collect()).is_empty());
    }
}
