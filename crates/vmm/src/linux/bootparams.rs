//! The two boot information blocks a Linux kernel accepts from a VMM, and the bzImage
//! setup header parser.
//!
//! - 64-bit boot protocol: the "zero page" (`struct boot_params`, 4 KiB) whose address
//!   goes in `rsi`. For a bzImage, its setup header is copied from the image (bytes
//!   `0x1f1..0x202 + image[0x201]`), for a vmlinux a minimal header is synthesised; then
//!   the loader fields are filled: loader type, command line pointer, ramdisk, e820.
//! - PVH: `struct hvm_start_info` (version 1) whose address goes in `ebx`, with the
//!   initrd as module 0 and the e820 map as the memory map table.
//!
//! Both structures are built as local copies and written with `write_obj`; the
//! bzImage header is parsed from a local buffer read from the file, every offset
//! bounds-checked against that buffer.

use linux_loader::bootparam::{boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::e820::E820Entry;

/// "HdrS", the setup header signature.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot sector signature at 0x1fe.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` for a boot loader without an assigned id.
pub const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags`: the protected-mode code is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 0x01;
/// `xloadflags`: the kernel has the 64-bit entry at `load + 0x200`.
pub const XLF_KERNEL_64: u16 = 0x01;
/// Start info magic.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Offset of the setup header in a bzImage / zero page.
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// The x86 command line limit of Linux 6.1 (`COMMAND_LINE_SIZE`), including the NUL.
pub const DEFAULT_CMDLINE_SIZE: u32 = 2048;

/// Errors of building boot information.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// The file is not a bzImage this loader can start.
    #[error("not a usable bzImage: {0}")]
    BadBzImage(&'static str),
    /// Too many memory map entries.
    #[error("the memory map has {0} entries; at most 128 fit")]
    TooManyE820(usize),
    /// An address does not fit in the 32-bit field that must hold it.
    #[error("{what} at {addr:#x} is above 4 GiB; the boot protocol needs it below")]
    Above4G {
        /// Which field.
        what: &'static str,
        /// Address.
        addr: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the {what} at {addr:#x} into guest memory: {reason}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Address.
        addr: u64,
        /// Cause.
        reason: String,
    },
}

/// What a bzImage's setup header says, validated.
#[derive(Debug, Clone, Copy)]
pub struct BzImageHeader {
    /// The setup header as found in the image.
    pub hdr: setup_header,
    /// File offset of the protected-mode kernel.
    pub kernel_offset: u64,
    /// Length of the protected-mode kernel in the file.
    pub kernel_len: u64,
    /// Memory the kernel needs from its load address while decompressing.
    pub init_size: u64,
    /// Largest address the initrd may end at (exclusive).
    pub initrd_limit: u64,
    /// Largest command line including the NUL.
    pub cmdline_size: u32,
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl BzImageHeader {
    /// Parse the first bytes of a bzImage (at least 1 KiB; the whole setup is fine)
    /// given the total file length.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Self, BootParamsError> {
        let bad = BootParamsError::BadBzImage;
        if le32(head, 0x202) != Some(HDRS_MAGIC) {
            return Err(bad("no \"HdrS\" setup header signature at 0x202"));
        }
        if le16(head, 0x1fe) != Some(BOOT_FLAG) {
            return Err(bad("no 0xaa55 boot flag at 0x1fe"));
        }
        let version = le16(head, 0x206).ok_or(bad("truncated header"))?;
        if version < 0x020c {
            return Err(bad("boot protocol older than 2.12 (no 64-bit entry)"));
        }
        // The header ends at 0x202 + the jump offset byte at 0x201.
        let hdr_end = 0x202 + usize::from(*head.get(0x201).ok_or(bad("truncated header"))?);
        let want = std::mem::size_of::<setup_header>();
        let hdr_len = hdr_end
            .checked_sub(SETUP_HEADER_OFFSET)
            .ok_or(bad("setup header too short"))?
            .min(want);
        let mut raw = vec![0u8; want];
        raw[..hdr_len].copy_from_slice(
            head.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + hdr_len)
                .ok_or(bad("truncated setup header"))?,
        );
        let hdr = <setup_header as vm_memory::ByteValued>::from_slice(&raw)
            .copied()
            .ok_or(bad("setup header size"))?;
        let xloadflags = hdr.xloadflags;
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(bad("kernel has no 64-bit entry point (XLF_KERNEL_64)"));
        }
        let setup_sects = match hdr.setup_sects {
            0 => 4,
            n => u64::from(n),
        };
        let kernel_offset = (setup_sects + 1) * 512;
        if kernel_offset >= file_len {
            return Err(bad("file ends before the protected-mode kernel"));
        }
        let kernel_len = file_len - kernel_offset;
        let init_size = u64::from(hdr.init_size).max(kernel_len);
        let initrd_limit = u64::from(hdr.initrd_addr_max) + 1;
        let cmdline_size = match hdr.cmdline_size {
            0 => 256,
            n => n.min(1 << 20),
        };
        Ok(BzImageHeader {
            hdr,
            kernel_offset,
            kernel_len,
            init_size,
            initrd_limit,
            cmdline_size,
        })
    }
}

/// Inputs of the zero page.
#[derive(Debug, Clone)]
pub struct ZeroPage<'a> {
    /// Setup header from a bzImage, or `None` for a vmlinux.
    pub header: Option<setup_header>,
    /// Command line address.
    pub cmdline: u64,
    /// Command line size including the NUL.
    pub cmdline_size: u32,
    /// Initrd `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// Memory map.
    pub e820: &'a [E820Entry],
    /// ACPI RSDP address (`acpi_rsdp_addr`, read by kernels of boot protocol 2.14+),
    /// or `None` without ACPI tables.
    pub rsdp: Option<u64>,
}

