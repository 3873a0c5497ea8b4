//! An assigned device: a [`VfioDevice`] wired into the VM as PCI function 00:NN.0.
//!
//! Configuration space is virtualised the way vfio-pci VMMs do it: a shadow copy holds
//! the registers the VMM owns (BARs, expansion ROM, interrupt line, the MSI
//! capability), each byte with a write mask; every other byte is read from and written
//! to the device's configuration region. A read that mixes both is read from the
//! device and overlaid with the shadow bytes.
//!
//! BARs: sizes come from the device's region info (rounded up to a power of two, at
//! least 4 KiB for memory so areas can be mapped), type bits from its BAR registers.
//! The VMM assigns addresses at creation, as firmware would, and follows the guest's
//! reprogramming: a BAR is mapped only while its decode bit is on in the command
//! register and it lies inside a BAR window. A mapped BAR is (1) a bus range whose
//! accesses become region reads/writes (offsets checked against the region size; the
//! rest of a rounded-up BAR reads all-ones), (2) one KVM memory slot per mmappable
//! sparse area (the guest touches the device's memory with no exit), and (3) the
//! device's ioeventfds registered with KVM.
//!
//! Interrupts travel as eventfds from the device straight into the interrupt
//! controller, through the platform's [`crate::irqchip::IrqChip`]: INTx is a line
//! source attached with a resample fd (a small thread unmasks the device's INTx when
//! the guest EOIs); MSI vectors get a message source each, programmed with the
//! guest's address/data, an attached eventfd, handed to the device by SET_IRQS
//! when the guest enables MSI. MSI-X is virtualised the same way: the VMM keeps the
//! table (BAR accesses to the table and PBA are intercepted, and no mmapped area may
//! cover them), programs each entry's message, hands the device one eventfd per vector
//! while MSI-X is enabled, and masks a vector by detaching its eventfd: the eventfd
//! keeps counting, the PBA shows it pending, and the controller delivers it when the
//! eventfd is attached again at unmask. MSI per-vector mask bits work the same way (the MSI
//! pending-bits register is not emulated: it reads as the shadow value, 0).
//!
//! A device error that means the device is gone (disconnected, I/O error) is fatal for
//! the VM and names the device; any other refused access reads all-ones.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

