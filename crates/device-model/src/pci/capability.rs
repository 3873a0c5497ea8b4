//! Capability lists.
//!
//! Standard capabilities live in 0x40..0x100, dword aligned, linked from the pointer at
//! 0x34 through each capability's "next" byte; status bit 4 announces the list.
//! Extended (PCIe) capabilities live in 0x100..0x1000 of a 4 KiB space, each headed by a
//! dword `id | version << 16 | next << 20`, the first one at 0x100.
//!
//! The adders allocate space in order and link the new capability at the end of the
//! list; the body starts zeroed and read-only, and the caller sets contents and write
//! masks with the [`PciConfig`] device-side setters. The walkers follow the pointers the
//! space holds, with a bound on the number of hops, so a corrupt list cannot loop.

use super::config::PciConfig;
use super::{reg, status, PciError, CONFIG_SIZE};

/// A capability found by a list walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityRef {
    /// Capability ID (8-bit for standard, 16-bit for extended capabilities).
    pub id: u16,
    /// Offset of its header.
    pub offset: usize,
}

impl PciConfig {
    /// Append a standard capability of `len` bytes (header included, >= 2) with ID `id`.
    /// Returns the offset of its header.
    pub fn add_capability(&mut self, id: u8, len: usize) -> Result<usize, PciError> {
        let err = |reason: String| PciError::Capability {
            id: id.into(),
            reason,
        };
        if len < 2 {
            return Err(err(format!(
                "length {len} is shorter than the 2-byte header"
            )));
        }
        let start = self.next_cap.next_multiple_of(4);
        let end = start
            .checked_add(len)
            .filter(|&e| e <= CONFIG_SIZE)
            .ok_or_else(|| {
                err(format!(
                    "{len} bytes do not fit: the standard capability area ends at 0x100 and 0x{start:x} is the next free offset"
                ))
            })?;
        self.set_u8(start, id);
        self.set_u8(start + 1, 0);
        if self.last_cap == 0 {
            self.set_u8(reg::CAPABILITY_LIST, start as u8);
        } else {
            self.set_u8(self.last_cap + 1, start as u8);
        }
        self.last_cap = start;
        self.next_cap = end;
        self.set_status_bits(status::CAP_LIST, true);
        Ok(start)
    }

