//! x86-64 4-level page-table walker over a nested guest's own page tables.
//!
//! The tables live in guest memory, which the guest (and anything else sharing it) may
//! change at any moment, so every entry is read exactly once into a local `u64` and all
//! decisions are made on that copy. The walker never writes the tables (no accessed/dirty
//! bit updates): it is an inspection and copy path, not an MMU.
//!
//! Model (documented assumptions): 4-level paging (CR4.PAE=1, LA57=0), EFER.NXE=1 (bit 63
//! is execute-disable), CR0.WP=1 (supervisor writes honour R/W), MAXPHYADDR=52, no
//! protection keys and no SMAP/SMEP (a supervisor access to a user page is allowed), and
//! 1 GiB pages supported (CPUID pdpe1gb).
//! Pages of 4 KiB (PTE), 2 MiB (PDE.PS) and 1 GiB (PDPTE.PS).
//!
//! Like the hardware, the walk first follows the entries down to the leaf (not-present and
//! reserved-bit faults stop it at the level where they occur), and only then checks the
//! combined permissions (writable and user need the bit at every level, any XD bit forbids
//! fetches), reporting the highest level that withheld the permission.

use std::fmt;

use crate::memory::{GuestPhysMemory, MemError};

/// Entry bit: present.
pub const PTE_P: u64 = 1 << 0;
/// Entry bit: writable.
pub const PTE_RW: u64 = 1 << 1;
/// Entry bit: user-accessible.
pub const PTE_US: u64 = 1 << 2;
/// Entry bit: page size (PDPTE: 1 GiB page, PDE: 2 MiB page; reserved in a PML4E).
pub const PTE_PS: u64 = 1 << 7;
/// Entry bit: execute-disable.
pub const PTE_XD: u64 = 1 << 63;
/// Physical address bits 51:12 of an entry.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Bits that must be zero in a 1 GiB PDPTE (address bits 29:13 below the page base).
const RSVD_1G: u64 = 0x3fff_e000;
/// Bits that must be zero in a 2 MiB PDE (address bits 20:13).
const RSVD_2M: u64 = 0x001f_e000;

/// What the access will do with the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write (needs R/W at every level).
    Write,
    /// Instruction fetch (refused when any level has XD).
    Fetch,
}

/// Kind of access and privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessMode {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// A user-mode (CPL 3) access: needs U/S at every level.
    pub user: bool,
}

impl AccessMode {
    /// Supervisor read.
    pub const READ: AccessMode = AccessMode {
        kind: AccessKind::Read,
        user: false,
    };
    /// Supervisor write.
    pub const WRITE: AccessMode = AccessMode {
        kind: AccessKind::Write,
        user: false,
    };
    /// Supervisor fetch.
    pub const FETCH: AccessMode = AccessMode {
        kind: AccessKind::Fetch,
        user: false,
    };
    /// The same access from user mode.
    pub fn as_user(self) -> AccessMode {
        AccessMode { user: true, ..self }
    }
}

/// A CR3 value (checked: bits 63:52 are reserved). PCID / PWT / PCD in bits 11:0 are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cr3(u64);

impl Cr3 {
    /// Checked constructor: `None` when reserved bits 63:52 are set.
    pub fn new(raw: u64) -> Option<Cr3> {
        (raw & !PTE_ADDR_MASK & !0xfff == 0).then_some(Cr3(raw))
    }
    /// The raw value.
    pub fn raw(self) -> u64 {
        self.0
    }
    /// Guest-physical address of the PML4 table.
    pub fn pml4(self) -> u64 {
        self.0 & PTE_ADDR_MASK
    }
}

/// Page sizes the walker returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB (PTE).
    Size4K,
    /// 2 MiB (PDE with PS).
    Size2M,
    /// 1 GiB (PDPTE with PS).
    Size1G,
}

impl PageSize {
    /// Bytes.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// Paging-structure levels, named as in the SDM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PtLevel {
    /// Page table (level 1).
    Pt = 1,
    /// Page directory (level 2).
    Pd = 2,
    /// Page-directory-pointer table (level 3).
    Pdpt = 3,
    /// PML4 (level 4).
    Pml4 = 4,
}

