//! ARM SMMUv3 model (see the crate docs).