use nestio_device::pci::{MsiEnable, MsiMessage};
use nestio_device::{pci_index, region_flags, DeviceError, IrqAction, IrqData, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use vmm_sys_util::eventfd::EventFd;

use super::{PciError, PciFunction, PciRoot, MMIO_WINDOW};
use crate::address_space::{IoEventSpec, IoSpace};
use crate::bus::{Bus, BusDevice, BusFault, BusRange};
use crate::irqchip::{IrqSource, SourceRequest};
use crate::memory::GuestRam;

const CFG: usize = 256;
const PAGE: u64 = 4096;

/// One mmapped sparse area of a BAR.
struct MmapArea {
    offset: u64,
    size: u64,
    host: usize,
    slot: u32,
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` came from a successful mmap owned by this value.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.size as usize) };
    }
}

struct IoEvent {
    offset: u64,
    datamatch: Option<(u64, u64)>,
    fd: EventFd,
}

struct Bar {
    index: u32,
    io: bool,
    is64: bool,
    size: u64,
    region_size: u64,
    mapped: Option<u64>,
    areas: Vec<MmapArea>,
    ioevents: Vec<IoEvent>,
}

struct MsiVector {
    source: IrqSource,
    fd: EventFd,
}

struct Msi {
    cap: usize,
    is64: bool,
    /// Per-vector masking capable.
    pvm: bool,
    max_vectors: u32,
    vectors: Vec<MsiVector>,
    /// Whether each vector's irqfd is registered (masked vectors are not: their
    /// eventfd keeps counting and KVM injects at re-registration).
    registered: Vec<bool>,
    /// Vectors currently handed to the device (0: MSI off).
    active: u32,
}

impl Msi {
    fn data_off(&self) -> usize {
        self.cap + if self.is64 { 12 } else { 8 }
    }
}

/// The MSI-X capability, table and vectors, virtualised by the VMM.
struct Msix {
    cap: usize,
    size: u32,
    table_bar: u32,
    table_off: u64,
    pba_bar: u32,
    pba_off: u64,
    /// Per entry: address low, address high, data, vector control (bit 0 = masked).
    table: Vec<[u32; 4]>,
    vectors: Vec<MsiVector>,
    /// Whether each vector's irqfd is registered (unregistered = masked: the eventfd
    /// keeps counting and KVM injects it when the irqfd is registered again).
    registered: Vec<bool>,
    /// Eventfds handed to the device.
    active: bool,
}

impl Bar {
    /// The bus the BAR decodes on.
    fn bus<'r>(&self, root: &'r PciRoot) -> &'r Arc<Bus> {
        if self.io {
            root.pio_bus()
        } else {
            root.mmio_bus()
        }
    }
    /// The ioeventfd at guest address `addr` inside this BAR.
    fn ioevent_spec(&self, addr: u64, datamatch: Option<(u64, u64)>) -> IoEventSpec {
        IoEventSpec {
            space: if self.io { IoSpace::Pio } else { IoSpace::Mmio },
            addr,
            datamatch,
        }
    }
}

/// Where the MSI-X table and PBA live: fixed when the device is attached, so a BAR
/// access is classified without taking the state lock (only table/PBA hits lock).
#[derive(Debug, Clone, Copy)]
struct MsixLayout {
    table_bar: u32,
    table: (u64, u64),
    pba_bar: u32,
    pba: (u64, u64),
}

impl MsixLayout {
    /// Whether `[offset, end)` of BAR `index` touches the table, the PBA, or neither.
    fn hits(&self, index: u32, offset: u64, end: u64) -> (bool, bool) {
        let (t0, t1) = self.table;
        let (p0, p1) = self.pba;
        (
            index == self.table_bar && offset < t1 && end > t0,
            index == self.pba_bar && offset < p1 && end > p0,
        )
    }
}

impl Msix {
    fn layout(&self) -> MsixLayout {
        MsixLayout {
            table_bar: self.table_bar,
            table: self.table_range(),
            pba_bar: self.pba_bar,
            pba: self.pba_range(),
        }
    }
    fn table_range(&self) -> (u64, u64) {
        (self.table_off, self.table_off + 16 * self.size as u64)
    }
    fn pba_range(&self) -> (u64, u64) {
        (
            self.pba_off,
            self.pba_off + 8 * (self.size as u64).div_ceil(64),
        )
    }
}

struct State {
    shadow: [u8; CFG],
    wmask: [u8; CFG],
    virt: [bool; CFG],
    command: u16,
    bars: Vec<Bar>,
    msi: Option<Msi>,
    msix: Option<Msix>,
}

/// See the module documentation.
pub struct AssignedDevice {
    root: Weak<PciRoot>,
    slot: u8,
    name: String,
    dev: Arc<dyn VfioDevice>,
    config_size: u64,
    /// MSI-X table/PBA location (immutable; `None` without usable MSI-X).
    msix_layout: Option<MsixLayout>,
    state: Mutex<State>,
    lost: Mutex<Option<String>>,
    intx: Option<IrqSource>,
    intx_pin: u8,
    stop: Option<EventFd>,
}

fn dup_eventfd(fd: &impl AsRawFd) -> std::io::Result<EventFd> {
    // SAFETY: dup of a valid fd; the result is checked and owned by the EventFd.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh descriptor referring to an eventfd.
    Ok(unsafe { EventFd::from_raw_fd(n) })
}

fn owned_dup(fd: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: dup of a valid fd; the result is checked and owned.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

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

fn is_fatal(e: &DeviceError) -> bool {
    matches!(e, DeviceError::Disconnected(_) | DeviceError::Io(_))
}

impl AssignedDevice {
    pub(super) fn new(
        root: Arc<PciRoot>,
        slot: u8,
        name: String,
        dev: Arc<dyn VfioDevice>,
        ram: &GuestRam,
    ) -> Result<Arc<Self>, PciError> {
        let derr = |message: String| PciError::Device {
            device: name.clone(),
            message,
        };
        let info = dev.info();
        if info.flags & nestio_device::flags::PCI == 0 {
            return Err(derr(
                "it is not a PCI device (VFIO_DEVICE_FLAGS_PCI clear)".into(),
            ));
        }
        let cfg_info = dev
            .region_info(pci_index::CONFIG)
            .map_err(|e| derr(format!("no configuration region: {e}")))?;
        if cfg_info.size < CFG as u64 {
            return Err(derr(format!(
                "configuration region is {} bytes, need at least 256",
                cfg_info.size
            )));
        }
        let mut raw = [0u8; CFG];
        dev.region_read(pci_index::CONFIG, 0, &mut raw)
            .map_err(|e| derr(format!("cannot read configuration space: {e}")))?;

        // DMA: all of guest RAM, shared by fd.
        let range = DmaRange::new(0, ram.size()).map_err(|e| derr(e.to_string()))?;
        dev.dma_map(DmaMapRequest {
            range,
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: ram.fd().clone(),
                offset: ram.fd_offset(),
            },
        })
        .map_err(|e| derr(format!("DMA_MAP of guest RAM refused: {e}")))?;

        let mut st = State {
            shadow: raw,
            wmask: [0; CFG],
            virt: [false; CFG],
            command: u16::from_le_bytes([raw[4], raw[5]]) & !0x7,
            bars: Vec::new(),
            msi: None,
            msix: None,
        };
        // BARs and ROM are virtual.
        for i in 0x10..0x28 {
            st.virt[i] = true;
            st.shadow[i] = 0;
        }
        for i in 0x30..0x34 {
            st.virt[i] = true;
            st.shadow[i] = 0;
        }
        // MSI-X: parsed first so that no mmapped area covers its table or PBA.
        let msix_ok = dev
            .irq_info(pci_index::MSIX_IRQ)
            .map(|i| i.count)
            .unwrap_or(0);
        if let Some(cap) = find_cap(&raw, 0x11).filter(|c| c + 12 <= CFG) {
            let rd = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
            let ctrl = u16::from_le_bytes([raw[cap + 2], raw[cap + 3]]);
            let size = (ctrl & 0x7ff) as u32 + 1;
            let (t, p) = (rd(cap + 4), rd(cap + 8));
            let m = Msix {
                cap,
                size,
                table_bar: t & 7,
                table_off: (t & !7) as u64,
                pba_bar: p & 7,
                pba_off: (p & !7) as u64,
                table: vec![[0, 0, 0, 1]; size as usize],
                vectors: Vec::new(),
                registered: vec![false; size as usize],
                active: false,
            };
            let fits = |bar: u32, (a, b): (u64, u64)| {
                bar < 6
                    && dev
                        .region_info(bar)
                        .map(|r| b <= r.size && a < b)
                        .unwrap_or(false)
            };
            if msix_ok >= size
                && fits(m.table_bar, m.table_range())
                && fits(m.pba_bar, m.pba_range())
            {
                st.virt[cap + 2] = true;
                st.virt[cap + 3] = true;
                st.shadow[cap + 2..cap + 4].copy_from_slice(&(ctrl & !0xc000).to_le_bytes());
                st.wmask[cap + 3] = 0xc0;
                st.msix = Some(m);
            } else {
                tracing::warn!(device = %name, "MSI-X capability unusable (table outside its BAR or too few vectors); MSI-X will not deliver");
            }
        }
        let mut i = 0u32;
        while i < 6 {
            let ri = dev
                .region_info(i)
                .map_err(|e| derr(format!("region {i}: {e}")))?;
            let off = 0x10 + 4 * i as usize;
            let reg = u32::from_le_bytes([raw[off], raw[off + 1], raw[off + 2], raw[off + 3]]);
            if ri.size == 0 {
                i += 1;
                continue;
            }
            let io = reg & 1 == 1;
            let is64 = !io && (reg >> 1) & 3 == 2 && i < 5;
            let min = if io { 4 } else { PAGE };
            let size = ri
                .size
                .checked_next_power_of_two()
                .map(|s| s.max(min))
                .filter(|&s| if io { s <= 0x1000 } else { s <= 1 << 30 })
                .ok_or_else(|| derr(format!("BAR {i} size {:#x} is too large", ri.size)))?;
            let addr = root
                .alloc_bar(io, size)
                .ok_or_else(|| PciError::Exhausted {
                    device: name.clone(),
                    what: if io {
                        "the I/O BAR window"
                    } else {
                        "the MMIO BAR window"
                    },
                })?;
            let type_bits = if io { 1 } else { reg & 0xe };
            let low_mask: u32 = if io {
                !(size as u32 - 1) & !3
            } else {
                !(size as u32 - 1) & !0xf
            };
            st.shadow[off..off + 4].copy_from_slice(&((addr as u32) | type_bits).to_le_bytes());
            st.wmask[off..off + 4].copy_from_slice(&low_mask.to_le_bytes());
            if is64 {
                st.shadow[off + 4..off + 8].copy_from_slice(&((addr >> 32) as u32).to_le_bytes());
                st.wmask[off + 4..off + 8].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            let mut bar = Bar {
                index: i,
                io,
                is64,
                size,
                region_size: ri.size,
                mapped: None,
                areas: Vec::new(),
                ioevents: Vec::new(),
            };
            if !io && ri.flags & region_flags::MMAP != 0 {
                if let Some(fd) = &ri.fd {
                    let areas = if ri.sparse.is_empty() {
                        vec![nestio_device::SparseArea {
                            offset: 0,
                            size: ri.size,
                        }]
                    } else {
                        ri.sparse.clone()
                    };
                    for a in areas {
                        let clash = st.msix.as_ref().is_some_and(|m| {
                            let hits = |bar: u32, (lo, hi): (u64, u64)| {
                                let lo = lo & !(PAGE - 1);
                                bar == i && a.offset < hi && lo < a.offset.saturating_add(a.size)
                            };
                            hits(m.table_bar, m.table_range()) || hits(m.pba_bar, m.pba_range())
                        });
                        if clash {
                            tracing::info!(device = %name, bar = i, "sparse area overlaps the MSI-X table/PBA; left to exits");
                            continue;
                        }
                        match map_area(&root, fd, ri.fd_offset, ri.size, a.offset, a.size) {
                            Ok(m) => bar.areas.push(m),
                            Err(why) => tracing::warn!(
                                device = %name, bar = i, offset = a.offset, size = a.size,
                                "sparse area not mapped, accesses will exit: {why}"
                            ),
                        }
                    }
                }
            }
            match dev.region_io_fds(i) {
                Ok(fds) => {
                    for e in fds {
                        let end = e.offset.checked_add(e.size);
                        if !matches!(e.size, 1 | 2 | 4 | 8) || end.is_none_or(|x| x > ri.size) {
                            tracing::warn!(device = %name, bar = i, offset = e.offset, "ioeventfd outside its region ignored");
                            continue;
                        }
                        let fd =
                            dup_eventfd(&*e.fd).map_err(|e| derr(format!("ioeventfd: {e}")))?;
                        bar.ioevents.push(IoEvent {
                            offset: e.offset,
                            datamatch: e.datamatch.map(|d| (d, e.size)),
                            fd,
                        });
                    }
                }
                Err(e) => tracing::debug!(device = %name, bar = i, error = %e, "no ioeventfds"),
            }
            st.bars.push(bar);
            i += if is64 { 2 } else { 1 };
        }

        // Interrupt line (virtual) and INTx.
        st.virt[0x3c] = true;
        st.wmask[0x3c] = 0xff;
        let pin = raw[0x3d];
        let mut intx = None;
        let mut stop = None;
        let intx_ok = dev
            .irq_info(pci_index::INTX_IRQ)
            .map(|i| i.count >= 1)
            .unwrap_or(false);
        if (1..=4).contains(&pin) && intx_ok {
            let irq_err = |err| PciError::Irq {
                device: name.clone(),
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
            let stop_fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| derr(e.to_string()))?;
            let thread_stop = dup_eventfd(&stop_fd).map_err(|e| derr(e.to_string()))?;
            let d = dev.clone();
            let n = name.clone();
            std::thread::Builder::new()
                .name(format!("intx-{slot}"))
                .spawn(move || resample_loop(d, n, resample, thread_stop, trigger))
                .map_err(|e| derr(e.to_string()))?;
            st.shadow[0x3c] = u8::try_from(source.number()).unwrap_or(0xff);
            intx = Some(source);
            stop = Some(stop_fd);
        } else {
            st.shadow[0x3c] = 0xff;
        }

        // MSI capability.
        if let Some(cap) = find_cap(&raw, 0x05) {
            let ctrl = u16::from_le_bytes([raw[cap + 2], raw[cap + 3]]);
            let is64 = ctrl & (1 << 7) != 0;
            let pvm = ctrl & (1 << 8) != 0;
            let len = 10 + if is64 { 4 } else { 0 } + if pvm { 10 } else { 0 };
            let max_vectors = 1u32 << ((ctrl >> 1) & 7).min(5);
            if cap + len <= CFG {
                for b in cap + 2..cap + len {
                    st.virt[b] = true;
                }
                // Enable off, MME 0.
                let ctrl = ctrl & !0x71;
                st.shadow[cap + 2..cap + 4].copy_from_slice(&ctrl.to_le_bytes());
                st.wmask[cap + 2] = 0x71;
                st.wmask[cap + 4..cap + 8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
                let mut o = cap + 8;
                if is64 {
                    st.wmask[o..o + 4].copy_from_slice(&u32::MAX.to_le_bytes());
                    o += 4;
                }
                st.wmask[o..o + 2].copy_from_slice(&u16::MAX.to_le_bytes());
                if pvm {
                    let m = if max_vectors >= 32 {
                        u32::MAX
                    } else {
                        (1u32 << max_vectors) - 1
                    };
                    st.wmask[o + 4..o + 8].copy_from_slice(&m.to_le_bytes());
                }
                let msi_ok = dev
                    .irq_info(pci_index::MSI_IRQ)
                    .map(|i| i.count >= 1)
                    .unwrap_or(false);
                if msi_ok {
                    st.msi = Some(Msi {
                        cap,
                        is64,
                        pvm,
                        max_vectors,
                        vectors: Vec::new(),
                        registered: Vec::new(),
                        active: 0,
                    });
                }
            }
        }

        let d = Arc::new(AssignedDevice {
            root: Arc::downgrade(&root),
            slot,
            name,
            dev,
            config_size: cfg_info.size,
            msix_layout: st.msix.as_ref().map(Msix::layout),
            state: Mutex::new(st),
            lost: Mutex::new(None),
            intx,
            intx_pin: pin,
            stop,
        });
        Ok(d)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PCI slot (device number on bus 0).
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn VfioDevice> {
        &self.dev
    }

    /// The interrupt controller's number of the INTx line (a GSI on x86), if wired.
    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx.map(|s| s.number())
    }

    /// INTx pin from configuration space (1 = INTA .. 4 = INTD; 0: none).
    pub fn intx_pin(&self) -> u8 {
        self.intx_pin
    }

    /// Where BAR `index` is mapped now (None: not decoded).
    pub fn bar_mapping(&self, index: u32) -> Option<(u64, u64)> {
        let st = self.lock();
        st.bars
            .iter()
            .find(|b| b.index == index)
            .and_then(|b| b.mapped.map(|a| (a, b.size)))
    }

    /// Number of mmapped (exit-free) areas of BAR `index`.
    pub fn mapped_areas(&self, index: u32) -> usize {
        let st = self.lock();
        st.bars
            .iter()
            .find(|b| b.index == index)
            .map(|b| b.areas.len())
            .unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Some((name, what))` once the device is seen dead: a fatal error on an earlier
    /// access, or now on a cheap probe (GET_IRQ_INFO, a round trip for a remote device),
    /// so that a guest waiting in HLT for an interrupt does not wait forever.
    pub fn check_alive(&self) -> Option<(String, String)> {
        let known = self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(m) = known {
            return Some((self.name.clone(), m));
        }
        match self.dev.irq_info(pci_index::INTX_IRQ) {
            Err(e) if is_fatal(&e) => {
                let f = self.fault("liveness probe", e);
                Some((f.device, f.message))
            }
            _ => None,
        }
    }

    fn fault(&self, what: &str, e: DeviceError) -> BusFault {
        let message = format!("{what}: {e}");
        *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
        BusFault {
            device: self.name.clone(),
            message,
        }
    }

    fn region_access(
        &self,
        index: u32,
        region_size: u64,
        offset: u64,
        read: Option<&mut [u8]>,
        write: Option<&[u8]>,
    ) -> Result<(), BusFault> {
        let len = super::access_len(&read, write) as u64;
        let inside = offset.checked_add(len).is_some_and(|e| e <= region_size);
        let (read, write) = match self.msix_access(index, offset, len, read, write) {
            None => return Ok(()),
            Some(rw) => rw,
        };
        match (read, write) {
            (Some(d), _) => {
                if !inside {
                    d.fill(0xff);
                    return Ok(());
                }
                if let Err(e) = self.dev.region_read(index, offset, d) {
                    if is_fatal(&e) {
                        return Err(self.fault(&format!("read of BAR {index} at {offset:#x}"), e));
                    }
                    tracing::debug!(device = %self.name, error = %e, "BAR read refused");
                    d.fill(0xff);
                }
                Ok(())
            }
            (None, Some(d)) => {
                if !inside {
                    return Ok(());
                }
                if let Err(e) = self.dev.region_write(index, offset, d) {
                    if is_fatal(&e) {
                        return Err(self.fault(&format!("write of BAR {index} at {offset:#x}"), e));
                    }
                    tracing::debug!(device = %self.name, error = %e, "BAR write refused");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Re-map BARs after a BAR or command register change.
    fn update_bars(self: &Arc<Self>, st: &mut State) {
        let Some(root) = self.root.upgrade() else {
            return;
        };
        let command = st.command;
        let shadow = st.shadow;
        for bar in st.bars.iter_mut() {
            let off = 0x10 + 4 * bar.index as usize;
            let lo = u32::from_le_bytes([
                shadow[off],
                shadow[off + 1],
                shadow[off + 2],
                shadow[off + 3],
            ]);
            let mut addr = if bar.io {
                (lo & !3) as u64
            } else {
                (lo & !0xf) as u64
            };
            if bar.is64 {
                let hi = u32::from_le_bytes([
                    shadow[off + 4],
                    shadow[off + 5],
                    shadow[off + 6],
                    shadow[off + 7],
                ]);
                addr |= (hi as u64) << 32;
            }
            let decode = if bar.io {
                command & 1 != 0
            } else {
                command & 2 != 0
            };
            let valid = addr != 0
                && addr.checked_add(bar.size).is_some_and(|end| {
                    if bar.io {
                        addr >= 0x1000 && end <= 0x1_0000
                    } else {
                        (addr >= MMIO_WINDOW.0 && end <= MMIO_WINDOW.1)
                            || (addr >= 1 << 32 && end <= 1 << 40)
                    }
                });
            let want = (decode && valid).then_some(addr);
            if want == bar.mapped {
                continue;
            }
            if let Some(old) = bar.mapped.take() {
                self.unmap_bar(&root, bar, old);
            }
            if let Some(new) = want {
                if self.map_bar(&root, bar, new) {
                    bar.mapped = Some(new);
                }
            }
        }
    }

    fn map_bar(self: &Arc<Self>, root: &PciRoot, bar: &Bar, addr: u64) -> bool {
        let bus = bar.bus(root);
        let Ok(range) = BusRange::new(addr, bar.size) else {
            return false;
        };
        let handler = Arc::new(BarIo {
            dev: Arc::downgrade(self),
            index: bar.index,
            region_size: bar.region_size,
        });
        if let Err(e) = bus.insert(range, handler) {
            tracing::warn!(device = %self.name, bar = bar.index, addr, error = %e, "guest placed a BAR over another device; not decoded");
            return false;
        }
        for a in &bar.areas {
            // SAFETY: the area is a live mmap owned by this device, unmapped from KVM
            // (size 0) before the mmap goes away.
            let r = unsafe {
                root.space()
                    .set_memory_slot(a.slot, addr + a.offset, a.size, a.host as u64)
            };
            if let Err(e) = r {
                tracing::warn!(device = %self.name, bar = bar.index, error = %e, "cannot map sparse area into the guest; accesses will exit");
            }
        }
        for ev in &bar.ioevents {
            let spec = bar.ioevent_spec(addr + ev.offset, ev.datamatch);
            if let Err(e) = root.space().register_ioevent(&ev.fd, &spec) {
                tracing::warn!(device = %self.name, bar = bar.index, error = %e, "cannot register ioeventfd; writes will exit");
            }
        }
        true
    }

    fn unmap_bar(&self, root: &PciRoot, bar: &Bar, addr: u64) {
        let bus = bar.bus(root);
        bus.remove(addr);
        for a in &bar.areas {
            // SAFETY: removing a slot (size 0) never gives KVM new memory.
            let _ = unsafe {
                root.space()
                    .set_memory_slot(a.slot, addr + a.offset, 0, a.host as u64)
            };
        }
        for ev in &bar.ioevents {
            let spec = bar.ioevent_spec(addr + ev.offset, ev.datamatch);
            let _ = root.space().unregister_ioevent(&ev.fd, &spec);
        }
    }

    /// MSI-X table and PBA accesses (`len` bytes at `offset` of BAR `index`) are the
    /// VMM's; returns `None` when handled here, else the access back for the device.
    #[allow(clippy::type_complexity)]
    fn msix_access<'a, 'b>(
        &self,
        index: u32,
        offset: u64,
        len: u64,
        read: Option<&'a mut [u8]>,
        write: Option<&'b [u8]>,
    ) -> Option<(Option<&'a mut [u8]>, Option<&'b [u8]>)> {
        let Some(layout) = self.msix_layout else {
            return Some((read, write));
        };
        let end = offset.saturating_add(len);
        // Ordinary register accesses leave here without touching the lock.
        let (in_table, in_pba) = layout.hits(index, offset, end);
        if !in_table && !in_pba {
            return Some((read, write));
        }
        let ((t0, t1), (p0, p1)) = (layout.table, layout.pba);
        let mut st = self.lock();
        let Some(m) = st.msix.as_mut() else {
            return Some((read, write));
        };
        // The specification requires aligned dword or qword accesses here.
        let ok = (len == 4 || len == 8)
            && offset.is_multiple_of(len)
            && end <= if in_table { t1 } else { p1 };
        if in_pba {
            if let Some(d) = read {
                if !ok {
                    d.fill(0xff);
                    return None;
                }
                let word = ((offset - p0) / 8) as usize;
                let mut bits = 0u64;
                for v in word * 64..(word * 64 + 64).min(m.size as usize) {
                    let masked = !m.registered.get(v).copied().unwrap_or(true);
                    if masked && m.vectors.get(v).is_some_and(|x| eventfd_pending(&x.fd)) {
                        bits |= 1 << (v % 64);
                    }
                }
                let b = bits.to_le_bytes();
                let start = ((offset - p0) % 8) as usize;
                for (i, x) in d.iter_mut().enumerate() {
                    *x = b.get(start + i).copied().unwrap_or(0);
                }
            }
            return None;
        }
        if !ok {
            // Also covers an access straddling the table start (`offset < t0`).
            if let Some(d) = read {
                d.fill(0xff);
            }
            return None;
        }
        // `ok` with an 8-aligned table start implies `t0 <= offset`.
        let first = ((offset - t0) / 4) as usize;
        match (read, write) {
            (Some(d), _) => {
                for (k, chunk) in d.chunks_mut(4).enumerate() {
                    let w = first + k;
                    let v = m.table[w / 4][w % 4];
                    chunk.copy_from_slice(&v.to_le_bytes());
                }
                None
            }
            (None, Some(d)) => {
                for (k, chunk) in d.chunks(4).enumerate() {
                    let w = first + k;
                    let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    // Vector control: only the mask bit is writable.
                    m.table[w / 4][w % 4] = if w % 4 == 3 { v & 1 } else { v };
                }
                self.update_msix(&mut st);
                None
            }
            _ => None,
        }
    }

    /// Apply the guest's MSI-X configuration: routes from the table, eventfds handed to
    /// the device while enabled, irqfds registered only for unmasked vectors.
    fn update_msix(&self, st: &mut State) {
        let Some(root) = self.root.upgrade() else {
            return;
        };
        let shadow = st.shadow;
        let Some(m) = st.msix.as_mut() else { return };
        let ctrl = u16::from_le_bytes([shadow[m.cap + 2], shadow[m.cap + 3]]);
        let enabled = ctrl & 0x8000 != 0;
        let fmask = ctrl & 0x4000 != 0;
        if enabled {
            while (m.vectors.len() as u32) < m.size {
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
                .zip(&m.table)
                .map(|(v, e)| {
                    let address = e[0] as u64 | (e[1] as u64) << 32;
                    (
                        v.source,
                        Some(MsiMessage {
                            address,
                            data: e[2],
                        }),
                    )
                })
                .collect();
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
                    m.size,
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
            let want = enabled && !fmask && m.table[v][3] & 1 == 0;
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
    fn update_msi(&self, st: &mut State) {
        let Some(root) = self.root.upgrade() else {
            return;
        };
        let shadow = st.shadow;
        let Some(msi) = st.msi.as_mut() else { return };
        let cap = msi.cap;
        let ctrl = u16::from_le_bytes([shadow[cap + 2], shadow[cap + 3]]);
        // The enabled count as the PCI spec defines it (reserved MME values and values
        // above MMC clamped); the vectors wired are at most what the device has.
        let enable = MsiEnable::from_control(ctrl);
        let want = enable.map_or(0, |e| e.count().min(msi.max_vectors));
        let addr_lo = u32::from_le_bytes([
            shadow[cap + 4],
            shadow[cap + 5],
            shadow[cap + 6],
            shadow[cap + 7],
        ]) as u64;
        let addr_hi = if msi.is64 {
            u32::from_le_bytes([
                shadow[cap + 8],
                shadow[cap + 9],
                shadow[cap + 10],
                shadow[cap + 11],
            ]) as u64
        } else {
            0
        };
        let d = msi.data_off();
        let data = u16::from_le_bytes([shadow[d], shadow[d + 1]]);
        let address = addr_lo | addr_hi << 32;
        // Make sure enough vectors exist (GSI + eventfd + irqfd).
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
        // One KVM_SET_GSI_ROUTING for all vectors, not one per vector.
        let gsis: Vec<u32> = msi.vectors.iter().map(|v| v.source.number()).collect();
        let routes: Vec<(IrqSource, Option<MsiMessage>)> =
            msi_routes(enable, want, address, data, &gsis)
                .into_iter()
                .zip(&msi.vectors)
                .map(|((_, r), v)| {
                    (
                        v.source,
                        r.map(|(address, data)| MsiMessage { address, data }),
                    )
                })
                .collect();
        if let Err(e) = root.irqchip().program_msi(&routes) {
            tracing::warn!(device = %self.name, error = %e, "cannot program MSI messages");
        }
        if want != msi.active {
            let r = if want == 0 {
                self.dev
                    .set_irqs(pci_index::MSI_IRQ, IrqAction::Trigger, 0, 0, IrqData::None)
            } else {
                let fds: Vec<Option<OwnedFd>> = msi.vectors[..want as usize]
                    .iter()
                    .map(|v| owned_dup(&v.fd).ok())
                    .collect();
                if msi.active != 0 {
                    let _ = self.dev.set_irqs(
                        pci_index::MSI_IRQ,
                        IrqAction::Trigger,
                        0,
                        0,
                        IrqData::None,
                    );
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
        // Per-vector masking: a masked vector's irqfd is unregistered.
        let mask = if msi.pvm {
            let o = d + 4;
            u32::from_le_bytes([shadow[o], shadow[o + 1], shadow[o + 2], shadow[o + 3]])
        } else {
            0
        };
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
}

impl Drop for AssignedDevice {
    /// The VM is gone: stop the INTx thread, take every eventfd back from the device and
    /// unmap guest RAM from it (a device shared with others must not keep the RAM).
    fn drop(&mut self) {
        if let Some(s) = &self.stop {
            let _ = s.write(1);
        }
        for index in [pci_index::INTX_IRQ, pci_index::MSI_IRQ, pci_index::MSIX_IRQ] {
            let _ = self
                .dev
                .set_irqs(index, IrqAction::Trigger, 0, 0, IrqData::None);
        }
        let _ = self.dev.dma_unmap_all();
    }
}

fn map_area(
    root: &PciRoot,
    fd: &OwnedFd,
    fd_offset: u64,
    region_size: u64,
    offset: u64,
    size: u64,
) -> Result<MmapArea, String> {
    if size == 0 || !offset.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
        return Err("not page aligned".into());
    }
    if offset.checked_add(size).is_none_or(|e| e > region_size) {
        return Err("outside the region".into());
    }
    let file_off = fd_offset
        .checked_add(offset)
        .filter(|o| *o <= i64::MAX as u64)
        .ok_or("file offset overflows")?;
    let slot = root.alloc_slot().ok_or("out of KVM memory slots")?;
    // SAFETY: a fresh shared mapping of the device's fd; checked for failure; owned by
    // the returned MmapArea (built exactly once), which unmaps it on drop.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            file_off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(MmapArea {
        offset,
        size,
        host: p as usize,
        slot,
    })
}

fn find_cap(raw: &[u8; CFG], id: u8) -> Option<usize> {
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

impl PciFunction for Arc<AssignedDevice> {
    fn config_read(&self, reg: u16, data: &mut [u8]) -> Result<(), BusFault> {
        (**self).config_read_inner(reg, data)
    }
    fn config_write(&self, reg: u16, data: &[u8]) -> Result<(), BusFault> {
        AssignedDevice::config_write_inner(self, reg, data)
    }
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

    fn config_read_inner(&self, reg: u16, data: &mut [u8]) -> Result<(), BusFault> {
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
        if st.virt[r..end].iter().any(|v| !v) {
            drop(st);
            self.device_config_read(reg, data)?;
            let st = self.lock();
            for (i, b) in data.iter_mut().enumerate() {
                if st.virt[r + i] {
                    *b = st.shadow[r + i];
                }
            }
        } else {
            data.copy_from_slice(&st.shadow[r..end]);
        }
        Ok(())
    }

    fn config_write_inner(self: &Arc<Self>, reg: u16, data: &[u8]) -> Result<(), BusFault> {
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
        let any_virt = st.virt[r..end].iter().any(|v| *v);
        let in_msi = st
            .msi
            .as_ref()
            .is_some_and(|m| r >= m.cap && r < m.cap + 24);
        for (i, b) in data.iter().enumerate() {
            let o = r + i;
            if st.virt[o] {
                let m = st.wmask[o];
                st.shadow[o] = (st.shadow[o] & !m) | (b & m);
            } else if o == 4 {
                st.command = (st.command & 0xff00) | *b as u16;
            } else if o == 5 {
                st.command = (st.command & 0x00ff) | (*b as u16) << 8;
            }
        }
        let in_msix = st
            .msix
            .as_ref()
            .is_some_and(|m| r < m.cap + 4 && end > m.cap + 2);
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
        if touches(0x04, 0x06) || touches(0x10, 0x28) {
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

/// Accesses to a mapped BAR.
struct BarIo {
    dev: Weak<AssignedDevice>,
    index: u32,
    region_size: u64,
}

impl BusDevice for BarIo {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        match self.dev.upgrade() {
            Some(d) => d.region_access(self.index, self.region_size, offset, Some(data), None),
            None => {
                data.fill(0xff);
                Ok(())
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        match self.dev.upgrade() {
            Some(d) => d.region_access(self.index, self.region_size, offset, None, Some(data)),
            None => Ok(()),
        }
    }
}

/// The KVM MSI route of each allocated vector (`gsis[v]` is vector v's GSI): vectors
/// below `wired` get `address` and their data — the programmed `data` with the low
/// log2(enabled count) bits replaced by v, per the PCI spec, computed from the *enabled*
/// count even when fewer vectors could be wired — and the rest no route.
fn msi_routes(
    enable: Option<MsiEnable>,
    wired: u32,
    address: u64,
    data: u16,
    gsis: &[u32],
) -> Vec<(u32, Option<(u64, u32)>)> {
    gsis.iter()
        .enumerate()
        .map(|(v, &gsi)| {
            let v = v as u32;
            let route = enable
                .filter(|_| v < wired)
                .and_then(|e| e.data(data, v))
                .map(|vdata| (address, vdata));
            (gsi, route)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

#[cfg(test)]
mod wiring_tests;
