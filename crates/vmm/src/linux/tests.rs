//! Tests of the Linux loader with synthetic kernels (an ELF with a PVH note, a
//! bzImage), with the real guest kernel when it has been built (`linux/build.sh`), and
//! in KVM: a few instructions at each entry report the boot registers and read the boot
//! structure through the mode the loader set up.

use std::io::Write;
use std::path::PathBuf;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use linux_loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};

use super::bootparams::{self, HDRS_MAGIC, LOADER_UNDEFINED, PVH_MAGIC};
use super::*;

const MIB: u64 = 1 << 20;
const KERNEL_ADDR: u64 = 0x100_0000;
const PVH_ENTRY: u64 = KERNEL_ADDR + 0x100;

/// 64-bit entry: out(esi); out([rsi + 0x202]); hlt.
const CODE64: [u8; 13] = [
    0x89, 0xf0, 0xe7, 0xf4, 0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, 0xe7, 0xf4, 0xf4,
];
/// 32-bit PVH entry: out(ebx); out([ebx]); hlt.
const CODE32: [u8; 9] = [0x89, 0xd8, 0xe7, 0xf4, 0x8b, 0x03, 0xe7, 0xf4, 0xf4];

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "nestio-linux-test-{}-{}-{name}",
            std::process::id(),
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace("::", "-")
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A minimal x86-64 ELF: one PT_LOAD at 16 MiB (CODE64 at the start, CODE32 at +0x100,
/// 64 KiB bss) and, if `pvh`, a PT_NOTE with the Xen PVH entry note.
fn fake_vmlinux(pvh: bool) -> Vec<u8> {
    let mut f = vec![0u8; 0x400];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&KERNEL_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&(1 + u16::from(pvh)).to_le_bytes()); // e_phnum
    let phdr =
        |f: &mut Vec<u8>, at: usize, kind: u32, off: u64, paddr: u64, filesz: u64, memsz: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&paddr.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&filesz.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&memsz.to_le_bytes());
            f[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
        };
    phdr(&mut f, 64, 1, 0x200, KERNEL_ADDR, 0x200, 0x1_0000);
    if pvh {
        phdr(&mut f, 120, 4, 0x180, 0, 20, 20);
        let note = 0x180;
        f[note..note + 4].copy_from_slice(&4u32.to_le_bytes());
        f[note + 4..note + 8].copy_from_slice(&4u32.to_le_bytes());
        f[note + 8..note + 12].copy_from_slice(&18u32.to_le_bytes());
        f[note + 12..note + 16].copy_from_slice(b"Xen\0");
        f[note + 16..note + 20].copy_from_slice(&(PVH_ENTRY as u32).to_le_bytes());
    }
    f[0x200..0x200 + CODE64.len()].copy_from_slice(&CODE64);
    f[0x300..0x300 + CODE32.len()].copy_from_slice(&CODE32);
    f
}

