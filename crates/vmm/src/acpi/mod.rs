//! ACPI tables that describe the machine to a guest OS (`nestio run --acpi on`).
//!
//! The tables are generated with the rust-vmm [`acpi_tables`] crate (RSDP, XSDT, FADT,
//! FACS, MADT, MCFG and the AML builder for the DSDT); only the two MADT structures it
//! lacks (interrupt source override, local APIC NMI) and the MADT `PCAT_COMPAT` flag
//! are written here. [`AcpiTables::build`] lays everything out in one byte blob meant
//! for guest physical [`ACPI_BASE`], the start of the BIOS area `[0xf0000, 1 MiB)` that
//! the e820 map already reserves (see [`crate::linux::e820`]): nothing the kernel uses
//! as RAM, and apart from the MP table at `0x9fc00` and the boot structures below
//! `0x9fc00`. The RSDP sits first, 16-byte aligned, so a kernel that scans
//! `0xe0000..0x100000` finds it too; the boot protocol also hands its address over
//! (`boot_params.acpi_rsdp_addr`, PVH `rsdp_paddr`).
//!
//! | table | contents |
//! |-------|----------|
//! | RSDP (rev 2) | → XSDT |
//! | XSDT | → FADT, MADT, MCFG |
//! | FADT (rev 6.5) | full (not hardware-reduced) profile, no PM timer; → FACS, DSDT |
//! | FACS | required by a non-reduced FADT; no firmware waking vector |
//! | MADT | one local APIC per vCPU (ids `0..n`), the I/O APIC (id `n`, GSI base 0), overrides, LINT1 = NMI |
//! | MCFG | the ECAM window of [`crate::pci`] (segment 0, its bus range) |
//! | DSDT | `\_SB.PCI0` host bridge, `\_SB.MBRD` motherboard resources, `\_S5_` |
//!
//! Why not hardware-reduced: on x86 Linux takes a hardware-reduced FADT to mean "no
//! legacy PIC and no PIT" (`acpi_generic_reduced_hw_init` installs the null PIC), but
//! the nestio guests run with `noapic` on the in-kernel 8259s. A full FADT needs the
//! PM1 event/control register blocks and the SCI; those are [`pm::PmRegisters`] at
//! port [`PM_BASE`] (PM1a_EVT at `0x600`, PM1a_CNT at `0x604`) and GSI [`SCI_IRQ`] (9,
//! the PC convention). There is no PM timer (allowed since FADT 5.0: the kernel uses
//! the TSC / kvm-clock), no GPE block and no SMI command port (the machine is always
//! in ACPI mode, SCI_EN reads 1). Reset goes through the FADT reset register = the
//! keyboard controller (`0xfe` to port `0x64`), the same exit `reboot=k` uses.
//!
//! Clean shutdown: `\_S5_` is `Package {5, 5, 0, 0}`; the guest writes
//! `SLP_TYP = 5 | SLP_EN` to PM1a_CNT and [`pm::PmRegisters`] reports a power-off to
//! the VMM, which ends the VM with status 0.
//!
//! Interrupts: the `_PRT` lists every slot 1..31 and pin INTA..INTD with the GSI that
//! [`IntxRouting::gsi`] gives — the lines the VMM really raises. The entries are
//! static (no link devices), so the guest treats them as level-triggered, active low;
//! the MADT has a matching override (level, active low) for each ISA line among them
//! and for the SCI, so the I/O APIC and the `_PRT` agree. With `noapic` Linux stays in
//! PIC mode and uses the same numbers as 8259 lines (it then sets the ELCR itself).
//! ISA IRQ 0 has no override: the VMM's GSI routing sends GSI 0 to I/O APIC pin 0.

pub mod pm;

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::irqchip::x86::IntxRouting;
use crate::linux::mptable::{IOAPIC_ADDR, LAPIC_ADDR, MAX_CPUS};
use crate::pci::{ECAM_BASE, ECAM_SIZE, MMIO_WINDOW, PIO_WINDOW};

