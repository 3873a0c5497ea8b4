//! The container's state and its VFIO devices: the DPRC and each object, sharing one
//! `Inner` (objects, tokens, interrupt state, portal memory).
//!
//! Portal memory: every device with regions has one sealed memfd in which region `i`
//! lives at offset `i << 40` (`VFIO_FSL_MC_INDEX_TO_OFFSET`, the offset REGION_INFO
//! reports), mapped once here. An MC portal (the DPRC's region 0, each DPMCP's region 0)
//! is executed when its header word holds status READY: synchronously at the end of a
//! REGION_WRITE that wrote the header (the parameters of that write are stored first,
//! the header last), and by the portal poller ([`FslMcContainer::start_poller`]) for
//! portals written through an mmap (a guest's memory slot: no exit at all). Each portal
//! has a lock: one command at a time per portal, REGION_WRITEs to one portal are atomic
//! with respect to each other, and a command is executed exactly once (its status
//! leaves READY under the lock). The mmapped words are only touched through atomics.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nestio_device_model::irq::Irqs;
use nestio_device_model::{
    flags, irq_flags, region_flags, DeviceError, DeviceInfo, IrqAction, IrqData, IrqInfo,
    RegionInfo, Result, VfioDevice,
};
use parking_lot::Mutex;

use super::dprc::{raise, DPNI_DEFAULT_MFL};
use super::objects::{ObjType, RegionType, DPMCP_IRQ_EVENT_CMD_DONE, REGION_SIZE};
use super::portal::{Header, McStatus, PortalMapping, FLAG_INTR_DIS};

/// `VFIO_FSL_MC_OFFSET_SHIFT`: region `i` is at offset `i << 40`.
pub const REGION_OFFSET_SHIFT: u32 = 40;
/// Most objects in one container.
pub const MAX_OBJECTS: usize = 64;

/// Errors building a container.
#[derive(Debug, thiserror::Error)]
pub enum FslMcError {
    /// Too many objects or a type that cannot be a child.
    #[error("container refused: {0}")]
    Config(String),
    /// Portal memory could not be created or mapped.
    #[error("cannot create the portal memory of {device}: {err} (check RLIMIT_MEMLOCK / available memory)")]
    Memory {
        /// Device.
        device: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The poller thread could not be started.
    #[error("cannot start the MC portal poller thread: {0}")]
    Thread(std::io::Error),
}

/// One object of the container: its type and id (`dpni.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectDesc {
    /// Type.
    pub ty: ObjType,
    /// Id, unique per type.
    pub id: u32,
}

impl ObjectDesc {
    /// Linux's device name: `dpni.0`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.ty.name(), self.id)
    }
}

/// MC-level interrupt state of one irq index.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IrqState {
    pub enable: bool,
    pub mask: u32,
    pub status: u32,
    pub val: u32,
    pub addr: u64,
    pub num: u32,
}

/// Per-object state.
#[derive(Debug, Clone)]
pub(crate) struct ObjState {
    pub enabled: bool,
    pub open: Option<u16>,
    pub irqs: Vec<IrqState>,
    pub max_frame: u16,
}

impl ObjState {
    pub(crate) fn new(ty: ObjType) -> ObjState {
        ObjState {
            enabled: false,
            open: None,
            irqs: vec![IrqState::default(); ty.irq_count() as usize],
            max_frame: DPNI_DEFAULT_MFL,
        }
    }
}

/// What a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Dprc,
    Object(usize),
}

/// The mutable state, under one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub dprc_irqs: Vec<IrqState>,
    pub objs: Vec<ObjState>,
    /// token -> (portal it was opened on, target).
    pub tokens: BTreeMap<u16, (usize, Target)>,
    pub next_token: u16,
}

/// A device's portal memory: its memfd and one mapping per region.
struct DeviceMem {
    fd: Arc<OwnedFd>,
    maps: Vec<PortalMapping>,
}

/// An MC portal: device `dev`'s region 0, with its command lock.
struct Portal {
    dev: usize,
    lock: Mutex<()>,
}

/// Shared by the container's devices.
pub(crate) struct Inner {
    pub id: u32,
    pub icid: u32,
    pub objects: Vec<ObjectDesc>,
    state: Mutex<State>,
    portals: Vec<Portal>,
    /// Per device (0: the DPRC, `i + 1`: object `i`).
    irqs: Vec<Irqs>,
    mems: Vec<Option<DeviceMem>>,
    commands: AtomicU64,
    poller: AtomicBool,
}

