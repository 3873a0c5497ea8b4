//! The thread interrupt management area (TIMA) of one server (vCPU): the presenter's
//! registers the guest reads and writes, of which a guest uses only the OS ring
//! (quad-word 1, bytes `0x10..=0x1F`).
//!
//! OS ring bytes: NSR 0 (bit 0x80 = an exception is signalled), CPPR 1 (current
//! processor priority: only more favoured — numerically smaller — priorities
//! interrupt), IPB 2 (interrupt pending buffer, bit `7 - prio` per pending priority),
//! LSMFB 3, ACK 4, INC 5, AGE 6, PIPR 7 (the most favoured pending priority, 0xFF when
//! none); word 2 (`0x18`) is the OS CAM line (valid bit + the server's virtual
//! processor number), as QEMU's sPAPR model sets it.
//!
//! Operations (QEMU 7.2's `xive_tm_operations`, OS page): a 2-byte load at `0x810`
//! acknowledges (returns `NSR << 8 | CPPR` after moving PIPR into CPPR and clearing
//! that IPB bit, when NSR signals); a 1-byte store at `0x11` sets CPPR (values above 7
//! become 0xFF) and re-evaluates; other accesses are raw: 4- or 8-byte loads of the
//! OS-readable bytes (others read 0), 4- or 8-byte stores that change the
//! OS-writable bytes (CPPR) as they are, without re-evaluation; anything else
//! (a 1-byte load, the user ring, a special op of another page) is invalid: loads
//! return all ones, stores are ignored.

/// Offset of the OS ring (QW1).
pub const QW1_OS: usize = 0x10;
/// NSR byte offset within a ring.
pub const NSR: usize = 0;
/// CPPR.
pub const CPPR: usize = 1;
/// IPB.
pub const IPB: usize = 2;
/// LSMFB.
pub const LSMFB: usize = 3;
/// ACK count.
pub const ACK: usize = 4;
/// INC.
pub const INC: usize = 5;
/// AGE.
pub const AGE: usize = 6;
/// PIPR.
pub const PIPR: usize = 7;
/// Word 2 (CAM line).
pub const WORD2: usize = 8;
/// The exception bit of the OS NSR.
pub const NSR_EO: u8 = 0x80;
/// The acknowledge load (2 bytes, OS page).
pub const SPC_ACK_OS_REG: u64 = 0x810;
/// Offsets at or above this are special operations.
pub const SPECIAL_OP: u64 = 0x800;
/// The valid bit of the OS CAM word.
pub const QW1W2_VO: u32 = 0x8000_0000;
/// sPAPR's virtual-processor number base (NVT index = base + server).
pub const NVT_BASE: u32 = 0x400;

/// OS-page access rights per byte of the 64-byte TIMA (QEMU's `xive_tm_os_view`):
/// 1 write, 2 read.
const OS_VIEW: [u8; 64] = [
    3, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 0, 0, 0, 0, // QW0 user
    2, 3, 2, 2, 2, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, // QW1 OS
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // QW2 pool
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // QW3 phys
];

/// The IPB bit of a priority (0 for priorities above 7).
pub const fn prio_to_ipb(prio: u8) -> u8 {
    if prio > 7 {
        0
    } else {
        1 << (7 - prio)
    }
}

/// The most favoured priority pending in `ipb`, 0xFF when none.
pub const fn ipb_to_pipr(ipb: u8) -> u8 {
    if ipb == 0 {
        0xFF
    } else {
        ipb.leading_zeros() as u8
    }
}

/// One server's TIMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tima {
    regs: [u8; 64],
}

impl Tima {
    /// The reset TIMA of `server` (LSMFB, ACK, AGE and PIPR 0xFF; OS CAM valid).
    pub fn new(server: u32) -> Tima {
        let mut t = Tima { regs: [0; 64] };
        t.reset(server);
        t
    }

    /// Reset to the power-on values.
    pub fn reset(&mut self, server: u32) {
        self.regs = [0; 64];
        let os = &mut self.regs[QW1_OS..QW1_OS + 16];
        os[LSMFB] = 0xFF;
        os[ACK] = 0xFF;
        os[AGE] = 0xFF;
        os[PIPR] = 0xFF;
        let cam = QW1W2_VO | (NVT_BASE.wrapping_add(server) & 0x7_FFFF);
        os[WORD2..WORD2 + 4].copy_from_slice(&cam.to_be_bytes());
    }

    /// An OS-ring register.
    pub fn os(&self, reg: usize) -> u8 {
        self.regs[QW1_OS + (reg & 15)]
    }

    fn set_os(&mut self, reg: usize, v: u8) {
        self.regs[QW1_OS + (reg & 15)] = v;
    }

