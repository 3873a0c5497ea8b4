//! Feed arbitrary bytes as a client stream to a vfio-user server serving a test device.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vfio_user::fuzz_dispatch(data));