fn guest(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

fn read_cstr(mem: &GuestMemoryMmap, addr: u64, max: usize) -> String {
    let mut b = vec![0u8; max];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    let n = b.iter().position(|c| *c == 0).unwrap();
    String::from_utf8(b[..n].to_vec()).unwrap()
}

#[test]
fn pvh_boot_structures() {
    let k = TempFile::new("vmlinux", &fake_vmlinux(true));
    let rd: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let rd_file = TempFile::new("initrd", &rd);
    let mem = guest(64 * MIB);
    let layout = LinuxLayout::default();
    let boot = load_linux(
        &mem,
        64 * MIB,
        &k.0,
        Some(&rd_file.0),
        "console=ttyS0 noapic",
        &layout,
    )
    .unwrap();
    assert_eq!(boot.protocol, BootProtocol::Pvh);
    assert_eq!(boot.entry, PVH_ENTRY);
    assert_eq!(boot.boot_info, layout.start_info);
    assert_eq!(boot.kernel_end, KERNEL_ADDR + 0x1_0000);

    let info: hvm_start_info = mem.read_obj(GuestAddress(boot.boot_info)).unwrap();
    assert_eq!(info.magic, PVH_MAGIC);
    assert_eq!(info.version, 1);
    assert_eq!(
        read_cstr(&mem, info.cmdline_paddr, 64),
        "console=ttyS0 noapic"
    );
    assert_eq!(info.nr_modules, 1);
    let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    let (addr, size) = boot.initrd.unwrap();
    assert_eq!((m.paddr, m.size), (addr, size));
    assert_eq!(size, rd.len() as u64);
    assert_eq!(addr % 0x1000, 0);
    assert!(
        addr + size <= 64 * MIB && addr + size > 64 * MIB - 0x2000,
        "initrd at the top of RAM"
    );
    let mut got = vec![0u8; rd.len()];
    mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
    assert_eq!(got, rd);
    assert_eq!(info.memmap_entries as usize, boot.e820.len());

    // Kernel bytes at p_paddr, MP table where Linux scans.
    let mut code = [0u8; CODE32.len()];
    mem.read_slice(&mut code, GuestAddress(PVH_ENTRY)).unwrap();
    assert_eq!(code, CODE32);
    let mut sig = [0u8; 4];
    mem.read_slice(&mut sig, GuestAddress(0x9_fc00)).unwrap();
    assert_eq!(&sig, b"_MP_");

    let r = boot.regs();
    assert_eq!((r.rip, r.rbx, r.rflags), (PVH_ENTRY, layout.start_info, 2));
    let s = boot.sregs(&kvm_sregs::default());
    assert_eq!(
        (s.cs.db, s.cs.l, s.cs.limit, s.cs.base),
        (1, 0, 0xffff_ffff, 0)
    );
    assert_eq!((s.cr0 & 1, s.cr0 >> 31, s.efer, s.cr4), (1, 0, 0, 0));
    assert_eq!(s.tr.type_, 0xb);
}

#[test]
fn linux64_boot_structures() {
    let k = TempFile::new("vmlinux", &fake_vmlinux(true));
    let mem = guest(64 * MIB);
    let layout = LinuxLayout {
        protocol: ProtocolChoice::Linux64,
        cpus: 2,
        ..Default::default()
    };
    let boot = load_linux(&mem, 64 * MIB, &k.0, None, "console=ttyS0", &layout).unwrap();
    assert_eq!(boot.protocol, BootProtocol::Linux64);
    assert_eq!(boot.entry, KERNEL_ADDR);
    assert_eq!(boot.initrd, None);
    let bp: boot_params = mem.read_obj(GuestAddress(layout.zero_page)).unwrap();
    let h = bp.hdr;
    let (flag, magic, loader, cmd, rd) = (
        h.boot_flag,
        h.header,
        h.type_of_loader,
        h.cmd_line_ptr,
        h.ramdisk_image,
    );
    assert_eq!(flag, 0xaa55);
    assert_eq!(magic, HDRS_MAGIC);
    assert_eq!(loader, LOADER_UNDEFINED);
    assert_eq!(u64::from(cmd), layout.cmdline);
    assert_eq!(rd, 0);
    assert_eq!(read_cstr(&mem, cmd.into(), 64), "console=ttyS0");
    assert_eq!(bp.e820_entries as usize, boot.e820.len());
    for (i, e) in boot.e820.iter().enumerate() {
        let got = bp.e820_table[i];
        let (a, s, t) = (got.addr, got.size, got.r#type);
        assert_eq!((a, s, t), (e.addr(), e.size(), e.kind()));
    }
    // Identity page tables: PML4 -> PDPT -> PD, 2 MiB pages; 0xfee00000 maps to itself.
    let pml4: u64 = mem.read_obj(GuestAddress(layout.page_tables)).unwrap();
    let pdpte: u64 = mem.read_obj(GuestAddress((pml4 & !0xfff) + 3 * 8)).unwrap();
    let pde: u64 = mem
        .read_obj(GuestAddress(
            (pdpte & !0xfff) + ((0xfee0_0000u64 >> 21) & 511) * 8,
        ))
        .unwrap();
    assert_eq!(pde, 0xfee0_0000 | 0x83);
    // Two processor entries in the MP table.
    let mut t = [0u8; 44 + 40];
    mem.read_slice(&mut t, GuestAddress(0x9_fc10)).unwrap();
    assert_eq!((t[44], t[64], t[64 + 1]), (0, 0, 1));

    let r = boot.regs();
    assert_eq!((r.rip, r.rsi, r.rbx), (KERNEL_ADDR, layout.zero_page, 0));
    let s = boot.sregs(&kvm_sregs::default());
    assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (SEL_CODE64, 1, 0));
    assert_eq!(s.ds.selector, SEL_DATA);
    assert_eq!(s.cr3, layout.page_tables);
    assert_ne!(s.cr0 & (1 << 31), 0);
    assert_eq!(s.efer & 0x500, 0x500);
}

#[test]
fn auto_without_pvh_note_uses_64bit_and_forced_pvh_fails() {
    let k = TempFile::new("vmlinux", &fake_vmlinux(false));
    let mem = guest(64 * MIB);
    let boot = load_linux(&mem, 64 * MIB, &k.0, None, "", &LinuxLayout::default()).unwrap();
    assert_eq!(
        (boot.protocol, boot.entry),
        (BootProtocol::Linux64, KERNEL_ADDR)
    );
    let layout = LinuxLayout {
        protocol: ProtocolChoice::Pvh,
        ..Default::default()
    };
    let e = load_linux(&mem, 64 * MIB, &k.0, None, "", &layout).unwrap_err();
    assert!(matches!(e, LinuxBootError::NoPvh(_)), "{e}");
}

#[test]
fn bzimage_is_loaded_at_1m_with_its_header() {
    let mut img = bootparams::tests::fake_bzimage(3, 0x020f, bootparams::XLF_KERNEL_64, 0x3000);
    img[0x800..0x804].copy_from_slice(b"KERN");
    let k = TempFile::new("bzImage", &img);
    let rd_file = TempFile::new("initrd", &[7u8; 100]);
    let mem = guest(64 * MIB);
    let boot = load_linux(
        &mem,
        64 * MIB,
        &k.0,
        Some(&rd_file.0),
        "quiet",
        &LinuxLayout::default(),
    )
    .unwrap();
    assert_eq!(boot.protocol, BootProtocol::Linux64);
    assert_eq!(boot.entry, 0x10_0200);
    let mut kern = [0u8; 4];
    mem.read_slice(&mut kern, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&kern, b"KERN");
    let bp: boot_params = mem.read_obj(GuestAddress(boot.boot_info)).unwrap();
    let h = bp.hdr;
    let (c32, ver, loader, rd, rdsz) = (
        h.code32_start,
        h.version,
        h.type_of_loader,
        h.ramdisk_image,
        h.ramdisk_size,
    );
    assert_eq!(c32, 0x10_0000, "header copied from the image");
    assert_eq!(ver, 0x020f);
    assert_eq!(loader, LOADER_UNDEFINED);
    assert_eq!((u64::from(rd), u64::from(rdsz)), boot.initrd.unwrap());
    // The initrd stays above the decompression area [1 MiB, 1 MiB + init_size).
    assert!(u64::from(rd) >= 0x10_0000 + 0x40_0000);
}

#[test]
fn rejects_bad_inputs() {
    let k = TempFile::new("vmlinux", &fake_vmlinux(true));
    let mem = guest(64 * MIB);
    let l = LinuxLayout::default();

    let long = "x".repeat(2048);
    assert!(matches!(
        load_linux(&mem, 64 * MIB, &k.0, None, &long, &l),
        Err(LinuxBootError::Cmdline { .. })
    ));
    assert!(matches!(
        load_linux(&mem, 64 * MIB, &k.0, None, "a\0b", &l),
        Err(LinuxBootError::Cmdline { .. })
    ));
    // RAM size larger than the memory given.
    assert!(matches!(
        load_linux(&mem, 128 * MIB, &k.0, None, "", &l),
        Err(LinuxBootError::RamMissing { .. })
    ));
    // Kernel at 16 MiB does not fit in 32 MiB... it does; but an initrd of 20 MiB does not.
    let mem32 = guest(32 * MIB);
    let big = TempFile::new("initrd-big", &vec![0u8; 20 << 20]);
    let e = load_linux(&mem32, 32 * MIB, &k.0, Some(&big.0), "", &l).unwrap_err();
    assert!(
        matches!(e, LinuxBootError::NoRoom { what: "initrd", .. }),
        "{e}"
    );
    // Not a kernel at all.
    let junk = TempFile::new("junk", &[0x55u8; 4096]);
    assert!(matches!(
        load_linux(&mem, 64 * MIB, &junk.0, None, "", &l),
        Err(LinuxBootError::UnknownFormat(_))
    ));
    let empty = TempFile::new("empty", &[]);
    assert!(load_linux(&mem, 64 * MIB, &empty.0, None, "", &l).is_err());
    assert!(matches!(
        load_linux(
            &mem,
            64 * MIB,
            Path::new("/nonexistent/vmlinux"),
            None,
            "",
            &l
        ),
        Err(LinuxBootError::Io { what: "kernel", .. })
    ));
    // A truncated ELF.
    let trunc = TempFile::new("trunc", &fake_vmlinux(true)[..0x220]);
    assert!(matches!(
        load_linux(&mem, 64 * MIB, &trunc.0, None, "", &l),
        Err(LinuxBootError::Elf { .. })
    ));
    // No loadable bytes (p_filesz = 0): nothing to run.
    let mut empty_load = fake_vmlinux(true);
    empty_load[64 + 32..64 + 40].copy_from_slice(&0u64.to_le_bytes());
    let empty_load = TempFile::new("noload", &empty_load);
    assert!(matches!(
        load_linux(&mem, 64 * MIB, &empty_load.0, None, "", &l),
        Err(LinuxBootError::Elf { .. })
    ));
    // Overlapping layout.
    let bad = LinuxLayout {
        zero_page: 0x9000,
        ..Default::default()
    };
    assert!(matches!(bad.validate(), Err(LinuxBootError::Layout(_))));
    let bad = LinuxLayout {
        mptable: 0x9_fc01,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
    let bad = LinuxLayout {
        cmdline: 0x9_f000,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
    assert!(LinuxLayout::default().validate().is_ok());
}

/// The guest kernel built by linux/build.sh, if present.
fn built_vmlinux() -> Option<PathBuf> {
    let p = std::env::var_os("NESTIO_LINUX_VMLINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/linux/out/vmlinux")
        });
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: no guest kernel at {} (run linux/build.sh)",
            p.display()
        );
        None
    }
}

