//! nestio's nested-IOMMU extension end to end: a Client and a Server serving the test
//! device, the guest's STE/CD/stage-1 tables written into the client's shared memory
//! (`nestio_iommu::smmuv3::tables`), bound, and the device's DMA checked at the
//! stage-1-translated place; faults, invalidations, command errors and the malformed
//! messages of `docs/vfio-user-nested-iommu.md`.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use common::{device_dma, expect_error, memfd, pread, pwrite, raw_version, recv, send, Harness};
use nestio_device_model::{DeviceError, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_iommu::smmuv3::evtq::{code, Event};
use nestio_iommu::smmuv3::memory::{MemoryError, SmmuMemory};
use nestio_iommu::smmuv3::tables::{self, Stage1Tables, LEAF_RO, LEAF_RW};
use nestio_vfio_user::nested_iommu::{
    InvalidateReply, IommuBind, IommuFault, IommuInvalidate, NestedIommuCaps, CERROR_ILL,
};
use nestio_vfio_user::proto::{Capabilities, Command, Version};
use nestio_vfio_user::{Client, ClientConfig, ServerConfig};

/// Guest RAM: IPA 0x10_0000..0x20_0000 backed by one memfd, mapped to the device.
const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 0x10_0000;
const CD: u64 = RAM + 0x1000;
const ROOT: u64 = RAM + 0x2000;
const POOL: u64 = RAM + 0x3000;
/// Stage 1: IOVA 0x4000_0000 → IPA 0x12_0000 (RW), 0x4000_1000 → 0x12_5000 (RO).
const IOVA: u64 = 0x4000_0000;
const PAGE_RW: u64 = RAM + 0x2_0000;
const PAGE_RO: u64 = RAM + 0x2_5000;
const VSID: u32 = 0x42;
const ASID: u16 = 4;

/// The guest's RAM as the guest (the test) writes it: the memfd at IPA `RAM`.
struct GuestRam(OwnedFd);

impl SmmuMemory for GuestRam {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let err = MemoryError {
            addr,
            len: buf.len(),
        };
        let off = addr
            .checked_sub(RAM)
            .filter(|o| o + buf.len() as u64 <= RAM_SIZE);
        buf.copy_from_slice(&pread(&self.0, off.ok_or(err)?, buf.len()));
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let err = MemoryError {
            addr,
            len: data.len(),
        };
        let off = addr
            .checked_sub(RAM)
            .filter(|o| o + data.len() as u64 <= RAM_SIZE);
        pwrite(&self.0, off.ok_or(err)?, data);
        Ok(())
    }
}

impl GuestRam {
    fn bytes(&self, ipa: u64, len: usize) -> Vec<u8> {
        pread(&self.0, ipa - RAM, len)
    }
}

fn nested_config(twin: bool) -> ClientConfig {
    ClientConfig {
        twin_socket: twin,
        nested_iommu: Some(NestedIommuCaps::default()),
        ..ClientConfig::default()
    }
}

/// A client whose guest RAM is mapped (stage 2 = IPA) and whose guest has built the
/// stage-1 tables; not bound yet.
struct Rig {
    h: Harness,
    c: Client,
    ram: GuestRam,
    tables: Stage1Tables,
    _server: std::thread::JoinHandle<Result<(), nestio_vfio_user::ServerError>>,
}

impl Rig {
    fn new(twin: bool) -> Rig {
        let h = Harness::new(ServerConfig::default());
        let (c, t) = h.client(nested_config(twin));
        let ram = GuestRam(memfd(RAM_SIZE));
        let fd = Arc::new(ram.0.try_clone().unwrap());
        c.dma_map(DmaMapRequest {
            range: DmaRange::new(RAM, RAM_SIZE).unwrap(),
            prot: Prot::from_bits(3).unwrap(),
            backing: DmaBacking::Fd { fd, offset: 0 },
        })
        .unwrap();
        let mut tables = Stage1Tables::new(ROOT, POOL, 0x8000).unwrap();
        tables.map(&ram, IOVA, PAGE_RW, LEAF_RW).unwrap();
        tables.map(&ram, IOVA + 0x1000, PAGE_RO, LEAF_RO).unwrap();
        tables::write_words(&ram, CD, &tables::cd(tables.root(), ASID, true)).unwrap();
        Rig {
            h,
            c,
            ram,
            tables,
            _server: t,
        }
    }

