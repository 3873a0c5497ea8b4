//! DMA domains: the policy of what guest memory a device reaches at which IOVA, owned
//! by the platform, not by the bus code that attaches the device.
//!
//! # Design
//!
//! A device's DMA is identified by its **stream ID** ([`StreamId`]): the PCI
//! requester ID (bus/device/function) of a PCI function, an SMMU StreamID, an FSL-MC
//! ICID or an sPAPR LIOBN for the others. The platform gives the buses one
//! [`DmaDomain`]; a bus attaches each device under its stream ID
//! ([`DmaDomain::attach`]) and detaches it when the device goes away
//! ([`DmaDomain::detach`]). The domain decides what the device gets, always as
//! `dma_map` / `dma_unmap` calls on the device (`VfioDevice`, VFIO semantics), with guest
//! RAM passed *by fd* so the device maps the guest's own pages:
//!
//! - [`IdentityDomain`] (no vIOMMU, today's machine): all of guest RAM at IOVA = GPA,
//!   mapped once when a device attaches, removed when it detaches. Its
//!   [`DmaDomain::map`] / [`DmaDomain::unmap`] refuse: the identity cannot change.
//! - [`ShadowDomain`]: starts empty; [`DmaDomain::map`] / [`DmaDomain::unmap`] turn one
//!   guest translation (IOVA -> guest-physical range) into `dma_map` / `dma_unmap` on
//!   every device of the stream, and a device that attaches later receives the
//!   stream's current mappings. This is the back end of a shadowing vIOMMU: an
//!   emulated SMMUv3 walking the guest's stage-1/stage-2 tables on a command-queue
//!   invalidation, or the sPAPR `H_PUT_TCE` hypercall updating a TCE window, calls
//!   `map`/`unmap` with the stream ID the guest's table entry belongs to.
//!
//! In-process translation for emulated devices (two stages, TCE windows, nesting) is a
//! different layer: `DmaSpace` decorators in the device process (like `NestedDma`).

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nestio_device_model::{DeviceError, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};

use crate::iommu::msi::MsiTranslator;
use crate::memory::GuestRam;

/// The requester a DMA comes from. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamId {
    /// A PCI function: its requester ID (bus << 8 | device << 3 | function).
    Pci(u16),
    /// A non-PCI device: a platform-assigned stream number (SMMU StreamID, FSL-MC ICID).
    Platform(u32),
}

impl StreamId {
    /// The stream of PCI function `bus:device.function` (device < 32, function < 8).
    pub fn pci(bus: u8, device: u8, function: u8) -> Self {
        StreamId::Pci(u16::from(bus) << 8 | u16::from(device & 0x1f) << 3 | u16::from(function & 7))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamId::Pci(rid) => write!(
                f,
                "PCI {:02x}:{:02x}.{}",
                rid >> 8,
                (rid >> 3) & 0x1f,
                rid & 7
            ),
            StreamId::Platform(n) => write!(f, "platform stream {n}"),
        }
    }
}

/// Errors of DMA domains.
#[derive(Debug, thiserror::Error)]
pub enum DmaDomainError {
    /// The domain does not do this.
    #[error("the {model} DMA domain cannot {what}")]
    Unsupported {
        /// Domain model.
        model: &'static str,
        /// What was asked.
        what: &'static str,
    },
    /// A guest-physical range outside guest RAM.
    #[error("guest-physical range {gpa:#x}+{size:#x} is not inside guest RAM ({ram:#x} bytes)")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
        /// RAM size.
        ram: u64,
    },
    /// An empty or wrapping IOVA range.
    #[error("IOVA range {iova:#x}+{size:#x} is empty or wraps")]
    BadRange {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// A device refused a map or unmap.
    #[error("{stream}: {what} refused by the device: {err}")]
    Device {
        /// Its stream.
        stream: StreamId,
        /// DMA_MAP or DMA_UNMAP.
        what: &'static str,
        /// Cause.
        err: DeviceError,
    },
}

/// Guest RAM as a DMA backing: the file, the file offset of guest physical 0, the size.
#[derive(Clone)]
pub struct GuestRamFile {
    fd: Arc<OwnedFd>,
    offset: u64,
    size: u64,
}

