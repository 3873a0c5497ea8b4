//! Hostile clients against the session rules (issue 10, findings 3, 4, 6, 7): one owner
//! at a time with a clear EBUSY to a second client, a bounded handshake, peers checked by
//! uid, owner-only sockets that never replace a live server, errors that name the path,
//! and a device released to a clean state when its owner leaves.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nestio_device::{IrqAction, IrqData, MigState, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_vfio_user::proto::{Capabilities, Command, Version};
use nestio_vfio_user::{Client, ClientConfig, PeerPolicy, Server, ServerConfig};

/// A fresh directory for sockets, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("nestio-sess-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server for the test device listening on `path` on a thread, forever.
fn listen(path: &Path, config: ServerConfig) -> Harness {
    let listener = nestio_vfio_user::bind(path).unwrap();
    let h = Harness::new(config);
    let s = h.server.clone();
    std::thread::spawn(move || {
        let _ = s.serve_listener(listener);
    });
    h
}

/// A client that gives up after 5 s instead of hanging the test.
fn client(path: &Path) -> Result<Client, nestio_vfio_user::ClientError> {
    let s = UnixStream::connect(path).unwrap();
    Client::from_stream(
        s,
        ClientConfig {
            reply_timeout: Some(Duration::from_secs(5)),
            ..ClientConfig::default()
        },
    )
}

/// A raw connection whose reads give up after `secs`.
fn raw(path: &Path, secs: u64) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    s
}

fn version_payload() -> Vec<u8> {
    let mut p = Vec::new();
    Version {
        major: 0,
        minor: 2,
        caps: Capabilities::default(),
    }
    .encode_into(&mut p);
    p
}

/// Until `f` holds or 5 s pass.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(5), "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finding 3: a connection that sends nothing does not hold the device; the real client
/// is served at once.
#[test]
fn an_idle_connection_does_not_block_the_real_client() {
    let d = Dir::new("idle");
    let p = d.path("dev.sock");
    let h = listen(&p, ServerConfig::default());
    let _idle = UnixStream::connect(&p).unwrap();
    let _idle2 = UnixStream::connect(&p).unwrap();
    let c = client(&p).expect("the real client is served despite idle connections");
    c.region_write(0, 0, b"ok").unwrap();
    let mut b = [0u8; 2];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"ok");
    assert_eq!(h.server.stats().owner_sessions, 1);
}

/// Finding 3: a second client gets a clear refusal (an error reply to its VERSION with
/// EBUSY) while the first owns the device, instead of waiting forever; once the owner
/// leaves, the next client is served.
#[test]
fn a_second_client_gets_ebusy_then_is_served_after_the_owner_leaves() {
    let d = Dir::new("busy");
    let p = d.path("dev.sock");
    let h = listen(&p, ServerConfig::default());
    let owner = client(&p).unwrap();
    // Raw: the wire answer.
    let s = raw(&p, 5);
    send(&s, 7, Command::Version as u16, &version_payload(), &[]);
    expect_error(&s, 7, libc::EBUSY);
    let mut rest = Vec::new();
    assert_eq!(
        (&s).read_to_end(&mut rest).unwrap(),
        0,
        "the refused connection is closed"
    );
    // Our own client turns it into a clear error.
    let e = client(&p).err().expect("refused while owned");
    assert!(
        matches!(e, nestio_vfio_user::ClientError::Busy),
        "{e:?}: {e}"
    );
    assert!(e.to_string().contains("busy"), "{e}");
    assert_eq!(h.server.stats().refused_busy, 2);
    // The owner is undisturbed.
    owner.region_write(0, 0, b"A").unwrap();
    drop(owner);
    eventually("the owner's departure is seen", || !h.server.owned());
    let next = client(&p).expect("served once the owner has gone");
    let mut b = [0u8; 1];
    next.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"A");
}

/// Finding 3: a connection that has not completed VERSION within the handshake timeout
/// is dropped, and so is one that trickles a partial header.
#[test]
fn a_connection_without_version_is_dropped_after_the_handshake_timeout() {
    let d = Dir::new("handshake");
    let p = d.path("dev.sock");
    let h = listen(
        &p,
        ServerConfig {
            handshake_timeout: Some(Duration::from_millis(300)),
            ..ServerConfig::default()
        },
    );
    let t0 = Instant::now();
    let mut idle = raw(&p, 10);
    let mut slow = raw(&p, 10);
    slow.write_all(&[1, 0, 1, 0]).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(idle.read(&mut b).unwrap(), 0, "closed by the server");
    assert_eq!(slow.read(&mut b).unwrap(), 0, "closed by the server");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    eventually("both counted", || h.server.stats().dropped_idle == 2);
    // A client that negotiates is not subject to it afterwards.
    let c = client(&p).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.region_write(0, 0, b"still").unwrap();
}

