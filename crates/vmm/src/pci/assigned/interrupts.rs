//! Interrupt wiring of an assigned device, through the platform's
//! [`crate::irqchip::IrqChip`]: the device signals eventfds, the interrupt controller
//! turns them into guest interrupts, and no other process or thread is on the way.
//!
//! - **INTx**: a line source for the function's pin, attached with a resample eventfd
//!   (KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE: level-triggered, the resample eventfd
//!   signalled at the guest's EOI). That resample eventfd is handed to the device as its
//!   INTx *unmask eventfd* (SET_IRQS ACTION_UNMASK | DATA_EVENTFD), so an EOI unmasks
//!   the device with no message and no thread in the VMM; a device that refuses it gets
//!   a small thread here that sends an UNMASK per EOI instead.
//!   The source number is the interrupt-line register's value.
//! - **MSI**: the capability is virtualised ([`MsiLayout`]: 32- or 64-bit address, with
//!   or without per-vector masking). When the guest enables it, each enabled vector
//!   gets a message source and an attached eventfd, the messages are programmed in one
//!   batch (vector v's data has its low log2(enabled count) bits replaced by v,
//!   [`MsiEnable`]), and the eventfds are handed to the device with SET_IRQS. A set
//!   per-vector mask bit detaches the vector's eventfd (the MSI pending-bits register
//!   is not emulated: it reads as the shadow value, 0).
//! - **MSI-X**: the VMM keeps the table ([`MsixTable`], the same implementation device
//!   models use) and intercepts BAR accesses to it and to the PBA ([`MsixCap::locate`]);
//!   while enabled each entry's message is programmed, the device holds one eventfd per
//!   vector, and a vector masked by its entry or the function mask is a detached
//!   eventfd: it keeps counting, the PBA shows it pending, and the controller delivers
//!   it when the eventfd is attached again at unmask.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nestio_device_model::pci::{MsiEnable, MsiMessage, MsixCap, MsixHit, MsixTable};
use nestio_device_model::{pci_index, IrqAction, IrqData, VfioDevice};
use vmm_sys_util::eventfd::EventFd;

use super::config::{find_cap, ConfigShadow, CFG, INTERRUPT_LINE};
use super::{is_fatal, AssignedDevice, State};
use crate::irqchip::{IrqSource, SourceRequest};
use crate::pci::{PciHostError, PciRoot};
use crate::region_map::{dup_eventfd, owned_dup};

const MSI_CAP_ID: u8 = 0x05;
const MSIX_CAP_ID: u8 = 0x11;
const MSI_CTRL_ENABLE_MME: u8 = 0x71;
const MSIX_CTRL_ENABLE: u16 = 0x8000;
const MSIX_CTRL_FUNCTION_MASK: u16 = 0x4000;

