//! The byte framing of the WIT `fold` interface (`wit/reducer.wit`): records in,
//! entities out, prior states in, updates out. Shared by this reducer's guest glue and
//! the host, so both sides read and write one definition.

use std::ops::Range;

/// Record stream byte: the user events topic.
pub const SOURCE_USERS: u8 = 0;
/// Record stream byte: the organization events topic.
pub const SOURCE_ORGANIZATIONS: u8 = 1;
/// Entity kind byte: a user.
pub const KIND_USER: u8 = 0;
/// Entity kind byte: an organization.
pub const KIND_ORGANIZATION: u8 = 1;
/// Update flag: a new state follows (else the host forgets the entity).
pub const KEEP: u8 = 1;
/// Update flag: the answer's range inside the state follows.
pub const VIEW: u8 = 2;
/// Update flag: the join key's range inside the state follows.
pub const JOIN: u8 = 4;

/// Appends a little-endian `u32`.
pub fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends a frame: the length, then the bytes.
pub fn put_frame(out: &mut Vec<u8>, bytes: &[u8]) {
    // Record values and states are bounded far below 4 GiB (the broker's record limit).
    put_u32(out, u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(bytes);
}

/// Appends one entity's prior state (or its absence), as `fold` expects it.
pub fn put_prior(out: &mut Vec<u8>, state: Option<&[u8]>) {
    match state {
        Some(state) => {
            out.push(1);
            put_frame(out, state);
        }
        None => out.push(0),
    }
}

/// The text `range` of `state` holds (an answer or a join key), checked: inside the
/// state and UTF-8.
///
/// # Errors
/// Says which of the two it is not.
pub fn text_in<'s>(state: &'s [u8], range: &Range<u32>) -> Result<&'s str, &'static str> {
    let bytes = state
        .get(range.start as usize..range.end as usize)
        .ok_or("range is outside the state")?;
    std::str::from_utf8(bytes).map_err(|_| "text is not UTF-8")
}

/// Reads framed bytes, every read bounds-checked.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `bytes` from the start.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "framing: {n} bytes wanted, {} left",
                self.bytes.len()
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// One byte.
    ///
    /// # Errors
    /// At the end of the input.
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    /// A little-endian `u32`.
    ///
    /// # Errors
    /// When fewer than 4 bytes are left.
    pub fn u32(&mut self) -> Result<u32, String> {
        let raw: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| "framing: short u32".to_string())?;
        Ok(u32::from_le_bytes(raw))
    }

    /// One entity's prior state, as [`put_prior`] wrote it.
    ///
    /// # Errors
    /// On a flag other than 0 or 1, or a frame that runs past the end.
    pub fn prior(&mut self) -> Result<Option<&'a [u8]>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.frame().map(Some),
            other => Err(format!("framing: bad prior flag {other}")),
        }
    }

    /// A frame's bytes.
    ///
    /// # Errors
    /// When the frame runs past the end.
    pub fn frame(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}
