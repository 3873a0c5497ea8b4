//! Building and running a VM: KVM, memfd RAM, in-kernel irqchip, buses, console, PCI,
//! assigned devices, the CPU model, what to boot ([`Boot`]); then one thread per vCPU
//! and the control loop that watches for SIGINT, stop requests and dead devices.
//!
//! Several vCPUs ([`VmConfig::cpus`], at most [`MAX_VCPUS`]): vCPU `i` has local APIC ID
//! `i` and its own CPUID ([`crate::cpu::set_topology`]: one package of single-thread
//! cores). vCPU 0 is the bootstrap processor and starts at the entry point; the others
//! are application processors left in KVM's `UNINITIALIZED` state: each blocks inside
//! KVM_RUN until the guest's INIT / STARTUP IPIs, which the in-kernel LAPIC delivers, and
//! then starts in real mode at the SIPI vector's page. Linux finds the processors in the
//! MP table (one entry per vCPU). When any vCPU stops (exit port, reset, error), the VM
//! stops: the others are kicked out of KVM_RUN ([`crate::vcpu::VcpuControl`]) and every
//! thread is joined; the first vCPU to stop for a reason other than the stop request
//! gives the outcome. [`VmHandle::pause`] / [`VmHandle::resume`] park and release all
//! vCPUs (for migration and consistent snapshots).
//!
//! The platform's shared services are built once and handed to the buses: the
//! interrupt controller ([`crate::irqchip::x86::KvmIrqChip`] behind
//! [`crate::irqchip::IrqChip`]), the DMA domain ([`crate::iommu::IdentityDomain`]: no
//! vIOMMU) and the region mapper ([`crate::region_map::RegionMapper`]). Each device is
//! attached by its VFIO flags: PCI devices to the PCI root in slot order, platform /
//! AMBA / FSL-MC devices to the [`crate::platform::PlatformBus`]; any other device is
//! refused ([`VmError::UnsupportedDevice`]).
//!
//! Two kinds of guest ([`Boot`]): a `no_std` payload entered in 64-bit mode (see the
//! crate documentation), or a Linux kernel ([`crate::linux`]). For Linux the machine
//! also gets what the kernel expects of a PC without firmware tables beyond the MP
//! table: CPUID with the TSC-deadline timer ([`crate::linux::platform::linux_cpuid`]),
//! PCI INTx on 8259 lines marked level-triggered in the ELCR
//! ([`crate::irqchip::x86::IntxRouting::Pic`]; the line is in each device's interrupt-line
//! register and in the MP table), and the kernel loaded with its initrd and command
//! line; with [`VmConfig::acpi`] also the ACPI tables of [`crate::acpi`] and their PM1
//! ports at 0x600 (ACPI S5 ends the VM as [`StopReason::Halted`]). Both kinds share the rest: the in-kernel PIC/IOAPIC/LAPIC and PIT, the 16550
//! at 0x3f8 on IRQ 4, the keyboard controller's status port 0x64 (reads 0: "input
//! buffer empty", so Linux's `reboot=k` writes its 0xFE reset at once), port 0x80
//! (POST codes / I/O delay: ignored), the debug-exit port 0xf4 (the exit status) and
//! the PCI host bridge 00:00.0 with BARs assigned below 4 GiB.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use nestio_device_model::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::bus::{Bus, BusDevice, BusError, BusFault, BusRange};
use crate::cpu::{CpuModel, CpuState, HostSplitLockPolicy};
use crate::hypercall::Hypercalls;
use crate::iommu::{DmaDomain, GuestRamFile, IdentityDomain};
use crate::irqchip::x86::{IntxRouting, KvmIrqChip};
use crate::irqchip::{IrqChip, IrqChipError, SourceRequest};
use crate::linux::mptable::PciIntxRoute;
use crate::linux::platform::{self, PlatformError};
use crate::linux::{LinuxBootError, LinuxLayout};
use crate::memory::{GuestRam, MemoryError};
use crate::pci::{PciHostError, PciRoot};
use crate::platform::{PlatformBus, PlatformDeviceError, PlatformMmioAllocator, PLATFORM_FLAGS};
use crate::region_map::RegionMapper;
use crate::serial::{self, ConsoleOutput, SerialConsole};
use crate::serial_input::{ConsoleInput, InputPump};
use crate::threads::{ThreadHooks, ThreadRole};
use crate::vcpu::{
    install_kick_handler, ExitStats, PauseError, StopReason, Vcpu, VcpuContext, VcpuControl,
    VcpuError, VcpuSnapshot,
};

/// The most vCPUs a VM may have (`--cpus`): within the xAPIC's 8-bit IDs and the MP
/// table's limit, and what the test kernel is configured for many times over.
pub const MAX_VCPUS: u8 = 32;

/// A device to assign to the guest as a PCI function.
#[derive(Clone)]
pub enum DeviceConfig {
    /// A device served by another process over vfio-user at this socket.
    VfioUser {
        /// The server's UNIX socket.
        socket: PathBuf,
    },
    /// [`DeviceConfig::VfioUser`] with options other than the defaults
    /// (`vfio-user=PATH,posted-writes=off`; see [`crate::remote`]).
    VfioUserWith {
        /// The server's UNIX socket.
        socket: PathBuf,
        /// Per-device options.
        options: crate::remote::RemoteOptions,
    },
    /// A device object in this process (wired exactly like a remote one).
    Local {
        /// Name used in messages.
        name: String,
        /// The device.
        device: Arc<dyn VfioDevice>,
    },
    /// A vfio-user session the caller opened itself (e.g. the innermost nesting level,
    /// whose session is wrapped in a BAR channel), with the session's nested-IOMMU
    /// port when it negotiated nestio's extension (`--viommu smmuv3,mode=nested`).
    Connected {
        /// Name used in messages.
        name: String,
        /// The device (the session, possibly wrapped).
        device: Arc<dyn VfioDevice>,
        /// The session's nested-IOMMU port; None: the vIOMMU shadows this device.
        nested: Option<Arc<dyn crate::iommu::smmuv3::NestedIommuPort>>,
    },
}