/// True when the eventfd's counter is non-zero (without consuming it).
fn eventfd_pending(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid fd with a zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

/// One MSI or MSI-X vector: its interrupt source and the eventfd the device signals.
struct MsiVector {
    source: IrqSource,
    fd: EventFd,
}

/// Where the registers of a device's MSI capability are (its shape is read once).
#[derive(Debug, Clone, Copy)]
pub(super) struct MsiLayout {
    cap: usize,
    is64: bool,
    /// Per-vector masking capable.
    pvm: bool,
    max_vectors: u32,
}

impl MsiLayout {
    /// The layout of the MSI capability at `cap` with message control `ctrl`, if it
    /// fits in the conventional space.
    fn parse(cap: usize, ctrl: u16) -> Option<Self> {
        let is64 = ctrl & (1 << 7) != 0;
        let pvm = ctrl & (1 << 8) != 0;
        let len = 10 + if is64 { 4 } else { 0 } + if pvm { 10 } else { 0 };
        (cap + len <= CFG).then_some(MsiLayout {
            cap,
            is64,
            pvm,
            max_vectors: 1u32 << ((ctrl >> 1) & 7).min(5),
        })
    }
    fn control(&self) -> usize {
        self.cap + 2
    }
    fn address_lo(&self) -> usize {
        self.cap + 4
    }
    fn address_hi(&self) -> Option<usize> {
        self.is64.then_some(self.cap + 8)
    }
    fn data(&self) -> usize {
        self.cap + if self.is64 { 12 } else { 8 }
    }
    fn mask(&self) -> Option<usize> {
        self.pvm.then_some(self.data() + 4)
    }
    fn end(&self) -> usize {
        self.mask().map_or(self.data() + 2, |m| m + 8)
    }
    /// The guest's message address.
    fn address(&self, cfg: &ConfigShadow) -> u64 {
        let hi = self.address_hi().map_or(0, |o| cfg.u32(o) as u64);
        cfg.u32(self.address_lo()) as u64 | hi << 32
    }
}

/// The MSI state of an assigned device.
pub(super) struct Msi {
    layout: MsiLayout,
    vectors: Vec<MsiVector>,
    /// Whether each vector's eventfd is attached (masked vectors are not: their
    /// eventfd keeps counting and the controller delivers at re-attachment).
    registered: Vec<bool>,
    /// Vectors currently handed to the device (0: MSI off).
    active: u32,
}

impl Msi {
    /// Virtualise the device's MSI capability in `cfg` (enable off, MME 0); `None`
    /// without one, or when the device offers no MSI interrupts.
    pub(super) fn probe(
        dev: &dyn VfioDevice,
        raw: &[u8; CFG],
        cfg: &mut ConfigShadow,
    ) -> Option<Msi> {
        let cap = find_cap(raw, MSI_CAP_ID)?;
        let layout = MsiLayout::parse(cap, u16::from_le_bytes([raw[cap + 2], raw[cap + 3]]))?;
        cfg.make_virtual(layout.control()..layout.end());
        let ctrl = cfg.u16(layout.control()) & !u16::from(MSI_CTRL_ENABLE_MME);
        cfg.set_virtual(
            layout.control(),
            &ctrl.to_le_bytes(),
            &[MSI_CTRL_ENABLE_MME, 0],
        );
        cfg.set_wmask(layout.address_lo(), &0xffff_fffcu32.to_le_bytes());
        if let Some(o) = layout.address_hi() {
            cfg.set_wmask(o, &u32::MAX.to_le_bytes());
        }
        cfg.set_wmask(layout.data(), &u16::MAX.to_le_bytes());
        if let Some(o) = layout.mask() {
            let m = if layout.max_vectors >= 32 {
                u32::MAX
            } else {
                (1u32 << layout.max_vectors) - 1
            };
            cfg.set_wmask(o, &m.to_le_bytes());
        }
        let msi_ok = dev
            .irq_info(pci_index::MSI_IRQ)
            .map(|i| i.count >= 1)
            .unwrap_or(false);
        msi_ok.then(|| Msi {
            layout,
            vectors: Vec::new(),
            registered: Vec::new(),
            active: 0,
        })
    }

    /// Whether configuration register `reg` is in the capability.
    pub(super) fn covers(&self, reg: usize) -> bool {
        reg >= self.layout.cap && reg < self.layout.cap + 24
    }
}

/// The MSI-X state of an assigned device.
pub(super) struct Msix {
    cap: MsixCap,
    table: MsixTable,
    vectors: Vec<MsiVector>,
    /// Whether each vector's eventfd is attached (detached = masked).
    registered: Vec<bool>,
    /// Eventfds handed to the device.
    active: bool,
}

impl Msix {
    /// Virtualise the device's MSI-X message control in `cfg` (enable and function
    /// mask off); `None` without a usable capability (a table or PBA outside its BAR,
    /// or fewer MSI-X interrupts than table entries: then MSI-X does not deliver).
    pub(super) fn probe(
        dev: &dyn VfioDevice,
        name: &str,
        raw: &[u8; CFG],
        cfg: &mut ConfigShadow,
    ) -> Option<Msix> {
        let cap = find_cap(raw, MSIX_CAP_ID).filter(|c| c + 12 <= CFG)?;
        let rd = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let ctrl = u16::from_le_bytes([raw[cap + 2], raw[cap + 3]]);
        let m = match MsixCap::from_registers(cap, ctrl, rd(cap + 4), rd(cap + 8)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(device = %name, error = %e, "MSI-X capability unusable; MSI-X will not deliver");
                return None;
            }
        };
        let fits = |bar: usize, off: u64, len: u64| {
            dev.region_info(bar as u32)
                .map(|r| off + len <= r.size)
                .unwrap_or(false)
        };
        let irqs = dev
            .irq_info(pci_index::MSIX_IRQ)
            .map(|i| i.count)
            .unwrap_or(0);
        if irqs < u32::from(m.vectors())
            || !fits(m.table_bar(), m.table_offset(), m.table_len())
            || !fits(m.pba_bar(), m.pba_offset(), m.pba_len())
        {
            tracing::warn!(device = %name, "MSI-X capability unusable (table outside its BAR or too few vectors); MSI-X will not deliver");
            return None;
        }
        let ctrl = ctrl & !(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        cfg.set_virtual(cap + 2, &ctrl.to_le_bytes(), &[0, 0xc0]);
        Some(Msix {
            cap: m,
            table: m.new_table(),
            vectors: Vec::new(),
            registered: vec![false; m.vectors().into()],
            active: false,
        })
    }

    /// The capability (where the table and PBA are).
    pub(super) fn cap(&self) -> MsixCap {
        self.cap
    }

    /// Set the PBA from the eventfds: a detached vector whose eventfd has counted is
    /// pending.
    fn refresh_pba(&mut self) {
        for v in 0..self.cap.vectors() {
            let masked = !self.registered.get(usize::from(v)).copied().unwrap_or(true);
            let pending = masked
                && self
                    .vectors
                    .get(usize::from(v))
                    .is_some_and(|x| eventfd_pending(&x.fd));
            self.table.set_pending(v, pending);
        }
    }
}

/// The INTx wiring of an assigned device.
pub(super) struct Intx {
    pub(super) source: IrqSource,
    /// Stops the resample thread (if there is one).
    pub(super) stop: EventFd,
    /// How the device is unmasked at the guest's EOI (holds the eventfds it needs).
    pub(super) _unmask: IntxUnmask,
}

/// How an assigned device's INTx is unmasked after the guest's EOI.
pub(super) enum IntxUnmask {
    /// The device holds the irqfd's resample eventfd as its unmask eventfd (SET_IRQS
    /// ACTION_UNMASK | DATA_EVENTFD): KVM signals it, the device unmasks, no message.
    ByEventfd {
        _trigger: EventFd,
        _resample: EventFd,
    },
    /// The device refused that (an older server): a thread here waits for the resample
    /// eventfd and sends an UNMASK per EOI.
    ByMessage,
}

/// Wire INTx `pin` of the device at `slot`, when it has one and offers INTx: a line
/// source with a resample eventfd (level-triggered KVM irqfd), the trigger eventfd
/// handed to the device, and the resample eventfd handed to it as its unmask eventfd —
/// or, when the device refuses that, a resample thread that unmasks by message. The
/// interrupt-line register becomes virtual either way.
pub(super) fn wire_intx(
    root: &PciRoot,
    dev: &Arc<dyn VfioDevice>,
    slot: u8,
    name: &str,
    pin: u8,
    cfg: &mut ConfigShadow,
) -> Result<Option<Intx>, PciHostError> {
    let derr = |message: String| PciHostError::Device {
        device: name.into(),
        message,
    };
    let intx_ok = dev
        .irq_info(pci_index::INTX_IRQ)
        .map(|i| i.count >= 1)
        .unwrap_or(false);
    if !(1..=4).contains(&pin) || !intx_ok {
        cfg.set_virtual(INTERRUPT_LINE, &[0xff], &[0xff]);
        return Ok(None);
    }
    let irq_err = |err| PciHostError::Irq {
        device: name.into(),
        err,
    };
    let source = root
        .irqchip()
        .allocate(SourceRequest::PciIntx { slot, pin })
        .map_err(irq_err)?;
    let (trigger, resample) = (
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| derr(e.to_string()))?,
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| derr(e.to_string()))?,
    );
    root.irqchip()
        .attach(source, &trigger, Some(&resample))
        .map_err(irq_err)?;
    let fd = owned_dup(&trigger).map_err(|e| derr(e.to_string()))?;
    dev.set_irqs(
        pci_index::INTX_IRQ,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(fd)]),
    )
    .map_err(|e| derr(format!("SET_IRQS(INTx eventfd) refused: {e}")))?;
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| derr(e.to_string()))?;
    // The resample eventfd as the device's unmask eventfd: KVM signals it at the
    // guest's EOI and the device unmasks itself, with no message and no thread here.
    let unmask_fd = owned_dup(&resample).map_err(|e| derr(e.to_string()))?;
    match dev.set_irqs(
        pci_index::INTX_IRQ,
        IrqAction::Unmask,
        0,
        1,
        IrqData::Eventfd(vec![Some(unmask_fd)]),
    ) {
        Ok(()) => {
            tracing::debug!(device = %name, "INTx: the device unmasks at EOI through the resample eventfd");
            let line = u8::try_from(source.number()).unwrap_or(0xff);
            cfg.set_virtual(INTERRUPT_LINE, &[line], &[0xff]);
            return Ok(Some(Intx {
                source,
                stop,
                _unmask: IntxUnmask::ByEventfd {
                    _trigger: trigger,
                    _resample: resample,
                },
            }));
        }
        Err(e) if is_fatal(&e) => {
            return Err(derr(format!("SET_IRQS(INTx unmask eventfd): {e}")));
        }
        Err(e) => tracing::debug!(
            device = %name,
            error = %e,
            "INTx: the device takes no unmask eventfd; unmasking by message at each EOI"
        ),
    }
    let thread_stop = dup_eventfd(&stop).map_err(|e| derr(e.to_string()))?;
    let (d, n) = (dev.clone(), name.to_string());
    std::thread::Builder::new()
        .name(format!("intx-{slot}"))
        .spawn(move || resample_loop(d, n, resample, thread_stop, trigger))
        .map_err(|e| derr(e.to_string()))?;
    let line = u8::try_from(source.number()).unwrap_or(0xff);
    cfg.set_virtual(INTERRUPT_LINE, &[line], &[0xff]);
    Ok(Some(Intx {
        source,
        stop,
        _unmask: IntxUnmask::ByMessage,
    }))
}

