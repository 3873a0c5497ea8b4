//! nestio's VERSION reply and proposal against the VERSION parsers of the vfio-user
//! peers in the field. Each `*_accepts` function below restates, as a check on the
//! payload bytes, what that peer's parser refuses (written from reading its source; see
//! the table in `proto`'s module documentation):
//!
//! - QEMU 10.2's client (`hw/vfio-user/proxy.c`: `vfio_user_validate_version`,
//!   `caps_check` and the `check_*` functions),
//! - Cloud Hypervisor's client and server (`vfio_user` crate 0.1.x: `negotiate_version`,
//!   the serde `Capabilities` / `MigrationCapabilities` structs),
//! - libvfio-user's server and sample client (`lib/tran.c` `recv_version` /
//!   `tran_parse_version_json`, `samples/client.c` `recv_version`),
//!
//! and nestio's server is asked with each client's real proposal (as those sources build
//! it) over a socket, its reply run through that client's check.

mod common;

use std::os::unix::net::UnixStream;

use common::*;
use nestio_vfio_user::proto::{self, Capabilities, Command, Version};
use nestio_vfio_user::{Client, ClientConfig, ServerConfig};
use serde_json::Value;

/// Split a VERSION payload: major, minor and the JSON text, which must end in a NUL
/// (every C parser checks the last byte; Cloud Hypervisor drops it unchecked).
fn split(p: &[u8]) -> Result<(u16, u16, Value), String> {
    if p.len() < 5 {
        return Err(format!("VERSION payload of {} bytes has no JSON", p.len()));
    }
    let major = u16::from_ne_bytes([p[0], p[1]]);
    let minor = u16::from_ne_bytes([p[2], p[3]]);
    let json = p[4..]
        .strip_suffix(&[0])
        .ok_or("capabilities are not NUL-terminated")?;
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("capabilities are not a JSON object".into());
    }
    Ok((major, minor, v))
}

/// The `capabilities` object, if present (must then be an object).
fn caps_of(v: &Value) -> Result<Option<&serde_json::Map<String, Value>>, String> {
    match v.get("capabilities") {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err("malformed capabilities".into()),
    }
}

/// QEMU's `qnum_get_try_uint`: a non-negative JSON integer.
fn qemu_uint(v: &Value, name: &str) -> Result<u64, String> {
    v.as_u64().ok_or_else(|| format!("malformed {name}"))
}

/// QEMU 10.2's client parsing a server's VERSION reply.
fn qemu_client_accepts(p: &[u8]) -> Result<(), String> {
    let (major, minor, v) = split(p)?;
    // It proposes 0.0 and wants no higher minor back.
    if major != 0 || minor > 0 {
        return Err(format!("incompatible server version {major}.{minor}"));
    }
    let Some(caps) = caps_of(&v)? else {
        return Ok(());
    };
    for (k, val) in caps {
        let refused = match k.as_str() {
            "max_msg_fds" => qemu_uint(val, k)? > 16,
            "max_data_xfer_size" => qemu_uint(val, k)? > 64 << 20,
            "pgsizes" => qemu_uint(val, k)? & 0xfff != 0,
            "max_dma_maps" => qemu_uint(val, k)? > 65535,
            "migration" => {
                let m = val.as_object().ok_or("malformed migration")?;
                let pg = m
                    .get("pgsize")
                    .map(|v| qemu_uint(v, "pgsize"))
                    .transpose()?;
                let bm = m
                    .get("max_bitmap_size")
                    .map(|v| qemu_uint(v, "max_bitmap_size"))
                    .transpose()?;
                pg.is_some_and(|p| p & 0xfff != 0) || bm.is_some_and(|b| b > 256 << 20)
            }
            "write_multiple" => !val.is_boolean(),
            // Anything else: a "spurious capabilities" warning, accepted.
            _ => false,
        };
        if refused {
            return Err(format!("malformed {k}"));
        }
    }
    Ok(())
}

/// Cloud Hypervisor's `vfio_user` 0.1: serde into `{"capabilities": {max_msg_fds: u32,
/// max_data_xfer_size: u32, migration: {pgsize: u32}}}` — the `capabilities` key and,
/// in a `migration` object, `pgsize` are required; unknown keys are ignored; no version
/// check. The same structs parse a client's proposal in its server.
fn cloud_hypervisor_accepts(p: &[u8]) -> Result<(), String> {
    let (_, _, v) = split(p)?;
    let caps = caps_of(&v)?.ok_or("missing field `capabilities`")?;
    let u32_field = |val: &Value, name: &str| -> Result<(), String> {
        match val.as_u64() {
            Some(n) if n <= u64::from(u32::MAX) => Ok(()),
            _ => Err(format!("{name}: not a u32")),
        }
    };
    for name in ["max_msg_fds", "max_data_xfer_size"] {
        if let Some(val) = caps.get(name) {
            u32_field(val, name)?;
        }
    }
    if let Some(m) = caps.get("migration") {
        let m = m.as_object().ok_or("migration: not a struct")?;
        let pg = m.get("pgsize").ok_or("migration: missing field `pgsize`")?;
        u32_field(pg, "migration.pgsize")?;
    }
    Ok(())
}