impl std::fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceConfig::VfioUser { socket } => write!(f, "vfio-user={}", socket.display()),
            DeviceConfig::VfioUserWith { socket, options } => {
                write!(f, "vfio-user={} {options:?}", socket.display())
            }
            DeviceConfig::Local { name, .. } => write!(f, "local {name}"),
            DeviceConfig::Connected { name, nested, .. } => {
                write!(f, "connected {name} (nested iommu: {})", nested.is_some())
            }
        }
    }
}

/// Errors of command-line values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `--device` value that is not understood.
    #[error("{0}")]
    Device(String),
    /// A size that is not understood.
    #[error("invalid size {0:?}: use a number with an optional K, M or G suffix (e.g. 64M)")]
    Size(String),
    /// A vCPU count that is not understood or out of range.
    #[error("invalid vCPU count {0:?}: use a number from 1 to {MAX_VCPUS}")]
    Cpus(String),
}

/// Parse a vCPU count (`--cpus`): 1 ..= [`MAX_VCPUS`].
pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    match s.trim().parse::<u8>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(ConfigError::Cpus(s.into())),
    }
}

impl std::str::FromStr for DeviceConfig {
    type Err = ConfigError;
    /// `vfio-user=PATH[,posted-writes=on|off]` (defaults give [`DeviceConfig::VfioUser`]).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match crate::remote::parse_spec(s) {
            Ok((socket, options)) if options == crate::remote::RemoteOptions::default() => {
                Ok(DeviceConfig::VfioUser { socket })
            }
            Ok((socket, options)) => Ok(DeviceConfig::VfioUserWith { socket, options }),
            Err(e) => Err(ConfigError::Device(e.to_string())),
        }
    }
}

/// Parse a memory size: bytes, or with a K/M/G suffix (binary units): `64M`, `1G`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| ConfigError::Size(s.into()))
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// A `no_std` guest payload (static x86-64 ELF, linked at or above 2 MiB), entered
    /// in 64-bit mode with `rdi` = RAM size, `rsi` = [`VmConfig::cmdline`].
    Payload(PathBuf),
    /// A Linux kernel (`vmlinux` with a PVH note, or a `bzImage`), with an optional
    /// initrd; [`VmConfig::cmdline`] is the kernel command line.
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// The initial RAM disk (an uncompressed or compressed cpio archive).
        initrd: Option<PathBuf>,
    },
}

/// The default kernel command line of `nestio run --kernel`: the platform's base line
/// plus the nestio guest init's ping mode (see `linux/README.md`).
pub fn default_linux_cmdline() -> String {
    format!("{} nestio.mode=ping", platform::BASE_CMDLINE)
}

/// Whether [`VmConfig::linux`] turns ACPI on (`nestio run --kernel` without `--acpi`).
pub const DEFAULT_LINUX_ACPI: bool = true;

/// Everything `nestio run` needs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// What to boot.
    pub boot: Boot,
    /// RAM size in bytes (multiple of 2 MiB, 4 MiB ..= 3 GiB).
    pub memory: u64,
    /// Hypercall and RTAS handlers the guest reaches through the hypercall port
    /// ([`crate::hypercall`]); the VM adds the virtual terminal where these leave its
    /// opcodes free.
    pub hypercalls: Hypercalls,
    /// Assigned devices, in PCI slot order (00:01.0, 00:02.0, ...).
    pub devices: Vec<DeviceConfig>,
    /// The CPU model (`--cpu`).
    pub cpu: CpuModel,
    /// Number of vCPUs (`--cpus`, 1 ..= [`MAX_VCPUS`]); their local APIC IDs are
    /// `0..cpus`, 0 being the boot processor (the MP table and an ACPI MADT list them).
    pub cpus: u8,
    /// Where the serial console goes.
    pub console: ConsoleOutput,
    /// What the serial console receives (`--console-input`; none by default).
    pub console_input: ConsoleInput,
    /// Stop cleanly on SIGINT (the CLI sets this; embedders may handle signals themselves).
    pub handle_sigint: bool,
    /// The payload's command line (at most 4095 bytes; `nestio_guest::cmdline()`), or
    /// the Linux kernel command line (at most 2047 bytes for a vmlinux).
    pub cmdline: String,
    /// Take guest RAM from this file window instead of a fresh memfd (a nested level's
    /// RAM handed down by its parent, `--memory-from`); its size is [`VmConfig::memory`].
    pub ram_file: Option<RamFile>,
    /// Keep the top N bytes of fresh RAM in a memfd of their own
    /// ([`GuestRam::with_window`]): a nesting level's child window, handed down alone.
    /// Not with `ram_file` (a received file cannot be split) nor with assigned devices.
    pub ram_window: Option<u64>,
    /// Called by each VMM thread with its role as it starts (e.g. to install a seccomp
    /// filter per thread; see [`crate::threads`]).
    pub thread_hooks: ThreadHooks,
    /// Linux only: also describe the machine with ACPI tables (`--acpi on|off`; see
    /// [`crate::acpi`]); a guest power-off through ACPI S5 then ends the VM with status 0.
    pub acpi: bool,
    /// The interrupt controller (`--irqchip x86|xive`; x86 by default).
    pub irqchip: crate::irqchip::IrqChipKind,
    /// A vIOMMU for the assigned devices (`--viommu`; None: IOVA = GPA, all RAM).
    pub viommu: Option<crate::iommu::smmuv3::Viommu>,
    /// The platform's DMA domain (a vIOMMU such as [`crate::iommu::tce::TceIommu`]);
    /// `None`: every device reaches all of guest RAM at IOVA = GPA.
    pub dma_domain: Option<crate::iommu::DmaDomainFactory>,
}

