//! Replays QEMU's recorded sPAPR TCE / DDW calls (made by a real pseries Linux 6.1,
//! `oracle/ppc64/record-tce.sh`) into nestio's TCE model: every return code, window
//! address, LIOBN, `H_GET_TCE` value and recorded translation must match QEMU's.
//!
//! Recording format: `oracle/ppc64/tce_normalize.py`. What QEMU's trace events do not
//! carry is reconstructed, and said so here:
//! - `H_PUT_TCE_INDIRECT` traces only the last entry written; Linux maps one physically
//!   contiguous range per call, so the list is rebuilt as consecutive pages ending at
//!   that entry — and the recorded translations (`xlate`) of the pages check it.
//! - `H_STUFF_TCE` traces the bus address after its loop; the start is that minus
//!   `npages` pages.

use std::collections::HashMap;
use std::path::PathBuf;

use nestio_iommu::tce::abi::{self, DdwCall, TceCall, TceMemory};
use nestio_iommu::tce::{Ddw64Placement, PageShift, Pe, PeConfig, TceAccess, TceError};

/// The list pages of `H_PUT_TCE_INDIRECT`, as the guest had them.
#[derive(Default)]
struct Lists(HashMap<u64, Vec<u8>>);

impl TceMemory for Lists {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), TceError> {
        let src = self.0.get(&gpa).ok_or(TceError::GuestMemory {
            gpa,
            len: buf.len() as u64,
        })?;
        if src.len() < buf.len() {
            return Err(TceError::GuestMemory {
                gpa,
                len: buf.len() as u64,
            });
        }
        buf.copy_from_slice(&src[..buf.len()]);
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Event {
    line: usize,
    kind: String,
    f: HashMap<String, i128>,
}

impl Event {
    fn u(&self, k: &str) -> u64 {
        *self
            .f
            .get(k)
            .unwrap_or_else(|| panic!("line {}: {} has no {k}", self.line, self.kind))
            as u64
    }
    fn i(&self, k: &str) -> i64 {
        self.f[k] as i64
    }
}

fn parse_num(v: &str) -> i128 {
    let (neg, v) = v.strip_prefix('-').map_or((false, v), |r| (true, r));
    let n = match v.strip_prefix("0x") {
        Some(h) => i128::from_str_radix(h, 16),
        None => v.parse(),
    }
    .unwrap_or_else(|e| panic!("bad number {v}: {e}"));
    if neg {
        -n
    } else {
        n
    }
}

/// The events of a recording, `rep=N step=S` lines expanded.
fn load(text: &str) -> (u64, Vec<Event>) {
    let mut dma64 = None;
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let kind = parts.next().unwrap().to_string();
        let mut f: HashMap<String, i128> = parts
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("key=value");
                (k.to_string(), parse_num(v))
            })
            .collect();
        if kind == "config" {
            dma64 = Some(f["dma64_win_addr"] as u64);
            continue;
        }
        let rep = f.remove("rep").unwrap_or(1);
        let step = f.remove("step").unwrap_or(0);
        let key = if kind == "xlate" { "addr" } else { "ioba" };
        for k in 0..rep {
            let mut g = f.clone();
            if k > 0 {
                *g.get_mut(key).expect("step field") += k * step;
            }
            out.push(Event {
                line: no + 1,
                kind: kind.clone(),
                f: g,
            });
        }
    }
    (dma64.expect("a config line"), out)
}

#[derive(Default, Debug)]
struct Checked {
    calls: HashMap<String, usize>,
}

