//! The VFIO interrupt model of a PCI function.
//!
//! vfio-pci exposes five irq indices: INTx (0), MSI (1), MSI-X (2), ERR (3), REQ (4).
//! The VMM virtualises the MSI / MSI-X capabilities and tables itself and, when the
//! driver enables one of them, hands the device one eventfd per vector with SET_IRQS
//! (and removes them when it is disabled). So the active mode is visible from the
//! eventfds alone: [`PciIntr::raise`] uses MSI-X when any MSI-X vector has an eventfd,
//! else MSI when any MSI vector has one, else INTx.
//!
//! INTx is a level: raising it sets the status register's interrupt bit and, unless
//! the command register's INTx-disable bit is set, signals the INTx eventfd (which
//! masks itself, AUTOMASKED, until the VMM unmasks it after the guest's EOI — with an
//! UNMASK message, or by signalling the unmask eventfd it gave the device, typically
//! the resample eventfd of its KVM irqfd, so that an EOI unmasks with no message at
//! all). While the level stays high an unmask (either way) or clearing INTx-disable
//! signals again;
//! [`PciIntr::lower_intx`] drops the level. A raise that finds the vector masked is
//! remembered by [`Irqs`] and delivered at unmask (a level dropped in between can then
//! give one spurious INTx, which drivers tolerate).
//!
//! MSI vectors beyond the ones the VMM wired (fewer enabled than requested) fall back
//! to vector 0, as a function with fewer allocated messages shares them; MSI-X vectors
//! are independent and an unwired one is dropped. Bus mastering is not checked here
//! (the VMM owns that for message interrupts); a device checks
//! [`PciConfig::bus_master`] before its DMA.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::config::PciConfig;
use super::status;
use crate::irq::Irqs;
use crate::pci_index::{ERR_IRQ, INTX_IRQ, MSIX_IRQ, MSI_IRQ, REQ_IRQ};
use crate::{irq_flags, IrqAction, IrqData, IrqInfo, Result};

/// The interrupt mode in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntrMode {
    /// Legacy pin interrupt.
    Intx,
    /// MSI.
    Msi,
    /// MSI-X.
    MsiX,
    /// No interrupt can be delivered (no INTx pin and no message vectors wired).
    None,
}

/// What [`PciIntr::raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The vector's eventfd was signalled.
    Signalled {
        /// Mode used.
        mode: IntrMode,
        /// Vector signalled.
        vector: u32,
    },
    /// The vector is masked; the interrupt is pending and delivered at unmask.
    Pending {
        /// Mode used.
        mode: IntrMode,
        /// Vector.
        vector: u32,
    },
    /// INTx is asserted (status bit set) but disabled by the command register.
    IntxDisabled,
    /// Nothing could carry it (no eventfd for the vector, or no mode).
    Dropped {
        /// Mode chosen.
        mode: IntrMode,
        /// Vector.
        vector: u32,
    },
}

/// The interrupt indices of a PCI function and its INTx level. See the module
/// documentation.
pub struct PciIntr {
    irqs: Irqs,
    line: Arc<IntxLine>,
}

/// The INTx level and the command register's INTx-disable bit, shared with the
/// after-unmask hook of the irq state (which runs on an unmask eventfd's watch thread
/// too).
#[derive(Default)]
struct IntxLine {
    level: AtomicBool,
    disabled: AtomicBool,
}

impl IntxLine {
    /// After an unmask of `index`: re-raise INTx while its level is high, INTx is
    /// enabled and the vector is unmasked (a pending raise already fired and automasked
    /// it again).
    fn after_unmask(&self, irqs: &Irqs, index: u32) {
        if index == INTX_IRQ
            && self.level.load(Ordering::SeqCst)
            && !self.disabled.load(Ordering::SeqCst)
            && !irqs.is_masked(INTX_IRQ, 0)
        {
            irqs.trigger(INTX_IRQ, 0);
        }
    }
}