    fn bind(&self) {
        let ste = tables::ste_stage1(CD);
        self.c.iommu_bind(VSID, ste[0], ste[1]).unwrap();
    }

    /// Device → guest memory: `data` put in device region 0 at 0x100, DMA'd to `iova`.
    fn dma_to_guest(&self, iova: u64, data: &[u8]) -> u64 {
        self.c.region_write(0, 0x100, data).unwrap();
        device_dma(&self.c, iova, data.len() as u64, 0x100, 2)
    }

    /// Guest memory → device: `len` bytes at `iova` into device region 0 at 0x800.
    fn dma_from_guest(&self, iova: u64, len: usize) -> (u64, Vec<u8>) {
        let st = device_dma(&self.c, iova, len as u64, 0x800, 1);
        let mut b = vec![0u8; len];
        self.c.region_read(0, 0x800, &mut b).unwrap();
        (st, b)
    }
}

fn cmd(d0: u64, d1: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..8].copy_from_slice(&d0.to_le_bytes());
    c[8..].copy_from_slice(&d1.to_le_bytes());
    c
}

const TLBI_NH_ALL: u64 = 0x10;
const TLBI_NH_VA: u64 = 0x12;
const CFGI_STE: u64 = 0x03;
const CMD_SYNC: u64 = 0x46;

fn next_fault(rx: &std::sync::mpsc::Receiver<IommuFault>) -> (IommuFault, Event) {
    let f = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a FAULT message from the server");
    (f, Event::decode(&f.record))
}

