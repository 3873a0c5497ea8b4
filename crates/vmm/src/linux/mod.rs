//! Direct boot of a Linux kernel: everything firmware and a boot loader would do before
//! the first kernel instruction, for `nestio run --kernel`.
//!
//! [`load_linux`] takes guest RAM, a kernel image (an ELF `vmlinux`, or a `bzImage`), an
//! optional initrd and a command line, and leaves guest memory ready to start:
//!
//! | what | default address | notes |
//! |------|-----------------|-------|
//! | GDT | `0x500` | flat 32-bit code `0x08`, 64-bit code `0x10`, data `0x18`, TSS `0x20` |
//! | PVH start info + module + memory map | `0x6000` | PVH only |
//! | zero page (`boot_params`) | `0x7000` | 64-bit protocol only |
//! | boot stack top | `0x8ff0` | |
//! | page tables (identity map of 4 GiB with 2 MiB pages) | `0x9000..0xf000` | 64-bit protocol only |
//! | command line | `0x20000` | at most 2047 bytes for a vmlinux |
//! | MP table | `0x9fc00` | reserved in the e820 map |
//! | ACPI tables (RSDP first), with [`LinuxLayout::acpi`] | `0xf0000` | in the reserved BIOS area `[0xf0000, 1 MiB)`; see [`crate::acpi`] |
//! | kernel | ELF `p_paddr` (16 MiB for 6.1) / 1 MiB for a bzImage | |
//! | initrd | page aligned, at the top of RAM below the PCI hole | |
//!
//! Boot protocol: a vmlinux with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) starts at that
//! entry in 32-bit protected mode without paging, `ebx` = start info
//! ([`BootProtocol::Pvh`]); otherwise (or if asked to) it starts at its ELF entry
//! (`startup_64`) in 64-bit mode, `rsi` = zero page ([`BootProtocol::Linux64`]). A bzImage
//! always uses the 64-bit entry at its load address + 0x200. [`LinuxBoot`] carries the
//! vCPU state for either ([`LinuxBoot::regs`], [`LinuxBoot::sregs`],
//! [`LinuxBoot::setup_vcpu`]).
//!
//! With ACPI ([`LinuxLayout::acpi`]) the tables of [`crate::acpi`] go to
//! [`crate::acpi::ACPI_BASE`] and their RSDP address into the zero page
//! (`acpi_rsdp_addr`) or the PVH start info (`rsdp_paddr`); the MP table is written
//! either way, for kernels built without ACPI (a kernel with ACPI prefers the tables).
//! Without ACPI the guest memory and the boot structures are exactly as before.
//!
//! [`platform`] has the KVM-side settings Linux also needs (CPUID TSC-deadline, level
//! triggered PIC lines for PCI INTx, the base command line).
//!
//! Files are hostile input: the ELF is parsed by linux-loader, the bzImage header by
//! [`bootparams::BzImageHeader::parse`] with every offset checked; every placement is
//! checked against the e820 RAM ranges with overflow-checked arithmetic, and file data
//! goes into guest memory through vm-memory's volatile copies.

pub mod bootparams;
pub mod e820;
pub mod mptable;
pub mod platform;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use crate::acpi::{AcpiConfig, AcpiError, AcpiTables, ACPI_BASE};
use crate::boot::segment;
use kvm_ioctls::VcpuFd;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use bootparams::{BootParamsError, BzImageHeader, StartInfo, ZeroPage, DEFAULT_CMDLINE_SIZE};
use e820::{E820Entry, E820Error, RamLayout, HIGH_MEMORY};
use mptable::{MpTableError, PciIntxRoute};

/// Selector of the flat 32-bit code segment (PVH entry).
pub const SEL_CODE32: u16 = 0x08;
/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub const SEL_CODE64: u16 = 0x10;
/// Selector of the flat data segment (`__BOOT_DS`).
pub const SEL_DATA: u16 = 0x18;
/// Selector of the TSS.
pub const SEL_TSS: u16 = 0x20;

