//! The primitives every codec of this crate is built from: little-endian `u32`s,
//! frames (a `u32` length, then the bytes), a bounds-checked reader, and the check
//! that a range of a state holds text.

use std::ops::Range;

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

    /// The next `n` bytes.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
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

    /// The next `N` bytes as an array.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let head = self.take(N)?;
        head.try_into()
            .map_err(|_| format!("framing: {N} bytes wanted"))
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
        Ok(u32::from_le_bytes(self.array()?))
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