/// Finding 3 (export sockets): `serve_owners(listener, 1)` — what a level serves its
/// child with — survives a stray connect, garbage and an early close, serves the real
/// child, and returns when that child leaves.
#[test]
fn serve_owners_survives_bad_connections_and_ends_with_the_real_child() {
    let d = Dir::new("owners");
    let p = d.path("export.sock");
    let listener = nestio_vfio_user::bind(&p).unwrap();
    let h = Harness::new(ServerConfig {
        handshake_timeout: Some(Duration::from_millis(500)),
        ..ServerConfig::default()
    });
    let s = h.server.clone();
    let t = std::thread::spawn(move || s.serve_owners(listener, 1));
    // A stray connect that closes at once, garbage, a VERSION cut short.
    drop(UnixStream::connect(&p).unwrap());
    let mut g = raw(&p, 5);
    let garbage: Vec<u8> = (0..512u32).map(|i| (i * 37) as u8).collect();
    let _ = g.write_all(&garbage);
    let mut sink = Vec::new();
    let _ = g.read_to_end(&mut sink);
    let mut cut = raw(&p, 5);
    cut.write_all(&[0u8; 10]).unwrap();
    drop(cut);
    // One that just sits there.
    let _idle = UnixStream::connect(&p).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!t.is_finished(), "bad connections do not end the export");
    let child = client(&p).expect("the real child is served");
    child.region_write(0, 0, b"child").unwrap();
    assert!(!t.is_finished());
    drop(child);
    let t0 = Instant::now();
    while !t.is_finished() {
        assert!(t0.elapsed() < Duration::from_secs(5), "did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.join().unwrap().unwrap();
    assert_eq!(h.server.stats().owner_sessions, 1);
}

/// Finding 6: when the owner leaves, the next owner finds the device as if its VFIO fd
/// had been released: no DMA maps, no interrupt eventfds, dirty logging off, migration
/// state RUNNING.
#[test]
fn the_next_owner_finds_a_released_device() {
    let d = Dir::new("release");
    let p = d.path("dev.sock");
    let h = listen(&p, ServerConfig::default());
    let c = client(&p).unwrap();
    let mem = Arc::new(memfd(0x4000));
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x10000, 0x4000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: mem.clone(),
            offset: 0,
        },
    })
    .unwrap();
    c.set_irqs(
        1,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(eventfd())]),
    )
    .unwrap();
    c.dma_logging_start(4096, &[DmaRange::new(0x10000, 0x4000).unwrap()])
        .unwrap();
    c.mig_set_state(MigState::Stop).unwrap();
    let table = h.dev.dma_table().unwrap();
    assert_eq!(table.len(), 1);
    assert!(table.logging());
    assert!(h.dev.irqs().has_eventfd(1, 0));
    assert_eq!(h.dev.mig_state().unwrap(), MigState::Stop);
    drop(c);
    eventually("the owner's departure is seen", || !h.server.owned());
    assert_eq!(table.len(), 0, "DMA maps removed");
    assert!(!h.dev.irqs().has_eventfd(1, 0), "eventfds dropped");
    assert!(!table.logging(), "dirty logging stopped");
    assert_eq!(
        h.dev.mig_state().unwrap(),
        MigState::Running,
        "migration state back to RUNNING"
    );
    // And the next owner sees the same through the protocol.
    let next = client(&p).unwrap();
    assert_eq!(next.mig_state().unwrap(), MigState::Running);
    next.dma_logging_start(4096, &[DmaRange::new(0, 0x1000).unwrap()])
        .expect("logging can start: it was stopped");
}

/// Finding 6, the hard case: an owner that leaves the device in STOP_COPY mid-save.
#[test]
fn an_owner_leaving_mid_save_leaves_a_running_device() {
    let h = Harness::new(ServerConfig::default());
    let (c, t) = h.client(ClientConfig::default());
    c.mig_set_state(MigState::StopCopy).unwrap();
    let mut b = [0u8; 16];
    let _ = c.mig_data_read(&mut b).unwrap();
    drop(c);
    let _ = t.join().unwrap();
    assert_eq!(h.dev.mig_state().unwrap(), MigState::Running);
}

