//! One shard's users, packed: the table a lookup probes holds only a 4-byte slot
//! number; each slot (48 bytes, in one vector) says where the user's block is; the
//! blocks (the id, then the state, with a little room to grow once it has grown)
//! lie end to end in chunks of up to [`CHUNK_MAX`] bytes. So a user costs no
//! allocation of its own (no allocator header or rounding, no scattered blocks left
//! behind when a state moves), and a shard's memory is a few mappings of its own
//! ([`Mapped`]) that a replaced store or a compacted chunk gives back whole.
//!
//! A state that outgrows its room moves to the end of the newest chunk; the bytes it
//! leaves are counted as waste, per chunk. A chunk whose bytes are all waste is freed
//! at once; when a shard's waste passes 1/32 of what it holds, the writer moves
//! the live blocks out of the most wasted chunk and frees it, a chunk at a time
//! ([`Users::compact`]), so no single write holds the shard's lock for long.

use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::HashTable;
use logq_abi::UpdateRef;

use crate::memory::Mapped;

/// The largest chunk (a block larger than this gets a chunk of its own).
pub(super) const CHUNK_MAX: usize = 1 << 20;
/// The first chunk of a shard (they double up to [`CHUNK_MAX`]).
const CHUNK_MIN: usize = 16 << 10;
/// Bytes of room a visible user's block gets past its state once the state has
/// outgrown its first block: most updates change a state by a few bytes and are
/// then written in place. A user's first block has none (most users are never
/// updated), nor has a user not visible (most of them deleted: tombstones seldom
/// change).
pub(super) const SLACK: usize = 16;
/// Compaction starts once waste is more than 1/`WASTE_SHARE` of the chunks' blocks.
/// At 1/16 a store of 1M ids carried 13 MB of waste (26 bytes per live user);
/// at 1/32 half that, with no catch-up cost measured (`bench/run.sh --memory-only`
/// and `--catch-up-only`, the two builds in turn).
const WASTE_SHARE: usize = 32;
/// A call of [`Users::compact`] compacts at most this many chunks for every half
/// [`CHUNK_MAX`] of blocks written since the call before (and at least this many),
/// so compaction keeps up with the waste whatever the size of the batches between
/// two calls. At a fixed 2 a call, batches of 65,536 records (a quarter as many
/// calls as 16,384) left the store of 1M ids 10 bytes a user larger
/// (`logq-bench --memory-only`: 590 against 580).
const COMPACT_PER_CALL: usize = 2;

/// A range inside a state; `start == NONE` for none.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

const NONE: u32 = u32::MAX;

impl Span {
    fn of(range: Option<&Range<u32>>) -> Self {
        range.map_or(
            Self {
                start: NONE,
                end: 0,
            },
            |r| Self {
                start: r.start,
                end: r.end,
            },
        )
    }

    fn get(self) -> Option<Range<u32>> {
        (self.start != NONE).then_some(self.start..self.end)
    }
}

/// Where one user is, and what the store knows of its state besides the bytes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Chunk and offset of the block: the id, then the room. `chunk == NONE`: free.
    chunk: u32,
    offset: u32,
    /// The id's length; [`GONE`] set once the user is forgotten (its slot and block
    /// are kept until the next purge, see [`Order`]).
    key_len: u32,
    /// Bytes of the block after the id: the state, then room to grow.
    room: u32,
    /// The state's length.
    len: u32,
    /// Which reducer rendered it.
    by: u32,
    view: Span,
    join: Span,
    /// The entity's newest event time; `i64::MIN`: none.
    clock: i64,
}

/// The bit of [`Slot::key_len`] that marks a forgotten user.
const GONE: u32 = 1 << 31;

impl Slot {
    fn key_len(&self) -> u32 {
        self.key_len & !GONE
    }

    fn gone(&self) -> bool {
        self.key_len & GONE != 0
    }

    /// Bytes of its block.
    fn size(&self) -> usize {
        (self.key_len() + self.room) as usize
    }
}

/// The users' ids in order, for listings ([`Users::page`]): `sorted` holds slots in
/// the order of their ids; `recent` those kept since it was last brought up to date
/// ([`Users::settle`]), in no order. A forgotten user's slot and block stay until the
/// writer purges them ([`Users::tidy`]), so `sorted` stays in order without a lookup
/// per forgotten user. A page then costs a binary search and the page, not a pass
/// over every user.
#[derive(Debug, Default)]
struct Order {
    sorted: Vec<u32>,
    recent: Vec<u32>,
}

/// The visible users by the organization they join, for a listing of one
/// organization ([`Users::members`]): entries `name hash << 32 | slot`, `sorted` in
/// order, `recent` added since the last [`Users::settle_members`], in no order. An
/// entry is a hint, 8 bytes a member: a user that leaves the organization, is
/// forgotten, or whose slot is reused leaves its entry behind until the next settle
/// drops it, and a lookup checks every entry against its slot. A user gets an entry
/// when it becomes visible in an organization or moves to another, not on every
/// update.
#[derive(Debug, Default)]
struct Members {
    sorted: Vec<u64>,
    recent: Vec<u64>,
}

