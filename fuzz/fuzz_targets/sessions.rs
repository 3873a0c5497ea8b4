//! Connection events (connect, VERSION, garbage, commands, close) against a listening server.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vfio_user::fuzz_sessions(data));