fn nested_dma_through_stage1(twin: bool) {
    let r = Rig::new(twin);
    assert_eq!(r.c.twin_socket(), twin);
    let caps = r.c.nested_iommu().expect("negotiated");
    assert_eq!(caps, NestedIommuCaps::default());
    let faults = r.c.take_iommu_faults().expect("fault receiver");
    assert!(r.c.take_iommu_faults().is_none(), "handed out once");

    // Before BIND the device's addresses are IPAs.
    assert_eq!(r.dma_to_guest(PAGE_RW + 0x40, b"ipa"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW + 0x40, 3), b"ipa");
    assert_eq!(r.dma_to_guest(IOVA, b"x"), libc::EFAULT as u64);

    r.bind();
    // Device → IOVA lands at the stage-1-translated IPA.
    assert_eq!(r.dma_to_guest(IOVA + 0x10, b"through stage 1!"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW + 0x10, 16), b"through stage 1!");
    // And back.
    let (st, got) = r.dma_from_guest(IOVA + 0x10, 16);
    assert_eq!((st, got.as_slice()), (0, &b"through stage 1!"[..]));
    // The RO page reads, but a write crossing into it touches nothing and faults with
    // F_PERMISSION at the page's first IOVA.
    r.ram.write(PAGE_RO, b"read-only page").unwrap();
    assert_eq!(r.dma_from_guest(IOVA + 0x1000, 14).1, b"read-only page");
    let before = r.ram.bytes(PAGE_RW + 0xff0, 16);
    assert_eq!(
        r.dma_to_guest(IOVA + 0xff0, &[0xee; 32]),
        libc::EFAULT as u64
    );
    assert_eq!(r.ram.bytes(PAGE_RW + 0xff0, 16), before, "no byte touched");
    assert_eq!(r.ram.bytes(PAGE_RO, 14), b"read-only page");
    let (f, ev) = next_fault(&faults);
    assert_eq!(
        (ev.code, ev.sid, ev.input_addr, ev.read),
        (code::F_PERMISSION, VSID, IOVA + 0x1000, false)
    );
    assert!(!f.lost_before);
    let seq0 = f.sequence;

    // An unmapped IOVA: F_TRANSLATION with the vSID and the IOVA, the read reports
    // RnW, the device's buffer is untouched.
    r.c.region_write(0, 0x800, &[0x5a; 8]).unwrap();
    let (st, got) = r.dma_from_guest(IOVA + 0x2008, 8);
    assert_eq!((st, got), (libc::EFAULT as u64, vec![0x5a; 8]));
    let (f, ev) = next_fault(&faults);
    assert_eq!(
        (ev.code, ev.sid, ev.input_addr, ev.read),
        (code::F_TRANSLATION, VSID, IOVA + 0x2008, true)
    );
    assert_eq!(f.sequence, seq0.wrapping_add(1));

    // The guest unmaps IOVA's page: cached until TLBI_NH_VA + CMD_SYNC arrive.
    let mut t = r.tables.clone();
    t.unmap(&r.ram, IOVA).unwrap();
    assert_eq!(r.dma_to_guest(IOVA, b"cached"), 0, "the IOTLB still has it");
    assert_eq!(r.ram.bytes(PAGE_RW, 6), b"cached");
    let rep =
        r.c.iommu_invalidate(&[
            cmd(TLBI_NH_VA | (u64::from(ASID) << 48), IOVA),
            cmd(CMD_SYNC, 0),
        ])
        .unwrap();
    assert_eq!(rep, InvalidateReply { done: 2, cerror: 0 });
    assert_eq!(r.dma_to_guest(IOVA, b"gone"), libc::EFAULT as u64);
    assert_eq!(r.ram.bytes(PAGE_RW, 6), b"cached");
    let (_, ev) = next_fault(&faults);
    assert_eq!((ev.code, ev.input_addr), (code::F_TRANSLATION, IOVA));

    // Remap elsewhere: CFGI_STE is not forwardable (the VMM re-BINDs instead), the
    // command before it ran, the ones after did not.
    t.map(&r.ram, IOVA, PAGE_RW + 0x1000, LEAF_RW).unwrap();
    let rep =
        r.c.iommu_invalidate(&[cmd(TLBI_NH_ALL, 0), cmd(CFGI_STE, 0), cmd(CMD_SYNC, 0)])
            .unwrap();
    assert_eq!(
        rep,
        InvalidateReply {
            done: 1,
            cerror: CERROR_ILL
        }
    );
    assert_eq!(r.dma_to_guest(IOVA, b"moved"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW + 0x1000, 5), b"moved");
    // An unknown opcode, and a CMD_SYNC with the reserved CS value, at index 2.
    for bad in [cmd(0xff, 0), cmd(CMD_SYNC | (3 << 12), 0)] {
        let rep =
            r.c.iommu_invalidate(&[cmd(TLBI_NH_ALL, 0), cmd(CMD_SYNC, 0), bad])
                .unwrap();
        assert_eq!(
            rep,
            InvalidateReply {
                done: 2,
                cerror: CERROR_ILL
            }
        );
    }
    // More than 256 commands go in several messages.
    let many = vec![cmd(TLBI_NH_ALL, 0); 300];
    assert_eq!(
        r.c.iommu_invalidate(&many).unwrap(),
        InvalidateReply {
            done: 300,
            cerror: 0
        }
    );

    // UNBIND: IPAs again.
    r.c.iommu_unbind().unwrap();
    assert_eq!(r.dma_to_guest(PAGE_RW + 0x80, b"ipa again"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW + 0x80, 9), b"ipa again");
    assert_eq!(r.dma_to_guest(IOVA, b"x"), libc::EFAULT as u64);
    // Unbound, the same legality checks apply (nothing is cached to invalidate).
    for (cmds, done, cerror) in [
        (vec![cmd(TLBI_NH_ALL, 0), cmd(CMD_SYNC, 0)], 2, 0),
        (
            vec![cmd(TLBI_NH_ALL, 0), cmd(CMD_SYNC | (3 << 12), 0)],
            1,
            CERROR_ILL,
        ),
        (vec![cmd(CFGI_STE, 0)], 0, CERROR_ILL),
    ] {
        assert_eq!(
            r.c.iommu_invalidate(&cmds).unwrap(),
            InvalidateReply { done, cerror }
        );
    }
    // No fault message for a stage-2 miss (no stage 1 bound).
    assert!(faults.recv_timeout(Duration::from_millis(100)).is_err());
    // An STE without stage 1 is refused (EINVAL), the binding unchanged.
    let e = r.c.iommu_bind(VSID, 1 | (0b110 << 1), 0).unwrap_err();
    assert!(
        matches!(e, DeviceError::Remote { errno, .. } if errno == libc::EINVAL),
        "{e}"
    );
    assert!(!r.h.dev.dma_port().unwrap().is_translated());
}

