//! Decode a hostile parent level's RAM handoff (and map the window it names).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vmm::fuzz_handoff(data));