/// Forgotten users wait for a purge until they are this many, or 1/32 of those kept.
const PURGE_MIN: usize = 256;
/// The writer brings the order up to date once `recent` is this long, or as long as
/// `sorted` (so the cost stays O(log n) per user kept); a listing does it for
/// whatever is left.
const SETTLE_MIN: usize = 1024;

/// A user as the store keeps it, borrowed from its shard.
#[derive(Debug, Clone)]
pub(super) struct EntryRef<'a> {
    /// The state, then the room past it.
    pub room: &'a [u8],
    pub len: usize,
    pub view: Option<Range<u32>>,
    pub join: Option<Range<u32>>,
    pub by: u32,
    pub clock: Option<i64>,
}

#[derive(Debug, Default)]
struct Chunk {
    /// A mapping of its own: given back to the system whole when the chunk goes.
    bytes: Mapped,
    /// Bytes of `bytes` that no slot uses any more.
    waste: usize,
}

/// A mark no other set of users has had, or will: see [`Users::epoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Epoch(u64);

impl Epoch {
    fn next() -> Self {
        static LAST: AtomicU64 = AtomicU64::new(0);
        Self(LAST.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// It, as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl Default for Epoch {
    fn default() -> Self {
        Self::next()
    }
}

/// One shard's users (see the module's doc).
#[derive(Debug, Default)]
pub(super) struct Users {
    index: HashTable<u32>,
    /// Changes whenever a user is kept or forgotten: see [`Users::epoch`].
    epoch: Epoch,
    hasher: foldhash::fast::RandomState,
    slots: Vec<Slot>,
    /// Slots free for reuse.
    free: Vec<u32>,
    /// Slots of forgotten users, until the next purge.
    gone: Vec<u32>,
    /// Ids in order (behind a lock of its own: a listing brings it up to date under
    /// the shard's read lock).
    order: std::sync::Mutex<Order>,
    /// Visible users by organization (behind a lock of its own, as `order`).
    members: std::sync::Mutex<Members>,
    chunks: Vec<Chunk>,
    /// The chunk new blocks go to.
    tail: usize,
    /// Chunks free for reuse (empty).
    spare: Vec<u32>,
    /// Bytes of blocks in use, and of blocks no longer used (not yet freed).
    used: usize,
    waste: usize,
    /// Bytes of blocks written since the last [`Users::compact`].
    written: usize,
    /// A frozen image names users by slot ([`Users::slot_ids`]): no slot is freed
    /// for reuse meanwhile (no purge, no reset of an emptied shard).
    pinned: bool,
}

/// A block's size for an id of `key_len` bytes and a state of `len`, with room to
/// grow or not.
fn block_for(key_len: usize, len: usize, room: bool) -> usize {
    key_len + len + if room { SLACK } else { 0 }
}

impl Users {
    /// Users kept.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn key_bytes<'a>(slots: &[Slot], chunks: &'a [Chunk], id: u32) -> &'a [u8] {
        let s = &slots[id as usize];
        let at = s.offset as usize;
        &chunks[s.chunk as usize].bytes[at..at + s.key_len() as usize]
    }

    fn key_of<'a>(slots: &[Slot], chunks: &'a [Chunk], id: u32) -> &'a str {
        // Only ever written from a `str`.
        std::str::from_utf8(Self::key_bytes(slots, chunks, id)).unwrap_or_default()
    }

    /// The slot of user `key`.
    pub fn find(&self, key: &str) -> Option<u32> {
        let (slots, chunks) = (&self.slots, &self.chunks);
        self.index
            .find(self.hash(key), |&id| {
                Self::key_bytes(slots, chunks, id) == key.as_bytes()
            })
            .copied()
    }

    /// Which users are kept, as a mark: while it is unchanged, so is the slot of
    /// every user (what [`Users::find`] said of a user, kept or not, still holds).
    /// Unique across all shards and stores, so a mark of another store never matches.
    pub fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// User `key`, if kept.
    pub fn get(&self, key: &str) -> Option<EntryRef<'_>> {
        self.find(key).map(|id| self.entry(id))
    }

    /// The id of the user in slot `id`.
    pub fn key(&self, id: u32) -> &str {
        Self::key_of(&self.slots, &self.chunks, id)
    }

    /// The user in slot `id`.
    pub fn entry(&self, id: u32) -> EntryRef<'_> {
        let s = &self.slots[id as usize];
        let at = (s.offset + s.key_len()) as usize;
        EntryRef {
            room: &self.chunks[s.chunk as usize].bytes[at..at + s.room as usize],
            len: s.len as usize,
            view: s.view.get(),
            join: s.join.get(),
            by: s.by,
            clock: (s.clock != i64::MIN).then_some(s.clock),
        }
    }

    /// The tombstone clock ([`EntryRef::tombstone`]) of the user in slot `id`; `None`
    /// also for a slot free or forgotten.
    pub fn tombstone_clock(&self, id: u32) -> Option<i64> {
        let s = self.slots.get(id as usize)?;
        if s.chunk == NONE || s.gone() {
            return None;
        }
        self.entry(id).tombstone()
    }

    /// The slots of the users kept, in slot order (memory order: a pass over them
    /// reads the slots one after the other).
    fn live(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.slots.len() as u32).filter(|&id| {
            let s = &self.slots[id as usize];
            s.chunk != NONE && !s.gone()
        })
    }

    /// Every user kept, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, EntryRef<'_>)> {
        self.live().map(|id| (self.key(id), self.entry(id)))
    }

    /// Every user id kept, in no order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.live().map(|id| self.key(id))
    }

    /// The slots of the users kept, in no order: 4 bytes a user, read from the
    /// index (not a pass over the slots). They name the same users, and [`Users::key`]
    /// and [`Users::entry`] read them (forgotten or not), while [`Users::pin`] holds.
    pub fn slot_ids(&self) -> Vec<u32> {
        self.index.iter().copied().collect()
    }

    /// While `on`, no slot is freed for reuse: see [`Users::slot_ids`].
    pub fn pin(&mut self, on: bool) {
        self.pinned = on;
    }

    /// Keeps user `key` (not kept yet) with `update`'s `state`, by reducer `by`;
    /// returns its slot.
    pub fn insert(&mut self, key: &str, update: &UpdateRef<'_>, state: &[u8], by: u32) -> u32 {
        let size = block_for(key.len(), state.len(), false);
        let (chunk, offset) = self.place(&[key.as_bytes(), state], size);
        let slot = Slot {
            chunk,
            offset,
            key_len: key.len() as u32,
            room: (size - key.len()) as u32,
            len: state.len() as u32,
            by,
            view: Span::of(update.view.as_ref()),
            join: Span::of(update.join.as_ref()),
            clock: update.clock.unwrap_or(i64::MIN),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let hash = self.hash(key);
        let (slots, chunks, hasher) = (&self.slots, &self.chunks, &self.hasher);
        self.index.insert_unique(hash, id, |&i| {
            hasher.hash_one(Self::key_of(slots, chunks, i))
        });
        self.order_mut().recent.push(id);
        if let Some(name) = member_name(update, state) {
            self.file(name, id);
        }
        self.epoch = Epoch::next();
        id
    }

    /// The organization name the user in slot `id` joins while visible; `None`
    /// while it joins none, is not visible, or the slot holds no user.
    fn member_name(&self, id: u32) -> Option<&[u8]> {
        let s = &self.slots[id as usize];
        if s.chunk == NONE || s.gone() || s.view.get().is_none() {
            return None;
        }
        self.entry(id).join_bytes()
    }

    /// The hash [`Members`] files the user in slot `id` under (see
    /// [`Users::member_name`]).
    fn member_of(&self, id: u32) -> Option<u32> {
        self.member_name(id).map(|name| self.name_hash(name))
    }

    fn name_hash(&self, name: &[u8]) -> u32 {
        // The low half: foldhash's folded multiply mixes it as well as the high.
        self.hasher.hash_one(name) as u32
    }

    /// Files the user in slot `id` under organization `name`.
    fn file(&mut self, name: &[u8], id: u32) {
        let h = self.name_hash(name);
        let members = self.members.get_mut().unwrap_or_else(|p| p.into_inner());
        members.recent.push(u64::from(h) << 32 | u64::from(id));
    }

    /// Gives the user in slot `id` `update`'s `state`, by reducer `by`: in place
    /// when it fits the block's room, else in a new block (also when the room is far
    /// larger than the state: the big block is given back).
    pub fn set(&mut self, id: u32, update: &UpdateRef<'_>, state: &[u8], by: u32) {
        // Filed again only when it joins another organization or comes back into
        // view: most updates leave it where it is.
        let refile = member_name(update, state).filter(|&n| self.member_name(id) != Some(n));
        let s = self.slots[id as usize];
        let (room, len) = (s.room as usize, state.len());
        if len > room || room > 2 * len + 64 {
            let key_len = s.key_len() as usize;
            let size = block_for(key_len, len, update.view.is_some());
            let (chunk, offset) = self.place_moved(&s, state, size);
            self.release(s.chunk, s.size());
            let slot = &mut self.slots[id as usize];
            (slot.chunk, slot.offset, slot.room) = (chunk, offset, (size - key_len) as u32);
        } else {
            let at = (s.offset + s.key_len()) as usize;
            self.chunks[s.chunk as usize].bytes[at..at + len].copy_from_slice(state);
        }
        let slot = &mut self.slots[id as usize];
        slot.len = len as u32;
        slot.by = by;
        slot.view = Span::of(update.view.as_ref());
        slot.join = Span::of(update.join.as_ref());
        slot.clock = update.clock.unwrap_or(i64::MIN);
        if let Some(name) = refile {
            self.file(name, id);
        }
    }

    /// Forgets the user in slot `id`: lookups no longer find it at once; its slot and
    /// block go at the next purge.
    pub fn remove(&mut self, id: u32) {
        let key = self.key(id);
        let hash = self.hash(key);
        if let Ok(found) = self.index.find_entry(hash, |&i| i == id) {
            found.remove();
        }
        self.slots[id as usize].key_len |= GONE;
        self.gone.push(id);
        self.epoch = Epoch::next();
        if self.index.is_empty() && !self.pinned {
            // The last user gone: give everything back.
            *self = Self {
                hasher: self.hasher.clone(),
                ..Self::default()
            };
        }
    }

    /// Writes `parts` one after the other into a new block of `size` bytes (the rest
    /// zeroed); returns where.
    fn place(&mut self, parts: &[&[u8]], size: usize) -> (u32, u32) {
        let bytes = self.tail_for(size);
        let offset = bytes.len();
        for part in parts {
            bytes.extend_from_slice(part);
        }
        bytes.resize(offset + size, 0);
        self.used += size;
        self.written += size;
        (self.tail as u32, offset as u32)
    }

    /// As [`Users::place`], for the id of the user in slot `from` (copied from its
    /// block, with no buffer between) and then `state`.
    fn place_moved(&mut self, from: &Slot, state: &[u8], size: usize) -> (u32, u32) {
        let tail = self.tail_for(size).len();
        let key = from.offset as usize..(from.offset + from.key_len()) as usize;
        let (src, dst) = (from.chunk as usize, self.tail);
        if src == dst {
            self.chunks[dst].bytes.extend_from_within(key);
        } else {
            let (low, high) = self.chunks.split_at_mut(src.max(dst));
            let (from, to) = if src < dst {
                (&low[src], &mut high[0])
            } else {
                (&high[0], &mut low[dst])
            };
            to.bytes.extend_from_slice(&from.bytes[key]);
        }
        let bytes = &mut self.chunks[dst].bytes;
        bytes.extend_from_slice(state);
        bytes.resize(tail + size, 0);
        self.used += size;
        self.written += size;
        (dst as u32, tail as u32)
    }

    /// The chunk new blocks go to, with room for `size` more bytes (a new one when
    /// the newest is full).
    fn tail_for(&mut self, size: usize) -> &mut Mapped {
        let fits = |c: &Chunk| c.bytes.capacity() - c.bytes.len() >= size;
        if self.chunks.get(self.tail).is_none_or(|c| !fits(c)) {
            let last = self.chunks.get(self.tail).map_or(0, |c| c.bytes.capacity());
            let capacity = (last * 2).clamp(CHUNK_MIN, CHUNK_MAX).max(size);
            let chunk = Chunk {
                bytes: Mapped::with_capacity(capacity),
                waste: 0,
            };
            self.tail = match self.spare.pop() {
                Some(i) => {
                    self.chunks[i as usize] = chunk;
                    i as usize
                }
                None => {
                    self.chunks.push(chunk);
                    self.chunks.len() - 1
                }
            };
        }
        &mut self.chunks[self.tail].bytes
    }

    /// A block of `size` bytes in `chunk` is no longer used; a chunk that holds only
    /// such blocks is freed.
    fn release(&mut self, chunk: u32, size: usize) {
        self.used -= size;
        let c = &mut self.chunks[chunk as usize];
        if c.waste + size == c.bytes.len() && chunk as usize != self.tail {
            self.waste -= c.waste;
            *c = Chunk::default();
            self.spare.push(chunk);
        } else {
            c.waste += size;
            self.waste += size;
        }
    }

    /// Whether the waste is past its share (and worth a chunk's move).
    fn over_waste(&self) -> bool {
        self.waste * WASTE_SHARE > self.used + self.waste && self.waste >= CHUNK_MAX / 4
    }

    /// When more than 1/[`WASTE_SHARE`] of the shard's bytes are waste: moves the live blocks
    /// of the most wasted chunks (as many as [`COMPACT_PER_CALL`] says) to the newest
    /// and frees them. The writer calls it after each batch it applies to the shard.
    pub fn compact(&mut self) {
        let chunks = COMPACT_PER_CALL * self.written.div_ceil(CHUNK_MAX / 2).max(1);
        self.compact_chunks(chunks);
        // Its own moves are not new waste to keep up with.
        self.written = 0;
    }

    /// Compacts up to `chunks` chunks while the waste is past its share.
    fn compact_chunks(&mut self, chunks: usize) {
        for _ in 0..chunks {
            if !self.over_waste() {
                return;
            }
            let Some(victim) = (0..self.chunks.len())
                .filter(|&i| i != self.tail)
                .max_by_key(|&i| self.chunks[i].waste)
            else {
                return;
            };
            if self.chunks[victim].waste == 0 {
                // All the waste is in the newest chunk: it goes once that one is full.
                return;
            }
            let old = std::mem::take(&mut self.chunks[victim]);
            self.waste -= old.waste;
            for id in 0..self.slots.len() {
                let s = self.slots[id];
                if s.chunk as usize != victim {
                    continue;
                }
                let size = s.size();
                let at = s.offset as usize;
                // `place` counts the block again.
                self.used -= size;
                let (chunk, offset) = self.place(&[&old.bytes[at..at + size]], size);
                (self.slots[id].chunk, self.slots[id].offset) = (chunk, offset);
            }
            // Only now: reused as the tail meanwhile, its new blocks would have been
            // taken for the old ones above.
            self.spare.push(victim as u32);
        }
    }

    /// The writer's upkeep after each batch it applies to the shard: purges the
    /// forgotten users once they are many, brings the order up to date once many
    /// users came, and compacts ([`Users::compact`]).
    pub fn tidy(&mut self) {
        if !self.pinned && self.gone.len() >= PURGE_MIN.max(self.index.len() / 32) {
            self.purge();
        }
        let mut order = lock(&self.order);
        if order.recent.len() >= SETTLE_MIN.max(order.sorted.len()) {
            self.settle(&mut order);
        }
        drop(order);
        let mut members = lock(&self.members);
        if members.recent.len() >= SETTLE_MIN.max(members.sorted.len()) {
            self.settle_members(&mut members);
        }
        drop(members);
        self.compact();
    }

    /// Frees the slots and blocks of the forgotten users.
    fn purge(&mut self) {
        let slots = &self.slots;
        let order = self.order.get_mut().unwrap_or_else(|p| p.into_inner());
        order.sorted.retain(|&id| !slots[id as usize].gone());
        order.recent.retain(|&id| !slots[id as usize].gone());
        for id in std::mem::take(&mut self.gone) {
            let s = self.slots[id as usize];
            self.release(s.chunk, s.size());
            let slot = &mut self.slots[id as usize];
            (slot.chunk, slot.key_len) = (NONE, 0);
            self.free.push(id);
        }
    }

    fn order_mut(&mut self) -> &mut Order {
        self.order.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the order and the index by organization up to date now (a listing
    /// would otherwise do it).
    pub fn settle_now(&self) {
        self.settle(&mut lock(&self.order));
        self.settle_members(&mut lock(&self.members));
    }

    /// Merges `order`'s recent slots into its sorted ones: they are sorted, then each
    /// is put where a binary search says (O(r log n) comparisons, one pass of copies).
    fn settle(&self, order: &mut Order) {
        if order.recent.is_empty() {
            return;
        }
        let key = |id: u32| Self::key_bytes(&self.slots, &self.chunks, id);
        let mut recent = std::mem::take(&mut order.recent);
        recent.sort_unstable_by(|a, b| key(*a).cmp(key(*b)));
        let old = std::mem::take(&mut order.sorted);
        let mut merged = Vec::with_capacity(old.len() + recent.len());
        let mut from = 0;
        for id in recent {
            let at = from + old[from..].partition_point(|&o| key(o) < key(id));
            merged.extend_from_slice(&old[from..at]);
            merged.push(id);
            from = at;
        }
        merged.extend_from_slice(&old[from..]);
        order.sorted = merged;
    }

    /// Merges `members`' recent entries into its sorted ones and drops every entry
    /// that no longer names a visible member under that hash, and repeats: O(n log n)
    /// once the recent are as many as the sorted, so O(log n) an entry.
    fn settle_members(&self, members: &mut Members) {
        if members.recent.is_empty() {
            return;
        }
        let mut all = std::mem::take(&mut members.sorted);
        all.append(&mut members.recent);
        members.recent = Vec::new();
        all.sort_unstable();
        all.dedup();
        all.retain(|&e| self.member_of(e as u32) == Some((e >> 32) as u32));
        all.shrink_to_fit();
        members.sorted = all;
    }

    /// The ids after `after` (all, without it), in no order, of the visible users
    /// that join organization `name`: a binary search for its entries in
    /// [`Members`], each checked against its slot, so a listing of one organization
    /// costs its members here, not every user.
    pub fn members(&self, name: &str, after: Option<&str>) -> Vec<&str> {
        let mut members = lock(&self.members);
        self.settle_members(&mut members);
        let h = u64::from(self.name_hash(name.as_bytes()));
        let from = members.sorted.partition_point(|&e| e >> 32 < h);
        // Settled: each slot once (a slot reused by another member of the same
        // organization is filed twice until then).
        members.sorted[from..]
            .iter()
            .take_while(|&&e| e >> 32 == h)
            .map(|&e| e as u32)
            .filter(|&id| self.member_name(id) == Some(name.as_bytes()))
            .map(|id| self.key(id))
            .filter(|k| after.is_none_or(|a| *k > a))
            .collect()
    }

    /// Up to `limit` ids after `after` (all, without it), in order, of the users
    /// `keep` says: a binary search, then the users from there on (those `keep`
    /// refuses are read too, so a filter that refuses most costs more than a page).
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&str, &EntryRef<'_>) -> bool,
    ) -> Vec<&str> {
        let mut order = lock(&self.order);
        self.settle(&mut order);
        let key = |id: u32| Self::key_bytes(&self.slots, &self.chunks, id);
        let start = after.map_or(0, |a| {
            order.sorted.partition_point(|&id| key(id) <= a.as_bytes())
        });
        let mut out = Vec::new();
        for &id in &order.sorted[start..] {
            if out.len() >= limit {
                break;
            }
            if self.slots[id as usize].gone() {
                continue;
            }
            let k = self.key(id);
            if keep(k, &self.entry(id)) {
                out.push(k);
            }
        }
        out
    }

    /// Bytes of the chunks allocated.
    fn chunk_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.bytes.capacity()).sum()
    }

    /// Bytes this shard's users take: chunks, slots and the index.
    pub fn held(&self) -> usize {
        self.chunk_bytes()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + (self.free.capacity() + self.gone.capacity()) * 4
            + self.index.capacity() * 5
            + {
                let order = lock(&self.order);
                (order.sorted.capacity() + order.recent.capacity()) * 4
            }
            + {
                let members = lock(&self.members);
                (members.sorted.capacity() + members.recent.capacity()) * 8
            }
    }

    /// Bytes of chunks allocated, and of blocks in them (used or waste).
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize) {
        (self.chunk_bytes(), self.used + self.waste)
    }
}

