//! The fuzzers' reader of their input bytes: little-endian fields that run out
//! (`None`) when the input does, never panicking.

/// Bytes still to be consumed.
pub(crate) struct FuzzInput<'a>(pub(crate) &'a [u8]);

impl<'a> FuzzInput<'a> {
    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_run_out_with_the_input() {
        let mut i = FuzzInput(&[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(i.u8(), Some(1));
        assert_eq!(i.u16(), Some(0x0302));
        assert_eq!(i.take(2), &[4, 5]);
        assert_eq!(i.u32(), None);
        assert_eq!(i.take(9), &[] as &[u8]);
    }
}
