//! The sPAPR TCE IOMMU with dynamic DMA windows (seed 003, FACTS §7).
//!
//! # Design
//!
//! On a pseries machine a PCI device's DMA goes through **windows** of its partitionable
//! endpoint (PE): ranges of bus addresses, each translated page by page by a table of
//! translation control entries (TCEs: guest-physical page address | READ 1 | WRITE 2).
//! Every PE starts with the default 32-bit window at bus address 0; the guest may add a
//! **dynamic DMA window** (DDW) with bigger pages, normally at `1 << 59`, which devices
//! whose DMA mask is narrower than 60 bits cannot reach: those get it at 4 GiB.
//!
//! The crate models one PE ([`Pe`]) independently of any VMM:
//!
//! - [`geometry`]: the table arithmetic (entries, 1..=5 levels, level sizes, the
//!   VFIO/PAPR rejections), property-tested against a reference written from the text;
//! - [`table`]: a window's table, levels allocated on first write, memory-bounded;
//! - [`pe`]: windows, LIOBNs, placement (1 << 59 / 4 GiB / the DMA mask), the guest
//!   operations with QEMU's semantics, the host API with VFIO SPAPR TCE v2 semantics
//!   (`info`, `create_window`, `remove_window`, `register_memory`, `map`/`unmap`) and
//!   the device-side [`Pe::translate`];
//! - [`abi`]: hypercall arguments and RTAS cells decoded, run, encoded (the fuzzed
//!   surface), reading guest memory only through [`TceMemory`].
//!
//! Every TCE write is returned as a [`TceUpdate`] (old and new entry), so an owner —
//! the VMM turning TCE writes into DMA_MAP/DMA_UNMAP of an assigned device, or a device
//! process translating in place — sees exactly what changed.
//!
//! The model is checked against QEMU 7.2's sPAPR model driven by a real Linux
//! (`oracle/ppc64/`): every recorded hypercall and RTAS call is replayed here and its
//! return code, window address, LIOBN and the resulting translation compared.

pub mod abi;
pub mod entry;
pub mod geometry;
pub mod pe;
pub mod table;

pub use abi::{DdwCall, HcallOutcome, RtasOutcome, TceCall, TceMemory};
pub use entry::{Tce, TceAccess};
pub use geometry::{PageShift, TableGeometry};
pub use pe::{
    CreateWindow, CreatedWindow, Ddw64Placement, DdwQuery, Pe, PeConfig, TceInfo, TceUpdate,
    Translation, Window,
};

