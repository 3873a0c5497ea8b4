//! Checked access to guest memory for hypercall handlers.
//!
//! A guest-physical address in a hypercall argument is hostile: it may point past RAM,
//! wrap around the address space, or be paired with a length that overflows. Every
//! access here checks `gpa + len` for overflow and that the whole range is guest RAM
//! *before* moving a byte, and answers [`GuestMemError`] (which handlers turn into
//! `H_PARAMETER` or the call's own error) instead of panicking. Bytes are copied with
//! `vm-memory` (volatile, no Rust reference over guest memory). PAPR in-memory
//! structures (RTAS buffers, TCE lists) are big-endian, hence the `_be` helpers.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// An access outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest asked for {len} bytes at guest-physical {gpa:#x}, which is not (entirely) guest RAM; the hypercall fails with H_PARAMETER")]
pub struct GuestMemError {
    /// The guest-physical address.
    pub gpa: u64,
    /// The length.
    pub len: u64,
}

/// Guest RAM as a hypercall handler sees it.
#[derive(Clone, Copy)]
pub struct GuestMem<'a> {
    mem: &'a GuestMemoryMmap,
}

impl<'a> GuestMem<'a> {
    /// A view of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        GuestMem { mem }
    }

    /// Whether `len` bytes at `gpa` are all guest RAM (overflow-checked).
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), GuestMemError> {
        let err = GuestMemError { gpa, len };
        if len == 0 {
            return Ok(());
        }
        let last = gpa.checked_add(len - 1).ok_or(err)?;
        // RAM is one region from 0 in this VMM; walk region by region all the same, so
        // a hole between regions is found.
        let mut at = gpa;
        loop {
            let region_end = self
                .mem
                .find_region(GuestAddress(at))
                .map(|r| r.last_addr().0)
                .ok_or(err)?;
            if region_end >= last {
                return Ok(());
            }
            at = region_end + 1;
        }
    }

    /// Read `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        self.check(gpa, buf.len() as u64)?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestMemError {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Write `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        self.check(gpa, data.len() as u64)?;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| GuestMemError {
                gpa,
                len: data.len() as u64,
            })
    }

    /// A big-endian u32 at `gpa`.
    pub fn read_be_u32(&self, gpa: u64) -> Result<u32, GuestMemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Store a big-endian u32 at `gpa`.
    pub fn write_be_u32(&self, gpa: u64, v: u32) -> Result<(), GuestMemError> {
        self.write(gpa, &v.to_be_bytes())
    }

    /// A big-endian u64 at `gpa`.
    pub fn read_be_u64(&self, gpa: u64) -> Result<u64, GuestMemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Store a big-endian u64 at `gpa`.
    pub fn write_be_u64(&self, gpa: u64, v: u64) -> Result<(), GuestMemError> {
        self.write(gpa, &v.to_be_bytes())
    }

    /// `count` big-endian u64 values at `gpa` (a TCE list), checked as a whole first:
    /// `count * 8` overflowing or running past RAM is an error, not a partial read.
    pub fn read_be_u64s(&self, gpa: u64, count: u64) -> Result<Vec<u64>, GuestMemError> {
        let len = count
            .checked_mul(8)
            .ok_or(GuestMemError { gpa, len: u64::MAX })?;
        self.check(gpa, len)?;
        let mut bytes = vec![0u8; len as usize];
        self.read(gpa, &mut bytes)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small guest RAM for handler tests.
    pub(crate) fn ram(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn hostile_addresses_are_refused_without_panic() {
        let m = ram(0x10000);
        let g = GuestMem::new(&m);
        g.write_be_u32(0x100, 0xdead_beef).unwrap();
        assert_eq!(g.read_be_u32(0x100).unwrap(), 0xdead_beef);
        let mut b = [0u8; 4];
        g.read(0x100, &mut b).unwrap();
        assert_eq!(b, [0xde, 0xad, 0xbe, 0xef], "big-endian in memory");
        // Last bytes of RAM are fine, one past is not.
        g.write_be_u64(0x10000 - 8, 7).unwrap();
        assert_eq!(
            g.read_be_u64(0x10000 - 7),
            Err(GuestMemError {
                gpa: 0x10000 - 7,
                len: 8
            })
        );
        assert!(g.read_be_u32(0x10000).is_err());
        // Wrapping around the address space.
        assert!(g.read_be_u64(u64::MAX - 3).is_err());
        assert!(g.write(u64::MAX, &[1]).is_err());
        assert!(g.check(1, u64::MAX).is_err());
        // Zero length anywhere is fine (nothing moves).
        assert!(g.check(u64::MAX, 0).is_ok());
        // A TCE list: count * 8 overflows, or runs past RAM.
        assert!(g.read_be_u64s(0, u64::MAX / 4).is_err());
        assert!(g.read_be_u64s(0x10000 - 8, 2).is_err());
        g.write_be_u64(0x200, 1).unwrap();
        g.write_be_u64(0x208, 2).unwrap();
        assert_eq!(g.read_be_u64s(0x200, 2).unwrap(), vec![1, 2]);
    }

    #[test]
    fn ranges_spanning_regions_are_checked_per_region() {
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        let g = GuestMem::new(&m);
        assert!(g.check(0x800, 0x1000).is_ok(), "two adjacent regions");
        assert!(g.check(0x1800, 0x1000).is_err(), "runs into the hole");
        assert!(g.check(0x2000, 1).is_err(), "in the hole");
        assert!(g.check(0x4000, 0x1000).is_ok());
    }
}