impl PciIntr {
    /// Indices as vfio-pci lays them out: INTx with one vector when `intx`, MSI with
    /// `msi_vectors`, MSI-X with `msix_vectors`, and empty ERR / REQ indices.
    pub fn new(intx: bool, msi_vectors: u32, msix_vectors: u32) -> Self {
        let info = |index: u32, flags: u32, count: u32| IrqInfo {
            index,
            flags,
            count,
        };
        let infos = [
            info(
                INTX_IRQ,
                irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
                u32::from(intx),
            ),
            info(
                MSI_IRQ,
                irq_flags::EVENTFD | irq_flags::NORESIZE,
                msi_vectors,
            ),
            info(
                MSIX_IRQ,
                irq_flags::EVENTFD | irq_flags::NORESIZE,
                msix_vectors,
            ),
            info(ERR_IRQ, irq_flags::EVENTFD, 0),
            info(REQ_IRQ, irq_flags::EVENTFD, 0),
        ];
        let line = Arc::new(IntxLine::default());
        let hooked = line.clone();
        PciIntr {
            irqs: Irqs::with_unmask_hook(
                &infos,
                Box::new(move |irqs, index| hooked.after_unmask(irqs, index)),
            ),
            line,
        }
    }

    /// Indices matching a built configuration space: INTx when it has an interrupt pin,
    /// MSI / MSI-X vectors from its capabilities.
    pub fn for_config(cfg: &PciConfig) -> Self {
        PciIntr::new(
            cfg.interrupt_pin() != 0,
            cfg.msi().map_or(0, |m| m.vectors_capable()),
            cfg.msix().map_or(0, |m| m.vectors().into()),
        )
    }

    /// The underlying indices.
    pub fn irqs(&self) -> &Irqs {
        &self.irqs
    }

    /// Number of irq indices (for `DeviceInfo::num_irqs`).
    pub fn num_irqs(&self) -> u32 {
        self.irqs.num_irqs()
    }