impl Inner {
    fn ty(&self, dev: usize) -> ObjType {
        match dev {
            0 => ObjType::Dprc,
            d => self.objects[d - 1].ty,
        }
    }

    fn dev_name(&self, dev: usize) -> String {
        match dev {
            0 => format!("dprc.{}", self.id),
            d => self.objects[d - 1].name(),
        }
    }

    /// The portal index of device `dev`'s MC portal.
    fn portal_of(&self, dev: usize) -> Option<usize> {
        self.portals.iter().position(|p| p.dev == dev)
    }

    /// Execute portal `p`'s command if its status is READY; the caller holds the
    /// portal's lock. Returns whether a command ran.
    fn run_portal_locked(&self, p: usize) -> bool {
        let dev = self.portals[p].dev;
        let Some(mem) = &self.mems[dev] else {
            return false;
        };
        let m = &mem.maps[0];
        let h = m.header();
        let hdr = Header::decode(h);
        if hdr.status != McStatus::Ready as u8 {
            return false;
        }
        let c = m.command(h);
        let (out, mut fire) = {
            let mut st = self.state.lock();
            let mut out = self.execute(&mut st, p, &c);
            let mut fire = std::mem::take(&mut out.fire);
            if self.ty(dev) == ObjType::Dpmcp && hdr.flags_sw & FLAG_INTR_DIS == 0 {
                raise(
                    &mut st.objs[dev - 1].irqs,
                    dev,
                    0,
                    DPMCP_IRQ_EVENT_CMD_DONE,
                    &mut fire,
                );
            }
            (out, fire)
        };
        if let Some(params) = &out.params {
            m.store_params(params);
        }
        let mut rh = hdr;
        rh.status = out.status.unwrap_or(McStatus::ConfigErr) as u8;
        if let Some(t) = out.token {
            rh.token = t;
        }
        if m.word(0)
            .compare_exchange(h, rh.encode(), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            tracing::debug!(portal = p, "portal header rewritten while its command ran");
        }
        self.commands.fetch_add(1, Ordering::Relaxed);
        fire.dedup();
        for (d, i) in fire.drain(..) {
            self.irqs[d].trigger(i, 0);
        }
        true
    }

    fn run_portal(&self, p: usize) -> bool {
        let _g = self.portals[p].lock.lock();
        self.run_portal_locked(p)
    }
}

/// An FSL-MC DPRC container with its objects. See the module documentation of
/// [`crate::fsl_mc`].
pub struct FslMcContainer {
    inner: Arc<Inner>,
    devices: Vec<Arc<FslMcDevice>>,
}

impl FslMcContainer {
    /// A container `dprc.<id>` holding `objects` (`(type, count)`, ids 0.. per type).
    /// Its object set is fixed from here on: an assigned container's objects cannot be
    /// added or removed.
    pub fn new(id: u32, objects: &[(ObjType, u32)]) -> std::result::Result<Self, FslMcError> {
        let mut descs = Vec::new();
        for &(ty, count) in objects {
            if !ty.emulated() {
                return Err(FslMcError::Config(format!(
                    "{} objects are not emulated",
                    ty.name()
                )));
            }
            let first = descs.iter().filter(|d: &&ObjectDesc| d.ty == ty).count() as u32;
            for n in 0..count {
                descs.push(ObjectDesc { ty, id: first + n });
            }
        }
        if descs.len() > MAX_OBJECTS {
            return Err(FslMcError::Config(format!(
                "{} objects; at most {MAX_OBJECTS} fit in one container",
                descs.len()
            )));
        }
        if id <= super::dprc::ROOT_CONTAINER_ID {
            return Err(FslMcError::Config(format!(
                "container id {id} is the root container's; use 2 or more"
            )));
        }
        let types: Vec<ObjType> = std::iter::once(ObjType::Dprc)
            .chain(descs.iter().map(|d| d.ty))
            .collect();
        let mut mems = Vec::new();
        let mut irqs = Vec::new();
        let mut portals = Vec::new();
        for (dev, ty) in types.iter().enumerate() {
            let name = match dev {
                0 => format!("dprc.{id}"),
                d => descs[d - 1].name(),
            };
            let regions = ty.regions();
            mems.push(if regions.is_empty() {
                None
            } else {
                let merr = |err| FslMcError::Memory {
                    device: name.clone(),
                    err,
                };
                let size = (((regions.len() - 1) as u64) << REGION_OFFSET_SHIFT) + REGION_SIZE;
                let cname = std::ffi::CString::new(format!("nestio-fsl-mc-{name}"))
                    .map_err(|_| FslMcError::Config("bad name".into()))?;
                let fd = nestio_dma::memfd::sealed_memfd(&cname, size).map_err(merr)?;
                let maps = (0..regions.len())
                    .map(|i| {
                        PortalMapping::new(
                            &fd,
                            (i as u64) << REGION_OFFSET_SHIFT,
                            REGION_SIZE as usize,
                        )
                    })
                    .collect::<std::io::Result<Vec<_>>>()
                    .map_err(merr)?;
                Some(DeviceMem {
                    fd: Arc::new(fd),
                    maps,
                })
            });
            if regions.first() == Some(&RegionType::McPortal) {
                portals.push(Portal {
                    dev,
                    lock: Mutex::new(()),
                });
            }
            let infos: Vec<IrqInfo> = (0..ty.irq_count())
                .map(|i| IrqInfo {
                    index: i as u32,
                    flags: irq_flags::EVENTFD,
                    count: 1,
                })
                .collect();
            irqs.push(Irqs::new(&infos));
        }
        let state = State {
            dprc_irqs: vec![IrqState::default(); ObjType::Dprc.irq_count() as usize],
            objs: descs.iter().map(|d| ObjState::new(d.ty)).collect(),
            tokens: BTreeMap::new(),
            next_token: 0,
        };
        let inner = Arc::new(Inner {
            id,
            icid: id,
            objects: descs,
            state: Mutex::new(state),
            portals,
            irqs,
            mems,
            commands: AtomicU64::new(0),
            poller: AtomicBool::new(false),
        });
        let devices = (0..types.len())
            .map(|dev| {
                Arc::new(FslMcDevice {
                    inner: inner.clone(),
                    dev,
                })
            })
            .collect();
        Ok(FslMcContainer { inner, devices })
    }