fn resample_loop(
    dev: Arc<dyn VfioDevice>,
    name: String,
    resample: EventFd,
    stop: EventFd,
    _trigger: EventFd,
) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: resample.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two valid fds described by a local array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            let _ = resample.read();
            if let Err(e) =
                dev.set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
            {
                tracing::warn!(device = %name, error = %e, "cannot unmask INTx");
                if is_fatal(&e) {
                    return;
                }
            }
        }
    }
}

impl AssignedDevice {
    /// MSI-X table and PBA accesses (`len` bytes at `offset` of BAR `index`) are the
    /// VMM's; returns `None` when handled here, else the access back for the device.
    #[allow(clippy::type_complexity)]
    pub(super) fn msix_access<'a, 'b>(
        &self,
        index: u32,
        offset: u64,
        len: u64,
        read: Option<&'a mut [u8]>,
        write: Option<&'b [u8]>,
    ) -> Option<(Option<&'a mut [u8]>, Option<&'b [u8]>)> {
        let Some(cap) = self.msix_cap else {
            return Some((read, write));
        };
        // Ordinary register accesses leave here without touching the lock.
        let (bar, len) = (index as usize, len as usize);
        if !cap.overlaps(bar, offset, len) {
            return Some((read, write));
        }
        let mut st = self.lock();
        let Some(m) = st.msix.as_mut() else {
            return Some((read, write));
        };
        // The table refuses anything but aligned dword or qword accesses, as the
        // specification requires; a refused or straddling read is all-ones.
        match (cap.locate(bar, offset, len), read, write) {
            (Some(MsixHit::Pba(o)), Some(d), _) => {
                m.refresh_pba();
                if m.table.read_pba(o, d).is_err() {
                    d.fill(0xff);
                }
            }
            (Some(MsixHit::Table(o)), Some(d), _) => {
                m.table.read_table(o, d).unwrap_or_else(|_| d.fill(0xff));
            }
            (Some(MsixHit::Table(o)), None, Some(d)) => {
                let written = m.table.write_table(o, d).is_ok();
                if written {
                    self.update_msix(&mut st);
                }
            }
            (None, Some(d), _) => d.fill(0xff),
            _ => {}
        }
        None
    }