/// Finding 4: a second server on a live socket fails with an error naming the path and
/// leaves the first one reachable; a stale socket file is replaced.
#[test]
fn a_live_socket_is_never_clobbered() {
    let d = Dir::new("live");
    let p = d.path("dev.sock");
    let _h = listen(&p, ServerConfig::default());
    let e = nestio_vfio_user::bind(&p).expect_err("live socket refused");
    let msg = e.to_string();
    assert!(msg.contains(&*p.to_string_lossy()), "{msg}");
    assert!(msg.contains("live"), "{msg}");
    let c = client(&p).expect("the first server is still reachable");
    c.region_write(0, 0, b"x").unwrap();
    // Stale: bound and closed, nobody listens.
    let stale = d.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    nestio_vfio_user::bind(&stale).expect("a stale socket is replaced");
}

/// Finding 5 (sockets): created owner-only whatever the umask.
#[test]
fn sockets_are_owner_only_whatever_the_umask() {
    let d = Dir::new("mode");
    let p = d.path("dev.sock");
    // SAFETY: umask only swaps the process mask; restored below.
    let old = unsafe { libc::umask(0) };
    let l = nestio_vfio_user::bind(&p);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let _l = l.unwrap();
    let mode = std::fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

/// Finding 5 (peers): a peer whose uid is not allowed is refused before anything is
/// read, and the refusal is counted; the allowed uid is served.
#[test]
fn peers_with_other_uids_are_refused() {
    let d = Dir::new("peer");
    let p = d.path("dev.sock");
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let h = listen(
        &p,
        ServerConfig {
            peers: PeerPolicy::Uids(vec![me.wrapping_add(4242)]),
            ..ServerConfig::default()
        },
    );
    let s = raw(&p, 5);
    send(&s, 1, Command::Version as u16, &version_payload(), &[]);
    let mut b = [0u8; 16];
    assert_eq!((&s).read(&mut b).unwrap_or(0), 0, "closed without a reply");
    eventually("refusal counted", || h.server.stats().refused_peers == 1);
    assert_eq!(h.server.stats().owner_sessions, 0);
    assert!(
        !PeerPolicy::Uids(vec![me + 1]).allows(&nestio_vfio_user::socket::PeerCredentials {
            pid: 1,
            uid: me,
            gid: 0
        })
    );
    assert_eq!(PeerPolicy::own_uid(), PeerPolicy::Uids(vec![me]));
    let p2 = d.path("dev2.sock");
    let _h2 = listen(&p2, ServerConfig::default());
    client(&p2).expect("our own uid is allowed by default");
}

/// Finding 7: socket errors name the path.
#[test]
fn socket_errors_name_the_path() {
    let p = Path::new("/no/such/dir/s.sock");
    let e = nestio_vfio_user::bind(p).expect_err("no such directory");
    let msg = e.to_string();
    assert!(msg.contains("/no/such/dir/s.sock"), "{msg}");
    let d = Dir::new("notsock");
    let f = d.path("plain");
    std::fs::write(&f, b"x").unwrap();
    let msg = nestio_vfio_user::bind(&f).err().unwrap().to_string();
    assert!(msg.contains(&*f.to_string_lossy()), "{msg}");
    let long = d.path(&"x".repeat(200));
    let msg = nestio_vfio_user::bind(&long).err().unwrap().to_string();
    assert!(msg.contains("xxxx"), "{msg}");
}

/// Too many connections at once: the newest is closed at once; the owner keeps working.
#[test]
fn a_connection_flood_is_bounded() {
    let d = Dir::new("flood");
    let p = d.path("dev.sock");
    let h = listen(
        &p,
        ServerConfig {
            max_connections: 4,
            ..ServerConfig::default()
        },
    );
    let owner = client(&p).unwrap();
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(UnixStream::connect(&p).unwrap());
    }
    eventually("the excess is closed", || {
        h.server.stats().dropped_idle >= 7
    });
    owner.region_write(0, 0, b"fine").unwrap();
    let _ = Server::stats(&h.server);
}

/// The session fuzz entry point on a few fixed scripts (the fuzzer runs it on many).
#[test]
fn session_fuzz_scripts_hold_their_invariants() {
    // connect 0, VERSION 0, map, irq, STOP, logging; connect 1, VERSION 1 (EBUSY); drain;
    // close 0; connect 2, VERSION 2, STOP_COPY; garbage on 1; close all.
    let scripts: &[&[u8]] = &[
        &[
            0x00, 0x02, 0, 0x05, 1, 0x06, 0x07, 0, 0x08, 0x10, 0x12, 0, 0x1e, 0x0e, 0x0b,
        ],
        &[
            0x20, 0x22, 0, 0x27, 1, 0x2b, 0x30, 0x32, 0, 0x34, 3, 1, 2, 3, 0x3d, 40,
        ],
        &[
            0x00, 0x04, 16, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        &[0x00, 0x0d, 60, 0x02, 0, 0x05, 0],
    ];
    for s in scripts {
        nestio_vfio_user::fuzz_sessions(s);
    }
}
