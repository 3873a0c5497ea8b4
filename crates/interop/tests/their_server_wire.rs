//! Wire-level probes of the rust-vmm `vfio_user` 0.1.7 *server*, with hand-built
//! messages (tests/common encodes the spec's format independently of both
//! implementations). Each test pins one spec violation of that server: it asserts the
//! buggy behaviour and says what the spec requires, so the test fails (and must be
//! updated, together with nestio's workarounds) once the bug is fixed upstream.
//!
//! Spec: QEMU docs/interop/vfio-user.rst.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use common::their::{self, TheirServer};
use common::*;
use vfio_bindings::bindings::vfio::*;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const CAPS: &str = r#"{"capabilities":{"max_msg_fds":8}}"#;

/// The 16 bytes of a DEVICE_RESET command with message id 0xBEEF. Tests put these bytes
/// where the server should skip payload: if it executes a reset with id 0xBEEF, it
/// parsed payload as a message header.
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

/// Connect and complete a valid VERSION handshake.
fn connect(s: &TheirServer) -> UnixStream {
    let mut c = UnixStream::connect(&s.path).expect("connect to their server");
    c.write_all(&version_command(0, CAPS)).unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.cmd, h.flags, h.id), (cmd::VERSION, F_REPLY, 0));
    assert!(
        p.len() > 4 && *p.last().unwrap() == 0,
        "NUL-terminated JSON"
    );
    c
}

/// Unknown and unsupported commands: the spec lets a server refuse any command with an
/// error reply, but the reply must answer *that* message and the stream must stay in
/// sync (a message is `msg_size` bytes long, whatever the command). vfio_user 0.1.7
/// (`Server::handle_command`) returns before reading the payload of a command it does
/// not know (`Command::n` fails: 15, 16, 17, ...) or does not support (6
/// GET_REGION_IO_FDS, 11, 12, 14): the payload is then parsed as the next header.
/// Here the payload of DEVICE_FEATURE (16) and GET_REGION_IO_FDS (6) carries the bytes
/// of a DEVICE_RESET header: the server *resets the device* that nobody asked to reset
/// and answers a message id (0xBEEF) the client never used.
/// Also pinned: the error reply carries errno 0 (the spec allows 0 but every other
/// implementation says ENOSYS/ENOTSUP, and nestio maps 0 to a generic EIO).
#[test]
fn their_server_executes_payload_of_unknown_command_as_a_command() {
    let _g = guard("their_server_executes_payload_of_unknown_command_as_a_command");
    for (n, unknown) in [cmd::DEVICE_FEATURE, cmd::DEVICE_GET_REGION_IO_FDS]
        .into_iter()
        .enumerate()
    {
        let s = their::start("unk", true);
        let mut c = connect(&s);
        // DEVICE_FEATURE payload is argsz u32, flags u32 (+ data); GET_REGION_IO_FDS is
        // argsz, flags, index, count: 16 bytes either way, all of them the smuggled header.
        c.write_all(&command(1, unknown, &smuggled_reset()))
            .unwrap();
        let (h1, _) = read_msg(&mut c).unwrap();
        assert_eq!(h1.id, 1, "case {n}");
        assert_eq!(h1.cmd, unknown);
        assert!(h1.is_error());
        assert_eq!(
            h1.error, 0,
            "BUG pinned: errno 0 for an unsupported command"
        );
        // BUG pinned: a second reply to a message that was never sent.
        let (h2, p2) = read_msg(&mut c).unwrap();
        assert_eq!(
            (h2.id, h2.cmd, h2.flags, p2.len()),
            (0xBEEF, cmd::DEVICE_RESET, F_REPLY, 0),
            "the payload of command {unknown} was executed as a DEVICE_RESET"
        );
        assert_eq!(s.shared.log.lock().unwrap().resets, 1, "device was reset");
        drop(c);
    }
}