impl GuestRamFile {
    /// The backing of `ram`.
    pub fn of(ram: &GuestRam) -> Self {
        GuestRamFile {
            fd: ram.fd().clone(),
            offset: ram.fd_offset(),
            size: ram.size(),
        }
    }

    /// A map of guest-physical `gpa..gpa + size` at `iova`, checked against RAM.
    fn request(
        &self,
        iova: u64,
        gpa: u64,
        size: u64,
        prot: Prot,
    ) -> Result<DmaMapRequest, DmaDomainError> {
        let inside = gpa.checked_add(size).is_some_and(|e| e <= self.size);
        if !inside {
            return Err(DmaDomainError::OutsideRam {
                gpa,
                size,
                ram: self.size,
            });
        }
        let range =
            DmaRange::new(iova, size).map_err(|_| DmaDomainError::BadRange { iova, size })?;
        Ok(DmaMapRequest {
            range,
            prot,
            backing: DmaBacking::Fd {
                fd: self.fd.clone(),
                offset: self.offset + gpa,
            },
        })
    }
}

/// The DMA policy of the platform. See the module documentation.
pub trait DmaDomain: Send + Sync {
    /// Model name, for messages.
    fn model(&self) -> &'static str;
    /// `dev` now issues DMA as `stream`: give it what the stream may reach.
    fn attach(&self, stream: StreamId, dev: Arc<dyn VfioDevice>) -> Result<(), DmaDomainError>;
    /// The devices of `stream` are going away: take every mapping back from them.
    fn detach(&self, stream: StreamId);
    /// The guest made guest-physical `gpa..gpa + size` reachable at `iova` for `stream`.
    fn map(
        &self,
        stream: StreamId,
        iova: u64,
        gpa: u64,
        size: u64,
        prot: Prot,
    ) -> Result<(), DmaDomainError>;
    /// The guest removed the translation of `iova..iova + size` for `stream`.
    fn unmap(&self, stream: StreamId, iova: u64, size: u64) -> Result<(), DmaDomainError>;
    /// What a device's MSI address means here ([`crate::iommu::msi`]): the identity
    /// unless a vIOMMU translates it.
    fn msi_translator(&self) -> Arc<dyn MsiTranslator> {
        crate::iommu::msi::identity()
    }
}

type Streams = Mutex<BTreeMap<StreamId, Vec<Arc<dyn VfioDevice>>>>;

fn lock(s: &Streams) -> parking_lot::MutexGuard<'_, BTreeMap<StreamId, Vec<Arc<dyn VfioDevice>>>> {
    s.lock()
}

/// Take every mapping back from the devices of `stream` and forget them.
fn detach_stream(streams: &Streams, stream: StreamId) {
    let devs = lock(streams).remove(&stream).unwrap_or_default();
    for d in devs {
        if let Err(e) = d.dma_unmap_all() {
            tracing::debug!(%stream, error = %e, "DMA unmap at detach refused");
        }
    }
}

/// All of guest RAM at IOVA = GPA for every stream. See the module documentation.
pub struct IdentityDomain {
    ram: GuestRamFile,
    streams: Streams,
}

impl IdentityDomain {
    /// The identity domain over guest RAM.
    pub fn new(ram: GuestRamFile) -> Self {
        IdentityDomain {
            ram,
            streams: Mutex::new(BTreeMap::new()),
        }
    }
}

impl DmaDomain for IdentityDomain {
    fn model(&self) -> &'static str {
        "identity"
    }
    fn attach(&self, stream: StreamId, dev: Arc<dyn VfioDevice>) -> Result<(), DmaDomainError> {
        let req = self.ram.request(0, 0, self.ram.size, Prot::RW)?;
        dev.dma_map(req).map_err(|err| DmaDomainError::Device {
            stream,
            what: "DMA_MAP of guest RAM",
            err,
        })?;
        lock(&self.streams).entry(stream).or_default().push(dev);
        Ok(())
    }
    fn detach(&self, stream: StreamId) {
        detach_stream(&self.streams, stream);
    }
    fn map(&self, _: StreamId, _: u64, _: u64, _: u64, _: Prot) -> Result<(), DmaDomainError> {
        Err(DmaDomainError::Unsupported {
            model: "identity",
            what: "change its mappings (all guest RAM is at IOVA = GPA)",
        })
    }
    fn unmap(&self, _: StreamId, _: u64, _: u64) -> Result<(), DmaDomainError> {
        Err(DmaDomainError::Unsupported {
            model: "identity",
            what: "change its mappings (all guest RAM is at IOVA = GPA)",
        })
    }
}

