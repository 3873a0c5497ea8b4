//! Register offsets and bit fields of the 82540EM (BAR0 MMIO), from the Intel 8254x
//! family software developer's manual. Only what the model uses is named here.

#![allow(missing_docs)] // register names are the datasheet mnemonics

/// Size of BAR0 (MMIO register file).
pub const MMIO_SIZE: u64 = 128 * 1024;
/// Size of BAR1 (I/O window: IOADDR at 0, IODATA at 4).
pub const IO_SIZE: u64 = 64;
/// Number of 32-bit registers in BAR0.
pub const NUM_REGS: usize = (MMIO_SIZE / 4) as usize;

pub const CTRL: u32 = 0x0000;
pub const STATUS: u32 = 0x0008;
pub const EECD: u32 = 0x0010;
pub const EERD: u32 = 0x0014;
pub const CTRL_EXT: u32 = 0x0018;
pub const MDIC: u32 = 0x0020;
pub const ICR: u32 = 0x00C0;
pub const ITR: u32 = 0x00C4;
pub const ICS: u32 = 0x00C8;
pub const IMS: u32 = 0x00D0;
pub const IMC: u32 = 0x00D8;
pub const RCTL: u32 = 0x0100;
pub const TCTL: u32 = 0x0400;
pub const TIPG: u32 = 0x0410;
pub const FCAL: u32 = 0x0028;
pub const FCAH: u32 = 0x002C;
pub const FCT: u32 = 0x0030;
pub const VET: u32 = 0x0038;
pub const FCTTV: u32 = 0x0170;
pub const TXCW: u32 = 0x0178;
pub const RXCW: u32 = 0x0180;
pub const LEDCTL: u32 = 0x0E00;
pub const PBA: u32 = 0x1000;
pub const FCRTL: u32 = 0x2160;
pub const FCRTH: u32 = 0x2168;
pub const RXDCTL: u32 = 0x2828;
pub const RSRPD: u32 = 0x2C00;
pub const TXDMAC: u32 = 0x3000;
pub const TXDCTL: u32 = 0x3828;
pub const RXCSUM: u32 = 0x5000;
pub const MANC: u32 = 0x5820;
/// Flexible filter length table (4 entries, 8 bytes apart).
pub const FFLT: u32 = 0x5F00;
/// Flexible filter mask table (128 entries, 8 bytes apart).
pub const FFMT: u32 = 0x9000;
pub const RDBAL: u32 = 0x2800;
pub const RDBAH: u32 = 0x2804;
pub const RDLEN: u32 = 0x2808;
pub const RDH: u32 = 0x2810;
pub const RDT: u32 = 0x2818;
pub const RDTR: u32 = 0x2820;
pub const RADV: u32 = 0x282C;
pub const TDBAL: u32 = 0x3800;
pub const TDBAH: u32 = 0x3804;
pub const TDLEN: u32 = 0x3808;
pub const TDH: u32 = 0x3810;
pub const TDT: u32 = 0x3818;
pub const TIDV: u32 = 0x3820;
pub const TADV: u32 = 0x382C;
/// First statistics register.
pub const STATS_START: u32 = 0x4000;
/// Last statistics register (inclusive).
pub const STATS_END: u32 = 0x40FC;
pub const MTA: u32 = 0x5200;
/// Receive address (perfect filter) array: 16 pairs RAL/RAH.
pub const RA: u32 = 0x5400;
/// Number of receive address entries.
pub const RA_ENTRIES: u32 = 16;

// Statistics registers (clear on read).
pub const CRCERRS: u32 = 0x4000;
pub const RXERRC: u32 = 0x400C;
pub const MPC: u32 = 0x4010;
pub const PRC64: u32 = 0x405C;
pub const GPRC: u32 = 0x4074;
pub const BPRC: u32 = 0x4078;
pub const MPRC: u32 = 0x407C;
pub const GPTC: u32 = 0x4080;
pub const GORCL: u32 = 0x4088;
pub const GORCH: u32 = 0x408C;
pub const GOTCL: u32 = 0x4090;
pub const GOTCH: u32 = 0x4094;
pub const RNBC: u32 = 0x40A0;
pub const ROC: u32 = 0x40AC;
pub const TORL: u32 = 0x40C0;
pub const TORH: u32 = 0x40C4;
pub const TOTL: u32 = 0x40C8;
pub const TOTH: u32 = 0x40CC;
pub const TPR: u32 = 0x40D0;
pub const TPT: u32 = 0x40D4;
pub const PTC64: u32 = 0x40D8;
pub const MPTC: u32 = 0x40F0;
pub const BPTC: u32 = 0x40F4;
pub const TSCTC: u32 = 0x40F8;

