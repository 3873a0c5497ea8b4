//! Register map of the SMMUv3 programming interface (FACTS §5; Arm IHI 0070).
//!
//! Only offsets and field positions live here; the behaviour of each register is
//! in the device ([`super::Smmu`]). Page 1 (offset `0x1_0000`) holds the event
//! queue's PROD/CONS; like QEMU's model the device also answers them in page 0.

#![allow(missing_docs)] // register and field names are the architecture's (Arm IHI 0070)

/// Size of the MMIO window: two 64 KiB register pages.
pub const MMIO_SIZE: u64 = 0x2_0000;

pub const IDR0: u64 = 0x00;
pub const IDR1: u64 = 0x04;
pub const IDR2: u64 = 0x08;
pub const IDR3: u64 = 0x0c;
pub const IDR4: u64 = 0x10;
pub const IDR5: u64 = 0x14;
pub const IIDR: u64 = 0x18;
pub const AIDR: u64 = 0x1c;
pub const CR0: u64 = 0x20;
pub const CR0ACK: u64 = 0x24;
pub const CR1: u64 = 0x28;
pub const CR2: u64 = 0x2c;
pub const STATUSR: u64 = 0x40;
pub const GBPA: u64 = 0x44;
pub const AGBPA: u64 = 0x48;
pub const IRQ_CTRL: u64 = 0x50;
pub const IRQ_CTRLACK: u64 = 0x54;
pub const GERROR: u64 = 0x60;
pub const GERRORN: u64 = 0x64;
pub const GERROR_IRQ_CFG0: u64 = 0x68;
pub const GERROR_IRQ_CFG1: u64 = 0x70;
pub const GERROR_IRQ_CFG2: u64 = 0x74;
pub const STRTAB_BASE: u64 = 0x80;
pub const STRTAB_BASE_CFG: u64 = 0x88;
pub const CMDQ_BASE: u64 = 0x90;
pub const CMDQ_PROD: u64 = 0x98;
pub const CMDQ_CONS: u64 = 0x9c;
pub const EVENTQ_BASE: u64 = 0xa0;
/// Page-0 alias of EVENTQ_PROD (the architected one is in page 1).
pub const EVENTQ_PROD_P0: u64 = 0xa8;
pub const EVENTQ_CONS_P0: u64 = 0xac;
pub const EVENTQ_IRQ_CFG0: u64 = 0xb0;
pub const EVENTQ_IRQ_CFG1: u64 = 0xb8;
pub const EVENTQ_IRQ_CFG2: u64 = 0xbc;
pub const EVENTQ_PROD: u64 = 0x1_00a8;
pub const EVENTQ_CONS: u64 = 0x1_00ac;

// CR0 / CR0ACK
pub const CR0_SMMUEN: u32 = 1 << 0;
pub const CR0_EVTQEN: u32 = 1 << 2;
pub const CR0_CMDQEN: u32 = 1 << 3;
/// The CR0 bits this model implements (acknowledged in CR0ACK).
pub const CR0_IMPLEMENTED: u32 = CR0_SMMUEN | CR0_EVTQEN | CR0_CMDQEN;

// GBPA
pub const GBPA_UPDATE: u32 = 1 << 31;
pub const GBPA_ABORT: u32 = 1 << 20;

// IRQ_CTRL
pub const IRQ_CTRL_GERROR_EN: u32 = 1 << 0;
pub const IRQ_CTRL_EVTQ_EN: u32 = 1 << 2;
pub const IRQ_CTRL_IMPLEMENTED: u32 = IRQ_CTRL_GERROR_EN | IRQ_CTRL_EVTQ_EN;

// GERROR bits
pub const GERROR_CMDQ_ERR: u32 = 1 << 0;
pub const GERROR_EVTQ_ABT_ERR: u32 = 1 << 2;
pub const GERROR_MSI_CMDQ_ABT_ERR: u32 = 1 << 4;
pub const GERROR_MSI_EVTQ_ABT_ERR: u32 = 1 << 5;
pub const GERROR_MSI_GERROR_ABT_ERR: u32 = 1 << 7;
pub const GERROR_IMPLEMENTED: u32 = GERROR_CMDQ_ERR
    | GERROR_EVTQ_ABT_ERR
    | GERROR_MSI_CMDQ_ABT_ERR
    | GERROR_MSI_EVTQ_ABT_ERR
    | GERROR_MSI_GERROR_ABT_ERR;

