//! Live migration as a user runs it: `nestio run --control` on the source, `nestio run
//! --migrate-listen` on the destination with a new `nestio device sample` process,
//! `nestio status` and `nestio migrate` in between; the guest (DMA busy, checking its
//! memory) finishes on the destination with every checksum matching. Sandbox on.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nestio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nestio"))
}

fn device(path: &Path) -> Proc {
    let mut c = nestio()
        .args(["device", "sample", "--socket"])
        .arg(path)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nestio device");
    let t = Instant::now();
    while !common::listening(c.id(), path) {
        assert!(c.try_wait().unwrap().is_none(), "device exited");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "device never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc(c)
}

/// Start `nestio run` collecting stdout (and stderr) lines.
fn run(args: &[&str]) -> (Proc, Arc<Mutex<String>>) {
    let mut c = nestio()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nestio run");
    let out = Arc::new(Mutex::new(String::new()));
    for pipe in [
        Box::new(c.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(c.stderr.take().unwrap()),
    ] {
        let o = out.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                o.lock().unwrap().push_str(&(l + "\n"));
            }
        });
    }
    (Proc(c), out)
}

fn wait_text(out: &Arc<Mutex<String>>, what: &str, limit: Duration) {
    let t = Instant::now();
    while !out.lock().unwrap().contains(what) {
        assert!(
            t.elapsed() < limit,
            "no {what:?} within {limit:?}: {}",
            out.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(p: &mut Proc, limit: Duration) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(t.elapsed() < limit, "process did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nestio_migrate_moves_a_running_guest_to_a_new_vmm_and_device() {
    if !common::kvm_or_skip("nestio_migrate_moves_a_running_guest_to_a_new_vmm_and_device") {
        return;
    }
    let dir = common::Dir::new("migrate", "cli");
    let (s1, s2, ctl, mig): (PathBuf, PathBuf, PathBuf, PathBuf) = (
        dir.path("src-dev.sock"),
        dir.path("dst-dev.sock"),
        dir.path("vm.ctl"),
        dir.path("mig.sock"),
    );
    let _d1 = device(&s1);
    let _d2 = device(&s2);
    let common_args = |dev: &Path| {
        vec![
            "--guest".to_string(),
            "sampletest".into(),
            "--cmdline".into(),
            "mode=migrate rounds=4000".into(),
            "--device".into(),
            format!("vfio-user={}", dev.display()),
        ]
    };
    let mut src_args = common_args(&s1);
    src_args.extend(["--control".into(), ctl.display().to_string()]);
    let mut dst_args = common_args(&s2);
    dst_args.extend(["--migrate-listen".into(), format!("unix:{}", mig.display())]);
    let a: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let (mut src, src_out) = run(&a);
    let a: Vec<&str> = dst_args.iter().map(String::as_str).collect();
    let (mut dst, dst_out) = run(&a);
    wait_text(&src_out, "round 200", Duration::from_secs(60));
    wait_text(
        &dst_out,
        "waiting for an incoming migration",
        Duration::from_secs(60),
    );

    let st = nestio()
        .args(["status", "--vm"])
        .arg(&ctl)
        .output()
        .unwrap();
    let st_text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success(), "{st:?}");
    assert!(st_text.contains("state=running vcpus=1"), "{st_text}");

    let m = nestio()
        .args(["migrate", "--vm"])
        .arg(&ctl)
        .arg("--to")
        .arg(format!("unix:{}", mig.display()))
        .args(["--downtime-ms", "300"])
        .output()
        .unwrap();
    let m_text = String::from_utf8_lossy(&m.stdout);
    eprintln!("{m_text}{}", String::from_utf8_lossy(&m.stderr));
    assert!(m.status.success(), "{m_text}");
    assert!(
        m_text.contains("pass 0:") && m_text.contains("expected downtime"),
        "{m_text}"
    );
    assert!(m_text.contains("migration done"), "{m_text}");

    assert_eq!(
        wait_exit(&mut src, Duration::from_secs(30)),
        0,
        "{}",
        src_out.lock().unwrap()
    );
    assert!(src_out.lock().unwrap().contains("migrated away"));
    assert_eq!(
        wait_exit(&mut dst, Duration::from_secs(120)),
        0,
        "{}",
        dst_out.lock().unwrap()
    );
    let d = dst_out.lock().unwrap().clone();
    assert!(d.contains("migration received"), "{d}");
    assert!(d.contains("migtest verified 32 blocks, 64 pages"), "{d}");
    assert!(!d.contains("MISMATCH"), "{d}");
    // A stopped VM's control socket is gone; asking it fails loudly.
    let gone = nestio()
        .args(["status", "--vm"])
        .arg(&ctl)
        .output()
        .unwrap();
    assert!(!gone.status.success());
}
