//! Nested guests: copy to and from a nested guest's memory (seed 000, issue 6).
//!
//! A device emulated at level n can be passed through to a guest at any deeper level.
//! When memory cannot be shared by fd between the levels, DMA and inspection go through
//! this crate:
//! - [`level`]: each nested guest's memory is a [`Window`] of its parent's memory; the
//!   [`Levels`] registry composes windows down to the host, checked at every level.
//! - [`memory`]: the [`GuestPhysMemory`] trait (bytes at a guest-physical address, errors
//!   not panics) over a volatile memfd mapping, a [`nestio_dma::DmaSpace`], or vm-memory's
//!   `GuestMemoryMmap`.
//! - [`mod@walk`]: an x86-64 4-level page walker over the nested guest's own tables.
//! - [`copy`]: the copy API with the semantics of the seed's H_COPY_TOFROM_GUEST hcall
//!   ([`NestedGuests::h_copy_tofrom_guest`]) and plain Rust-buffer forms for `nestio inspect`.
//! - [`dma`]: [`NestedDma`], the DMA space of a device assigned to a nested guest, which
//!   can only reach that guest's window.
//! - [`export`]: [`ExportedDevice`], a device passed on to the next level (maps checked
//!   against the child's window and re-issued in this level's terms, interrupts fd-to-fd).
//! - [`iommu_forward`]: [`ForwardIommu`], an exporter's nested IOMMU (the vfio-user
//!   extension's BIND/INVALIDATE/FAULT passed on to the level below).
//! - [`direct`]: a BAR channel from the innermost level straight to the device
//!   ([`DirectBars`]), so register accesses cost one hop at any depth.
//! - [`channel_handoff`]: BAR channels between `nestio run` processes: granted by the
//!   device process on a nestio-private DEVICE_FEATURE, carried down level by level on
//!   each export session, used by the innermost level ([`ChannelBars`]), revocable by
//!   every level ([`ChannelGrants`], [`ChannelGate`]).
//! - [`stack`]: a whole stack of exporting levels in one process, and [`bench_depths`].
//! - [`fuzz`]: [`fuzz_walk`], the fuzzing entry point.

pub mod channel_handoff;
pub mod copy;
pub mod direct;
pub mod dma;
pub mod export;
#[cfg(feature = "harness")]
pub mod fuzz;
pub mod iommu_forward;
pub mod level;
pub mod memory;
pub mod stack;
pub mod walk;

#[cfg(feature = "harness")]
pub use channel_handoff::fuzz_bar_channel;
pub use channel_handoff::{
    request_grant, ChannelBars, ChannelBarsStats, ChannelError, ChannelGate, ChannelGrants,
    GateStats, Grant, GrantInfo, GrantStats,
};
pub use copy::{
    hcall_code, AddressSpace, CopyError, HcallArgs, HcallStatus, LevelMemory, NestedGuests,
    MAX_COPY_LEN, PHYSICAL_PID,
};
pub use direct::{BarChannelHandle, BarChannels, DirectBars, DirectError};
pub use dma::{nested_dma_space, NestedDma};
pub use export::{ExportConfig, ExportError, ExportStats, ExportedDevice, LevelRam, RamRegion};
#[cfg(feature = "harness")]
pub use fuzz::fuzz_walk;
pub use iommu_forward::ForwardIommu;
pub use level::{Level, LevelError, LevelId, Levels, Window, MAX_DEPTH};
pub use memory::{DmaMemory, GuestPhysMemory, MemError, MmapMemory};
pub use stack::{bench_depths, DepthRow, NestedStack, RoundTrip, StackConfig, StackError};
pub use walk::{
    walk, AccessKind, AccessMode, Cr3, FaultReason, PageSize, PtLevel, Translation, WalkError,
};