/// KVM memory slot of the second and later [`crate::memory::RamPart`]s (the PCI slot
/// allocator stops below it).
const RAM_EXTRA_SLOT: u32 = 500;

/// A window of a RAM file that becomes this VM's guest RAM: file offsets
/// `offset..offset + VmConfig::memory` are guest physical `0..`.
#[derive(Debug, Clone)]
pub struct RamFile {
    /// The file (the parent level's RAM memfd).
    pub fd: Arc<std::os::fd::OwnedFd>,
    /// File offset of guest physical 0.
    pub offset: u64,
}

impl VmConfig {
    /// A payload config with defaults: 64 MiB, one vCPU, no devices, default CPU, console on
    /// stdout, empty command line.
    pub fn new(payload: impl Into<PathBuf>) -> Self {
        VmConfig {
            boot: Boot::Payload(payload.into()),
            memory: 64 << 20,
            hypercalls: Hypercalls::new(),
            devices: Vec::new(),
            cpu: CpuModel::default(),
            cpus: 1,
            console: ConsoleOutput::Stdout,
            console_input: ConsoleInput::None,
            handle_sigint: false,
            cmdline: String::new(),
            ram_file: None,
            ram_window: None,
            irqchip: crate::irqchip::IrqChipKind::default(),
            thread_hooks: ThreadHooks::default(),
            acpi: false,
            viommu: None,
            dma_domain: None,
        }
    }