#[test]
fn real_vmlinux_has_pvh_entry() {
    let Some(k) = built_vmlinux() else { return };
    let mem = guest(128 * MIB);
    let boot = load_linux(
        &mem,
        128 * MIB,
        &k,
        None,
        "console=ttyS0",
        &LinuxLayout::default(),
    )
    .unwrap();
    assert_eq!(boot.protocol, BootProtocol::Pvh);
    assert!(boot.entry >= KERNEL_ADDR && boot.entry < boot.kernel_end);
    assert!(boot.kernel_end < 64 * MIB);
    let layout = LinuxLayout {
        protocol: ProtocolChoice::Linux64,
        ..Default::default()
    };
    let boot = load_linux(&mem, 128 * MIB, &k, None, "console=ttyS0", &layout).unwrap();
    assert_eq!(
        boot.entry, KERNEL_ADDR,
        "startup_64 at CONFIG_PHYSICAL_START"
    );
}

fn kvm_or_skip() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIP: /dev/kvm is not usable ({e}); the Linux entry-state tests need KVM");
            None
        }
        Err(e) => panic!("CI=true but /dev/kvm is not usable: {e}"),
    }
}

/// Guest RAM `mem` (`size` bytes from GPA 0) as memory slot 0 of `vm`. The callers keep
/// `mem` alive until the VM is dropped.
fn map_ram(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap, size: u64) {
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `mem` maps `size` bytes at `host` and outlives the VM (both callers drop
    // the VM at the end of the function that owns `mem`).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
}

/// Run the vCPU at the boot entry; collect the dwords written to port 0xf4 until hlt.
fn run_entry(kvm: &Kvm, mem: &GuestMemoryMmap, size: u64, boot: &LinuxBoot) -> Vec<u32> {
    let vm = kvm.create_vm().unwrap();
    map_ram(&vm, mem, size);
    vm.set_tss_address(0xfffb_d000).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    boot.setup_vcpu(&vcpu).unwrap();
    let mut out = vec![];
    for _ in 0..100 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0xf4, data) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                out.push(u32::from_le_bytes(b));
            }
            VcpuExit::Hlt => return out,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("the entry code did not halt");
}