    /// The OS ring's first word (NSR .. PIPR, big-endian), the VP state's word 0.
    pub fn w01(&self) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.regs[QW1_OS..QW1_OS + 8]);
        u64::from_be_bytes(b)
    }

    /// Restore the OS ring's first word (VP state set). PIPR and NSR are recomputed
    /// from IPB and CPPR so a restored pending priority signals again; returns whether
    /// the vCPU must be notified.
    pub fn set_w01(&mut self, w01: u64) -> bool {
        self.regs[QW1_OS..QW1_OS + 8].copy_from_slice(&w01.to_be_bytes());
        self.set_os(PIPR, ipb_to_pipr(self.os(IPB)));
        self.set_os(NSR, self.os(NSR) & NSR_EO);
        self.notify()
    }

    /// Signal the exception when the pending priority beats CPPR; returns whether it
    /// is signalled now.
    fn notify(&mut self) -> bool {
        if self.os(PIPR) < self.os(CPPR) {
            self.set_os(NSR, self.os(NSR) | NSR_EO);
            true
        } else {
            false
        }
    }

    /// The router presents priority `prio`: returns whether the vCPU is to be
    /// interrupted.
    pub fn present(&mut self, prio: u8) -> bool {
        let ipb = self.os(IPB) | prio_to_ipb(prio);
        self.set_os(IPB, ipb);
        self.set_os(PIPR, ipb_to_pipr(ipb));
        self.notify()
    }

    /// The acknowledge load: `NSR << 8 | CPPR`.
    pub fn ack(&mut self) -> u16 {
        let nsr = self.os(NSR);
        if nsr & NSR_EO != 0 {
            let cppr = self.os(PIPR);
            self.set_os(CPPR, cppr);
            let ipb = self.os(IPB) & !prio_to_ipb(cppr);
            self.set_os(IPB, ipb);
            self.set_os(PIPR, ipb_to_pipr(ipb));
            self.set_os(NSR, nsr & !NSR_EO);
        }
        (u16::from(nsr) << 8) | u16::from(self.os(CPPR))
    }

    /// A CPPR store: returns whether the vCPU is to be interrupted.
    pub fn set_cppr(&mut self, cppr: u8) -> bool {
        self.set_os(CPPR, if cppr > 7 { 0xFF } else { cppr });
        self.notify()
    }

    /// A load of `size` bytes at `off` within the OS page. Returns the value (all
    /// ones when invalid).
    pub fn os_load(&mut self, off: u64, size: u32) -> u64 {
        let off = off & 0xFFF;
        if off == SPC_ACK_OS_REG && size == 2 {
            return u64::from(self.ack());
        }
        if off >= SPECIAL_OP || !(size == 4 || size == 8) || off & 0x30 == 0 {
            return u64::MAX;
        }
        let reg = off as usize & 0x3F;
        if reg + size as usize > 64 {
            return u64::MAX;
        }
        let mut v = 0u64;
        let mut mask = 0u64;
        for i in 0..size as usize {
            v = (v << 8) | u64::from(self.regs[reg + i]);
            mask = (mask << 8) | if OS_VIEW[reg + i] & 2 != 0 { 0xFF } else { 0 };
        }
        if mask == 0 {
            return u64::MAX;
        }
        v & mask
    }

    /// A store of `size` bytes of `value` at `off` within the OS page: returns whether
    /// the vCPU is to be interrupted.
    pub fn os_store(&mut self, off: u64, size: u32, value: u64) -> bool {
        let off = off & 0xFFF;
        if off == (QW1_OS + CPPR) as u64 && size == 1 {
            return self.set_cppr(value as u8);
        }
        if off >= SPECIAL_OP || !(size == 4 || size == 8) || off & 0x30 == 0 {
            return false;
        }
        let reg = off as usize & 0x3F;
        if reg + size as usize > 64 {
            return false;
        }
        for i in 0..size as usize {
            if OS_VIEW[reg + i] & 1 != 0 {
                self.regs[reg + i] = (value >> (8 * (size as usize - 1 - i))) as u8;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_values() {
        let t = Tima::new(1);
        assert_eq!(t.w01(), 0x0000_00FF_FF00_FFFF);
        assert_eq!(t.os_load_peek(0x18), 0x8000_0401);
    }

    impl Tima {
        fn os_load_peek(&self, reg: usize) -> u32 {
            u32::from_be_bytes(self.regs[reg..reg + 4].try_into().unwrap())
        }
    }

    #[test]
    fn present_ack_and_cppr() {
        let mut t = Tima::new(0);
        assert!(!t.present(6), "CPPR 0 masks everything");
        assert_eq!(t.os(IPB), 0x02);
        assert_eq!(t.os(PIPR), 6);
        assert!(t.set_cppr(0xFF));
        assert_eq!(t.os(NSR), NSR_EO);
        assert_eq!(t.ack(), 0x8006);
        assert_eq!(
            (t.os(CPPR), t.os(IPB), t.os(PIPR), t.os(NSR)),
            (6, 0, 0xFF, 0)
        );
        assert_eq!(t.ack(), 0x0006, "nothing signalled: just CPPR");
        assert!(!t.set_cppr(9));
        assert_eq!(t.os(CPPR), 0xFF);
    }

    #[test]
    fn raw_loads_follow_the_os_view() {
        let mut t = Tima::new(0);
        t.set_cppr(0xFF);
        t.present(3);
        // NSR CPPR IPB LSMFB | ACK INC AGE(hidden) PIPR
        assert_eq!(t.os_load(0x10, 8), 0x80FF_10FF_FF00_0003);
        assert_eq!(t.os_load(0x10, 4), 0x80FF_10FF);
        assert_eq!(t.os_load(0x11, 1), u64::MAX, "1-byte raw loads are invalid");
        assert_eq!(t.os_load(0x00, 4), u64::MAX, "user ring excluded");
        assert_eq!(t.os_load(0x20, 4), u64::MAX, "pool ring not visible");
        assert_eq!(t.os_load(0x814, 2), u64::MAX);
        assert_eq!(t.os_load(0x810, 2), 0x8003, "ack: NSR, then the new CPPR");
    }
}
