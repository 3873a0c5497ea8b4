//! Guest driver for an FSL-MC DPRC container, through its MC portals only. The VMM
//! describes the container on the command line (`fslmc.dprc=ADDR`, `fslmc.dpmcp.0=ADDR`,
//! `fslmc.irq.dpni.0=LINE`, ...). Steps, each checked:
//! 1. through the DPRC's portal (MMIO, emulated): container id, open the DPRC, scan
//!    every object (GET_OBJ_COUNT / GET_OBJ);
//! 2. through a DPMCP portal (a memory slot: plain stores, no exit; the MC polls it):
//!    open the DPRC again and every object, enable the enable-able ones;
//! 3. bad commands get their MC status: another portal's token (AUTH), the parent
//!    container (NO_PRIVILEGE), an unknown command (UNSUPPORTED), an object already
//!    open (BUSY), assigning objects (NO_PRIVILEGE);
//! 4. dpni.0's link-change interrupt, taken through the IOAPIC and the IDT;
//! 5. a container reset through the DPRC's portal closes the objects' tokens.
//!
//! Prints `fslmc: ok objects=N opened=M irqs=K` and exits 0; a failed step prints why
//! and exits with the step's number.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use nestio_guest::fmt::Dec;
use nestio_guest::io::{mmio_read64, mmio_write32, mmio_write64};
use nestio_guest::{cmdline_value, interrupts, println};

nestio_guest::entry!(main);

const READY: u8 = 1;
const OK: u8 = 0;
const AUTH: u8 = 3;
const NO_PRIV: u8 = 4;
const BUSY: u8 = 0xA;
const UNSUPPORTED: u8 = 0xB;
const VECTOR: u8 = 0x31;

static IRQS: AtomicU32 = AtomicU32::new(0);

const fn v1(id: u16) -> u16 {
    (id << 4) | 1
}
const CLOSE: u16 = v1(0x800);
const ENABLE: u16 = v1(0x002);
const DISABLE: u16 = v1(0x003);
const IS_ENABLED: u16 = v1(0x006);
const SET_IRQ_ENABLE: u16 = v1(0x012);
const SET_IRQ_MASK: u16 = v1(0x014);
const GET_IRQ_STATUS: u16 = v1(0x016);
const CLEAR_IRQ_STATUS: u16 = v1(0x017);
const RESET_CONT_V2: u16 = (0x005 << 4) | 2;
const GET_CONT_ID: u16 = v1(0x830);
const GET_OBJ_COUNT: u16 = v1(0x159);
const GET_OBJ: u16 = v1(0x15A);
const ASSIGN: u16 = v1(0x157);
const OPEN_DPRC: u16 = v1(0x805);

/// The open command of an object type.
fn open_cmd(ty: &[u8]) -> Option<u16> {
    let id = match ty {
        b"dpni" => 0x801,
        b"dpio" => 0x803,
        b"dpbp" => 0x804,
        b"dpcon" => 0x808,
        b"dpmcp" => 0x80b,
        b"dpmac" => 0x80c,
        _ => return None,
    };
    Some(v1(id))
}

fn has_enable(ty: &[u8]) -> bool {
    matches!(ty, b"dpni" | b"dpio" | b"dpbp" | b"dpcon")
}

/// One MC portal at a guest-physical address.
#[derive(Clone, Copy)]
struct Portal(u64);

struct Reply {
    status: u8,
    token: u16,
    params: [u64; 7],
}

impl Portal {
    /// Write the parameters, then the header (status READY); poll until the status
    /// leaves READY; read the response.
    fn send(self, cmd: u16, token: u16, params: [u64; 7]) -> Reply {
        for (i, p) in params.iter().enumerate() {
            mmio_write64(self.0 + 8 * (i as u64 + 1), *p);
        }
        let h = ((cmd as u64) << 48) | ((token as u64) << 32) | ((READY as u64) << 16);
        mmio_write64(self.0, h);
        let mut spins = 0u32;
        let mut w = mmio_read64(self.0);
        while (w >> 16) as u8 == READY && spins < 2_000_000 {
            spins += 1;
            w = mmio_read64(self.0);
        }
        let mut r = Reply {
            status: (w >> 16) as u8,
            token: (w >> 32) as u16,
            params: [0; 7],
        };
        if r.status == READY {
            r.status = 0xff; // timed out
        }
        for (i, p) in r.params.iter_mut().enumerate() {
            *p = mmio_read64(self.0 + 8 * (i as u64 + 1));
        }
        r
    }
    fn status(self, cmd: u16, token: u16, p0: u64) -> u8 {
        self.send(cmd, token, [p0, 0, 0, 0, 0, 0, 0]).status
    }
}