impl PtLevel {
    fn below(self) -> Option<PtLevel> {
        match self {
            PtLevel::Pml4 => Some(PtLevel::Pdpt),
            PtLevel::Pdpt => Some(PtLevel::Pd),
            PtLevel::Pd => Some(PtLevel::Pt),
            PtLevel::Pt => None,
        }
    }
    fn shift(self) -> u32 {
        12 + 9 * (self as u32 - 1)
    }
}

impl fmt::Display for PtLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PtLevel::Pml4 => "PML4",
            PtLevel::Pdpt => "PDPT",
            PtLevel::Pd => "PD",
            PtLevel::Pt => "PT",
        })
    }
}

/// Why a walk stopped at a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// The entry's present bit is clear.
    NotPresent,
    /// A reserved bit is set (PS in a PML4E, low address bits of a large page).
    Reserved,
    /// A write through an entry without R/W.
    NotWritable,
    /// A user access through an entry without U/S.
    NotUser,
    /// A fetch through an entry with XD.
    NoExecute,
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultReason::NotPresent => "entry not present",
            FaultReason::Reserved => "reserved bit set",
            FaultReason::NotWritable => "write to a read-only mapping",
            FaultReason::NotUser => "user access to a supervisor mapping",
            FaultReason::NoExecute => "instruction fetch from a no-execute mapping",
        })
    }
}

/// A failed translation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// Bits 63:47 of the address are not all equal.
    #[error("virtual address {va:#x} is not canonical (bits 63:47 must all equal bit 47)")]
    NonCanonical {
        /// The address.
        va: u64,
    },
    /// An entry refused the translation.
    #[error("page walk of {va:#x} failed at the {level} entry {entry:#x} (table at guest-physical {table:#x}): {reason}")]
    Fault {
        /// The address being translated.
        va: u64,
        /// Level of the entry.
        level: PtLevel,
        /// Guest-physical address of the table holding the entry.
        table: u64,
        /// The entry's value (as read once).
        entry: u64,
        /// Why.
        reason: FaultReason,
    },
    /// A table lies outside the guest's memory.
    #[error("page walk of {va:#x}: the {level} table at guest-physical {table:#x} cannot be read: {source}")]
    TableUnreadable {
        /// The address being translated.
        va: u64,
        /// Level of the table.
        level: PtLevel,
        /// Its guest-physical address.
        table: u64,
        /// The memory error.
        #[source]
        source: MemError,
    },
}