/// REGION_WRITE to a region that does not exist: vfio_user 0.1.7 checks the region index
/// *before* reading the `count` data bytes, replies EINVAL, and then parses the data as
/// the next message. A guest-controlled write payload becomes a command (here: a reset).
#[test]
fn their_server_executes_data_of_refused_region_write() {
    let _g = guard("their_server_executes_data_of_refused_region_write");
    let s = their::start("rw", true);
    let mut c = connect(&s);
    let data = smuggled_reset();
    let mut p = Vec::new();
    p.extend_from_slice(&0u64.to_ne_bytes()); // offset
    p.extend_from_slice(&99u32.to_ne_bytes()); // region: does not exist
    p.extend_from_slice(&(data.len() as u32).to_ne_bytes()); // count
    p.extend_from_slice(&data);
    c.write_all(&command(1, cmd::REGION_WRITE, &p)).unwrap();
    let (h1, _) = read_msg(&mut c).unwrap();
    assert_eq!((h1.id, h1.cmd), (1, cmd::REGION_WRITE));
    assert!(h1.is_error());
    assert_eq!(h1.error, libc::EINVAL as u32);
    let (h2, _) = read_msg(&mut c).unwrap();
    assert_eq!(
        (h2.id, h2.cmd, h2.flags),
        (0xBEEF, cmd::DEVICE_RESET, F_REPLY),
        "BUG pinned: the write data was executed as a DEVICE_RESET command"
    );
    assert_eq!(s.shared.log.lock().unwrap().resets, 1);
}

/// SET_IRQS with DATA_BOOL (valid per spec: `count` bool bytes follow the fixed part):
/// vfio_user 0.1.7 refuses DATA_BOOL without reading the bools, so 16 bools (all true,
/// bytes 0x01) are parsed as a header: id 0x0101, command 0x0101 (257). The server then
/// sends a *second* error reply, to a message id the client never used.
#[test]
fn their_server_refuses_data_bool_and_parses_the_bools_as_a_header() {
    let _g = guard("their_server_refuses_data_bool_and_parses_the_bools_as_a_header");
    let s = their::start("bool", true);
    let mut c = connect(&s);
    let count = 16u32;
    let mut p = u32s(&[
        20 + count, // argsz: fixed part + data (spec)
        VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
        VFIO_PCI_MSIX_IRQ_INDEX,
        0,
        count,
    ]);
    p.extend(std::iter::repeat_n(1u8, count as usize));
    c.write_all(&command(1, cmd::DEVICE_SET_IRQS, &p)).unwrap();
    let (h1, _) = read_msg(&mut c).unwrap();
    assert_eq!((h1.id, h1.cmd), (1, cmd::DEVICE_SET_IRQS));
    assert!(h1.is_error(), "DATA_BOOL is refused");
    assert_eq!(h1.error, 0);
    let (h2, _) = read_msg(&mut c).unwrap();
    assert_eq!(
        (h2.id, h2.cmd),
        (0x0101, 0x0101),
        "BUG pinned: the bool bytes were parsed as a message header"
    );
    assert!(h2.is_error());
    // The backend never saw the request.
    assert!(s.shared.log.lock().unwrap().set_irqs.is_empty());
}