const GDT: [u64; 6] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08: 32-bit code, base 0, limit 4 GiB
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code
    0x00cf_9300_0000_ffff, // 0x18: data, base 0, limit 4 GiB
    0x0000_8b00_0000_0067, // 0x20: TSS (busy), base 0, limit 0x67
    0,                     // upper half of the 64-bit TSS descriptor
];
const PAGE_TABLES_LEN: u64 = 6 * 0x1000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How to enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity paging, `rsi` = zero page.
    Linux64,
}

/// Which protocol the caller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolChoice {
    /// PVH when the kernel has the note, else the 64-bit protocol.
    #[default]
    Auto,
    /// PVH or fail.
    Pvh,
    /// The 64-bit protocol even if PVH is possible.
    Linux64,
}

/// Where the boot structures go and what the platform looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxLayout {
    /// GDT address (48 bytes).
    pub gdt: u64,
    /// PVH start info address (followed by the module entry and the memory map).
    pub start_info: u64,
    /// Zero page address (4 KiB).
    pub zero_page: u64,
    /// Initial stack pointer (the kernel switches to its own stack at once).
    pub stack_top: u64,
    /// Page tables (24 KiB: PML4, PDPT, four page directories).
    pub page_tables: u64,
    /// Command line address.
    pub cmdline: u64,
    /// MP floating pointer + configuration table (Linux scans the last KiB of base
    /// memory, `0x9fc00`).
    pub mptable: u32,
    /// Start of the 32-bit PCI MMIO hole; RAM above it moves to 4 GiB.
    pub pci_hole_start: u64,
    /// vCPUs listed in the MP table.
    pub cpus: usize,
    /// PCI INTx routes listed in the MP table.
    pub pci_intx: Vec<PciIntxRoute>,
    /// ACPI tables to generate at [`ACPI_BASE`] (`None`: MP table only, as before).
    pub acpi: Option<AcpiConfig>,
    /// Protocol choice.
    pub protocol: ProtocolChoice,
}

impl Default for LinuxLayout {
    fn default() -> Self {
        LinuxLayout {
            gdt: 0x500,
            start_info: 0x6000,
            zero_page: 0x7000,
            stack_top: 0x8ff0,
            page_tables: 0x9000,
            cmdline: 0x2_0000,
            mptable: e820::EBDA_START as u32,
            pci_hole_start: 0xc000_0000,
            cpus: 1,
            pci_intx: Vec::new(),
            acpi: None,
            protocol: ProtocolChoice::Auto,
        }
    }
}

/// Errors of preparing a Linux boot.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// A file cannot be opened or read.
    #[error("cannot read {what} {path}: {err}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The kernel file is neither an ELF nor a bzImage.
    #[error("{0} is neither an ELF vmlinux nor a bzImage (give the kernel's vmlinux or arch/x86/boot/bzImage)")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected the ELF.
    #[error("cannot load the kernel ELF {path}: {err} (is it an x86-64 vmlinux that fits in guest RAM?)")]
    Elf {
        /// Path.
        path: PathBuf,
        /// Cause.
        err: String,
    },
    /// The bzImage header is unusable.
    #[error("cannot load the bzImage {path}: {err}")]
    BzImage {
        /// Path.
        path: PathBuf,
        /// Cause.
        err: BootParamsError,
    },
    /// PVH was required but the kernel has no PVH entry.
    #[error("the kernel {0} has no PVH entry note (build it with CONFIG_PVH=y, or use the 64-bit boot protocol)")]
    NoPvh(PathBuf),
    /// The memory layout is unusable.
    #[error(transparent)]
    Memory(#[from] E820Error),
    /// Guest memory does not cover the RAM the layout describes.
    #[error(
        "guest memory does not cover RAM [{start:#x}, {end:#x}) of the {ram_size:#x}-byte layout"
    )]
    RamMissing {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// RAM size given.
        ram_size: u64,
    },
    /// Something does not fit where it must go.
    #[error("{what} ({len:#x} bytes at {addr:#x}) does not fit in guest RAM; {hint}")]
    NoRoom {
        /// What.
        what: &'static str,
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
        /// What to do.
        hint: &'static str,
    },
    /// The boot structures of the layout overlap or leave low memory.
    #[error("boot layout invalid: {0}")]
    Layout(String),
    /// The command line is unusable.
    #[error("kernel command line of {len} bytes is invalid: {reason}")]
    Cmdline {
        /// Length.
        len: usize,
        /// Why.
        reason: String,
    },
    /// Writing a boot structure failed.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The MP table could not be built.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// The ACPI tables could not be built or placed.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Writing to guest memory failed.
    #[error("cannot write the {what} into guest memory at {addr:#x}: {reason}")]
    Write {
        /// What.
        what: &'static str,
        /// Address.
        addr: u64,
        /// Cause.
        reason: String,
    },
    /// A vCPU ioctl failed.
    #[error("cannot set vCPU {what} for the Linux entry: {err}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
}

