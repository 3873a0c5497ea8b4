//! Error paths of the wrappers, without a device (this host has no spare PCI device;
//! the in-guest test drives a real one).

use super::*;

fn words_with(bytes: &[(usize, &[u8])], len: usize) -> Vec<u64> {
    let mut w = vec![0u64; len.div_ceil(8)];
    for (off, b) in bytes {
        // SAFETY: test helper; offsets are chosen inside `len`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b.as_ptr(),
                (w.as_mut_ptr() as *mut u8).add(*off),
                b.len(),
            )
        };
    }
    w
}

fn cap(id: u16, next: u32) -> Vec<u8> {
    let mut v = id.to_ne_bytes().to_vec();
    v.extend(1u16.to_ne_bytes());
    v.extend(next.to_ne_bytes());
    v
}

fn sparse_cap(next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
    let mut v = cap(vb::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16, next);
    v.extend((areas.len() as u32).to_ne_bytes());
    v.extend(0u32.to_ne_bytes());
    for (o, s) in areas {
        v.extend(o.to_ne_bytes());
        v.extend(s.to_ne_bytes());
    }
    v
}

#[test]
fn sparse_areas_are_parsed() {
    let c = sparse_cap(0, &[(0, 0x1000), (0x3000, 0x1000)]);
    let w = words_with(&[(32, &c)], 128);
    let a = parse_sparse(&w, 32, 0x4000)
        .expect("valid chain")
        .expect("sparse cap");
    assert_eq!(
        a,
        vec![
            SparseArea {
                offset: 0,
                size: 0x1000
            },
            SparseArea {
                offset: 0x3000,
                size: 0x1000
            }
        ]
    );
}

#[test]
fn sparse_chain_skips_other_caps() {
    let other = cap(99, 48);
    let c = sparse_cap(0, &[(0x1000, 0x1000)]);
    let w = words_with(&[(32, &other), (48, &c)], 128);
    assert_eq!(parse_sparse(&w, 32, 0x2000).unwrap().unwrap().len(), 1);
}

#[test]
fn malformed_chains_are_rejected() {
    // Area beyond the region.
    let c = sparse_cap(0, &[(0x1000, 0x2000)]);
    assert!(parse_sparse(&words_with(&[(32, &c)], 128), 32, 0x2000).is_none());
    // Area that wraps.
    let c = sparse_cap(0, &[(u64::MAX, 2)]);
    assert!(parse_sparse(&words_with(&[(32, &c)], 128), 32, u64::MAX).is_none());
    // A loop (next points backwards).
    let c = cap(99, 32);
    assert!(parse_sparse(&words_with(&[(32, &c)], 64), 32, 0x1000).is_none());
    // Header outside the buffer.
    assert!(parse_sparse(&[0u64; 4], 30, 0x1000).is_none());
    // More areas announced than the buffer holds.
    let mut c = sparse_cap(0, &[(0, 0x1000)]);
    c[8..12].copy_from_slice(&3u32.to_ne_bytes());
    assert!(parse_sparse(&words_with(&[(32, &c)], 64), 32, 0x10000).is_none());
    // An absurd area count.
    c[8..12].copy_from_slice(&100_000u32.to_ne_bytes());
    assert!(parse_sparse(&words_with(&[(32, &c)], 64), 32, 0x10000).is_none());
}

#[test]
fn no_chain_means_no_areas() {
    assert_eq!(parse_sparse(&[0u64; 4], 0, 0x1000), Some(None));
    // A sparse cap with zero areas is "nothing mappable", distinct from no cap.
    let c = sparse_cap(0, &[]);
    assert_eq!(
        parse_sparse(&words_with(&[(32, &c)], 64), 32, 0x1000),
        Some(Some(vec![]))
    );
}

#[test]
fn from_words_checks_bounds() {
    let w = vec![0u64; 2];
    assert!(from_words::<u64>(&w, 8).is_some());
    assert!(from_words::<u64>(&w, 9).is_none());
    assert!(from_words::<u64>(&w, usize::MAX).is_none());
}

#[test]
fn ioctl_on_a_non_vfio_file_reports_the_errno() {
    let f = File::open("/dev/null").unwrap();
    let e = ioctl_val(&f, "VFIO_GET_API_VERSION", ioctl::GET_API_VERSION, 0).unwrap_err();
    assert_eq!(e.errno(), libc::ENOTTY, "{e}");
    assert!(e.to_string().contains("VFIO_GET_API_VERSION"));
    let e = ioctl::group_get_device_fd(&f, "0000:00:01.0").unwrap_err();
    assert_eq!(e.errno(), libc::ENOTTY);
}