/// The 64-bit statistics counters as (low register, high register): reading the high
/// half clears the counter.
pub const STATS64: [(u32, u32); 4] = [(GORCL, GORCH), (GOTCL, GOTCH), (TORL, TORH), (TOTL, TOTH)];

// CTRL bits.
pub const CTRL_FD: u32 = 1 << 0;
pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_SPEED_1000: u32 = 2 << 8;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_PHY_RST: u32 = 1 << 31;

// STATUS bits.
pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 2 << 6;

// EECD bits.
pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
pub const EECD_FWE_MASK: u32 = 3 << 4;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;

// EERD bits.
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;
pub const EERD_ADDR_SHIFT: u32 = 8;
pub const EERD_DATA_SHIFT: u32 = 16;

// MDIC bits.
pub const MDIC_DATA_MASK: u32 = 0xFFFF;
pub const MDIC_REG_SHIFT: u32 = 16;
pub const MDIC_PHY_SHIFT: u32 = 21;
pub const MDIC_OP_WRITE: u32 = 1 << 26;
pub const MDIC_OP_READ: u32 = 2 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_ERROR: u32 = 1 << 30;

// Interrupt causes (ICR/ICS/IMS/IMC).
pub const ICR_TXDW: u32 = 0x01;
pub const ICR_TXQE: u32 = 0x02;
pub const ICR_LSC: u32 = 0x04;
pub const ICR_RXDMT0: u32 = 0x10;
pub const ICR_RXO: u32 = 0x40;
pub const ICR_RXT0: u32 = 0x80;
pub const ICR_MDAC: u32 = 0x200;
/// Cause bits that exist on the 82540EM (writes of other bits are ignored).
pub const ICR_VALID: u32 = 0x0001_FFFF;

// RCTL bits.
pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_LPE: u32 = 1 << 5;
pub const RCTL_RDMTS_SHIFT: u32 = 8;
pub const RCTL_MO_SHIFT: u32 = 12;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;

// TCTL bits.
pub const TCTL_EN: u32 = 1 << 1;
pub const TCTL_PSP: u32 = 1 << 3;

/// Delay registers (TIDV, RDTR): flush partial descriptor block (write-only, reads 0).
pub const DELAY_FPD: u32 = 1 << 31;
/// Delay registers keep bits 15:0 (units of 1.024 us).
pub const DELAY_MASK: u32 = 0xFFFF;

/// Ring length registers keep bits 19:7 (a multiple of 128 bytes, 8 descriptors).
pub const RING_LEN_MASK: u32 = 0x000F_FF80;
/// Ring base low registers ignore bits 3:0 (16-byte aligned).
pub const RING_BASE_LOW_MASK: u32 = 0xFFFF_FFF0;
/// Head and tail registers keep bits 15:0.
pub const RING_PTR_MASK: u32 = 0xFFFF;

/// Descriptor size (legacy and extended).
pub const DESC_SIZE: u64 = 16;

// Descriptor bits.
pub const TXD_CMD_EOP: u8 = 0x01;
pub const TXD_CMD_IC: u8 = 0x04;
pub const TXD_CMD_TSE: u8 = 0x04;
pub const TXD_CMD_RS: u8 = 0x08;
pub const TXD_CMD_DEXT: u8 = 0x20;
/// Interrupt delay enable (legacy CMD, data DCMD and context TUCMD bit 7).
pub const TXD_CMD_IDE: u8 = 0x80;
pub const TXD_STA_DD: u8 = 0x01;
pub const TXD_POPTS_IXSM: u8 = 0x01;
pub const TXD_POPTS_TXSM: u8 = 0x02;
pub const RXD_STA_DD: u8 = 0x01;
pub const RXD_STA_EOP: u8 = 0x02;
pub const RXD_STA_IXSM: u8 = 0x04;

/// Receive buffer size selected by RCTL.BSIZE / RCTL.BSEX (None: reserved encoding).
pub fn rx_buffer_size(rctl: u32) -> Option<usize> {
    let code = (rctl >> RCTL_BSIZE_SHIFT) & 3;
    if rctl & RCTL_BSEX == 0 {
        Some([2048, 1024, 512, 256][code as usize])
    } else {
        match code {
            1 => Some(16384),
            2 => Some(8192),
            3 => Some(4096),
            _ => None,
        }
    }
}

/// True for offsets of statistics registers.
pub fn is_stat(off: u32) -> bool {
    (STATS_START..=STATS_END).contains(&off)
}
