//! The header that says where a re-keyed record's events came from: written by the
//! stage, read by the fold (its partition and offset order the events) and the dead
//! letters (which name the producer's record).

/// The header of a re-keyed record that says where its events came from:
/// `<topic>/<partition>@<offset>#<elements>`, the elements being the positions of its
/// events in the input record's array, comma-separated (`0` for a record that was
/// one event).
pub const ORIGIN_HEADER: &str = match ORIGIN_HEADER_C.to_str() {
    Ok(name) => name,
    Err(_) => panic!("the origin header's name is UTF-8"),
};

/// [`ORIGIN_HEADER`] as librdkafka takes it.
pub const ORIGIN_HEADER_C: &std::ffi::CStr = c"logq.origin";

/// Where a re-keyed record's events came from, read from its [`ORIGIN_HEADER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The input topic.
    pub topic: &'a str,
    /// The input record's partition.
    pub partition: i32,
    /// The input record's offset.
    pub offset: i64,
    /// The positions of the events in the input record, comma-separated.
    pub elements: &'a str,
}

/// The header value for events at `elements` of record `offset` of `topic`'s
/// `partition`.
pub fn write(topic: &str, partition: i32, offset: i64, elements: &[usize]) -> String {
    let elements: Vec<String> = elements.iter().map(usize::to_string).collect();
    format!("{topic}/{partition}@{offset}#{}", elements.join(","))
}

impl<'a> Origin<'a> {
    /// Reads a header value ([`write`]'s); `None` when it is not one this stage
    /// wrote.
    pub fn parse(value: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let (place, elements) = text.rsplit_once('#')?;
        let (topic_partition, offset) = place.rsplit_once('@')?;
        let (topic, partition) = topic_partition.rsplit_once('/')?;
        Some(Self {
            topic,
            partition: partition.parse().ok()?,
            offset: offset.parse().ok()?,
            elements,
        })
    }

    /// The position in the input record of event `i` of the re-keyed record.
    pub fn element(&self, i: usize) -> Option<&'a str> {
        self.elements.split(',').nth(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_reads_back_as_written_and_names_each_events_place() {
        let written = write("users.v2/team", 3, 1234, &[0, 2, 5]);
        assert_eq!(written, "users.v2/team/3@1234#0,2,5");
        let o = Origin::parse(written.as_bytes()).unwrap();
        assert_eq!((o.topic, o.partition, o.offset), ("users.v2/team", 3, 1234));
        assert_eq!(o.element(1), Some("2"));
        assert_eq!(o.element(3), None);
        for bad in [&b"users/3@x#0"[..], b"users3@1#0", b"users/3@1", b"\xff"] {
            assert_eq!(Origin::parse(bad), None, "{bad:?}");
        }
    }
}
