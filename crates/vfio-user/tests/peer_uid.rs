//! Clients running as other users (issue 10, finding 5): by default the socket is
//! owner-only, so another user cannot even connect; with extra admitted uids the socket is
//! connectable by all and `SO_PEERCRED` admits exactly those uids. The clients are this
//! test binary re-executed as another uid (needs root; skipped loudly otherwise).

mod common;

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nestio_device::VfioDevice;
use nestio_vfio_user::{Client, ClientConfig, PeerPolicy, ServerConfig};

const HELPER_ENV: &str = "NESTIO_PEER_UID_HELPER";
const NOBODY: u32 = 65534;
const STRANGER: u32 = 65533;

/// Run by the tests below as another user: connect to the socket named by
/// `$NESTIO_PEER_UID_HELPER`, negotiate, and print what happened.
#[test]
#[ignore = "helper: the peer_uid tests run it as another user"]
fn helper_connect_as_another_user() {
    let path = std::env::var(HELPER_ENV).expect("run by the peer_uid tests only");
    let outcome = match UnixStream::connect(&path) {
        Err(e) => format!("connect-errno-{}", e.raw_os_error().unwrap_or(0)),
        Ok(s) => match Client::from_stream(
            s,
            ClientConfig {
                reply_timeout: Some(Duration::from_secs(5)),
                ..ClientConfig::default()
            },
        ) {
            Ok(c) => format!("served-{}-regions", c.info().num_regions),
            Err(_) => "refused".to_string(),
        },
    };
    println!("OUTCOME={outcome}");
}

fn root_or_skip(name: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("SKIP: {name}: switching to another uid needs root");
    false
}

/// What the helper reports when run as `uid` against `path`.
fn as_user(uid: u32, path: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "helper_connect_as_another_user",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, path)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("OUTCOME=").map(|(_, o)| o.trim()))
        .unwrap_or_else(|| {
            panic!(
                "helper as uid {uid} printed no outcome: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("nestio-uid-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    // Other users must reach the socket inside; the socket's own mode is what is tested.
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    Dir(d)
}

#[test]
fn another_user_cannot_connect_to_a_default_socket() {
    if !root_or_skip("another_user_cannot_connect_to_a_default_socket") {
        return;
    }
    let d = dir("default");
    let p = d.0.join("dev.sock");
    // The most permissive umask: the socket must still be owner-only.
    // SAFETY: umask swaps the process mask; restored below.
    let old = unsafe { libc::umask(0) };
    let listener = nestio_vfio_user::bind(&p);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.unwrap();
    let h = common::Harness::new(ServerConfig::default());
    let s = h.server.clone();
    std::thread::spawn(move || s.serve_listener(listener));
    assert_eq!(
        as_user(NOBODY, &p),
        format!("connect-errno-{}", libc::EACCES)
    );
    assert_eq!(h.server.stats().sessions, 0, "nothing reached the server");
}

#[test]
fn admitted_uids_are_served_and_others_refused_by_peer_credentials() {
    if !root_or_skip("admitted_uids_are_served_and_others_refused_by_peer_credentials") {
        return;
    }
    let d = dir("admitted");
    let p = d.0.join("dev.sock");
    let peers = PeerPolicy::own_uid_and(&[NOBODY]);
    let listener = nestio_vfio_user::bind_for(&p, &peers).unwrap();
    let h = common::Harness::new(ServerConfig {
        peers,
        ..ServerConfig::default()
    });
    let s = h.server.clone();
    std::thread::spawn(move || s.serve_listener(listener));
    assert_eq!(as_user(NOBODY, &p), "served-3-regions");
    assert_eq!(as_user(STRANGER, &p), "refused");
    assert_eq!(h.server.stats().refused_peers, 1);
    assert_eq!(h.server.stats().owner_sessions, 1);
}
