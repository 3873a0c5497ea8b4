//! Device servers in a child process: the test binary re-runs itself with
//! `NESTIO_CHILD_DEVICE=<kind>` and `NESTIO_CHILD_SOCKET=<path>` set, running only the
//! test named `child_device_server`, which serves the device over vfio-user until killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::VfioDevice;

/// A device process; killed (SIGKILL) on drop.
pub struct DeviceProcess {
    pub child: Child,
    pub socket: PathBuf,
}

impl DeviceProcess {
    /// Start a server for `kind` ("sample" or "e1000") and wait until it listens.
    pub fn start(kind: &str) -> DeviceProcess {
        // Directly in the temp directory: a per-process directory shared by the tests
        // of this binary could be removed by one test's drop (when momentarily empty)
        // while another test's device process is about to bind in it.
        let socket = std::env::temp_dir().join(format!(
            "nestio-vmm-test-{}-{kind}-{}.sock",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_device_server",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("NESTIO_CHILD_DEVICE", kind)
            .env("NESTIO_CHILD_SOCKET", &socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn device process");
        let t = Instant::now();
        while !listening(&socket) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "device process exited ({st}) before listening on {}",
                    socket.display()
                );
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("device process did not listen on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        DeviceProcess { child, socket }
    }

    /// SIGKILL the process and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// True once a socket bound to `path` is listening in this process's network namespace
/// (the file alone appears a moment before listen()).
pub fn listening(path: &Path) -> bool {
    nestio_vfio_user::listening(std::process::id(), path)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Serve `dev` on `socket` forever.
pub fn serve(dev: Arc<dyn VfioDevice>, socket: &Path) {
    let listener = nestio_vfio_user::bind(socket).expect("bind");
    let server = nestio_vfio_user::Server::new(dev, nestio_vfio_user::ServerConfig::default());
    let _ = server.serve_listener(listener);
}

/// The body of the `child_device_server` test: true when this process is a child.
pub fn child_main() -> bool {
    let (Ok(kind), Ok(socket)) = (
        std::env::var("NESTIO_CHILD_DEVICE"),
        std::env::var("NESTIO_CHILD_SOCKET"),
    ) else {
        return false;
    };
    // Die with the test that started us, even if it crashes.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let dev: Arc<dyn VfioDevice> = match kind.as_str() {
        "sample" => nestio_emulated::sample::sample_device().expect("sample device"),
        "e1000" => {
            let backend = nestio_net::open_backend("user", None).expect("user network");
            nestio_emulated::e1000::E1000::new(
                nestio_emulated::e1000::E1000Config::new(backend).with_msi(true),
            )
            .expect("e1000")
        }
        other => panic!("unknown child device {other}"),
    };
    serve(dev, Path::new(&socket));
    true
}