/// One guest translation: (guest-physical start, size, permissions).
type Translation = (u64, u64, Prot);

/// Per-stream mappings installed by a vIOMMU. See the module documentation.
pub struct ShadowDomain {
    ram: GuestRamFile,
    streams: Streams,
    /// The current mappings of each stream: IOVA -> (GPA, size, prot).
    maps: Mutex<BTreeMap<StreamId, BTreeMap<u64, Translation>>>,
    /// The vIOMMU translating MSI addresses (weak: the vIOMMU owns this domain).
    msi: Mutex<Option<std::sync::Weak<dyn MsiTranslator>>>,
}

impl ShadowDomain {
    /// An empty shadow domain over guest RAM.
    pub fn new(ram: GuestRamFile) -> Self {
        ShadowDomain {
            ram,
            streams: Mutex::new(BTreeMap::new()),
            maps: Mutex::new(BTreeMap::new()),
            msi: Mutex::new(None),
        }
    }

    /// The vIOMMU driving this domain translates its devices' MSI addresses.
    pub fn set_msi_translator(&self, t: std::sync::Weak<dyn MsiTranslator>) {
        *self.msi.lock() = Some(t);
    }

    fn devices(&self, stream: StreamId) -> Vec<Arc<dyn VfioDevice>> {
        lock(&self.streams)
            .get(&stream)
            .cloned()
            .unwrap_or_default()
    }
}

