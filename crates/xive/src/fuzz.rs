//! The fuzz entry point (feature `harness`): a byte string becomes a sequence of
//! operations on one model — hypercalls with any opcode and arguments, control-API
//! attributes with any group/attribute/data, ESB and TIMA accesses of any offset and
//! size, triggers, vCPU connections, VP state, save/resume/restore, a VP ceding and
//! being dispatched again (escalations) — and checks that
//! nothing panics, every hypercall answers a PAPR code of [`crate::hcall::rc`], every
//! control error has one of KVM's errno, and every queue producer stays inside its
//! ring. Used by `fuzz/fuzz_targets/xive.rs` and the corpus replay.

use std::sync::Arc;

use crate::control::libc_errno as e;
use crate::hcall::{rc, ALL};
use crate::router::Layout;
use crate::{VecMemory, Xive, XiveConfig};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u64(&mut self) -> Option<u64> {
        let n = usize::from(self.u8()? % 9);
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 8) | u64::from(self.u8()?);
        }
        Some(v)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Run `data` against a fresh model (see the module documentation).
pub fn fuzz_xive(data: &[u8]) {
    let mem = Arc::new(VecMemory::new(0, 1 << 18));
    let Some(cfg) = XiveConfig::new(64, 8, Layout::PSERIES) else {
        return;
    };
    let x = Xive::new(cfg, mem.clone(), Arc::new(|_: u32| {}));
    let mut b = Bytes(data);
    let codes = [
        rc::H_SUCCESS,
        rc::H_HARDWARE,
        rc::H_FUNCTION,
        rc::H_PARAMETER,
        rc::H_P2,
        rc::H_P3,
        rc::H_P4,
        rc::H_P5,
    ];
    let errnos = [
        e::ENOENT,
        e::ENXIO,
        e::E2BIG,
        e::EFAULT,
        e::EBUSY,
        e::EEXIST,
        e::EINVAL,
    ];
    let mut snap = None;
    while let Some(op) = b.u8() {
        let small = |v: Option<u64>| v.unwrap_or(0) % 80;
        match op % 14 {
            0 | 1 => {
                let sel = b.u8().unwrap_or(0);
                let opcode = if sel < 200 {
                    ALL[usize::from(sel) % ALL.len()]
                } else {
                    b.u64().unwrap_or(0)
                };
                let mut args = [0u64; 6];
                for a in &mut args {
                    // Mostly small values (sources, servers, priorities, shifts).
                    *a = match b.u8().unwrap_or(0) % 3 {
                        0 => small(b.u64()),
                        1 => small(b.u64()) << 12,
                        _ => b.u64().unwrap_or(0),
                    };
                }
                let caller = u32::from(b.u8().unwrap_or(0) % 10);
                let o = x.hcall(caller, opcode, &args);
                assert!(codes.contains(&o.rc), "unexpected return code {}", o.rc);
            }
            2 | 3 => {
                let group = u32::from(b.u8().unwrap_or(0) % 7);
                let attr = small(b.u64());
                let len = usize::from(b.u8().unwrap_or(0) % 70);
                let d = b.bytes(len).to_vec();
                if let Err(err) = x.set_attr(group, attr, &d) {
                    assert!(errnos.contains(&err.errno()), "{err}");
                }
            }
            4 => {
                let mut out = vec![0; usize::from(b.u8().unwrap_or(0) % 70)];
                let attr = small(b.u64());
                if let Err(err) = x.get_attr(4, attr, &mut out) {
                    assert!(errnos.contains(&err.errno()), "{err}");
                }
            }
            5 => {
                let l = u32::from(b.u8().unwrap_or(0) % 70);
                x.trigger(l);
                x.set_level(l, b.u8().unwrap_or(0) & 1 == 1);
            }
            6 => {
                let (l, off, size) = (
                    u32::from(b.u8().unwrap_or(0) % 70),
                    b.u64().unwrap_or(0),
                    u32::from(b.u8().unwrap_or(8) % 10),
                );
                let v = x.esb_load(l, true, off, size);
                assert!(v <= 3 || v == u64::MAX, "ESB load {v:#x}");
                x.esb_store(l, b.u8().unwrap_or(0) & 1 == 1, off, size, 0);
            }
            7 => {
                let (s, ring, off, size) = (
                    u32::from(b.u8().unwrap_or(0) % 10),
                    b.u8().unwrap_or(2) % 5,
                    b.u64().unwrap_or(0),
                    u32::from(b.u8().unwrap_or(0) % 10),
                );
                x.tima_load(s, ring, off, size);
                x.tima_store(s, ring, off, size, b.u64().unwrap_or(0));
                x.region_load(s, off, size);
                x.region_store(s, off, size, 0);
            }
            8 => {
                if let Err(err) = x.connect_vcpu(u32::from(b.u8().unwrap_or(0) % 10)) {
                    assert!(errnos.contains(&err.errno()));
                }
            }
            9 => {
                let s = u32::from(b.u8().unwrap_or(0) % 10);
                let w = b.u64().unwrap_or(0);
                let _ = x.set_vp_state(s, crate::vp::VpState::from_w01(w));
                let _ = x.vp_state(s);
            }
            10 => snap = Some(x.save()),
            12 | 13 => {
                let s = u32::from(b.u8().unwrap_or(0) % 10);
                let before = x.escalation(s);
                if op % 14 == 12 {
                    let _ = x.cede(s);
                } else {
                    x.dispatch(s);
                }
                if let (Some(a), Some(e)) = (before, x.escalation(s)) {
                    assert!(e.fired >= a.fired && e.coalesced >= a.coalesced);
                    assert_eq!(e.dispatched, op % 14 == 13, "server {s}");
                }
            }
            _ => {
                let _ = x.resume();
                if let Some(s) = &snap {
                    let y = Xive::new(cfg, mem.clone(), Arc::new(|_: u32| {}));
                    for v in &s.vps {
                        let _ = y.connect_vcpu(v.0);
                    }
                    let _ = y.restore(s);
                }
            }
        }
        for s in x.servers() {
            if x.escalation(s).is_some_and(|e| e.dispatched) {
                for p in 0..8 {
                    assert_eq!(
                        x.escalation_pq(s, p),
                        Some(crate::Pq::Off),
                        "escalation on while dispatched"
                    );
                }
            }
            for p in 0..8 {
                if let Some((t, i)) = x.queue_position(s, p) {
                    assert!(t <= 1 && i < (1 << 22), "queue {s}/{p} at {t}/{i}");
                }
            }
        }
    }
}
