//! Play a hostile vfio-user server against the conformance suite; also checks that no
//! fd leaks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nestio_vfio_user::fuzzing::fuzz_conformance_no_fd_leak(data)
});
