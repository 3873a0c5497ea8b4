//! A hostile BAR channel grant (its descriptor and fds) and a hostile channel peer
//! against the device side (exclusions enforced, no hang, no fd leak).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_nested::fuzz_bar_channel(data));