/// The spec requires DMA_MAP over an existing mapping to fail "with EEXIST set in the
/// error field". vfio_user 0.1.7 only forwards EINVAL (its own `InvalidInput`); any
/// errno the backend returns (here EEXIST, then ENOENT for a DMA_UNMAP that names no
/// mapping) is replaced by 0.
#[test]
fn their_server_drops_backend_errno() {
    let _g = guard("their_server_drops_backend_errno");
    let s = their::start("errno", true);
    let mut c = connect(&s);
    let map = u32s(&[32, 3])
        .into_iter()
        .chain(0u64.to_ne_bytes()) // offset
        .chain(0x10_0000u64.to_ne_bytes()) // address
        .chain(0x1000u64.to_ne_bytes()) // size
        .collect::<Vec<u8>>();
    c.write_all(&command(1, cmd::DMA_MAP, &map)).unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!(
        (h.id, h.flags, p.len()),
        (1, F_REPLY, 0),
        "first map succeeds"
    );
    c.write_all(&command(2, cmd::DMA_MAP, &map)).unwrap();
    let (h, _) = read_msg(&mut c).unwrap();
    assert_eq!(h.id, 2);
    assert!(h.is_error(), "overlapping map is refused");
    assert_eq!(
        h.error,
        0,
        "BUG pinned: spec requires EEXIST ({}), the backend returned it, the server sent 0",
        libc::EEXIST
    );
    let unmap = u32s(&[24, 0])
        .into_iter()
        .chain(0x20_0000u64.to_ne_bytes())
        .chain(0x1000u64.to_ne_bytes())
        .collect::<Vec<u8>>();
    c.write_all(&command(3, cmd::DMA_UNMAP, &unmap)).unwrap();
    let (h, _) = read_msg(&mut c).unwrap();
    assert_eq!(h.id, 3);
    assert!(h.is_error());
    assert_eq!(h.error, 0, "BUG pinned: backend's ENOENT replaced by 0");
    let log = s.shared.log.lock().unwrap();
    assert_eq!(log.maps.len(), 2);
    assert_eq!(log.unmaps.len(), 1);
}

/// VERSION: the spec makes the version data (JSON) optional, and inside it the
/// `capabilities` object optional. vfio_user 0.1.7's server:
/// - panics (`CString::from_vec_with_nul(..).unwrap()`) on a VERSION without version
///   data, and on version data without a terminating NUL: the server thread dies;
/// - refuses `{}` (no `capabilities`) with an error reply (errno 0).
#[test]
fn their_server_panics_on_version_without_data() {
    let _g = guard("their_server_panics_on_version_without_data");
    // No version data at all: message_size 20.
    let mut s = their::start("ver0", true);
    let mut c = UnixStream::connect(&s.path).unwrap();
    let mut p = 0u16.to_ne_bytes().to_vec();
    p.extend_from_slice(&1u16.to_ne_bytes());
    c.write_all(&command(0, cmd::VERSION, &p)).unwrap();
    assert!(
        s.join().is_err(),
        "BUG pinned: their server thread panics on a VERSION without version data"
    );
    assert!(read_msg(&mut c).is_err(), "no reply, connection closed");

    // JSON without the terminating NUL.
    let mut s = their::start("ver1", true);
    let mut c = UnixStream::connect(&s.path).unwrap();
    let mut p = 0u16.to_ne_bytes().to_vec();
    p.extend_from_slice(&1u16.to_ne_bytes());
    p.extend_from_slice(CAPS.as_bytes());
    c.write_all(&command(0, cmd::VERSION, &p)).unwrap();
    assert!(s.join().is_err(), "BUG pinned: panics on JSON without NUL");
    drop(c);

    // `{}`: valid JSON without the optional capabilities object.
    let s = their::start("ver2", true);
    let mut c = UnixStream::connect(&s.path).unwrap();
    c.write_all(&version_command(0, "{}")).unwrap();
    let (h, _) = read_msg(&mut c).unwrap();
    assert!(
        h.is_error(),
        "BUG pinned: `{{}}` refused (capabilities is optional)"
    );
}

