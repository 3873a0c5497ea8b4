//! Emulated devices, each implementing [`nestio_device_model::VfioDevice`] so it can be used
//! in process or served over vfio-user:
//! - [`sample`]: a small PCI device with a register BAR, a RAM BAR and a DMA engine;
//! - [`gpio`]: a 16-pin GPIO card, the minimal example of a device that is its
//!   registers ([`nestio_device_model::pci::PciDevice`]);
//! - [`e1000`]: an Intel 82540EM network card;
//! - [`fsl_mc`]: an FSL-MC DPRC container of DPAA2 objects (non-PCI, `VFIO_DEVICE_FLAGS_FSL_MC`);
//! - [`e1000_bench`]: a guest-side e1000 driver used to measure packets per second.

pub mod e1000;
#[cfg(feature = "harness")]
pub mod e1000_bench;
pub mod fsl_mc;
#[cfg(feature = "harness")]
mod fuzz_input;
#[cfg(feature = "harness")]
pub mod gated_sample;
pub mod gpio;
#[cfg(feature = "harness")]
mod migration_fuzz;
#[cfg(feature = "harness")]
pub use migration_fuzz::fuzz_migration;
pub mod sample;