#[test]
fn kvm_pvh_entry_sees_start_info() {
    let Some(kvm) = kvm_or_skip() else { return };
    let k = TempFile::new("vmlinux", &fake_vmlinux(true));
    let mem = guest(64 * MIB);
    let boot = load_linux(&mem, 64 * MIB, &k.0, None, "", &LinuxLayout::default()).unwrap();
    let out = run_entry(&kvm, &mem, 64 * MIB, &boot);
    assert_eq!(out, vec![boot.boot_info as u32, PVH_MAGIC]);
}

#[test]
fn kvm_linux64_entry_sees_zero_page_through_paging() {
    let Some(kvm) = kvm_or_skip() else { return };
    let k = TempFile::new("vmlinux", &fake_vmlinux(false));
    let mem = guest(64 * MIB);
    let boot = load_linux(&mem, 64 * MIB, &k.0, None, "", &LinuxLayout::default()).unwrap();
    assert_eq!(boot.protocol, BootProtocol::Linux64);
    let out = run_entry(&kvm, &mem, 64 * MIB, &boot);
    assert_eq!(out, vec![boot.boot_info as u32, HDRS_MAGIC]);
}

/// The UART's interrupt: an eventfd registered as irqfd.
struct IrqFd(vmm_sys_util::eventfd::EventFd);

