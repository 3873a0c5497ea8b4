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
