//! The re-key stage (`logq run --sharded`, unless `--keyed-input`): hosts that share
//! partitions find a user's partition from its id, so every event of a user must be
//! in the partition its id hashes to. Producers that send keyless records (the seed's
//! JSON arrays) or key by anything else do not put them there. This stage does.
//!
//! It reads the users topic in a consumer group of its own (`<group-id>.rekey`: every
//! sharing host runs a member, so the input is shared too), splits each record into
//! its users' events ([`split`]) and writes, per user, one record to the internal
//! topic (`<group-id>.<users>.by-id`): keyed by the id, partitioned as Kafka's Java clients do
//! (murmur2, see [`super::group::partition_of`]), stamped with the input's timestamp,
//! and with a header saying where it came from ([`ORIGIN_HEADER`]). What cannot be
//! routed (not JSON, no string `id`) is dead-lettered here, with the same headers as
//! the fold's dead letters; everything else goes on, and the fold decides.
//!
//! Order and ties. The fold hosts give the reducer the *origin's* partition and offset
//! (see [`Origin`]), not the internal topic's: equal event times are then decided as
//! they are without this stage (the later offset of a partition, the higher partition
//! across partitions), whatever order the stage wrote the records in. The events of
//! one user in one input record stay in one output record, in their order, so the
//! later element still wins within a record.
//!
//! Progress. The input is committed only after every output and dead letter of a
//! batch is acknowledged (idempotent producer, `acks=all`), so nothing is lost. A stage
//! member that dies, or stood still past its session timeout, leaves records written
//! but not committed; its successor writes them again. The copies carry the same
//! origin: the fold is idempotent (the README's rules hold when an event is delivered
//! more than once), and the fold hosts dead-letter one origin once (see
//! `consumer::dead_letter`).

mod origin;
mod split;
mod stage;
mod written;

pub use origin::{ORIGIN_HEADER, ORIGIN_HEADER_C, Origin};
pub use split::{Split, UserEvents, split};
pub use stage::{Rekey, Rekeying, Stats};
pub use written::Written;
