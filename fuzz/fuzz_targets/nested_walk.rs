//! Feed arbitrary page-table memory and addresses to the nested-guest page walker.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_nested::fuzz_walk(data));
