//! Feed arbitrary sequences of XIVE hypercalls, control-API attributes, ESB/TIMA
//! accesses, triggers, save/restore and cede/dispatch to the nestio-xive model; then the
//! same bytes to the VMM's XIVE chip (allocation, eventfds, MSI steering, H_CEDE).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nestio_xive::fuzz::fuzz_xive(data);
    nestio_vmm::irqchip::xive::fuzz_xive_chip(data);
});
