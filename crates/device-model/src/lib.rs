//! The device model: one trait, [`VfioDevice`], with VFIO semantics.
//!
//! Everything that can be passed through implements it: an emulated device in this
//! process (e1000, the sample device), and the vfio-user *client*, which makes a device
//! served by another process look exactly like a local one. The vfio-user *server*
//! serves any implementation. A client plus a server is therefore a proxy: that is how a
//! device is passed on to the next nesting level.
//!
//! The trait mirrors the VFIO device API (and the vfio-user commands built on it):
//! - identity: [`DeviceInfo`] (flags such as PCI / FSL-MC / RESET, region and irq counts);
//! - regions: [`RegionInfo`] (size, flags, sparse mmap areas, an fd to mmap), read/write
//!   at an offset, ioeventfds ([`IoEventFd`]);
//! - interrupts: [`IrqInfo`] and `set_irqs` with VFIO_IRQ_SET semantics ([`irq`] has a
//!   reusable implementation a device embeds);
//! - DMA: the owner maps memory with `dma_map` / `dma_unmap`; a local device keeps those
//!   in the `nestio_dma::MapTable` of its [`DmaPort`] and does every DMA through the port,
//!   as a `&dyn DmaSpace` that a translating space can be stacked on ([`dma`]);
//! - PCI: [`pci::PciFunction`] answers configuration space, SET_IRQS and irq info for a
//!   PCI device, so a device is its registers ([`pci::PciDevice`]);
//! - peer fds: interrupt eventfds are checked and signalled without blocking
//!   ([`eventfd`]);
//! - migration v2 ([`migration`]): device state machine, data stream, dirty logging.
//!
//! Methods take `&self`: devices are shared between the server's threads, vCPU threads
//! and their own workers, and synchronise inside. The trait and its forwarding impl for
//! `Arc<T>` are generated from one method list ([`VFIO_DEVICE_METHODS`]), so a shared
//! device can never answer "unsupported" for a method the forwarding impl forgot.

pub mod dma;
pub mod eventfd;
pub mod irq;
pub mod migration;
pub mod pci;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use nestio_dma::{DmaError, DmaMapRequest, DmaRange, MapTable};

pub use dma::DmaPort;
pub use migration::{MigState, MigrationFlags};

/// VFIO device flags (linux/vfio.h `VFIO_DEVICE_FLAGS_*`).
pub mod flags {
    /// The device supports reset.
    pub const RESET: u32 = 1 << 0;
    /// A PCI device.
    pub const PCI: u32 = 1 << 1;
    /// A platform device.
    pub const PLATFORM: u32 = 1 << 2;
    /// An AMBA device.
    pub const AMBA: u32 = 1 << 3;
    /// A CCW device.
    pub const CCW: u32 = 1 << 4;
    /// An AP device.
    pub const AP: u32 = 1 << 5;
    /// An FSL-MC device.
    pub const FSL_MC: u32 = 1 << 6;
    /// Info has a capability chain.
    pub const CAPS: u32 = 1 << 7;
    /// A CDX device.
    pub const CDX: u32 = 1 << 8;
}

/// VFIO region flags (`VFIO_REGION_INFO_FLAG_*`).
pub mod region_flags {
    /// Readable.
    pub const READ: u32 = 1 << 0;
    /// Writable.
    pub const WRITE: u32 = 1 << 1;
    /// Can be mmapped (possibly only the sparse areas).
    pub const MMAP: u32 = 1 << 2;
    /// Info has a capability chain.
    pub const CAPS: u32 = 1 << 3;
}

/// VFIO irq info flags (`VFIO_IRQ_INFO_*`).
pub mod irq_flags {
    /// Signalled through an eventfd.
    pub const EVENTFD: u32 = 1 << 0;
    /// Can be masked.
    pub const MASKABLE: u32 = 1 << 1;
    /// Masked automatically when it fires (level-triggered INTx).
    pub const AUTOMASKED: u32 = 1 << 2;
    /// The count cannot be changed.
    pub const NORESIZE: u32 = 1 << 3;
}

