//! nestio-vmm: a small KVM VMM that runs `no_std` guest payloads or a Linux kernel
//! ([`Boot`]) with devices assigned through the [`nestio_device_model::VfioDevice`] trait:
//! in-process device models and devices served by another process over vfio-user are
//! wired identically.
//!
//! Pieces (one module each):
//! - [`memory`]: guest RAM in a memfd, shared by fd with every device (DMA_MAP);
//! - [`handoff`]: a nesting level's RAM window handed to the level below (`PATH.mem`);
//! - [`boot`]: ELF loading (linux-loader), GDT, identity page tables, long-mode entry;
//! - [`bus`]: checked PIO/MMIO buses; unclaimed reads are all-ones;
//! - [`serial`]: the 16550 console (vm-superio);
//! - [`irqchip`]: the interrupt-controller seam ([`irqchip::IrqChip`]: sources,
//!   eventfds, MSI messages, masking, snapshots) and its x86 in-kernel implementation;
//! - [`address_space`]: the KVM operations that map memory slots and ioeventfds, as a
//!   trait (testable without `/dev/kvm`);
//! - [`pci`]: host bridge (CF8/CFC and ECAM), BAR windows, and
//!   [`pci::assigned`], the VFIO-style wiring of one device (config virtualisation, BARs
//!   as bus ranges + KVM memory slots for mmappable areas + ioeventfds, INTx / MSI /
//!   MSI-X through the irqchip);
//! - [`iommu`]: DMA domains keyed by stream ID (identity: all RAM at IOVA = GPA; a
//!   shadow domain a vIOMMU drives with map/unmap);
//! - [`region_map`]: the bus-neutral region mapper (device region -> bus range + KVM
//!   memory slots for mmappable areas + ioeventfds), used by PCI BARs and platform
//!   devices;
//! - [`platform`]: non-PCI (platform / AMBA / FSL-MC) devices at addresses of the
//!   platform MMIO window, interrupts wired through the irqchip;
//! - [`hypercall`]: the PAPR hypercall entry (a port doorbell, registers as arguments),
//!   its dispatcher, RTAS and the virtual terminal;
//! - [`cpu`]: the x86 CPU model (CPUID, MSR_TEST_CTRL / CORE_CAPABILITIES through
//!   user-space MSR exits, split-lock reports);
//! - [`vcpu`]: the vCPU state machine and state save/restore;
//! - [`vm`]: assembly, the control loop (SIGINT, stop requests, dead devices) and
//!   [`run`];
//! - [`mod@bench`]: exit and interrupt costs measured by a guest (`nestio bench`);
//! - [`linux`]: direct boot of a Linux kernel ([`Boot::Linux`], `nestio run --kernel`).
//!
//! Payload/VMM contract: the payload is entered in 64-bit mode at its ELF entry with
//! `rdi` = RAM size and `rsi` = its command line ([`VmConfig::cmdline`]); a write to port
//! 0xf4 ends the VM with the low byte as exit status; a 32-bit write to port 0xe0 is a
//! hypercall ([`hypercall`]); 0xFE to port 0x64 is a reset; the
//! console is the UART at 0x3f8. A Linux guest ends the same way: nestio's guest /init
//! writes its status to 0xf4 before rebooting (`reboot=k`: 0xFE to port 0x64); a reset
//! without a status ends the VM with status 0. A Linux kernel panic or a power-off
//! (no ACPI) leaves the vCPU halted; stop it with SIGINT or [`VmHandle::stop`]. Several vCPUs
//! ([`VmConfig::cpus`]) each run on their own thread; [`VmHandle::pause`] parks them all. Not implemented: PCI
//! bridges and multi-function devices, expansion ROMs, the MSI pending-bits register,
//! hot-plug.
//!
//! Guest payloads live in the separate cargo workspace `guest/` (a `no_std` library and
//! the payload binaries), built by this crate's build script with the host toolchain;
//! [`payloads`] has their paths.

pub mod acpi;
pub mod address_space;
#[cfg(feature = "harness")]
pub mod bench;
pub mod boot;
pub mod bus;
pub mod control;
pub mod cpu;
pub mod handoff;
pub mod hypercall;
pub mod iommu;
pub mod irqchip;
pub mod linux;
pub mod memory;
pub mod migration;
pub mod pci;
pub mod platform;
pub mod region_map;
pub mod remote;
pub mod serial;
pub mod serial_input;
pub mod threads;
pub mod vcpu;
pub mod vm;

pub use cpu::CpuModel;
pub use handoff::fuzz_handoff;
pub use serial::ConsoleOutput;
pub use threads::{ThreadHooks, ThreadRole};
pub use vcpu::{PauseError, StopReason};
pub use vm::{
    default_linux_cmdline, parse_cpus, parse_size, run, Boot, ConfigError, DeviceConfig, RamFile,
    Vm, VmConfig, VmError, VmHandle, VmReport, MAX_VCPUS,
};

/// Paths of the guest payloads built with this crate (by build.rs).
pub mod payloads {
    /// Prints a greeting and exits with status 42.
    pub const HELLO: &str = env!("NESTIO_GUEST_HELLO");
    /// Checks CORE_CAPABILITIES / MSR_TEST_CTRL from the guest; 0 = all checks passed.
    pub const CPUTEST: &str = env!("NESTIO_GUEST_CPUTEST");
    /// Drives the test device 1234:11e9 (BARs, unassigned MMIO, mmap, ioeventfd, MSI).
    pub const PCITEST: &str = env!("NESTIO_GUEST_PCITEST");
    /// Guest driver for the nestio sample device; `mode=check|msix|spin|halt|bench`.
    pub const SAMPLETEST: &str = env!("NESTIO_GUEST_SAMPLETEST");
    /// Guest e1000 driver: ARP + ICMP echo to 10.0.2.2; `irq=intx|msi`.
    pub const E1000PING: &str = env!("NESTIO_GUEST_E1000PING");
    /// Makes PAPR hypercalls through the hypercall port and checks their return codes
    /// (see `crates/vmm/tests/hypercall.rs` for the handlers it expects).
    pub const HCALLTEST: &str = env!("NESTIO_GUEST_HCALLTEST");
    /// Brings up every vCPU with INIT/SIPI and counts those that ran code
    /// (`cpus=N`, `after=exit|spin|reset`, `ap=halt|spin|exit|fault`).
    pub const SMPTEST: &str = env!("NESTIO_GUEST_SMPTEST");
    /// Drives an FSL-MC DPRC container through its portals (`{fsl-mc}` on the command
    /// line): scan, open every object, commands, bad statuses, an interrupt, reset.
    pub const FSLMCTEST: &str = env!("NESTIO_GUEST_FSLMCTEST");
    /// XIVE from an x86 guest on 2 vCPUs (`--irqchip xive`): queues by hypercall, IPI
    /// ping-pong, the e1000's INTx routed to each vCPU (`rounds=N`).
    pub const XIVETEST: &str = env!("NESTIO_GUEST_XIVETEST");
}