/// The happy path on the wire, checking reply layouts against the spec: VERSION reply
/// (major 0, minor <= proposed, NUL-terminated JSON), DEVICE_GET_INFO (argsz 16, PCI |
/// RESET), GET_IRQ_INFO, REGION_READ reply echoing offset/region/count + data,
/// REGION_WRITE reply (offset, region, count), DMA_UNMAP reply echoing the request.
#[test]
fn their_server_reply_layouts_match_spec() {
    let _g = guard("their_server_reply_layouts_match_spec");
    let s = their::start("layout", true);
    let mut c = UnixStream::connect(&s.path).unwrap();
    c.write_all(&version_command(7, CAPS)).unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.id, h.cmd, h.flags), (7, cmd::VERSION, F_REPLY));
    assert_eq!(u16::from_ne_bytes([p[0], p[1]]), 0, "major");
    assert!(u16::from_ne_bytes([p[2], p[3]]) <= 1, "minor <= proposed");
    let json = std::str::from_utf8(&p[4..p.len() - 1]).unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(v["capabilities"]["max_data_xfer_size"].as_u64().is_some());

    c.write_all(&command(8, cmd::DEVICE_GET_INFO, &u32s(&[16, 0, 0, 0])))
        .unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.id, h.flags, p.len()), (8, F_REPLY, 16));
    assert_eq!(u32_at(&p, 0), 16, "argsz");
    assert_eq!(
        u32_at(&p, 4),
        VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    );
    assert_eq!((u32_at(&p, 8), u32_at(&p, 12)), (3, 3));

    c.write_all(&command(9, cmd::DEVICE_GET_IRQ_INFO, &u32s(&[16, 0, 2, 0])))
        .unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.id, h.flags, p.len()), (9, F_REPLY, 16));
    assert_eq!((u32_at(&p, 8), u32_at(&p, 12)), (2, 4));

    let mut w = 0x10u64.to_ne_bytes().to_vec();
    w.extend(u32s(&[0, 4]));
    w.extend_from_slice(&[1, 2, 3, 4]);
    c.write_all(&command(10, cmd::REGION_WRITE, &w)).unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.id, h.flags, p.len()), (10, F_REPLY, 16));
    assert_eq!((u64_at(&p, 0), u32_at(&p, 8), u32_at(&p, 12)), (0x10, 0, 4));

    let mut r = 0x10u64.to_ne_bytes().to_vec();
    r.extend(u32s(&[0, 4]));
    c.write_all(&command(11, cmd::REGION_READ, &r)).unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.id, h.flags, p.len()), (11, F_REPLY, 20));
    assert_eq!(&p[16..], &[1, 2, 3, 4]);

    let map = u32s(&[32, 1])
        .into_iter()
        .chain(0u64.to_ne_bytes())
        .chain(0x4000u64.to_ne_bytes())
        .chain(0x1000u64.to_ne_bytes())
        .collect::<Vec<u8>>();
    c.write_all(&command(12, cmd::DMA_MAP, &map)).unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.id, h.flags, p.len()), (12, F_REPLY, 0));
    let unmap = u32s(&[24, 0])
        .into_iter()
        .chain(0x4000u64.to_ne_bytes())
        .chain(0x1000u64.to_ne_bytes())
        .collect::<Vec<u8>>();
    c.write_all(&command(13, cmd::DMA_UNMAP, &unmap)).unwrap();
    let (h, p) = read_msg(&mut c).unwrap();
    assert_eq!((h.id, h.flags), (13, F_REPLY));
    assert_eq!(p, unmap, "DMA_UNMAP reply echoes the request");
    let log = s.shared.log.lock().unwrap();
    assert_eq!(log.maps, vec![(1, 0, 0x4000, 0x1000, false)]);
    assert_eq!(log.writes, vec![(0, 0x10, vec![1, 2, 3, 4])]);
}