/// VFIO PCI region and irq indices (`VFIO_PCI_*_INDEX`).
pub mod pci_index {
    /// BAR 0..5 are regions 0..5.
    pub const BAR0: u32 = 0;
    /// Expansion ROM.
    pub const ROM: u32 = 6;
    /// Configuration space.
    pub const CONFIG: u32 = 7;
    /// VGA.
    pub const VGA: u32 = 8;
    /// Number of PCI regions.
    pub const NUM_REGIONS: u32 = 9;
    /// INTx interrupt.
    pub const INTX_IRQ: u32 = 0;
    /// MSI.
    pub const MSI_IRQ: u32 = 1;
    /// MSI-X.
    pub const MSIX_IRQ: u32 = 2;
    /// Error.
    pub const ERR_IRQ: u32 = 3;
    /// Request.
    pub const REQ_IRQ: u32 = 4;
    /// Number of PCI irq indices.
    pub const NUM_IRQS: u32 = 5;
}

/// Identity of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// [`flags`] bits.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of irq indices.
    pub num_irqs: u32,
}

/// A sub-range of a region that can be mmapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset inside the region.
    pub offset: u64,
    /// Size.
    pub size: u64,
}

/// Description of one region.
#[derive(Debug, Clone)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// [`region_flags`] bits.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region's first byte in `fd` (for mmap).
    pub fd_offset: u64,
    /// mmappable parts; empty with MMAP set means the whole region.
    pub sparse: Vec<SparseArea>,
    /// The file to mmap, when MMAP is set.
    pub fd: Option<Arc<OwnedFd>>,
}

impl RegionInfo {
    /// A region that does not exist (size 0, no flags).
    pub fn absent(index: u32) -> Self {
        RegionInfo {
            index,
            flags: 0,
            size: 0,
            fd_offset: 0,
            sparse: Vec::new(),
            fd: None,
        }
    }
    /// A plain read/write region accessed by messages.
    pub fn rw(index: u32, size: u64) -> Self {
        RegionInfo {
            index,
            flags: region_flags::READ | region_flags::WRITE,
            size,
            fd_offset: 0,
            sparse: Vec::new(),
            fd: None,
        }
    }
    /// Check an access of `len` bytes at `offset` lies inside the region.
    pub fn check(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DeviceError::OutOfRange {
                region: self.index,
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }
}

/// An ioeventfd a device offers for a region (vfio-user GET_REGION_IO_FDS): a write of
/// `size` bytes at `offset` (matching `datamatch` if given) signals `fd` instead of
/// sending a message.
#[derive(Debug, Clone)]
pub struct IoEventFd {
    /// Offset inside the region.
    pub offset: u64,
    /// Access size: 1, 2, 4 or 8.
    pub size: u64,
    /// Only writes of this value signal.
    pub datamatch: Option<u64>,
    /// The eventfd.
    pub fd: Arc<OwnedFd>,
}

/// Description of one irq index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Index.
    pub index: u32,
    /// [`irq_flags`] bits.
    pub flags: u32,
    /// Number of vectors.
    pub count: u32,
}

/// The action of a SET_IRQS request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqAction {
    /// Mask the vectors.
    Mask,
    /// Unmask the vectors.
    Unmask,
    /// Trigger (or, with eventfds, set the trigger fds).
    Trigger,
}

/// The data of a SET_IRQS request.
#[derive(Debug)]
pub enum IrqData {
    /// No data: act on every vector in the range (count 0 + Trigger: disable all).
    None,
    /// One bool per vector: act where true.
    Bool(Vec<bool>),
    /// One fd per vector; `None` (fd -1) removes the vector's fd.
    Eventfd(Vec<Option<OwnedFd>>),
}