#[test]
fn nested_dma_through_stage1_twin_socket() {
    nested_dma_through_stage1(true);
}

#[test]
fn nested_dma_through_stage1_main_socket() {
    nested_dma_through_stage1(false);
}

/// A new BIND replaces the old one (fresh caches), and the end of the session puts the
/// device's DMA back on its map table.
#[test]
fn rebind_replaces_and_session_end_unbinds() {
    let r = Rig::new(true);
    r.bind();
    assert_eq!(r.dma_to_guest(IOVA, b"one"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW, 3), b"one");
    // A second CD (ASID 5) mapping IOVA elsewhere, bound without any TLBI.
    let mut t2 = Stage1Tables::new(RAM + 0xb000, RAM + 0xc000, 0x4000).unwrap();
    t2.map(&r.ram, IOVA, PAGE_RW + 0x3000, LEAF_RW).unwrap();
    tables::write_words(&r.ram, RAM + 0xa000, &tables::cd(t2.root(), 5, true)).unwrap();
    let ste = tables::ste_stage1(RAM + 0xa000);
    r.c.iommu_bind(VSID, ste[0], ste[1]).unwrap();
    assert_eq!(r.dma_to_guest(IOVA, b"two"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW + 0x3000, 3), b"two");
    assert_eq!(r.ram.bytes(PAGE_RW, 3), b"one");
    assert!(r.h.dev.dma_port().unwrap().is_translated());
    let Rig { h, c, _server, .. } = r;
    drop(c);
    _server.join().unwrap().unwrap();
    assert!(!h.dev.dma_port().unwrap().is_translated());
}

/// The capability: not proposed by default, never answered unasked, not answered when
/// the server turns it off; the client API then refuses locally.
#[test]
fn capability_only_when_proposed_and_enabled() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    assert!(
        c.version().caps.nestio_nested_iommu.is_none(),
        "not sent unasked"
    );
    assert!(c.nested_iommu().is_none());
    assert!(c.take_iommu_faults().is_none());
    assert!(matches!(
        c.iommu_bind(1, 0xb, 0),
        Err(DeviceError::Unsupported(_))
    ));
    assert!(matches!(
        c.iommu_invalidate(&[cmd(CMD_SYNC, 0)]),
        Err(DeviceError::Unsupported(_))
    ));

    let off = Harness::new(ServerConfig {
        nested_iommu: false,
        ..ServerConfig::default()
    });
    let (c, _t) = off.client(nested_config(true));
    assert!(c.version().caps.nestio_nested_iommu.is_none());
    assert!(c.nested_iommu().is_none(), "shadow fallback");
    assert!(matches!(c.iommu_unbind(), Err(DeviceError::Unsupported(_))));

    // The raw JSON of a default client's VERSION reply has no such key.
    let (s, _t) = h.session();
    let v = raw_version(&s);
    assert!(v.caps.nestio_nested_iommu.is_none());
}