/// Errors of the TCE model; each maps to the PAPR code the guest gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TceError {
    /// Page size not offered.
    #[error("IOMMU page shift {0} is not offered (4K, 64K, 2M, 16M, 256M, 1G as configured)")]
    PageShift(u32),
    /// Window size not a power of two.
    #[error("window size {0:#x} is not a power of two")]
    WindowSize(u64),
    /// Window smaller than one page.
    #[error("window of {window_size:#x} bytes is smaller than one {page_size:#x}-byte page")]
    WindowSmallerThanPage {
        /// Window size.
        window_size: u64,
        /// Page size.
        page_size: u64,
    },
    /// RTAS window shift out of range.
    #[error(
        "window shift {window_shift} must be at least the page shift {page_shift} and below 64"
    )]
    WindowShift {
        /// log2 window size.
        window_shift: u32,
        /// log2 page size.
        page_shift: u32,
    },
    /// Levels out of range.
    #[error("{0} table levels: use 1 to 5")]
    Levels(u32),
    /// Host page shift out of range.
    #[error("host page shift {0} must be 12..=24")]
    HostPageShift(u32),
    /// Indirect levels cannot cover the bus address.
    #[error("{levels} levels of 2^{level_shift} bytes with 2^{page_shift} pages cover 60 address bits or more; use fewer levels or bigger pages")]
    TooDeep {
        /// Levels.
        levels: u32,
        /// Bytes (log2) of one level.
        level_shift: u32,
        /// Page shift.
        page_shift: u32,
    },
    /// Entry index past the window.
    #[error("TCE index {index} is past the window's {entries} entries")]
    Index {
        /// Index.
        index: u64,
        /// Entries.
        entries: u64,
    },
    /// Table memory budget.
    #[error("the TCE table already holds {leaves} last-level tables, its budget; the guest maps too sparsely (raise PeConfig::max_leaves)")]
    TableBudget {
        /// Budget.
        leaves: u64,
    },
    /// LIOBN without an active window.
    #[error("no active DMA window has LIOBN {0:#x}")]
    NoSuchLiobn(u64),
    /// BUID of another PHB.
    #[error("BUID {0:#x} is not this PHB's")]
    NoSuchBuid(u64),
    /// Bus address outside the window.
    #[error("bus address {ioba:#x} is outside window {liobn:#x} ({start:#x}+{size:#x})")]
    OutsideWindow {
        /// LIOBN.
        liobn: u32,
        /// Address.
        ioba: u64,
        /// Window start.
        start: u64,
        /// Window size.
        size: u64,
    },
    /// `H_PUT_TCE_INDIRECT` count.
    #[error("H_PUT_TCE_INDIRECT of {0} TCEs: 1 to 512 per call")]
    IndirectCount(u64),
    /// `H_PUT_TCE_INDIRECT` list alignment.
    #[error("H_PUT_TCE_INDIRECT list at {0:#x} is not 4 KiB aligned")]
    IndirectAlign(u64),
    /// `H_STUFF_TCE` count.
    #[error("H_STUFF_TCE of {count} entries: 1 to the window's {entries}")]
    StuffCount {
        /// Requested.
        count: u64,
        /// Window entries.
        entries: u64,
    },
    /// A guest list outside RAM.
    #[error("guest memory {gpa:#x}+{len:#x} is not RAM")]
    GuestMemory {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// No free window slot.
    #[error("all {0} DMA windows are in use; remove one first")]
    NoFreeWindow(u32),
    /// The device cannot reach the window.
    #[error("the device's {bits}-bit DMA mask cannot reach a window at {start:#x}+{size:#x}; place 64-bit windows at 4 GiB (Ddw64Placement::At(0x100000000), QEMU's dma64_win_addr) or leave the placement automatic")]
    DmaMask {
        /// Window start.
        start: u64,
        /// Window size.
        size: u64,
        /// Mask width.
        bits: u32,
    },
    /// Windows would overlap.
    #[error("a window at {start:#x}+{size:#x} would overlap an active window")]
    Overlap {
        /// Start.
        start: u64,
        /// Size.
        size: u64,
    },
    /// Host remove of a start without window.
    #[error("no window starts at {0:#x}")]
    NoWindowAt(u64),
    /// Host map outside any window.
    #[error("no window contains bus address {0:#x}")]
    NoWindowFor(u64),
    /// Host range not page aligned / not inside one window.
    #[error("range {iova:#x}+{size:#x} is not page aligned or not inside one window")]
    Unaligned {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// A map without permission.
    #[error("a mapping needs read or write permission")]
    NoAccess,
    /// Memory not preregistered.
    #[error("guest memory {gpa:#x}+{size:#x} is not (exactly) a registered range; VFIO_IOMMU_SPAPR_REGISTER_MEMORY it first")]
    NotRegistered {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// Registration overlap.
    #[error("guest memory {gpa:#x}+{size:#x} overlaps a registered range")]
    RegisteredOverlap {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// Unregistering memory still mapped.
    #[error("guest memory {gpa:#x}+{size:#x} is still mapped by TCEs; unmap it first")]
    RegisteredBusy {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// Bypass refused.
    #[error("this platform does not allow DMA window bypass")]
    BypassNotAllowed,
    /// Bad RTAS cell counts.
    #[error("{call} with {nargs} input and {nret} output cells does not match its layout")]
    RtasCells {
        /// Call.
        call: &'static str,
        /// Inputs.
        nargs: usize,
        /// Outputs (status included).
        nret: usize,
    },
    /// A bad configuration.
    #[error("TCE configuration: {0}")]
    Config(String),
    /// A broken invariant (a bug).
    #[error("internal TCE model error (a bug; please report it)")]
    Internal,
}

impl TceError {
    /// The PAPR hypercall return code for this failure.
    pub fn hcall_status(&self) -> i64 {
        match self {
            TceError::TableBudget { .. } | TceError::Internal => abi::H_HARDWARE,
            _ => abi::H_PARAMETER,
        }
    }

    /// The RTAS status for this failure.
    pub fn rtas_status(&self) -> i32 {
        match self {
            TceError::NoFreeWindow(_)
            | TceError::DmaMask { .. }
            | TceError::TableBudget { .. }
            | TceError::Overlap { .. }
            | TceError::Internal => abi::RTAS_HW_ERROR,
            _ => abi::RTAS_PARAM_ERROR,
        }
    }
}
