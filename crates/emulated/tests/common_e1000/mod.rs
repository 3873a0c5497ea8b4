//! Shared helpers for the e1000-over-vfio-user tests: the guest driver (the same file
//! the benchmark uses, `src/e1000_bench.rs`), a served device on a socket path, a
//! deadlock guard and the CI skip rule.
#![allow(dead_code)]

pub use nestio_emulated::e1000_bench as driver;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nestio_emulated::e1000::E1000;
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig, ServerError, ServerStats};

/// Aborts the whole test process if the test holding it runs longer than 300 s (a hang
/// bound only; each wait inside a test is bounded at 60 s, and a test waits several
/// times on a possibly loaded CI machine).
pub struct Guard(#[allow(dead_code)] mpsc::Sender<()>);

pub fn guard(name: &'static str) -> Guard {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(300)) {
            eprintln!("DEADLOCK GUARD: {name} still running after 300 s; aborting");
            std::process::abort();
        }
    });
    Guard(tx)
}

/// Print a loud SKIP, or fail when CI=true.
pub fn skip_or_fail(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true and the test cannot run: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// A device served over vfio-user on a socket path by a server thread.
pub struct Served {
    pub client: Arc<Client>,
    pub server: JoinHandle<(Result<(), ServerError>, ServerStats)>,
    pub path: PathBuf,
}

static SOCKETS: AtomicU32 = AtomicU32::new(0);

/// Serve `dev` on a fresh socket path (one session) and connect a client to it.
pub fn serve(dev: Arc<E1000>) -> Served {
    serve_with(dev, ClientConfig::default())
}

/// [`serve`] with client settings (e.g. no twin socket).
pub fn serve_with(dev: Arc<E1000>, config: ClientConfig) -> Served {
    let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("nestio-e1k-{}-{n}.sock", std::process::id()));
    let listener: UnixListener = nestio_vfio_user::bind(&path).expect("bind the vfio-user socket");
    let p2 = path.clone();
    let server = std::thread::spawn(move || {
        let server = Server::new(dev, ServerConfig::default());
        let r = match listener.accept() {
            Ok((stream, _)) => {
                let _ = std::fs::remove_file(&p2);
                server.serve_stream(stream)
            }
            Err(e) => Err(e.into()),
        };
        (r, server.stats())
    });
    let stream = std::os::unix::net::UnixStream::connect(&path).expect("connect the socket");
    let client = Arc::new(Client::from_stream(stream, config).expect("vfio-user negotiation"));
    Served {
        client,
        server,
        path,
    }
}

impl Served {
    /// Disconnect (every other holder of the client must be gone) and check the
    /// server ended its session cleanly; returns its counters.
    pub fn finish(self) -> ServerStats {
        let Served { client, server, .. } = self;
        assert_eq!(
            Arc::strong_count(&client),
            1,
            "the client is still held elsewhere"
        );
        drop(client);
        let (r, stats) = server.join().expect("server thread panicked");
        r.expect("server session ended with an error");
        assert_eq!(stats.sessions, 1);
        assert_eq!(stats.broken_sessions, 0);
        stats
    }
}