/// GET_REGION_INFO and the mmap fd. Spec: "VFIO_REGION_INFO_FLAG_MMAP ... When this flag
/// is set, the reply will include a file descriptor". vfio_user 0.1.7 attaches the
/// region's fd only to a reply that carries a sparse-mmap capability list: a region
/// that is mmappable as a whole (MMAP flag, no sparse areas, `mmap_fd` configured) never
/// gets its fd to the client. The sparse region is served correctly: argsz too small
/// -> reply with the needed argsz and no caps; retry -> caps + fd.
#[test]
fn their_server_sends_mmap_fd_only_with_sparse_caps() {
    let _g = guard("their_server_sends_mmap_fd_only_with_sparse_caps");
    let s = their::start("fd", true);
    let c = connect(&s);
    let get = |id: u16, index: u32, argsz: u32| -> (Hdr, Vec<u8>, bool) {
        let p = u32s(&[argsz, 0, index, 0, 0, 0, 0, 0]);
        (&c).write_all(&command(id, cmd::DEVICE_GET_REGION_INFO, &p))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, fd) = c.recv_with_fd(&mut buf).unwrap();
        buf.truncate(n);
        let h = Hdr::decode(&buf);
        assert_eq!(h.size as usize, n, "one reply per recv in this test");
        (h, buf[16..].to_vec(), fd.is_some())
    };
    // Region 2: MMAP flag, whole region mappable, no sparse areas.
    let (h, p, fd) = get(1, 2, 32);
    assert_eq!((h.id, h.flags), (1, F_REPLY));
    assert_ne!(u32_at(&p, 4) & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_eq!(u64_at(&p, 24), their::R2_FD_OFFSET);
    assert!(
        !fd,
        "BUG pinned: MMAP region without sparse caps: no fd in the reply"
    );

    // Region 1: sparse. First with argsz 32: no caps, argsz tells the full size.
    let (h, p, fd) = get(2, 1, 32);
    assert_eq!((h.id, h.size), (2, 48));
    let full = u32_at(&p, 0);
    assert_eq!(
        full,
        32 + 8 + 8 + 16,
        "region info + cap header + sparse header + 1 area"
    );
    assert!(!fd);
    let (h, p, fd) = get(3, 1, full);
    assert_eq!(h.size, 16 + full);
    assert!(fd, "caps reply carries the fd");
    assert_ne!(u32_at(&p, 4) & VFIO_REGION_INFO_FLAG_CAPS, 0);
    let cap = u32_at(&p, 12) as usize;
    assert_eq!(cap, 32);
    assert_eq!(
        u16::from_ne_bytes([p[cap], p[cap + 1]]) as u32,
        VFIO_REGION_INFO_CAP_SPARSE_MMAP
    );
    assert_eq!(u32_at(&p, cap + 8), 1, "nr_areas");
    assert_eq!(
        (u64_at(&p, cap + 16), u64_at(&p, cap + 24)),
        their::R1_SPARSE
    );
}

/// DMA_UNMAP flags. vfio-user reuses Linux's `vfio_iommu_type1_dma_unmap` flags:
/// GET_DIRTY_BITMAP = 1 << 0, ALL = 1 << 1 (QEMU's vfio-user client sends
/// `VFIO_DMA_UNMAP_FLAG_ALL` = 2 to drop every mapping). vfio_user 0.1.7 defines
/// `DmaUnmapFlags::GET_DIRTY_PAGE_INFO = 1 << 1` and `UNMAP_ALL = 1 << 2`: one bit off.
/// A backend written against the crate's constants sees QEMU's "unmap all" as a
/// dirty-page request, and the server passes the bits through unchanged.
#[test]
fn their_server_unmap_all_flag_is_one_bit_off() {
    let _g = guard("their_server_unmap_all_flag_is_one_bit_off");
    use vfio_user::DmaUnmapFlags;
    assert_eq!(VFIO_DMA_UNMAP_FLAG_ALL, 2);
    let linux_all = DmaUnmapFlags::from_bits_truncate(VFIO_DMA_UNMAP_FLAG_ALL);
    assert!(
        !linux_all.contains(DmaUnmapFlags::UNMAP_ALL),
        "BUG pinned: UNMAP_ALL is 1 << 2 in vfio_user 0.1.7"
    );
    assert!(linux_all.contains(DmaUnmapFlags::GET_DIRTY_PAGE_INFO));

    let s = their::start("unmapall", true);
    let mut c = connect(&s);
    let map = u32s(&[32, 3])
        .into_iter()
        .chain(0u64.to_ne_bytes())
        .chain(0x10_0000u64.to_ne_bytes())
        .chain(0x1000u64.to_ne_bytes())
        .collect::<Vec<u8>>();
    c.write_all(&command(1, cmd::DMA_MAP, &map)).unwrap();
    assert!(!read_msg(&mut c).unwrap().0.is_error());
    // QEMU's "unmap all": flags ALL, address 0, size 0.
    let unmap = u32s(&[24, VFIO_DMA_UNMAP_FLAG_ALL])
        .into_iter()
        .chain(0u64.to_ne_bytes())
        .chain(0u64.to_ne_bytes())
        .collect::<Vec<u8>>();
    c.write_all(&command(2, cmd::DMA_UNMAP, &unmap)).unwrap();
    let (h, _) = read_msg(&mut c).unwrap();
    assert!(
        h.is_error(),
        "a backend using the crate's UNMAP_ALL constant refuses QEMU's unmap-all"
    );
    assert_eq!(s.shared.dma.lock().unwrap().len(), 1, "mapping still there");
    assert_eq!(
        s.shared.log.lock().unwrap().unmaps,
        vec![(VFIO_DMA_UNMAP_FLAG_ALL, 0, 0)]
    );
}