/// The organization name a user with `update`'s `state` joins while visible.
fn member_name<'s>(update: &UpdateRef<'_>, state: &'s [u8]) -> Option<&'s [u8]> {
    update.view.as_ref()?;
    bytes_in(state, update.join.as_ref()?)
}

/// The bytes of `state` in `range` (`None` when it lies outside).
fn bytes_in<'s>(state: &'s [u8], range: &Range<u32>) -> Option<&'s [u8]> {
    state.get(range.start as usize..range.end as usize)
}

fn lock<T>(index: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while an index is merged leaves it as it was or merged: either is in
    // order.
    index.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'a> EntryRef<'a> {
    /// The state the reducer gets back.
    pub fn state(&self) -> &'a [u8] {
        &self.room[..self.len]
    }

    /// Whether it is visible, and its bytes (id and room), as [`super::Sizes`]
    /// counts them.
    pub fn weight(&self, key: &str) -> (bool, usize) {
        (self.view.is_some(), key.len() + self.room.len())
    }

    /// When it is a tombstone (kept, not visible) that can expire: its clock.
    pub fn tombstone(&self) -> Option<i64> {
        self.view.is_none().then_some(self.clock).flatten()
    }

    /// The renderer whose visible answer this is, if it is visible.
    pub fn answer_by(&self) -> Option<u32> {
        self.view.as_ref().map(|_| self.by)
    }

    fn text(&self, range: Option<&Range<u32>>) -> Option<&'a str> {
        // The runtime checked that the range is inside the state and UTF-8.
        logq_abi::text_in(self.state(), range?).ok()
    }

    /// The JSON answer, while visible.
    pub fn view(&self) -> Option<&'a str> {
        self.text(self.view.as_ref())
    }

    /// The join key.
    pub fn join(&self) -> Option<&'a str> {
        self.text(self.join.as_ref())
    }

    /// The join key's bytes, not checked for UTF-8 again.
    fn join_bytes(&self) -> Option<&'a [u8]> {
        bytes_in(self.state(), self.join.as_ref()?)
    }

    /// The update that would store it again (what a snapshot keeps).
    pub fn update(&self) -> logq_abi::Update {
        logq_abi::Update {
            state: Some(self.state().to_vec()),
            view: self.view.clone(),
            join: self.join.clone(),
            clock: self.clock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn update(state: &[u8], clock: Option<i64>) -> logq_abi::Update {
        logq_abi::Update {
            state: Some(state.to_vec()),
            view: Some(0..state.len() as u32),
            join: None,
            clock,
        }
    }

    fn put(users: &mut Users, key: &str, state: &[u8]) {
        let u = update(state, Some(state.len() as i64));
        let r = u.as_ref();
        match users.find(key) {
            Some(id) => users.set(id, &r, state, 7),
            None => {
                users.insert(key, &r, state, 7);
            }
        }
    }

    /// While pinned, the slots handed out go on naming their users, forgotten or
    /// not, through upkeep that would otherwise purge them or reset the emptied
    /// shard; unpinned, the next upkeep frees them.
    #[test]
    fn pinned_slots_keep_naming_their_users_until_unpinned() {
        let mut users = Users::default();
        for i in 0..2000 {
            put(
                &mut users,
                &format!("u{i:04}"),
                format!("state {i}").as_bytes(),
            );
        }
        let mut slots = users.slot_ids();
        slots.sort_unstable();
        assert_eq!(slots.len(), 2000);
        let before: Vec<(String, Vec<u8>)> = slots
            .iter()
            .map(|&s| (users.key(s).to_owned(), users.entry(s).state().to_vec()))
            .collect();
        users.pin(true);
        // Every user forgotten, many new ones: upkeep after each step.
        for &s in &slots {
            users.remove(s);
            users.tidy();
        }
        for i in 0..3000 {
            put(
                &mut users,
                &format!("new{i:04}"),
                b"a much longer state than before",
            );
            users.tidy();
        }
        let after: Vec<(String, Vec<u8>)> = slots
            .iter()
            .map(|&s| (users.key(s).to_owned(), users.entry(s).state().to_vec()))
            .collect();
        assert_eq!(after, before, "the pinned slots name the same users");
        assert!(
            users
                .slot_ids()
                .iter()
                .all(|s| slots.binary_search(s).is_err()),
            "no pinned slot was reused"
        );
        users.pin(false);
        users.tidy();
        assert!(users.gone.is_empty(), "unpinned, the forgotten are purged");
        assert_eq!(users.free.len(), 2000);
    }

    /// Users keep their ids and states through growth, moves, removals and
    /// compaction (checked against a plain map after every step), and the bytes
    /// held come back down once most states are gone.
    #[test]
    fn states_stay_right_through_moves_removals_and_compaction() {
        let mut users = Users::default();
        let mut model: HashMap<String, Vec<u8>> = HashMap::new();
        let mut next = crate::state::xorshift(0x9e37_79b9_7f4a_7c15);
        let check = |users: &Users, model: &HashMap<String, Vec<u8>>| {
            assert_eq!(users.len(), model.len());
            for (k, v) in model {
                let e = users.get(k).unwrap_or_else(|| panic!("{k} missing"));
                assert_eq!(e.state(), &v[..], "{k}");
                assert_eq!(e.clock, Some(v.len() as i64));
                assert_eq!(e.by, 7);
            }
            let mut seen: Vec<&str> = users.keys().collect();
            seen.sort_unstable();
            let mut want: Vec<&str> = model.keys().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(seen, want);
        };
        for round in 0..150_000 {
            let key = format!("user-{:05}", next() % 20_000);
            let n = (next() % 700) as usize;
            if next().is_multiple_of(5) {
                if let Some(id) = users.find(&key) {
                    users.remove(id);
                }
                model.remove(&key);
            } else {
                let state: Vec<u8> = (0..n).map(|i| (i as u8) ^ (round as u8)).collect();
                put(&mut users, &key, &state);
                model.insert(key, state);
            }
            if round % 97 == 0 {
                users.tidy();
            }
            if round % 25_000 == 0 {
                check(&users, &model);
            }
        }
        check(&users, &model);
        // Compaction keeps the waste under its share.
        for _ in 0..100 {
            users.tidy();
        }
        check(&users, &model);
        assert!(
            !users.over_waste(),
            "waste {} of {}",
            users.waste,
            users.used
        );
        // Most gone: the chunks follow.
        let before = users.footprint().0;
        let keys: Vec<String> = model.keys().skip(100).cloned().collect();
        for k in keys {
            users.remove(users.find(&k).unwrap());
            model.remove(&k);
            users.tidy();
        }
        for _ in 0..100 {
            users.tidy();
        }
        check(&users, &model);
        let after = users.footprint().0;
        assert!(after * 4 < before, "{before} -> {after} bytes of chunks");
        // All gone: nothing held.
        let keys: Vec<String> = model.keys().cloned().collect();
        for k in keys {
            users.remove(users.find(&k).unwrap());
        }
        assert_eq!(users.footprint(), (0, 0));
        assert_eq!(users.slots.len(), 0);
    }

    /// However many blocks a batch rewrites between two tidies, the tidy after it
    /// brings the waste back under its share (a fixed number of chunks a call fell
    /// behind once batches grew).
    #[test]
    fn compaction_keeps_up_with_the_waste_of_a_batch_of_any_size() {
        let mut next = crate::state::xorshift(0x2545_f491_4f6c_dd1d);
        for batch in [500, 20_000] {
            let mut users = Users::default();
            let key = |i: u64| format!("user-{i:05}");
            for i in 0..20_000 {
                put(&mut users, &key(i), &[1; 200]);
            }
            users.tidy();
            for round in 1..=6u8 {
                // A random half of the users outgrow their blocks: the chunks they
                // leave are left half waste, none wholly.
                for _ in 0..batch {
                    let i = next() % 20_000;
                    let size = 200 + 40 * usize::from(round);
                    put(&mut users, &key(i), &vec![round; size]);
                }
                users.tidy();
                assert!(
                    !users.over_waste(),
                    "batches of {batch}, round {round}: waste {} of {}",
                    users.waste,
                    users.used
                );
            }
        }
    }

    /// A listing of one organization from its index gives what a pass over every
    /// user finds (checked against a model through inserts, updates, moves between
    /// organizations, hides, removals and the writer's upkeep), and a settle leaves
    /// no entry behind.
    #[test]
    fn an_organization_lists_the_members_a_pass_over_every_user_finds() {
        use std::collections::BTreeMap;
        let mut users = Users::default();
        // id -> (organization, visible)
        let mut model: BTreeMap<String, (Option<String>, bool)> = BTreeMap::new();
        let mut next = crate::state::xorshift(0x9e37_79b9_7f4a_7c15);
        let orgs = ["Acme", "Globex", "Initech", "Umbrella", ""];
        for round in 0..40_000u32 {
            let key = format!("u{:04}", next() % 3000);
            match next() % 10 {
                0..=1 => {
                    if let Some(id) = users.find(&key) {
                        users.remove(id);
                    }
                    model.remove(&key);
                }
                n => {
                    let shown = n != 2;
                    let org = (!next().is_multiple_of(6)).then(|| orgs[(next() % 5) as usize]);
                    // The state: the organization's name, then the answer.
                    let name = org.unwrap_or("");
                    let state = format!("{name}{{\"id\":\"{key}\"}}");
                    let u = logq_abi::Update {
                        state: Some(state.clone().into_bytes()),
                        view: shown.then_some(name.len() as u32..state.len() as u32),
                        join: org.map(|o| 0..o.len() as u32),
                        clock: None,
                    };
                    let r = u.as_ref();
                    match users.find(&key) {
                        Some(id) => users.set(id, &r, state.as_bytes(), 1),
                        None => {
                            users.insert(&key, &r, state.as_bytes(), 1);
                        }
                    }
                    model.insert(key, (org.map(str::to_owned), shown));
                }
            }
            if next().is_multiple_of(5) {
                users.tidy();
            }
            if round % 500 == 0 {
                for org in orgs {
                    let cursor = format!("u{:04}", next() % 3100);
                    let after = (!next().is_multiple_of(3)).then_some(cursor.as_str());
                    let want: Vec<&str> = model
                        .iter()
                        .filter(|(k, (o, shown))| {
                            *shown
                                && o.as_deref() == Some(org)
                                && after.is_none_or(|a| k.as_str() > a)
                        })
                        .map(|(k, _)| k.as_str())
                        .collect();
                    let mut got = users.members(org, after);
                    got.sort_unstable();
                    assert_eq!(got, want, "round {round}, {org:?} after {after:?}");
                }
            }
        }
        // Entries left behind go at a settle: no more than the members and the
        // entries added since.
        users.settle_members(&mut lock(&users.members));
        let members = model
            .values()
            .filter(|(o, shown)| *shown && o.is_some())
            .count();
        assert_eq!(lock(&users.members).sorted.len(), members);
    }

    /// Pages in id order after any cursor, whatever came and went before (checked
    /// against a `BTreeMap` after every kind of step: inserts, removals, the writer's
    /// upkeep or none of it), and forgotten users' slots are reused once purged.
    #[test]
    fn pages_follow_the_id_order_through_inserts_removals_and_purges() {
        use std::collections::BTreeMap;
        let mut users = Users::default();
        let mut model: BTreeMap<String, bool> = BTreeMap::new();
        let mut next = crate::state::xorshift(0x2545_f491_4f6c_dd1d);
        let visible = |_: &str, e: &EntryRef<'_>| e.view.is_some();
        for round in 0..30_000u32 {
            let key = format!("u{:04}", next() % 5000);
            match next() % 10 {
                0..=2 => {
                    if let Some(id) = users.find(&key) {
                        users.remove(id);
                    }
                    model.remove(&key);
                }
                n => {
                    let shown = n != 3;
                    let mut u = update(key.as_bytes(), None);
                    if !shown {
                        u.view = None;
                    }
                    let r = u.as_ref();
                    match users.find(&key) {
                        Some(id) => users.set(id, &r, key.as_bytes(), 1),
                        None => {
                            users.insert(&key, &r, key.as_bytes(), 1);
                        }
                    }
                    model.insert(key, shown);
                }
            }
            if next().is_multiple_of(7) {
                users.tidy();
            }
            if round % 1500 == 0 {
                for _ in 0..5 {
                    let cursor = format!("u{:04}", next() % 5100);
                    let limit = (next() % 300) as usize + 1;
                    let after = (!next().is_multiple_of(4)).then_some(cursor.as_str());
                    let want: Vec<&str> = model
                        .iter()
                        .filter(|(k, shown)| **shown && after.is_none_or(|a| k.as_str() > a))
                        .map(|(k, _)| k.as_str())
                        .take(limit)
                        .collect();
                    assert_eq!(users.page(after, limit, visible), want, "after {after:?}");
                }
            }
        }
        // Purged slots are reused: the slots stay about as many as the users.
        for _ in 0..3 {
            users.tidy();
        }
        assert!(
            users.slots.len() <= model.len() + PURGE_MIN.max(model.len() / 32) + 1000,
            "{} slots for {} users",
            users.slots.len(),
            model.len()
        );
    }

    #[test]
    fn a_state_that_fits_is_written_in_place_one_that_does_not_moves() {
        let mut users = Users::default();
        put(&mut users, "u", &[1; 100]);
        let at = |users: &Users| {
            let s = users.slots[users.find("u").unwrap() as usize];
            (s.chunk, s.offset)
        };
        let first = at(&users);
        let room = |users: &Users, key: &str| users.get(key).unwrap().room.len();
        assert_eq!(room(&users, "u"), 100, "a first block has no room");
        put(&mut users, "u", &[2; 90]);
        assert_eq!(at(&users), first, "fits");
        put(&mut users, "u", &[2; 110]);
        let second = at(&users);
        assert_ne!(second, first, "outgrew it");
        assert_eq!(users.get("u").unwrap().state(), &[2; 110][..]);
        assert_eq!(room(&users, "u"), 110 + SLACK, "then it has room");
        put(&mut users, "u", &[3; 110 + SLACK]);
        assert_eq!(at(&users), second, "fits the room");
        put(&mut users, "u", &[3; 200]);
        assert_ne!(at(&users), second, "outgrew it");
        assert_eq!(users.get("u").unwrap().state(), &[3; 200][..]);
        assert_eq!(users.waste, 1 + 100 + 1 + 110 + SLACK);
        // A user not visible (a tombstone, mostly) gets no room to grow, moved or not.
        let hidden = update(&[4; 50], None);
        let mut hidden = hidden.as_ref();
        hidden.view = None;
        let id = users.insert("gone", &hidden, &[4; 50], 7);
        assert_eq!(room(&users, "gone"), 50);
        users.set(id, &hidden, &[5; 60], 7);
        assert_eq!(room(&users, "gone"), 60);
        // So little waste is left where it is: nothing moves.
        let moved = at(&users);
        users.compact();
        assert_eq!(at(&users), moved, "compacted under the waste's share");
    }
}