/// json-c's `json_type_int` read by `json_object_get_int64` and cast to a C `int`:
/// meaningful only within 0..=i32::MAX.
fn c_int(val: &Value, name: &str) -> Result<i64, String> {
    match val.as_i64() {
        Some(n) if (0..=i64::from(i32::MAX)).contains(&n) => Ok(n),
        _ => Err(format!("{name}: not an int within a C int")),
    }
}

/// `tran_parse_version_json`, shared by libvfio-user's server and its sample client.
/// `twin_out`: the caller passed an out-pointer for `twin_socket.supported` (its
/// sample client passes none and would crash on the key).
fn libvfio_user_parse(caps: &serde_json::Map<String, Value>, twin_out: bool) -> Result<(), String> {
    for name in ["max_msg_fds", "max_data_xfer_size"] {
        if let Some(val) = caps.get(name) {
            c_int(val, name)?;
        }
    }
    if let Some(m) = caps.get("migration") {
        let m = m.as_object().ok_or("migration not an object")?;
        if let Some(pg) = m.get("pgsize") {
            c_int(pg, "pgsize")?;
        }
    }
    if let Some(t) = caps.get("twin_socket") {
        if !twin_out {
            return Err("twin_socket sent to a client that cannot take it".into());
        }
        let t = t.as_object().ok_or("twin_socket not an object")?;
        if let Some(s) = t.get("supported") {
            if !s.is_boolean() {
                return Err("twin_socket.supported not a bool".into());
            }
        }
    }
    Ok(())
}

/// libvfio-user's sample client (`samples/client.c`) parsing a server's reply.
fn libvfio_user_client_accepts(p: &[u8]) -> Result<(), String> {
    let (major, minor, v) = split(p)?;
    if major != 0 || minor > 2 {
        return Err(format!("unsupported server version {major}.{minor}"));
    }
    match caps_of(&v)? {
        Some(caps) => libvfio_user_parse(caps, false),
        None => Ok(()),
    }
}

/// libvfio-user's server (`recv_version`) parsing a client's proposal, for a device
/// with migration (the strictest case: `migration.pgsize` must be the page size).
fn libvfio_user_server_accepts(p: &[u8]) -> Result<(), String> {
    let (major, _, v) = split(p)?;
    if major != 0 {
        return Err(format!("unsupported client major {major}"));
    }
    let Some(caps) = caps_of(&v)? else {
        return Ok(());
    };
    libvfio_user_parse(caps, true)?;
    if let Some(n) = caps.get("max_msg_fds").and_then(Value::as_i64) {
        if n > 1024 {
            return Err(format!("refusing client max_msg_fds of {n}"));
        }
    }
    let pg = caps
        .get("migration")
        .and_then(|m| m.get("pgsize"))
        .and_then(Value::as_i64);
    if let Some(pg) = pg {
        if pg != 0 && pg != 4096 {
            return Err(format!("refusing client page size of {pg}"));
        }
    }
    Ok(())
}

/// nestio's own client: [`Version::decode`] and the version check in `Client`.
fn nestio_client_accepts(p: &[u8]) -> Result<(), String> {
    let v = Version::decode(p).map_err(|e| e.to_string())?;
    if v.major != 0 || v.minor > proto::VERSION_MINOR {
        return Err(format!("server answered version {}.{}", v.major, v.minor));
    }
    Ok(())
}

type Check = fn(&[u8]) -> Result<(), String>;

/// Each client's proposal as its source builds it: (name, minor, JSON).
const QEMU_PROPOSAL: (u16, &str) = (
    0,
    r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#,
);
const CLOUD_HYPERVISOR_PROPOSAL: (u16, &str) = (
    1,
    r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#,
);
const LIBVFIO_USER_PROPOSAL: (u16, &str) = (
    2,
    r#"{"capabilities":{"max_msg_fds":32,"max_data_xfer_size":1024}}"#,
);

