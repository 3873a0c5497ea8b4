//! A level-1 exporter forwarding nestio's nested-IOMMU extension, in one process:
//! level 0 serves the sample DMA device, level 1 connects to it (proposing the
//! extension), wraps it in an `ExportedDevice` and serves it with `ForwardIommu` as its
//! nested IOMMU backend; level 2 connects, maps its RAM (a window of level 1's RAM file)
//! at IPA = its GPA, writes a CD and stage-1 tables there and binds its STE. The level-0
//! device's DMA then goes through the level-2 guest's stage 1, its faults reach level
//! 2's client with level 2's vSID, INVALIDATE answers come back, and the end of level
//! 2's session unbinds at level 0.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::VfioDevice;
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_emulated::sample::SampleDevice;
use nestio_iommu::smmuv3::evtq::{code, Event};
use nestio_iommu::smmuv3::memory::{MemoryError, SmmuMemory};
use nestio_iommu::smmuv3::tables::{self, Stage1Tables, LEAF_RW};
use nestio_nested::{
    ExportConfig, ExportedDevice, ForwardIommu, LevelId, LevelRam, RamRegion, Window,
};
use nestio_vfio_user::nested_iommu::{NestedIommuCaps, CERROR_ILL};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

/// Level 1's RAM: 4 MiB; the top 2 MiB are level 2's window (level-2 GPA 0..2 MiB).
const L1_RAM: u64 = 4 << 20;
const WIN_BASE: u64 = 2 << 20;
const WIN_SIZE: u64 = 2 << 20;
/// Level 2's tables and data, by IPA (= level-2 GPA).
const CD: u64 = 0x1000;
const ROOT: u64 = 0x2000;
const POOL: u64 = 0x3000;
const DATA: u64 = 0x2_0000;
const IOVA: u64 = 0x4000_0000;
const VSID: u32 = 0x42;

/// Level 2's RAM as its guest writes it: level 1's RAM file at the window's offset.
struct Level2Ram(Arc<OwnedFd>);

impl Level2Ram {
    fn offset(&self, ipa: u64, len: usize) -> Result<i64, MemoryError> {
        let err = MemoryError { addr: ipa, len };
        ipa.checked_add(len as u64)
            .filter(|end| *end <= WIN_SIZE)
            .map(|_| (WIN_BASE + ipa) as i64)
            .ok_or(err)
    }
}

impl SmmuMemory for Level2Ram {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.offset(addr, buf.len())?;
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let r = unsafe { libc::pread(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
        assert_eq!(r, buf.len() as isize);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.offset(addr, data.len())?;
        // SAFETY: the kernel reads `data.len()` bytes from `data`.
        let r = unsafe { libc::pwrite(self.0.as_raw_fd(), data.as_ptr().cast(), data.len(), off) };
        assert_eq!(r, data.len() as isize);
        Ok(())
    }
}

fn nested_client(s: UnixStream) -> Client {
    Client::from_stream(
        s,
        ClientConfig {
            nested_iommu: Some(NestedIommuCaps::default()),
            ..ClientConfig::default()
        },
    )
    .unwrap()
}

fn cmd(d0: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..8].copy_from_slice(&d0.to_le_bytes());
    c
}

struct Stack {
    dev0: Arc<SampleDevice>,
    child: Client,
    ram: Level2Ram,
}