/// Guest physical address of the table area (the RSDP is its first byte).
pub const ACPI_BASE: u64 = 0xf_0000;
/// Size of the table area (up to 1 MiB, reserved in the e820 map).
pub const ACPI_AREA_LEN: u64 = 0x1_0000;
/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"NESTIO";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"NESTIOVM";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// The SCI's GSI / ISA IRQ.
pub const SCI_IRQ: u8 = 9;
/// First port of the PM1 register blocks ([`pm::PmRegisters`]).
pub const PM_BASE: u16 = 0x600;
/// PM1a_EVT_BLK length (PM1_STS + PM1_EN, 16 bits each).
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a_CNT_BLK length.
pub const PM1_CNT_LEN: u8 = 2;
/// Ports the PM device decodes (`PM_BASE..PM_BASE + PM_LEN`).
pub const PM_LEN: u64 = (PM1_EVT_LEN + PM1_CNT_LEN) as u64;
/// The SLP_TYP value of `\_S5_` (soft off).
pub const S5_SLP_TYP: u8 = 5;
/// Port and value of the FADT reset register (the keyboard controller reset).
pub const RESET_REG: (u16, u8) = (0x64, 0xfe);

/// MADT flag: the machine also has dual 8259s.
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: active low (bits 1:0 = 3), level (bits 3:2 = 3).
const INTI_LEVEL_LOW: u16 = 0x000f;
/// IA-PC boot architecture flags: legacy (ISA) devices, no VGA, no ASPM, no CMOS RTC.
const IAPC_BOOT_ARCH: u16 = 1 | (1 << 2) | (1 << 4) | (1 << 5);

/// Errors of building or placing the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The vCPU count does not fit the MADT.
    #[error("{0} vCPUs cannot be described in the MADT: use 1..=254")]
    Cpus(usize),
    /// The area address is unusable.
    #[error("the ACPI table area at {0:#x} must be 64-byte aligned and end below 4 GiB")]
    BadBase(u64),
    /// The tables outgrow their area.
    #[error("the ACPI tables need {len:#x} bytes but the area at {base:#x} holds only {max:#x}; describe fewer vCPUs or devices")]
    TooLarge {
        /// Area address.
        base: u64,
        /// Bytes needed.
        len: u64,
        /// Area size.
        max: u64,
    },
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables into guest memory at {addr:#x}: {reason} (give the VM at least 1 MiB of RAM)")]
    Write {
        /// Address.
        addr: u64,
        /// Cause.
        reason: String,
    },
}

/// What the tables describe. Built by [`AcpiConfig::new`], which checks the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    cpus: u8,
    intx: IntxRouting,
}

impl AcpiConfig {
    /// `cpus` vCPUs (local APIC ids `0..cpus`), PCI INTx wired as `intx` says.
    pub fn new(cpus: usize, intx: IntxRouting) -> Result<Self, AcpiError> {
        match u8::try_from(cpus) {
            Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(AcpiConfig { cpus: n, intx }),
            _ => Err(AcpiError::Cpus(cpus)),
        }
    }

    /// vCPU count.
    pub fn cpus(&self) -> usize {
        self.cpus.into()
    }

    /// INTx wiring.
    pub fn intx(&self) -> IntxRouting {
        self.intx
    }

    /// The `_PRT` entries: `(slot, pin 0..4 = INTA..INTD, GSI)` for slots 1..31.
    pub fn prt(&self) -> Vec<(u8, u8, u32)> {
        (1..32u8)
            .flat_map(|slot| (0..4u8).map(move |pin| (slot, pin)))
            .map(|(slot, pin)| (slot, pin, self.intx.gsi(slot, pin + 1)))
            .collect()
    }

