//! The wire probes that exposed bugs in vfio_user 0.1.7's server (their_server_wire.rs),
//! run against nestio's server: here each probe asserts the spec-correct behaviour, so
//! the two files together show the difference message by message.

mod common;
#[path = "common/ours.rs"]
mod ours;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use common::*;
use nestio_device_model::{flags, pci_index, VfioDevice};
use nestio_vfio_user::server::{Server, ServerConfig, ServerError};
use ours::TestDevice;
use vfio_bindings::bindings::vfio::*;

const CAPS: &str = r#"{"capabilities":{"max_msg_fds":8}}"#;

fn smuggled_reset() -> [u8; 16] {
    Hdr {
        id: 0xBEEF,
        cmd: cmd::DEVICE_RESET,
        size: 16,
        flags: 0,
        error: 0,
    }
    .encode()
}

struct Ours {
    dev: Arc<TestDevice>,
    c: UnixStream,
    server: JoinHandle<Result<(), ServerError>>,
}

fn start() -> Ours {
    let dev = TestDevice::new(flags::PCI | flags::RESET);
    let (a, b) = UnixStream::pair().unwrap();
    let server = Server::new(dev.clone() as Arc<dyn VfioDevice>, ServerConfig::default());
    let server = std::thread::spawn(move || server.serve_stream(a));
    Ours { dev, c: b, server }
}

fn connect() -> Ours {
    let mut o = start();
    o.c.write_all(&version_command(0, CAPS)).unwrap();
    let (h, _) = read_msg(&mut o.c).unwrap();
    assert_eq!((h.cmd, h.flags), (cmd::VERSION, F_REPLY));
    o
}

/// After the probe, a DEVICE_GET_INFO with id 0x4242 must be answered next: nothing
/// left over from the probe (no phantom reply, no executed payload).
fn assert_in_sync(o: &mut Ours) {
    o.c.write_all(&command(
        0x4242,
        cmd::DEVICE_GET_INFO,
        &u32s(&[16, 0, 0, 0]),
    ))
    .unwrap();
    let (h, p) = read_msg(&mut o.c).unwrap();
    assert_eq!(
        (h.id, h.cmd, h.flags),
        (0x4242, cmd::DEVICE_GET_INFO, F_REPLY)
    );
    assert_eq!(u32_at(&p, 8), pci_index::NUM_REGIONS);
    assert_eq!(o.dev.resets.load(Ordering::SeqCst), 0, "no smuggled reset");
}

fn finish(o: Ours) {
    drop(o.c);
    o.server
        .join()
        .expect("our server must not panic")
        .expect("clean end of session");
}

/// Unknown (and unimplemented) commands: one error reply, payload skipped, in sync.
#[test]
fn our_server_skips_payload_of_unknown_commands() {
    let _g = guard("our_server_skips_payload_of_unknown_commands");
    let mut o = connect();
    for (i, unknown) in [14u16, 19, 0x7fff].into_iter().enumerate() {
        let id = 10 + i as u16;
        o.c.write_all(&command(id, unknown, &smuggled_reset()))
            .unwrap();
        let (h, p) = read_msg(&mut o.c).unwrap();
        assert_eq!((h.id, h.cmd), (id, unknown));
        assert!(h.is_error() && p.is_empty());
        assert_ne!(h.error, 0, "an errno is given");
        assert_in_sync(&mut o);
    }
    finish(o);
}

/// REGION_WRITE to a missing region: EINVAL, data skipped.
#[test]
fn our_server_skips_data_of_refused_region_write() {
    let _g = guard("our_server_skips_data_of_refused_region_write");
    let mut o = connect();
    let data = smuggled_reset();
    let mut p = 0u64.to_ne_bytes().to_vec();
    p.extend(u32s(&[99, data.len() as u32]));
    p.extend_from_slice(&data);
    o.c.write_all(&command(1, cmd::REGION_WRITE, &p)).unwrap();
    let (h, _) = read_msg(&mut o.c).unwrap();
    assert!(h.is_error());
    assert_eq!(h.error, libc::EINVAL as u32);
    assert_in_sync(&mut o);
    finish(o);
}

/// SET_IRQS with DATA_BOOL (argsz includes the bool bytes): MASK of INTx (maskable)
/// with bools [1] masks it; the bool bytes are consumed.
#[test]
fn our_server_accepts_data_bool() {
    let _g = guard("our_server_accepts_data_bool");
    let mut o = connect();
    let mut p = u32s(&[
        21,
        VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_MASK,
        pci_index::INTX_IRQ,
        0,
        1,
    ]);
    p.push(1);
    o.c.write_all(&command(1, cmd::DEVICE_SET_IRQS, &p))
        .unwrap();
    let (h, _) = read_msg(&mut o.c).unwrap();
    assert_eq!((h.id, h.flags), (1, F_REPLY), "{h:?}");
    assert!(o.dev.irqs.is_masked(pci_index::INTX_IRQ, 0));
    assert_in_sync(&mut o);
    finish(o);
}

