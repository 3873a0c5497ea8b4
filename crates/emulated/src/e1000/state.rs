//! The migration stream of the e1000: a versioned, little-endian byte stream.
//!
//! Layout (version 3):
//! `magic "NE1K" | version u32 | regs: count u32, (index u32, value u32)* (non-zero
//! registers only) | stats64 4 x u64 | EEPROM 64 x u16 | microwire state | PHY 32 x u16
//! | transmit assembly (packet, flags, context) | tx_halted u8 | rx_halted u8 | IOADDR u32 |
//! pending frames: count u32, (len u32, bytes)* | PCI config: len u32, bytes |
//! delay timers: TIDV, TADV, RDTR, RADV countdowns, each (counting u8, ns left u64) |
//! options u8 (bit 0: the device has the MSI capability)`.
//!
//! Version 2 is the same without the options byte, version 1 also without the delay
//! timers (no delayed cause pending); both still load. Devices of those versions always
//! had the MSI capability, so such a stream loads only into a device created with MSI
//! on; a stream whose options differ from the destination's is refused (the PCI
//! configuration layouts would not match: a guest using MSI would lose it). The time left of a delay timer is at most 0xFFFF x 1.024 us; the device
//! is stopped while saved, so its timers are paused and the values are exact (saving
//! twice gives the same bytes).
//!
//! The stream is produced in STOP_COPY and consumed when RESUMING ends. Loading is
//! all-or-nothing: the whole stream is parsed and checked (magic, version, every
//! count and length against its bound, register indices, trailing bytes) into a new
//! state before anything of the device changes; a bad stream is an error (the
//! migration FSM then enters ERROR) and the device keeps its previous state.

use std::collections::VecDeque;

use nestio_device_model::pci::PciConfig;

use std::time::{Duration, Instant};

use super::delay::{Countdown, DelayTimer, MAX_DELAY};
use super::eeprom::{Eeprom, Microwire, EEPROM_WORDS};
use super::phy::{Phy, PHY_REGS};
use super::regfile::{Core, PENDING_MAX};
use super::regs::NUM_REGS;
use super::tx::{TxContext, TxState, TX_MAX_TSO};

/// Stream magic.
pub const MAGIC: &[u8; 4] = b"NE1K";
/// Stream version written.
pub const VERSION: u32 = 3;
/// Oldest stream version read.
pub const MIN_VERSION: u32 = 1;
/// Largest pending frame accepted from a stream.
const MAX_PENDING_FRAME: usize = 65536;

/// Why a migration stream was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The stream ended early.
    #[error("e1000 migration stream truncated at byte {0}: the source sent an incomplete state")]
    Truncated(usize),
    /// Not an e1000 stream.
    #[error("not an e1000 migration stream (bad magic); migrate between e1000 devices only")]
    Magic,
    /// Unknown version.
    #[error("e1000 migration stream version {0} is not supported (this build reads versions {MIN_VERSION} to {VERSION}); use matching nestio versions")]
    Version(u32),
    /// A field is out of bounds.
    #[error("e1000 migration stream field {field} is invalid ({value})")]
    Field {
        /// Field name.
        field: &'static str,
        /// Offending value.
        value: u64,
    },
    /// Bytes after the end.
    #[error("e1000 migration stream has {0} trailing bytes")]
    Trailing(usize),
    /// The source and destination were created with different options.
    #[error("e1000 migration stream comes from a device with MSI {}, this one has MSI {}: create the destination e1000 with the same MSI option (`--msi {}`)", on_off(*.stream_msi), on_off(*.device_msi), on_off(*.stream_msi))]
    Options {
        /// The source had the MSI capability.
        stream_msi: bool,
        /// This device has it.
        device_msi: bool,
    },
    /// The PCI configuration could not be restored.
    #[error("e1000 migration stream: PCI configuration: {0}")]
    Config(String),
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Bit of the options byte: the MSI capability is present.
const OPT_MSI: u8 = 1;

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct R<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(StateError::Truncated(self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(StateError::Field {
                field,
                value: u64::from(v),
            }),
        }
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, max: usize, field: &'static str) -> Result<&'a [u8], StateError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(StateError::Field {
                field,
                value: n as u64,
            });
        }
        self.take(n)
    }
}