    /// A Linux config with defaults: 128 MiB, one vCPU, no devices, default CPU, console on
    /// stdout, [`default_linux_cmdline`].
    pub fn linux(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> Self {
        VmConfig {
            boot: Boot::Linux {
                kernel: kernel.into(),
                initrd,
            },
            memory: 128 << 20,
            cmdline: default_linux_cmdline(),
            acpi: DEFAULT_LINUX_ACPI,
            ..VmConfig::new(PathBuf::new())
        }
    }
}

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    NoKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed during setup.
    #[error("KVM setup failed at {what}: {err}")]
    Kvm {
        /// Step.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading / machine setup.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Loading a Linux kernel.
    #[error(transparent)]
    Linux(#[from] LinuxBootError),
    /// Platform settings for a Linux guest.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// Bus layout.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// PCI / device wiring.
    #[error(transparent)]
    Pci(#[from] PciHostError),
    /// The interrupt controller.
    #[error("interrupt controller: {0}")]
    Irq(#[from] IrqChipError),
    /// Platform (non-PCI) device wiring.
    #[error(transparent)]
    PlatformDevice(#[from] PlatformDeviceError),
    /// The vIOMMU.
    #[error(transparent)]
    Smmuv3(#[from] crate::iommu::smmuv3::Smmuv3Error),
    /// Two DMA domains asked for at once.
    #[error("a VM has one DMA domain: --viommu smmuv3 and a platform DMA domain (the sPAPR TCE IOMMU) cannot both be set; choose one")]
    TwoDmaDomains,
    /// A device of a type the VMM cannot attach.
    #[error("cannot attach {device}: it is neither a PCI nor a platform device (VFIO device flags {flags:#x}); nestio attaches VFIO PCI, platform, AMBA and FSL-MC devices")]
    UnsupportedDevice {
        /// Device.
        device: String,
        /// Its VFIO device flags.
        flags: u32,
    },
    /// The vCPU stopped with an error.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An assigned device died while the guest was waiting for it.
    #[error("device {device} is gone: {message}; the VM was stopped")]
    DeviceLost {
        /// Device name.
        device: String,
        /// What was observed.
        message: String,
    },
    /// Thread trouble.
    #[error("the vCPU thread failed: {0}")]
    Thread(String),
    /// A vCPU count out of range.
    #[error("cannot run {asked} vCPUs: this VMM supports 1 to {max} (KVM on this host: {kvm}); use a smaller --cpus")]
    Cpus {
        /// Requested.
        asked: u8,
        /// [`MAX_VCPUS`].
        max: u8,
        /// KVM_CAP_MAX_VCPUS of this host.
        kvm: usize,
    },
}

/// How a VM ended.
#[derive(Debug)]
pub struct VmReport {
    /// The stop reason.
    pub outcome: StopReason,
    /// Exit counters.
    pub stats: Arc<ExitStats>,
    /// The boot vCPU's state at the end (CPU model included).
    pub snapshot: Option<VcpuSnapshot>,
    /// Which vCPU gave the outcome (the first to stop for its own reason; 0 when all
    /// stopped on request).
    pub vcpu: u8,
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSnapshot")
            .field("rip", &self.regs.rip)
            .field("cpu", &self.cpu)
            .finish()
    }
}

impl VmReport {
    /// The exit status for the VMM process: the guest's status, 130 after SIGINT, 0 on
    /// halt or reset.
    pub fn exit_status(&self) -> i32 {
        match self.outcome {
            StopReason::GuestExit(c) => c as i32,
            StopReason::Interrupted => 130,
            StopReason::Halted | StopReason::Reset => 0,
        }
    }
}

/// Controls a running VM from another thread: stop, pause, resume.
#[derive(Clone)]
pub struct VmHandle {
    control: Arc<VcpuControl>,
}

impl VmHandle {
    /// Request a stop; `run` returns `StopReason::Interrupted` shortly after (every vCPU
    /// thread is kicked out of KVM_RUN, paused ones are released).
    pub fn stop(&self) {
        self.control.request_stop();
    }

    /// Pause every vCPU: returns once all of them are out of KVM_RUN and parked, so the
    /// guest executes nothing until [`Self::resume`] (devices served by other threads or
    /// processes keep running). Waits at most `timeout`; fails if the VM is not running
    /// or stops meanwhile (see [`PauseError`]).
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        self.control.pause(timeout)
    }

    /// Let the vCPUs run again after [`Self::pause`] (no effect otherwise).
    pub fn resume(&self) {
        self.control.resume()
    }

    /// True while paused (or a pause is pending).
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }
}

/// A built VM, ready to run.
///
/// Fields drop in order: the vCPUs and the devices first, then the VM fd, guest RAM last.
pub struct Vm {
    vcpus: Vec<Vcpu>,
    pci: Arc<PciRoot>,
    platform: Arc<PlatformBus>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    control: Arc<VcpuControl>,
    /// Set by the ACPI PM device when the guest enters S5.
    powered_off: Arc<AtomicBool>,
    stats: Arc<ExitStats>,
    handle_sigint: bool,
    serial: Arc<SerialConsole>,
    console_input: ConsoleInput,
    ram: GuestRam,
    thread_hooks: ThreadHooks,
    xive: Option<Arc<crate::irqchip::xive::XiveIrqChip>>,
}

/// Port range of the PCI configuration mechanism #1.
const PCI_CONFIG_PORT: u64 = 0xcf8;
/// POST code / I/O delay port.
const POST_PORT: u64 = 0x80;

/// The keyboard controller's status port (0x64): reads 0 (output buffer empty, input
/// buffer empty), so a guest waiting to send a command (Linux `reboot=k` polls bit 1
/// before writing 0xFE) goes on at once; the 0xFE write itself is the vCPU's reset
/// exit. Other writes are ignored.
struct KeyboardStatus;

impl BusDevice for KeyboardStatus {
    fn read(&self, _offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        data.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> Result<(), BusFault> {
        Ok(())
    }
}

/// Port 0x80: POST codes and Linux's I/O delay writes; ignored (logged at trace level).
struct PostCode;

impl BusDevice for PostCode {
    fn read(&self, _offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        data.fill(0xff);
        Ok(())
    }
    fn write(&self, _offset: u64, data: &[u8]) -> Result<(), BusFault> {
        tracing::trace!(code = ?data, "port 0x80");
        Ok(())
    }
}
/// KVM's TSS area (Intel needs it below 4 GiB, outside RAM).
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// The CPU model MSR filter and bus-lock exits.
const KVM_CAP_X86_BUS_LOCK_EXIT: u64 = 193;

static SIGINT_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    SIGINT_SEEN.store(true, Ordering::SeqCst);
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

impl Vm {
    /// Build the VM described by `cfg`.
    pub fn new(cfg: VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let kvm_max = kvm.get_max_vcpus();
        if cfg.cpus == 0 || cfg.cpus > MAX_VCPUS || usize::from(cfg.cpus) > kvm_max {
            return Err(VmError::Cpus {
                asked: cfg.cpus,
                max: MAX_VCPUS,
                kvm: kvm_max,
            });
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        if let Ok(list) = kvm.get_msr_index_list() {
            crate::vcpu::set_migration_msrs(list.as_slice());
        }
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let ram = match (&cfg.ram_file, cfg.ram_window) {
            (Some(f), _) => GuestRam::from_file(f.fd.clone(), f.offset, cfg.memory)?,
            (None, Some(w)) if cfg.devices.is_empty() => GuestRam::with_window(cfg.memory, w)?,
            (None, Some(w)) => {
                return Err(MemoryError::BadWindow {
                    offset: cfg.memory.wrapping_sub(w),
                    size: w,
                    reason: "a VM with assigned devices maps its RAM as one file".into(),
                }
                .into())
            }
            (None, None) => GuestRam::new(cfg.memory)?,
        };
        for (i, part) in ram.parts().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: if i == 0 {
                    0
                } else {
                    RAM_EXTRA_SLOT + i as u32 - 1
                },
                flags: 0,
                guest_phys_addr: part.gpa,
                memory_size: part.size,
                userspace_addr: ram.host_address_of(part.gpa),
            };
            // SAFETY: the region maps part of `ram`, which the Vm owns and keeps alive
            // longer than the VM fd's use of it (fields drop in order; the vCPU is joined
            // in `run`).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (RAM)"))?;
        }

        setup_msr_exits(&vm)?;
        if vm.check_extension_raw(KVM_CAP_X86_BUS_LOCK_EXIT) as u32
            & kvm_bindings::KVM_BUS_LOCK_DETECTION_EXIT
            != 0
        {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_X86_BUS_LOCK_EXIT as u32,
                ..Default::default()
            };
            cap.args[0] = kvm_bindings::KVM_BUS_LOCK_DETECTION_EXIT as u64;
            if let Err(e) = vm.enable_cap(&cap) {
                tracing::info!(error = %e, "bus-lock exits not available");
            }
        }

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());

        let is_linux = matches!(cfg.boot, Boot::Linux { .. });
        let intx = if is_linux {
            IntxRouting::Pic
        } else {
            IntxRouting::Ioapic
        };
        let xive = match cfg.irqchip {
            crate::irqchip::IrqChipKind::Xive => {
                let mem = crate::irqchip::xive::VmXiveMemory::new(ram.memory().clone());
                let x = crate::irqchip::xive::XiveIrqChip::new(
                    vm.clone(),
                    Arc::new(mem),
                    u32::from(cfg.cpus),
                )?;
                x.attach_mmio(&mmio)?;
                Some(x)
            }
            crate::irqchip::IrqChipKind::X86 => None,
        };
        let irqchip: Arc<dyn IrqChip> = match &xive {
            Some(x) => x.clone(),
            None => Arc::new(KvmIrqChip::new(vm.clone(), intx)?),
        };

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm {
            what: "eventfd for the serial IRQ",
            err: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        let serial_source = irqchip.allocate(SourceRequest::Line(serial::SERIAL_GSI))?;
        irqchip.attach(serial_source, &serial_irq, None)?;
        let serial = Arc::new(SerialConsole::new(serial_irq, cfg.console.clone()));
        pio.insert(
            BusRange::new(serial::SERIAL_PORT as u64, serial::SERIAL_PORTS)?,
            serial.clone(),
        )?;

        pio.insert(
            BusRange::new(u64::from(crate::vcpu::RESET_PORT), 1)?,
            Arc::new(KeyboardStatus),
        )?;
        pio.insert(BusRange::new(POST_PORT, 1)?, Arc::new(PostCode))?;

        let mapper = RegionMapper::new(vm.clone(), pio.clone(), mmio.clone());
        // Without a vIOMMU every device reaches all of guest RAM at IOVA = GPA.
        let mut window = PlatformMmioAllocator::default_window();
        let (dma, smmu) = viommu_domain(&cfg, &ram, &mmio, &mut window)?;
        let pci = PciRoot::new(irqchip.clone(), mapper.clone(), dma.clone());
        let platform_bus = Arc::new(PlatformBus::new(irqchip.clone(), mapper, dma, window));
        pio.insert(BusRange::new(PCI_CONFIG_PORT, 8)?, pci.config_io())?;
        mmio.insert(
            BusRange::new(crate::pci::ECAM_BASE, crate::pci::ECAM_SIZE)?,
            pci.ecam(),
        )?;
        let nested = cfg.viommu == Some(crate::iommu::smmuv3::Viommu::Smmuv3Nested);
        let mut ports = attach_devices(&cfg.devices, &pci, &platform_bus, nested)?;
        if let Some(smmu) = &smmu {
            for d in pci.devices() {
                let stream = crate::iommu::StreamId::pci(0, d.slot(), 0);
                match ports.remove(&d.slot()) {
                    Some(port) => {
                        smmu.add_nested_stream(stream, port)?;
                    }
                    None => smmu.add_stream(stream)?,
                }
            }
        }

        let mem = ram.memory().clone();
        let control = VcpuControl::new();
        let powered_off = Arc::new(AtomicBool::new(false));
        let mut fds = Vec::with_capacity(usize::from(cfg.cpus));
        for id in 0..cfg.cpus {
            fds.push(
                vm.create_vcpu(u64::from(id))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?,
            );
        }
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        cfg.cpu.apply_cpuid(&mut cpuid);
        if matches!(cfg.boot, Boot::Linux { .. }) {
            platform::linux_cpuid(&mut cpuid)?;
        }
        if cfg.cpus > 1 {
            // Measured: with KVM's PV IPI / TLB-flush / spinlock-kick hypercalls offered,
            // Linux 6.1 hung at SMP bring-up on this project's CI host (vCPU 1 in
            // __send_ipi_mask, vCPU 0 in queued_spin_lock_slowpath); the LAPIC path works.
            crate::cpu::hide_pv_ipi(&mut cpuid);
        }
        for (id, fd) in (0u8..).zip(&fds) {
            let mut own = cpuid.clone();
            crate::cpu::set_topology(&mut own, id, cfg.cpus);
            fd.set_cpuid2(&own).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if id != 0 {
                // An application processor waits for INIT / STARTUP from the guest (KVM
                // makes every vCPU but the BSP so with an in-kernel LAPIC; said here
                // explicitly).
                fd.set_mp_state(kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
                })
                .map_err(kvm_err("KVM_SET_MP_STATE (application processor)"))?;
            }
        }
        let fd = &fds[0];
        match &cfg.boot {
            Boot::Payload(payload) => {
                boot::write_tables(&mem)?;
                let cmdline = crate::platform::fsl_mc::expand_cmdline(&cfg.cmdline, &platform_bus);
                boot::write_cmdline(&mem, &cmdline)?;
                let entry = boot::load_elf(&mem, payload)?;
                boot::setup_vcpu(fd, entry, ram.size())?;
            }
            Boot::Linux { kernel, initrd } => {
                let routes = linux_intx_routes(&pci)?;
                let lines: Vec<u8> = routes.iter().map(|r| r.irq).collect();
                platform::set_pic_level_triggered(&vm, &lines)?;
                let acpi = if cfg.acpi {
                    // The PM1 ports of the FADT; S5 there is a clean power-off.
                    let (control, off) = (control.clone(), powered_off.clone());
                    let pm = crate::acpi::pm::PmRegisters::new(move || {
                        off.store(true, Ordering::SeqCst);
                        control.request_stop();
                    });
                    let ports = BusRange::new(crate::acpi::PM_BASE.into(), crate::acpi::PM_LEN)?;
                    pio.insert(ports, Arc::new(pm))?;
                    Some(
                        crate::acpi::AcpiConfig::new(usize::from(cfg.cpus), intx)
                            .map_err(LinuxBootError::from)?,
                    )
                } else {
                    None
                };
                let layout = LinuxLayout {
                    pci_intx: routes,
                    acpi,
                    cpus: usize::from(cfg.cpus),
                    ..LinuxLayout::default()
                };
                let lb = crate::linux::load_linux(
                    &mem,
                    ram.size(),
                    kernel,
                    initrd.as_deref(),
                    &cfg.cmdline,
                    &layout,
                )?;
                lb.setup_vcpu(fd)?;
            }
        }

        let mut hypercalls = cfg.hypercalls.clone();
        crate::hypercall::console::register_default(&mut hypercalls, serial.clone());
        if let Some(x) = &xive {
            crate::hypercall::xive::register(&mut hypercalls, x.model().clone())
                .and_then(|()| crate::hypercall::xive::register_cede(&mut hypercalls, x.clone()))
                .map_err(|e| IrqChipError::Invalid {
                    chip: "xive",
                    reason: e.to_string(),
                })?;
        }
        let run_size = kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        let stats = Arc::new(ExitStats::default());
        let hypercalls = Arc::new(hypercalls);
        let policy = HostSplitLockPolicy::detect();
        let vcpus = (0u8..)
            .zip(fds)
            .map(|(index, fd)| {
                let ctx = VcpuContext {
                    pio: pio.clone(),
                    mmio: mmio.clone(),
                    cpu: cfg.cpu,
                    policy: policy.clone(),
                    mem: mem.clone(),
                    control: control.clone(),
                    index,
                    stats: stats.clone(),
                    run_size,
                    hypercalls: hypercalls.clone(),
                };
                Vcpu::new(fd, ctx)
            })
            .collect();
        Ok(Vm {
            _kvm: kvm,
            vm,
            ram,
            vcpus,
            control,
            powered_off,
            stats,
            pci,
            platform: platform_bus,
            handle_sigint: cfg.handle_sigint,
            serial,
            console_input: cfg.console_input,
            thread_hooks: cfg.thread_hooks,
            xive,
        })
    }

    /// The XIVE interrupt controller, when [`VmConfig::irqchip`] chose it.
    pub fn xive(&self) -> Option<&Arc<crate::irqchip::xive::XiveIrqChip>> {
        self.xive.as_ref()
    }

    /// A handle to stop the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            control: self.control.clone(),
        }
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// vCPU `i` (None while running or out of range).
    pub fn vcpu(&self, i: usize) -> Option<&Vcpu> {
        self.vcpus.get(i)
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The PCI root (assigned devices, for inspection).
    pub fn pci(&self) -> &Arc<PciRoot> {
        &self.pci
    }

    /// The platform (non-PCI) devices, for inspection: where each landed.
    pub fn platform(&self) -> &Arc<PlatformBus> {
        &self.platform
    }

    /// The boot vCPU (None while running).
    pub fn vcpu_mut(&mut self) -> Option<&mut Vcpu> {
        self.vcpus.first_mut()
    }

    /// Run until the guest exits, a stop is requested, or something fails (on any
    /// vCPU: the others are stopped and every vCPU thread is joined before it returns).
    pub fn run(&mut self) -> Result<VmReport, VmError> {
        if self.vcpus.is_empty() {
            return Err(VmError::Thread("the VM has already run".into()));
        }
        let vcpus = std::mem::take(&mut self.vcpus);
        let n = vcpus.len();
        install_kick_handler();
        // Console input runs while the vCPUs do; stopped (terminal restored) below.
        let hooks = self.thread_hooks.clone();
        let input = InputPump::start(
            std::mem::take(&mut self.console_input),
            self.serial.clone(),
            hooks.clone(),
        )
        .map_err(|e| VmError::Thread(format!("cannot start the console input: {e}")))?;
        let old_sigint = if self.handle_sigint {
            SIGINT_SEEN.store(false, Ordering::SeqCst);
            Some(set_sigint_handler(on_sigint as *const () as usize))
        } else {
            None
        };
        let (tx, rx) = mpsc::channel::<usize>();
        self.control.begin(n);
        let mut threads = Vec::with_capacity(n);
        let mut spawn_error = None;
        for (i, mut vcpu) in vcpus.into_iter().enumerate() {
            let tx = tx.clone();
            let control = self.control.clone();
            let hooks = hooks.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    hooks.enter(ThreadRole::Vcpu(i as u32));
                    control.enter();
                    let r = vcpu.run();
                    control.leave();
                    let _ = tx.send(i);
                    (vcpu, r)
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(VmError::Thread(e.to_string()));
                    // The threads already started stop; the rest never run.
                    self.control.request_stop();
                    for _ in threads.len()..n {
                        self.control.leave();
                    }
                    break;
                }
            }
        }
        drop(tx);
        self.thread_hooks.enter(ThreadRole::Control);
        let mut lost: Option<VmError> = None;
        let mut order: Vec<usize> = Vec::with_capacity(n);
        while order.len() < threads.len() {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(i) => {
                    order.push(i);
                    // One vCPU stopped: the VM stops.
                    self.control.request_stop();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if self.handle_sigint && SIGINT_SEEN.load(Ordering::SeqCst) {
                self.control.request_stop();
            }
            if lost.is_none() {
                let dead = self.pci.check_devices();
                if let Some((device, message)) = dead.or_else(|| self.platform.check_devices()) {
                    lost = Some(VmError::DeviceLost { device, message });
                    self.control.request_stop();
                }
            }
            if self.control.stop_requested() {
                // Again, for a vCPU busy in a device access when the first kick came.
                self.control.kick_all();
            }
        }
        let mut results: Vec<Option<Result<StopReason, VcpuError>>> = Vec::new();
        let mut panicked = false;
        for t in threads {
            match t.join() {
                Ok((vcpu, r)) => {
                    self.vcpus.push(vcpu);
                    results.push(Some(r));
                }
                Err(_) => {
                    panicked = true;
                    results.push(None);
                }
            }
        }
        if let Some(p) = input {
            p.stop();
        }
        if let Some(old) = old_sigint {
            set_sigint_handler(old);
        }
        if let Some(e) = spawn_error {
            return Err(e);
        }
        if panicked {
            return Err(VmError::Thread("a vCPU thread panicked".into()));
        }
        let snapshot = self.vcpus.first().and_then(|v| v.save().ok());
        // The first vCPU that stopped for its own reason gives the outcome.
        let mut outcome = None;
        for &i in &order {
            match results.get_mut(i).and_then(Option::take) {
                Some(Ok(StopReason::Interrupted)) | None => {}
                Some(r) => {
                    outcome = Some((i, r));
                    break;
                }
            }
        }
        let (vcpu, outcome) = match (outcome, lost) {
            (Some((i, Ok(r))), _) => (i, r),
            (Some((i, Err(e))), _) => {
                tracing::error!(vcpu = i, error = %e, "vCPU failed; the VM was stopped");
                return Err(e.into());
            }
            (None, Some(e)) => return Err(e),
            (None, None) => (0, StopReason::Interrupted),
        };
        // An ACPI power-off stops the vCPU through the stop flag: report it as the
        // guest's own halt (status 0), not as an interruption.
        let outcome = match outcome {
            StopReason::Interrupted if self.powered_off.load(Ordering::SeqCst) => {
                StopReason::Halted
            }
            r => r,
        };
        Ok(VmReport {
            outcome,
            stats: self.stats.clone(),
            snapshot,
            vcpu: u8::try_from(vcpu).unwrap_or(u8::MAX),
        })
    }