impl vm_superio::Trigger for IrqFd {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Serial output shared between the UART model and the test.
#[derive(Clone, Default)]
struct Console(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boots the real guest kernel + initramfs from linux/build.sh to its /init with a
/// minimal platform (in-kernel PIC/IOAPIC/PIT, a 16550 on irqfd GSI 4, no PCI
/// devices) and checks the status /init reports on port 0xf4. Slow on hosts that
/// emulate guest kernel code (~20 s), hence ignored; run it under `timeout`:
/// `timeout 300 cargo test -p nestio-vmm --lib kvm_boots_real_linux -- --ignored`.
#[test]
#[ignore]
fn kvm_boots_real_linux_to_init_pvh() {
    boot_real_linux(ProtocolChoice::Pvh);
}

/// As [`kvm_boots_real_linux_to_init_pvh`], entering at `startup_64` with a zero page.
#[test]
#[ignore]
fn kvm_boots_real_linux_to_init_linux64() {
    boot_real_linux(ProtocolChoice::Linux64);
}

fn boot_real_linux(protocol: ProtocolChoice) {
    use vm_superio::Serial;
    use vmm_sys_util::eventfd::EventFd;

    let Some(k) = built_vmlinux() else { return };
    let initrd = k.with_file_name("initramfs.cpio");
    let Some(kvm) = kvm_or_skip() else { return };
    let size = 128 * MIB;
    let mem = guest(size);
    let cmdline = format!("{} nestio.mode=boot", platform::BASE_CMDLINE);
    let boot = load_linux(
        &mem,
        size,
        &k,
        Some(&initrd),
        &cmdline,
        &LinuxLayout {
            protocol,
            ..Default::default()
        },
    )
    .unwrap();

    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_bindings::kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    map_ram(&vm, &mem, size);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irq, 4).unwrap();
    let console = Console::default();
    let mut uart = Serial::new(IrqFd(irq.try_clone().unwrap()), console.clone());

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    platform::linux_cpuid(&mut cpuid).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    boot.setup_vcpu(&vcpu).unwrap();
    let mut pci_addr = 0u32;
    let status = loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port @ 0x3f8..=0x3ff, data) => {
                uart.write((port - 0x3f8) as u8, data[0]).unwrap();
            }
            VcpuExit::IoIn(port @ 0x3f8..=0x3ff, data) => data[0] = uart.read((port - 0x3f8) as u8),
            VcpuExit::IoOut(0xf4, data) => break Some(data[0]),
            VcpuExit::IoOut(0x64, [0xfe]) => break None,
            VcpuExit::IoOut(0xcf8, data) if data.len() == 4 => {
                pci_addr = u32::from_le_bytes(data.try_into().unwrap());
            }
            VcpuExit::IoIn(0xcf8, data) if data.len() == 4 => {
                data.copy_from_slice(&pci_addr.to_le_bytes())
            }
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::IoOut(..) => {}
            VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::MmioWrite(..) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    };
    let out = String::from_utf8_lossy(&console.0.lock()).into_owned();
    assert!(out.contains("Linux version 6.1"), "no kernel banner");
    assert!(
        out.contains("NESTIO-INIT: start mode=boot"),
        "/init did not run"
    );
    assert_eq!(status, Some(0), "/init's exit status on port 0xf4");
}

