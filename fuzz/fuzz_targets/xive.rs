//! Feed arbitrary sequences of XIVE hypercalls, control-API attributes, ESB/TIMA
//! accesses, triggers and save/restore to the nestio-xive model.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_xive::fuzz::fuzz_xive(data));
