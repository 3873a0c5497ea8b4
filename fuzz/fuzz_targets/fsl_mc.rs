//! Feed arbitrary MC commands (through the DPRC's portal, DPMCP portals and a mapped
//! portal) and VFIO operations (resets, irq loopback, region accesses anywhere) to an
//! FSL-MC DPRC container.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_emulated::fsl_mc::fuzz_fsl_mc(data));