/// A raw session that proposed the capability.
fn raw_nested_session(h: &Harness) -> std::os::unix::net::UnixStream {
    let (s, t) = h.session();
    std::mem::forget(t);
    let v = Version {
        major: 0,
        minor: 2,
        caps: Capabilities {
            nestio_nested_iommu: Some(nestio_vfio_user::nested_iommu::NestedIommuCap::smmuv3(
                NestedIommuCaps::default(),
            )),
            ..Capabilities::default()
        },
    };
    let mut p = Vec::new();
    v.encode_into(&mut p);
    send(&s, 1, Command::Version as u16, &p, &[]);
    let m = recv(&s).unwrap();
    assert!(!m.header.is_error());
    let reply = Version::decode(&m.payload).unwrap();
    assert_eq!(
        reply.caps.nestio_nested_iommu.unwrap().smmuv3,
        Some(NestedIommuCaps::default())
    );
    s
}

fn invalidate_payload(n: usize) -> Vec<u8> {
    let mut p = Vec::new();
    IommuInvalidate::encode_into(&vec![cmd(TLBI_NH_ALL, 0); n], &mut p);
    p
}

/// Every malformed extension message gets EINVAL and the connection stays in sync;
/// without the capability every extension command gets ENOTSUP.
#[test]
fn malformed_messages_and_enotsup() {
    let h = Harness::new(ServerConfig::default());
    let s = raw_nested_session(&h);
    let inv = Command::NestioIommuInvalidate as u16;
    let bind = Command::NestioIommuBind as u16;
    // count 0 and 257: EINVAL, and the next message works.
    let mut id = 10;
    for n in [0usize, 257] {
        send(&s, id, inv, &invalidate_payload(n), &[]);
        expect_error(&s, id, libc::EINVAL);
        send(&s, id + 1, inv, &invalidate_payload(1), &[]);
        let m = recv(&s).unwrap();
        assert_eq!(m.header.msg_id, id + 1);
        assert!(!m.header.is_error());
        assert_eq!(
            InvalidateReply::decode(&m.payload).unwrap(),
            InvalidateReply { done: 1, cerror: 0 }
        );
        id += 2;
    }
    // argsz that lies, trailing byte, truncation, nonzero flags / reserved, an STE
    // without stage 1, a payload on UNBIND, FAULT from the client, fds attached.
    let mut good_bind = Vec::new();
    IommuBind {
        vsid: 1,
        ste0: tables::ste_stage1(CD)[0],
        ste1: 0,
    }
    .encode_into(&mut good_bind);
    let mut bad: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut lie = invalidate_payload(2);
    lie[0] = 8;
    bad.push((inv, lie));
    let mut trail = invalidate_payload(2);
    trail.push(0);
    bad.push((inv, trail));
    bad.push((inv, invalidate_payload(2)[..20].to_vec()));
    for at in [0usize, 4, 12] {
        let mut b = good_bind.clone();
        b[at] ^= 1;
        bad.push((bind, b));
    }
    let mut no_s1 = Vec::new();
    IommuBind {
        vsid: 1,
        ste0: 1 | (0b100 << 1),
        ste1: 0,
    }
    .encode_into(&mut no_s1);
    bad.push((bind, no_s1));
    let mut bad_dss = Vec::new();
    IommuBind {
        vsid: 1,
        ste0: tables::ste_stage1(CD)[0],
        ste1: 3, // reserved S1DSS
    }
    .encode_into(&mut bad_dss);
    bad.push((bind, bad_dss));
    bad.push((Command::NestioIommuUnbind as u16, vec![0]));
    let mut fault = Vec::new();
    IommuFault {
        lost_before: false,
        sequence: 0,
        record: [0; 32],
    }
    .encode_into(&mut fault);
    bad.push((Command::NestioIommuFault as u16, fault));
    for (cmd_no, p) in bad {
        id += 1;
        send(&s, id, cmd_no, &p, &[]);
        expect_error(&s, id, libc::EINVAL);
    }
    let ev = common::eventfd();
    id += 1;
    send(&s, id, bind, &good_bind, &[ev.as_raw_fd()]);
    expect_error(&s, id, libc::EINVAL);
    // Still in sync: a good BIND and UNBIND.
    send(&s, 100, bind, &good_bind, &[]);
    let m = recv(&s).unwrap();
    assert!(!m.header.is_error() && m.header.msg_id == 100);
    send(&s, 101, Command::NestioIommuUnbind as u16, &[], &[]);
    let m = recv(&s).unwrap();
    assert!(!m.header.is_error() && m.header.msg_id == 101);
    assert_eq!(common::raw_get_info(&s, 102), 3);

    // A session that did not propose it: ENOTSUP for every extension command, even a
    // malformed one, and the session goes on.
    let (s2, _t2) = h.session();
    raw_version(&s2);
    send(&s2, 5, bind, &good_bind, &[]);
    expect_error(&s2, 5, libc::ENOTSUP);
    send(&s2, 6, inv, &invalidate_payload(0), &[]);
    expect_error(&s2, 6, libc::ENOTSUP);
    send(&s2, 7, Command::NestioIommuUnbind as u16, &[], &[]);
    expect_error(&s2, 7, libc::ENOTSUP);
    send(&s2, 8, 0x10ff, &[], &[]);
    expect_error(&s2, 8, libc::ENOTSUP);
    assert_eq!(common::raw_get_info(&s2, 9), 3);
}