    /// `VfioDevice::irq_info`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.irqs.info(index)
    }

    /// `VfioDevice::set_irqs`. An INTx unmask (by message, or later by the unmask
    /// eventfd this may install) while the level is high and INTx is enabled signals
    /// again.
    pub fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.irqs.set_irqs(index, action, start, count, data)
    }

    fn any_eventfd(&self, index: u32) -> bool {
        let n = self.irqs.info(index).map_or(0, |i| i.count);
        (0..n).any(|v| self.irqs.has_eventfd(index, v))
    }

    /// The mode a raise would use now.
    pub fn mode(&self) -> IntrMode {
        if self.any_eventfd(MSIX_IRQ) {
            IntrMode::MsiX
        } else if self.any_eventfd(MSI_IRQ) {
            IntrMode::Msi
        } else if self.irqs.info(INTX_IRQ).is_ok_and(|i| i.count > 0) {
            IntrMode::Intx
        } else {
            IntrMode::None
        }
    }

    fn fire(&self, mode: IntrMode, index: u32, vector: u32) -> Delivery {
        let masked = self.irqs.is_masked(index, vector);
        let signalled = self.irqs.trigger(index, vector);
        if signalled {
            Delivery::Signalled { mode, vector }
        } else if masked {
            Delivery::Pending { mode, vector }
        } else {
            Delivery::Dropped { mode, vector }
        }
    }

    /// Raise `vector` in the active mode (see the module documentation). `cfg` is the
    /// function's configuration space (INTx-disable is read from it, the interrupt
    /// status bit set in it).
    pub fn raise(&self, cfg: &mut PciConfig, vector: u32) -> Delivery {
        match self.mode() {
            IntrMode::MsiX => self.fire(IntrMode::MsiX, MSIX_IRQ, vector),
            IntrMode::Msi => {
                let v = if self.irqs.has_eventfd(MSI_IRQ, vector) {
                    vector
                } else {
                    0
                };
                self.fire(IntrMode::Msi, MSI_IRQ, v)
            }
            IntrMode::Intx => {
                self.line.level.store(true, Ordering::SeqCst);
                cfg.set_status_bits(status::INTERRUPT, true);
                let disabled = cfg.intx_disabled();
                self.line.disabled.store(disabled, Ordering::SeqCst);
                if disabled {
                    Delivery::IntxDisabled
                } else {
                    self.fire(IntrMode::Intx, INTX_IRQ, 0)
                }
            }
            IntrMode::None => Delivery::Dropped {
                mode: IntrMode::None,
                vector,
            },
        }
    }

    /// Drop the INTx level (the device's interrupt cause was cleared).
    pub fn lower_intx(&self, cfg: &mut PciConfig) {
        self.line.level.store(false, Ordering::SeqCst);
        cfg.set_status_bits(status::INTERRUPT, false);
    }

    /// True while the INTx level is high.
    pub fn intx_asserted(&self) -> bool {
        self.line.level.load(Ordering::SeqCst)
    }

    /// Call after a driver write to the command register: clearing INTx-disable while
    /// the level is high signals INTx.
    pub fn command_written(&self, cfg: &PciConfig) {
        let disabled = cfg.intx_disabled();
        let was = self.line.disabled.swap(disabled, Ordering::SeqCst);
        if was
            && !disabled
            && self.line.level.load(Ordering::SeqCst)
            && self.mode() == IntrMode::Intx
        {
            self.irqs.trigger(INTX_IRQ, 0);
        }
    }

    /// Device reset: the INTx level drops; eventfds stay wired (the VMM owns them).
    pub fn reset(&self, cfg: &mut PciConfig) {
        self.lower_intx(cfg);
        self.line
            .disabled
            .store(cfg.intx_disabled(), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventfd::test_fds::{count, eventfd};
    use crate::pci::command;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn wire(p: &PciIntr, index: u32, start: u32, fds: &[&OwnedFd]) {
        p.set_irqs(
            index,
            IrqAction::Trigger,
            start,
            fds.len() as u32,
            IrqData::Eventfd(fds.iter().map(|f| Some(f.try_clone().unwrap())).collect()),
        )
        .unwrap();
    }

    fn config() -> PciConfig {
        let mut c = PciConfig::new();
        c.set_interrupt_pin(1).unwrap();
        c.add_msi(4, false).unwrap();
        c.add_bar(0, crate::pci::BarKind::Mmio32, 4096).unwrap();
        c.add_msix(8, 0, 0, 0, 0x800).unwrap();
        c
    }

    #[test]
    fn layout_from_config() {
        let p = PciIntr::for_config(&config());
        assert_eq!(p.num_irqs(), 5);
        assert_eq!(p.irq_info(INTX_IRQ).unwrap().count, 1);
        assert_ne!(
            p.irq_info(INTX_IRQ).unwrap().flags & irq_flags::AUTOMASKED,
            0
        );
        assert_eq!(p.irq_info(MSI_IRQ).unwrap().count, 4);
        assert_eq!(p.irq_info(MSIX_IRQ).unwrap().count, 8);
        assert_eq!(p.irq_info(ERR_IRQ).unwrap().count, 0);
        assert!(p.irq_info(5).is_err());
        assert_eq!(p.mode(), IntrMode::Intx);
        assert_eq!(PciIntr::new(false, 0, 0).mode(), IntrMode::None);
    }

    #[test]
    fn intx_level_disable_and_unmask() {
        let mut c = config();
        let p = PciIntr::for_config(&c);
        let e = eventfd();
        // No eventfd yet: asserted but dropped.
        assert_eq!(
            p.raise(&mut c, 0),
            Delivery::Dropped {
                mode: IntrMode::Intx,
                vector: 0
            }
        );
        assert_ne!(c.status() & status::INTERRUPT, 0);
        p.lower_intx(&mut c);
        assert_eq!(c.status() & status::INTERRUPT, 0);
        wire(&p, INTX_IRQ, 0, &[&e]);
        assert_eq!(
            p.raise(&mut c, 7),
            Delivery::Signalled {
                mode: IntrMode::Intx,
                vector: 0
            }
        );
        assert_eq!(count(&e), 1);
        // Automasked: a second raise is pending.
        assert_eq!(
            p.raise(&mut c, 0),
            Delivery::Pending {
                mode: IntrMode::Intx,
                vector: 0
            }
        );
        p.set_irqs(INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
            .unwrap();
        assert_eq!(count(&e), 1, "pending delivered at unmask");
        // Level still high: the next unmask signals again.
        p.set_irqs(INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
            .unwrap();
        assert_eq!(count(&e), 1, "level still high re-signals");
        // Lowered: unmask is quiet.
        p.lower_intx(&mut c);
        p.set_irqs(INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
            .unwrap();
        assert_eq!(count(&e), 0);
        // INTx disable: status bit set, nothing signalled; clearing it signals.
        c.write(4, &command::INTX_DISABLE.to_le_bytes()).unwrap();
        p.command_written(&c);
        assert_eq!(p.raise(&mut c, 0), Delivery::IntxDisabled);
        assert_ne!(c.status() & status::INTERRUPT, 0);
        assert_eq!(count(&e), 0);
        c.write(4, &0u16.to_le_bytes()).unwrap();
        p.command_written(&c);
        assert_eq!(count(&e), 1);
        p.reset(&mut c);
        assert!(!p.intx_asserted());
        assert_eq!(c.status() & status::INTERRUPT, 0);
    }

    #[test]
    fn msi_then_msix_preference() {
        let mut c = config();
        let p = PciIntr::for_config(&c);
        let intx = eventfd();
        let m0 = eventfd();
        let m1 = eventfd();
        let x3 = eventfd();
        wire(&p, INTX_IRQ, 0, &[&intx]);
        wire(&p, MSI_IRQ, 0, &[&m0, &m1]);
        assert_eq!(p.mode(), IntrMode::Msi);
        assert_eq!(
            p.raise(&mut c, 1),
            Delivery::Signalled {
                mode: IntrMode::Msi,
                vector: 1
            }
        );
        assert_eq!(count(&m1), 1);
        // Vector 3 is not wired (2 enabled): falls back to vector 0.
        assert_eq!(
            p.raise(&mut c, 3),
            Delivery::Signalled {
                mode: IntrMode::Msi,
                vector: 0
            }
        );
        assert_eq!(count(&m0), 1);
        assert_eq!(count(&intx), 0);
        assert_eq!(
            c.status() & status::INTERRUPT,
            0,
            "no INTx status in MSI mode"
        );
        wire(&p, MSIX_IRQ, 3, &[&x3]);
        assert_eq!(p.mode(), IntrMode::MsiX);
        assert_eq!(
            p.raise(&mut c, 3),
            Delivery::Signalled {
                mode: IntrMode::MsiX,
                vector: 3
            }
        );
        assert_eq!(count(&x3), 1);
        assert_eq!(
            p.raise(&mut c, 2),
            Delivery::Dropped {
                mode: IntrMode::MsiX,
                vector: 2
            }
        );
        assert!(matches!(p.raise(&mut c, 9999), Delivery::Dropped { .. }));
        // Disabling MSI-X (count 0) returns to MSI.
        p.set_irqs(MSIX_IRQ, IrqAction::Trigger, 0, 0, IrqData::None)
            .unwrap();
        assert_eq!(p.mode(), IntrMode::Msi);
        p.set_irqs(MSI_IRQ, IrqAction::Trigger, 0, 0, IrqData::None)
            .unwrap();
        assert_eq!(p.mode(), IntrMode::Intx);
        assert!(
            p.set_irqs(MSI_IRQ, IrqAction::Mask, 0, 1, IrqData::None)
                .is_err(),
            "MSI is not maskable through VFIO"
        );
    }

    fn signal(fd: &OwnedFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(n, 8);
    }

    /// Wait up to 5 s for `fd`'s counter to become non-zero; returns it (0 on timeout).
    fn wait_count(fd: &OwnedFd) -> u64 {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid fd described by a local.
        unsafe { libc::poll(&mut p, 1, 5000) };
        count(fd)
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t = std::time::Instant::now();
        while !f() {
            assert!(t.elapsed().as_secs() < 5, "timed out waiting for {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn intx_unmask_eventfd_unmasks_and_reasserts_without_a_message() {
        let mut c = config();
        let p = PciIntr::for_config(&c);
        let (trigger, unmask) = (eventfd(), eventfd());
        wire(&p, INTX_IRQ, 0, &[&trigger]);
        p.set_irqs(
            INTX_IRQ,
            IrqAction::Unmask,
            0,
            1,
            IrqData::Eventfd(vec![Some(unmask.try_clone().unwrap())]),
        )
        .unwrap();
        assert!(p.irqs().has_unmask_eventfd(INTX_IRQ, 0));
        for round in 0..50 {
            // The device asserts INTx: signalled once, then automasked.
            assert!(
                matches!(p.raise(&mut c, 0), Delivery::Signalled { .. }),
                "round {round}"
            );
            assert_eq!(count(&trigger), 1);
            assert!(p.irqs().is_masked(INTX_IRQ, 0));
            // The guest EOIs with the level still high: the unmask eventfd unmasks and the
            // device re-asserts, with no SET_IRQS at all.
            signal(&unmask);
            assert_eq!(wait_count(&trigger), 1, "round {round}: re-asserted");
            // The driver clears the cause; the next EOI just unmasks.
            p.lower_intx(&mut c);
            signal(&unmask);
            wait_until("unmask", || !p.irqs().is_masked(INTX_IRQ, 0));
            assert_eq!(count(&trigger), 0, "round {round}: no level, no interrupt");
        }
        // A reset keeps the owner's eventfds: the unmask eventfd still works after it.
        p.raise(&mut c, 0);
        assert_eq!(count(&trigger), 1);
        p.reset(&mut c);
        assert!(p.irqs().has_unmask_eventfd(INTX_IRQ, 0));
        signal(&unmask);
        wait_until("unmask after reset", || !p.irqs().is_masked(INTX_IRQ, 0));
        assert_eq!(count(&trigger), 0, "the level dropped at reset");
    }

    #[test]
    fn intx_unmask_eventfd_deregistration() {
        let mut c = config();
        let p = PciIntr::for_config(&c);
        let (trigger, unmask) = (eventfd(), eventfd());
        let set_unmask = |fd: Option<&OwnedFd>| {
            p.set_irqs(
                INTX_IRQ,
                IrqAction::Unmask,
                0,
                1,
                IrqData::Eventfd(vec![fd.map(|f| f.try_clone().unwrap())]),
            )
        };
        // Before the trigger eventfd: refused (as vfio-pci's is_intx check).
        assert_eq!(set_unmask(Some(&unmask)).unwrap_err().errno(), libc::EINVAL);
        wire(&p, INTX_IRQ, 0, &[&trigger]);
        set_unmask(Some(&unmask)).unwrap();
        // fd -1 removes it: a later signal unmasks nothing.
        set_unmask(None).unwrap();
        assert!(!p.irqs().has_unmask_eventfd(INTX_IRQ, 0));
        p.raise(&mut c, 0);
        assert_eq!(count(&trigger), 1);
        signal(&unmask);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            p.irqs().is_masked(INTX_IRQ, 0),
            "a removed unmask eventfd unmasked"
        );
        // Removing the trigger eventfd removes the unmask eventfd too; so does count 0.
        set_unmask(Some(&unmask)).unwrap();
        p.set_irqs(
            INTX_IRQ,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![None]),
        )
        .unwrap();
        assert!(!p.irqs().has_unmask_eventfd(INTX_IRQ, 0));
        wire(&p, INTX_IRQ, 0, &[&trigger]);
        set_unmask(Some(&unmask)).unwrap();
        p.set_irqs(INTX_IRQ, IrqAction::Trigger, 0, 0, IrqData::None)
            .unwrap();
        assert!(!p.irqs().has_unmask_eventfd(INTX_IRQ, 0));
        wire(&p, INTX_IRQ, 0, &[&trigger]);
        set_unmask(Some(&unmask)).unwrap();
        p.irqs().disable_all();
        assert!(!p.irqs().has_unmask_eventfd(INTX_IRQ, 0));
    }
}
