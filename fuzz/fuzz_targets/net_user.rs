//! Feed arbitrary frames (and length-prefixed frame sequences) to the user network.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_net::fuzz_user_backend(data));
