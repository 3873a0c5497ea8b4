//! PCI configuration access (mechanism #1 at 0xCF8/0xCFC) and bus-0 enumeration.

use crate::io::{inl, outl};

/// A PCI function address on bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

fn address(b: Bdf, off: u8) -> u32 {
    0x8000_0000 | ((b.dev as u32) << 11) | ((b.func as u32) << 8) | (off as u32 & 0xfc)
}

/// Read the dword at `off` (aligned down to 4).
pub fn read32(b: Bdf, off: u8) -> u32 {
    outl(0xcf8, address(b, off));
    inl(0xcfc)
}

/// Write the dword at `off` (aligned down to 4).
pub fn write32(b: Bdf, off: u8, v: u32) {
    outl(0xcf8, address(b, off));
    outl(0xcfc, v);
}

/// Find the first function on bus 0 with `vendor:device`.
pub fn find(vendor: u16, device: u16) -> Option<Bdf> {
    find_nth(vendor, device, 0)
}

/// Find the `n`th (from 0) function on bus 0 with `vendor:device`.
pub fn find_nth(vendor: u16, device: u16, mut n: usize) -> Option<Bdf> {
    let want = (device as u32) << 16 | vendor as u32;
    for dev in 0..32 {
        let b = Bdf { dev, func: 0 };
        if read32(b, 0) == want {
            if n == 0 {
                return Some(b);
            }
            n -= 1;
        }
    }
    None
}

/// The address programmed in memory BAR `n` (64-bit BARs read both halves).
pub fn bar_address(b: Bdf, n: u8) -> u64 {
    let off = 0x10 + 4 * n;
    let lo = read32(b, off);
    if lo & 1 == 1 {
        return (lo & !3) as u64;
    }
    let mut addr = (lo & !0xf) as u64;
    if (lo >> 1) & 3 == 2 {
        addr |= (read32(b, off + 4) as u64) << 32;
    }
    addr
}

/// Size of BAR `n` by the standard probe (write all-ones, read back, restore); memory
/// decoding is turned off meanwhile.
pub fn bar_size(b: Bdf, n: u8) -> u64 {
    let off = 0x10 + 4 * n;
    let cmd = read32(b, 4);
    write32(b, 4, cmd & !3);
    let orig = read32(b, off);
    write32(b, off, 0xffff_ffff);
    let probe = read32(b, off);
    write32(b, off, orig);
    write32(b, 4, cmd);
    let mask = if orig & 1 == 1 {
        probe & !3
    } else {
        probe & !0xf
    };
    if mask == 0 {
        0
    } else {
        (!mask).wrapping_add(1) as u64
    }
}

/// Turn on memory and I/O decoding and bus mastering.
pub fn enable(b: Bdf) {
    let cmd = read32(b, 4) & 0xffff;
    write32(b, 4, cmd | 0x7);
}

/// Offset of the first capability with `id`, if any.
pub fn find_capability(b: Bdf, id: u8) -> Option<u8> {
    if read32(b, 4) & (1 << 20) == 0 {
        return None;
    }
    let mut ptr = (read32(b, 0x34) & 0xfc) as u8;
    let mut hops = 0;
    while ptr != 0 && hops < 48 {
        let v = read32(b, ptr);
        if v as u8 == id {
            return Some(ptr);
        }
        ptr = ((v >> 8) as u8) & 0xfc;
        hops += 1;
    }
    None
}

/// Program and enable the MSI capability: single vector `vector` to the boot CPU.
pub fn enable_msi(b: Bdf, vector: u8) -> bool {
    enable_msi_at(b, 0xfee0_0000, vector)
}

/// [`enable_msi`] with the message address `addr` (behind an IOMMU: an IOVA the
/// IOMMU maps to the doorbell). False without MSI or when `addr` needs 64 bits and
/// the capability has 32.
pub fn enable_msi_at(b: Bdf, addr: u64, vector: u8) -> bool {
    let Some(cap) = find_capability(b, 0x05) else {
        return false;
    };
    let ctrl = read32(b, cap) >> 16;
    let is64 = ctrl & (1 << 7) != 0;
    if !is64 && addr >> 32 != 0 {
        return false;
    }
    write32(b, cap + 4, addr as u32);
    if is64 {
        write32(b, cap + 8, (addr >> 32) as u32);
        write32(b, cap + 12, vector as u32);
    } else {
        write32(b, cap + 8, vector as u32);
    }
    // MSI enable, one vector (multiple message enable = 0).
    let ctrl = (ctrl & !(0x7 << 4)) | 1;
    write32(b, cap, (read32(b, cap) & 0xffff) | (ctrl << 16));
    true
}
