//! Any bytes, as a record value of either stream and as a framed batch: decoding never
//! panics, and every record is accounted for (accepted events or a rejection).
#![no_main]

use libfuzzer_sys::fuzz_target;
use logq_reducer::{Batch, Record, Source};

fuzz_target!(|data: &[u8]| {
    for source in [Source::Users, Source::Organizations] {
        let batch = Batch::new(&Record::sequence([(source, data)]));
        let plan = batch.plan();
        assert_eq!(plan.accepted.len(), 1);
        let refused = plan.rejections.iter().any(|r| r.input == 0);
        assert!(
            plan.accepted[0] > 0 || refused,
            "a record was neither accepted nor refused"
        );
        // Every planned entity folds from nothing.
        let updates = batch
            .fold(&vec![None; plan.entities.len()])
            .expect("fold from empty states");
        for u in &updates {
            if let Some(view) = u.view() {
                assert!(view.starts_with('{') && view.ends_with('}'), "{view}");
            }
        }
    }
    // The same bytes as the framed form the host sends: broken framing is an error.
    let _ = Batch::from_records(data);
});