    /// Apply the guest's MSI-X configuration: messages from the table, eventfds handed
    /// to the device while enabled, eventfds attached only for unmasked vectors.
    pub(super) fn update_msix(&self, st: &mut State) {
        let Some(root) = self.root.upgrade() else {
            return;
        };
        let State { cfg, msix, .. } = st;
        let Some(m) = msix.as_mut() else { return };
        let ctrl = cfg.u16(m.cap.offset() + 2);
        let enabled = ctrl & MSIX_CTRL_ENABLE != 0;
        let fmask = ctrl & MSIX_CTRL_FUNCTION_MASK != 0;
        if enabled {
            while m.vectors.len() < usize::from(m.cap.vectors()) {
                let (Ok(source), Ok(fd)) = (
                    root.irqchip().allocate(SourceRequest::Msi),
                    EventFd::new(libc::EFD_NONBLOCK),
                ) else {
                    tracing::warn!(device = %self.name, "out of interrupt sources or eventfds for MSI-X");
                    return;
                };
                m.vectors.push(MsiVector { source, fd });
            }
            let routes: Vec<(IrqSource, Option<MsiMessage>)> = m
                .vectors
                .iter()
                .enumerate()
                .map(|(v, x)| (x.source, m.table.entry(v as u16).map(|e| e.message())))
                .collect();
            let routes = self.translate_routes(routes);
            if let Err(e) = root.irqchip().program_msi(&routes) {
                tracing::warn!(device = %self.name, error = %e, "cannot program MSI-X messages");
            }
            if !m.active {
                let fds: Vec<Option<OwnedFd>> =
                    m.vectors.iter().map(|v| owned_dup(&v.fd).ok()).collect();
                match self.dev.set_irqs(
                    pci_index::MSIX_IRQ,
                    IrqAction::Trigger,
                    0,
                    m.cap.vectors().into(),
                    IrqData::Eventfd(fds),
                ) {
                    Ok(()) => m.active = true,
                    Err(e) => {
                        if is_fatal(&e) {
                            self.fault("SET_IRQS(MSI-X)", e);
                        } else {
                            tracing::warn!(device = %self.name, error = %e, "device refused MSI-X eventfds");
                        }
                        return;
                    }
                }
            }
        } else if m.active {
            let _ = self
                .dev
                .set_irqs(pci_index::MSIX_IRQ, IrqAction::Trigger, 0, 0, IrqData::None);
            m.active = false;
        }
        for (v, vec) in m.vectors.iter().enumerate() {
            let want = enabled && !fmask && !m.table.masked(v as u16);
            if want == m.registered[v] {
                continue;
            }
            let r = if want {
                root.irqchip().unmask(vec.source, &vec.fd)
            } else {
                root.irqchip().mask(vec.source, &vec.fd)
            };
            match r {
                Ok(()) => m.registered[v] = want,
                Err(e) => {
                    tracing::warn!(device = %self.name, vector = v, error = %e, "MSI-X mask change failed")
                }
            }
        }
    }

