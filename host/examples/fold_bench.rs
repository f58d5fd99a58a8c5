//! Fold-engine benchmark (no broker): events/s through the wasm reducer vs. the same
//! fold compiled natively, on the same events in the same process.
//!
//!     cargo run --release -p logq --example fold_bench -- [EVENTS] [USERS] [BATCH]

use std::collections::HashMap;
use std::time::Instant;

use logq::runtime::{self, Input, Limits, Runtime, Source};

fn events(n: usize, users: u64) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x5eed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let kinds = [
        "User Created",
        "User Updated",
        "User Updated",
        "User Deleted",
    ];
    let orgs = ["Metal Gear Solid", "Outer Heaven", "FOXHOUND"];
    (0..n)
        .map(|_| {
            let id = next() % users;
            let kind = kinds[(next() % 4) as usize];
            let s = next() % 60;
            format!(
                r#"{{"id":"{id:032x}","event_type":"{kind}","username":"user-{id}","user_email":"user-{id}@example.com","user_type":"User","organization_name":"{}","received_at":"2021-03-04 05:{:02}:{s:02}.{:06}"}}"#,
                orgs[(next() % 3) as usize],
                next() % 60,
                next() % 1_000_000
            )
            .into_bytes()
        })
        .collect()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, users, batch) = (
        args.first().copied().unwrap_or(1_000_000),
        args.get(1).copied().unwrap_or(100_000) as u64,
        args.get(2).copied().unwrap_or(2_000),
    );
    let values = events(n, users);
    let bytes: usize = values.iter().map(Vec::len).sum();
    let limits = Limits {
        memory_bytes: 256 << 20,
        time: std::time::Duration::from_secs(10),
    };
    let reducer = Runtime::new(limits, None)
        .and_then(|rt| rt.load(runtime::DEFAULT_REDUCER))
        .expect("the default reducer loads");

    // Native: the reducer crate's own fold.
    let start = Instant::now();
    let mut native: HashMap<(logq_reducer::Kind, String), Vec<u8>> = HashMap::new();
    for chunk in values.chunks(batch) {
        let b = logq_reducer::Batch::new(
            chunk
                .iter()
                .map(|v| (logq_reducer::Source::Users, v.as_slice())),
        );
        let prior: Vec<Option<&[u8]>> = b
            .plan()
            .entities
            .iter()
            .map(|e| native.get(&(e.kind, e.key.clone())).map(Vec::as_slice))
            .collect();
        let updates = b.fold(&prior).expect("native fold");
        let keys: Vec<_> = b
            .plan()
            .entities
            .iter()
            .map(|e| (e.kind, e.key.clone()))
            .collect();
        for (k, u) in keys.into_iter().zip(updates) {
            native.insert(k, u.state.expect("state"));
        }
    }
    let native_secs = start.elapsed().as_secs_f64();

    // Wasm: the component, through the host runtime (fresh instance per batch).
    let start = Instant::now();
    let mut wasm: HashMap<String, Vec<u8>> = HashMap::new();
    for chunk in values.chunks(batch) {
        let inputs: Vec<Input> = chunk
            .iter()
            .map(|v| Input {
                source: Source::Users,
                value: v.clone(),
            })
            .collect();
        let folded = reducer
            .fold(&inputs, |entities| {
                entities.iter().map(|e| wasm.get(&e.key).cloned()).collect()
            })
            .expect("wasm fold");
        for (e, u) in folded.plan.entities.iter().zip(folded.updates) {
            wasm.insert(e.key.clone(), u.state.expect("state"));
        }
    }
    let wasm_secs = start.elapsed().as_secs_f64();
    assert_eq!(
        native.len(),
        wasm.len(),
        "both folds keep the same entities"
    );

    println!(
        "| fold engine ({n} events, {users} users, {} B/event avg, batch {batch}) | events/s |",
        bytes / n.max(1)
    );
    println!("|---|---|");
    println!("| native | {:.0} |", n as f64 / native_secs);
    println!(
        "| wasm (wasmtime, component) | {:.0} |",
        n as f64 / wasm_secs
    );
    println!("| wasm / native time | {:.2}x |", wasm_secs / native_secs);
}