fn proposal(minor: u16, json: &str) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0u16.to_ne_bytes());
    p.extend_from_slice(&minor.to_ne_bytes());
    p.extend_from_slice(json.as_bytes());
    p.push(0);
    p
}

/// Send `payload` as VERSION to a nestio server session and return its reply payload.
fn ask(config: ServerConfig, payload: &[u8]) -> Vec<u8> {
    let h = Harness::new(config);
    let (s, t) = h.session();
    send(&s, 1, Command::Version as u16, payload, &[]);
    let m = recv(&s).expect("a VERSION reply");
    assert!(!m.header.is_error(), "server refused: {:?}", m.header);
    assert!(m.fds.is_empty(), "no twin socket was offered");
    drop(s);
    let _ = t.join();
    m.payload
}

fn reply_caps(p: &[u8]) -> Capabilities {
    Version::decode(p).unwrap().caps
}

#[test]
fn qemu_accepts_our_reply() {
    let (minor, json) = QEMU_PROPOSAL;
    let r = ask(ServerConfig::default(), &proposal(minor, json));
    qemu_client_accepts(&r).unwrap();
    let c = reply_caps(&r);
    assert_eq!(c.max_msg_fds, 16, "QEMU asked for 16");
    assert!(c.write_multiple, "QEMU offers write_multiple");
    assert_eq!(u16::from_ne_bytes([r[2], r[3]]), 0, "QEMU speaks minor 0");
}

#[test]
fn cloud_hypervisor_accepts_our_reply() {
    let (minor, json) = CLOUD_HYPERVISOR_PROPOSAL;
    let r = ask(ServerConfig::default(), &proposal(minor, json));
    cloud_hypervisor_accepts(&r).unwrap();
    assert_eq!(reply_caps(&r).max_msg_fds, 16);
}

#[test]
fn libvfio_user_client_accepts_our_reply() {
    let (minor, json) = LIBVFIO_USER_PROPOSAL;
    let r = ask(ServerConfig::default(), &proposal(minor, json));
    libvfio_user_client_accepts(&r).unwrap();
    // It asked for 32: a client accepting 32 fds takes a server that does.
    assert_eq!(reply_caps(&r).max_msg_fds, 32);
}

