//! Feed arbitrary bytes to the vfio-user message decoders.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vfio_user::fuzz_decode(data));
