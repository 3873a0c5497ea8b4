//! A translation control entry: a big-endian u64 in the guest's lists, holding the
//! real (guest-physical) page address with the READ (bit 0) and WRITE (bit 1)
//! permission bits; 0 is "no access". The table keeps the value exactly as the guest
//! wrote it (QEMU does, and `H_GET_TCE` returns it); the translation uses the page
//! address bits of the window's page size and the two permission bits.

/// A TCE value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tce(pub u64);

/// Device may read.
pub const TCE_READ: u64 = 1;
/// Device may write.
pub const TCE_WRITE: u64 = 2;

/// What a TCE permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TceAccess {
    /// Nothing (the entry is cleared or has neither bit).
    None,
    /// Device reads only (DMA to device memory from RAM: "to device").
    Read,
    /// Device writes only.
    Write,
    /// Both.
    ReadWrite,
}

impl TceAccess {
    /// Whether a device read is allowed.
    pub fn can_read(self) -> bool {
        matches!(self, TceAccess::Read | TceAccess::ReadWrite)
    }
    /// Whether a device write is allowed.
    pub fn can_write(self) -> bool {
        matches!(self, TceAccess::Write | TceAccess::ReadWrite)
    }
    /// The two permission bits.
    pub fn bits(self) -> u64 {
        match self {
            TceAccess::None => 0,
            TceAccess::Read => TCE_READ,
            TceAccess::Write => TCE_WRITE,
            TceAccess::ReadWrite => TCE_READ | TCE_WRITE,
        }
    }
}

impl Tce {
    /// The cleared entry.
    pub const CLEAR: Tce = Tce(0);

    /// A TCE for the page at `gpa` (low bits ignored by the translation) with `access`.
    pub fn new(gpa: u64, access: TceAccess) -> Tce {
        Tce((gpa & !(TCE_READ | TCE_WRITE)) | access.bits())
    }

    /// Whether the value is 0.
    pub fn is_clear(self) -> bool {
        self.0 == 0
    }

    /// The permission.
    pub fn access(self) -> TceAccess {
        match self.0 & 3 {
            0 => TceAccess::None,
            1 => TceAccess::Read,
            2 => TceAccess::Write,
            _ => TceAccess::ReadWrite,
        }
    }

    /// The page address for pages of `page_mask` (`!(page_size - 1)`).
    pub fn page_addr(self, page_mask: u64) -> u64 {
        self.0 & page_mask
    }
}