    /// Apply the guest's MSI configuration.
    pub(super) fn update_msi(&self, st: &mut State) {
        let Some(root) = self.root.upgrade() else {
            return;
        };
        let State { cfg, msi, .. } = st;
        let Some(msi) = msi.as_mut() else { return };
        let l = msi.layout;
        // The enabled count as the PCI spec defines it (reserved MME values and values
        // above MMC clamped); the vectors wired are at most what the device has.
        let enable = MsiEnable::from_control(cfg.u16(l.control()));
        let want = enable.map_or(0, |e| e.count().min(l.max_vectors));
        let address = l.address(cfg);
        let data = cfg.u16(l.data());
        // Make sure enough vectors exist (source + eventfd, attached).
        while (msi.vectors.len() as u32) < want {
            let source = match root.irqchip().allocate(SourceRequest::Msi) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(device = %self.name, error = %e, "no interrupt source for MSI");
                    break;
                }
            };
            let Ok(fd) = EventFd::new(libc::EFD_NONBLOCK) else {
                break;
            };
            if let Err(e) = root.irqchip().attach(source, &fd, None) {
                tracing::warn!(device = %self.name, error = %e, "cannot attach an MSI vector");
                break;
            }
            msi.vectors.push(MsiVector { source, fd });
            msi.registered.push(true);
        }
        let want = want.min(msi.vectors.len() as u32);
        // One batch for all vectors, not one per vector.
        let sources: Vec<IrqSource> = msi.vectors.iter().map(|v| v.source).collect();
        let routes = self.translate_routes(msi_messages(enable, want, address, data, &sources));
        if let Err(e) = root.irqchip().program_msi(&routes) {
            tracing::warn!(device = %self.name, error = %e, "cannot program MSI messages");
        }
        if want != msi.active {
            self.hand_msi_eventfds(msi, want);
        }
        // Per-vector masking: a masked vector's eventfd is detached.
        let mask = l.mask().map_or(0, |o| cfg.u32(o));
        for (v, vec) in msi.vectors.iter().enumerate() {
            let want_reg = v >= 32 || mask & (1 << v) == 0;
            if want_reg == msi.registered[v] {
                continue;
            }
            let r = if want_reg {
                root.irqchip().unmask(vec.source, &vec.fd)
            } else {
                root.irqchip().mask(vec.source, &vec.fd)
            };
            match r {
                Ok(()) => msi.registered[v] = want_reg,
                Err(e) => {
                    tracing::warn!(device = %self.name, vector = v, error = %e, "MSI mask change failed")
                }
            }
        }
    }

    /// The messages as the interrupt controller must see them: each address
    /// translated by the DMA domain's MSI translator (the identity without a vIOMMU,
    /// `crate::iommu::msi`); a message that does not reach the doorbell gets no route,
    /// so its vector stays masked.
    fn translate_routes(
        &self,
        routes: Vec<(IrqSource, Option<MsiMessage>)>,
    ) -> Vec<(IrqSource, Option<MsiMessage>)> {
        let t = self.dma.msi_translator();
        routes
            .into_iter()
            .map(|(src, msg)| {
                let msg = msg.and_then(|m| match t.translate(self.stream, m.address) {
                    Ok(address) => Some(MsiMessage { address, ..m }),
                    Err(e) => {
                        tracing::warn!(device = %self.name, error = %e, "MSI vector not routed");
                        None
                    }
                });
                (src, msg)
            })
            .collect()
    }

    /// The MSI and MSI-X addresses the guest has programmed (enabled or not).
    fn programmed_msi_addresses(st: &State) -> Vec<u64> {
        let mut v = Vec::new();
        if let Some(m) = &st.msi {
            v.push(m.layout.address(&st.cfg));
        }
        if let Some(m) = &st.msix {
            v.extend(
                (0..m.cap.vectors()).filter_map(|i| m.table.entry(i).map(|e| e.message().address)),
            );
        }
        v
    }

    /// Give the device the eventfds of the first `want` MSI vectors (none: MSI off).
    fn hand_msi_eventfds(&self, msi: &mut Msi, want: u32) {
        let r = if want == 0 {
            self.dev
                .set_irqs(pci_index::MSI_IRQ, IrqAction::Trigger, 0, 0, IrqData::None)
        } else {
            let fds: Vec<Option<OwnedFd>> = msi.vectors[..want as usize]
                .iter()
                .map(|v| owned_dup(&v.fd).ok())
                .collect();
            if msi.active != 0 {
                let _ =
                    self.dev
                        .set_irqs(pci_index::MSI_IRQ, IrqAction::Trigger, 0, 0, IrqData::None);
            }
            self.dev.set_irqs(
                pci_index::MSI_IRQ,
                IrqAction::Trigger,
                0,
                want,
                IrqData::Eventfd(fds),
            )
        };
        match r {
            Ok(()) => msi.active = want,
            Err(e) => {
                if is_fatal(&e) {
                    self.fault("SET_IRQS(MSI)", e);
                } else {
                    tracing::warn!(device = %self.name, error = %e, "device refused MSI eventfds");
                }
            }
        }
    }
}

