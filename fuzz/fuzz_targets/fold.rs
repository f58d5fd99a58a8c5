//! Records cut from the input (by 0xff bytes; a leading 0xfe marks an organization
//! record): folding them in one batch or in two gives the same states, and arbitrary
//! bytes handed in as a prior state are an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use logq_abi::driver::Model;
use logq_reducer::{Batch, Native, Record, Source};

fn fold(model: &mut Model, records: &[Record<'_>]) {
    model
        .apply(&Native, records)
        .expect("the reducer's own states decode");
}

fuzz_target!(|data: &[u8]| {
    let records: Vec<(Source, &[u8])> = data
        .split(|b| *b == 0xff)
        .map(|r| match r.split_first() {
            Some((0xfe, rest)) => (Source::Organizations, rest),
            _ => (Source::Users, r),
        })
        .collect();
    // One log: the same offsets whichever way it is cut into batches.
    let log = Record::sequence(records.iter().copied());
    let mut whole = Model::new();
    fold(&mut whole, &log);
    let mut split = Model::new();
    let cut = log.len() / 2;
    fold(&mut split, &log[..cut]);
    fold(&mut split, &log[cut..]);
    // The fold is a join-semilattice and the encoding is canonical: same bytes.
    assert_eq!(whole, split);

    // Junk as a prior state: an error, not a panic.
    if let Some((first, _)) = records.first() {
        let batch = Batch::new(&Record::sequence([(*first, records[0].1)]));
        let n = batch.plan().entities.len();
        let _ = batch.fold(&vec![Some(data); n]);
    }
});