/// Serialize the device state.
pub(crate) fn save(c: &Core) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(4096));
    w.0.extend_from_slice(MAGIC);
    w.u32(VERSION);
    let nz: Vec<(usize, u32)> = c
        .regs
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0)
        .map(|(i, v)| (i, *v))
        .collect();
    w.u32(nz.len() as u32);
    for (i, v) in nz {
        w.u32(i as u32);
        w.u32(v);
    }
    for s in c.stats64 {
        w.u64(s);
    }
    for x in c.eeprom.words() {
        w.u16(*x);
    }
    let m = c.mw;
    w.u8(m.in_bits);
    w.u16(m.in_val);
    w.u8(u8::from(m.reading));
    w.u16(m.out_pos);
    w.u8(u8::from(m.started));
    w.u8(u8::from(m.sk));
    for r in c.phy.regs() {
        w.u16(*r);
    }
    let t = &c.tx;
    w.bytes(&t.pkt);
    w.u8(u8::from(t.oversize));
    w.u8(t.popts);
    match t.legacy_csum {
        Some((cso, css)) => {
            w.u8(1);
            w.u8(cso);
            w.u8(css);
        }
        None => {
            w.u8(0);
            w.u8(0);
            w.u8(0);
        }
    }
    w.u8(u8::from(t.tse));
    let x = t.ctx;
    w.u8(x.ipcss);
    w.u8(x.ipcso);
    w.u16(x.ipcse);
    w.u8(x.tucss);
    w.u8(x.tucso);
    w.u16(x.tucse);
    w.u8(x.tucmd);
    w.u8(x.hdrlen);
    w.u16(x.mss);
    w.u8(u8::from(c.tx_halted));
    w.u8(u8::from(c.rx_halted));
    w.u32(c.io_addr);
    w.u32(c.pending.len() as u32);
    for f in &c.pending {
        w.bytes(f);
    }
    w.bytes(&c.pci.lock_config().snapshot());
    let now = Instant::now();
    for t in [&c.tx_delay, &c.rx_delay] {
        for cd in [t.packet, t.absolute] {
            match cd.remaining(now) {
                Some(d) => {
                    w.u8(1);
                    w.u64(d.as_nanos() as u64);
                }
                None => {
                    w.u8(0);
                    w.u64(0);
                }
            }
        }
    }
    let has_msi = c.pci.lock_config().msi().is_some();
    w.u8(if has_msi { OPT_MSI } else { 0 });
    w.0
}

/// One countdown of a version 2 stream (restored paused: the device is not running
/// while it resumes).
fn countdown(r: &mut R<'_>, field: &'static str) -> Result<Countdown, StateError> {
    let counting = r.bool(field)?;
    let ns = r.u64()?;
    if !counting {
        if ns != 0 {
            return Err(StateError::Field { field, value: ns });
        }
        return Ok(Countdown::Idle);
    }
    if ns > MAX_DELAY.as_nanos() as u64 {
        return Err(StateError::Field { field, value: ns });
    }
    Ok(Countdown::Paused(Duration::from_nanos(ns)))
}