/// The MSI message of each allocated vector (`sources[v]` is vector v's source):
/// vectors below `wired` get `address` and their data — the programmed `data` with the
/// low log2(enabled count) bits replaced by v, per the PCI spec, computed from the
/// *enabled* count even when fewer vectors could be wired — and the rest no message.
fn msi_messages(
    enable: Option<MsiEnable>,
    wired: u32,
    address: u64,
    data: u16,
    sources: &[IrqSource],
) -> Vec<(IrqSource, Option<MsiMessage>)> {
    sources
        .iter()
        .enumerate()
        .map(|(v, &source)| {
            let v = v as u32;
            let message = enable
                .filter(|_| v < wired)
                .and_then(|e| e.data(data, v))
                .map(|data| MsiMessage { address, data });
            (source, message)
        })
        .collect()
}

/// What live migration needs of the interrupt state (`super::migration`).
impl AssignedDevice {
    /// Configuration offsets of the MSI and MSI-X message control registers (the
    /// enables a restore writes last).
    pub(super) fn control_offsets(st: &State) -> Vec<usize> {
        let mut v = Vec::new();
        if let Some(m) = &st.msi {
            v.push(m.layout.control());
        }
        if let Some(m) = &st.msix {
            v.push(m.cap.offset() + 2);
        }
        v
    }