    /// ISA lines (below 16) that get a level / active-low override: the SCI and every
    /// line the `_PRT` uses, sorted, without duplicates.
    pub fn level_isa_lines(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self
            .prt()
            .into_iter()
            .filter_map(|(_, _, gsi)| u8::try_from(gsi).ok().filter(|g| *g < 16))
            .chain([SCI_IRQ])
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One table in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableInfo {
    /// Signature (`b"RSD "` for the RSDP, whose real signature is 8 bytes).
    pub signature: [u8; 4],
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// The generated tables, laid out for one guest physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    base: u64,
    bytes: Vec<u8>,
    tables: Vec<TableInfo>,
}

/// MADT interrupt source override (type 2), which `acpi_tables` does not have.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT local APIC NMI (type 4), which `acpi_tables` does not have.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16<LE>,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// The byte that makes `bytes` sum to zero (mod 256) when stored in it.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Whether `bytes` sum to zero (mod 256), as every ACPI table must.
pub fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cfg.cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(cfg.cpus, IOAPIC_ADDR, 0));
    for line in cfg.level_isa_lines() {
        m.add_structure(InterruptSourceOverride {
            kind: 2,
            length: 10,
            bus: 0,
            source: line,
            gsi: u32::from(line).into(),
            flags: INTI_LEVEL_LOW.into(),
        });
    }
    m.add_structure(LocalApicNmi {
        kind: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0.into(),
        lint: 1,
    });
    let mut b = bytes_of(&m);
    // The crate leaves the flags at 0: set PCAT_COMPAT (we do have the 8259s).
    b[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    b[9] = 0;
    b[9] = checksum(&b);
    b
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(ECAM_BASE, 0, 0, ecam_last_bus());
    bytes_of(&m)
}

/// Last bus the ECAM window decodes (1 MiB per bus).
pub fn ecam_last_bus() -> u8 {
    u8::try_from((ECAM_SIZE >> 20).saturating_sub(1)).unwrap_or(u8::MAX)
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    // \_SB.PCI0: the host bridge with its windows and the legacy interrupt routing.
    let routes = cfg.prt();
    let mut prt = aml::PackageBuilder::new();
    for (slot, pin, gsi) in &routes {
        let addr = (u32::from(*slot) << 16) | 0xffff;
        prt.add_element(&aml::Package::new(vec![&addr, pin, &aml::ZERO, gsi]));
    }
    let bus = AddressSpace::new_bus_number(0u16, u16::from(ecam_last_bus()));
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io = AddressSpace::new_io(PIO_WINDOW.0 as u16, (PIO_WINDOW.1 - 1) as u16, None);
    let mem = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        MMIO_WINDOW.0 as u32,
        (MMIO_WINDOW.1 - 1) as u32,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![&bus, &cfg_ports, &io, &mem]);
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let pci0_children: Vec<Box<dyn Aml>> = vec![
        Box::new(aml::Name::new("_HID".into(), &hid)),
        Box::new(aml::Name::new("_CID".into(), &cid)),
        Box::new(aml::Name::new("_ADR".into(), &aml::ZERO)),
        Box::new(aml::Name::new("_SEG".into(), &aml::ZERO)),
        Box::new(aml::Name::new("_UID".into(), &aml::ZERO)),
        Box::new(aml::Name::new("_BBN".into(), &aml::ZERO)),
        Box::new(aml::Name::new("_CRS".into(), &pci_crs)),
        Box::new(aml::Name::new("_PRT".into(), &prt)),
    ];
    let pci0 = aml::Device::new(
        "PCI0".into(),
        pci0_children.iter().map(|c| c.as_ref()).collect(),
    );

    // \_SB.MBRD: resources the OS must leave alone (the ECAM window, the PM ports), so
    // Linux accepts the MCFG window as reserved.
    let ecam = aml::Memory32Fixed::new(true, ECAM_BASE as u32, ECAM_SIZE as u32);
    let pm_ports = aml::IO::new(PM_BASE, PM_BASE, 1, PM_LEN as u8);
    let mb_crs = aml::ResourceTemplate::new(vec![&ecam, &pm_ports]);
    let mb_hid = aml::EISAName::new("PNP0C02");
    let mb_name_hid = aml::Name::new("_HID".into(), &mb_hid);
    let mb_uid = aml::Name::new("_UID".into(), &aml::ONE);
    let mb_name_crs = aml::Name::new("_CRS".into(), &mb_crs);
    let mbrd = aml::Device::new("MBRD".into(), vec![&mb_name_hid, &mb_uid, &mb_name_crs]);

