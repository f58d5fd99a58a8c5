//! A reproducible event history: seeded, about 1% organization events, users created,
//! updated, deleted and re-created, some events out of order and some duplicated,
//! 200-300 bytes an event.

use logq_e2e::Rng;

/// One generated history.
pub struct History {
    /// User events, in produce order.
    pub users: Vec<String>,
    /// Organization events, in produce order.
    pub organizations: Vec<String>,
}

impl History {
    /// All events.
    pub fn len(&self) -> usize {
        self.users.len() + self.organizations.len()
    }

    /// Total bytes of all events.
    pub fn bytes(&self) -> usize {
        self.users
            .iter()
            .chain(&self.organizations)
            .map(String::len)
            .sum()
    }
}

const TIERS: [&str; 3] = ["Small", "Medium", "Large"];
const DOMAINS: [&str; 4] = [
    "example.com",
    "outerheaven.org",
    "foxhound.mil",
    "mail.test",
];
const AGENTS: [&str; 3] = ["web/5.2.1", "ios/17.4", "android/14.0"];

/// `events` events over `users` user ids, from `seed`.
pub fn generate(seed: u64, events: usize, users: u64) -> History {
    let mut rng = Rng(seed.max(1));
    let org_events = (events / 100).max(1);
    let orgs = (org_events as u64 / 5).max(1);
    let user_events = events - org_events;
    // Event time advances with the position; a tenth of the events are late by up to
    // an hour, so arrival order and event order differ.
    let base: i64 = 1_609_459_200; // 2021-01-01
    let time = |rng: &mut Rng, i: usize| {
        let mut t = base * 1_000_000 + i as i64 * 50_000;
        if rng.below(10) == 0 {
            t -= rng.below(3_600_000_000) as i64;
        }
        logq_reducer::time::render(t)
    };
    let mut out = Vec::with_capacity(user_events + user_events / 50);
    for i in 0..user_events {
        let n = rng.below(users);
        let id = format!(
            "{:032x}",
            u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c)
        );
        let at = time(&mut rng, i);
        let e = match rng.below(10) {
            0..=3 => {
                let org = rng.below(orgs);
                format!(
                    r#"{{"id":"{id}","event_type":"User Created","username":"user-{n}","user_email":"user-{n}@{}","user_type":"{}","organization_name":"Organization {org}","received_at":"{at}","client":"{}"}}"#,
                    DOMAINS[rng.below(4) as usize],
                    ["Admin", "User"][rng.below(2) as usize],
                    AGENTS[rng.below(3) as usize],
                )
            }
            4..=8 => {
                let v = rng.below(1000);
                format!(
                    r#"{{"id":"{id}","event_type":"User Updated","username":"user-{n}-v{v}","user_email":"user-{n}.v{v}@{}","received_at":"{at}","client":"{}","request_id":"{:016x}"}}"#,
                    DOMAINS[rng.below(4) as usize],
                    AGENTS[rng.below(3) as usize],
                    rng.next_u64(),
                )
            }
            _ => format!(
                r#"{{"id":"{id}","event_type":"User Deleted","received_at":"{at}","client":"{}","reason":"account closed by its owner","request_id":"{:016x}"}}"#,
                AGENTS[rng.below(3) as usize],
                rng.next_u64(),
            ),
        };
        out.push(e);
        // One event in fifty is delivered twice.
        if rng.below(50) == 0 {
            let dup = out[rng.below(out.len() as u64) as usize].clone();
            out.push(dup);
        }
    }
    let organizations = (0..org_events)
        .map(|i| {
            let k = rng.below(orgs);
            format!(
                r#"{{"organization_key":"org-{k:06}","organization_name":"Organization {k}","organization_tier":"{}","created_at":"2018-01-{:02} 00:00:00.000000","updated_at":"{}","billing_contact":"billing@org-{k}.example.com","region":"eu-west-1"}}"#,
                TIERS[rng.below(3) as usize],
                1 + k % 28,
                time(&mut rng, i * 100),
            )
        })
        .collect();
    History {
        users: out,
        organizations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_mix_are_as_documented() {
        let h = generate(7, 20_000, 2_000);
        let avg = h.bytes() / h.len();
        assert!((200..=300).contains(&avg), "{avg} bytes an event");
        assert!((150..=250).contains(&h.organizations.len()));
        let again = generate(7, 20_000, 2_000);
        assert_eq!(h.users, again.users, "same seed, same history");
        // Every event decodes.
        let batch = logq_reducer::Batch::new(&logq_abi::Record::sequence(
            h.users
                .iter()
                .map(|u| (logq_abi::Source::Users, u.as_bytes()))
                .chain(
                    h.organizations
                        .iter()
                        .map(|o| (logq_abi::Source::Organizations, o.as_bytes())),
                ),
        ));
        assert!(
            batch.plan().rejections.is_empty(),
            "{:?}",
            batch.plan().rejections.first()
        );
    }
}