    /// The guest's MSI-X table entries (address lo, hi, data, control) in the VMM's table.
    pub(super) fn msix_entries(st: &State) -> Vec<[u32; 4]> {
        let Some(m) = &st.msix else {
            return Vec::new();
        };
        (0..m.cap.vectors())
            .map(|v| {
                let e = m.table.entry(v).unwrap_or_default();
                [e.addr_lo, e.addr_hi, e.data, e.control]
            })
            .collect()
    }

    /// Write migrated MSI-X table entries into the VMM's table (before the enable).
    pub(super) fn load_msix_entries(st: &mut State, entries: &[[u32; 4]]) -> Result<(), String> {
        let Some(m) = st.msix.as_mut() else {
            return if entries.is_empty() {
                Ok(())
            } else {
                Err("the stream has MSI-X entries, this device has no MSI-X".into())
            };
        };
        if entries.len() != usize::from(m.cap.vectors()) {
            return Err(format!(
                "the stream has {} MSI-X entries, this device has {}",
                entries.len(),
                m.cap.vectors()
            ));
        }
        for (v, e) in entries.iter().enumerate() {
            for (i, w) in e.iter().enumerate() {
                m.table
                    .write_table((v * 16 + i * 4) as u64, &w.to_le_bytes())
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

impl crate::iommu::msi::MsiWatcher for AssignedDevice {
    /// The vIOMMU invalidated `range`: program again the messages whose address lies
    /// in it (all of them for `None`).
    fn retranslate(&self, range: Option<(u64, u64)>) {
        let mut st = self.lock();
        let hit = Self::programmed_msi_addresses(&st)
            .into_iter()
            .any(|a| range.is_none_or(|(start, len)| a >= start && a - start < len));
        if hit {
            tracing::debug!(device = %self.name, ?range, "MSI addresses translated again");
            self.update_msi(&mut st);
            self.update_msix(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irqchip::SourceKind;

    /// `msi_messages` over sources numbered `gsis`, as `(number, Some((address, data)))`.
    fn msi_routes(
        enable: Option<MsiEnable>,
        wired: u32,
        address: u64,
        data: u16,
        gsis: &[u32],
    ) -> Vec<(u32, Option<(u64, u32)>)> {
        let sources: Vec<IrqSource> = gsis
            .iter()
            .map(|&g| IrqSource::new(g, SourceKind::Msi))
            .collect();
        msi_messages(enable, wired, address, data, &sources)
            .into_iter()
            .map(|(s, m)| (s.number(), m.map(|m| (m.address, m.data))))
            .collect()
    }

    #[test]
    fn msi_route_data_follows_the_enabled_count_not_the_wired_count() {
        // MME = 4 vectors (log2 2), MMC = 8, enabled; only 3 GSIs could be wired.
        let ctrl = 1 | (3 << 1) | (2 << 4);
        let en = MsiEnable::from_control(ctrl);
        let r = msi_routes(en, 3, 0xfee0_0000, 0x41, &[24, 25, 26]);
        assert_eq!(
            r,
            vec![
                (24, Some((0xfee0_0000, 0x40))),
                (25, Some((0xfee0_0000, 0x41))),
                (26, Some((0xfee0_0000, 0x42))),
            ],
            "each vector has its own data; the low 2 bits are the vector number"
        );
    }

    #[test]
    fn msi_routes_for_reserved_and_oversized_enables_and_disabled_msi() {
        // MME 7 (reserved) with MMC 2 vectors: 2 vectors, data bit 0 is the vector.
        let en = MsiEnable::from_control(1 | (1 << 1) | (7 << 4));
        let r = msi_routes(en, 2, 0xfee0_1000, 0x55, &[30, 31, 32]);
        assert_eq!(
            r,
            vec![
                (30, Some((0xfee0_1000, 0x54))),
                (31, Some((0xfee0_1000, 0x55))),
                (32, None),
            ]
        );
        // Disabled: no routes at all.
        let r = msi_routes(MsiEnable::from_control(0x70), 0, 0xfee0_0000, 0, &[1, 2]);
        assert_eq!(r, vec![(1, None), (2, None)]);
        // Single vector: data untouched.
        let r = msi_routes(MsiEnable::from_control(1), 1, 0xfee0_0000, 0xffff, &[5]);
        assert_eq!(r, vec![(5, Some((0xfee0_0000, 0xffff)))]);
    }

    #[test]
    fn msi_layout_for_32_and_64_bit_with_and_without_masking() {
        let l = MsiLayout::parse(0x50, 0).unwrap();
        assert_eq!((l.data(), l.mask(), l.end()), (0x58, None, 0x5a));
        let l = MsiLayout::parse(0x50, 1 << 7 | 1 << 8 | 3 << 1).unwrap();
        assert_eq!(
            (l.address_hi(), l.data(), l.mask()),
            (Some(0x58), 0x5c, Some(0x60))
        );
        assert_eq!((l.end(), l.max_vectors), (0x68, 8));
        assert!(
            MsiLayout::parse(0xf0, 1 << 7 | 1 << 8).is_none(),
            "beyond 256 bytes"
        );
    }
}
