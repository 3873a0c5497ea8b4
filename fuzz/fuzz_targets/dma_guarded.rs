//! A client truncating, regrowing and writing its unsealed guest RAM while the device
//! accesses it in place (or by pread/pwrite), checked against a model of the file.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_dma::fuzzing::guarded(data));