impl DmaDomain for ShadowDomain {
    fn model(&self) -> &'static str {
        "shadow"
    }
    fn attach(&self, stream: StreamId, dev: Arc<dyn VfioDevice>) -> Result<(), DmaDomainError> {
        let current: Vec<(u64, Translation)> = self
            .maps
            .lock()
            .get(&stream)
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        for (iova, (gpa, size, prot)) in current {
            let req = self.ram.request(iova, gpa, size, prot)?;
            dev.dma_map(req).map_err(|err| DmaDomainError::Device {
                stream,
                what: "DMA_MAP",
                err,
            })?;
        }
        lock(&self.streams).entry(stream).or_default().push(dev);
        Ok(())
    }
    fn detach(&self, stream: StreamId) {
        detach_stream(&self.streams, stream);
    }
    fn map(
        &self,
        stream: StreamId,
        iova: u64,
        gpa: u64,
        size: u64,
        prot: Prot,
    ) -> Result<(), DmaDomainError> {
        let req = self.ram.request(iova, gpa, size, prot)?;
        for d in self.devices(stream) {
            d.dma_map(req.clone())
                .map_err(|err| DmaDomainError::Device {
                    stream,
                    what: "DMA_MAP",
                    err,
                })?;
        }
        self.maps
            .lock()
            .entry(stream)
            .or_default()
            .insert(iova, (gpa, size, prot));
        Ok(())
    }
    fn unmap(&self, stream: StreamId, iova: u64, size: u64) -> Result<(), DmaDomainError> {
        DmaRange::new(iova, size).map_err(|_| DmaDomainError::BadRange { iova, size })?;
        for d in self.devices(stream) {
            d.dma_unmap(iova, size)
                .map_err(|err| DmaDomainError::Device {
                    stream,
                    what: "DMA_UNMAP",
                    err,
                })?;
        }
        if let Some(m) = self.maps.lock().get_mut(&stream) {
            m.retain(|&k, &mut (_, s, _)| k.saturating_add(s) <= iova || k >= iova + size);
        }
        Ok(())
    }
    fn msi_translator(&self) -> Arc<dyn MsiTranslator> {
        match self.msi.lock().as_ref().and_then(|w| w.upgrade()) {
            Some(t) => t,
            None => crate::iommu::msi::identity(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::recorder::DmaRecorder;
    use std::os::fd::AsRawFd;

    fn ram() -> GuestRam {
        GuestRam::new(4 << 20).unwrap()
    }

    #[test]
    fn identity_domain_maps_all_ram_by_fd_at_iova_zero_and_takes_it_back() {
        let ram = ram();
        let dom = IdentityDomain::new(GuestRamFile::of(&ram));
        let dev = Arc::new(DmaRecorder::default());
        let s = StreamId::pci(0, 1, 0);
        assert_eq!(s, StreamId::Pci(0x08));
        assert_eq!(s.to_string(), "PCI 00:01.0");
        dom.attach(s, dev.clone()).unwrap();
        assert_eq!(
            *dev.maps.lock(),
            vec![(0, 4 << 20, Prot::RW, ram.fd().as_raw_fd(), ram.fd_offset())],
            "exactly one map: all of guest RAM, read-write, by fd, IOVA = GPA"
        );
        let e = dom.map(s, 0x1000, 0x1000, 0x1000, Prot::READ).unwrap_err();
        assert!(e.to_string().contains("identity"), "{e}");
        assert!(dom.unmap(s, 0, 0x1000).is_err());
        assert!(dev.unmaps.lock().is_empty());
        dom.detach(s);
        assert_eq!(*dev.unmaps.lock(), vec![(0, u64::MAX)]);
        dom.detach(s);
        assert_eq!(dev.unmaps.lock().len(), 1, "detached once");
        // A refusal names the stream and says what was refused (users grep for it).
        let refusing = Arc::new(DmaRecorder {
            refuse: true,
            ..DmaRecorder::default()
        });
        let msg = dom
            .attach(StreamId::pci(0, 2, 0), refusing)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("PCI 00:02.0: DMA_MAP of guest RAM refused by the device: "),
            "{msg}"
        );
        assert!(msg.contains("not this file"), "{msg}");
    }

    #[test]
    fn shadow_domain_maps_and_unmaps_reach_the_devices_of_the_stream_only() {
        let ram = ram();
        let dom = ShadowDomain::new(GuestRamFile::of(&ram));
        let (a, b, other) = (
            Arc::new(DmaRecorder::default()),
            Arc::new(DmaRecorder::default()),
            Arc::new(DmaRecorder::default()),
        );
        let s = StreamId::Platform(7);
        dom.attach(s, a.clone()).unwrap();
        dom.attach(StreamId::Platform(8), other.clone()).unwrap();
        assert!(a.maps.lock().is_empty(), "a shadow domain starts empty");
        dom.map(s, 0x10_0000, 0x2000, 0x1000, Prot::READ).unwrap();
        let fd = ram.fd().as_raw_fd();
        assert_eq!(
            *a.maps.lock(),
            vec![(0x10_0000, 0x1000, Prot::READ, fd, ram.fd_offset() + 0x2000)]
        );
        // A device joining later gets the stream's current mappings.
        dom.attach(s, b.clone()).unwrap();
        assert_eq!(*b.maps.lock(), *a.maps.lock());
        dom.unmap(s, 0x10_0000, 0x1000).unwrap();
        assert_eq!(*a.unmaps.lock(), vec![(0x10_0000, 0x1000)]);
        assert_eq!(*b.unmaps.lock(), vec![(0x10_0000, 0x1000)]);
        assert!(other.maps.lock().is_empty() && other.unmaps.lock().is_empty());
        // After the unmap a late joiner gets nothing.
        let c = Arc::new(DmaRecorder::default());
        dom.attach(s, c.clone()).unwrap();
        assert!(c.maps.lock().is_empty());
        // Hostile ranges are refused before any device sees them.
        assert!(matches!(
            dom.map(s, 0, (4 << 20) - 0x1000, 0x2000, Prot::RW),
            Err(DmaDomainError::OutsideRam { .. })
        ));
        assert!(matches!(
            dom.map(s, u64::MAX - 0xfff, 0, 0x2000, Prot::RW),
            Err(DmaDomainError::BadRange { .. })
        ));
        assert!(dom.map(s, 0, u64::MAX, 2, Prot::RW).is_err());
        assert!(dom.unmap(s, 0, 0).is_err());
        assert_eq!(a.maps.lock().len(), 1, "nothing more reached the device");
    }
}
