//! The ACPI PM1 register blocks the FADT points at: PM1a_EVT (`PM1_STS`, `PM1_EN`) at
//! [`super::PM_BASE`] and PM1a_CNT at `PM_BASE + 4`, as one port device.
//!
//! Nothing here ever raises an event: `PM1_STS` reads 0 (its write-1-to-clear bits
//! have nothing to clear), `PM1_EN` keeps what the guest writes, and `PM1_CNT` keeps
//! what the guest writes except that `SCI_EN` always reads 1 (the machine is in ACPI
//! mode from reset; the FADT has no SMI command port) and `SLP_EN` reads 0. A write
//! with `SLP_EN` set and `SLP_TYP` equal to the `\_S5_` value ([`super::S5_SLP_TYP`])
//! is the guest powering off: the device calls the power-off hook the VMM gave it,
//! once. Other sleep types are ignored (logged): the VMM has no S1-S4.
//!
//! Accesses of any width at any offset inside the 6 ports are accepted byte by byte
//! (the bus guarantees the access lies inside them), so a guest cannot provoke an
//! out-of-range index.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::bus::{BusDevice, BusFault};

use super::{PM1_EVT_LEN, PM_LEN, S5_SLP_TYP};

/// PM1_CNT bit: the OS has ACPI (SCI) mode on.
pub const SCI_EN: u16 = 1;
/// PM1_CNT bit: go to the sleep state in SLP_TYP (write-only).
pub const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const CNT: usize = PM1_EVT_LEN as usize;

/// The PM1a event and control registers (see the module documentation).
pub struct PmRegisters {
    regs: Mutex<[u8; PM_LEN as usize]>,
    off: AtomicBool,
    power_off: Box<dyn Fn() + Send + Sync>,
}

impl PmRegisters {
    /// Registers at reset; `power_off` runs when the guest enters S5.
    pub fn new(power_off: impl Fn() + Send + Sync + 'static) -> Self {
        let mut regs = [0u8; PM_LEN as usize];
        regs[CNT] = SCI_EN as u8;
        PmRegisters {
            regs: Mutex::new(regs),
            off: AtomicBool::new(false),
            power_off: Box::new(power_off),
        }
    }

    /// Whether the guest has powered off.
    pub fn powered_off(&self) -> bool {
        self.off.load(Ordering::SeqCst)
    }
}

impl BusDevice for PmRegisters {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        let regs = self.regs.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let idx = offset.saturating_add(i as u64);
            *b = match usize::try_from(idx).ok().and_then(|i| regs.get(i)) {
                // PM1_STS: nothing pending, ever.
                Some(_) if idx < 2 => 0,
                Some(v) => *v,
                None => 0xff,
            };
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        let cnt = {
            let mut regs = self.regs.lock();
            let mut touched_cnt = false;
            for (i, b) in data.iter().enumerate() {
                let Some(idx) = usize::try_from(offset.saturating_add(i as u64))
                    .ok()
                    .filter(|i| *i < regs.len())
                else {
                    continue;
                };
                if idx >= 2 {
                    regs[idx] = *b;
                }
                touched_cnt |= idx >= CNT;
            }
            let cnt = u16::from_le_bytes([regs[CNT], regs[CNT + 1]]);
            // SCI_EN stays set; SLP_EN is write-only.
            let kept = (cnt | SCI_EN) & !SLP_EN;
            regs[CNT..CNT + 2].copy_from_slice(&kept.to_le_bytes());
            touched_cnt.then_some(cnt)
        };
        if let Some(cnt) = cnt.filter(|c| c & SLP_EN != 0) {
            let typ = ((cnt >> SLP_TYP_SHIFT) & 7) as u8;
            if typ == S5_SLP_TYP {
                if !self.off.swap(true, Ordering::SeqCst) {
                    tracing::info!("guest entered ACPI S5 (power off)");
                    (self.power_off)();
                }
            } else {
                tracing::info!(
                    slp_typ = typ,
                    "guest asked for an ACPI sleep state the VMM does not have; ignored"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    fn device() -> (PmRegisters, Arc<AtomicU32>) {
        let n = Arc::new(AtomicU32::new(0));
        let m = n.clone();
        (
            PmRegisters::new(move || {
                m.fetch_add(1, Ordering::SeqCst);
            }),
            n,
        )
    }

    fn read16(d: &PmRegisters, off: u64) -> u16 {
        let mut b = [0u8; 2];
        d.read(off, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    #[test]
    fn registers_read_back_as_documented() {
        let (d, n) = device();
        assert_eq!(read16(&d, 4), SCI_EN, "ACPI mode from reset");
        d.write(0, &0xffffu16.to_le_bytes()).unwrap();
        assert_eq!(read16(&d, 0), 0, "PM1_STS has nothing pending");
        d.write(2, &0x0121u16.to_le_bytes()).unwrap();
        assert_eq!(read16(&d, 2), 0x0121, "PM1_EN keeps its value");
        d.write(4, &0u16.to_le_bytes()).unwrap();
        assert_eq!(read16(&d, 4), SCI_EN, "SCI_EN cannot be cleared");
        // Sleep type 5 without SLP_EN: no power-off yet.
        d.write(4, &(u16::from(S5_SLP_TYP) << 10).to_le_bytes())
            .unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert!(!d.powered_off());
        let mut all = [0u8; 6];
        d.read(0, &mut all).unwrap();
        assert_eq!(all, [0, 0, 0x21, 0x01, 0x01, 0x14]);
    }

    #[test]
    fn s5_with_slp_en_powers_off_once() {
        let (d, n) = device();
        let s1 = (1u16 << 10) | SLP_EN;
        d.write(4, &s1.to_le_bytes()).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 0, "S1 is not power-off");
        let s5 = (u16::from(S5_SLP_TYP) << 10) | SLP_EN | SCI_EN;
        d.write(4, &s5.to_le_bytes()).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(d.powered_off());
        assert_eq!(read16(&d, 4) & SLP_EN, 0, "SLP_EN is write-only");
        d.write(4, &s5.to_le_bytes()).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1, "the hook runs once");
    }

    #[test]
    fn byte_writes_to_the_high_half_count() {
        let (d, n) = device();
        // SLP_TYP = 5 and SLP_EN live in the high byte (bits 10..13).
        d.write(5, &[((u16::from(S5_SLP_TYP) << 10 | SLP_EN) >> 8) as u8])
            .unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn out_of_range_offsets_are_harmless() {
        let (d, n) = device();
        let mut b = [0u8; 4];
        d.read(4, &mut b).unwrap();
        assert_eq!(b, [1, 0, 0xff, 0xff]);
        d.write(u64::MAX, &[0xff, 0xff]).unwrap();
        d.write(6, &[0xff]).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }
}