impl WalkError {
    /// The level at which the walk failed (`None` for a non-canonical address).
    pub fn level(&self) -> Option<PtLevel> {
        match self {
            WalkError::NonCanonical { .. } => None,
            WalkError::Fault { level, .. } | WalkError::TableUnreadable { level, .. } => {
                Some(*level)
            }
        }
    }
    /// The fault reason, when an entry refused the walk.
    pub fn reason(&self) -> Option<FaultReason> {
        match self {
            WalkError::Fault { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the translated byte.
    pub gpa: u64,
    /// Size of the page that maps it.
    pub page_size: PageSize,
    /// R/W set at every level.
    pub writable: bool,
    /// U/S set at every level.
    pub user: bool,
    /// No XD bit at any level.
    pub executable: bool,
}

impl Translation {
    /// Bytes from the translated address to the end of its page (at least 1).
    pub fn bytes_to_page_end(&self) -> u64 {
        let size = self.page_size.bytes();
        size - (self.gpa & (size - 1))
    }
}

/// True when `va` is canonical for 48-bit virtual addresses.
pub fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1_ffff
}

/// Where a permission was first withheld.
#[derive(Clone, Copy)]
struct Denied {
    level: PtLevel,
    table: u64,
    entry: u64,
}

/// Translate `va` through the page tables rooted at `cr3` in `mem`, for `access`.
pub fn walk<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    cr3: Cr3,
    va: u64,
    access: AccessMode,
) -> Result<Translation, WalkError> {
    if !is_canonical(va) {
        return Err(WalkError::NonCanonical { va });
    }
    let mut level = PtLevel::Pml4;
    let mut table = cr3.pml4();
    let mut no_write: Option<Denied> = None;
    let mut no_user: Option<Denied> = None;
    let mut no_exec: Option<Denied> = None;
    let (page_base, page_size) = loop {
        let index = (va >> level.shift()) & 0x1ff;
        // table <= PTE_ADDR_MASK and index * 8 < 4096: cannot overflow.
        let entry_addr = table | (index << 3);
        let entry = mem
            .read_u64(entry_addr)
            .map_err(|source| WalkError::TableUnreadable {
                va,
                level,
                table,
                source,
            })?;
        let fault = move |reason| WalkError::Fault {
            va,
            level,
            table,
            entry,
            reason,
        };
        if entry & PTE_P == 0 {
            return Err(fault(FaultReason::NotPresent));
        }
        let here = Denied {
            level,
            table,
            entry,
        };
        if entry & PTE_RW == 0 && no_write.is_none() {
            no_write = Some(here);
        }
        if entry & PTE_US == 0 && no_user.is_none() {
            no_user = Some(here);
        }
        if entry & PTE_XD != 0 && no_exec.is_none() {
            no_exec = Some(here);
        }
        let large = entry & PTE_PS != 0;
        match level {
            PtLevel::Pml4 if large => return Err(fault(FaultReason::Reserved)),
            PtLevel::Pdpt if large => {
                if entry & RSVD_1G != 0 {
                    return Err(fault(FaultReason::Reserved));
                }
                break (
                    entry & PTE_ADDR_MASK & !(PageSize::Size1G.bytes() - 1),
                    PageSize::Size1G,
                );
            }
            PtLevel::Pd if large => {
                if entry & RSVD_2M != 0 {
                    return Err(fault(FaultReason::Reserved));
                }
                break (
                    entry & PTE_ADDR_MASK & !(PageSize::Size2M.bytes() - 1),
                    PageSize::Size2M,
                );
            }
            PtLevel::Pt => break (entry & PTE_ADDR_MASK, PageSize::Size4K),
            _ => {}
        }
        table = entry & PTE_ADDR_MASK;
        level = match level.below() {
            Some(l) => l,
            // Unreachable: the PT level always breaks above.
            None => return Err(fault(FaultReason::Reserved)),
        };
    };
    let denied = match access.kind {
        AccessKind::Write => no_write.map(|d| (d, FaultReason::NotWritable)),
        AccessKind::Fetch => no_exec.map(|d| (d, FaultReason::NoExecute)),
        AccessKind::Read => None,
    }
    .or_else(|| {
        if access.user {
            no_user.map(|d| (d, FaultReason::NotUser))
        } else {
            None
        }
    });
    if let Some((d, reason)) = denied {
        return Err(WalkError::Fault {
            va,
            level: d.level,
            table: d.table,
            entry: d.entry,
            reason,
        });
    }
    // page_base is aligned to page_size and below 2^52: OR-ing the offset cannot overflow.
    let gpa = page_base | (va & (page_size.bytes() - 1));
    Ok(Translation {
        gpa,
        page_size,
        writable: no_write.is_none(),
        user: no_user.is_none(),
        executable: no_exec.is_none(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0));
        assert!(is_canonical(0x0000_7fff_ffff_ffff));
        assert!(!is_canonical(0x0000_8000_0000_0000));
        assert!(!is_canonical(0xffff_7fff_ffff_ffff));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(is_canonical(u64::MAX));
    }

    #[test]
    fn cr3_reserved_bits() {
        assert!(Cr3::new(1 << 52).is_none());
        assert!(Cr3::new(1 << 63).is_none());
        let c = Cr3::new(0x1234_5fff).unwrap();
        assert_eq!(c.pml4(), 0x1234_5000);
    }

    #[test]
    fn level_shifts() {
        assert_eq!(PtLevel::Pml4.shift(), 39);
        assert_eq!(PtLevel::Pdpt.shift(), 30);
        assert_eq!(PtLevel::Pd.shift(), 21);
        assert_eq!(PtLevel::Pt.shift(), 12);
    }
}
