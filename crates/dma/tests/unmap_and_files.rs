//! Unmap of ranges (whole mappings, type1 v2 style, and splitting), shared backings, and
//! the checks on the file a DMA_MAP sends (`O_PATH`, access modes, no widening reopen).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::{Arc, Mutex};

use nestio_dma::memfd::sealed_memfd;
use nestio_dma::{
    DmaBacking, DmaError, DmaMapRequest, DmaPeer, DmaRange, DmaSpace, DmaSpaceExt, MapTable, Prot,
};

const PAGE: u64 = 4096;

fn memfd(size: u64) -> Arc<OwnedFd> {
    Arc::new(sealed_memfd(c"unmap-test", size).unwrap())
}

fn range(iova: u64, size: u64) -> DmaRange {
    DmaRange::new(iova, size).unwrap()
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
        range: range(iova, size),
        prot,
        backing: DmaBacking::Fd {
            fd: fd.clone(),
            offset: off,
        },
    })
}

fn pread(fd: &OwnedFd, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::from(fd.try_clone().unwrap());
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

fn starts(t: &MapTable) -> Vec<(u64, u64)> {
    t.mappings()
        .iter()
        .map(|m| (m.range.start(), m.range.len()))
        .collect()
}

#[test]
fn unmap_covered_takes_whole_mappings_and_refuses_to_bisect() {
    let fd = memfd(16 * PAGE);
    let t = MapTable::default();
    for i in 0..4 {
        map_fd(&t, 0x10000 + i * PAGE, PAGE, Prot::RW, &fd, i * PAGE).unwrap();
    }
    map_fd(&t, 0x20000, 4 * PAGE, Prot::RW, &fd, 8 * PAGE).unwrap();
    // Cutting the 4-page mapping at either end is refused, and nothing goes.
    for r in [range(0x10000, 0x11000), range(0x21000, PAGE)] {
        let e = t.unmap_covered(r).unwrap_err();
        assert!(
            matches!(
                e,
                DmaError::Bisect {
                    map_iova: 0x20000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
    }
    assert_eq!(t.len(), 5);
    // A range holding the four one-page mappings (and a hole) takes exactly them.
    assert_eq!(t.unmap_covered(range(0xf000, 0x8000)).unwrap(), 4 * PAGE);
    assert_eq!(starts(&t), vec![(0x20000, 4 * PAGE)]);
    // Nothing there: success, nothing unmapped (as type1 reports size 0).
    assert_eq!(t.unmap_covered(range(0, 0x10000)).unwrap(), 0);
    assert_eq!(t.unmap_covered(range(0x20000, 4 * PAGE)).unwrap(), 4 * PAGE);
    assert!(t.is_empty());
    assert_eq!(t.file_backings(), 0);
}

#[test]
fn exact_unmap_still_refuses_sub_ranges() {
    let fd = memfd(4 * PAGE);
    let t = MapTable::default();
    map_fd(&t, 0x10000, 4 * PAGE, Prot::RW, &fd, 0).unwrap();
    assert_eq!(t.unmap(0x10000, PAGE).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(t.unmap(0x11000, PAGE).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(t.len(), 1);
}

#[test]
fn unmap_split_keeps_the_pieces_with_their_file_offsets() {
    let fd = memfd(16 * PAGE);
    let t = MapTable::default();
    // IOVA 0x10000..0x14000 -> file 0x3000..0x7000.
    map_fd(&t, 0x10000, 4 * PAGE, Prot::RW, &fd, 3 * PAGE).unwrap();
    // Punch out the second page.
    assert_eq!(t.unmap_split(range(0x11000, PAGE)).unwrap(), PAGE);
    assert_eq!(
        starts(&t),
        vec![(0x10000, PAGE), (0x12000, 2 * PAGE)],
        "the pieces before and after stay"
    );
    let offsets: Vec<u64> = t
        .mappings()
        .iter()
        .map(|m| match m.backing {
            DmaBacking::Fd { offset, .. } => offset,
            DmaBacking::Peer(_) => panic!("fd mapping listed as peer"),
        })
        .collect();
    assert_eq!(offsets, vec![3 * PAGE, 5 * PAGE]);
    // The hole faults; the pieces reach the same file bytes as before.
    assert!(matches!(
        t.read_u32(0x11000).unwrap_err(),
        DmaError::Unmapped { iova: 0x11000, .. }
    ));
    t.write_u32(0x10ffc, 0x1111_1111).unwrap();
    t.write_u32(0x12000, 0x2222_2222).unwrap();
    t.write_u32(0x13ffc, 0x3333_3333).unwrap();
    assert_eq!(pread(&fd, 0x3ffc, 4), 0x1111_1111u32.to_le_bytes());
    assert_eq!(pread(&fd, 0x5000, 4), 0x2222_2222u32.to_le_bytes());
    assert_eq!(pread(&fd, 0x6ffc, 4), 0x3333_3333u32.to_le_bytes());
    assert_eq!(
        pread(&fd, 0x4000, 4),
        [0; 4],
        "the punched page was not written"
    );
    // A range across the hole and into the second piece: only mapped bytes count.
    assert_eq!(t.unmap_split(range(0x10000, 3 * PAGE)).unwrap(), 2 * PAGE);
    assert_eq!(starts(&t), vec![(0x13000, PAGE)]);
    assert_eq!(t.read_u32(0x13ffc).unwrap(), 0x3333_3333);
    // The pieces share one backing; the last one going releases it.
    assert_eq!(t.file_backings(), 1);
    assert_eq!(t.unmap_split(range(0, 1 << 20)).unwrap(), PAGE);
    assert!(t.is_empty());
    assert_eq!(t.file_backings(), 0);
}

#[test]
fn unmap_split_checks_alignment_and_the_limit() {
    let fd = memfd(4 * PAGE);
    let t = MapTable::new(2);
    map_fd(&t, 0x10000, 4 * PAGE, Prot::RW, &fd, 0).unwrap();
    for r in [range(0x10800, PAGE), range(0x11000, 0x800)] {
        assert_eq!(t.unmap_split(r).unwrap_err().errno(), libc::EINVAL);
    }
    map_fd(&t, 0x20000, PAGE, Prot::RW, &fd, 0).unwrap();
    // Splitting the middle out would make three mappings: refused, nothing changed.
    let e = t.unmap_split(range(0x11000, PAGE)).unwrap_err();
    assert!(matches!(e, DmaError::TooManyMappings { limit: 2 }), "{e:?}");
    assert_eq!(starts(&t), vec![(0x10000, 4 * PAGE), (0x20000, PAGE)]);
    // Cutting an end keeps the count: allowed.
    assert_eq!(t.unmap_split(range(0x13000, PAGE)).unwrap(), PAGE);
    assert_eq!(starts(&t), vec![(0x10000, 3 * PAGE), (0x20000, PAGE)]);
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, usize)>>);

impl DmaPeer for Recorder {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.0.lock().unwrap().push((addr, buf.len()));
        Ok(())
    }
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32> {
        self.0.lock().unwrap().push((addr, data.len()));
        Ok(())
    }
}

#[test]
fn split_peer_mappings_keep_their_peer_addresses() {
    let peer = Arc::new(Recorder::default());
    let t = MapTable::default();
    t.map(DmaMapRequest {
        range: range(0x40000, 3 * PAGE),
        prot: Prot::RW,
        backing: DmaBacking::Peer(peer.clone()),
    })
    .unwrap();
    t.unmap_split(range(0x41000, PAGE)).unwrap();
    t.read_u32(0x40010).unwrap();
    t.write_u32(0x42020, 1).unwrap();
    assert!(t.read_u32(0x41000).is_err());
    assert_eq!(*peer.0.lock().unwrap(), vec![(0x40010, 4), (0x42020, 4)]);
}

/// A file that grew after its first mapping: later mappings past the old end get a new
/// backing, earlier ones keep theirs.
#[test]
fn a_grown_file_gets_a_larger_backing() {
    // SAFETY: memfd_create with a literal name; the result is checked.
    let raw = unsafe {
        libc::memfd_create(
            c"grows".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(raw) };
    file.set_len(2 * PAGE).unwrap();
    // SAFETY: fcntl on a descriptor we own.
    let sealed = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(sealed, 0);
    let fd = Arc::new(OwnedFd::from(file));
    let t = MapTable::default();
    map_fd(&t, 0, 2 * PAGE, Prot::RW, &fd, 0).unwrap();
    assert_eq!(
        map_fd(&t, 0x10000, PAGE, Prot::RW, &fd, 2 * PAGE)
            .unwrap_err()
            .errno(),
        libc::EINVAL,
        "past the end of the file"
    );
    std::fs::File::from(fd.try_clone().unwrap())
        .set_len(4 * PAGE)
        .unwrap();
    map_fd(&t, 0x10000, 2 * PAGE, Prot::RW, &fd, 2 * PAGE).unwrap();
    assert_eq!(t.file_backings(), 2);
    t.write_u32(0x1ffc, 7).unwrap();
    t.write_u32(0x11ffc, 9).unwrap();
    assert_eq!(pread(&fd, 0x1ffc, 4), 7u32.to_le_bytes());
    assert_eq!(pread(&fd, 0x3ffc, 4), 9u32.to_le_bytes());
    // Another mapping of the old range now shares the new, larger backing.
    map_fd(&t, 0x20000, PAGE, Prot::RW, &fd, 0).unwrap();
    assert_eq!(t.file_backings(), 2);
    t.write_u32(0x20010, 0xabcd).unwrap();
    assert_eq!(t.read_u32(0x10).unwrap(), 0xabcd, "same file bytes");
    t.unmap(0, 2 * PAGE).unwrap();
    assert_eq!(t.file_backings(), 1);
}

#[test]
fn mappings_of_one_file_share_a_backing_per_permission() {
    let fd = memfd(8 * PAGE);
    let other = memfd(PAGE);
    let t = MapTable::default();
    for i in 0..4 {
        // A fresh fd for each map, as a server receives it.
        let dup = Arc::new(fd.try_clone().unwrap());
        map_fd(&t, i * PAGE, PAGE, Prot::RW, &dup, i * PAGE).unwrap();
    }
    assert_eq!(t.file_backings(), 1);
    map_fd(&t, 0x10000, PAGE, Prot::READ, &fd, 0).unwrap();
    assert_eq!(
        t.file_backings(),
        2,
        "read-only mappings get a read-only mmap"
    );
    map_fd(&t, 0x20000, PAGE, Prot::RW, &other, 0).unwrap();
    assert_eq!(t.file_backings(), 3);
    // The listed fd of a mapping is the one the table keeps for its file.
    let maps = t.mappings();
    let raw: Vec<i32> = maps
        .iter()
        .map(|m| match &m.backing {
            DmaBacking::Fd { fd, .. } => fd.as_raw_fd(),
            DmaBacking::Peer(_) => -1,
        })
        .collect();
    assert!(raw[..4].iter().all(|r| *r == raw[0]));
    // A write through a read-only mapping of the same file is still refused.
    assert!(matches!(
        t.write_u32(0x10000, 1).unwrap_err(),
        DmaError::Permission { .. }
    ));
}

/// A regular file with permissions `mode` (000: only root may read it), holding a secret.
fn secret_file(tag: &str, mode: u32) -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("nestio-shadow-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.write_all_at(b"root:$6$secret-hash:19000:0:99999:7:::\n", 0)
        .unwrap();
    f.set_len(PAGE).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    (path, f)
}

/// Every fd of this process that refers to `file`, with its access mode.
fn fds_of(file: &std::fs::File) -> Vec<(i32, i32)> {
    let meta = file.metadata().unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(n) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(m) = std::fs::metadata(e.path()) else {
            continue;
        };
        if (m.dev(), m.ino()) != (meta.dev(), meta.ino()) || n == file.as_raw_fd() {
            continue;
        }
        // SAFETY: F_GETFL only reads the flags of a descriptor of this process (if it was
        // closed meanwhile, the call fails and is skipped).
        let fl = unsafe { libc::fcntl(n, libc::F_GETFL) };
        if fl >= 0 {
            out.push((n, fl & (libc::O_ACCMODE | libc::O_PATH)));
        }
    }
    out
}

/// The /etc/shadow attack of issue 10: a client that may not read a file sends an
/// `O_PATH` descriptor of it (which anyone with search permission on the directory can
/// open). That descriptor grants no access to the contents, so DMA_MAP must refuse it
/// (EBADF, as mmap and pread on it would) instead of reopening the file with the
/// server's rights.
#[test]
fn o_path_descriptor_gives_no_dma_access() {
    let (path, owner) = secret_file("opath", 0o000);
    let opath = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(&path)
        .unwrap();
    let opath = Arc::new(OwnedFd::from(opath));
    let t = MapTable::default();
    for prot in [Prot::READ, Prot::RW, Prot::NONE] {
        let e = map_fd(&t, 0x10000, PAGE, prot, &opath, 0).unwrap_err();
        assert_eq!(e.errno(), libc::EBADF, "{prot:?}: {e}");
        assert!(e.to_string().contains("O_PATH"), "{e}");
    }
    assert!(t.is_empty());
    assert!(t.read_u64(0x10000).is_err());
    // No descriptor of the file was opened on the sender's behalf.
    let left: Vec<_> = fds_of(&owner)
        .into_iter()
        .filter(|(n, _)| *n != opath.as_raw_fd())
        .collect();
    assert!(left.is_empty(), "server opened the secret file: {left:?}");
    // The same attack with a sealed memfd named through /proc: also refused.
    let mem = memfd(PAGE);
    let named = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(format!("/proc/self/fd/{}", mem.as_raw_fd()))
        .unwrap();
    let e = map_fd(&t, 0, PAGE, Prot::READ, &Arc::new(OwnedFd::from(named)), 0).unwrap_err();
    assert_eq!(e.errno(), libc::EBADF, "{e}");
    std::fs::remove_file(&path).unwrap();
}

/// A descriptor's access mode bounds the mapping, and the private reopen of a
/// pread/pwrite file is never wider than the descriptor the peer sent.
#[test]
fn access_mode_bounds_the_mapping_and_the_reopen() {
    let (path, owner) = secret_file("modes", 0o600);
    // A write-only descriptor cannot back a readable mapping: the peer could not read.
    let wo = std::fs::File::options().write(true).open(&path).unwrap();
    let wo = Arc::new(OwnedFd::from(wo));
    let t = MapTable::default();
    for prot in [Prot::READ, Prot::RW] {
        let e = map_fd(&t, 0, PAGE, prot, &wo, 0).unwrap_err();
        assert_eq!(e.errno(), libc::EACCES, "{prot:?}: {e}");
        assert!(e.to_string().contains("O_WRONLY"), "{e}");
    }
    // A read-only one backs a read-only mapping only, through a read-only reopen.
    let ro = Arc::new(OwnedFd::from(std::fs::File::open(&path).unwrap()));
    let e = map_fd(&t, 0, PAGE, Prot::RW, &ro, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    map_fd(&t, 0x10000, PAGE, Prot::READ, &ro, 0).unwrap();
    let mut got = [0u8; 5];
    t.read(0x10000, &mut got).unwrap();
    assert_eq!(&got, b"root:");
    assert!(t.write_u32(0x10000, 0).is_err());
    let held = fds_of(&owner);
    assert!(
        held.iter()
            .filter(|(n, _)| ![wo.as_raw_fd(), ro.as_raw_fd()].contains(n))
            .all(|(_, mode)| *mode == libc::O_RDONLY),
        "the table holds a descriptor wider than the peer's O_RDONLY: {held:?}"
    );
    assert!(
        held.len() > 2,
        "the table keeps a private descriptor: {held:?}"
    );
    drop(t);
    std::fs::remove_file(&path).unwrap();
}

/// Accesses racing map, split unmap and unmap: every access either completes against a
/// live mapping or faults; a backing is never unmapped under a copy (that would be a
/// SIGSEGV, not a test failure).
#[test]
fn accesses_race_split_unmaps_safely() {
    let fd = memfd(64 * PAGE);
    let t = Arc::new(MapTable::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|k| {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut ok = 0u64;
                let mut buf = vec![0u8; 3 * PAGE as usize];
                let mut i = k;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i = (i * 7 + 3) % 60;
                    if t.read(i * PAGE + 100, &mut buf).is_ok() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    for round in 0..300u64 {
        map_fd(&t, 0, 64 * PAGE, Prot::RW, &fd, 0).unwrap();
        let hole = (round % 60) * PAGE;
        t.unmap_split(range(hole, 2 * PAGE)).unwrap();
        t.unmap_split(range(0, 64 * PAGE)).unwrap();
        assert!(t.is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader survived");
    }
    assert_eq!(t.file_backings(), 0);
}

/// A sealed file too large to map whole (a 1 PiB sparse memfd: more than the address
/// space) is still usable: each mapping gets its own mmap of just its range.
#[test]
fn a_file_too_large_to_map_whole_is_mapped_per_mapping() {
    let fd = Arc::new(sealed_memfd(c"huge-sparse", 1 << 50).unwrap());
    let t = MapTable::default();
    let far = (1u64 << 49) + 123 * PAGE + 0x100; // not page-aligned in the file
    map_fd(&t, 0x10000, PAGE, Prot::RW, &fd, far).unwrap();
    map_fd(&t, 0x20000, PAGE, Prot::RW, &fd, far + PAGE).unwrap();
    assert_eq!(t.file_backings(), 2, "one private mmap per mapping");
    t.write_u64(0x10ff8, 0x0123_4567_89ab_cdef).unwrap();
    t.write_u64(0x20000, 42).unwrap();
    assert_eq!(
        pread(&fd, far + 0xff8, 8),
        0x0123_4567_89ab_cdefu64.to_le_bytes()
    );
    assert_eq!(pread(&fd, far + PAGE, 8), 42u64.to_le_bytes());
    t.unmap(0x10000, PAGE).unwrap();
    assert_eq!(t.read_u64(0x20000).unwrap(), 42);
    assert_eq!(t.file_backings(), 1);
}

/// Splitting a file's only mapping keeps its backing registered: a later map of the
/// same file shares it instead of mapping the file a second time.
#[test]
fn split_pieces_keep_the_backing_shared() {
    let fd = memfd(4 * PAGE);
    let t = MapTable::default();
    map_fd(&t, 0x10000, 4 * PAGE, Prot::RW, &fd, 0).unwrap();
    t.unmap_split(range(0x11000, PAGE)).unwrap();
    map_fd(&t, 0x40000, PAGE, Prot::RW, &fd, PAGE).unwrap();
    assert_eq!(t.file_backings(), 1);
    t.write_u32(0x40000, 0x77).unwrap();
    assert_eq!(pread(&fd, PAGE, 4), 0x77u32.to_le_bytes());
}