/// Parse `b` and, when all of it is valid, replace the state of `c`.
pub(crate) fn load(c: &mut Core, b: &[u8]) -> Result<(), StateError> {
    let mut r = R { b, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(StateError::Magic);
    }
    let version = r.u32()?;
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(StateError::Version(version));
    }
    let n = r.u32()? as usize;
    if n > NUM_REGS {
        return Err(StateError::Field {
            field: "register count",
            value: n as u64,
        });
    }
    let mut regs = vec![0u32; NUM_REGS];
    for _ in 0..n {
        let i = r.u32()? as usize;
        let v = r.u32()?;
        if i >= NUM_REGS {
            return Err(StateError::Field {
                field: "register index",
                value: i as u64,
            });
        }
        regs[i] = v;
    }
    let mut stats64 = [0u64; 4];
    for s in &mut stats64 {
        *s = r.u64()?;
    }
    let mut words = [0u16; EEPROM_WORDS];
    for x in &mut words {
        *x = r.u16()?;
    }
    let mw = Microwire {
        in_bits: r.u8()?,
        in_val: r.u16()?,
        reading: r.bool("microwire reading")?,
        out_pos: r.u16()?,
        started: r.bool("microwire started")?,
        sk: r.bool("microwire sk")?,
    };
    if mw.in_bits > 9 || usize::from(mw.out_pos) >= EEPROM_WORDS * 16 {
        return Err(StateError::Field {
            field: "microwire position",
            value: u64::from(mw.out_pos),
        });
    }
    let mut pregs = [0u16; PHY_REGS];
    for p in &mut pregs {
        *p = r.u16()?;
    }
    let pkt = r.bytes(TX_MAX_TSO, "transmit packet")?.to_vec();
    let oversize = r.bool("transmit oversize")?;
    let popts = r.u8()?;
    let has_legacy = r.bool("legacy checksum")?;
    let (cso, css) = (r.u8()?, r.u8()?);
    let tse = r.bool("tse")?;
    let ctx = TxContext {
        ipcss: r.u8()?,
        ipcso: r.u8()?,
        ipcse: r.u16()?,
        tucss: r.u8()?,
        tucso: r.u8()?,
        tucse: r.u16()?,
        tucmd: r.u8()?,
        hdrlen: r.u8()?,
        mss: r.u16()?,
    };
    let tx_halted = r.bool("tx halted")?;
    let rx_halted = r.bool("rx halted")?;
    let io_addr = r.u32()?;
    let np = r.u32()? as usize;
    if np > PENDING_MAX {
        return Err(StateError::Field {
            field: "pending frame count",
            value: np as u64,
        });
    }
    let mut pending = VecDeque::with_capacity(np);
    for _ in 0..np {
        pending.push_back(r.bytes(MAX_PENDING_FRAME, "pending frame")?.to_vec());
    }
    let cfg = r.bytes(4096, "PCI configuration")?;
    let mut delays = [DelayTimer::default(); 2];
    if version >= 2 {
        for (t, names) in delays.iter_mut().zip([["TIDV", "TADV"], ["RDTR", "RADV"]]) {
            t.packet = countdown(&mut r, names[0])?;
            t.absolute = countdown(&mut r, names[1])?;
        }
    }
    // Streams before version 3 come from devices that always had MSI.
    let stream_msi = if version >= 3 {
        let opts = r.u8()?;
        if opts & !OPT_MSI != 0 {
            return Err(StateError::Field {
                field: "options",
                value: u64::from(opts),
            });
        }
        opts & OPT_MSI != 0
    } else {
        true
    };
    if r.pos != b.len() {
        return Err(StateError::Trailing(b.len() - r.pos));
    }
    let device_msi = c.pci.lock_config().msi().is_some();
    if stream_msi != device_msi {
        return Err(StateError::Options {
            stream_msi,
            device_msi,
        });
    }
    let mut config: PciConfig = c.pci.power_on_config();
    config
        .restore(cfg)
        .map_err(|e| StateError::Config(e.to_string()))?;

    c.regs = regs;
    c.stats64 = stats64;
    c.eeprom = Eeprom::from_words(words);
    c.mw = mw;
    c.phy = Phy::from_regs(pregs);
    c.tx = TxState {
        pkt,
        oversize,
        popts,
        legacy_csum: has_legacy.then_some((cso, css)),
        tse,
        ctx,
    };
    c.tx_halted = tx_halted;
    c.rx_halted = rx_halted;
    c.io_addr = io_addr;
    c.pending = pending;
    *c.pci.lock_config() = config;
    c.next_irq = None;
    c.deferred_irq = None;
    [c.tx_delay, c.rx_delay] = delays;
    Ok(())
}
