//! The records of a batch, host -> reducer (the `batch` constructor's argument).
//!
//! For each record: its stream ([`Source::byte`]), its partition (`i32`, little-endian),
//! its offset (`i64`, little-endian), and its value as a frame.

use crate::{Reader, Record, Source, put_frame};

/// Bytes one record takes besides its value.
pub const OVERHEAD: usize = 1 + 4 + 8 + 4;

/// Appends one record.
pub fn put(out: &mut Vec<u8>, r: &Record<'_>) {
    out.push(r.source.byte());
    out.extend_from_slice(&r.partition.to_le_bytes());
    out.extend_from_slice(&r.offset.to_le_bytes());
    put_frame(out, r.value);
}

/// All of `records`, framed.
pub fn encode(records: &[Record<'_>]) -> Vec<u8> {
    let size = records.iter().map(|r| r.value.len() + OVERHEAD).sum();
    let mut out = Vec::with_capacity(size);
    for r in records {
        put(&mut out, r);
    }
    out
}

/// The records `bytes` holds, borrowing their values.
///
/// # Errors
/// When the framing is broken (a host bug, not a bad record).
pub fn decode(bytes: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let mut r = Reader::new(bytes);
    let mut out = Vec::new();
    while !r.is_empty() {
        let source = Source::from_byte(r.u8()?)?;
        let partition = i32::from_le_bytes(r.array()?);
        let offset = i64::from_le_bytes(r.array()?);
        out.push(Record {
            source,
            partition,
            offset,
            value: r.frame()?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = (Source, i32, i64, Vec<u8>)> {
        (
            prop_oneof![Just(Source::Users), Just(Source::Organizations)],
            any::<i32>(),
            any::<i64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
    }

    fn borrowed(list: &[(Source, i32, i64, Vec<u8>)]) -> Vec<Record<'_>> {
        list.iter()
            .map(|(source, partition, offset, value)| Record {
                source: *source,
                partition: *partition,
                offset: *offset,
                value,
            })
            .collect()
    }

    proptest! {
        #[test]
        fn records_round_trip(list in proptest::collection::vec(record(), 0..20)) {
            let records = borrowed(&list);
            let bytes = encode(&records);
            prop_assert_eq!(bytes.len(), records.iter().map(|r| r.value.len() + OVERHEAD).sum::<usize>());
            prop_assert_eq!(decode(&bytes).map_err(TestCaseError::fail)?, records);
        }

        #[test]
        fn every_truncation_is_an_error(list in proptest::collection::vec(record(), 1..5)) {
            let records = borrowed(&list);
            let bytes = encode(&records);
            let last = bytes.len() - list.last().map_or(0, |r| r.3.len()) - OVERHEAD;
            for cut in last + 1..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err(), "cut at {}", cut);
            }
        }
    }

    #[test]
    fn an_unknown_stream_byte_is_refused() {
        let mut bytes = encode(&Record::sequence([(Source::Users, &b"{}"[..])]));
        bytes[0] = 7;
        assert_eq!(
            decode(&bytes).unwrap_err(),
            "framing: unknown stream byte 7"
        );
    }
}
