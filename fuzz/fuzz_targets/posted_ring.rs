//! A hostile client's writes over nestio's posted-write ring (indices, lengths, regions,
//! offsets) between the server's drains.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vfio_user::posted_ring::fuzz_ring(data));
