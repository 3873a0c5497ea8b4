//! `nestio bench --only nested`, the cross-process part: the register-read cost at depth
//! 3 of a stack of real processes — an e1000 `nestio device`, two `nestio run --export`
//! levels (each a KVM VM running `hello`, the second on the first's window) and this
//! process as the innermost level — over depth 1 (this process as a client of a second
//! e1000 process), with every BAR access forwarded by levels 1 and 2 and with the BAR
//! channel the device process granted (`nestio_nested::channel_handoff`). Same run, same
//! pinned CPU (the processes inherit this thread's affinity), depths interleaved in
//! rounds, best batch mean of each kept. Needs /dev/kvm for the exporting levels; says
//! SKIP without it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::{pci_index, VfioDevice};
use nestio_nested::{request_grant, ChannelBars};
use nestio_vfio_user::Client;

use crate::CmdResult;

/// A process this benchmark started; killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory for the sockets, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(args: &[&str], wait_for: &Path) -> Result<Proc, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find nestio itself: {e}"))?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nestio {}: {e}", args.join(" ")))?;
    let mut p = Proc(child);
    let t = Instant::now();
    while !nestio_vfio_user::listening(p.0.id(), wait_for) {
        if p.0.try_wait().ok().flatten().is_some() || t.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "nestio {} never listened on {}",
                args.join(" "),
                wait_for.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(p)
}

fn best_mean(
    batches: u32,
    per_batch: u32,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let mut best = f64::INFINITY;
    for _ in 0..batches.max(1) {
        let t = Instant::now();
        for _ in 0..per_batch.max(1) {
            f()?;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(per_batch.max(1)));
    }
    Ok(best)
}

fn read_bar0(dev: &dyn VfioDevice) -> Result<(), String> {
    let mut b = [0u8; 4];
    // STATUS: a plain register read with no side effect.
    dev.region_read(pci_index::BAR0, 8, &mut b)
        .map_err(|e| e.to_string())
}

/// Print the cross-process depth-3 register read against depth 1.
pub fn cross_process(iterations: u32, rounds: u32) -> CmdResult {
    if !Path::new("/dev/kvm").exists() {
        println!(
            "nested register access across processes: SKIP (no /dev/kvm for the exporting levels)"
        );
        return Ok(0);
    }
    let dir = std::env::temp_dir().join(format!("nestio-bench-levels-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let scratch = Scratch(dir);
    let p = |name: &str| scratch.0.join(name);
    let s = |p: &Path| p.display().to_string();
    let e1000 = |sock: &Path| -> Result<Proc, String> {
        spawn(
            &[
                "device",
                "e1000",
                "--net",
                "user",
                "--msi",
                "on",
                "--socket",
                &s(sock),
            ],
            sock,
        )
    };
    let _d1 = e1000(&p("d1"))?;
    let _d3 = e1000(&p("d3"))?;
    let level = |dev: &Path, export: &Path, mem: Option<&Path>| -> Result<Proc, String> {
        let d = format!("vfio-user={}", s(dev));
        let x = format!("vfio-user={}", s(export));
        let mut args = vec!["run", "--guest", "hello", "--device", &d, "--export", &x];
        let m = mem.map(s);
        if let Some(m) = &m {
            args.extend(["--memory-from", m.as_str()]);
        }
        spawn(&args, &PathBuf::from(format!("{}.mem", s(export))))
    };
    let _l1 = level(&p("d3"), &p("l1"), None)?;
    let _l2 = level(&p("l1"), &p("l2"), Some(&p("l1.mem")))?;

    let depth1: Arc<dyn VfioDevice> = Arc::new(Client::connect(p("d1"))?);
    let inner = Arc::new(Client::connect(p("l2"))?);
    let grant = request_grant(&inner)?.ok_or(
        "level 2 granted no BAR channel (is the device process a nestio with BAR channels?)",
    )?;
    let levels = grant.info().levels();
    let channel = ChannelBars::new(inner.clone(), grant, None)?;
    let mediated: Arc<dyn VfioDevice> = inner;
    let (mut b1, mut b3m, mut b3c) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let per = iterations.saturating_mul(4).max(1);
    for _ in 0..rounds.max(1) {
        b1 = b1.min(best_mean(3, per, || read_bar0(depth1.as_ref()))?);
        b3m = b3m.min(best_mean(3, per, || read_bar0(mediated.as_ref()))?);
        b3c = b3c.min(best_mean(3, per, || read_bar0(&channel))?);
    }
    let st = channel.stats();
    println!(
        "nested register access across processes (e1000 `nestio device`, 2 x `nestio run \
         --export`, this process as level 3; best of {rounds} rounds):"
    );
    println!(
        "  depth 1 (client of a device process): BAR 0 read {:.1} us",
        b1 / 1e3
    );
    println!(
        "  depth 3, every BAR access forwarded by levels 1 and 2: {:.1} us (x{:.2})",
        b3m / 1e3,
        b3m / b1
    );
    println!(
        "  depth 3, BAR channel from the device process ({levels} levels crossed by the \
         grant, {} accesses on it): {:.1} us (x{:.2}; goal <= 1.5x)",
        st.channel,
        b3c / 1e3,
        b3c / b1
    );
    Ok(0)
}
