//! PCI helpers: configuration space, BARs, capabilities (MSI, MSI-X) and the VFIO
//! interrupt model of a PCI function.
//!
//! A device model builds one [`PciConfig`] at creation (identity, BARs, capabilities),
//! serves the VFIO configuration region (index 7) from [`PciConfig::read`] /
//! [`PciConfig::write`], and raises interrupts through [`PciIntr`], which holds the
//! device's [`crate::irq::Irqs`] laid out as vfio-pci does (INTx, MSI, MSI-X, ERR, REQ).
//!
//! Design:
//! - [`config`]: the register file. Every byte has a write mask (bits the driver may
//!   change) and a write-1-to-clear mask; device-side setters bypass both, so read-only
//!   fields are set by the device and never by the guest. BAR sizing falls out of the
//!   write masks: the low address bits of a BAR are read-only zero, so writing all ones
//!   reads back the size mask with the read-only type bits.
//! - [`bar`]: BAR kinds and their checked sizes.
//! - [`capability`]: the standard capability list (pointer at 0x34, next pointers) and
//!   the PCIe extended list at 0x100 when the 4 KiB space is enabled.
//! - [`msi`] / [`msix`]: the MSI and MSI-X capability layouts and accessors, and
//!   [`MsixTable`], the table/PBA emulation that lives in a BAR.
//! - [`intr`]: picks MSI-X, MSI or INTx for a raised vector. With VFIO the VMM
//!   virtualises the MSI/MSI-X configuration and hands one eventfd per vector through
//!   SET_IRQS; the device only signals the eventfd of the vector it raises.
//!
//! Access rules (the documented choice): configuration *reads* of any length inside the
//! space are allowed (VMMs read the whole space at once; reads have no side effect);
//! configuration *writes* must be 1, 2 or 4 bytes, naturally aligned, as a PCI
//! configuration transaction is; anything else is refused with [`PciError::Unaligned`]
//! (EINVAL) and changes nothing. Nothing here panics on a guest-chosen offset or length.

pub mod bar;
pub mod capability;
pub mod config;
pub mod function;
pub mod intr;
pub mod msi;
pub mod msix;

pub use bar::{Bar, BarKind};
pub use config::PciConfig;
pub use function::{PciDevice, PciFunction};
pub use intr::{Delivery, IntrMode, PciIntr};
pub use msi::{MsiCap, MsiEnable, MsiMessage};
pub use msix::{MsixCap, MsixEntry, MsixHit, MsixTable};

use crate::{pci_index, DeviceError};

/// Size of the standard (conventional PCI) configuration space.
pub const CONFIG_SIZE: usize = 256;
/// Size of the PCIe extended configuration space.
pub const EXT_CONFIG_SIZE: usize = 4096;
/// Number of BAR slots of a type-0 header.
pub const NUM_BARS: usize = 6;

/// Offsets of type-0 header registers.
pub mod reg {
    /// Vendor ID (u16).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (u16).
    pub const COMMAND: usize = 0x04;
    /// Status (u16).
    pub const STATUS: usize = 0x06;
    /// Revision ID (u8).
    pub const REVISION_ID: usize = 0x08;
    /// Programming interface (u8); class code is 0x09..0x0c.
    pub const PROG_IF: usize = 0x09;
    /// Sub-class (u8).
    pub const SUBCLASS: usize = 0x0a;
    /// Base class (u8).
    pub const CLASS: usize = 0x0b;
    /// Cache line size (u8).
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    /// Latency timer (u8).
    pub const LATENCY_TIMER: usize = 0x0d;
    /// Header type (u8).
    pub const HEADER_TYPE: usize = 0x0e;
    /// BIST (u8).
    pub const BIST: usize = 0x0f;
    /// BAR 0 (u32); BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (u16).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Expansion ROM base address (u32).
    pub const ROM_ADDRESS: usize = 0x30;
    /// Capabilities pointer (u8).
    pub const CAPABILITY_LIST: usize = 0x34;
    /// Interrupt line (u8).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (u8).
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod command {
    /// I/O space enable.
    pub const IO: u16 = 1 << 0;
    /// Memory space enable.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master enable (the function may DMA and send MSIs).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// The bits a driver may change.
    pub const WRITABLE: u16 = IO | MEMORY | BUS_MASTER | PARITY | SERR | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// INTx is asserted (read-only, set by the device).
    pub const INTERRUPT: u16 = 1 << 3;
    /// A capability list is present (read-only).
    pub const CAP_LIST: u16 = 1 << 4;
    /// Master data parity error (W1C).
    pub const MASTER_PARITY_ERROR: u16 = 1 << 8;
    /// Signaled target abort (W1C).
    pub const SIG_TARGET_ABORT: u16 = 1 << 11;
    /// Received target abort (W1C).
    pub const REC_TARGET_ABORT: u16 = 1 << 12;
    /// Received master abort (W1C).
    pub const REC_MASTER_ABORT: u16 = 1 << 13;
    /// Signaled system error (W1C).
    pub const SIG_SYSTEM_ERROR: u16 = 1 << 14;
    /// Detected parity error (W1C).
    pub const DETECTED_PARITY_ERROR: u16 = 1 << 15;
    /// Every write-1-to-clear bit.
    pub const W1C: u16 = MASTER_PARITY_ERROR
        | SIG_TARGET_ABORT
        | REC_TARGET_ABORT
        | REC_MASTER_ABORT
        | SIG_SYSTEM_ERROR
        | DETECTED_PARITY_ERROR;
}

/// Capability IDs.
pub mod cap_id {
    /// Power management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const EXP: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Errors of the PCI helpers. All are reported as EINVAL to a VFIO caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// Access outside the configuration space (or outside an MSI-X table / PBA).
    #[error("access of {len} bytes at offset {offset:#x} is outside the {size}-byte {what}")]
    OutOfRange {
        /// What was accessed.
        what: &'static str,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Size of the accessed space.
        size: usize,
    },
    /// A write of a size or alignment the hardware does not accept.
    #[error("{what} access of {len} bytes at offset {offset:#x} is refused: use a naturally aligned access of {allowed} bytes")]
    Unaligned {
        /// What was accessed.
        what: &'static str,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// The accepted sizes, for the message.
        allowed: &'static str,
    },
    /// A BAR that cannot be added.
    #[error("BAR {index}: {reason}")]
    Bar {
        /// BAR index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A capability that cannot be added.
    #[error("capability {id:#x}: {reason}")]
    Capability {
        /// Capability ID.
        id: u16,
        /// Why.
        reason: String,
    },
}

impl From<PciError> for DeviceError {
    fn from(e: PciError) -> Self {
        match e {
            PciError::OutOfRange {
                what: "configuration space",
                offset,
                len,
                size,
            } => DeviceError::OutOfRange {
                region: pci_index::CONFIG,
                offset,
                len: len as u64,
                size: size as u64,
            },
            other => DeviceError::Invalid(other.to_string()),
        }
    }
}

/// Check that `[offset, offset + len)` lies inside `size` bytes; returns the offset as
/// usize.
pub(crate) fn check_range(
    what: &'static str,
    offset: u64,
    len: usize,
    size: usize,
) -> Result<usize, PciError> {
    let err = || PciError::OutOfRange {
        what,
        offset,
        len,
        size,
    };
    let end = offset.checked_add(len as u64).ok_or_else(err)?;
    if end > size as u64 {
        return Err(err());
    }
    Ok(offset as usize)
}