    /// The source side of a live migration of this VM ([`crate::migration`]): take it
    /// before [`Vm::run`] and call [`crate::migration::MigrationSource::migrate`] from
    /// another thread while the VM runs. One per VM.
    pub fn migration_source(&self) -> crate::migration::MigrationSource {
        let slots = self
            .ram
            .parts()
            .iter()
            .enumerate()
            .map(|(i, part)| crate::migration::RamSlot {
                slot: if i == 0 {
                    0
                } else {
                    RAM_EXTRA_SLOT + i as u32 - 1
                },
                gpa: part.gpa,
                size: part.size,
                host: self.ram.host_address_of(part.gpa),
            })
            .collect();
        crate::migration::MigrationSource {
            vm: self.vm.clone(),
            mem: self.ram.memory().clone(),
            memory: self.ram.size(),
            slots,
            control: self.control.clone(),
            pci: self.pci.clone(),
            serial: self.serial.clone(),
            cpus: self.vcpus.len(),
            migrated: Arc::new(AtomicBool::new(false)),
            busy: Arc::new(AtomicBool::new(false)),
            platform_devices: self
                .platform
                .devices()
                .iter()
                .map(|d| d.name().to_string())
                .collect(),
        }
    }

    /// Load an incoming migration from `stream` before the VM first runs (the
    /// destination, `nestio run --migrate-listen`), then answer the source; see
    /// [`crate::migration`]. On error nothing of the guest runs here.
    pub fn receive_migration<S: std::io::Read + std::io::Write>(
        &mut self,
        stream: &mut S,
    ) -> Result<crate::migration::IncomingReport, crate::migration::MigrationError> {
        if self.vcpus.is_empty() {
            return Err(crate::migration::MigrationError::State(
                "the VM has already run: receive a migration into a fresh VM".into(),
            ));
        }
        let mut dest = crate::migration::Destination {
            vm: &self.vm,
            mem: self.ram.memory(),
            memory: self.ram.size(),
            vcpus: &mut self.vcpus,
            pci: &self.pci,
            serial: &self.serial,
        };
        dest.receive(stream)
    }