/// EEXIST for an overlapping DMA_MAP and ENOENT for an unmatched DMA_UNMAP (spec: the
/// overlap "must be failed by the server with EEXIST set in error field").
#[test]
fn our_server_reports_dma_errnos() {
    let _g = guard("our_server_reports_dma_errnos");
    let mut o = connect();
    let mem = memfd(0x2000);
    let map = |addr: u64| {
        u32s(&[32, 3])
            .into_iter()
            .chain(0u64.to_ne_bytes())
            .chain(addr.to_ne_bytes())
            .chain(0x1000u64.to_ne_bytes())
            .collect::<Vec<u8>>()
    };
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    o.c.send_with_fd(
        &command(1, cmd::DMA_MAP, &map(0x1_0000))[..],
        mem.as_raw_fd(),
    )
    .unwrap();
    assert!(!read_msg(&mut o.c).unwrap().0.is_error());
    o.c.send_with_fd(
        &command(2, cmd::DMA_MAP, &map(0x1_0800))[..],
        mem.as_raw_fd(),
    )
    .unwrap();
    let (h, _) = read_msg(&mut o.c).unwrap();
    assert!(h.is_error());
    assert_eq!(h.error, libc::EEXIST as u32);
    let unmap = u32s(&[24, 0])
        .into_iter()
        .chain(0x5_0000u64.to_ne_bytes())
        .chain(0x1000u64.to_ne_bytes())
        .collect::<Vec<u8>>();
    o.c.write_all(&command(3, cmd::DMA_UNMAP, &unmap)).unwrap();
    let (h, _) = read_msg(&mut o.c).unwrap();
    assert!(h.is_error());
    assert_eq!(h.error, libc::ENOENT as u32);
    // Linux/QEMU "unmap all": flags 1 << 1, address 0, size 0.
    let all = u32s(&[24, VFIO_DMA_UNMAP_FLAG_ALL])
        .into_iter()
        .chain(0u64.to_ne_bytes())
        .chain(0u64.to_ne_bytes())
        .collect::<Vec<u8>>();
    o.c.write_all(&command(4, cmd::DMA_UNMAP, &all)).unwrap();
    let (h, _) = read_msg(&mut o.c).unwrap();
    assert!(!h.is_error(), "{h:?}");
    assert!(o.dev.table.is_empty());
    assert_in_sync(&mut o);
    finish(o);
}

/// VERSION without version data (spec: optional) and with `{}` (capabilities optional)
/// are accepted; the server answers major 0 and a minor <= the proposed one.
#[test]
fn our_server_accepts_version_without_data() {
    let _g = guard("our_server_accepts_version_without_data");
    for data in [None, Some("{}")] {
        let mut o = start();
        let mut p = 0u16.to_ne_bytes().to_vec();
        p.extend_from_slice(&1u16.to_ne_bytes());
        if let Some(j) = data {
            p.extend_from_slice(j.as_bytes());
            p.push(0);
        }
        o.c.write_all(&command(0, cmd::VERSION, &p)).unwrap();
        let (h, p) = read_msg(&mut o.c).unwrap();
        assert_eq!((h.cmd, h.flags), (cmd::VERSION, F_REPLY), "{data:?}");
        assert_eq!(u16::from_ne_bytes([p[0], p[1]]), 0);
        assert!(u16::from_ne_bytes([p[2], p[3]]) <= 1);
        assert_in_sync(&mut o);
        finish(o);
    }
}

/// A message whose type is "reply" is not executed as a command.
#[test]
fn our_server_does_not_execute_reply_typed_messages() {
    let _g = guard("our_server_does_not_execute_reply_typed_messages");
    let mut o = connect();
    let h = Hdr {
        id: 5,
        cmd: cmd::DEVICE_RESET,
        size: 16,
        flags: F_REPLY,
        error: 0,
    };
    o.c.write_all(&h.encode()).unwrap();
    assert_in_sync(&mut o);
    finish(o);
}

/// DEVICE_GET_INFO with No_reply: executed or refused, but silently, and in sync.
#[test]
fn our_server_honours_no_reply() {
    let _g = guard("our_server_honours_no_reply");
    let mut o = connect();
    let mut m = command(1, cmd::DEVICE_GET_INFO, &u32s(&[16, 0, 0, 0]));
    m[8..12].copy_from_slice(&F_NO_REPLY.to_ne_bytes());
    o.c.write_all(&m).unwrap();
    let mut m = command(2, cmd::DEVICE_RESET, &[]);
    m[8..12].copy_from_slice(&F_NO_REPLY.to_ne_bytes());
    o.c.write_all(&m).unwrap();
    assert_in_sync_after_reset(&mut o);
    finish(o);
}

fn assert_in_sync_after_reset(o: &mut Ours) {
    o.c.write_all(&command(
        0x4242,
        cmd::DEVICE_GET_INFO,
        &u32s(&[16, 0, 0, 0]),
    ))
    .unwrap();
    let (h, _) = read_msg(&mut o.c).unwrap();
    assert_eq!(
        (h.id, h.cmd, h.flags),
        (0x4242, cmd::DEVICE_GET_INFO, F_REPLY)
    );
    assert_eq!(o.dev.resets.load(Ordering::SeqCst), 1, "posted reset done");
}
