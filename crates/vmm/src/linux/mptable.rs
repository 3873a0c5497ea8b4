//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its
//! CPUs, its I/O APIC and the interrupt routing of ISA and PCI devices.
//!
//! The table is assembled in a local byte buffer (little endian, packed as the spec
//! lays it out) and written to guest memory in one `write_slice`; nothing is read back
//! from the guest. Layout: the 16-byte floating pointer structure ("_MP_") at the
//! chosen address, immediately followed by the configuration table ("PCMP") with:
//! one processor entry per vCPU (local APIC id = index, the first is the bootstrap
//! processor), bus 0 = PCI and bus 1 = ISA, one I/O APIC, I/O interrupt entries for ISA
//! IRQs 0..16 (IRQ 0 to pin 2 as on a PC, the others identity mapped; IRQ 2 is the
//! cascade and skipped) and for every PCI INTx route the VMM declares (level, active
//! low), and the local interrupt entries ExtINT -> LINT0, NMI -> LINT1.
//!
//! Linux scans the last KiB of base memory for the floating pointer, which is where
//! [`super::LinuxLayout`] puts it by default (the range is reserved in the e820 map).
//! With `noapic` on the command line Linux ignores the I/O APIC and routing entries and
//! uses the 8259 PICs; the processor entries still count.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// I/O APIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Largest vCPU count a table can describe here (local APIC ids are 8 bits, and the
/// I/O APIC takes the id after the last CPU).
pub const MAX_CPUS: u8 = 254;
/// ISA bus id in the table.
pub const ISA_BUS: u8 = 1;
/// PCI bus id in the table.
pub const PCI_BUS: u8 = 0;

const MPF_LEN: usize = 16;
const MPC_HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity active low (bits 1:0 = 3), trigger level (bits 3:2 = 3).
const IRQFLAG_LEVEL_LOW: u16 = 0x000f;
/// Conforming to the bus (ISA: edge, active high).
const IRQFLAG_CONFORM: u16 = 0;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// The vCPU count is 0 or too large.
    #[error("{0} vCPUs cannot be described by an MP table (1..=254)")]
    Cpus(usize),
    /// A PCI route is malformed.
    #[error(
        "PCI INTx route {0:?} is invalid: device must be < 32, pin 1..=4 (INTA..INTD), irq < 24"
    )]
    Route(PciIntxRoute),
    /// The table does not fit below the address limit or in guest memory.
    #[error("the MP table ({len} bytes at {addr:#x}) does not fit in guest memory: {reason}")]
    Write {
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
        /// Cause.
        reason: String,
    },
}

/// A PCI function's legacy interrupt, as wired by the VMM: device `device` on bus 0,
/// pin `pin` (1 = INTA .. 4 = INTD) raises I/O APIC / PIC line `irq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntxRoute {
    /// PCI device number (0..32).
    pub device: u8,
    /// Interrupt pin as in config space (1..=4).
    pub pin: u8,
    /// Interrupt line (GSI) the VMM raises.
    pub irq: u8,
}

impl PciIntxRoute {
    /// A checked route.
    pub fn new(device: u8, pin: u8, irq: u8) -> Result<Self, MpTableError> {
        let r = PciIntxRoute { device, pin, irq };
        if device >= 32 || !(1..=4).contains(&pin) || irq >= 24 {
            return Err(MpTableError::Route(r));
        }
        Ok(r)
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

fn intsrc(v: &mut Vec<u8>, kind: u8, flags: u16, bus: u8, bus_irq: u8, ioapic: u8, pin: u8) {
    v.push(ENTRY_INTSRC);
    v.push(kind);
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&[bus, bus_irq, ioapic, pin]);
}

/// The table bytes (floating pointer + configuration table) as they must appear at
/// guest physical `addr`.
pub fn build(addr: u32, cpus: usize, routes: &[PciIntxRoute]) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS as usize {
        return Err(MpTableError::Cpus(cpus));
    }
    for r in routes {
        PciIntxRoute::new(r.device, r.pin, r.irq)?;
    }
    let ioapic_id = cpus as u8; // after the CPUs' local APIC ids
    let table_addr = addr
        .checked_add(MPF_LEN as u32)
        .ok_or(MpTableError::Write {
            addr: addr.into(),
            len: MPF_LEN,
            reason: "address overflow".into(),
        })?;

    // header, CPUs, 2 buses + I/O APIC + 15 ISA + 2 local interrupts, PCI routes
    let mut t = Vec::with_capacity(
        MPC_HEADER_LEN + cpus * PROCESSOR_LEN + (20 + routes.len()) * SMALL_ENTRY_LEN,
    );
    // Configuration table header; length, count and checksum are patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&[0, 0]); // base table length
    t.push(4); // spec revision 1.4
    t.push(0); // checksum
    t.extend_from_slice(b"NESTIO  "); // OEM id, 8 bytes
    t.extend_from_slice(b"nestio-vmm  "); // product id, 12 bytes
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    debug_assert_eq!(t.len(), MPC_HEADER_LEN);
    let mut count: u16 = 0;