fn low32(what: &'static str, addr: u64) -> Result<u32, BootParamsError> {
    u32::try_from(addr).map_err(|_| BootParamsError::Above4G { what, addr })
}

impl ZeroPage<'_> {
    /// The `boot_params` structure.
    pub fn build(&self) -> Result<boot_params, BootParamsError> {
        if self.e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
            return Err(BootParamsError::TooManyE820(self.e820.len()));
        }
        let mut bp = boot_params::default();
        let mut hdr = match self.header {
            Some(h) => h,
            None => setup_header {
                boot_flag: BOOT_FLAG,
                header: HDRS_MAGIC,
                version: 0x020f,
                kernel_alignment: 0x0100_0000,
                initrd_addr_max: 0x7fff_ffff,
                ..Default::default()
            },
        };
        hdr.type_of_loader = LOADER_UNDEFINED;
        hdr.loadflags |= LOADED_HIGH;
        hdr.cmd_line_ptr = low32("command line", self.cmdline)?;
        hdr.cmdline_size = self.cmdline_size.saturating_sub(1);
        if let Some((addr, size)) = self.initrd {
            hdr.ramdisk_image = low32("initrd", addr)?;
            hdr.ramdisk_size = u32::try_from(size).map_err(|_| BootParamsError::Above4G {
                what: "initrd size",
                addr: size,
            })?;
        }
        bp.hdr = hdr;
        bp.acpi_rsdp_addr = self.rsdp.unwrap_or(0);
        for (i, e) in self.e820.iter().enumerate() {
            bp.e820_table[i] = e.to_boot();
        }
        bp.e820_entries = self.e820.len() as u8;
        Ok(bp)
    }

    /// Build and write at `addr`.
    pub fn write(&self, mem: &GuestMemoryMmap, addr: u64) -> Result<(), BootParamsError> {
        let bp = self.build()?;
        mem.write_obj(bp, GuestAddress(addr))
            .map_err(|e| BootParamsError::Write {
                what: "zero page",
                addr,
                reason: e.to_string(),
            })
    }
}

/// Where the PVH structures go, and what they say.
#[derive(Debug, Clone)]
pub struct StartInfo<'a> {
    /// Address of `hvm_start_info` (the memory map and module list follow it).
    pub addr: u64,
    /// Command line address.
    pub cmdline: u64,
    /// Initrd `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// Memory map.
    pub e820: &'a [E820Entry],
    /// ACPI RSDP address (`rsdp_paddr`), or `None` without ACPI tables.
    pub rsdp: Option<u64>,
}