/// Two sessions side by side on one device (`serve_stream`): one's end does not undo
/// the other's binding, and the last one's end leaves the device untranslated.
#[test]
fn side_by_side_sessions_do_not_undo_each_other() {
    let a = Rig::new(true);
    let (b, tb) = a.h.client(nested_config(true));
    a.bind();
    // B binds the same guest's STE (the device's map table is shared).
    let ste = tables::ste_stage1(CD);
    b.iommu_bind(7, ste[0], ste[1]).unwrap();
    assert!(port_of(&a.h).is_translated());
    let Rig { h, c, _server, .. } = a;
    drop(c);
    _server.join().unwrap().unwrap();
    assert!(port_of(&h).is_translated(), "A's end kept B's binding");
    drop(b);
    tb.join().unwrap().unwrap();
    assert!(!port_of(&h).is_translated(), "B's end unbound");
}

fn port_of(h: &Harness) -> &nestio_device_model::DmaPort {
    h.dev.dma_port().unwrap()
}

/// Faults the VMM does not read: the client keeps 1024, the server buffers 64 (plus
/// what the socket holds), the rest are dropped and the next record delivered after a drop is flagged;
/// `sequence` counts every fault, so the gaps show exactly what was lost.
#[test]
fn undrained_faults_are_bounded_and_flagged() {
    use nestio_vfio_user::testdev::reg;
    let r = Rig::new(true);
    r.bind();
    let faults = r.c.take_iommu_faults().unwrap();
    // A device → guest DMA to an unmapped IOVA, repeated by rewriting DMA_CMD only.
    let n = 3000u32;
    assert_eq!(r.dma_to_guest(IOVA + 0x3000, &[1; 8]), libc::EFAULT as u64);
    for _ in 1..=n {
        r.c.region_write(1, reg::DMA_CMD, &2u64.to_le_bytes())
            .unwrap();
    }
    // Faults 0..=n happened. Read what arrives until the stream has been quiet for a
    // while, then one more fault (a marker, sequence > n) must get through: the
    // client's queue is empty again and the server's has drained.
    let mut got: Vec<IommuFault> = Vec::new();
    for _ in 0..10 {
        while let Ok(f) = faults.recv_timeout(Duration::from_millis(300)) {
            got.push(f);
        }
        if got.last().is_some_and(|f| f.sequence > n) {
            break;
        }
        r.c.region_write(1, reg::DMA_CMD, &2u64.to_le_bytes())
            .unwrap();
    }
    assert!(
        got.last().is_some_and(|f| f.sequence > n),
        "the marker fault after the burst was delivered"
    );
    assert_eq!(got[0].sequence, 0);
    assert!(!got[0].lost_before);
    // More than the client's queue, the server's buffer and a socket buffer hold.
    let burst = got.iter().filter(|f| f.sequence <= n).count();
    assert!(burst < n as usize + 1, "{burst} of {} delivered", n + 1);
    for w in got.windows(2) {
        assert!(w[1].sequence > w[0].sequence, "in order");
        assert_eq!(
            w[1].lost_before,
            w[1].sequence != w[0].sequence + 1,
            "LOST_EVENTS exactly after a gap ({} -> {})",
            w[0].sequence,
            w[1].sequence
        );
    }
    assert!(got.iter().any(|f| f.lost_before), "some were dropped");
    let ev = Event::decode(&got.last().unwrap().record);
    assert_eq!(
        (ev.code, ev.sid, ev.input_addr),
        (code::F_TRANSLATION, VSID, IOVA + 0x3000)
    );
}

