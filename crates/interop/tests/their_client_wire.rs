//! Wire-level probes of the rust-vmm `vfio_user` 0.1.7 *client* (`vfio_user::Client`)
//! against scripted fake servers (hand-built replies, tests/common wire helpers). These
//! pin client bugs that a correct server never provokes (nestio's server is used for the
//! rest, in their_client_our_server.rs). Each test asserts the buggy behaviour and cites
//! the spec (QEMU docs/interop/vfio-user.rst), so it fails once the bug is fixed.

mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;

use common::*;
use vfio_bindings::bindings::vfio::*;

/// Listen on a fresh path; the first connection runs `script`. The socket file is
/// removed once the connection is accepted.
fn fake_server<F>(tag: &str, script: F) -> (PathBuf, JoinHandle<()>)
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let path = sock_path(tag);
    let l = UnixListener::bind(&path).expect("bind fake server");
    let p2 = path.clone();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let _ = std::fs::remove_file(&p2);
        script(s)
    });
    (path, t)
}

/// A VERSION reply with `major`/`minor` and optional version data (NUL appended).
fn version_reply(id: u16, major: u16, minor: u16, json: Option<&str>) -> Vec<u8> {
    let mut p = major.to_ne_bytes().to_vec();
    p.extend_from_slice(&minor.to_ne_bytes());
    if let Some(j) = json {
        p.extend_from_slice(j.as_bytes());
        p.push(0);
    }
    reply(id, cmd::VERSION, &p)
}

fn reply(id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Hdr {
        id,
        cmd: command,
        size: (16 + payload.len()) as u32,
        flags: F_REPLY,
        error: 0,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(payload);
    v
}

/// The client's VERSION proposal and its DEVICE_GET_INFO request, checked on the wire.
/// Then the fake server answers with a reply the client must refuse:
/// - VERSION reply with major 7 (spec: "The major version in the reply must be the same
///   as proposed"; the client proposed 0);
/// - DEVICE_GET_INFO reply with a message id and command that answer nothing the client
///   sent (spec: a reply carries the message id of the command it acknowledges).
///
/// vfio_user 0.1.7 checks neither: `Client::new` succeeds. Also pinned: its
/// DEVICE_GET_INFO request says argsz 32 (it counts the 16-byte header; spec: argsz is
/// the largest *reply payload*, 16 here).
#[test]
fn their_client_accepts_wrong_major_and_unmatched_reply() {
    let _g = guard("their_client_accepts_wrong_major_and_unmatched_reply");
    let (path, t) = fake_server("major", |mut s| {
        let (h, p) = read_msg(&mut s).unwrap();
        assert_eq!((h.cmd, h.flags), (cmd::VERSION, 0));
        assert_eq!(
            (
                u16::from_ne_bytes([p[0], p[1]]),
                u16::from_ne_bytes([p[2], p[3]])
            ),
            (0, 1),
            "proposes 0.1"
        );
        assert_eq!(p.last(), Some(&0), "NUL-terminated JSON");
        s.write_all(&version_reply(h.id, 7, 0, Some(r#"{"capabilities":{}}"#)))
            .unwrap();
        let (h, p) = read_msg(&mut s).unwrap();
        assert_eq!(h.cmd, cmd::DEVICE_GET_INFO);
        assert_eq!(
            u32_at(&p, 0),
            32,
            "BUG pinned: argsz counts the header (spec: 16, the reply payload size)"
        );
        let info = u32s(&[16, VFIO_DEVICE_FLAGS_PCI, 0, 0]);
        s.write_all(&reply(h.id.wrapping_add(0x1234), 0x4321, &info))
            .unwrap();
        // Keep the connection open until the client is done.
        let _ = read_msg(&mut s);
    });
    let client = vfio_user::Client::new(&path);
    assert!(
        client.is_ok(),
        "BUG pinned: major 7 and an unmatched reply were accepted: {:?}",
        client.err()
    );
    drop(client);
    t.join().unwrap();
}

/// Spec: VERSION "version data ... Optional" and, inside it, `capabilities` "Optional".
/// vfio_user 0.1.7's client panics when the reply has no version data (it slices
/// `data[0..len - 1]` of an empty buffer: subtraction overflow), and refuses `{}`
/// (serde requires the `capabilities` key).
#[test]
fn their_client_panics_on_version_reply_without_data() {
    let _g = guard("their_client_panics_on_version_reply_without_data");
    let (path, t) = fake_server("nodata", |mut s| {
        let (h, _) = read_msg(&mut s).unwrap();
        s.write_all(&version_reply(h.id, 0, 1, None)).unwrap();
        let _ = read_msg(&mut s);
    });
    let r = std::thread::spawn(move || vfio_user::Client::new(&path).map(|_| ())).join();
    assert!(r.is_err(), "BUG pinned: Client::new panicked");
    t.join().unwrap();

    let (path, t) = fake_server("nocaps", |mut s| {
        let (h, _) = read_msg(&mut s).unwrap();
        s.write_all(&version_reply(h.id, 0, 1, Some("{}"))).unwrap();
        let _ = read_msg(&mut s);
    });
    let r = vfio_user::Client::new(&path);
    assert!(
        matches!(r, Err(vfio_user::Error::DeserializeCapabilites(_))),
        "BUG pinned: `{{}}` (no optional capabilities) refused"
    );
    t.join().unwrap();
}

/// An error reply to VERSION (spec: header only, Error flag, errno): vfio_user 0.1.7
/// reads a 20-byte VERSION struct regardless, i.e. 4 bytes beyond the 16-byte error
/// reply. The fake server sends the error reply and then closes; the client reports a
/// stream read error (EOF) instead of the server's errno. With a server that keeps the
/// connection open the client would wait forever.
#[test]
fn their_client_reads_past_error_reply_to_version() {
    let _g = guard("their_client_reads_past_error_reply_to_version");
    let (path, t) = fake_server("vererr", |mut s| {
        let (h, _) = read_msg(&mut s).unwrap();
        let e = Hdr {
            id: h.id,
            cmd: cmd::VERSION,
            size: 16,
            flags: F_REPLY | F_ERROR,
            error: libc::ENOTSUP as u32,
        };
        s.write_all(&e.encode()).unwrap();
        // closing here is what lets the client return at all
    });
    let r = vfio_user::Client::new(&path);
    match r {
        Err(vfio_user::Error::StreamRead(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "BUG pinned")
        }
        other => panic!("expected StreamRead(EOF), got {:?}", other.err()),
    }
    t.join().unwrap();
}