    let sb = aml::Scope::new("\\_SB_".into(), vec![&pci0, &mbrd]);
    let s5_package = aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]);
    let s5 = aml::Name::new("_S5_".into(), &s5_package);

    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&bytes_of(&sb));
    t.append_slice(&bytes_of(&s5));
    t.as_slice().to_vec()
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let io_gas = |width: u8, port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            width,
            0,
            AccessSize::Undefined,
            port.into(),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_64(facs)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    let evt = u32::from(PM_BASE);
    let cnt = evt + u32::from(PM1_EVT_LEN);
    f.sci_int = u16::from(SCI_IRQ).into();
    f.pm1a_evt_blk = evt.into();
    f.pm1a_cnt_blk = cnt.into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1_cnt_len = PM1_CNT_LEN;
    f.x_pm1a_evt_blk = io_gas(PM1_EVT_LEN * 8, PM_BASE);
    f.x_pm1a_cnt_blk = io_gas(PM1_CNT_LEN * 8, cnt as u16);
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    f.reset_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_REG.0.into(),
    );
    f.reset_value = RESET_REG.1;
    bytes_of(&f.finalize())
}

/// Appends tables at aligned offsets and remembers where each went.
struct Layout {
    base: u64,
    bytes: Vec<u8>,
    tables: Vec<TableInfo>,
}

impl Layout {
    fn place(&mut self, signature: [u8; 4], align: usize, table: &[u8]) -> u64 {
        let off = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(off, 0);
        self.bytes.extend_from_slice(table);
        let addr = self.base + off as u64;
        self.tables.push(TableInfo {
            signature,
            addr,
            len: table.len(),
        });
        addr
    }
}

impl AcpiTables {
    /// All tables for `cfg`, laid out for guest physical `base` (64-byte aligned; the
    /// area `[base, base + ACPI_AREA_LEN)` must end below 4 GiB).
    pub fn build(base: u64, cfg: &AcpiConfig) -> Result<Self, AcpiError> {
        if !base.is_multiple_of(64) || base.checked_add(ACPI_AREA_LEN).is_none_or(|e| e > 1 << 32) {
            return Err(AcpiError::BadBase(base));
        }
        let mut l = Layout {
            base,
            bytes: vec![0; Rsdp::len()],
            tables: Vec::new(),
        };
        let facs = l.place(*b"FACS", 64, bytes_of(&FACS::new()).as_slice());
        let dsdt = l.place(*b"DSDT", 16, &dsdt(cfg));
        let fadt = l.place(*b"FACP", 16, &fadt(facs, dsdt));
        let madt = l.place(*b"APIC", 16, &madt(cfg));
        let mcfg = l.place(*b"MCFG", 16, &mcfg());
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        for t in [fadt, madt, mcfg] {
            xsdt.add_entry(t);
        }
        let xsdt = l.place(*b"XSDT", 16, &bytes_of(&xsdt));
        let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt));
        l.bytes[..rsdp.len()].copy_from_slice(&rsdp);
        l.tables.insert(
            0,
            TableInfo {
                signature: *b"RSD ",
                addr: base,
                len: rsdp.len(),
            },
        );
        let len = l.bytes.len() as u64;
        if len > ACPI_AREA_LEN {
            return Err(AcpiError::TooLarge {
                base,
                len,
                max: ACPI_AREA_LEN,
            });
        }
        Ok(AcpiTables {
            base,
            bytes: l.bytes,
            tables: l.tables,
        })
    }

    /// Guest physical address of the RSDP (the area's first byte).
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }

    /// The whole area as it goes into guest memory.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where each table is, RSDP first.
    pub fn tables(&self) -> &[TableInfo] {
        &self.tables
    }

    /// The bytes of the table with `signature` (`b"RSD "` for the RSDP).
    pub fn table(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        let t = self.tables.iter().find(|t| &t.signature == signature)?;
        let off = usize::try_from(t.addr - self.base).ok()?;
        self.bytes.get(off..off.checked_add(t.len)?)
    }

    /// Copy the area into guest memory at its address.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        mem.write_slice(&self.bytes, GuestAddress(self.base))
            .map_err(|e| AcpiError::Write {
                addr: self.base,
                reason: e.to_string(),
            })?;
        tracing::debug!(
            rsdp = format_args!("{:#x}", self.base),
            len = self.bytes.len(),
            "ACPI tables written"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests;