/// Errors of the device model. Each maps to the errno a VFIO / vfio-user reply carries.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No such region.
    #[error("region {0} does not exist on this device")]
    NoSuchRegion(u32),
    /// No such irq index.
    #[error("irq index {0} does not exist on this device")]
    NoSuchIrq(u32),
    /// Access outside a region.
    #[error(
        "access of {len} bytes at offset {offset:#x} is outside region {region} (size {size:#x})"
    )]
    OutOfRange {
        /// Region.
        region: u32,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// A well-formed request the device cannot honour.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Not supported by this device.
    #[error("not supported by this device: {0}")]
    Unsupported(String),
    /// Not possible in the current state.
    #[error("not possible now: {0}")]
    Busy(String),
    /// A DMA or mapping error.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// The remote device (vfio-user peer) answered with an error.
    #[error("remote device refused {what}: {} (errno {errno})", std::io::Error::from_raw_os_error(*errno))]
    Remote {
        /// The operation.
        what: String,
        /// The errno it replied.
        errno: i32,
    },
    /// The remote device is unreachable.
    #[error("device connection lost: {0}")]
    Disconnected(String),
    /// An I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl DeviceError {
    /// The errno for a reply.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::NoSuchRegion(_)
            | DeviceError::NoSuchIrq(_)
            | DeviceError::OutOfRange { .. }
            | DeviceError::Invalid(_) => libc::EINVAL,
            DeviceError::Unsupported(_) => libc::ENOTSUP,
            DeviceError::Busy(_) => libc::EBUSY,
            DeviceError::Dma(e) => e.errno(),
            DeviceError::Remote { errno, .. } => *errno,
            DeviceError::Disconnected(_) => libc::ENOTCONN,
            DeviceError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Result alias of the device model.
pub type Result<T> = std::result::Result<T, DeviceError>;

/// Declares [`VfioDevice`] and its forwarding impl for `Arc<T>` from one list of methods,
/// so the forwarding impl cannot miss one: a default-bodied method forgotten there would
/// silently answer "unsupported" for every shared device. Also records the method names
/// in [`VFIO_DEVICE_METHODS`] (a test checks every one is forwarded).
macro_rules! vfio_device_trait {
    (
        $d:tt
        $(#[$tmeta:meta])*
        pub trait VfioDevice {
            $(
                $(#[$meta:meta])*
                fn $name:ident(&$self:ident $(, $arg:ident : $ty:ty)* $(,)?) -> $ret:ty
                    $(;)? $($body:block)?
            )*
        }
    ) => {
        $(#[$tmeta])*
        pub trait VfioDevice: Send + Sync {
            $(
                vfio_device_trait!(@method [$(#[$meta])*] $name $self [$($arg: $ty),*] $ret; $($body)?);
            )*
        }

        /// Every method is forwarded, generated from the same list as the trait.
        impl<T: VfioDevice + ?Sized> VfioDevice for Arc<T> {
            $(
                #[inline]
                fn $name(&$self $(, $arg: $ty)*) -> $ret {
                    (**$self).$name($($arg),*)
                }
            )*
        }

        /// A device that wraps another and forwards to it every method it does not
        /// override: implement [`Forwarding::forward_to`] and the methods the wrapper
        /// changes, then [`impl_vfio_device_by_forwarding!`] gives it [`VfioDevice`]. Both
        /// are generated from the same list as the trait, so a wrapper can no more forget
        /// to forward a method than `Arc<T>` can.
        pub trait Forwarding: Send + Sync {
            /// The wrapped device.
            fn forward_to(&self) -> &dyn VfioDevice;
            $(
                $(#[$meta])*
                #[inline]
                fn $name(&$self $(, $arg: $ty)*) -> $ret {
                    $self.forward_to().$name($($arg),*)
                }
            )*
        }

        /// `impl VfioDevice for T` where `T: Forwarding`: every method as the
        /// [`Forwarding`] impl defines it (forwarded unless overridden there).
        #[macro_export]
        macro_rules! impl_vfio_device_by_forwarding {
            ($d t:ty) => {
                const _: () = {
                    #[allow(unused_imports)]
                    use $d crate::forwarding_types::*;
                    impl $d crate::VfioDevice for $d t {
                        $(
                            #[inline]
                            fn $name(&$self $(, $arg: $ty)*) -> $ret {
                                <$d t as $d crate::Forwarding>::$name($self $(, $arg)*)
                            }
                        )*
                    }
                };
            };
        }

        /// The names of [`VfioDevice`]'s methods, in declaration order (generated with the
        /// trait: used to check that wrappers forward every one).
        pub const VFIO_DEVICE_METHODS: &[&str] = &[$(stringify!($name)),*];
    };
    (@method [$($m:tt)*] $name:ident $self:ident [$($arg:ident: $ty:ty),*] $ret:ty;) => {
        $($m)* fn $name(&$self $(, $arg: $ty)*) -> $ret;
    };
    (@method [$($m:tt)*] $name:ident $self:ident [$($arg:ident: $ty:ty),*] $ret:ty; $body:block) => {
        $($m)* fn $name(&$self $(, $arg: $ty)*) -> $ret $body
    };
}

/// The types [`VfioDevice`]'s signatures name, for [`impl_vfio_device_by_forwarding!`]
/// (which expands in the wrapper's crate).
#[doc(hidden)]
pub mod forwarding_types {
    pub use crate::{
        DeviceInfo, DmaPort, IoEventFd, IrqAction, IrqData, IrqInfo, MigState, MigrationFlags,
        RegionInfo, Result,
    };
    pub use nestio_dma::{DmaMapRequest, DmaRange, MapTable};
}

vfio_device_trait! {
    $
    /// A device with VFIO semantics. See the crate documentation.
    ///
    /// Default methods give the behaviour of a device without the feature; a local device
    /// that does DMA returns its [`DmaPort`] from [`VfioDevice::dma_port`] (or its table
    /// from [`VfioDevice::dma_table`]) and gets DMA mapping and dirty logging for free.
    pub trait VfioDevice {
        /// Flags and counts.
        fn info(&self) -> DeviceInfo;
        /// Describe region `index` (an absent region has size 0).
        fn region_info(&self, index: u32) -> Result<RegionInfo>;
        /// Read `buf.len()` bytes at `offset` of region `index`.
        fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()>;
        /// Write `data` at `offset` of region `index`.
        fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()>;
        /// The ioeventfds the device offers for region `index` (none by default).
        fn region_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
            self.region_info(index)?;
            Ok(Vec::new())
        }
        /// Describe irq index `index`.
        fn irq_info(&self, index: u32) -> Result<IrqInfo>;
        /// VFIO_DEVICE_SET_IRQS.
        fn set_irqs(
            &self,
            index: u32,
            action: IrqAction,
            start: u32,
            count: u32,
            data: IrqData,
        ) -> Result<()>;
        /// Reset the device (function-level).
        fn reset(&self) -> Result<()> {
            Err(DeviceError::Unsupported("reset".into()))
        }

        /// The DMA port of a local device that does DMA: the map table its owner maps
        /// into and the [`nestio_dma::DmaSpace`] its DMA goes through.
        fn dma_port(&self) -> Option<&DmaPort> {
            None
        }
        /// The map table of a local device that does DMA (by default its port's).
        fn dma_table(&self) -> Option<&MapTable> {
            self.dma_port().map(DmaPort::table)
        }
        /// Make memory available to the device.
        fn dma_map(&self, req: DmaMapRequest) -> Result<()> {
            match self.dma_table() {
                Some(t) => Ok(t.map(req)?),
                None => Ok(()),
            }
        }
        /// Remove exactly the mapping `[iova, iova+size)`.
        fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
            match self.dma_table() {
                Some(t) => Ok(t.unmap(iova, size)?),
                None => Ok(()),
            }
        }
        /// Remove every mapping.
        fn dma_unmap_all(&self) -> Result<()> {
            if let Some(t) = self.dma_table() {
                t.unmap_all();
            }
            Ok(())
        }

        /// Migration support (None: the device cannot migrate).
        fn migration_flags(&self) -> Option<MigrationFlags> {
            None
        }
        /// Current migration state.
        fn mig_state(&self) -> Result<MigState> {
            Err(DeviceError::Unsupported("migration".into()))
        }
        /// Move to `target` (any state reachable by the VFIO v2 FSM); returns the new
        /// state.
        fn mig_set_state(&self, target: MigState) -> Result<MigState> {
            let _ = target;
            Err(DeviceError::Unsupported("migration".into()))
        }
        /// Read the next chunk of the migration stream (STOP_COPY / PRE_COPY); 0 = end.
        fn mig_data_read(&self, buf: &mut [u8]) -> Result<usize> {
            let _ = buf;
            Err(DeviceError::Unsupported("migration".into()))
        }
        /// Write the next chunk of the migration stream (RESUMING).
        fn mig_data_write(&self, data: &[u8]) -> Result<()> {
            let _ = data;
            Err(DeviceError::Unsupported("migration".into()))
        }
        /// Start dirty logging of device DMA writes.
        fn dma_logging_start(&self, page_size: u64, ranges: &[DmaRange]) -> Result<()> {
            match self.dma_table() {
                Some(t) => Ok(t.start_logging(page_size, ranges)?),
                None => Err(DeviceError::Unsupported("DMA dirty logging".into())),
            }
        }
        /// Stop dirty logging.
        fn dma_logging_stop(&self) -> Result<()> {
            match self.dma_table() {
                Some(t) => {
                    t.stop_logging();
                    Ok(())
                }
                None => Err(DeviceError::Unsupported("DMA dirty logging".into())),
            }
        }
        /// Report and clear the dirty bitmap of `range` (u64 words, bit per page).
        fn dma_logging_report(&self, range: DmaRange, page_size: u64) -> Result<Vec<u64>> {
            match self.dma_table() {
                Some(t) => Ok(t.report_dirty(range, page_size)?),
                None => Err(DeviceError::Unsupported("DMA dirty logging".into())),
            }
        }
    }
}