/// Bytes from the start info address the PVH structures occupy for `entries` map
/// entries (start info, one module, the map).
pub fn start_info_len(entries: usize) -> u64 {
    let fixed = std::mem::size_of::<hvm_start_info>() + std::mem::size_of::<hvm_modlist_entry>();
    (fixed + entries * std::mem::size_of::<hvm_memmap_table_entry>()) as u64
}

impl StartInfo<'_> {
    /// The start info with its module list and memory map, as written by [`Self::write`].
    pub fn build(
        &self,
    ) -> (
        hvm_start_info,
        Option<hvm_modlist_entry>,
        Vec<hvm_memmap_table_entry>,
    ) {
        let modlist = self.addr + std::mem::size_of::<hvm_start_info>() as u64;
        let memmap = modlist + std::mem::size_of::<hvm_modlist_entry>() as u64;
        let module = self.initrd.map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        });
        let info = hvm_start_info {
            magic: PVH_MAGIC,
            version: 1,
            flags: 0,
            nr_modules: u32::from(module.is_some()),
            modlist_paddr: if module.is_some() { modlist } else { 0 },
            cmdline_paddr: self.cmdline,
            rsdp_paddr: self.rsdp.unwrap_or(0),
            memmap_paddr: memmap,
            memmap_entries: self.e820.len() as u32,
            reserved: 0,
        };
        (info, module, self.e820.iter().map(|e| e.to_hvm()).collect())
    }

    /// Write the start info, the module entry and the memory map.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), BootParamsError> {
        if self.e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
            return Err(BootParamsError::TooManyE820(self.e820.len()));
        }
        let (info, module, map) = self.build();
        let err = |what: &'static str, addr: u64| {
            move |e: vm_memory::GuestMemoryError| BootParamsError::Write {
                what,
                addr,
                reason: e.to_string(),
            }
        };
        mem.write_obj(info, GuestAddress(self.addr))
            .map_err(err("PVH start info", self.addr))?;
        let modlist = self.addr + std::mem::size_of::<hvm_start_info>() as u64;
        if let Some(m) = module {
            mem.write_obj(m, GuestAddress(modlist))
                .map_err(err("PVH module list", modlist))?;
        }
        let mut at = info.memmap_paddr;
        for e in map {
            mem.write_obj(e, GuestAddress(at))
                .map_err(err("PVH memory map", at))?;
            at += std::mem::size_of::<hvm_memmap_table_entry>() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::e820::{memory_map, RamLayout};
    use super::*;

    /// A bzImage head with the fields the parser looks at.
    pub(crate) fn fake_bzimage(setup_sects: u8, version: u16, xlf: u16, total: usize) -> Vec<u8> {
        let mut b = vec![0u8; total];
        b[0x1f1] = setup_sects;
        b[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        b[0x200] = 0xeb;
        b[0x201] = 0x6a; // header ends at 0x26c
        b[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x211] = 0x01; // loadflags LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        b[0x236..0x238].copy_from_slice(&xlf.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        b[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        b
    }

    #[test]
    fn parses_bzimage_header() {
        let img = fake_bzimage(3, 0x020f, XLF_KERNEL_64, 8192);
        let h = BzImageHeader::parse(&img, img.len() as u64).unwrap();
        assert_eq!(h.kernel_offset, 4 * 512);
        assert_eq!(h.kernel_len, 8192 - 2048);
        assert_eq!(h.init_size, 0x40_0000);
        assert_eq!(h.initrd_limit, 0x8000_0000);
        assert_eq!(h.cmdline_size, 2048);
        let code32 = h.hdr.code32_start;
        assert_eq!(code32, 0x10_0000);
    }

    #[test]
    fn rejects_bad_bzimages() {
        let mut img = fake_bzimage(3, 0x020f, XLF_KERNEL_64, 8192);
        img[0x202] = b'X';
        assert!(BzImageHeader::parse(&img, 8192).is_err());
        let img = fake_bzimage(3, 0x020b, XLF_KERNEL_64, 8192);
        assert!(BzImageHeader::parse(&img, 8192).is_err(), "too old");
        let img = fake_bzimage(3, 0x020f, 0, 8192);
        assert!(BzImageHeader::parse(&img, 8192).is_err(), "no 64-bit entry");
        let img = fake_bzimage(30, 0x020f, XLF_KERNEL_64, 8192);
        assert!(
            BzImageHeader::parse(&img, 8192).is_err(),
            "setup beyond file end"
        );
        assert!(
            BzImageHeader::parse(&img[..0x203], 8192).is_err(),
            "truncated"
        );
        assert!(BzImageHeader::parse(&[], 0).is_err());
    }

    #[test]
    fn zero_page_fields() {
        let map = memory_map(&RamLayout::new(128 << 20, 0xc000_0000).unwrap());
        let zp = ZeroPage {
            header: None,
            cmdline: 0x2_0000,
            cmdline_size: 2048,
            initrd: Some((0x700_0000, 0x1234)),
            e820: &map,
            rsdp: None,
        };
        let bp = zp.build().unwrap();
        let rsdp = bp.acpi_rsdp_addr;
        assert_eq!(rsdp, 0, "no ACPI: no RSDP");
        let with_acpi = ZeroPage {
            rsdp: Some(0xf_0000),
            ..zp.clone()
        };
        let rsdp = with_acpi.build().unwrap().acpi_rsdp_addr;
        assert_eq!(rsdp, 0xf_0000);
        let h = bp.hdr;
        let (flag, magic, loader, cmd, rd, rdsz, cmdsz) = (
            h.boot_flag,
            h.header,
            h.type_of_loader,
            h.cmd_line_ptr,
            h.ramdisk_image,
            h.ramdisk_size,
            h.cmdline_size,
        );
        assert_eq!(flag, BOOT_FLAG);
        assert_eq!(magic, HDRS_MAGIC);
        assert_eq!(loader, LOADER_UNDEFINED);
        assert_eq!(cmd, 0x2_0000);
        assert_eq!((rd, rdsz), (0x700_0000, 0x1234));
        assert_eq!(cmdsz, 2047);
        assert_eq!(bp.e820_entries as usize, map.len());
        let last = bp.e820_table[map.len() - 1];
        let (a, s, t) = (last.addr, last.size, last.r#type);
        assert_eq!((a, a + s, t), (0x10_0000, 128 << 20, 1));

        let high = ZeroPage {
            initrd: Some((1 << 32, 16)),
            ..zp.clone()
        };
        assert!(matches!(high.build(), Err(BootParamsError::Above4G { .. })));
        let many = vec![map[0]; 129];
        let over = ZeroPage { e820: &many, ..zp };
        assert_eq!(over.build().unwrap_err(), BootParamsError::TooManyE820(129));
    }

    #[test]
    fn start_info_in_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let map = memory_map(&RamLayout::new(64 << 20, 0xc000_0000).unwrap());
        let si = StartInfo {
            addr: 0x6000,
            cmdline: 0x2_0000,
            initrd: Some((0x300_0000, 0x5000)),
            e820: &map,
            rsdp: None,
        };
        si.write(&mem).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).unwrap();
        assert_eq!(info.rsdp_paddr, 0, "no ACPI: no RSDP");
        let with_acpi = StartInfo {
            rsdp: Some(0xf_0000),
            ..si.clone()
        };
        assert_eq!(with_acpi.build().0.rsdp_paddr, 0xf_0000);
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.cmdline_paddr, 0x2_0000);
        assert_eq!(info.memmap_entries as usize, map.len());
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x5000));
        for (i, e) in map.iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(got, e.to_hvm());
        }
        assert!(info.memmap_paddr + 24 * map.len() as u64 <= 0x6000 + start_info_len(map.len()));

        let none = StartInfo {
            initrd: None,
            ..si.clone()
        };
        let (info, module, _) = none.build();
        assert_eq!((info.nr_modules, info.modlist_paddr, module), (0, 0, None));
        let outside = StartInfo {
            addr: 0xf_fff0,
            ..si
        };
        assert!(outside.write(&mem).is_err());
    }
}
