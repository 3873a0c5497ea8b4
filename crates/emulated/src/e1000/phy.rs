//! The PHY behind MDIC (an 88E1011-class gigabit PHY at MDIO address 1).
//!
//! The link is always up at 1000 Mb/s full duplex with auto-negotiation complete; the
//! registers hold values a driver reads to conclude exactly that. Writes are stored
//! (so drivers read back what they wrote) except for the read-only status/id
//! registers; the control register's reset and restart-negotiation bits self-clear.

/// MDIO address the PHY answers at.
pub const PHY_ADDR: u32 = 1;
/// Number of PHY registers modelled.
pub const PHY_REGS: usize = 32;

const PHY_CTRL: usize = 0;
const PHY_STATUS: usize = 1;
const PHY_ID1: usize = 2;
const PHY_ID2: usize = 3;
const PHY_1000T_STATUS: usize = 10;
const PHY_EXT_STATUS: usize = 15;
const PHY_SPEC_STATUS: usize = 17;

/// Control: reset bit 15, restart autoneg bit 9 (self-clearing).
const CTRL_SELF_CLEAR: u16 = (1 << 15) | (1 << 9);

/// PHY register file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phy {
    regs: [u16; PHY_REGS],
}

impl Default for Phy {
    fn default() -> Self {
        let mut regs = [0u16; PHY_REGS];
        // autoneg enabled, full duplex, speed 1000 (bit 6).
        regs[PHY_CTRL] = 0x1140;
        // 100/10 capable, extended status, autoneg complete, link up, ext capability.
        regs[PHY_STATUS] = 0x796D;
        regs[PHY_ID1] = 0x0141;
        regs[PHY_ID2] = 0x0C20;
        // Advertisement: 10/100 half/full, selector 802.3.
        regs[4] = 0x01E1;
        // Link partner: the same, acknowledged.
        regs[5] = 0x45E1;
        regs[6] = 0x0001;
        // 1000BASE-T control: advertise 1000 full/half.
        regs[9] = 0x0300;
        // 1000BASE-T status: local and remote receivers OK, partner 1000 full/half.
        regs[PHY_1000T_STATUS] = 0x3C00;
        regs[PHY_EXT_STATUS] = 0x3000;
        regs[16] = 0x0068;
        // Specific status: 1000 Mb/s, full duplex, resolved, link up.
        regs[PHY_SPEC_STATUS] = 0xAC00;
        Phy { regs }
    }
}

impl Phy {
    /// Read register `reg` (0 for registers past the end).
    pub fn read(&self, reg: usize) -> u16 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Write register `reg`.
    pub fn write(&mut self, reg: usize, val: u16) {
        match reg {
            PHY_CTRL => {
                if val & (1 << 15) != 0 {
                    *self = Phy::default();
                }
                self.regs[PHY_CTRL] = val & !CTRL_SELF_CLEAR;
            }
            PHY_STATUS | PHY_ID1 | PHY_ID2 | PHY_1000T_STATUS | PHY_EXT_STATUS
            | PHY_SPEC_STATUS => {}
            r if r < PHY_REGS => self.regs[r] = val,
            _ => {}
        }
    }

    /// All registers (migration).
    pub fn regs(&self) -> &[u16; PHY_REGS] {
        &self.regs
    }

    /// From raw registers (migration).
    pub fn from_regs(regs: [u16; PHY_REGS]) -> Self {
        Phy { regs }
    }
}
