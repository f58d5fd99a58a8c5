//! Records cut from the input (by 0xff bytes; a leading 0xfe marks an organization
//! record): folding them in one batch or in two gives the same states, and arbitrary
//! bytes handed in as a prior state are an error, never a panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use logq_reducer::{Batch, Entity, Source};

type Store = BTreeMap<Entity, Vec<u8>>;

fn fold(store: &mut Store, records: &[(Source, &[u8])]) {
    let batch = Batch::new(records.iter().copied());
    let prior: Vec<Option<&[u8]>> = batch
        .plan()
        .entities
        .iter()
        .map(|e| store.get(e).map(Vec::as_slice))
        .collect();
    let updates = batch.fold(&prior).expect("the reducer's own states decode");
    let entities = batch.plan().entities.clone();
    for (e, u) in entities.into_iter().zip(updates) {
        match u.state {
            Some(s) => store.insert(e, s),
            None => store.remove(&e),
        };
    }
}

fuzz_target!(|data: &[u8]| {
    let records: Vec<(Source, &[u8])> = data
        .split(|b| *b == 0xff)
        .map(|r| match r.split_first() {
            Some((0xfe, rest)) => (Source::Organizations, rest),
            _ => (Source::Users, r),
        })
        .collect();
    let mut whole = Store::new();
    fold(&mut whole, &records);
    let mut split = Store::new();
    let cut = records.len() / 2;
    fold(&mut split, &records[..cut]);
    fold(&mut split, &records[cut..]);
    // The fold is a join-semilattice and the encoding is canonical: same bytes.
    assert_eq!(whole, split);

    // Junk as a prior state: an error, not a panic.
    if let Some((first, _)) = records.first() {
        let batch = Batch::new([(*first, records[0].1)]);
        let n = batch.plan().entities.len();
        let _ = batch.fold(&vec![Some(data); n]);
    }
});
