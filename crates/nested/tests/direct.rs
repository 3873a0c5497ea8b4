//! BAR channels (issue 12, item 5): the innermost level of a depth-3 stack reaches the
//! device's BARs in one hop while configuration space, interrupts and DMA maps still
//! pass every level; the channel serves nothing but BARs; revoking it (level 1 going
//! away) cuts the innermost level off.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::{pci_index, DeviceError, VfioDevice};
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_emulated::e1000_bench::{reg, DmaVia, Driver, IrqMode, GATEWAY_IP, GUEST_IP};
use nestio_nested::stack::socket_path;
use nestio_nested::{BarChannels, DirectBars, NestedStack, StackConfig};
use nestio_vfio_user::proto::{Command, Header, RegionAccess};
use nestio_vfio_user::socket::{recv_message, send_message};
use nestio_vfio_user::{Server, ServerConfig};

const T: Duration = Duration::from_secs(60);

fn level0() -> (Arc<E1000>, BarChannels, std::path::PathBuf) {
    let backend = nestio_net::open_backend("user", None).unwrap();
    let e1000 = E1000::new(E1000Config::new(backend).with_msi(true)).unwrap();
    let dev: Arc<dyn VfioDevice> = e1000.clone();
    let channels = BarChannels::new(dev.clone()).unwrap();
    let path = socket_path("direct-l0");
    let listener = nestio_vfio_user::bind(&path).unwrap();
    std::thread::spawn(move || {
        let _ = Server::new(dev, ServerConfig::default()).serve_listener(listener);
    });
    (e1000, channels, path)
}

#[test]
fn depth3_bar_accesses_skip_the_levels_and_the_rest_is_mediated() {
    let (_e1000, channels, path) = level0();
    let mut stack =
        NestedStack::build_with(&path, 3, StackConfig::default(), Some(&channels)).unwrap();
    assert!(stack.has_bar_channel());
    let mut drv = Driver::new_via(
        stack.device(),
        stack.ram().clone(),
        IrqMode::Msi,
        DmaVia::SharedFd,
    )
    .unwrap();
    drv.reset().unwrap();
    drv.probe().unwrap();
    drv.setup().unwrap();
    let before = stack.exporter(1).unwrap().stats();
    let gw = drv.arp(GUEST_IP, GATEWAY_IP, T).unwrap();
    for seq in 0..5 {
        drv.ping(GUEST_IP, gw, GATEWAY_IP, 0x44, seq, b"direct", T)
            .unwrap();
    }
    let status = drv.rd(reg::STATUS).unwrap();
    assert_ne!(status & reg::STATUS_LU, 0);
    let after = stack.exporter(1).unwrap().stats();
    assert_eq!(
        (after.region_reads, after.region_writes),
        (before.region_reads, before.region_writes),
        "BAR accesses went through level 1"
    );
    // Configuration space still passes every level.
    let mut id = [0u8; 4];
    stack
        .device()
        .region_read(pci_index::CONFIG, 0, &mut id)
        .unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x100E_8086);
    assert_eq!(
        stack.exporter(1).unwrap().stats().region_reads,
        after.region_reads + 1
    );
    // Level 1 goes away: its channel is revoked, the innermost level is cut off.
    let innermost = stack.device();
    stack.kill_level(1);
    let e = innermost
        .region_read(pci_index::BAR0, 8, &mut id)
        .unwrap_err();
    assert!(matches!(e, DeviceError::Disconnected(_)), "{e}");
    let _ = std::fs::remove_file(&path);
}

fn raw(sock: &UnixStream, id: u16, cmd: Command, region: u32, data: &[u8]) -> Result<Vec<u8>, i32> {
    let mut p = Vec::new();
    RegionAccess {
        offset: 8,
        region,
        count: if cmd == Command::RegionWrite {
            data.len() as u32
        } else {
            4
        },
        data,
    }
    .encode_into(&mut p);
    let h = Header::command(id, cmd, p.len()).unwrap();
    send_message(sock, &h, &p, &[]).unwrap();
    let m = recv_message(sock, 1 << 16).unwrap().expect("a reply");
    assert_eq!(m.header.msg_id, id);
    if m.header.is_error() {
        Err(m.header.error as i32)
    } else {
        Ok(m.payload)
    }
}

#[test]
fn channel_serves_bars_only_and_survives_refusals() {
    let (_e1000, channels, path) = level0();
    let (sock, handle) = channels.open().unwrap();
    // BAR 0 STATUS read: served.
    let p = raw(&sock, 1, Command::RegionRead, pci_index::BAR0, &[]).unwrap();
    assert_eq!(p.len(), RegionAccess::SIZE + 4);
    // Configuration space, ROM, VGA, a region that does not exist: EINVAL.
    for region in [pci_index::CONFIG, pci_index::ROM, pci_index::VGA, 5, 99] {
        assert_eq!(
            raw(&sock, 2, Command::RegionRead, region, &[]),
            Err(libc::EINVAL),
            "region {region}"
        );
    }
    assert_eq!(
        raw(
            &sock,
            3,
            Command::RegionWrite,
            pci_index::CONFIG,
            &[0xff; 4]
        ),
        Err(libc::EINVAL)
    );
    // Another command: ENOTSUP; the channel keeps serving.
    let h = Header::command(4, Command::DeviceReset, 0).unwrap();
    send_message(&sock, &h, &[], &[]).unwrap();
    let m = recv_message(&sock, 1 << 16).unwrap().unwrap();
    assert_eq!(m.header.error as i32, libc::ENOTSUP);
    assert!(raw(&sock, 5, Command::RegionRead, pci_index::BAR0, &[]).is_ok());
    // Revoked: the channel closes.
    drop(handle);
    let h = Header::command(6, Command::RegionRead, 16).unwrap();
    let _ = send_message(&sock, &h, &[0u8; 16], &[]);
    assert!(matches!(recv_message(&sock, 1 << 16), Ok(None) | Err(_)));
    // A DirectBars over a dead channel reports the disconnection, not a panic.
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    let backend = nestio_net::open_backend("none", None).unwrap();
    let inner: Arc<dyn VfioDevice> = E1000::new(E1000Config::new(backend)).unwrap();
    let d = DirectBars::new(inner, a).unwrap();
    let mut b4 = [0u8; 4];
    assert!(matches!(
        d.region_read(pci_index::BAR0, 8, &mut b4),
        Err(DeviceError::Disconnected(_))
    ));
    // Config space of the wrapped device is not on the channel.
    d.region_read(pci_index::CONFIG, 0, &mut b4).unwrap();
    let _ = std::fs::remove_file(&path);
}