    /// The container id.
    pub fn id(&self) -> u32 {
        self.inner.id
    }
    /// The objects, in DPRC_GET_OBJ order.
    pub fn objects(&self) -> &[ObjectDesc] {
        &self.inner.objects
    }
    /// The DPRC's VFIO device.
    pub fn dprc(&self) -> Arc<FslMcDevice> {
        self.devices[0].clone()
    }
    /// Object `i`'s VFIO device.
    pub fn object(&self, i: usize) -> Option<Arc<FslMcDevice>> {
        self.devices.get(i + 1).cloned()
    }
    /// Every device: the DPRC first, then the objects.
    pub fn devices(&self) -> &[Arc<FslMcDevice>] {
        &self.devices
    }
    /// Commands executed so far (all portals).
    pub fn commands_executed(&self) -> u64 {
        self.inner.commands.load(Ordering::Relaxed)
    }

    /// Execute every portal whose status is READY once; returns how many ran (the
    /// poller's step, also usable directly by tests and fuzzers).
    pub fn poll_once(&self) -> usize {
        poll_all(&self.inner)
    }

    /// Start the thread that executes commands written into mmapped portals (at most
    /// one per container; it ends when the last device of the container is dropped).
    /// Idle, it looks every millisecond; after a command, every 20 µs for 10 ms.
    pub fn start_poller(&self) -> std::result::Result<(), FslMcError> {
        if self.inner.poller.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name(format!("fsl-mc-dprc.{}", self.inner.id))
            .spawn(move || {
                let mut last = Instant::now() - Duration::from_secs(1);
                loop {
                    let Some(inner) = weak.upgrade() else {
                        return;
                    };
                    if poll_all(&inner) > 0 {
                        last = Instant::now();
                    }
                    drop(inner);
                    let busy = last.elapsed() < Duration::from_millis(10);
                    std::thread::sleep(if busy {
                        Duration::from_micros(20)
                    } else {
                        Duration::from_millis(1)
                    });
                }
            })
            .map_err(FslMcError::Thread)?;
        Ok(())
    }
}

fn poll_all(inner: &Inner) -> usize {
    (0..inner.portals.len())
        .filter(|&p| inner.run_portal(p))
        .count()
}

/// One VFIO device of the container: the DPRC (index 0) or an object. Device flags
/// `VFIO_DEVICE_FLAGS_FSL_MC` (+ `RESET` for the DPRC only, as Linux's vfio-fsl-mc);
/// region `i` at fd offset `i << 40`, 64 KiB, mmappable except the DPRC's portal; one
/// eventfd irq per MC interrupt (count 1, trigger only). Region reads and writes may be
/// any size at any offset inside the region (Linux's vfio read/write takes only 64 bytes
/// at offset 0, but a VMM forwarding a guest's trapped 8-byte stores needs word access);
/// a 64-byte write at offset 0 behaves as Linux's.
pub struct FslMcDevice {
    inner: Arc<Inner>,
    dev: usize,
}

