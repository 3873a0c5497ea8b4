//! Thin safe wrappers over the VFIO container / group / device ioctls.
//!
//! rust-vmm's `vfio-ioctls` was considered and not used: it pulls in KVM by default,
//! its region accessors swallow errors (a failed pread is logged, not returned), and it
//! owns the eventfds it signals, while nestio has to pass a peer's fds straight through
//! and answer every failure with the errno the kernel gave. The structs come from
//! `vfio-bindings`; every ioctl here is `_IO(VFIO_TYPE, VFIO_BASE + n)` (VFIO encodes no
//! size or direction in its request numbers; `argsz` carries the size instead).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vfio_bindings::bindings::vfio as vb;

/// Errors of one VFIO ioctl.
#[derive(Debug, thiserror::Error)]
pub enum IoctlError {
    /// The kernel refused the ioctl.
    #[error("VFIO ioctl {name} failed: {source} (check the device is bound to vfio-pci and the group is viable)")]
    Os {
        /// The ioctl.
        name: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A name contained a NUL byte.
    #[error("device name {0:?} contains a NUL byte: pass a PCI address such as 0000:00:01.0")]
    BadName(String),
}

impl IoctlError {
    /// The errno to answer a peer with.
    pub fn errno(&self) -> i32 {
        match self {
            IoctlError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            IoctlError::BadName(_) => libc::EINVAL,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, IoctlError>;

const fn req(n: u32) -> libc::c_ulong {
    ((vb::VFIO_TYPE as libc::c_ulong) << 8) | (vb::VFIO_BASE + n) as libc::c_ulong
}

/// VFIO_GET_API_VERSION.
pub const GET_API_VERSION: libc::c_ulong = req(0);
/// VFIO_CHECK_EXTENSION.
pub const CHECK_EXTENSION: libc::c_ulong = req(1);
/// VFIO_SET_IOMMU.
pub const SET_IOMMU: libc::c_ulong = req(2);
/// VFIO_GROUP_GET_STATUS.
pub const GROUP_GET_STATUS: libc::c_ulong = req(3);
/// VFIO_GROUP_SET_CONTAINER.
pub const GROUP_SET_CONTAINER: libc::c_ulong = req(4);
/// VFIO_GROUP_GET_DEVICE_FD.
pub const GROUP_GET_DEVICE_FD: libc::c_ulong = req(6);
/// VFIO_DEVICE_GET_INFO.
pub const DEVICE_GET_INFO: libc::c_ulong = req(7);
/// VFIO_DEVICE_GET_REGION_INFO.
pub const DEVICE_GET_REGION_INFO: libc::c_ulong = req(8);
/// VFIO_DEVICE_GET_IRQ_INFO.
pub const DEVICE_GET_IRQ_INFO: libc::c_ulong = req(9);
/// VFIO_DEVICE_SET_IRQS.
pub const DEVICE_SET_IRQS: libc::c_ulong = req(10);
/// VFIO_DEVICE_RESET.
pub const DEVICE_RESET: libc::c_ulong = req(11);
/// VFIO_IOMMU_MAP_DMA.
pub const IOMMU_MAP_DMA: libc::c_ulong = req(13);
/// VFIO_IOMMU_UNMAP_DMA.
pub const IOMMU_UNMAP_DMA: libc::c_ulong = req(14);

fn check(name: &'static str, r: libc::c_int) -> Result<libc::c_int> {
    if r < 0 {
        Err(IoctlError::Os {
            name,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

/// An ioctl whose argument is a plain integer.
pub fn ioctl_val(
    f: &File,
    name: &'static str,
    request: libc::c_ulong,
    arg: libc::c_ulong,
) -> Result<libc::c_int> {
    // SAFETY: `f` is an open file; the request takes an integer argument (or none), so the
    // kernel reads no memory of ours.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), request, arg) };
    check(name, r)
}

/// An ioctl whose argument is a buffer the kernel reads and may write, of `buf.len()`
/// bytes; the caller has put the matching `argsz` in the buffer's first u32.
pub fn ioctl_buf(
    f: &File,
    name: &'static str,
    request: libc::c_ulong,
    buf: &mut [u64],
) -> Result<libc::c_int> {
    // SAFETY: `buf` is a live, writable, 8-byte-aligned buffer; every VFIO request reads
    // and writes at most `argsz` bytes, which callers set to at most the buffer's size.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), request, buf.as_mut_ptr()) };
    check(name, r)
}

/// VFIO_GROUP_GET_DEVICE_FD: the device fd of `name` (a PCI address) in `group`.
pub fn group_get_device_fd(group: &File, name: &str) -> Result<File> {
    let c = std::ffi::CString::new(name).map_err(|_| IoctlError::BadName(name.to_string()))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call; the kernel only reads it.
    let r = unsafe { libc::ioctl(group.as_raw_fd(), GROUP_GET_DEVICE_FD, c.as_ptr()) };
    let fd = check("VFIO_GROUP_GET_DEVICE_FD", r)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// VFIO_GROUP_SET_CONTAINER.
pub fn group_set_container(group: &File, container: &File) -> Result<()> {
    let fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one int through the pointer, which points at `fd` for the call.
    let r = unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            GROUP_SET_CONTAINER,
            &fd as *const libc::c_int,
        )
    };
    check("VFIO_GROUP_SET_CONTAINER", r).map(|_| ())
}

/// The bytes of a bindings struct as the start of an aligned u64 buffer of at least
/// `total` bytes (the rest zero).
pub fn to_words<T>(v: &T, total: usize) -> Vec<u64> {
    let n = std::mem::size_of::<T>();
    let mut w = vec![0u64; n.max(total).div_ceil(8)];
    // SAFETY: `v` is a live T of `n` bytes (a plain-data bindings struct, no padding read
    // matters to the kernel); `w` has at least `n` bytes; the two do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(v as *const T as *const u8, w.as_mut_ptr() as *mut u8, n)
    };
    w
}

/// Read a bindings struct at byte `off` of a word buffer; None if it does not fit.
pub fn from_words<T: Copy>(w: &[u64], off: usize) -> Option<T> {
    let end = off.checked_add(std::mem::size_of::<T>())?;
    if end > w.len() * 8 {
        return None;
    }
    // SAFETY: bounds checked above; T is a plain-data bindings struct for which every bit
    // pattern is valid; read_unaligned has no alignment requirement.
    Some(unsafe { std::ptr::read_unaligned((w.as_ptr() as *const u8).add(off) as *const T) })
}

/// The argsz of a struct type, as VFIO wants it.
pub fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// VFIO_GROUP_GET_STATUS flags.
pub fn group_status(group: &File) -> Result<u32> {
    let st = vb::vfio_group_status {
        argsz: argsz::<vb::vfio_group_status>(),
        flags: 0,
    };
    let mut w = to_words(&st, 0);
    ioctl_buf(group, "VFIO_GROUP_GET_STATUS", GROUP_GET_STATUS, &mut w)?;
    Ok(from_words::<vb::vfio_group_status>(&w, 0)
        .map(|s| s.flags)
        .unwrap_or(0))
}
