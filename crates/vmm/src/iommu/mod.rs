//! What a device may reach by DMA: DMA domains keyed by stream ID.
//!
//! See [`domain`] for the design.

pub mod domain;
pub mod smmuv3;

pub use domain::{DmaDomain, DmaDomainError, GuestRamFile, IdentityDomain, ShadowDomain, StreamId};