/// Level 0 (with or without the extension), level 1 forwarding, level 2 connected
/// and its RAM mapped.
fn stack(level0_nested: bool) -> Stack {
    let dev0 = Arc::new(SampleDevice::new().unwrap());
    let server0 = Server::new(
        dev0.clone(),
        ServerConfig {
            nested_iommu: level0_nested,
            ..ServerConfig::default()
        },
    );
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || server0.serve_stream(a));
    let up = Arc::new(nested_client(b));

    let fd = Arc::new(nestio_dma::memfd::sealed_memfd(c"l1-ram", L1_RAM).unwrap());
    let exported = Arc::new(
        ExportedDevice::new(
            up.clone(),
            LevelRam::Shared(RamRegion::new(fd.clone(), 0, L1_RAM, 0).unwrap()),
            ExportConfig {
                window: Window::new(WIN_BASE, WIN_SIZE).unwrap(),
                no_shared_memory: false,
                child: LevelId::from_raw(2).unwrap(),
            },
        )
        .unwrap(),
    );
    let fwd = Arc::new(ForwardIommu::new(up));
    assert_eq!(fwd.available(), level0_nested);
    let server1 = Server::new(exported, ServerConfig::default()).with_nested_backend(fwd);
    let (c, d) = UnixStream::pair().unwrap();
    std::thread::spawn(move || server1.serve_stream(c));
    let child = nested_client(d);
    if level0_nested {
        // Level 2: stage 2 = its RAM at IPA = GPA, by fd of level 1's RAM file.
        child
            .dma_map(DmaMapRequest {
                range: DmaRange::new(0, WIN_SIZE).unwrap(),
                prot: Prot::RW,
                backing: DmaBacking::Fd {
                    fd: fd.clone(),
                    offset: WIN_BASE,
                },
            })
            .unwrap();
    }
    Stack {
        dev0,
        child,
        ram: Level2Ram(fd),
    }
}

#[test]
fn level0_walks_the_level2_guests_stage1_through_the_forwarding_exporter() {
    let s = stack(true);
    let caps = s
        .child
        .nested_iommu()
        .expect("level 1 offers what level 0 agreed");
    assert_eq!(caps, NestedIommuCaps::default());

    let mut t = Stage1Tables::new(ROOT, POOL, 0x8000).unwrap();
    t.map(&s.ram, IOVA, DATA, LEAF_RW).unwrap();
    tables::write_words(&s.ram, CD, &tables::cd(t.root(), 4, true)).unwrap();
    s.ram.write(DATA, b"level-2 page").unwrap();
    let faults = s.child.take_iommu_faults().expect("fault channel");
    let ste = tables::ste_stage1(CD);
    s.child.iommu_bind(VSID, ste[0], ste[1]).unwrap();

    // The level-0 device's DMA: IOVA -> level-2 IPA (tables read through level 0's
    // map table, i.e. level 2's own pages) -> the page.
    let space = s.dev0.dma_port().unwrap().space();
    let mut buf = [0u8; 12];
    space.read(IOVA, &mut buf).unwrap();
    assert_eq!(&buf, b"level-2 page");
    space.write(IOVA + 0x100, b"from level 0").unwrap();
    let mut back = [0u8; 12];
    s.ram.read(DATA + 0x100, &mut back).unwrap();
    assert_eq!(&back, b"from level 0");

    // An unmapped IOVA: nothing moves; F_TRANSLATION with level 2's vSID reaches level 2.
    assert!(space.read(IOVA + 0x10_0000, &mut buf).is_err());
    let f = faults
        .recv_timeout(Duration::from_secs(10))
        .expect("the relayed FAULT");
    let e = Event::decode(&f.record);
    assert_eq!((e.code, e.sid), (code::F_TRANSLATION, VSID));
    assert_eq!(e.input_addr, IOVA + 0x10_0000);
    assert!(e.read);

    // INVALIDATE answers come from level 0: legal commands done, an illegal opcode
    // stops there with CERROR_ILL.
    let r = s.child.iommu_invalidate(&[cmd(0x10), cmd(0x46)]).unwrap();
    assert_eq!((r.done, r.cerror), (2, 0));
    let r = s
        .child
        .iommu_invalidate(&[cmd(0x10), cmd(0x7f), cmd(0x46)])
        .unwrap();
    assert_eq!((r.done, r.cerror), (1, CERROR_ILL));
    // A refused BIND keeps level 0's errno (an STE without stage 1: EINVAL).
    let err = s.child.iommu_bind(VSID, 1, 0).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");

    // Level 2 leaves: level 1 unbinds at level 0, whose device DMAs to its map table
    // again.
    let port = s.dev0.dma_port().unwrap();
    let table = port.shared_table();
    drop(s.child);
    let t0 = Instant::now();
    while Arc::as_ptr(&port.space()) as *const () != Arc::as_ptr(&table) as *const () {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "level 0 still bound after level 2 left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn without_the_extension_at_level0_level1_offers_nothing() {
    let s = stack(false);
    assert!(s.child.nested_iommu().is_none());
    assert!(s.child.iommu_bind(VSID, 0, 0).is_err());
}
