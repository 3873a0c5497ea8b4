//! Configuration-space virtualisation of an assigned device.
//!
//! [`ConfigShadow`] holds the registers the VMM owns — BARs, expansion ROM, the
//! interrupt line, the MSI capability, the MSI-X message control — each byte marked
//! virtual with a driver write mask; every other byte is read from and written to the
//! device's configuration region. A read that mixes both is read from the device and
//! overlaid with the shadow bytes. A write is applied to the shadow through the write
//! mask, passed to the device when it touches a non-virtual byte or an interrupt
//! capability (so the device sees its own MSI/MSI-X state), and then the VMM reacts:
//! command or BAR changes remap the BARs, MSI / MSI-X changes rewire interrupts.

use std::sync::Arc;

use nestio_device_model::{pci_index, VfioDevice};

use super::{is_fatal, AssignedDevice};
use crate::bus::BusFault;

/// Size of the conventional configuration space the VMM virtualises.
pub(super) const CFG: usize = 256;
/// Command register offset.
const COMMAND: usize = 0x04;
/// BAR registers.
const BARS: std::ops::Range<usize> = 0x10..0x28;
/// Expansion ROM BAR.
const ROM: std::ops::Range<usize> = 0x30..0x34;
/// Interrupt line register.
pub(super) const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin register.
pub(super) const INTERRUPT_PIN: usize = 0x3d;

/// The VMM-owned part of configuration space. See the module documentation.
pub(super) struct ConfigShadow {
    shadow: [u8; CFG],
    wmask: [u8; CFG],
    virt: [bool; CFG],
    /// The guest's command register (passed to the device, followed here for decode).
    command: u16,
}

impl ConfigShadow {
    /// A shadow of the device's `raw` configuration space: BARs and ROM virtual and
    /// zero (not decoded until the VMM assigns them), I/O and memory decode off.
    pub(super) fn new(raw: &[u8; CFG]) -> Self {
        let mut s = ConfigShadow {
            shadow: *raw,
            wmask: [0; CFG],
            virt: [false; CFG],
            command: u16::from_le_bytes([raw[COMMAND], raw[COMMAND + 1]]) & !0x7,
        };
        for i in BARS.chain(ROM) {
            s.virt[i] = true;
            s.shadow[i] = 0;
        }
        s
    }

    /// Make `value.len()` bytes at `off` virtual with this value and driver write
    /// mask (`wmask` as long as `value`; an empty `wmask` means read-only).
    pub(super) fn set_virtual(&mut self, off: usize, value: &[u8], wmask: &[u8]) {
        for (i, &b) in value.iter().enumerate() {
            self.virt[off + i] = true;
            self.shadow[off + i] = b;
            self.wmask[off + i] = wmask.get(i).copied().unwrap_or(0);
        }
    }

    /// Change the write mask of virtual bytes at `off`.
    pub(super) fn set_wmask(&mut self, off: usize, wmask: &[u8]) {
        self.wmask[off..off + wmask.len()].copy_from_slice(wmask);
    }

    /// Make the bytes at `off` virtual, keeping their current value, read-only.
    pub(super) fn make_virtual(&mut self, range: std::ops::Range<usize>) {
        for i in range {
            self.virt[i] = true;
        }
    }

    /// The shadow bytes, which bytes are virtual, and the guest's command register
    /// (for migration).
    pub(super) fn parts(&self) -> (&[u8; CFG], &[bool; CFG], u16) {
        (&self.shadow, &self.virt, self.command)
    }

    /// A little-endian shadow word.
    pub(super) fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.shadow[off], self.shadow[off + 1]])
    }
    /// A little-endian shadow dword.
    pub(super) fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.shadow[off],
            self.shadow[off + 1],
            self.shadow[off + 2],
            self.shadow[off + 3],
        ])
    }
    /// The guest's command register.
    pub(super) fn command(&self) -> u16 {
        self.command
    }
}

/// The offset of capability `id` in `raw` (standard list; a loop is cut after 48 hops).
pub(super) fn find_cap(raw: &[u8; CFG], id: u8) -> Option<usize> {
    if raw[6] & 0x10 == 0 {
        return None;
    }
    let mut p = (raw[0x34] & 0xfc) as usize;
    let mut hops = 0;
    while p >= 0x40 && p + 2 <= CFG && hops < 48 {
        if raw[p] == id {
            return Some(p);
        }
        p = (raw[p + 1] & 0xfc) as usize;
        hops += 1;
    }
    None
}

