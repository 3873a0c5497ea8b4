//! x86-64 boot: ELF loading and the long-mode machine state the payload starts in.
//!
//! Guest physical layout (all below the payload, which is linked at 2 MiB):
//! - `0x500`: GDT (null, 64-bit code 0x08, data 0x10, TSS 0x18);
//! - `0x7000`: the payload's command line, NUL-terminated (`rsi` points to it);
//! - `0x9000`: PML4, `0xa000`: PDPT, `0xb000..0xf000`: four page directories that
//!   identity-map the first 4 GiB with 2 MiB pages (RAM, the PCI windows, IOAPIC and
//!   local APIC are all reachable at their physical address);
//! - `0x10000..0x200000`: the stack (RSP starts just below 2 MiB);
//! - `0x200000..`: the payload's PT_LOAD segments (linux-loader rejects any below).
//!
//! The vCPU starts at the ELF entry in 64-bit mode, CPL 0, paging on, SSE enabled,
//! interrupts off, `rdi` = RAM size, `rsi` = command line address.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Address of the NUL-terminated command line passed in `rsi`.
pub const CMDLINE_ADDR: u64 = 0x7000;
/// Longest command line (without the NUL).
pub const CMDLINE_MAX: usize = 4095;
/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// PML4 address.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Initial stack pointer (SysV: rsp+8 is 16-byte aligned at function entry).
pub const STACK_TOP: u64 = 0x1f_fff8;
/// Lowest address a payload segment may use.
pub const LOAD_ADDR: u64 = 0x20_0000;

const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: 64-bit code, DPL 0
    0x00cf_9300_0000_ffff, // 0x10: data
    0x0000_8b00_0000_0067, // 0x18: 64-bit TSS (busy), base 0, limit 0x67
    0,
];

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors of loading and machine setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The payload file cannot be opened.
    #[error("cannot open guest payload {path}: {err}")]
    Open {
        /// Path.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// linux-loader refused the ELF.
    #[error("cannot load guest payload {path}: {err} (it must be a static x86-64 ELF linked at or above 2 MiB that fits in guest RAM)")]
    Load {
        /// Path.
        path: String,
        /// Cause.
        err: String,
    },
    /// The command line does not fit.
    #[error("the guest command line is {0} bytes; at most 4095 fit")]
    CmdlineTooLong(usize),
    /// Writing the boot tables failed.
    #[error("cannot write boot tables into guest memory: {0}")]
    Tables(String),
    /// A KVM register ioctl failed.
    #[error("cannot set vCPU {what}: {err}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
}

/// Load the ELF at `path`; returns the entry point.
pub fn load_elf(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, BootError> {
    let mut f = File::open(path).map_err(|err| BootError::Open {
        path: path.display().to_string(),
        err,
    })?;
    let r = Elf::load(mem, None, &mut f, Some(GuestAddress(LOAD_ADDR))).map_err(|e| {
        BootError::Load {
            path: path.display().to_string(),
            err: e.to_string(),
        }
    })?;
    Ok(r.kernel_load.0)
}

/// Write the GDT and identity page tables.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |e: vm_memory::GuestMemoryError| BootError::Tables(e.to_string());
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(err)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            // present, writable, 2 MiB page; cache-disabled above 3 GiB (device space).
            let mut e = phys | 0x83;
            if phys >= 0xc000_0000 {
                e |= 0x18;
            }
            mem.write_obj(e, GuestAddress(pd + i * 8)).map_err(err)?;
        }
    }
    Ok(())
}

/// The KVM segment register loaded from GDT `descriptor` under `selector` (shared by
/// the Linux loader).
pub(crate) fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24),
        limit: {
            let l = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
            if (descriptor >> 55) & 1 == 1 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g: ((descriptor >> 55) & 1) as u8,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The special registers of 64-bit mode with our GDT and page tables.
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cs = segment(0x08, GDT[1]);
    let data = segment(0x10, GDT[2]);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(0x18, GDT[3]);
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = PML4_ADDR;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// Write the payload's command line (NUL-terminated) at [`CMDLINE_ADDR`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    mem.write_slice(&b, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Tables(e.to_string()))
}

/// Put the vCPU at `entry` in long mode.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64, ram_size: u64) -> Result<(), BootError> {
    let sregs = vcpu.get_sregs().map_err(|err| BootError::Kvm {
        what: "special registers",
        err,
    })?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(|err| BootError::Kvm {
            what: "special registers",
            err,
        })?;
    let regs = kvm_regs {
        rip: entry,
        rsp: STACK_TOP,
        rdi: ram_size,
        rsi: CMDLINE_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|err| BootError::Kvm {
        what: "registers",
        err,
    })?;
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|err| BootError::Kvm { what: "FPU", err })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode() {
        let cs = segment(8, GDT[1]);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.s), (1, 0, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let tr = segment(0x18, GDT[3]);
        assert_eq!((tr.type_, tr.s, tr.limit, tr.g), (0xb, 0, 0x67, 0));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        write_tables(&mem).unwrap();
        let walk = |va: u64| -> u64 {
            let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
            let pdpt = pml4 & !0xfff;
            let pdpte: u64 = mem
                .read_obj(GuestAddress(pdpt + ((va >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x81, 0x81);
            (pde & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff)
        };
        for va in [0u64, 0x20_1234, 0xc000_0010, 0xfee0_00b0, 0xffff_ffff] {
            assert_eq!(walk(va), va);
        }
    }
}