/// Everything the vCPU and the rest of the VMM need to start the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBoot {
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// First instruction (guest physical).
    pub entry: u64,
    /// Start info (PVH, goes in `rbx`) or zero page (64-bit, goes in `rsi`).
    pub boot_info: u64,
    /// One past the kernel's highest byte (including bss).
    pub kernel_end: u64,
    /// Initrd `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// Command line address and length (without the NUL).
    pub cmdline: (u64, usize),
    /// Memory map given to the kernel.
    pub e820: Vec<E820Entry>,
    /// GDT address.
    pub gdt: u64,
    /// PML4 address (64-bit protocol).
    pub page_tables: u64,
    /// Initial stack pointer.
    pub stack_top: u64,
    /// Where the ACPI RSDP is, when the layout asked for ACPI tables.
    pub acpi_rsdp: Option<u64>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl LinuxLayout {
    /// Check that the boot structures are disjoint, inside low RAM below the EBDA, and
    /// that the other settings are sane.
    pub fn validate(&self) -> Result<(), LinuxBootError> {
        let bad = |m: String| Err(LinuxBootError::Layout(m));
        let regions: [(&str, u64, u64); 6] = [
            ("GDT", self.gdt, (GDT.len() * 8) as u64),
            (
                "start info",
                self.start_info,
                bootparams::start_info_len(128),
            ),
            ("zero page", self.zero_page, 0x1000),
            ("page tables", self.page_tables, PAGE_TABLES_LEN),
            (
                "command line",
                self.cmdline,
                u64::from(DEFAULT_CMDLINE_SIZE).max(1 << 16),
            ),
            ("stack", self.stack_top.saturating_sub(0x100), 0x100),
        ];
        for (i, (name, addr, len)) in regions.iter().enumerate() {
            if *addr < 0x500 || addr.checked_add(*len).is_none_or(|e| e > e820::EBDA_START) {
                return bad(format!("{name} at {addr:#x} must lie in [0x500, 0x9fc00)"));
            }
            for (other, oaddr, olen) in &regions[i + 1..] {
                if overlaps((*addr, *len), (*oaddr, *olen)) {
                    return bad(format!(
                        "{name} at {addr:#x} overlaps the {other} at {oaddr:#x}"
                    ));
                }
            }
        }
        if (self.page_tables | self.zero_page) & 0xfff != 0 {
            return bad("page tables and zero page must be 4 KiB aligned".into());
        }
        if self.stack_top & 0xf != 0 {
            return bad("the stack top must be 16-byte aligned".into());
        }
        if self.mptable & 0xf != 0
            || !(e820::EBDA_START..e820::VGA_START - 0x200).contains(&u64::from(self.mptable))
        {
            return bad(format!(
                "the MP table at {:#x} must be 16-byte aligned inside the reserved [0x9fc00, 0x9fe00)",
                self.mptable
            ));
        }
        Ok(())
    }
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LinuxBootError + 'a {
    move |err| LinuxBootError::Io {
        what,
        path: path.to_path_buf(),
        err,
    }
}

