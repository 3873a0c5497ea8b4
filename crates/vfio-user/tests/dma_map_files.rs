//! A hostile client's DMA_MAP fds (issue 10, finding 2): an `O_PATH` fd of a file the
//! server could read but the client could not (the `/etc/shadow` attack) is refused
//! over the wire with EBADF, and an fd's access mode bounds what the device may do.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::sync::Arc;

use common::*;
use nestio_device::VfioDevice;
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_vfio_user::{ClientConfig, ServerConfig};

const SECRET: &[u8] = b"root:$6$not-for-the-client:19000:0:99999:7:::\n";

/// A page-sized file with permissions `mode` (000: only root may read it), holding a
/// secret.
fn secret_file(tag: &str, mode: u32) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("nestio-vu-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.write_all_at(SECRET, 0).unwrap();
    f.set_len(0x1000).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn map(c: &dyn VfioDevice, fd: OwnedFd, prot: Prot) -> nestio_device::Result<()> {
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x10_0000, 0x1000).unwrap(),
        prot,
        backing: DmaBacking::Fd {
            fd: Arc::new(fd),
            offset: 0,
        },
    })
}

#[test]
fn o_path_fd_of_an_unreadable_file_is_refused_over_the_wire() {
    let path = secret_file("opath", 0o000);
    let h = Harness::new(ServerConfig::default());
    let (c, t) = h.client(ClientConfig::default());
    for prot in [Prot::READ, Prot::RW] {
        let opath = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path)
            .unwrap();
        let e = map(&c, opath.into(), prot).unwrap_err();
        assert_eq!(e.errno(), libc::EBADF, "{prot:?}: {e}");
    }
    let table = h.dev.dma_table().unwrap();
    assert!(table.is_empty(), "nothing was mapped");
    // The device cannot DMA from there: copy guest memory at the IOVA into region 0.
    assert_eq!(device_dma(&c, 0x10_0000, 16, 0, 1), libc::EFAULT as u64);
    drop(c);
    t.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn access_mode_of_the_fd_bounds_the_device() {
    let path = secret_file("modes", 0o600);
    let h = Harness::new(ServerConfig::default());
    let (c, t) = h.client(ClientConfig::default());
    // Read-only fd, writable mapping: EACCES.
    let ro = std::fs::File::open(&path).unwrap();
    let e = map(&c, ro.into(), Prot::RW).unwrap_err();
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    // Write-only fd, readable mapping: EACCES.
    let wo = std::fs::File::options().write(true).open(&path).unwrap();
    let e = map(&c, wo.into(), Prot::READ).unwrap_err();
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    assert!(h.dev.dma_table().unwrap().is_empty());
    // Read-only fd, read-only mapping: the device reads, and may not write.
    let ro = std::fs::File::open(&path).unwrap();
    map(&c, ro.into(), Prot::READ).unwrap();
    assert_eq!(device_dma(&c, 0x10_0000, SECRET.len() as u64, 0, 1), 0);
    let mut got = vec![0u8; SECRET.len()];
    c.region_read(0, 0, &mut got).unwrap();
    assert_eq!(got, SECRET, "the device read what the client could read");
    assert_eq!(device_dma(&c, 0x10_0000, 16, 0, 2), libc::EFAULT as u64);
    let mut file = vec![0u8; SECRET.len()];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut file, 0)
        .unwrap();
    assert_eq!(file, SECRET, "the device did not write the file");
    drop(c);
    t.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}