impl FslMcDevice {
    /// Linux's name of the device (`dprc.2`, `dpni.0`).
    pub fn name(&self) -> String {
        self.inner.dev_name(self.dev)
    }
    /// The object type.
    pub fn obj_type(&self) -> ObjType {
        self.inner.ty(self.dev)
    }
    fn region(&self, index: u32) -> Result<(&PortalMapping, RegionType)> {
        let ty = self.obj_type();
        let kind = *ty
            .regions()
            .get(index as usize)
            .ok_or(DeviceError::NoSuchRegion(index))?;
        let m = self.inner.mems[self.dev]
            .as_ref()
            .and_then(|m| m.maps.get(index as usize))
            .ok_or(DeviceError::NoSuchRegion(index))?;
        Ok((m, kind))
    }
    fn check(index: u32, offset: u64, len: usize) -> Result<()> {
        RegionInfo::rw(index, REGION_SIZE).check(offset, len)
    }
}

impl VfioDevice for FslMcDevice {
    fn info(&self) -> DeviceInfo {
        let ty = self.obj_type();
        let reset = if ty == ObjType::Dprc { flags::RESET } else { 0 };
        DeviceInfo {
            flags: flags::FSL_MC | reset,
            num_regions: ty.regions().len() as u32,
            num_irqs: ty.irq_count() as u32,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.region(index)?;
        let mmap = self.obj_type() != ObjType::Dprc;
        let fd = self.inner.mems[self.dev].as_ref().map(|m| m.fd.clone());
        Ok(RegionInfo {
            index,
            flags: region_flags::READ
                | region_flags::WRITE
                | if mmap { region_flags::MMAP } else { 0 },
            size: REGION_SIZE,
            fd_offset: (index as u64) << REGION_OFFSET_SHIFT,
            sparse: Vec::new(),
            fd: if mmap { fd } else { None },
        })
    }

    /// A read of an MC portal waits for a REGION_WRITE in progress on it, so it never
    /// sees a command half written or not yet executed by that path.
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (m, kind) = self.region(index)?;
        Self::check(index, offset, buf.len())?;
        let portal = match kind {
            RegionType::McPortal => self.inner.portal_of(self.dev),
            RegionType::QbmanPortal => None,
        };
        let _g = portal.map(|p| self.inner.portals[p].lock.lock());
        m.read(offset, buf);
        Ok(())
    }

    /// A write to an MC portal stores the bytes beyond the header first and the header
    /// last, then executes the command if the header was written with status READY; the
    /// write returns once it completed (Linux's vfio-fsl-mc write semantics). The
    /// status byte is in the header's low half: a driver that writes the header as two
    /// 4-byte halves writes the high half (token, command id) first.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let (m, kind) = self.region(index)?;
        Self::check(index, offset, data.len())?;
        if kind != RegionType::McPortal {
            m.write(offset, data);
            return Ok(());
        }
        let Some(p) = self.inner.portal_of(self.dev) else {
            return Err(DeviceError::NoSuchRegion(index));
        };
        let _g = self.inner.portals[p].lock.lock();
        let end = offset + data.len() as u64;
        if offset < 8 && end > 8 {
            let split = (8 - offset) as usize;
            m.write(8, &data[split..]);
            m.write(offset, &data[..split]);
        } else {
            m.write(offset, data);
        }
        if offset < 8 {
            self.inner.run_portal_locked(p);
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.inner.irqs[self.dev].info(index)
    }

    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        if action != IrqAction::Trigger {
            return Err(DeviceError::Invalid(
                "FSL-MC interrupts support only ACTION_TRIGGER (as Linux's vfio-fsl-mc)".into(),
            ));
        }
        self.inner.irqs[self.dev].set_irqs(index, action, start, count, data)
    }

    /// The DPRC resets the whole container (every object disabled, its tokens closed,
    /// its interrupt state cleared); an object alone cannot be reset.
    fn reset(&self) -> Result<()> {
        if self.dev != 0 {
            return Err(DeviceError::Unsupported(format!(
                "{} is reset only with its container: reset dprc.{} instead",
                self.name(),
                self.inner.id
            )));
        }
        let mut st = self.inner.state.lock();
        self.inner.reset_objects(&mut st);
        tracing::info!(container = self.inner.id, "container reset");
        Ok(())
    }
}
