//! Differential test of the SMMUv3 model against QEMU's `smmuv3` (the oracle).
//!
//! Each scenario in `oracle/aarch64/smmu/scenarios/*.scn` is a list of steps —
//! guest-RAM writes, SMMU register writes and reads, and DMAs of QEMU's `edu` PCI
//! device (00:01.0, stream ID 0x8) — run twice: on `qemu-system-aarch64 -M
//! virt,iommu=smmuv3` through qtest (guest RAM and MMIO, no firmware; edu's DMA
//! timer runs on the virtual clock, so the VM is not stopped with `-S`), and on
//! nestio's model with a software edu. Every read (registers, RAM dumps: event
//! queue records, DMA'd bytes) and, at the end, the list of successful
//! translations (QEMU's `smmuv3_translate_success` trace events; the model's
//! translate results) are observations. The model must produce exactly the
//! observations recorded from QEMU in `oracle/aarch64/smmu/expected/<name>.txt`;
//! when qemu-system-aarch64 is installed the test also runs QEMU live and checks
//! it still produces the recording (`NESTIO_ORACLE_RECORD=1` rewrites the
//! recordings from QEMU instead).
//!
//! Step language (numbers decimal or 0x-hex, `#` comments):
//! `ram64 ADDR VALUE`, `reg32 OFF VALUE`, `reg64 OFF VALUE`, `read32 OFF`,
//! `dump ADDR LEN`, `dma_in IOVA LEN BUFOFF` (device reads RAM at IOVA into its
//! buffer), `dma_out BUFOFF IOVA LEN` (device writes its buffer to IOVA).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nestio_iommu::smmuv3::{FlatMemory, Smmu, SmmuMemory, Transaction};

const SMMU_BASE: u64 = 0x0905_0000;
const RAM_BASE: u64 = 0x4000_0000;
const RAM_SIZE: usize = 64 << 20;
const EDU_BAR: u64 = 0x1000_0000;
const EDU_ECAM: u64 = 0x40_1000_8000;
const EDU_SID: u32 = 0x8;
const EDU_BUF: u64 = 0x4_0000;
const EDU_DMA_MASK: u64 = (1 << 28) - 1;

#[derive(Debug, Clone)]
enum Step {
    Ram64(u64, u64),
    Reg(u64, u32, u64),
    Read32(u64),
    Dump(u64, u64),
    DmaIn { iova: u64, len: u64, off: u64 },
    DmaOut { off: u64, iova: u64, len: u64 },
}

fn num(s: &str) -> u64 {
    let r = if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(&h.replace('_', ""), 16)
    } else {
        s.parse()
    };
    r.unwrap_or_else(|e| panic!("bad number {s:?}: {e}"))
}

fn parse(text: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let a = |i: usize| {
            num(w
                .get(i)
                .unwrap_or_else(|| panic!("line {}: missing operand", n + 1)))
        };
        let step = match w[0] {
            "ram64" => Step::Ram64(a(1), a(2)),
            "reg32" => Step::Reg(a(1), 4, a(2)),
            "reg64" => Step::Reg(a(1), 8, a(2)),
            "read32" => Step::Read32(a(1)),
            "dump" => Step::Dump(a(1), a(2)),
            "dma_in" => Step::DmaIn {
                iova: a(1),
                len: a(2),
                off: a(3),
            },
            "dma_out" => Step::DmaOut {
                off: a(1),
                iova: a(2),
                len: a(3),
            },
            other => panic!("line {}: unknown step {other:?}", n + 1),
        };
        out.push(step);
    }
    out
}

/// One side of the differential.
trait Target {
    fn ram64(&mut self, addr: u64, v: u64);
    fn reg_write(&mut self, off: u64, size: u32, v: u64);
    fn reg_read32(&mut self, off: u64) -> u32;
    fn dump(&mut self, addr: u64, len: u64) -> Vec<u8>;
    fn dma(&mut self, to_ram: bool, iova: u64, len: u64, off: u64);
    /// Successful translations, in order: (sid, iova, output).
    fn translations(&mut self) -> Vec<(u32, u64, u64)>;
}

fn run(t: &mut dyn Target, steps: &[Step]) -> Vec<String> {
    let mut obs = Vec::new();
    for s in steps {
        match *s {
            Step::Ram64(a, v) => t.ram64(a, v),
            Step::Reg(o, sz, v) => t.reg_write(o, sz, v),
            Step::Read32(o) => obs.push(format!("read32 {o:#x} = {:#010x}", t.reg_read32(o))),
            Step::Dump(a, l) => {
                let bytes = t.dump(a, l);
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                obs.push(format!("dump {a:#x} {l} = {hex}"));
            }
            Step::DmaIn { iova, len, off } => t.dma(false, iova, len, off),
            Step::DmaOut { off, iova, len } => t.dma(true, iova, len, off),
        }
    }
    for (sid, iova, out) in t.translations() {
        obs.push(format!("xlate sid={sid:#x} iova={iova:#x} -> {out:#x}"));
    }
    obs
}