// CMDQ_CONS.ERR
pub const CMDQ_CONS_ERR_SHIFT: u32 = 24;
pub const CMDQ_CONS_ERR_MASK: u32 = 0x7f << CMDQ_CONS_ERR_SHIFT;
/// CERROR_NONE / CERROR_ILL / CERROR_ABT.
pub const CERROR_NONE: u32 = 0;
pub const CERROR_ILL: u32 = 1;
pub const CERROR_ABT: u32 = 2;

// EVENTQ_PROD.OVFLG / EVENTQ_CONS.OVACKFLG
pub const EVENTQ_OVFLG: u32 = 1 << 31;

// Queue base registers: RA/WA bit 62, ADDR 51:5, LOG2SIZE 4:0.
pub const Q_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_ffe0;
pub const Q_BASE_LOG2SIZE_MASK: u64 = 0x1f;
pub const Q_BASE_RA: u64 = 1 << 62;

// STRTAB_BASE: RA bit 62, ADDR 51:6.
pub const STRTAB_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_ffc0;
// STRTAB_BASE_CFG
pub const STRTAB_CFG_LOG2SIZE_MASK: u32 = 0x3f;
pub const STRTAB_CFG_SPLIT_SHIFT: u32 = 6;
pub const STRTAB_CFG_SPLIT_MASK: u32 = 0x1f;
pub const STRTAB_CFG_FMT_SHIFT: u32 = 16;
pub const STRTAB_CFG_FMT_MASK: u32 = 0x3;
pub const STRTAB_FMT_LINEAR: u32 = 0;
pub const STRTAB_FMT_2LVL: u32 = 1;

// What this model implements, advertised in the IDRs.
/// Stream ID bits (IDR1.SIDSIZE): PCI requester IDs.
pub const SID_BITS: u32 = 16;
/// Substream ID bits (IDR1.SSIDSIZE).
pub const SSID_BITS: u32 = 8;
/// Largest command queue: 2^19 entries (IDR1.CMDQS).
pub const CMDQS: u32 = 19;
/// Largest event queue: 2^19 entries (IDR1.EVENTQS).
pub const EVENTQS: u32 = 19;
/// Output address size in bits (IDR5.OAS = 0b101: 48 bits).
pub const OAS_BITS: u32 = 48;

/// IDR0: S1P, S2P, TTF = AArch64, COHACC, ASID16, MSI, VMID16, TTENDIAN = little,
/// STALL_MODEL = no stall, TERM_MODEL = abort only, ST_LEVEL = 2-level.
pub const IDR0_VALUE: u32 = (1 << 0)
    | (1 << 1)
    | (2 << 2)
    | (1 << 4)
    | (1 << 12)
    | (1 << 13)
    | (1 << 18)
    | (2 << 21)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27);
/// IDR1: SIDSIZE, SSIDSIZE, EVENTQS, CMDQS (no PRI queue).
pub const IDR1_VALUE: u32 = SID_BITS | (SSID_BITS << 6) | (EVENTQS << 16) | (CMDQS << 21);
/// IDR5: OAS = 48 bits, 4 KiB, 16 KiB and 64 KiB granules.
pub const IDR5_VALUE: u32 = 0b101 | (1 << 4) | (1 << 5) | (1 << 6);
/// IIDR: implementer 0x43b (Arm's JEP106 code is used only as a well-known value).
pub const IIDR_VALUE: u32 = 0;
/// AIDR: SMMUv3.0.
pub const AIDR_VALUE: u32 = 0;

/// The queue size in entries of a base register's LOG2SIZE, clamped to `max_log2`
/// as the architecture says (a larger value behaves as the maximum).
pub fn queue_log2(base: u64, max_log2: u32) -> u32 {
    ((base & Q_BASE_LOG2SIZE_MASK) as u32).min(max_log2)
}

/// The output-address bits of an IPS / S2PS / OAS encoding, capped at the model's OAS.
pub fn pa_bits(encoding: u64) -> u32 {
    let bits = match encoding {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        _ => 48,
    };
    bits.min(OAS_BITS)
}
