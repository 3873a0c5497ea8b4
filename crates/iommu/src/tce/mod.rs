//! sPAPR TCE IOMMU model (see the crate docs).