    /// Append a PCIe extended capability of `len` bytes (4-byte header included) with ID
    /// `id` and version `version` (0..=15). Only in a 4 KiB space.
    pub fn add_ext_capability(
        &mut self,
        id: u16,
        version: u8,
        len: usize,
    ) -> Result<usize, PciError> {
        let err = |reason: String| PciError::Capability { id, reason };
        if !self.is_extended() {
            return Err(err(
                "extended capabilities need the 4 KiB space (PciConfig::new_extended)".into(),
            ));
        }
        if len < 4 || version > 15 {
            return Err(err(format!(
                "length {len} must include the 4-byte header and version {version} fit in 4 bits"
            )));
        }
        let start = self.next_ext_cap.next_multiple_of(4);
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| err(format!("{len} bytes do not fit after 0x{start:x}")))?;
        self.set_u32(start, u32::from(id) | u32::from(version) << 16);
        if self.last_ext_cap != 0 {
            let h = self.read_u32(self.last_ext_cap);
            self.set_u32(self.last_ext_cap, (h & 0x000f_ffff) | (start as u32) << 20);
        }
        self.last_ext_cap = start;
        self.next_ext_cap = end;
        Ok(start)
    }

    /// Walk the standard capability list.
    pub fn capabilities(&self) -> Vec<CapabilityRef> {
        let mut out = Vec::new();
        if self.status() & status::CAP_LIST == 0 {
            return out;
        }
        let mut ptr = usize::from(self.read_u8(reg::CAPABILITY_LIST) & 0xfc);
        // At most (256 - 64) / 4 capabilities fit; more hops means a loop.
        while ptr >= 0x40 && out.len() < 48 {
            out.push(CapabilityRef {
                id: self.read_u8(ptr).into(),
                offset: ptr,
            });
            ptr = usize::from(self.read_u8(ptr + 1) & 0xfc);
        }
        out
    }

    /// Walk the extended capability list (empty for a 256-byte space).
    pub fn ext_capabilities(&self) -> Vec<CapabilityRef> {
        let mut out = Vec::new();
        if !self.is_extended() {
            return out;
        }
        let mut ptr = 0x100usize;
        while ptr >= 0x100 && out.len() < (self.size() - 0x100) / 4 {
            let h = self.read_u32(ptr);
            if h == 0 {
                break;
            }
            out.push(CapabilityRef {
                id: h as u16,
                offset: ptr,
            });
            ptr = (h >> 20) as usize & 0xffc;
        }
        out
    }

    /// Offset of the first standard capability with ID `id`.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        self.capabilities()
            .into_iter()
            .find(|c| c.id == u16::from(id))
            .map(|c| c.offset)
    }

    /// Offset of the first extended capability with ID `id`.
    pub fn find_ext_capability(&self, id: u16) -> Option<usize> {
        self.ext_capabilities()
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::cap_id;

    #[test]
    fn chain_walk() {
        let mut c = PciConfig::new();
        assert!(c.capabilities().is_empty());
        assert_eq!(c.status() & status::CAP_LIST, 0);
        let a = c.add_capability(cap_id::VENDOR, 6).unwrap();
        let b = c.add_capability(cap_id::PM, 8).unwrap();
        let m = c.add_msi(4, true).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48, "dword aligned after a 6-byte capability");
        assert_ne!(c.status() & status::CAP_LIST, 0);
        assert_eq!(c.read_u8(0x34), 0x40);
        assert_eq!(c.read_u8(0x41), 0x48);
        assert_eq!(c.read_u8(0x49) as usize, m.offset());
        let ids: Vec<u16> = c.capabilities().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![9, 1, 5]);
        assert_eq!(c.find_capability(cap_id::MSI), Some(m.offset()));
        assert_eq!(c.find_capability(cap_id::MSIX), None);
        // The driver cannot rewrite the chain.
        c.write(0x41, &[0x40]).unwrap();
        c.write(0x34, &[0x00]).unwrap();
        assert_eq!(c.capabilities().len(), 3);
        assert!(c.add_capability(1, 1).is_err());
        assert!(c.add_capability(1, 200).is_err());
        assert!(c.add_capability(1, usize::MAX).is_err());
    }

    #[test]
    fn corrupt_chain_terminates() {
        let mut c = PciConfig::new();
        let a = c.add_capability(9, 4).unwrap();
        c.set_u8(a + 1, a as u8); // points to itself
        assert_eq!(c.capabilities().len(), 48);
        c.set_u8(a + 1, 0x03); // below 0x40 after masking
        assert_eq!(c.capabilities().len(), 1);
    }

    #[test]
    fn extended_chain() {
        let mut c = PciConfig::new();
        assert!(c.add_ext_capability(1, 1, 8).is_err());
        let mut c = PciConfig::new_extended();
        let a = c.add_ext_capability(0x0001, 2, 0x30).unwrap();
        let b = c.add_ext_capability(0x000b, 1, 0x10).unwrap();
        assert_eq!(a, 0x100);
        assert_eq!(b, 0x130);
        assert_eq!(c.read_u32(0x100), 0x1300_0000 | 0x2_0001);
        let ids: Vec<u16> = c.ext_capabilities().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 0xb]);
        assert_eq!(c.find_ext_capability(0xb), Some(0x130));
        assert!(c.add_ext_capability(2, 16, 8).is_err());
        assert!(c.add_ext_capability(2, 1, 4096).is_err());
        // Self loop.
        c.set_u32(0x130, 0x1301_000b);
        assert!(c.ext_capabilities().len() <= (4096 - 256) / 4);
    }
}