#[test]
fn acpi_tables_land_in_the_reserved_bios_area_and_both_protocols_point_at_them() {
    let k = TempFile::new("vmlinux", &fake_vmlinux(true));
    let acpi = crate::acpi::AcpiConfig::new(2, crate::irqchip::x86::IntxRouting::Pic).unwrap();
    let want = crate::acpi::AcpiTables::build(crate::acpi::ACPI_BASE, &acpi).unwrap();
    for protocol in [ProtocolChoice::Pvh, ProtocolChoice::Linux64] {
        let mem = guest(64 * MIB);
        let layout = LinuxLayout {
            protocol,
            acpi: Some(acpi),
            ..Default::default()
        };
        let boot = load_linux(&mem, 64 * MIB, &k.0, None, "", &layout).unwrap();
        assert_eq!(boot.acpi_rsdp, Some(crate::acpi::ACPI_BASE));
        let mut back = vec![0u8; want.bytes().len()];
        mem.read_slice(&mut back, GuestAddress(crate::acpi::ACPI_BASE))
            .unwrap();
        assert_eq!(back, want.bytes(), "{protocol:?}: tables in guest memory");
        // Not RAM for the kernel, and clear of the MP table and the boot structures.
        assert!(!e820::is_ram(
            &boot.e820,
            crate::acpi::ACPI_BASE,
            back.len() as u64
        ));
        assert!(u64::from(layout.mptable) + 0x200 <= crate::acpi::ACPI_BASE);
        let rsdp = match protocol {
            ProtocolChoice::Pvh => {
                let info: hvm_start_info = mem.read_obj(GuestAddress(boot.boot_info)).unwrap();
                info.rsdp_paddr
            }
            _ => {
                let bp: boot_params = mem.read_obj(GuestAddress(boot.boot_info)).unwrap();
                bp.acpi_rsdp_addr
            }
        };
        assert_eq!(rsdp, crate::acpi::ACPI_BASE, "{protocol:?}");
    }
}

#[test]
fn without_acpi_nothing_is_written_at_the_acpi_area() {
    let k = TempFile::new("vmlinux", &fake_vmlinux(true));
    for protocol in [ProtocolChoice::Pvh, ProtocolChoice::Linux64] {
        let mem = guest(64 * MIB);
        let layout = LinuxLayout {
            protocol,
            ..Default::default()
        };
        let boot = load_linux(&mem, 64 * MIB, &k.0, None, "", &layout).unwrap();
        assert_eq!(boot.acpi_rsdp, None);
        let mut area = vec![0xaau8; crate::acpi::ACPI_AREA_LEN as usize];
        mem.read_slice(&mut area, GuestAddress(crate::acpi::ACPI_BASE))
            .unwrap();
        assert!(
            area.iter().all(|b| *b == 0),
            "{protocol:?}: the BIOS area stays empty"
        );
        let rsdp = match protocol {
            ProtocolChoice::Pvh => {
                let info: hvm_start_info = mem.read_obj(GuestAddress(boot.boot_info)).unwrap();
                info.rsdp_paddr
            }
            _ => {
                let bp: boot_params = mem.read_obj(GuestAddress(boot.boot_info)).unwrap();
                bp.acpi_rsdp_addr
            }
        };
        assert_eq!(rsdp, 0, "{protocol:?}");
    }
}