/// A guest that rewrites its CD: the old one stays cached (even across TLBI_NH_ALL)
/// until CFGI_CD; then the new table is walked.
#[test]
fn cfgi_cd_rereads_the_context_descriptor() {
    let r = Rig::new(true);
    r.bind();
    assert_eq!(r.dma_to_guest(IOVA, b"old"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW, 3), b"old");
    let mut t2 = Stage1Tables::new(RAM + 0xb000, RAM + 0xc000, 0x4000).unwrap();
    t2.map(&r.ram, IOVA, PAGE_RW + 0x2000, LEAF_RW).unwrap();
    tables::write_words(&r.ram, CD, &tables::cd(t2.root(), 9, true)).unwrap();
    let sync = cmd(CMD_SYNC, 0);
    r.c.iommu_invalidate(&[cmd(TLBI_NH_ALL, 0), sync]).unwrap();
    assert_eq!(r.dma_to_guest(IOVA, b"still"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW, 5), b"still", "the cached CD's table");
    // CFGI_CD (SID and SSID operands are the guest's; the device has one stream).
    let rep =
        r.c.iommu_invalidate(&[cmd(0x05 | (u64::from(VSID) << 32), 0), sync])
            .unwrap();
    assert_eq!(rep, InvalidateReply { done: 2, cerror: 0 });
    assert_eq!(r.dma_to_guest(IOVA, b"new"), 0);
    assert_eq!(r.ram.bytes(PAGE_RW + 0x2000, 3), b"new");
    assert_eq!(r.ram.bytes(PAGE_RW, 5), b"still");
}