    for cpu in 0..cpus {
        t.push(ENTRY_PROCESSOR);
        t.push(cpu as u8); // local APIC id
        t.push(0x14); // local APIC version
        t.push(if cpu == 0 { 0x3 } else { 0x1 }); // enabled, BSP
        t.extend_from_slice(&0x0006_0fb1u32.to_le_bytes()); // family 6 signature
        t.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU + APIC feature bits
        t.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(PCI_BUS, b"PCI   "), (ISA_BUS, b"ISA   ")] {
        t.push(ENTRY_BUS);
        t.push(id);
        t.extend_from_slice(name);
        count += 1;
    }
    t.push(ENTRY_IOAPIC);
    t.push(ioapic_id);
    t.push(0x11); // I/O APIC version
    t.push(1); // enabled
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0u8..16 {
        match irq {
            0 => intsrc(
                &mut t,
                INT_TYPE_INT,
                IRQFLAG_CONFORM,
                ISA_BUS,
                0,
                ioapic_id,
                2,
            ),
            2 => continue,
            _ => intsrc(
                &mut t,
                INT_TYPE_INT,
                IRQFLAG_CONFORM,
                ISA_BUS,
                irq,
                ioapic_id,
                irq,
            ),
        }
        count += 1;
    }
    for r in routes {
        let source = (r.device << 2) | (r.pin - 1);
        intsrc(
            &mut t,
            INT_TYPE_INT,
            IRQFLAG_LEVEL_LOW,
            PCI_BUS,
            source,
            ioapic_id,
            r.irq,
        );
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        t.push(ENTRY_LINTSRC);
        t.push(kind);
        t.extend_from_slice(&IRQFLAG_CONFORM.to_le_bytes());
        t.extend_from_slice(&[ISA_BUS, 0, 0xff, lint]); // all local APICs
        count += 1;
    }
    let len = u16::try_from(t.len()).map_err(|_| MpTableError::Write {
        addr: table_addr.into(),
        len: t.len(),
        reason: "table longer than 64 KiB".into(),
    })?;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[7] = checksum(&t);

    let mut out = Vec::with_capacity(MPF_LEN + t.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision 1.4
    out.push(0); // checksum
    out.extend_from_slice(&[0; 5]); // feature bytes: table present, no IMCR
    out[10] = checksum(&out);
    out.extend_from_slice(&t);
    Ok(out)
}

/// Build the table and write it at `addr` in guest memory; returns its length.
pub fn write(
    mem: &GuestMemoryMmap,
    addr: u32,
    cpus: usize,
    routes: &[PciIntxRoute],
) -> Result<usize, MpTableError> {
    let bytes = build(addr, cpus, routes)?;
    mem.write_slice(&bytes, GuestAddress(addr.into()))
        .map_err(|e| MpTableError::Write {
            addr: addr.into(),
            len: bytes.len(),
            reason: e.to_string(),
        })?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers() {
        let routes = [PciIntxRoute::new(1, 1, 11).unwrap()];
        let b = build(0x9_fc00, 2, &routes).unwrap();
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 0x9_fc10);
        let t = &b[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(sum(t), 0, "configuration table checksum");
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        // 2 CPUs + 2 buses + 1 I/O APIC + 15 ISA + 1 PCI + 2 local = 23 entries.
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 23);
        assert_eq!(len, 44 + 2 * 20 + 21 * 8);
    }

    #[test]
    fn entries_describe_cpus_and_pci_route() {
        let routes = [PciIntxRoute::new(3, 2, 10).unwrap()];
        let b = build(0x9_fc00, 2, &routes).unwrap();
        let t = &b[16..];
        let mut off = 44;
        let mut cpus = vec![];
        let mut pci = vec![];
        let mut ioapic = None;
        while off < t.len() {
            match t[off] {
                0 => {
                    cpus.push((t[off + 1], t[off + 3]));
                    off += 20;
                }
                2 => {
                    ioapic = Some((
                        t[off + 1],
                        u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()),
                    ));
                    off += 8;
                }
                3 => {
                    if t[off + 4] == PCI_BUS {
                        pci.push((t[off + 2], t[off + 5], t[off + 7]));
                    }
                    off += 8;
                }
                1 | 4 => off += 8,
                x => panic!("unknown entry type {x}"),
            }
        }
        assert_eq!(cpus, vec![(0, 3), (1, 1)]);
        assert_eq!(ioapic, Some((2, IOAPIC_ADDR)));
        // device 3, INTB (pin 2) -> source (3 << 2) | 1, level/low, irq 10.
        assert_eq!(pci, vec![(0x0f, (3 << 2) | 1, 10)]);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(build(0x9_fc00, 0, &[]), Err(MpTableError::Cpus(0)));
        assert_eq!(build(0x9_fc00, 255, &[]), Err(MpTableError::Cpus(255)));
        assert!(PciIntxRoute::new(32, 1, 5).is_err());
        assert!(PciIntxRoute::new(1, 0, 5).is_err());
        assert!(PciIntxRoute::new(1, 5, 5).is_err());
        assert!(PciIntxRoute::new(1, 1, 24).is_err());
        let bad = PciIntxRoute {
            device: 40,
            pin: 1,
            irq: 1,
        };
        assert!(matches!(
            build(0x9_fc00, 1, &[bad]),
            Err(MpTableError::Route(_))
        ));
        assert!(build(u32::MAX - 4, 1, &[]).is_err());
    }

    #[test]
    fn write_checks_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xa_0000)]).unwrap();
        let n = write(&mem, 0x9_fc00, 1, &[]).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(0x9_fc10)).unwrap();
        assert_eq!(&sig, b"PCMP");
        assert!(n < 0x400);
        assert_eq!(n, 16 + 44 + 20 + 20 * 8);
        assert!(
            write(&mem, 0x9_ff80, 1, &[]).is_err(),
            "runs past the end of memory"
        );
    }
}