/// The device's first 256 configuration bytes and its configuration region size.
pub(super) fn read_device_config(dev: &dyn VfioDevice) -> Result<([u8; CFG], u64), String> {
    let info = dev
        .region_info(pci_index::CONFIG)
        .map_err(|e| format!("no configuration region: {e}"))?;
    if info.size < CFG as u64 {
        return Err(format!(
            "configuration region is {} bytes, need at least 256",
            info.size
        ));
    }
    let mut raw = [0u8; CFG];
    dev.region_read(pci_index::CONFIG, 0, &mut raw)
        .map_err(|e| format!("cannot read configuration space: {e}"))?;
    Ok((raw, info.size))
}

impl AssignedDevice {
    /// Read configuration space from the device itself; a refusal reads all-ones.
    fn device_config_read(&self, reg: u16, data: &mut [u8]) -> Result<(), BusFault> {
        if let Err(e) = self.dev.region_read(pci_index::CONFIG, reg as u64, data) {
            if is_fatal(&e) {
                return Err(self.fault("configuration read", e));
            }
            data.fill(0xff);
        }
        Ok(())
    }

    pub(super) fn config_read_inner(&self, reg: u16, data: &mut [u8]) -> Result<(), BusFault> {
        let r = reg as usize;
        let end = r + data.len();
        if end > CFG {
            // Extended space: the device's, if it has one.
            if (end as u64) <= self.config_size {
                self.device_config_read(reg, data)?;
            } else {
                data.fill(0);
            }
            return Ok(());
        }
        let st = self.lock();
        if st.cfg.virt[r..end].iter().any(|v| !v) {
            drop(st);
            self.device_config_read(reg, data)?;
            let st = self.lock();
            for (i, b) in data.iter_mut().enumerate() {
                if st.cfg.virt[r + i] {
                    *b = st.cfg.shadow[r + i];
                }
            }
        } else {
            data.copy_from_slice(&st.cfg.shadow[r..end]);
        }
        Ok(())
    }

    pub(super) fn config_write_inner(
        self: &Arc<Self>,
        reg: u16,
        data: &[u8],
    ) -> Result<(), BusFault> {
        let r = reg as usize;
        let end = r + data.len();
        if end > CFG {
            if (end as u64) <= self.config_size {
                if let Err(e) = self.dev.region_write(pci_index::CONFIG, reg as u64, data) {
                    if is_fatal(&e) {
                        return Err(self.fault("configuration write", e));
                    }
                }
            }
            return Ok(());
        }
        let mut st = self.lock();
        let any_virt = st.cfg.virt[r..end].iter().any(|v| *v);
        let in_msi = st.msi.as_ref().is_some_and(|m| m.covers(r));
        let c = &mut st.cfg;
        for (i, b) in data.iter().enumerate() {
            let o = r + i;
            if c.virt[o] {
                let m = c.wmask[o];
                c.shadow[o] = (c.shadow[o] & !m) | (b & m);
            } else if o == COMMAND {
                c.command = (c.command & 0xff00) | *b as u16;
            } else if o == COMMAND + 1 {
                c.command = (c.command & 0x00ff) | (*b as u16) << 8;
            }
        }
        let in_msix = self
            .msix_cap
            .is_some_and(|m| r < m.offset() + 4 && end > m.offset() + 2);
        if !any_virt || in_msi || in_msix {
            drop(st);
            if let Err(e) = self.dev.region_write(pci_index::CONFIG, reg as u64, data) {
                if is_fatal(&e) {
                    return Err(self.fault("configuration write", e));
                }
                tracing::debug!(device = %self.name, reg, error = %e, "configuration write refused");
            }
            st = self.lock();
        }
        let touches = |a: usize, b: usize| r < b && end > a;
        if touches(COMMAND, COMMAND + 2) || touches(BARS.start, BARS.end) {
            self.update_bars(&mut st);
        }
        if in_msi {
            self.update_msi(&mut st);
        }
        if in_msix {
            self.update_msix(&mut st);
        }
        Ok(())
    }
}