    /// The CPU model state of the boot vCPU (when not running).
    pub fn cpu_state(&self) -> Option<CpuState> {
        self.vcpus.first().map(|v| v.cpu_state())
    }
}

/// Attach each configured device where its VFIO flags say it belongs: PCI devices at
/// 00:01.0, 00:02.0, ... in order; platform / AMBA / FSL-MC devices in the platform
/// MMIO window.
/// The DMA domain of the machine: identity without a vIOMMU; with `--viommu smmuv3`
/// a shadow domain driven by an SMMUv3 placed first in the platform MMIO window.
#[allow(clippy::type_complexity)]
fn viommu_domain(
    cfg: &VmConfig,
    ram: &GuestRam,
    mmio: &Arc<Bus>,
    window: &mut PlatformMmioAllocator,
) -> Result<
    (
        Arc<dyn DmaDomain>,
        Option<Arc<crate::iommu::smmuv3::Smmuv3>>,
    ),
    VmError,
> {
    use crate::iommu::smmuv3::{GuestRamView, Smmuv3, Viommu};
    match cfg.viommu {
        // The platform's own DMA domain (a TCE IOMMU), or IOVA = GPA over all RAM.
        None => Ok((
            match &cfg.dma_domain {
                Some(f) => f.build(GuestRamFile::of(ram)),
                None => Arc::new(IdentityDomain::new(GuestRamFile::of(ram))),
            },
            None,
        )),
        Some(_) if cfg.dma_domain.is_some() => Err(VmError::TwoDmaDomains),
        Some(mode @ (Viommu::Smmuv3 | Viommu::Smmuv3Nested)) => {
            let shadow = Arc::new(crate::iommu::ShadowDomain::new(GuestRamFile::of(ram)));
            let smmu = Arc::new(Smmuv3::new(
                GuestRamView::new(ram.memory().clone(), None),
                shadow.clone(),
                ram.size(),
            ));
            let base =
                window
                    .alloc(Smmuv3::mmio_size())
                    .ok_or(PlatformDeviceError::WindowFull {
                        device: "SMMUv3".into(),
                        index: 0,
                        size: Smmuv3::mmio_size(),
                    })?;
            mmio.insert(BusRange::new(base, Smmuv3::mmio_size())?, smmu.clone())?;
            smmu.translate_msis();
            tracing::info!(base, ?mode, "SMMUv3 in the platform MMIO window");
            Ok((shadow, Some(smmu)))
        }
    }
}

