//! Feed arbitrary guest RAM and hypercalls (opcode + nine arguments) to the VMM's
//! hypercall dispatcher: the built-in RTAS entry and a TCE-list handler.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestio_vmm::hypercall::fuzz::fuzz_hypercall(data));
