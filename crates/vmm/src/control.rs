//! The per-VM control socket (`nestio run --control PATH`): `nestio status`, `stop` and
//! `migrate` talk to a running VMM through it.
//!
//! A UNIX socket, mode 0600, and each connection's peer uid must be the VMM's own. One
//! request per connection: a line of at most [`MAX_REQUEST`] bytes —
//!
//! - `status` → `ok state=running|paused|migrating|migrated vcpus=N memory=BYTES`;
//! - `stop` → `ok` (the VM stops as on SIGINT);
//! - `migrate DOWNTIME_MS` with the connected migration stream attached as an fd
//!   (SCM_RIGHTS): the *client* connects to the destination and hands the socket over,
//!   so the VMM, sandboxed, never creates a socket. The VMM answers `progress ...` lines
//!   while it migrates and ends with `ok <report>` or `error: <what happened>`.
//!
//! Anything else is answered `error: ...`. Each request runs on a thread of its own
//! (at most [`MAX_ACTIVE`] at once), so `status` answers during a migration. The server
//! thread is started before the seccomp filter is installed and inherits it.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::migration::addr::Stream;
use crate::migration::{MigrationParams, MigrationSource};
use crate::vm::VmHandle;

/// Longest request line.
pub const MAX_REQUEST: usize = 256;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be made.
    #[error("control socket {path}: {message}")]
    Listen {
        /// Path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The VMM could not be reached.
    #[error("cannot reach the VM's control socket {path}: {err} (is `nestio run --control {path}` running?)", path = .path.display())]
    Connect {
        /// Path.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The VMM answered with an error.
    #[error("the VM answered: {0}")]
    Remote(String),
    /// The connection broke.
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
}

/// What the server needs of the VM.
#[derive(Clone)]
pub struct ControlTarget {
    /// Stop / pause state.
    pub handle: VmHandle,
    /// Migration.
    pub source: MigrationSource,
}

/// A running control server (the thread ends with the process).
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Listen on `path` and serve requests on a thread of its own.
    pub fn start(path: &Path, target: ControlTarget) -> Result<ControlServer, ControlError> {
        let listener =
            nestio_vfio_user::socket::listen_private(path).map_err(|e| ControlError::Listen {
                path: path.into(),
                message: e.to_string(),
            })?;
        let target = Arc::new(target);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, target))
            .map_err(|e| ControlError::Listen {
                path: path.into(),
                message: format!("cannot start its thread: {e}"),
            })?;
        Ok(ControlServer { path: path.into() })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Requests served at once (a migration takes long; `status` must still answer).
const MAX_ACTIVE: usize = 4;

fn serve(listener: UnixListener, target: Arc<ControlTarget>) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        match nestio_vfio_user::socket::peer_credentials(&s) {
            Ok(c) if c.uid == me => {}
            Ok(c) => {
                tracing::warn!(uid = c.uid, "control connection from another user refused");
                continue;
            }
            Err(_) => continue,
        }
        use std::sync::atomic::Ordering::SeqCst;
        if active.fetch_add(1, SeqCst) >= MAX_ACTIVE {
            active.fetch_sub(1, SeqCst);
            let mut s = s;
            let _ = writeln!(
                s,
                "error: {MAX_ACTIVE} control requests are already running; try again"
            );
            continue;
        }
        let (t, a) = (target.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("control-req".into())
            .spawn(move || {
                if let Err(e) = handle(s, &t) {
                    tracing::debug!(error = %e, "control connection");
                }
                a.fetch_sub(1, SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, SeqCst);
            tracing::warn!(error = %e, "cannot start a control request thread");
        }
    }
}

/// Read one request line (and an fd if one came with it).
fn read_request(s: &UnixStream) -> std::io::Result<(String, Option<OwnedFd>)> {
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut buf = [0u8; MAX_REQUEST];
    let mut got = 0;
    let mut fd = None;
    while !buf[..got].contains(&b'\n') {
        if got == MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request line too long",
            ));
        }
        let (n, f) = s
            .recv_with_fd(&mut buf[got..])
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if let Some(f) = f {
            // Owned at once; a second fd replaces (and closes) the first.
            fd = Some(OwnedFd::from(f));
        }
        if n == 0 {
            break;
        }
        got += n;
    }
    let end = buf[..got].iter().position(|&b| b == b'\n').unwrap_or(got);
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "request is not UTF-8"))?
        .trim()
        .to_string();
    Ok((line, fd))
}

fn handle(mut s: UnixStream, t: &ControlTarget) -> std::io::Result<()> {
    let (line, fd) = match read_request(&s) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(s, "error: {e}");
            return Err(e);
        }
    };
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("status"), None, None) => {
            let state = if t.source.migrated() {
                "migrated"
            } else if t.source.busy.load(std::sync::atomic::Ordering::SeqCst) {
                "migrating"
            } else if t.handle.is_paused() {
                "paused"
            } else {
                "running"
            };
            writeln!(
                s,
                "ok state={state} vcpus={} memory={}",
                t.source.cpus, t.source.memory
            )
        }
        (Some("stop"), None, None) => {
            t.handle.stop();
            writeln!(s, "ok")
        }
        (Some("migrate"), Some(ms), None) => {
            let Ok(ms) = ms.parse::<u64>() else {
                return writeln!(s, "error: downtime {ms:?} is not a number of milliseconds");
            };
            let Some(fd) = fd else {
                return writeln!(
                    s,
                    "error: no migration stream attached (use `nestio migrate --vm PATH --to ADDR`)"
                );
            };
            let stream = match Stream::from_fd(fd) {
                Ok(st) => st,
                Err(e) => return writeln!(s, "error: {e}"),
            };
            let params = MigrationParams {
                downtime: Duration::from_millis(ms),
                ..MigrationParams::default()
            };
            s.set_read_timeout(None)?;
            let mut out = s.try_clone()?;
            let r = t.source.migrate(stream, params, &mut |p| {
                let _ = writeln!(out, "progress {p}");
            });
            match r {
                Ok(report) => writeln!(s, "ok {report}"),
                Err(e) => writeln!(s, "error: {e} (the VM keeps running here)"),
            }
        }
        _ => writeln!(
            s,
            "error: unknown request {line:?}: use status, stop or migrate DOWNTIME_MS"
        ),
    }
}

/// Client: send `request` (with `fd` attached) to the VM at `path`; each answer line is
/// handed to `line`. Returns the final `ok` line's text, or the VM's error.
pub fn request(
    path: &Path,
    request: &str,
    fd: Option<OwnedFd>,
    line: &mut dyn FnMut(&str),
) -> Result<String, ControlError> {
    let s = UnixStream::connect(path).map_err(|err| ControlError::Connect {
        path: path.into(),
        err,
    })?;
    let msg = format!("{request}\n");
    match &fd {
        Some(f) => {
            s.send_with_fd(msg.as_bytes(), f.as_raw_fd())
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        None => (&s).write_all(msg.as_bytes())?,
    }
    drop(fd);
    let r = BufReader::new(s);
    for l in r.lines() {
        let l = l?;
        if let Some(rest) = l.strip_prefix("ok") {
            return Ok(rest.trim().to_string());
        }
        if let Some(e) = l.strip_prefix("error: ") {
            return Err(ControlError::Remote(e.to_string()));
        }
        line(&l);
    }
    Err(ControlError::Remote(
        "the VM closed the control connection without an answer".into(),
    ))
}