/// A server configured far beyond every bound still replies within all of them.
#[test]
fn every_client_accepts_a_reply_of_an_oversized_server() {
    let cfg = ServerConfig {
        max_msg_fds: u32::MAX,
        max_data_xfer_size: u32::MAX,
        max_dma_maps: u32::MAX,
        ..ServerConfig::default()
    };
    for (minor, json) in [
        QEMU_PROPOSAL,
        CLOUD_HYPERVISOR_PROPOSAL,
        LIBVFIO_USER_PROPOSAL,
    ] {
        let r = ask(cfg.clone(), &proposal(minor, json));
        // QEMU's version rule (minor 0) holds for replies to QEMU's own proposal only.
        let checks: [(&str, Check, bool); 4] = [
            ("QEMU", qemu_client_accepts, minor == 0),
            ("Cloud Hypervisor", cloud_hypervisor_accepts, true),
            ("libvfio-user", libvfio_user_client_accepts, true),
            ("nestio", nestio_client_accepts, true),
        ];
        for (name, check, _) in checks.iter().filter(|c| c.2) {
            if let Err(e) = check(&r) {
                panic!("{name} refuses the reply to {json}: {e}");
            }
        }
    }
    // A client asking for 4096 fds gets at most 1024 (libvfio-user's bound).
    let r = ask(
        cfg,
        &proposal(2, r#"{"capabilities":{"max_msg_fds":4096}}"#),
    );
    assert_eq!(reply_caps(&r).max_msg_fds, 1024);
    libvfio_user_client_accepts(&r).unwrap();
}

/// The checks can fail: the reply nestio sent before (64 fds) is what QEMU refused, and
/// each parser's other limits bite.
#[test]
fn the_checks_refuse_what_each_parser_refuses() {
    let enc = |minor: u16, caps: Capabilities| {
        let mut p = Vec::new();
        Version {
            major: 0,
            minor,
            caps,
        }
        .encode_into(&mut p);
        p
    };
    let old = Capabilities {
        max_msg_fds: 64,
        ..Capabilities::default()
    };
    assert_eq!(
        qemu_client_accepts(&enc(0, old.clone())).unwrap_err(),
        "malformed max_msg_fds"
    );
    cloud_hypervisor_accepts(&enc(0, old)).unwrap();
    let big_xfer = Capabilities {
        max_data_xfer_size: 128 << 20,
        ..Capabilities::default()
    };
    assert!(qemu_client_accepts(&enc(0, big_xfer)).is_err());
    assert!(qemu_client_accepts(&enc(2, Capabilities::default())).is_err());
    let huge = Capabilities {
        max_data_xfer_size: u32::MAX,
        ..Capabilities::default()
    };
    assert!(libvfio_user_client_accepts(&enc(2, huge)).is_err());
    assert!(libvfio_user_client_accepts(&enc(3, Capabilities::default())).is_err());
    let twin = Capabilities {
        twin_socket: Some(proto::TwinSocket {
            supported: true,
            fd_index: Some(0),
        }),
        ..Capabilities::default()
    };
    assert!(libvfio_user_client_accepts(&enc(2, twin)).is_err());
    let no_pgsize = proposal(1, r#"{"capabilities":{"migration":{"max_bitmap_size":1}}}"#);
    assert!(cloud_hypervisor_accepts(&no_pgsize).is_err());
    assert!(cloud_hypervisor_accepts(&proposal(1, "{}")).is_err());
    assert!(
        libvfio_user_server_accepts(&proposal(2, r#"{"capabilities":{"max_msg_fds":2000}}"#))
            .is_err()
    );
    assert!(libvfio_user_server_accepts(&proposal(
        2,
        r#"{"capabilities":{"migration":{"pgsize":65536}}}"#
    ))
    .is_err());
    let mut unterminated = proposal(0, "{}");
    unterminated.pop();
    assert!(qemu_client_accepts(&unterminated).is_err());
}

/// Capture the VERSION proposal of nestio's client built with `config`.
fn client_proposal(config: ClientConfig) -> Vec<u8> {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let m = recv(&b).expect("a VERSION proposal");
        assert_eq!(m.header.cmd, Command::Version as u16);
        // Refuse, so the client gives up at once.
        send_error_reply(&b, &m);
        m.payload
    });
    assert!(Client::from_stream(a, config).is_err());
    t.join().unwrap()
}

fn send_error_reply(sock: &UnixStream, m: &nestio_vfio_user::socket::Message) {
    nestio_vfio_user::socket::send_message(sock, &m.header.error_reply(libc::ENOTSUP), &[], &[])
        .unwrap();
}

#[test]
fn every_server_accepts_our_proposal() {
    for cfg in [
        ClientConfig::default(),
        ClientConfig {
            max_msg_fds: u32::MAX,
            max_data_xfer_size: u32::MAX,
            ..ClientConfig::default()
        },
    ] {
        let p = client_proposal(cfg);
        libvfio_user_server_accepts(&p).unwrap();
        cloud_hypervisor_accepts(&p).unwrap();
        let v = Version::decode(&p).unwrap();
        assert!(v.caps.max_msg_fds <= 1024);
        assert!(v.caps.max_data_xfer_size <= 64 << 20);
    }
    // nestio's default client still asks for (and gets from nestio's server) 64 fds.
    let v = Version::decode(&client_proposal(ClientConfig::default())).unwrap();
    assert_eq!(v.caps.max_msg_fds, 64);
}

/// nestio's `nestio_nested_iommu` key: never in the reply to a real client's proposal
/// (QEMU would warn about it), on the raw JSON; and a nestio client that proposes it
/// is still accepted by every server parser (they ignore keys they do not know).
#[test]
fn nested_iommu_key_only_between_nestio_peers() {
    for (minor, json) in [
        QEMU_PROPOSAL,
        CLOUD_HYPERVISOR_PROPOSAL,
        LIBVFIO_USER_PROPOSAL,
    ] {
        let r = ask(ServerConfig::default(), &proposal(minor, json));
        let (_, _, v) = split(&r).unwrap();
        let caps = caps_of(&v).unwrap().unwrap();
        assert!(
            !caps.contains_key("nestio_nested_iommu"),
            "sent unasked in reply to {json}"
        );
    }
    let p = client_proposal(ClientConfig {
        nested_iommu: Some(nestio_vfio_user::nested_iommu::NestedIommuCaps::default()),
        ..ClientConfig::default()
    });
    let (_, _, v) = split(&p).unwrap();
    assert!(caps_of(&v).unwrap().unwrap()["nestio_nested_iommu"]["smmuv3"]["version"] == 1);
    libvfio_user_server_accepts(&p).unwrap();
    cloud_hypervisor_accepts(&p).unwrap();
    // Not proposed by default.
    let (_, _, v) = split(&client_proposal(ClientConfig::default())).unwrap();
    assert!(!caps_of(&v)
        .unwrap()
        .unwrap()
        .contains_key("nestio_nested_iommu"));
}