fn replay(name: &str, text: &str) -> Checked {
    let (dma64, events) = load(text);
    // The platform QEMU's pseries PHB is: its `pgsz` default offers 4K, 64K, 2M and 16M
    // pages (nestio's own default adds 256M and 1G).
    let mut pe = Pe::new(PeConfig {
        ddw64: Ddw64Placement::At(dma64),
        page_sizes: PageShift::K4.bit()
            | PageShift::K64.bit()
            | PageShift::M2.bit()
            | PageShift::M16.bit(),
        ..PeConfig::default()
    })
    .unwrap();
    let mut lists = Lists::default();
    let mut checked = Checked::default();
    let mut skip_reset = false;
    for e in &events {
        let at = format!("{name}:{}: {} {:?}", e.line, e.kind, e.f);
        *checked.calls.entry(e.kind.clone()).or_default() += 1;
        match e.kind.as_str() {
            "put" => {
                let o = abi::hcall(
                    &mut pe,
                    &lists,
                    TceCall::Put {
                        liobn: e.u("liobn"),
                        ioba: e.u("ioba"),
                        tce: e.u("tce"),
                    },
                );
                assert_eq!(o.status, e.i("ret"), "{at}: {:?}", o.error);
            }
            "get" => {
                let o = abi::hcall(
                    &mut pe,
                    &lists,
                    TceCall::Get {
                        liobn: e.u("liobn"),
                        ioba: e.u("ioba"),
                    },
                );
                assert_eq!(o.status, e.i("ret"), "{at}");
                if o.status == 0 {
                    assert_eq!(o.ret, Some(e.u("tce")), "{at}");
                }
            }
            "indirect" => {
                let liobn = e.u("liobn");
                let ps = pe
                    .window(liobn)
                    .map(|w| w.page_shift().size())
                    .unwrap_or(4096);
                let ok = e.i("ret") == 0;
                let last = e.u("i");
                // Success: entries 0..=i, the last being `tce`. Failure: entry i + 1
                // (or 0) failed and was `tce`.
                let n = if ok || last == 0 { last + 1 } else { last + 2 };
                let tces: Vec<u8> = (0..n)
                    .flat_map(|k| e.u("tce").wrapping_sub((n - 1 - k) * ps).to_be_bytes())
                    .collect();
                lists.0.insert(e.u("list"), tces);
                let o = abi::hcall(
                    &mut pe,
                    &lists,
                    TceCall::Indirect {
                        liobn,
                        ioba: e.u("ioba"),
                        list: e.u("list"),
                        count: n,
                    },
                );
                assert_eq!(o.status, e.i("ret"), "{at}: {:?}", o.error);
            }
            "stuff" => {
                let liobn = e.u("liobn");
                let w = pe
                    .window(liobn)
                    .unwrap_or_else(|| panic!("{at}: no window"));
                let ps = w.page_shift().size();
                let npages = e.u("npages");
                let ioba = if e.i("ret") == 0 {
                    e.u("ioba").wrapping_sub(npages * ps)
                } else {
                    e.u("ioba")
                };
                let o = abi::hcall(
                    &mut pe,
                    &lists,
                    TceCall::Stuff {
                        liobn,
                        ioba,
                        tce: e.u("tce"),
                        count: if e.i("ret") == 0 { npages } else { 1 },
                    },
                );
                assert_eq!(o.status, e.i("ret"), "{at}: {:?}", o.error);
            }
            "query" => {
                let o = abi::rtas(
                    &mut pe,
                    DdwCall::Query {
                        config_addr: e.u("addr") as u32,
                        buid: e.u("buid"),
                        wide: false,
                    },
                );
                assert_eq!(o.status, 0, "{at}: {:?}", o.error);
                assert_eq!(
                    u64::from(o.outs[0]),
                    e.u("avail"),
                    "{at}: windows available"
                );
                assert_eq!(u64::from(o.outs[1]), e.u("max"), "{at}: largest block");
                assert_eq!(u64::from(o.outs[2]), e.u("pgmask"), "{at}: page sizes");
            }
            "create" => {
                let (pg, win) = (e.u("pg"), e.u("win"));
                assert!(pg.is_power_of_two() && win.is_power_of_two(), "{at}");
                let o = abi::rtas(
                    &mut pe,
                    DdwCall::Create {
                        config_addr: e.u("addr") as u32,
                        buid: e.u("buid"),
                        page_shift: pg.trailing_zeros(),
                        window_shift: win.trailing_zeros(),
                    },
                );
                assert_eq!(o.status, 0, "{at}: {:?}", o.error);
                assert_eq!(u64::from(o.outs[0]), e.u("liobn"), "{at}: LIOBN");
                let start = u64::from(o.outs[1]) << 32 | u64::from(o.outs[2]);
                assert_eq!(start, e.u("start"), "{at}: window address");
            }
            "remove" => {
                let o = abi::rtas(
                    &mut pe,
                    DdwCall::Remove {
                        liobn: e.u("liobn") as u32,
                    },
                );
                assert_eq!(o.status, 0, "{at}: {:?}", o.error);
                // QEMU traces the restored default window as a reset with address 0.
                skip_reset = o.restored_default;
            }
            "reset" => {
                if std::mem::take(&mut skip_reset) {
                    continue;
                }
                let o = abi::rtas(
                    &mut pe,
                    DdwCall::Reset {
                        config_addr: e.u("addr") as u32,
                        buid: e.u("buid"),
                    },
                );
                assert_eq!(o.status, 0, "{at}: {:?}", o.error);
            }
            "xlate" => {
                let liobn = e.u("liobn");
                let w = pe
                    .window(liobn)
                    .unwrap_or_else(|| panic!("{at}: translation in a window the model lacks"));
                let t = pe.translate(w.start().wrapping_add(e.u("addr")));
                let (gpa, perm, mask) = match t {
                    Some(t) => {
                        let ps = w.page_shift().size();
                        let perm = match t.access {
                            TceAccess::None => 0,
                            TceAccess::Read => 1,
                            TceAccess::Write => 2,
                            TceAccess::ReadWrite => 3,
                        };
                        (t.gpa & !(ps - 1), perm, (ps - 1) as u32)
                    }
                    None => (0, 0, u32::MAX),
                };
                assert_eq!(perm, e.u("perm"), "{at}: permission");
                if perm != 0 || e.u("gpa") != 0 {
                    assert_eq!(gpa, e.u("gpa"), "{at}: translated page");
                }
                assert_eq!(u64::from(mask), e.u("mask"), "{at}: page mask");
            }
            other => panic!("{at}: unknown event {other}"),
        }
    }
    checked
}

