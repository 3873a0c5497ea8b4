//! Live migration of an assigned function's VMM side: the virtualised configuration
//! (BARs, command, interrupt line, MSI capability, MSI-X message control) and the
//! VMM's MSI-X table. The device's own state travels in its own stream.
//!
//! A restore *replays* the guest's configuration through the ordinary write path
//! (`config_write_inner`), so BAR mapping, MSI routes, irqfds and the eventfds handed
//! to the device are re-established by the same code that made them on the source:
//! BARs and command first, then the MSI-X table, then the other virtual bytes, and the
//! MSI / MSI-X enables last.

use std::sync::Arc;

use super::config::CFG;
use super::AssignedDevice;
use crate::bus::BusFault;

/// The VMM-side state of one assigned PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciMigState {
    /// The configuration shadow (only the VMM's virtual bytes are used on restore).
    pub shadow: Vec<u8>,
    /// Which bytes are virtual on the source (a destination whose device differs
    /// refuses the state).
    pub virt: Vec<bool>,
    /// The guest's command register.
    pub command: u16,
    /// MSI-X table entries (address lo, hi, data, vector control).
    pub msix: Vec<[u32; 4]>,
}

/// Command register offset.
const COMMAND: usize = 0x04;

impl AssignedDevice {
    /// The VMM-side state (see [`PciMigState`]).
    pub fn save_migration(&self) -> PciMigState {
        let st = self.lock();
        let (shadow, virt, command) = st.cfg.parts();
        PciMigState {
            shadow: shadow.to_vec(),
            virt: virt.to_vec(),
            command,
            msix: Self::msix_entries(&st),
        }
    }

    /// Replay a migrated state (see the module documentation). Fails, changing
    /// nothing, when the state does not fit this function.
    pub fn restore_migration(self: &Arc<Self>, s: &PciMigState) -> Result<(), BusFault> {
        let bad = |m: String| BusFault {
            device: self.name.clone(),
            message: format!("migrated PCI state refused: {m}"),
        };
        if s.shadow.len() != CFG || s.virt.len() != CFG {
            return Err(bad("configuration shadow of the wrong size".into()));
        }
        let (virt, controls) = {
            let st = self.lock();
            (st.cfg.parts().1.to_vec(), Self::control_offsets(&st))
        };
        if virt != s.virt {
            return Err(bad(
                "the source's function virtualises other registers: the destination must be given the same kind of device"
                    .into(),
            ));
        }
        Self::load_msix_entries(&mut self.lock(), &s.msix).map_err(bad)?;
        // BARs and ROM, then the command register (decode), then everything else.
        for off in (0x10..0x28).chain(0x30..0x34).step_by(4) {
            self.config_write_inner(off as u16, &s.shadow[off..off + 4])?;
        }
        self.config_write_inner(COMMAND as u16, &s.command.to_le_bytes())?;
        let skip = |o: usize| {
            (0x10..0x28).contains(&o)
                || (0x30..0x34).contains(&o)
                || controls.iter().any(|&c| o == c || o == c + 1)
        };
        for (o, &v) in virt.iter().enumerate() {
            if v && !skip(o) {
                self.config_write_inner(o as u16, &s.shadow[o..o + 1])?;
            }
        }
        for c in controls {
            self.config_write_inner(c as u16, &s.shadow[c..c + 2])?;
        }
        Ok(())
    }
}