/// What was loaded from the kernel file.
struct LoadedKernel {
    protocol: BootProtocol,
    entry: u64,
    start: u64,
    end: u64,
    header: Option<BzImageHeader>,
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    path: &Path,
    choice: ProtocolChoice,
) -> Result<LoadedKernel, LinuxBootError> {
    let mut f = File::open(path).map_err(io("kernel", path))?;
    let file_len = f.metadata().map_err(io("kernel", path))?.len();
    let mut head = vec![0u8; 0x1000.min(file_len as usize)];
    f.read_exact(&mut head).map_err(io("kernel", path))?;

    if head.starts_with(b"\x7fELF") {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY))).map_err(|e| {
            LinuxBootError::Elf {
                path: path.to_path_buf(),
                err: e.to_string(),
            }
        })?;
        let pvh = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
            _ => None,
        };
        let (protocol, entry) = match (choice, pvh) {
            (ProtocolChoice::Pvh, None) => return Err(LinuxBootError::NoPvh(path.to_path_buf())),
            (ProtocolChoice::Pvh | ProtocolChoice::Auto, Some(e)) => (BootProtocol::Pvh, e),
            _ => (BootProtocol::Linux64, r.kernel_load.0),
        };
        let start = r.kernel_load.0.min(entry);
        if r.kernel_end <= start {
            return Err(LinuxBootError::Elf {
                path: path.to_path_buf(),
                err: "no loadable segment at or above the entry point".into(),
            });
        }
        if !e820::is_ram(map, start, r.kernel_end.saturating_sub(start)) {
            return Err(LinuxBootError::NoRoom {
                what: "kernel",
                addr: start,
                len: r.kernel_end.saturating_sub(start),
                hint: "give the VM more memory (at least 64 MiB for a 6.1 tinyconfig kernel)",
            });
        }
        return Ok(LoadedKernel {
            protocol,
            entry,
            start,
            end: r.kernel_end,
            header: None,
        });
    }

    if head.get(0x202..0x206) != Some(&bootparams::HDRS_MAGIC.to_le_bytes()[..]) {
        return Err(LinuxBootError::UnknownFormat(path.to_path_buf()));
    }
    let hdr = BzImageHeader::parse(&head, file_len).map_err(|err| LinuxBootError::BzImage {
        path: path.to_path_buf(),
        err,
    })?;
    if choice == ProtocolChoice::Pvh {
        return Err(LinuxBootError::NoPvh(path.to_path_buf()));
    }
    let load = HIGH_MEMORY;
    if !e820::is_ram(map, load, hdr.init_size) {
        return Err(LinuxBootError::NoRoom {
            what: "bzImage (decompression size)",
            addr: load,
            len: hdr.init_size,
            hint: "give the VM more memory",
        });
    }
    let len = usize::try_from(hdr.kernel_len).map_err(|_| LinuxBootError::NoRoom {
        what: "bzImage",
        addr: load,
        len: hdr.kernel_len,
        hint: "the image is larger than this host's address space",
    })?;
    f.seek(SeekFrom::Start(hdr.kernel_offset))
        .map_err(io("kernel", path))?;
    mem.read_exact_volatile_from(GuestAddress(load), &mut f, len)
        .map_err(|e| LinuxBootError::Write {
            what: "bzImage kernel",
            addr: load,
            reason: e.to_string(),
        })?;
    Ok(LoadedKernel {
        protocol: BootProtocol::Linux64,
        entry: load + 0x200,
        start: load,
        end: load + hdr.init_size,
        header: Some(hdr),
    })
}

fn write_gdt_and_tables(
    mem: &GuestMemoryMmap,
    layout: &LinuxLayout,
    paging: bool,
) -> Result<(), LinuxBootError> {
    let err = |what: &'static str, addr: u64| {
        move |e: vm_memory::GuestMemoryError| LinuxBootError::Write {
            what,
            addr,
            reason: e.to_string(),
        }
    };
    for (i, d) in GDT.iter().enumerate() {
        let a = layout.gdt + 8 * i as u64;
        mem.write_obj(*d, GuestAddress(a)).map_err(err("GDT", a))?;
    }
    if !paging {
        return Ok(());
    }
    let pml4 = layout.page_tables;
    let pdpt = pml4 + 0x1000;
    let pd = pml4 + 0x2000;
    mem.write_obj(pdpt | 0x3, GuestAddress(pml4))
        .map_err(err("page tables", pml4))?;
    for gib in 0..4u64 {
        let dir = pd + gib * 0x1000;
        mem.write_obj(dir | 0x3, GuestAddress(pdpt + gib * 8))
            .map_err(err("page tables", pdpt))?;
        let mut entries = [0u8; 4096];
        for (i, e) in entries.chunks_exact_mut(8).enumerate() {
            let phys = (gib << 30) | ((i as u64) << 21);
            // present, writable, 2 MiB page
            e.copy_from_slice(&(phys | 0x83).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(dir))
            .map_err(err("page tables", dir))?;
    }
    Ok(())
}

