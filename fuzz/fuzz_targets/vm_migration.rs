//! The VM migration stream (`nestio_vmm::migration::format`) as hostile input: header,
//! section framing and CRC, every section's payload decoder, and exact round trips of
//! whatever decodes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vmm::migration::fuzz_stream(data));
