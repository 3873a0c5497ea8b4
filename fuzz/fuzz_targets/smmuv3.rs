//! Hostile stream tables, CDs, page tables and command queues against the SMMUv3
//! model (walker, command queue, event queue; see nestio_iommu::smmuv3::fuzz).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_iommu::smmuv3::fuzz::fuzz_smmuv3(data));
