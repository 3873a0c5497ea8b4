//! Behaviour of the DMA map table: mapping rules, in-place and peer copies, faults that
//! touch nothing, dirty logging.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nestio_dma::memfd::sealed_memfd;
use nestio_dma::{
    Access, DmaBacking, DmaError, DmaMapRequest, DmaPeer, DmaRange, DmaSpace, DmaSpaceExt,
    MapTable, Prot,
};

/// Guest-RAM-like memory: a memfd sealed against shrinking, mapped in place.
fn memfd(size: u64) -> Arc<OwnedFd> {
    Arc::new(sealed_memfd(c"dma-test", size).unwrap())
}

/// A memfd its owner may still truncate.
fn unsealed_memfd(size: u64) -> Arc<OwnedFd> {
    // SAFETY: memfd_create with a valid NUL-terminated name; result checked.
    let fd = unsafe { libc::memfd_create(c"dma-test-unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    f.set_len(size).unwrap();
    Arc::new(OwnedFd::from(f))
}

fn pread(fd: &OwnedFd, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone().unwrap());
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

fn map_fd(
    t: &MapTable,
    iova: u64,
    size: u64,
    prot: Prot,
    fd: &Arc<OwnedFd>,
    off: u64,
) -> Result<(), DmaError> {
    t.map(DmaMapRequest {
        range: DmaRange::new(iova, size).unwrap(),
        prot,
        backing: DmaBacking::Fd {
            fd: fd.clone(),
            offset: off,
        },
    })
}

#[test]
fn in_place_access_reaches_the_file() {
    let fd = memfd(0x4000);
    let t = MapTable::default();
    map_fd(&t, 0x10000, 0x2000, Prot::RW, &fd, 0x1000).unwrap();
    t.write_u32(0x10004, 0xdead_beef).unwrap();
    assert_eq!(pread(&fd, 0x1004, 4), 0xdead_beef_u32.to_le_bytes());
    assert_eq!(t.read_u32(0x10004).unwrap(), 0xdead_beef);
    assert_eq!(t.stats().in_place_bytes, 8);
    assert_eq!(t.stats().peer_bytes, 0);
}

/// A client that shrinks its (unsealed) file after DMA_MAP must not be able to kill the
/// device with SIGBUS: such a mapping is accessed with fault-tolerant copies (or by
/// pread/pwrite where those are not available), and the bytes past the new end of file
/// become a reported fault. (`tests/guarded.rs` checks both paths separately.)
#[test]
fn unsealed_file_shrunk_under_its_mapping_is_a_fault() {
    let fd = unsealed_memfd(0x4000);
    let t = MapTable::default();
    map_fd(&t, 0x10000, 0x3000, Prot::RW, &fd, 0x1000).unwrap();
    t.write_u32(0x10ffe, 0x1234_5678).unwrap(); // crosses a page boundary
    assert_eq!(pread(&fd, 0x1ffe, 4), 0x1234_5678_u32.to_le_bytes());
    assert_eq!(t.read_u32(0x10ffe).unwrap(), 0x1234_5678);
    let st = t.stats();
    assert_eq!((st.file_bytes, st.in_place_bytes), (8, 0));

    // The owner shrinks the file under the live mapping.
    std::fs::File::from(fd.try_clone().unwrap())
        .set_len(0x2000)
        .unwrap();
    let mut buf = [0u8; 16];
    let e = t.read(0x10ff8, &mut buf).unwrap_err(); // [0x1ff8, 0x2008) in the file
    assert!(
        matches!(
            e,
            DmaError::File {
                iova: 0x10ff8,
                len: 16,
                access: Access::Read,
                errno: 0
            }
        ),
        "{e:?}"
    );
    assert!(e.is_fault());
    assert_eq!(e.errno(), libc::EFAULT);
    let e = t.write_u32(0x10ffe, 0).unwrap_err();
    assert!(
        matches!(
            e,
            DmaError::File {
                access: Access::Write,
                errno: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(t.stats().faults, 2);
    assert_eq!(
        std::fs::File::from(fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .len(),
        0x2000
    );
    // What is still inside the file works as before: [0x1ffe, 0x2000) is its last word.
    assert_eq!(t.read_u16(0x10ffe).unwrap(), 0x5678);
}

/// Files that are not regular files cannot be used for DMA: a device, a socket or an
/// anonymous inode (an eventfd here; a KVM vCPU fd is another) has no size to check,
/// and mmapping one past what it backs raises SIGBUS.
#[test]
fn non_regular_files_are_refused() {
    let t = MapTable::default();
    // SAFETY: eventfd returns a new fd or -1 (checked).
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor owned by nobody else.
    let ev = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
    let e = map_fd(&t, 0, 0x10000, Prot::RW, &ev, 0).unwrap_err();
    assert!(matches!(e, DmaError::BadFile { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::EINVAL);
    let zero = Arc::new(OwnedFd::from(std::fs::File::open("/dev/zero").unwrap()));
    let e = map_fd(&t, 0, 0x1000, Prot::READ, &zero, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    assert!(t.is_empty());
}

/// The fd's access mode bounds the mapping's permissions, as mmap would.
#[test]
fn read_only_file_cannot_back_a_writable_mapping() {
    let fd = unsealed_memfd(0x2000);
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    let ro = Arc::new(OwnedFd::from(ro));
    let t = MapTable::default();
    let e = map_fd(&t, 0, 0x2000, Prot::RW, &ro, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    map_fd(&t, 0, 0x2000, Prot::READ, &ro, 0).unwrap();
    assert_eq!(t.read_u32(0x10).unwrap(), 0);
}

/// The sender keeps its own open file description: setting O_APPEND on it after
/// DMA_MAP must not turn the device's positioned writes into appends.
#[test]
fn sender_flags_do_not_reach_the_devices_writes() {
    let fd = unsealed_memfd(0x2000);
    let t = MapTable::default();
    map_fd(&t, 0x10000, 0x2000, Prot::RW, &fd, 0).unwrap();
    // SAFETY: F_SETFL on a descriptor we own.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_APPEND) };
    assert_eq!(r, 0);
    for i in 0..4u32 {
        t.write_u32(0x10000 + 4 * i as u64, 0xa0 + i).unwrap();
    }
    let f = std::fs::File::from(fd.try_clone().unwrap());
    assert_eq!(f.metadata().unwrap().len(), 0x2000, "nothing was appended");
    assert_eq!(pread(&fd, 8, 4), 0xa2u32.to_le_bytes());
    assert_eq!(t.read_u32(0x1000c).unwrap(), 0xa3);
}

#[test]
fn sealed_memfd_is_mapped_in_place() {
    let fd = memfd(0x2000);
    let t = MapTable::default();
    map_fd(&t, 0, 0x2000, Prot::RW, &fd, 0).unwrap();
    t.write_u64(0x1ffc - 4, u64::MAX).unwrap();
    let st = t.stats();
    assert_eq!((st.file_bytes, st.in_place_bytes), (0, 8));
}

#[test]
fn overlap_is_eexist_and_unmap_must_be_exact() {
    let fd = memfd(0x10000);
    let t = MapTable::default();
    map_fd(&t, 0x1000, 0x2000, Prot::RW, &fd, 0).unwrap();
    let e = map_fd(&t, 0x2000, 0x1000, Prot::RW, &fd, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    let e = map_fd(&t, 0, 0x1001, Prot::RW, &fd, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    map_fd(&t, 0x3000, 0x1000, Prot::RW, &fd, 0).unwrap(); // adjacent is fine
    assert_eq!(t.unmap(0x1000, 0x1000).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(t.unmap(0x5000, 0x1000).unwrap_err().errno(), libc::ENOENT);
    t.unmap(0x1000, 0x2000).unwrap();
    assert_eq!(t.len(), 1);
}

#[test]
fn mapping_past_end_of_file_is_refused() {
    let fd = memfd(0x1000);
    let t = MapTable::default();
    let e = map_fd(&t, 0, 0x2000, Prot::RW, &fd, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    let e = map_fd(&t, 0, 0x1000, Prot::RW, &fd, u64::MAX - 10).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(t.is_empty());
}

#[test]
fn faults_touch_nothing() {
    let fd = memfd(0x3000);
    let t = MapTable::default();
    map_fd(&t, 0x1000, 0x1000, Prot::RW, &fd, 0x1000).unwrap();
    // Straddles the end of the mapping: refused as a whole.
    let e = t.write(0x1ffc, &[0xAA; 8]).unwrap_err();
    assert_eq!(
        e,
        DmaError::Unmapped {
            iova: 0x2000,
            len: 4,
            access: Access::Write
        }
    );
    assert_eq!(
        pread(&fd, 0x1ffc, 4),
        vec![0; 4],
        "no partial write before the fault"
    );
    assert_eq!(
        pread(&fd, 0x2000, 0x1000),
        vec![0; 0x1000],
        "memory after the mapping untouched"
    );
    // Wraps the address space.
    assert!(matches!(
        t.read(u64::MAX - 1, &mut [0; 4]).unwrap_err(),
        DmaError::Overflow { .. }
    ));
    assert_eq!(t.stats().faults, 2);
}

#[test]
fn permissions_are_enforced() {
    let fd = memfd(0x2000);
    let t = MapTable::default();
    map_fd(&t, 0, 0x1000, Prot::READ, &fd, 0).unwrap();
    map_fd(&t, 0x1000, 0x1000, Prot::WRITE, &fd, 0x1000).unwrap();
    assert!(matches!(
        t.write(0x10, &[1]).unwrap_err(),
        DmaError::Permission { .. }
    ));
    assert!(matches!(
        t.read(0x1010, &mut [0]).unwrap_err(),
        DmaError::Permission { .. }
    ));
    t.read(0x10, &mut [0]).unwrap();
    t.write(0x1010, &[7]).unwrap();
    assert_eq!(pread(&fd, 0x1010, 1), vec![7]);
}

#[test]
fn access_spanning_adjacent_mappings() {
    let a = memfd(0x1000);
    let b = memfd(0x1000);
    let t = MapTable::default();
    map_fd(&t, 0, 0x1000, Prot::RW, &a, 0).unwrap();
    map_fd(&t, 0x1000, 0x1000, Prot::RW, &b, 0).unwrap();
    t.write(0xffe, &[1, 2, 3, 4]).unwrap();
    assert_eq!(pread(&a, 0xffe, 2), vec![1, 2]);
    assert_eq!(pread(&b, 0, 2), vec![3, 4]);
}

#[derive(Default)]
struct FakePeer {
    mem: Mutex<Vec<u8>>,
    ops: Mutex<Vec<(bool, u64, usize)>>,
}

impl DmaPeer for FakePeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.ops.lock().unwrap().push((false, addr, buf.len()));
        let m = self.mem.lock().unwrap();
        let s = usize::try_from(addr).map_err(|_| libc::EFAULT)?;
        let src = m.get(s..s + buf.len()).ok_or(libc::EFAULT)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32> {
        self.ops.lock().unwrap().push((true, addr, data.len()));
        let mut m = self.mem.lock().unwrap();
        let s = usize::try_from(addr).map_err(|_| libc::EFAULT)?;
        m.get_mut(s..s + data.len())
            .ok_or(libc::EFAULT)?
            .copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn peer_backed_mappings_copy_by_message() {
    let peer = Arc::new(FakePeer {
        mem: Mutex::new(vec![0; 0x2000]),
        ..Default::default()
    });
    let t = MapTable::default();
    t.map(DmaMapRequest {
        range: DmaRange::new(0x1000, 0x1000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Peer(peer.clone()),
    })
    .unwrap();
    t.write_u64(0x1008, 0x0102030405060708).unwrap();
    assert_eq!(t.read_u64(0x1008).unwrap(), 0x0102030405060708);
    assert_eq!(
        &peer.mem.lock().unwrap()[0x1008..0x1010],
        &0x0102030405060708u64.to_le_bytes()
    );
    assert_eq!(
        *peer.ops.lock().unwrap(),
        vec![(true, 0x1008, 8), (false, 0x1008, 8)]
    );
    let s = t.stats();
    assert_eq!((s.peer_bytes, s.peer_ops, s.in_place_bytes), (16, 2, 0));
    // A peer error is a fault with the peer's errno.
    let e = t.write(0x1ff8, &[0; 8]);
    assert!(e.is_ok());
    peer.mem.lock().unwrap().truncate(0x1000);
    let e = t.read(0x1800, &mut [0; 8]).unwrap_err();
    assert_eq!(e.errno(), libc::EFAULT);
}

#[test]
fn limit_on_number_of_mappings() {
    let fd = memfd(0x1000);
    let t = MapTable::new(2);
    map_fd(&t, 0, 0x1000, Prot::RW, &fd, 0).unwrap();
    map_fd(&t, 0x1000, 0x1000, Prot::RW, &fd, 0).unwrap();
    let e = map_fd(&t, 0x2000, 0x1000, Prot::RW, &fd, 0).unwrap_err();
    assert!(matches!(e, DmaError::TooManyMappings { limit: 2 }));
}

#[test]
fn dirty_logging_reports_and_clears() {
    let fd = memfd(0x10000);
    let t = MapTable::default();
    map_fd(&t, 0x100000, 0x10000, Prot::RW, &fd, 0).unwrap();
    let r = DmaRange::new(0x100000, 0x10000).unwrap();
    t.write(0x100000, &[1]).unwrap(); // before logging: not recorded
    t.start_logging(0x1000, &[r]).unwrap();
    assert!(t.start_logging(0x1000, &[r]).is_err(), "already on");
    t.write(0x101ffe, &[1; 4]).unwrap(); // pages 1 and 2
    t.write(0x10f000, &[1]).unwrap(); // page 15
    let bm = t.report_dirty(r, 0x1000).unwrap();
    assert_eq!(bm, vec![(1 << 1) | (1 << 2) | (1 << 15)]);
    assert_eq!(t.report_dirty(r, 0x1000).unwrap(), vec![0], "report clears");
    t.write(0x104000, &[1]).unwrap();
    // Coarser report granularity: 16 KiB pages -> page 1.
    assert_eq!(t.report_dirty(r, 0x4000).unwrap(), vec![1 << 1]);
    assert!(t
        .report_dirty(DmaRange::new(0x200000, 0x1000).unwrap(), 0x1000)
        .is_err());
    assert!(t.report_dirty(r, 0x800).is_err());
    t.stop_logging();
    assert!(t.report_dirty(r, 0x1000).is_err());
}