/// Load `kernel` (and `initrd`) into `mem`, write the command line, the memory map, the
/// MP table and the protocol's boot structures; return the vCPU entry state.
///
/// `ram_size` is the guest RAM size; RAM above `layout.pci_hole_start` is expected at
/// 4 GiB in `mem`.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    layout: &LinuxLayout,
) -> Result<LinuxBoot, LinuxBootError> {
    layout.validate()?;
    let ram = RamLayout::new(ram_size, layout.pci_hole_start)?;
    let mut ranges = vec![(0, ram.low_end)];
    ranges.extend(ram.high);
    for (start, end) in ranges {
        if !mem.check_range(GuestAddress(start), (end - start) as usize) {
            return Err(LinuxBootError::RamMissing {
                start,
                end,
                ram_size,
            });
        }
    }
    let map = e820::memory_map(&ram);

    let k = load_kernel(mem, &map, kernel, layout.protocol)?;
    if k.start < HIGH_MEMORY {
        return Err(LinuxBootError::NoRoom {
            what: "kernel",
            addr: k.start,
            len: k.end.saturating_sub(k.start),
            hint: "the kernel must be linked above 1 MiB",
        });
    }

    // Command line.
    let cmdline_size = k
        .header
        .map_or(DEFAULT_CMDLINE_SIZE, |h| h.cmdline_size.min(1 << 16));
    if cmdline.as_bytes().contains(&0) {
        return Err(LinuxBootError::Cmdline {
            len: cmdline.len(),
            reason: "it contains a NUL byte".into(),
        });
    }
    if cmdline.len() + 1 > cmdline_size as usize {
        return Err(LinuxBootError::Cmdline {
            len: cmdline.len(),
            reason: format!("the kernel accepts at most {} bytes", cmdline_size - 1),
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout.cmdline))
        .map_err(|e| LinuxBootError::Write {
            what: "command line",
            addr: layout.cmdline,
            reason: e.to_string(),
        })?;

    // Initrd: top of low RAM (below the header's limit), page aligned, above the kernel.
    let initrd = match initrd {
        None => None,
        Some(path) => {
            let mut f = File::open(path).map_err(io("initrd", path))?;
            let size = f.metadata().map_err(io("initrd", path))?.len();
            let limit = k
                .header
                .map_or(ram.low_end, |h| h.initrd_limit.min(ram.low_end))
                .min(1 << 32);
            let kernel_top = k.end.checked_add(0xfff).ok_or(LinuxBootError::NoRoom {
                what: "kernel",
                addr: k.start,
                len: k.end.saturating_sub(k.start),
                hint: "the kernel image is corrupt",
            })? & !0xfff;
            let addr = limit.checked_sub(size).map(|a| a & !0xfff);
            let addr = match addr {
                Some(a) if a >= kernel_top && e820::is_ram(&map, a, size) => a,
                _ => {
                    return Err(LinuxBootError::NoRoom {
                        what: "initrd",
                        addr: kernel_top,
                        len: size,
                        hint: "give the VM more memory or use a smaller initramfs",
                    })
                }
            };
            let len = usize::try_from(size).map_err(|_| LinuxBootError::NoRoom {
                what: "initrd",
                addr,
                len: size,
                hint: "the initrd is larger than this host's address space",
            })?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
                .map_err(|e| LinuxBootError::Write {
                    what: "initrd",
                    addr,
                    reason: e.to_string(),
                })?;
            Some((addr, size))
        }
    };

    mptable::write(mem, layout.mptable, layout.cpus, &layout.pci_intx)?;
    let rsdp = match &layout.acpi {
        None => None,
        Some(cfg) => Some(write_acpi(mem, &map, cfg)?),
    };

    let boot_info = match k.protocol {
        BootProtocol::Pvh => {
            StartInfo {
                addr: layout.start_info,
                cmdline: layout.cmdline,
                initrd,
                e820: &map,
                rsdp,
            }
            .write(mem)?;
            write_gdt_and_tables(mem, layout, false)?;
            layout.start_info
        }
        BootProtocol::Linux64 => {
            ZeroPage {
                header: k.header.map(|h| h.hdr),
                cmdline: layout.cmdline,
                cmdline_size,
                initrd,
                e820: &map,
                rsdp,
            }
            .write(mem, layout.zero_page)?;
            write_gdt_and_tables(mem, layout, true)?;
            layout.zero_page
        }
    };
    tracing::info!(
        protocol = ?k.protocol,
        entry = format_args!("{:#x}", k.entry),
        kernel_end = format_args!("{:#x}", k.end),
        initrd = ?initrd,
        acpi_rsdp = ?rsdp,
        "Linux kernel loaded"
    );
    Ok(LinuxBoot {
        protocol: k.protocol,
        entry: k.entry,
        boot_info,
        kernel_end: k.end,
        initrd,
        cmdline: (layout.cmdline, cmdline.len()),
        e820: map,
        gdt: layout.gdt,
        page_tables: layout.page_tables,
        stack_top: layout.stack_top,
        acpi_rsdp: rsdp,
    })
}

/// Build the ACPI tables for `cfg` at [`ACPI_BASE`], check that they lie in a range the
/// memory map keeps from the kernel (not RAM) and write them; returns the RSDP address.
fn write_acpi(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    cfg: &AcpiConfig,
) -> Result<u64, LinuxBootError> {
    let tables = AcpiTables::build(ACPI_BASE, cfg)?;
    let len = tables.bytes().len() as u64;
    let reserved = map.iter().any(|e| {
        e.kind() == e820::E820_RESERVED && e.addr() <= ACPI_BASE && ACPI_BASE + len <= e.end()
    });
    if !reserved || e820::is_ram(map, ACPI_BASE, len) {
        return Err(LinuxBootError::Layout(format!(
            "the ACPI tables ({len:#x} bytes at {ACPI_BASE:#x}) are not inside a reserved e820 range"
        )));
    }
    tables.write(mem)?;
    Ok(tables.rsdp_addr())
}

impl LinuxBoot {
    /// General registers at the entry.
    pub fn regs(&self) -> kvm_regs {
        let mut r = kvm_regs {
            rip: self.entry,
            rsp: self.stack_top,
            rflags: 0x2,
            ..Default::default()
        };
        match self.protocol {
            BootProtocol::Pvh => r.rbx = self.boot_info,
            BootProtocol::Linux64 => r.rsi = self.boot_info,
        }
        r
    }

    /// Special registers at the entry, starting from the vCPU's current ones.
    pub fn sregs(&self, base: &kvm_sregs) -> kvm_sregs {
        let mut s = *base;
        s.gdt.base = self.gdt;
        s.gdt.limit = (GDT.len() * 8 - 1) as u16;
        s.idt.base = 0;
        s.idt.limit = 0;
        let data = segment(SEL_DATA, GDT[3]);
        s.ds = data;
        s.es = data;
        s.fs = data;
        s.gs = data;
        s.ss = data;
        s.tr = segment(SEL_TSS, GDT[4]);
        match self.protocol {
            BootProtocol::Pvh => {
                s.cs = segment(SEL_CODE32, GDT[1]);
                s.cr0 = CR0_PE | CR0_ET;
                s.cr3 = 0;
                s.cr4 = 0;
                s.efer = 0;
            }
            BootProtocol::Linux64 => {
                s.cs = segment(SEL_CODE64, GDT[2]);
                s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
                s.cr3 = self.page_tables;
                s.cr4 = CR4_PAE;
                s.efer = EFER_LME | EFER_LMA;
            }
        }
        s
    }

    /// Put `vcpu` at the kernel entry (registers, special registers, FPU defaults).
    pub fn setup_vcpu(&self, vcpu: &VcpuFd) -> Result<(), LinuxBootError> {
        let kvm = |what| move |err| LinuxBootError::Kvm { what, err };
        let base = vcpu.get_sregs().map_err(kvm("special registers"))?;
        vcpu.set_sregs(&self.sregs(&base))
            .map_err(kvm("special registers"))?;
        vcpu.set_regs(&self.regs()).map_err(kvm("registers"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(kvm("FPU"))
    }
}

#[cfg(test)]
mod tests;