/// nestio's model with a software edu.
struct Model {
    mem: FlatMemory,
    smmu: Smmu,
    buf: Vec<u8>,
    xlates: Vec<(u32, u64, u64)>,
}

impl Target for Model {
    fn ram64(&mut self, addr: u64, v: u64) {
        self.mem.write_u64(addr, v).expect("scenario writes RAM");
    }
    fn reg_write(&mut self, off: u64, size: u32, v: u64) {
        self.smmu.write(&self.mem, off, size, v);
    }
    fn reg_read32(&mut self, off: u64) -> u32 {
        self.smmu.read(off, 4) as u32
    }
    fn dump(&mut self, addr: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0; len as usize];
        self.mem.read(addr, &mut b).expect("scenario dumps RAM");
        b
    }
    fn dma(&mut self, to_ram: bool, iova: u64, len: u64, off: u64) {
        // edu clamps its DMA addresses to its 28-bit DMA mask.
        let iova = iova & EDU_DMA_MASK;
        // Like QEMU's address_space_rw: one translation per page-bounded chunk; a
        // chunk whose translation fails is skipped 4 bytes at a time (the access
        // size of the unassigned region QEMU falls back to), each retried.
        let mut done = 0;
        while done < len {
            let a = iova + done;
            let page_chunk = (0x1000 - (a & 0xfff)).min(len - done);
            let t = Transaction {
                sid: EDU_SID,
                ssid: None,
                addr: a,
                write: to_ram,
            };
            let chunk = match self.smmu.translate(&self.mem, t) {
                Ok(tr) => {
                    if self.smmu.enabled() {
                        self.xlates.push((EDU_SID, a, tr.addr));
                    }
                    let b = (off + done) as usize..(off + done + page_chunk) as usize;
                    if to_ram {
                        let _ = self.mem.write(tr.addr, &self.buf[b]);
                    } else {
                        let _ = self.mem.read(tr.addr, &mut self.buf[b]);
                    }
                    page_chunk
                }
                Err(_) => page_chunk.min(4),
            };
            done += chunk;
        }
    }
    fn translations(&mut self) -> Vec<(u32, u64, u64)> {
        std::mem::take(&mut self.xlates)
    }
}

/// QEMU through qtest.
struct Qemu {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    trace: PathBuf,
}

impl Qemu {
    fn start(trace: PathBuf) -> std::io::Result<Self> {
        let mut child = Command::new("qemu-system-aarch64")
            .args([
                "-M",
                "virt,iommu=smmuv3",
                "-accel",
                "tcg",
                "-qtest",
                "stdio",
                "-display",
                "none",
                "-nodefaults",
                "-m",
                "256",
                "-device",
                "edu",
                "-trace",
                "smmuv3_translate_success",
                "-D",
            ])
            .arg(&trace)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut q = Qemu {
            child,
            stdin,
            stdout,
            trace,
        };
        // edu BAR0 at EDU_BAR, memory decoding and bus mastering on.
        q.cmd(&format!("writel {:#x} {EDU_BAR:#x}", EDU_ECAM + 0x10));
        q.cmd(&format!("writel {:#x} 0x6", EDU_ECAM + 4));
        Ok(q)
    }