/// With `nested` (`--viommu smmuv3,mode=nested`) vfio-user devices are asked for
/// nestio's nested-IOMMU extension; their ports are returned by PCI slot.
#[allow(clippy::type_complexity)]
fn attach_devices(
    devices: &[DeviceConfig],
    pci: &Arc<PciRoot>,
    platform: &PlatformBus,
    nested: bool,
) -> Result<std::collections::BTreeMap<u8, Arc<dyn crate::iommu::smmuv3::NestedIommuPort>>, VmError>
{
    let mut slot = 1u8;
    let mut ports = std::collections::BTreeMap::new();
    for d in devices {
        let (name, dev, port): (String, Arc<dyn VfioDevice>, _) = match d {
            DeviceConfig::Local { name, device } => (name.clone(), device.clone(), None),
            DeviceConfig::Connected {
                name,
                device,
                nested: port,
            } => {
                let port = if nested { port.clone() } else { None };
                (name.clone(), device.clone(), port)
            }
            DeviceConfig::VfioUser { socket } => {
                let (dev, port) = crate::remote::connect_nested(
                    socket,
                    crate::remote::RemoteOptions::default(),
                    nested,
                )?;
                (format!("vfio-user:{}", socket.display()), dev, port)
            }
            DeviceConfig::VfioUserWith { socket, options } => {
                let (dev, port) = crate::remote::connect_nested(socket, *options, nested)?;
                (format!("vfio-user:{}", socket.display()), dev, port)
            }
        };
        let flags = dev.info().flags;
        if flags & nestio_device_model::flags::PCI != 0 {
            pci.assign(slot, name, dev)?;
            if let Some(p) = port {
                ports.insert(slot, p);
            }
            slot = slot.saturating_add(1);
        } else if flags & PLATFORM_FLAGS != 0 {
            platform.attach(name, dev)?;
        } else {
            return Err(VmError::UnsupportedDevice {
                device: name,
                flags,
            });
        }
    }
    Ok(ports)
}

