//! What a device may reach by DMA: DMA domains keyed by stream ID.
//!
//! See [`domain`] for the design; [`tce`] is the sPAPR TCE IOMMU.

pub mod domain;
pub mod msi;
#[cfg(test)]
pub(crate) mod recorder;
pub mod smmuv3;
#[cfg(any(test, feature = "harness"))]
pub(crate) mod table_device;
pub mod tce;
#[cfg(feature = "harness")]
pub mod tce_bench;

pub use domain::{DmaDomain, DmaDomainError, GuestRamFile, IdentityDomain, ShadowDomain, StreamId};

/// Builds the VM's DMA domain once guest RAM exists (`VmConfig::dma_domain`; without
/// one the VM uses an [`IdentityDomain`]).
#[derive(Clone)]
pub struct DmaDomainFactory(
    std::sync::Arc<dyn Fn(GuestRamFile) -> std::sync::Arc<dyn DmaDomain> + Send + Sync>,
);

impl DmaDomainFactory {
    /// A factory calling `f` with guest RAM.
    pub fn new(
        f: impl Fn(GuestRamFile) -> std::sync::Arc<dyn DmaDomain> + Send + Sync + 'static,
    ) -> Self {
        DmaDomainFactory(std::sync::Arc::new(f))
    }

    /// The domain over `ram`.
    pub fn build(&self, ram: GuestRamFile) -> std::sync::Arc<dyn DmaDomain> {
        (self.0)(ram)
    }
}

impl std::fmt::Debug for DmaDomainFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DmaDomainFactory")
    }
}
