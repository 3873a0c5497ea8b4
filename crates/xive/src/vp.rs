//! The per-vCPU virtual-processor state the VMM saves and restores (KVM's
//! `KVM_REG_PPC_VP_STATE`, 128 bits): word 0 is the TIMA OS ring's first eight bytes
//! (`NSR CPPR IPB LSMFB ACK INC AGE PIPR`, big-endian order, so NSR is the top byte);
//! word 1 is reserved (0). IPB and CPPR are what matter: PIPR and NSR are recomputed
//! from them on restore.

/// One vCPU's VP state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VpState {
    /// The two 64-bit words.
    pub words: [u64; 2],
}

impl VpState {
    /// From the OS ring word.
    pub const fn from_w01(w01: u64) -> VpState {
        VpState { words: [w01, 0] }
    }

    /// The OS ring word.
    pub const fn w01(&self) -> u64 {
        self.words[0]
    }

    /// A byte of the OS ring ([`crate::tima::NSR`] .. [`crate::tima::PIPR`]).
    pub const fn reg(&self, reg: usize) -> u8 {
        (self.words[0] >> (8 * (7 - (reg & 7)))) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tima;

    #[test]
    fn byte_layout() {
        let v = VpState::from_w01(0x80_06_02_FF_FF_00_FF_06);
        assert_eq!(v.reg(tima::NSR), 0x80);
        assert_eq!(v.reg(tima::CPPR), 6);
        assert_eq!(v.reg(tima::IPB), 2);
        assert_eq!(v.reg(tima::PIPR), 6);
    }
}