    fn cmd(&mut self, c: &str) -> u64 {
        writeln!(self.stdin, "{c}").expect("qtest write");
        self.stdin.flush().expect("qtest flush");
        loop {
            let mut l = String::new();
            let n = self.stdout.read_line(&mut l).expect("qtest read");
            assert!(n > 0, "QEMU exited during {c:?}");
            if let Some(rest) = l.strip_prefix("OK") {
                let v = rest.trim();
                return v
                    .strip_prefix("0x")
                    .map(|h| u64::from_str_radix(h, 16).expect("qtest hex"))
                    .unwrap_or(0);
            }
            assert!(!l.starts_with("FAIL"), "qtest {c:?}: {l}");
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target for Qemu {
    fn ram64(&mut self, addr: u64, v: u64) {
        self.cmd(&format!("writeq {addr:#x} {v:#x}"));
    }
    fn reg_write(&mut self, off: u64, size: u32, v: u64) {
        let op = if size == 8 { "writeq" } else { "writel" };
        self.cmd(&format!("{op} {:#x} {v:#x}", SMMU_BASE + off));
    }
    fn reg_read32(&mut self, off: u64) -> u32 {
        self.cmd(&format!("readl {:#x}", SMMU_BASE + off)) as u32
    }
    fn dump(&mut self, addr: u64, len: u64) -> Vec<u8> {
        (0..len)
            .map(|i| self.cmd(&format!("readb {:#x}", addr + i)) as u8)
            .collect()
    }
    fn dma(&mut self, to_ram: bool, iova: u64, len: u64, off: u64) {
        let (src, dst) = if to_ram {
            (EDU_BUF + off, iova)
        } else {
            (iova, EDU_BUF + off)
        };
        self.cmd(&format!("writeq {:#x} {src:#x}", EDU_BAR + 0x80));
        self.cmd(&format!("writeq {:#x} {dst:#x}", EDU_BAR + 0x88));
        self.cmd(&format!("writeq {:#x} {len:#x}", EDU_BAR + 0x90));
        let cmd = if to_ram { 3 } else { 1 };
        self.cmd(&format!("writeq {:#x} {cmd:#x}", EDU_BAR + 0x98));
        // edu runs the DMA from a 100 ms virtual-clock timer; RUN (bit 0) clears.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cmd(&format!("readq {:#x}", EDU_BAR + 0x98)) & 1 != 0 {
            assert!(Instant::now() < deadline, "edu DMA did not complete");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn translations(&mut self) -> Vec<(u32, u64, u64)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.trace).unwrap_or_default();
        let field = |l: &str, k: &str| -> Option<u64> {
            let v = l.split_whitespace().find_map(|w| w.strip_prefix(k))?;
            let v = v.trim_end_matches(',');
            u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
        };
        text.lines()
            .filter(|l| l.contains("smmuv3_translate_success"))
            .filter_map(|l| {
                Some((
                    field(l, "sid=")? as u32,
                    field(l, "iova=")?,
                    field(l, "translated=")?,
                ))
            })
            .collect()
    }
}

fn oracle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../oracle/aarch64/smmu")
}

fn model_path_of(name: &str) -> PathBuf {
    oracle_dir()
        .join("expected")
        .join(format!("{name}.model.txt"))
}

fn qemu_available() -> bool {
    Command::new("qemu-system-aarch64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn scenarios() -> Vec<(String, Vec<Step>)> {
    let dir = oracle_dir().join("scenarios");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "scn"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no scenarios in {}", dir.display());
    let only = std::env::var("NESTIO_SMMU_SCENARIO").ok();
    names
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, parse(&std::fs::read_to_string(&p).expect("scenario")))
        })
        .filter(|(n, _)| only.as_deref().is_none_or(|o| o == n))
        .collect()
}

fn diff(name: &str, what: &str, expected: &[String], got: &[String]) -> Option<String> {
    if expected == got {
        return None;
    }
    let mut s = format!("{name}: {what} differs\n");
    for i in 0..expected.len().max(got.len()) {
        let e = expected.get(i).map(String::as_str).unwrap_or("<none>");
        let g = got.get(i).map(String::as_str).unwrap_or("<none>");
        if e != g {
            s += &format!("  #{i}\n    qemu:  {e}\n    model: {g}\n");
        }
    }
    Some(s)
}

#[test]
fn smmuv3_matches_qemu() {
    let record = std::env::var_os("NESTIO_ORACLE_RECORD").is_some();
    let live = qemu_available();
    if !live {
        println!(
            "SKIP: qemu-system-aarch64 is not installed: checking the model against the recordings only"
        );
    }
    let mut failures = Vec::new();
    for (name, steps) in scenarios() {
        let expected_path = oracle_dir().join("expected").join(format!("{name}.txt"));
        let mut expected: Vec<String> = std::fs::read_to_string(&expected_path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if live {
            let trace = std::env::temp_dir()
                .join(format!("nestio-smmu-{}-{name}.trace", std::process::id()));
            let _ = std::fs::remove_file(&trace);
            let mut q = Qemu::start(trace.clone()).expect("start qemu-system-aarch64");
            let got = run(&mut q, &steps);
            drop(q);
            let _ = std::fs::remove_file(&trace);
            if record {
                std::fs::write(&expected_path, got.join("\n") + "\n").expect("write recording");
                expected = got;
            } else if let Some(d) = diff(&name, "QEMU vs its recording", &expected, &got) {
                failures.push(d);
            }
        }
        assert!(
            !expected.is_empty(),
            "{name}: no recording (run with NESTIO_ORACLE_RECORD=1)"
        );
        let mut m = Model {
            mem: FlatMemory::new(RAM_BASE, RAM_SIZE),
            smmu: Smmu::new(),
            buf: vec![0; 4096],
            xlates: Vec::new(),
        };
        let got = run(&mut m, &steps);
        if record && name.starts_with("qemu72_") {
            // Reviewed by hand against the architecture: see the README.
            std::fs::write(model_path_of(&name), got.join("\n") + "\n").expect("write");
        }
        // A scenario exercising a documented QEMU 7.2 defect carries the model's
        // (architected) expectation next to QEMU's recording.
        let model_path = model_path_of(&name);
        if let Ok(text) = std::fs::read_to_string(&model_path) {
            expected = text.lines().map(str::to_owned).collect();
        }
        if let Some(d) = diff(&name, "model vs QEMU", &expected, &got) {
            failures.push(d);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
