//! The hypercall entry under real KVM: the `hcalltest` payload makes PAPR hypercalls
//! through the doorbell port; the handlers below stand in for the TCE and RTAS models
//! that will plug in the same way. Checks return codes, all nine return registers,
//! guest memory named by arguments (valid, past RAM, wrapping), RTAS (valid, unknown
//! token, bad buffers), and the virtual terminal in both directions.

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nestio_vmm::hypercall::papr::{H_GET_TCE, H_PARAMETER, H_PUT_TCE_INDIRECT, H_SUCCESS};
use nestio_vmm::hypercall::rtas::{RTAS_OUT_PARAM_ERROR, RTAS_OUT_SUCCESS};
use nestio_vmm::hypercall::{Hcall, HcallContext, HcallReturn, Hypercalls};
use nestio_vmm::serial_input::ConsoleInput;
use nestio_vmm::{payloads, StopReason, Vm, VmConfig};

/// The handlers `hcalltest` expects (see its documentation).
fn test_handlers() -> Hypercalls {
    let mut hc = Hypercalls::new();
    hc.register(
        H_GET_TCE,
        Arc::new(|_: &HcallContext<'_>, c: &Hcall| {
            let mut rets = c.args;
            rets.reverse();
            HcallReturn {
                status: H_SUCCESS,
                rets,
            }
        }),
    )
    .unwrap();
    hc.register(
        H_PUT_TCE_INDIRECT,
        Arc::new(|ctx: &HcallContext<'_>, c: &Hcall| {
            let (list, count) = (c.arg(2), c.arg(3));
            if count > 512 {
                return HcallReturn::status(H_PARAMETER);
            }
            match ctx.mem.read_be_u64s(list, count) {
                Ok(v) => HcallReturn::with_rets(
                    H_SUCCESS,
                    [v.iter().fold(0u64, |s, x| s.wrapping_add(*x))],
                ),
                Err(_) => HcallReturn::status(H_PARAMETER),
            }
        }),
    )
    .unwrap();
    hc.register_rtas(
        "nestio,sum",
        Arc::new(|_: &HcallContext<'_>, a: &[u32], r: &mut [u32]| {
            if r.len() != 1 {
                return RTAS_OUT_PARAM_ERROR;
            }
            r[0] = a.iter().fold(0u32, |s, x| s.wrapping_add(*x));
            RTAS_OUT_SUCCESS
        }),
    )
    .unwrap();
    hc
}

fn pipe_with(bytes: &[u8]) -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we own from here on.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut w = std::fs::File::from(w);
    w.write_all(bytes).unwrap();
    r
}

#[test]
fn guest_hypercalls_reach_handlers_with_papr_return_codes() {
    if !common::kvm_or_skip("guest_hypercalls_reach_handlers_with_papr_return_codes") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::HCALLTEST);
    cfg.console = console;
    cfg.hypercalls = test_handlers();
    cfg.cmdline = "input=1".into();
    cfg.console_input = ConsoleInput::Fd(Arc::new(pipe_with(b"ping over hvterm\n")));
    let mut vm = Vm::new(cfg).expect("build VM");
    let report = vm.run().expect("run VM");
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console:\n{out}");
    assert!(!out.contains("FAIL"), "{out}");
    // Output through H_PUT_TERM_CHAR lands on the console, in order.
    assert!(out.contains("hvterm says hello world 0123\n"), "{out}");
    // Input through H_GET_TERM_CHAR.
    assert!(out.contains("got input: ping over hvterm"), "{out}");
    for c in [
        "ok nine registers each way",
        "ok tce list read from guest memory",
        "ok tce list wrapping",
        "ok rtas result",
        "ok rtas unknown token status -3",
        "ok rtas buffer past RAM",
        "ok unregistered opcode",
    ] {
        assert!(out.contains(c), "missing {c:?}:\n{out}");
    }
    let n = report.stats.hypercall.load(Ordering::Relaxed);
    // 24 fixed calls, then at least one H_GET_TERM_CHAR; the 8-bit write to the port
    // is not a hypercall.
    assert!(n >= 25, "{n} hypercalls counted");
}

#[test]
fn hypercall_round_trip_cost() {
    if !common::kvm_or_skip("hypercall_round_trip_cost") {
        return;
    }
    let run = |cmdline: String, hcalls: u64| {
        let mut cfg = VmConfig::new(payloads::HCALLTEST);
        cfg.console = nestio_vmm::ConsoleOutput::Sink;
        cfg.cmdline = cmdline;
        let mut vm = Vm::new(cfg).expect("build VM");
        let t = Instant::now();
        let report = vm.run().expect("run VM");
        let dt = t.elapsed();
        assert_eq!(report.outcome, StopReason::GuestExit(0));
        assert_eq!(report.stats.hypercall.load(Ordering::Relaxed), hcalls);
        dt
    };
    let n = 5000;
    let base = run("bench=0".into(), 0);
    let hc = run(format!("bench={n}"), n);
    let port = run(format!("bench={n} port=1"), 0);
    let us = |d: std::time::Duration| d.saturating_sub(base).as_secs_f64() * 1e6 / n as f64;
    eprintln!(
        "per call over {n}: hypercall (exit + GET/SET_REGS + dispatch) {:.1} us, plain port exit {:.1} us",
        us(hc),
        us(port)
    );
}
