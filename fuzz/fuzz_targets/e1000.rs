//! Feed arbitrary register writes and descriptor contents to an e1000.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_emulated::e1000::fuzz_e1000(data));