#[test]
fn a_name_with_nul_is_einval() {
    let f = File::open("/dev/null").unwrap();
    let e = ioctl::group_get_device_fd(&f, "0000\0:00").unwrap_err();
    assert!(matches!(e, IoctlError::BadName(_)));
    assert_eq!(e.errno(), libc::EINVAL);
}

#[test]
fn a_missing_group_is_a_clear_open_error() {
    let r = KernelVfioDevice::open_group(Path::new("/nonexistent/vfio/42"), "0000:00:01.0");
    match r {
        Err(KernelVfioError::Open { path, .. }) => {
            // Either the container or the group path is named.
            assert!(
                path == "/dev/vfio/vfio" || path == "/nonexistent/vfio/42",
                "{path}"
            );
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a nonexistent group"),
    }
}

#[test]
fn ioctl_numbers_match_linux() {
    // _IO(';', 100 + n) from linux/vfio.h.
    assert_eq!(ioctl::GET_API_VERSION, 0x3b64);
    assert_eq!(ioctl::GROUP_GET_DEVICE_FD, 0x3b6a);
    assert_eq!(ioctl::DEVICE_SET_IRQS, 0x3b6e);
    assert_eq!(ioctl::IOMMU_UNMAP_DMA, 0x3b72);
}

#[test]
fn no_fd_leaks_on_failed_open() {
    let count = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = count();
    for _ in 0..20 {
        let _ = KernelVfioDevice::open_group(Path::new("/dev/null"), "0000:00:01.0");
    }
    assert_eq!(count(), before);
}

mod dma_maps {
    use super::*;

    #[test]
    fn overlaps_are_eexist_and_neighbours_fit() {
        let mut m = DmaMaps::new();
        m.check_insert(0x10000, 0x2000).unwrap();
        m.insert(0x10000, 0x2000, ());
        for (iova, len) in [
            (0x10000, 0x1000),
            (0xF000, 0x2000),
            (0x11000, 0x1000),
            (0x11FFF, 1),
            (0x0, u64::MAX),
        ] {
            let e = m.check_insert(iova, len).unwrap_err();
            assert!(
                matches!(e, DmaError::Overlap { .. }),
                "{iova:#x}+{len:#x}: {e}"
            );
            assert_eq!(e.errno(), libc::EEXIST);
        }
        m.check_insert(0xF000, 0x1000).unwrap();
        m.check_insert(0x12000, 0x1000).unwrap();
    }

    #[test]
    fn hostile_ranges_are_refused_without_overflow() {
        let mut m = DmaMaps::new();
        // A map at the very top of the address space: its end does not fit in u64.
        m.check_insert(u64::MAX - 0xFFF, 0x1000).unwrap();
        m.insert(u64::MAX - 0xFFF, 0x1000, ());
        assert_eq!(
            m.check_insert(u64::MAX - 0xFFF, 0x1000)
                .unwrap_err()
                .errno(),
            libc::EEXIST
        );
        m.check_insert(u64::MAX - 0x1FFF, 0x1000).unwrap();
        // Wrapping and empty ranges.
        let e = m.check_insert(u64::MAX - 0xFFF, 0x2000).unwrap_err();
        assert!(matches!(e, DmaError::Overflow { .. }), "{e}");
        assert_eq!(m.check_insert(0x1000, 0).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn unmap_must_name_a_whole_map() {
        let mut m = DmaMaps::new();
        m.insert(0x10000, 0x2000, 7u8);
        for (iova, size) in [(0x10000, 0x1000), (0x11000, 0x1000), (0x20000, 0x2000)] {
            let e = m.check_exact(iova, size).unwrap_err();
            assert_eq!(e.errno(), libc::ENOENT, "{e}");
        }
        m.check_exact(0x10000, 0x2000).unwrap();
        assert_eq!(m.remove(0x10000), Some(7));
        assert!(m.ranges().is_empty());
    }

    #[test]
    fn the_number_of_maps_is_bounded() {
        let mut m = DmaMaps::new();
        for i in 0..MAX_DMA_MAPS as u64 {
            m.insert(i * 0x1000, 0x1000, ());
        }
        let e = m
            .check_insert(MAX_DMA_MAPS as u64 * 0x1000, 0x1000)
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    }
}

mod noiommu_maps {
    use super::*;
    use crate::noiommu::{
        check_identity, contiguous_runs, pin_for_noiommu, LockedMapping, NoIommuError, Run,
        PAGE_SIZE,
    };
    use nestio_dma::{DmaPeer, DmaRange, Prot};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// Locking tests look at this process's VmLck: one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn memfd(pages: u64) -> Arc<OwnedFd> {
        Arc::new(nestio_dma::memfd::sealed_memfd(c"noiommu-test", pages * PAGE_SIZE).unwrap())
    }

    fn req(iova: u64, len: u64, fd: &Arc<OwnedFd>, offset: u64) -> DmaMapRequest {
        DmaMapRequest {
            range: DmaRange::new(iova, len).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: fd.clone(),
                offset,
            },
        }
    }

    fn vm_locked_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmLck in /proc/self/status")
    }

    /// The physical addresses of `fd`'s pages, or None (and SKIP) when this process may
    /// not see them (not root). Under CI the tests run as root and must see them.
    fn physical(fd: &Arc<OwnedFd>, pages: u64, test: &str) -> Option<(LockedMapping, Vec<u64>)> {
        let m = LockedMapping::new(fd.as_fd(), 0, pages * PAGE_SIZE).unwrap();
        match m.physical_addresses() {
            Ok(pas) => Some((m, pas)),
            Err(NoIommuError::Hidden) => {
                // SAFETY: getuid has no preconditions.
                let uid = unsafe { libc::getuid() };
                assert!(
                    uid != 0 || std::env::var("CI").as_deref() != Ok("true"),
                    "{test}: root cannot read frame numbers from /proc/self/pagemap"
                );
                eprintln!("SKIP: {test}: /proc/self/pagemap hides physical addresses (not root)");
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    #[test]
    fn runs_split_where_pages_are_not_consecutive() {
        let p = PAGE_SIZE;
        assert_eq!(
            contiguous_runs(&[10 * p, 11 * p, 12 * p, 3 * p, 20 * p, 21 * p]),
            vec![
                Run {
                    first: 0,
                    pa: 10 * p,
                    pages: 3
                },
                Run {
                    first: 3,
                    pa: 3 * p,
                    pages: 1
                },
                Run {
                    first: 4,
                    pa: 20 * p,
                    pages: 2
                },
            ]
        );
        assert!(contiguous_runs(&[]).is_empty());
        // A page at the top of the address space ends a run without overflowing.
        assert_eq!(contiguous_runs(&[u64::MAX - p + 1, 0]).len(), 2);
    }

    #[test]
    fn identity_check_names_the_first_wrong_page() {
        let p = PAGE_SIZE;
        check_identity(0x100000, &[0x100000, 0x100000 + p]).unwrap();
        let e = check_identity(0x100000, &[0x100000, 0x300000]).unwrap_err();
        match &e {
            NoIommuError::Mismatch {
                index, pa, want, ..
            } => {
                assert_eq!((*index, *pa, *want), (1, 0x300000, 0x100000 + p));
            }
            other => panic!("{other}"),
        }
        assert_eq!(e.errno(), libc::EPERM);
        assert!(e.to_string().contains("physical address 0x300000"), "{e}");
        // An IOVA whose later pages would wrap is refused, not overflowed.
        assert!(check_identity(u64::MAX - p + 1, &[u64::MAX - p + 1, 0]).is_err());
    }

    #[test]
    fn a_map_at_its_physical_address_is_accepted_and_stays_locked() {
        let name = "a_map_at_its_physical_address_is_accepted_and_stays_locked";
        let _s = SERIAL.lock();
        let fd = memfd(4);
        let Some((mine, pas)) = physical(&fd, 4, name) else {
            return;
        };
        // Page 2 on its own, at its physical address.
        let locked = pin_for_noiommu(&req(pas[2], PAGE_SIZE, &fd, 2 * PAGE_SIZE)).unwrap();
        assert_eq!(locked.physical_addresses().unwrap(), vec![pas[2]]);
        // Every physically contiguous run, as a client maps them.
        let runs = contiguous_runs(&pas);
        let all: Vec<_> = runs
            .iter()
            .map(|r| {
                pin_for_noiommu(&req(
                    r.pa,
                    r.pages as u64 * PAGE_SIZE,
                    &fd,
                    r.first as u64 * PAGE_SIZE,
                ))
                .unwrap()
            })
            .collect();
        drop(mine);
        // Our own lock is gone; the accepted maps keep the pages locked.
        let with_maps = vm_locked_kib();
        assert!(
            with_maps >= 4 * PAGE_SIZE / 1024 + 4,
            "VmLck {with_maps} kB"
        );
        drop(all);
        drop(locked);
        assert_eq!(vm_locked_kib(), with_maps - (4 + 1) * PAGE_SIZE / 1024);
    }

    #[test]
    fn a_map_whose_iova_is_not_its_physical_address_is_einval() {
        let name = "a_map_whose_iova_is_not_its_physical_address_is_einval";
        let _s = SERIAL.lock();
        let fd = memfd(4);
        let Some((_mine, pas)) = physical(&fd, 4, name) else {
            return;
        };
        let before = vm_locked_kib();
        // The IOVA a client with an IOMMU in mind would use.
        for (iova, off) in [(0x10_0000, 0), (pas[0] + PAGE_SIZE, 0), (pas[1], 0)] {
            if iova == pas[0] {
                continue;
            }
            let e = pin_for_noiommu(&req(iova, PAGE_SIZE, &fd, off)).unwrap_err();
            assert!(matches!(e, NoIommuError::Mismatch { .. }), "{e}");
            assert_eq!(e.errno(), libc::EPERM);
        }
        // Two pages mapped as one run where they are not consecutive.
        if pas[1] != pas[0] + PAGE_SIZE {
            let e = pin_for_noiommu(&req(pas[0], 2 * PAGE_SIZE, &fd, 0)).unwrap_err();
            match e {
                NoIommuError::Mismatch { index, .. } => assert_eq!(index, 1),
                other => panic!("{other}"),
            }
        }
        // A refused map leaves nothing locked behind.
        assert_eq!(vm_locked_kib(), before);
    }

    #[test]
    fn pages_the_client_never_touched_are_refused_without_allocating_them() {
        let _s = SERIAL.lock();
        // A sparse 1 GiB memfd: nothing in memory, so no physical address to check.
        let fd = memfd(1 << 18);
        let before = vm_locked_kib();
        let e = pin_for_noiommu(&req(0x4000_0000, 1 << 30, &fd, 0)).unwrap_err();
        assert!(matches!(e, NoIommuError::NotResident { index: 0 }), "{e}");
        assert_eq!(e.errno(), libc::EPERM);
        // Nothing was populated or left locked on the client's behalf.
        // SAFETY: fstat fills a plain-data struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on our own descriptor.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        assert_eq!(st.st_blocks, 0, "the server allocated the client's pages");
        assert_eq!(vm_locked_kib(), before);
        // One page touched, the next not: the refusal names the first missing page.
        // SAFETY: writes one byte from a local array to our own descriptor.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1, 0) };
        assert_eq!(n, 1);
        let e = pin_for_noiommu(&req(0x4000_0000, 2 * PAGE_SIZE, &fd, 0)).unwrap_err();
        assert!(matches!(e, NoIommuError::NotResident { index: 1 }), "{e}");
        assert_eq!(vm_locked_kib(), before);
    }

    struct NoPeer;
    impl DmaPeer for NoPeer {
        fn dma_read(&self, _: u64, _: &mut [u8]) -> std::result::Result<(), i32> {
            Err(libc::EIO)
        }
        fn dma_write(&self, _: u64, _: &[u8]) -> std::result::Result<(), i32> {
            Err(libc::EIO)
        }
    }

    #[test]
    fn hostile_noiommu_maps_are_refused() {
        let fd = memfd(2);
        let p = PAGE_SIZE;
        let errno = |r: DmaMapRequest| pin_for_noiommu(&r).unwrap_err();
        // Unaligned IOVA, size and offset.
        for r in [
            req(0x1001, p, &fd, 0),
            req(0x1000, 0x800, &fd, 0),
            req(0x1000, p, &fd, 8),
        ] {
            let e = errno(r);
            assert!(matches!(e, NoIommuError::Unaligned { .. }), "{e}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        // Beyond the file, and so large it could not be mapped (no allocation made).
        for (len, off) in [(3 * p, 0), (p, 2 * p), (1 << 62, 0), (p, u64::MAX - p + 1)] {
            let e = errno(req(0x1000, len, &fd, off));
            assert!(matches!(e, NoIommuError::File(_)), "{len:#x}@{off:#x}: {e}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        // A range that wraps never becomes a request.
        assert!(DmaRange::new(u64::MAX - p + 1, 2 * p).is_err());
        // No fd: the device cannot DMA by message.
        let e = errno(DmaMapRequest {
            range: DmaRange::new(0x1000, p).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Peer(Arc::new(NoPeer)),
        });
        assert!(matches!(e, NoIommuError::NoFd), "{e}");
        // An unsealed memfd may shrink under the device.
        // SAFETY: memfd_create with a static name; checked below.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let unsealed = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        // SAFETY: ftruncate on our own descriptor.
        assert_eq!(unsafe { libc::ftruncate(raw, 2 * p as libc::off_t) }, 0);
        let e = errno(req(0x1000, p, &unsealed, 0));
        assert!(matches!(e, NoIommuError::File(_)), "{e}");
        // An eventfd is no memory at all; an O_PATH descriptor grants no access.
        // SAFETY: eventfd has no pointer arguments; checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        assert_eq!(errno(req(0x1000, p, &efd, 0)).errno(), libc::EINVAL);
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let cpath = std::ffi::CString::new(path).unwrap();
        // SAFETY: a NUL-terminated path; checked below.
        let opath = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        assert!(opath >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let opath = Arc::new(unsafe { OwnedFd::from_raw_fd(opath) });
        assert_eq!(errno(req(0x1000, p, &opath, 0)).errno(), libc::EBADF);
    }
}