fn hex(s: &str) -> Option<u64> {
    let s = s.strip_prefix("0x")?;
    let mut v = 0u64;
    for c in s.bytes() {
        v = v.checked_mul(16)? + (c as char).to_digit(16)? as u64;
    }
    Some(v)
}

fn dec(s: &str) -> Option<u8> {
    s.parse().ok()
}

fn on_irq(v: u8) {
    if v == VECTOR {
        IRQS.fetch_add(1, Ordering::SeqCst);
    }
}

/// IOAPIC pin `pin` -> `vector`, edge-triggered, active high, APIC 0.
fn route_edge(pin: u8, vector: u8) {
    const IOAPIC: u64 = 0xfec0_0000;
    let reg = 0x10 + 2 * pin as u32;
    mmio_write32(IOAPIC, reg + 1);
    mmio_write32(IOAPIC + 0x10, 0);
    mmio_write32(IOAPIC, reg);
    mmio_write32(IOAPIC + 0x10, vector as u32);
}

fn fail(step: u32, what: &str, got: u8) -> u32 {
    println!(
        "fslmc: step {} failed: {} (status {})",
        Dec(step as u64),
        what,
        Dec(got as u64)
    );
    step
}

fn main(_ram: u64) -> u32 {
    let (Some(dprc), Some(mcp)) = (
        cmdline_value("fslmc.dprc").and_then(hex),
        cmdline_value("fslmc.dpmcp.0").and_then(hex),
    ) else {
        println!("fslmc: no fslmc.dprc / fslmc.dpmcp.0 on the command line");
        return 9;
    };
    let (dprc, mcp) = (Portal(dprc), Portal(mcp));

    // 1. Scan through the DPRC's portal.
    let r = dprc.send(GET_CONT_ID, 0, [0; 7]);
    if r.status != OK {
        return fail(1, "GET_CONT_ID", r.status);
    }
    let cont = r.params[0] as u32 as u64;
    let r = dprc.send(OPEN_DPRC, 0, [cont, 0, 0, 0, 0, 0, 0]);
    if r.status != OK {
        return fail(1, "open DPRC", r.status);
    }
    let t = r.token;
    let r = dprc.send(GET_OBJ_COUNT, t, [0; 7]);
    if r.status != OK {
        return fail(1, "GET_OBJ_COUNT", r.status);
    }
    let n = (r.params[0] >> 32) as u32;
    let mut objs: [([u8; 16], u32); 16] = [([0; 16], 0); 16];
    let n = n.min(16);
    for i in 0..n {
        let r = dprc.send(GET_OBJ, t, [i as u64, 0, 0, 0, 0, 0, 0]);
        if r.status != OK {
            return fail(1, "GET_OBJ", r.status);
        }
        let id = (r.params[0] >> 32) as u32;
        let mut ty = [0u8; 16];
        ty[..8].copy_from_slice(&r.params[3].to_le_bytes());
        ty[8..].copy_from_slice(&r.params[4].to_le_bytes());
        objs[i as usize] = (ty, id);
        let len = ty.iter().position(|&c| c == 0).unwrap_or(16);
        println!(
            "fslmc: dprc.{} obj {}.{} irqs={} regions={}",
            Dec(cont),
            core::str::from_utf8(&ty[..len]).unwrap_or("?"),
            Dec(id as u64),
            Dec((r.params[1] >> 16) as u8 as u64),
            Dec((r.params[1] >> 24) as u8 as u64)
        );
    }

    // 2. Open the DPRC and every object through the DPMCP's mapped portal.
    let r = mcp.send(OPEN_DPRC, 0, [cont, 0, 0, 0, 0, 0, 0]);
    if r.status != OK {
        return fail(2, "open DPRC on the DPMCP portal", r.status);
    }
    let t2 = r.token;
    let mut tokens = [0u16; 16];
    let mut opened = 0;
    let mut ni0 = 0u16;
    for i in 0..n as usize {
        let (ty, id) = objs[i];
        let len = ty.iter().position(|&c| c == 0).unwrap_or(16);
        let Some(open) = open_cmd(&ty[..len]) else {
            continue;
        };
        let r = mcp.send(open, 0, [id as u64, 0, 0, 0, 0, 0, 0]);
        if r.status != OK {
            return fail(2, "open an object", r.status);
        }
        tokens[i] = r.token;
        opened += 1;
        if has_enable(&ty[..len]) {
            let s = mcp.status(ENABLE, r.token, 0);
            let e = mcp.send(IS_ENABLED, r.token, [0; 7]);
            if s != OK || e.status != OK || e.params[0] & 1 != 1 {
                return fail(2, "enable", s.max(e.status));
            }
        }
        if &ty[..len] == b"dpni" && id == 0 {
            ni0 = r.token;
        }
    }

    // 3. Bad commands.
    let s = dprc.status(GET_OBJ_COUNT, t2, 0);
    if s != AUTH {
        return fail(3, "another portal's token", s);
    }
    let s = mcp.status(OPEN_DPRC, 0, 1);
    if s != NO_PRIV {
        return fail(3, "open the parent container", s);
    }
    let s = mcp.status(v1(0x7ff), t2, 0);
    if s != UNSUPPORTED {
        return fail(3, "unknown command", s);
    }
    let s = mcp.status(v1(0x801), 0, 0);
    if s != BUSY {
        return fail(3, "open dpni.0 twice", s);
    }
    let s = mcp.status(ASSIGN, t2, 0);
    if s != NO_PRIV {
        return fail(3, "assign", s);
    }

    // 4. dpni.0's link-change interrupt.
    let mut irqs = 0;
    if let Some(line) = cmdline_value("fslmc.irq.dpni.0").and_then(dec) {
        if ni0 == 0 {
            return fail(4, "no dpni.0", 0);
        }
        interrupts::init_idt();
        interrupts::set_irq_handler(on_irq);
        interrupts::init_lapic();
        // The platform lines are ISA lines: mask both 8259s (never initialised, their
        // vector base is 0) so the interrupt arrives through the IOAPIC only.
        nestio_guest::io::outb(0x21, 0xff);
        nestio_guest::io::outb(0xa1, 0xff);
        route_edge(line, VECTOR);
        interrupts::enable();
        let idx0 = 0u64 << 32;
        let s = mcp.status(CLEAR_IRQ_STATUS, ni0, 0xffff_ffff | idx0);
        let s2 = mcp.status(SET_IRQ_MASK, ni0, 1 | idx0);
        let s3 = mcp.status(SET_IRQ_ENABLE, ni0, 1 | idx0);
        if s != OK || s2 != OK || s3 != OK {
            return fail(4, "irq setup", s.max(s2).max(s3));
        }
        let s = mcp.status(DISABLE, ni0, 0);
        if s != OK {
            return fail(4, "disable dpni.0", s);
        }
        let mut spins = 0u32;
        while IRQS.load(Ordering::SeqCst) == 0 && spins < 2_000_000 {
            spins += 1;
        }
        interrupts::disable();
        irqs = IRQS.load(Ordering::SeqCst);
        if irqs == 0 {
            return fail(4, "no interrupt", 0);
        }
        let r = mcp.send(GET_IRQ_STATUS, ni0, [idx0, 0, 0, 0, 0, 0, 0]);
        if r.status != OK || r.params[0] as u32 != 1 {
            return fail(4, "irq status", r.status);
        }
    }

    // 5. Container reset through the DPRC's portal.
    let s = dprc.status(RESET_CONT_V2, t, cont | (1 << 32));
    if s != OK {
        return fail(5, "reset container", s);
    }
    for (i, tok) in tokens.iter().enumerate().take(n as usize) {
        if *tok != 0 && mcp.status(CLOSE, *tok, 0) != AUTH {
            return fail(5, "an object token survived the reset", i as u8);
        }
    }
    if dprc.status(CLOSE, t, 0) != OK {
        return fail(5, "close the DPRC", 0);
    }
    println!(
        "fslmc: ok objects={} opened={} irqs={}",
        Dec(n as u64),
        Dec(opened),
        Dec(irqs as u64)
    );
    0
}
