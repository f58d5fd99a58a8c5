//! The byte framing of the WIT `fold` interface (`wit/reducer.wit`): records in,
//! entities out, prior states in, updates out. Shared by this reducer's guest glue and
//! the host, so both sides read and write one definition.

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

    /// A frame's bytes.
    ///
    /// # Errors
    /// When the frame runs past the end.
    pub fn frame(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}