/// The MP-table routes of the assigned devices' INTx lines (8259 lines under
/// [`IntxRouting::Pic`]).
fn linux_intx_routes(pci: &PciRoot) -> Result<Vec<PciIntxRoute>, VmError> {
    let mut routes = Vec::new();
    for d in pci.devices() {
        let Some(gsi) = d.intx_gsi() else { continue };
        let irq = u8::try_from(gsi).map_err(|_| {
            LinuxBootError::Layout(format!("INTx GSI {gsi} of {} is not an ISA line", d.name()))
        })?;
        routes.push(
            PciIntxRoute::new(d.slot(), d.intx_pin(), irq)
                .map_err(|e| LinuxBootError::Layout(e.to_string()))?,
        );
    }
    Ok(routes)
}

fn set_sigint_handler(handler: usize) -> usize {
    // SAFETY: installs a handler that only stores to an atomic (async-signal-safe), or
    // restores the previous disposition; `sa` is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, &sa, &mut old);
        old.sa_sigaction
    }
}

fn setup_msr_exits(vm: &VmFd) -> Result<(), VmError> {
    if !vm.check_extension(Cap::X86UserSpaceMsr) || !vm.check_extension(Cap::X86MsrFilter) {
        return Err(VmError::Kvm {
            what: "KVM_CAP_X86_USER_SPACE_MSR / KVM_CAP_X86_MSR_FILTER (the CPU model needs user-space MSR exits; use a Linux >= 5.10 host)",
            err: kvm_ioctls::Error::new(libc::ENOTSUP),
        });
    }
    let mut cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = (kvm_bindings::KVM_MSR_EXIT_REASON_FILTER
        | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN) as u64;
    vm.enable_cap(&cap)
        .map_err(kvm_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    let deny = [0u8; 1];
    let ranges: Vec<MsrFilterRange<'_>> = CpuModel::MSRS
        .iter()
        .map(|&base| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count: 1,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))
}

/// Build and run a VM; returns the process exit status (see [`VmReport::exit_status`]).
pub fn run(cfg: VmConfig) -> Result<i32, VmError> {
    let mut vm = Vm::new(cfg)?;
    let report = vm.run()?;
    Ok(report.exit_status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_values() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
        assert!(parse_size("-1M").is_err());
        match "vfio-user=/tmp/e1000.sock".parse::<DeviceConfig>().unwrap() {
            DeviceConfig::VfioUser { socket } => {
                assert_eq!(socket, PathBuf::from("/tmp/e1000.sock"))
            }
            other => panic!("{other:?}"),
        }
        assert!("vfio-user=".parse::<DeviceConfig>().is_err());
        assert_eq!(parse_cpus("1").unwrap(), 1);
        assert_eq!(parse_cpus("4").unwrap(), 4);
        assert_eq!(parse_cpus(&MAX_VCPUS.to_string()).unwrap(), MAX_VCPUS);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("33").is_err());
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("two").is_err());
        assert!("e1000".parse::<DeviceConfig>().is_err());
    }
}