fn recordings() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../oracle/ppc64/tce");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|d| d.ok())
        .map(|d| d.path())
        .filter(|p| p.extension().is_some_and(|x| x == "trace"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_recorded_qemu_call_replays_identically() {
    let recs = recordings();
    assert!(recs.len() >= 2, "expected the 1<<59 and 4 GiB recordings");
    for (name, text) in &recs {
        let c = replay(name, text);
        println!("{name}: {:?}", c.calls);
        // Each recording exercises the DDW path and both kinds of mapping.
        for kind in ["query", "create", "indirect", "stuff", "xlate"] {
            assert!(
                c.calls.get(kind).copied().unwrap_or(0) > 0,
                "{name}: no {kind} event"
            );
        }
    }
    let starts: Vec<bool> = recs
        .iter()
        .map(|(_, t)| t.contains("start=0x100000000 "))
        .collect();
    assert!(starts.contains(&true), "one recording has its DDW at 4 GiB");
}

#[test]
fn a_wrong_model_would_be_caught() {
    // The replay is not vacuous: a recording edited to claim another window address,
    // another return code or another translation fails.
    let (_, text) = recordings().into_iter().next().unwrap();
    for (from, to) in [
        ("liobn=0x80000001", "liobn=0x80000002"),
        ("ret=0x0", "ret=-0x4"),
    ] {
        let bad = text.replacen(from, to, 1);
        if bad == text {
            continue;
        }
        let r = std::panic::catch_unwind(|| replay("edited", &bad));
        assert!(r.is_err(), "replacing {from} by {to} went unnoticed");
    }
}

/// The DDW events (query / create / remove / reset) of a recording, in order.
fn ddw_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            ["query ", "create ", "remove ", "reset "]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(str::to_string)
        .collect()
}

/// Regenerates the recordings with QEMU (`oracle/ppc64/record-tce.sh`) into a temporary
/// directory and replays them too; their DDW calls must be the committed ones (the TCE
/// traffic itself depends on timing). Runs where the pseries kernel is already built
/// (`target/oracle/ppc64-linux`, a cached build is seconds) or under CI=true (which
/// builds it: minutes); elsewhere prints SKIP.
#[test]
fn regenerated_recordings_replay_and_match_the_committed_ddw_calls() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let kernel = repo.join("target/oracle/ppc64-linux/vmlinux");
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let forced = std::env::var("NESTIO_TCE_REGEN").as_deref() == Ok("1");
    if !kernel.exists() && !ci && !forced {
        eprintln!(
            "SKIP: regenerated_recordings_replay_and_match_the_committed_ddw_calls: no pseries kernel at {} (oracle/ppc64/build-linux.sh builds it, ~4 min; or set NESTIO_TCE_REGEN=1)",
            kernel.display()
        );
        return;
    }
    let out = std::env::temp_dir().join(format!("nestio-tce-regen-{}", std::process::id()));
    let status = std::process::Command::new(repo.join("oracle/ppc64/record-tce.sh"))
        .arg(&out)
        .status()
        .expect("run oracle/ppc64/record-tce.sh");
    assert!(status.success(), "record-tce.sh failed");
    let committed: HashMap<String, String> = recordings().into_iter().collect();
    for (name, want) in &committed {
        let got = std::fs::read_to_string(out.join(name)).expect("regenerated recording");
        replay(&format!("regenerated {name}"), &got);
        assert_eq!(ddw_lines(&got), ddw_lines(want), "{name}: DDW calls differ");
    }
    let _ = std::fs::remove_dir_all(&out);
}