/// DEVICE_GET_INFO with the No_reply bit: vfio_user 0.1.7 refuses it (UnexpectedNoReply)
/// *before* reading its 16-byte payload, so the payload is parsed as the next header
/// (here a smuggled DEVICE_RESET, executed). Spec: No_reply means "no reply is needed";
/// whatever a server decides, a message is `msg_size` bytes and must be consumed whole.
/// Also: the server replies although the client asked for no reply.
#[test]
fn their_server_no_reply_get_info_executes_its_payload() {
    let _g = guard("their_server_no_reply_get_info_executes_its_payload");
    let s = their::start("noreply", true);
    let mut c = connect(&s);
    let mut m = command(1, cmd::DEVICE_GET_INFO, &smuggled_reset());
    m[8..12].copy_from_slice(&F_NO_REPLY.to_ne_bytes());
    c.write_all(&m).unwrap();
    let (h1, _) = read_msg(&mut c).unwrap();
    assert_eq!((h1.id, h1.cmd), (1, cmd::DEVICE_GET_INFO));
    assert!(h1.is_error(), "refused, and answered despite No_reply");
    let (h2, _) = read_msg(&mut c).unwrap();
    assert_eq!(
        (h2.id, h2.cmd, h2.flags),
        (0xBEEF, cmd::DEVICE_RESET, F_REPLY),
        "BUG pinned: the GET_INFO payload was executed as a DEVICE_RESET"
    );
    assert_eq!(s.shared.log.lock().unwrap().resets, 1);
}

/// The header's Type bits say whether a message is a command (0) or a reply (1).
/// vfio_user 0.1.7's server never looks at them: a message flagged as a *reply* is
/// executed as a command (here a DEVICE_RESET) and answered.
#[test]
fn their_server_executes_a_message_flagged_as_reply() {
    let _g = guard("their_server_executes_a_message_flagged_as_reply");
    let s = their::start("type", true);
    let mut c = connect(&s);
    let h = Hdr {
        id: 5,
        cmd: cmd::DEVICE_RESET,
        size: 16,
        flags: F_REPLY,
        error: 0,
    };
    c.write_all(&h.encode()).unwrap();
    let (r, _) = read_msg(&mut c).unwrap();
    assert_eq!((r.id, r.cmd, r.flags), (5, cmd::DEVICE_RESET, F_REPLY));
    assert_eq!(
        s.shared.log.lock().unwrap().resets,
        1,
        "BUG pinned: a reply-typed message reset the device"
    );
}
