//! Virtual IOMMU models, independent of any VMM.
//!
//! Each model is a faithful software implementation of an architecture's IOMMU,
//! written from its specification and checked against QEMU's model as an oracle:
//!
//! - [`smmuv3`]: ARM SMMUv3 with stage 1, stage 2 and nested translation (seed 002).
//! - [`tce`]: the sPAPR TCE IOMMU with dynamic DMA windows (seed 003).
//!
//! The models read guest memory (stream tables, page tables, TCE tables) only through
//! the small memory trait each one declares, so the VMM, a device process walking
//! stage 1 itself, and the tests all drive the same code.

pub mod smmuv3;
pub mod tce;
