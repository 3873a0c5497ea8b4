//! The sPAPR TCE IOMMU through the hypercall entry: arbitrary guest RAM, TCE hypercalls
//! and DDW RTAS calls; the device's mappings checked against the model after each call.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vmm::hypercall::tce::fuzz_tce(data));