/// A fake server that negotiates the extension (with a twin socket if `twin`), answers
/// every request with an empty reply (GET_INFO with zeros) until `requests` have
/// been answered, then hangs up.
fn hang_up_server(
    sock: std::os::unix::net::UnixStream,
    twin: bool,
    requests: usize,
) -> std::thread::JoinHandle<()> {
    use nestio_vfio_user::nested_iommu::NestedIommuCap;
    use nestio_vfio_user::proto::TwinSocket;
    use nestio_vfio_user::socket::send_message;
    std::thread::spawn(move || {
        let m = recv(&sock).unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let v = Version {
            major: 0,
            minor: 2,
            caps: Capabilities {
                twin_socket: twin.then_some(TwinSocket {
                    supported: true,
                    fd_index: Some(0),
                }),
                nestio_nested_iommu: Some(NestedIommuCap::smmuv3(NestedIommuCaps::default())),
                ..Capabilities::default()
            },
        };
        let mut p = Vec::new();
        v.encode_into(&mut p);
        let fds: Vec<_> = if twin {
            vec![theirs.as_raw_fd()]
        } else {
            vec![]
        };
        send_message(&sock, &m.header.reply(p.len()).unwrap(), &p, &fds).unwrap();
        drop(theirs);
        for _ in 0..requests {
            let m = recv(&sock).unwrap();
            let p = if m.header.cmd == Command::DeviceGetInfo as u16 {
                vec![16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            } else {
                vec![]
            };
            send_message(&sock, &m.header.reply(p.len()).unwrap(), &p, &[]).unwrap();
        }
        drop(ours);
        drop(sock);
    })
}

/// The fault receiver ends when the connection does (twin socket, or the main
/// socket's reader once bound), so a VMM thread waiting on it is not left hanging.
#[test]
fn fault_receiver_ends_with_the_connection() {
    for twin in [true, false] {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // GET_INFO at connect, then BIND.
        let srv = hang_up_server(b, twin, 2);
        let c = Client::from_stream(a, nested_config(twin)).unwrap();
        assert_eq!(c.twin_socket(), twin);
        let rx = c.take_iommu_faults().unwrap();
        c.iommu_bind(1, 0xb, 0).unwrap();
        srv.join().unwrap();
        assert!(
            matches!(
                rx.recv_timeout(Duration::from_secs(10)),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
            ),
            "twin {twin}"
        );
        assert!(c.iommu_unbind().is_err(), "the connection is gone");
    }
}

/// Guest RAM the server reaches only by message (a peer mapping, no fd): the stage-1
/// walk itself reads the CD and tables with DMA_READ, and the data moves by
/// DMA_READ/DMA_WRITE at the translated IPA.
#[test]
fn stage1_over_peer_backed_memory() {
    use nestio_dma::DmaPeer;
    struct PeerMem(Arc<common::VecPeer>);
    impl SmmuMemory for PeerMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            self.0.dma_read(addr, buf).map_err(|_| MemoryError {
                addr,
                len: buf.len(),
            })
        }
        fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
            self.0.dma_write(addr, data).map_err(|_| MemoryError {
                addr,
                len: data.len(),
            })
        }
    }
    for twin in [true, false] {
        let h = Harness::new(ServerConfig::default());
        let (c, _t) = h.client(nested_config(twin));
        let peer = common::VecPeer::new(RAM, RAM_SIZE as usize);
        c.dma_map(DmaMapRequest {
            range: DmaRange::new(RAM, RAM_SIZE).unwrap(),
            prot: Prot::from_bits(3).unwrap(),
            backing: DmaBacking::Peer(peer.clone()),
        })
        .unwrap();
        let mem = PeerMem(peer.clone());
        let mut t = Stage1Tables::new(ROOT, POOL, 0x8000).unwrap();
        t.map(&mem, IOVA, PAGE_RW, LEAF_RW).unwrap();
        tables::write_words(&mem, CD, &tables::cd(t.root(), ASID, true)).unwrap();
        let ste = tables::ste_stage1(CD);
        c.iommu_bind(VSID, ste[0], ste[1]).unwrap();
        let faults = c.take_iommu_faults().unwrap();
        let ops = *peer.ops.lock().unwrap();
        c.region_write(0, 0x100, b"by message").unwrap();
        assert_eq!(device_dma(&c, IOVA + 0x20, 10, 0x100, 2), 0, "twin {twin}");
        let mut b = [0u8; 10];
        mem.read(PAGE_RW + 0x20, &mut b).unwrap();
        assert_eq!(&b, b"by message");
        assert!(
            *peer.ops.lock().unwrap() >= ops + 5,
            "CD, four table levels and the data went by message"
        );
        assert_eq!(
            device_dma(&c, IOVA + 0x5000, 4, 0x100, 1),
            libc::EFAULT as u64
        );
        let (_, ev) = next_fault(&faults);
        assert_eq!(
            (ev.code, ev.sid, ev.input_addr),
            (code::F_TRANSLATION, VSID, IOVA + 0x5000)
        );
    }
}

/// The benchmark runs (its DMAs succeed through stage 1) and prints its ratios; no
/// time is asserted.
#[test]
fn nested_benchmark_runs() {
    let r = nestio_vfio_user::bench::nested_dma(90).unwrap();
    assert!(r.dma_ipa_ns > 0.0 && r.dma_stage1_ns > 0.0 && r.invalidate_dma_ns > 0.0);
    println!("{r}");
}
