//! The PHY behind MDIC: the 82540EM's integrated Marvell 88E1011-class gigabit PHY at
//! MDIO address 1, with the register set the 8254x manual lists for it.
//!
//! Registers that exist: 0-10 (IEEE control, status, identifiers, auto-negotiation
//! advertisement / link partner / expansion / next page, 1000BASE-T control and
//! status), 15 (extended status) and the Marvell-specific 16-21 (PHY specific control
//! and status, interrupt enable and status, extended PHY specific control, receive
//! error counter), 26 (extended PHY specific control 2) and 29-30 (page select and
//! its data window for the hidden registers). Any other register does not answer:
//! the MDIC access completes with MDIC.E set ([`Phy::exists`]).
//!
//! The link is always up at 1000 Mb/s full duplex with auto-negotiation complete; the
//! status registers hold what a driver reads to conclude exactly that, and the
//! advertisement defaults follow the EEPROM (flow control advertised, 1000BASE-T full
//! duplex only — the 8254x do not do 1000 Mb/s half duplex). Writes keep only the
//! writable bits of each register ([`writable_mask`]); read-only registers ignore
//! writes; the control register's reset (bit 15) and restart auto-negotiation (bit 9)
//! self-clear, and a reset returns every register to its default.

/// MDIO address the PHY answers at.
pub const PHY_ADDR: u32 = 1;
/// Number of PHY register addresses (MDIC has a 5-bit register field).
pub const PHY_REGS: usize = 32;

const PHY_CTRL: usize = 0;

/// Control: reset bit 15, restart autoneg bit 9 (self-clearing).
const CTRL_SELF_CLEAR: u16 = (1 << 15) | (1 << 9);

/// Default value of every register (0 for registers that do not exist).
const DEFAULTS: [u16; PHY_REGS] = {
    let mut r = [0u16; PHY_REGS];
    // Auto-negotiation enabled, full duplex, speed 1000 (bits 6/13 = 10b).
    r[0] = 0x1140;
    // 10/100 capable, extended status, MF preamble suppression, auto-negotiation
    // complete, able to auto-negotiate, link up, extended capability.
    r[1] = 0x796D;
    // Marvell OUI, 88E1011 model.
    r[2] = 0x0141;
    r[3] = 0x0C20;
    // Advertisement: asymmetric and symmetric pause (EEPROM init control 2), 10/100
    // half and full duplex, selector IEEE 802.3.
    r[4] = 0x0DE1;
    // Link partner: the same abilities, acknowledged.
    r[5] = 0x45E1;
    // Expansion: the link partner can auto-negotiate.
    r[6] = 0x0001;
    // Next page transmit: message page, null message.
    r[7] = 0x2001;
    // 1000BASE-T control: manual master/slave value and port type bits as on the
    // chip, 1000BASE-T full duplex advertised (half duplex not supported).
    r[9] = 0x0E00;
    // 1000BASE-T status: local and remote receivers OK, partner 1000 full/half.
    r[10] = 0x3C00;
    // Extended status: 1000BASE-T full / half duplex capable.
    r[15] = 0x3000;
    // PHY specific control: automatic MDI/MDI-X crossover, energy detect settings.
    r[16] = 0x0360;
    // PHY specific status: 1000 Mb/s, full duplex, resolved, link up.
    r[17] = 0xAC00;
    // Extended PHY specific control: MAC interface clock and downshift defaults.
    r[20] = 0x0D60;
    r
};

/// True for the register addresses the PHY implements (see the module documentation).
pub fn exists(reg: usize) -> bool {
    matches!(reg, 0..=10 | 15..=21 | 26 | 29 | 30)
}

/// Bits a write changes in register `reg` (0: read-only or absent).
pub fn writable_mask(reg: usize) -> u16 {
    match reg {
        // Bits 5:0 reserved; reset and restart auto-negotiation self-clear.
        0 => 0xFFC0 & !CTRL_SELF_CLEAR,
        // Next page (15), remote fault (13), pause bits and technology abilities;
        // acknowledge (14) and bit 12 are read-only, the selector is fixed.
        4 => 0xAFE0,
        // Next page transmit: all of it.
        7 => 0xFFFF,
        // 1000BASE-T control: bits 7:0 reserved.
        9 => 0xFF00,
        16 | 18 | 20 | 26 | 29 | 30 => 0xFFFF,
        _ => 0,
    }
}

/// PHY register file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phy {
    regs: [u16; PHY_REGS],
}

impl Default for Phy {
    fn default() -> Self {
        Phy { regs: DEFAULTS }
    }
}

impl Phy {
    /// True for registers that answer (see [`exists`]).
    pub fn exists(&self, reg: usize) -> bool {
        exists(reg)
    }

    /// Read register `reg` (0 for registers that do not exist).
    pub fn read(&self, reg: usize) -> u16 {
        if !exists(reg) {
            return 0;
        }
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Write register `reg` (only its writable bits change).
    pub fn write(&mut self, reg: usize, val: u16) {
        if reg == PHY_CTRL && val & (1 << 15) != 0 {
            *self = Phy::default();
        }
        let mask = writable_mask(reg);
        if let Some(r) = self.regs.get_mut(reg) {
            *r = (*r & !mask) | (val & mask);
        }
    }

    /// All registers (migration).
    pub fn regs(&self) -> &[u16; PHY_REGS] {
        &self.regs
    }

    /// From raw registers (migration); registers that do not exist are cleared and
    /// read-only registers keep their defaults, so a stream cannot make the PHY claim
    /// what it does not do.
    pub fn from_regs(regs: [u16; PHY_REGS]) -> Self {
        let mut p = Phy::default();
        for (i, v) in regs.iter().enumerate() {
            let m = writable_mask(i);
            p.regs[i] = (p.regs[i] & !m) | (v & m);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_masks_and_reset() {
        let mut p = Phy::default();
        assert_eq!(p.read(1) & 0x0024, 0x0024, "link up, negotiation complete");
        assert!(!p.exists(11) && !p.exists(22) && !p.exists(31));
        assert!(p.exists(15) && p.exists(29));
        // Read-only registers ignore writes.
        for r in [1usize, 2, 3, 5, 6, 8, 10, 15, 17, 19, 21] {
            p.write(r, 0xFFFF);
            assert_eq!(p.read(r), DEFAULTS[r], "register {r}");
        }
        // Reserved bits read 0; self-clearing bits do not stick.
        p.write(0, 0x7FFF);
        assert_eq!(p.read(0), 0x7DC0);
        p.write(9, 0xFFFF);
        assert_eq!(p.read(9), 0xFF00);
        p.write(4, 0xFFFF);
        assert_eq!(p.read(4), 0xAFE1);
        // Reset: every register back to its default (the control register then
        // takes the other bits written with the reset bit).
        p.write(16, 0);
        p.write(0, 0x9140);
        assert_eq!(p, Phy::default());
        // A hostile migration stream cannot set read-only bits.
        let q = Phy::from_regs([0xFFFF; PHY_REGS]);
        assert_eq!(q.read(1), DEFAULTS[1]);
        assert_eq!(q.regs()[11], 0);
        assert_eq!(q.read(16), 0xFFFF);
    }
}
