//! Restore hostile migration streams into the e1000 and the sample device.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_emulated::fuzz_migration(data));
