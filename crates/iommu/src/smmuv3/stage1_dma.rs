//! Nested mode, device side: the guest's stage 1 as a [`DmaSpace`] decorator.
//!
//! In nested mode the device process translates its own DMA: its map table (what
//! the VMM DMA_MAPs: the guest's RAM at IPA = GPA) is stage 2, and the guest's
//! stage-1 configuration — the S1 fields of the guest's STE for this device, bound by
//! the VMM — is walked here, by the same model as the VMM's, reading the guest's CD
//! and page tables *through the map table* (their addresses are IPAs).
//!
//! How the model is reused: a private [`Smmu`] whose stream table (one STE: the
//! bound stage-1 fields, Config forced to "S1 translate, S2 bypass" since stage 2 is
//! the map table), command queue and event queue live in a small private memory
//! overlaid on the device's DMA space ([`Overlay`], at an address no IPA reaches).
//! The guest's invalidations arrive as raw 16-byte commands ([`Stage1Dma::command`]:
//! TLBI_NH_*, CFGI_CD*, CMD_SYNC — anything else is refused), and the model's events
//! are handed back with the guest's virtual stream ID ([`Stage1Dma::take_events`])
//! for the VMM to put in the guest's event queue. A fault is also the DMA's error
//! (`DmaError::Unmapped` / `Permission` at the IOVA), like an unmapped IOVA.
//!
//! Status: the device side of nested mode; the vfio-user negotiation that binds it
//! (`docs/vfio-user-nested-iommu.md`) is not wired yet.

use parking_lot::{Mutex, RwLock};
use std::sync::Arc;

use nestio_dma::{Access, DmaError, DmaSpace};

use super::evtq::Event;
use super::memory::{MemoryError, SmmuMemory};
use super::{regs, Smmu, Transaction, TranslateError};

/// Base of the private overlay: above every 48-bit IPA, below the 52-bit limit of
/// the SMMU's table addresses.
const OVERLAY: u64 = 0x000f_ffff_fff0_0000;
const STRTAB: u64 = OVERLAY;
const CMDQ: u64 = OVERLAY + 0x1000;
const EVTQ: u64 = OVERLAY + 0x2000;
const OVERLAY_SIZE: usize = 0x4000;
/// Command and event queues of 64 entries.
const QLOG2: u32 = 6;

/// Errors of binding and forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stage1Error {
    /// The bound STE does not enable stage 1.
    #[error("the bound STE has no stage-1 configuration (V and Config bit 0 must be set)")]
    NoStage1,
    /// The STE's stage-1 fields are illegal or unsupported.
    #[error("the bound STE is illegal: {0}")]
    BadSte(super::ste::SteError),
    /// A command the guest may not forward (only TLBI_NH_*, CFGI_CD*, CMD_SYNC).
    #[error(
        "command {0:#04x} cannot be forwarded to a device (only TLBI_NH_*, CFGI_CD*, CMD_SYNC)"
    )]
    NotForwardable(u8),
    /// The model refused the command (illegal operands).
    #[error("the forwarded command was illegal (CERROR {0})")]
    Illegal(u32),
}

/// Opcodes a guest may forward to a device: TLBI_NH_ALL/ASID/VA/VAA, CFGI_CD,
/// CFGI_CD_ALL and CMD_SYNC.
pub fn forwardable(opcode: u8) -> bool {
    matches!(opcode, 0x10..=0x13 | 0x05 | 0x06 | 0x46)
}

/// The device's DMA space with the private SMMU structures overlaid.
struct Overlay {
    lower: Arc<dyn DmaSpace>,
    bytes: Mutex<Vec<u8>>,
}

impl Overlay {
    fn local(&self, addr: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(addr.checked_sub(OVERLAY)?).ok()?;
        (off.checked_add(len)? <= OVERLAY_SIZE).then_some(off)
    }
}

impl SmmuMemory for Overlay {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if let Some(off) = self.local(addr, buf.len()) {
            buf.copy_from_slice(&self.bytes.lock()[off..off + buf.len()]);
            return Ok(());
        }
        self.lower.read(addr, buf).map_err(|_| MemoryError {
            addr,
            len: buf.len(),
        })
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        if let Some(off) = self.local(addr, data.len()) {
            self.bytes.lock()[off..off + data.len()].copy_from_slice(data);
            return Ok(());
        }
        // The guest's tables are read-only to the walker (no HTTU).
        Err(MemoryError {
            addr,
            len: data.len(),
        })
    }
}

struct State {
    smmu: Smmu,
    prod: u32,
    evt_cons: u32,
    /// `Stats::events_lost` already reported by [`Stage1Dma::drain_events`].
    lost_seen: u64,
}

/// A device's DMA through the guest's bound stage 1 (see the module docs).
pub struct Stage1Dma {
    mem: Overlay,
    state: Mutex<State>,
    vsid: u32,
    /// Held shared by every access from its first translation to its last byte,
    /// exclusively by [`Stage1Dma::quiesce`].
    inflight: RwLock<()>,
}

impl Stage1Dma {
    /// Bind the guest's STE (its first two dwords: V, Config, S1Fmt, S1ContextPtr,
    /// S1CDMax; S1DSS) for virtual stream `vsid` over the device's DMA space `lower`.
    pub fn bind(lower: Arc<dyn DmaSpace>, vsid: u32, ste: [u64; 2]) -> Result<Self, Stage1Error> {
        if ste[0] & 1 == 0 || (ste[0] >> 1) & 1 == 0 {
            return Err(Stage1Error::NoStage1);
        }
        // The fields that are kept must be legal for the model (S1Fmt, S1CDMax,
        // S1DSS), as the guest's SMMU would check them at CFGI_STE.
        let d0 = (ste[0] & !0xe) | (0b101 << 1);
        super::ste::Ste::decode(&[d0, ste[1] & 3, 0, 0]).map_err(Stage1Error::BadSte)?;
        let mem = Overlay {
            lower,
            bytes: Mutex::new(vec![0; OVERLAY_SIZE]),
        };
        // S1-only STE: keep V/S1Fmt/S1ContextPtr/S1CDMax and S1DSS, Config = 0b101.
        mem.write(STRTAB, &d0.to_le_bytes())
            .and_then(|()| mem.write(STRTAB + 8, &(ste[1] & 3).to_le_bytes()))
            .map_err(|_| Stage1Error::NoStage1)?;
        let mut smmu = Smmu::new();
        smmu.write(&mem, regs::STRTAB_BASE, 8, STRTAB);
        smmu.write(&mem, regs::STRTAB_BASE_CFG, 4, 0);
        smmu.write(&mem, regs::CMDQ_BASE, 8, CMDQ | u64::from(QLOG2));
        smmu.write(&mem, regs::EVENTQ_BASE, 8, EVTQ | u64::from(QLOG2));
        smmu.write(&mem, regs::CR0, 4, 0xd);
        Ok(Stage1Dma {
            mem,
            state: Mutex::new(State {
                smmu,
                prod: 0,
                evt_cons: 0,
                lost_seen: 0,
            }),
            vsid,
            inflight: RwLock::new(()),
        })
    }

    /// The guest's virtual stream ID this binding reports faults with.
    pub fn vsid(&self) -> u32 {
        self.vsid
    }

    /// Wait until every access that started before this call has finished (see the
    /// module docs: call it after invalidating, before acknowledging).
    pub fn quiesce(&self) {
        drop(self.inflight.write());
    }

    /// Execute one of the guest's commands forwarded raw (TLBI_NH_ALL/ASID/VA/VAA,
    /// CFGI_CD, CFGI_CD_ALL, CMD_SYNC); the SID operand of CFGI_CD* is ignored (this
    /// space has one stream). A CMD_SYNC's completion signal is dropped (no MSI is
    /// written anywhere: the caller's reply is the completion); a reserved CS value is
    /// still illegal.
    pub fn command(&self, raw: [u64; 2]) -> Result<(), Stage1Error> {
        let op = raw[0] as u8;
        let (d0, d1) = match op {
            // The VMID operand is the guest's: this space has one (0).
            0x10..=0x13 => (raw[0] & !(0xffff << 32), raw[1]),
            0x46 if (raw[0] >> 12) & 3 == 3 => return Err(Stage1Error::Illegal(regs::CERROR_ILL)),
            0x46 => (raw[0] & 0xff, 0),
            0x05 | 0x06 => (raw[0] & 0xffff_ffff, raw[1]),
            _ => return Err(Stage1Error::NotForwardable(op)),
        };
        let mut st = self.state.lock();
        let mask = (1u32 << (QLOG2 + 1)) - 1;
        let slot = CMDQ + u64::from(st.prod & ((1 << QLOG2) - 1)) * 16;
        let mut rec = [0u8; 16];
        rec[..8].copy_from_slice(&d0.to_le_bytes());
        rec[8..].copy_from_slice(&d1.to_le_bytes());
        self.mem
            .write(slot, &rec)
            .map_err(|_| Stage1Error::Illegal(regs::CERROR_ABT))?;
        st.prod = (st.prod + 1) & mask;
        let prod = u64::from(st.prod);
        st.smmu.write(&self.mem, regs::CMDQ_PROD, 4, prod);
        let cons = st.smmu.read(regs::CMDQ_CONS, 4) as u32;
        let err = (cons & regs::CMDQ_CONS_ERR_MASK) >> regs::CMDQ_CONS_ERR_SHIFT;
        if cons & mask != st.prod {
            // Skip the bad command (CONS is writable with the queue disabled) and
            // acknowledge the error, so the next command runs.
            let prod = u64::from(st.prod);
            let gerror = st.smmu.read(regs::GERROR, 4);
            st.smmu.write(&self.mem, regs::CR0, 4, 0x5);
            st.smmu.write(&self.mem, regs::CMDQ_CONS, 4, prod);
            st.smmu.write(&self.mem, regs::GERRORN, 4, gerror);
            st.smmu.write(&self.mem, regs::CR0, 4, 0xd);
            return Err(Stage1Error::Illegal(err));
        }
        Ok(())
    }

    /// The events recorded since the last call, with the guest's virtual SID.
    pub fn take_events(&self) -> Vec<Event> {
        self.drain_events().0
    }

    /// [`Stage1Dma::take_events`], plus how many events the private queue dropped
    /// since the last call (it holds 64; the caller drains it after every fault, so
    /// only many concurrent faulting DMAs can overflow it).
    pub fn drain_events(&self) -> (Vec<Event>, u64) {
        let mut st = self.state.lock();
        let prod = st.smmu.read(regs::EVENTQ_PROD, 4) as u32;
        let mask = (1u32 << (QLOG2 + 1)) - 1;
        let mut out = Vec::new();
        while st.evt_cons & mask != prod & mask {
            let mut rec = [0u8; 32];
            let a = EVTQ + u64::from(st.evt_cons & ((1 << QLOG2) - 1)) * 32;
            if self.mem.read(a, &mut rec).is_err() {
                break;
            }
            let mut ev = Event::decode(&rec);
            ev.sid = self.vsid;
            out.push(ev);
            st.evt_cons = (st.evt_cons + 1) & mask;
        }
        let cons = u64::from(st.evt_cons | (prod & regs::EVENTQ_OVFLG));
        st.smmu.write(&self.mem, regs::EVENTQ_CONS, 4, cons);
        let lost_total = st.smmu.stats().events_lost;
        let lost = lost_total - st.lost_seen;
        st.lost_seen = lost_total;
        (out, lost)
    }

    /// Translate `len` bytes at IOVA `iova` into page-bounded IPA pieces `(ipa, off,
    /// len)`, all of them before any access (a fault anywhere touches nothing).
    fn pieces(
        &self,
        iova: u64,
        len: usize,
        access: Access,
    ) -> Result<Vec<(u64, usize, usize)>, DmaError> {
        let end = iova.checked_add(len as u64).ok_or(DmaError::Overflow {
            iova,
            len: len as u64,
        })?;
        let mut out = Vec::with_capacity(1);
        let mut a = iova;
        let mut st = self.state.lock();
        while a < end {
            let t = Transaction {
                sid: 0,
                ssid: None,
                addr: a,
                write: access == Access::Write,
            };
            let tr = match st.smmu.translate(&self.mem, t) {
                Ok(tr) => tr,
                Err(TranslateError::Fault { event, .. })
                    if event.code == super::evtq::code::F_PERMISSION =>
                {
                    return Err(DmaError::Permission { iova: a, access })
                }
                Err(_) => {
                    return Err(DmaError::Unmapped {
                        iova: a,
                        len: end - a,
                        access,
                    })
                }
            };
            let page = 1u64 << tr.size_bits.min(12);
            let n = (page - (a & (page - 1))).min(end - a);
            out.push((tr.addr, (a - iova) as usize, n as usize));
            a += n;
        }
        Ok(out)
    }
}

impl DmaSpace for Stage1Dma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let _inflight = self.inflight.read();
        for (ipa, off, n) in self.pieces(iova, buf.len(), Access::Read)? {
            self.mem.lower.read(ipa, &mut buf[off..off + n])?;
        }
        Ok(())
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let _inflight = self.inflight.read();
        for (ipa, off, n) in self.pieces(iova, data.len(), Access::Write)? {
            self.mem.lower.write(ipa, &data[off..off + n])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stage 2 stand-in: IPA 0..1 MiB backed, everything else unmapped.
    struct Ram(Mutex<Vec<u8>>);

    impl DmaSpace for Ram {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let m = self.0.lock();
            let s = iova as usize;
            let e = s
                .checked_add(buf.len())
                .filter(|&e| e <= m.len() && iova < 1 << 20);
            let Some(e) = e else {
                return Err(DmaError::Unmapped {
                    iova,
                    len: buf.len() as u64,
                    access: Access::Read,
                });
            };
            buf.copy_from_slice(&m[s..e]);
            Ok(())
        }
        fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            let mut m = self.0.lock();
            let s = iova as usize;
            let e = s
                .checked_add(data.len())
                .filter(|&e| e <= m.len() && iova < 1 << 20);
            let Some(e) = e else {
                return Err(DmaError::Unmapped {
                    iova,
                    len: data.len() as u64,
                    access: Access::Write,
                });
            };
            m[s..e].copy_from_slice(data);
            Ok(())
        }
    }

    fn w(ram: &Ram, a: u64, v: u64) {
        ram.write(a, &v.to_le_bytes()).unwrap();
    }

    /// 1 MiB of guest RAM holding a stage 1: CD at IPA 0x1000 (ASID 4, R), tables at
    /// 0x2000.., IOVA 0x4000_0000 → IPA 0x8000 read-write.
    fn guest_stage1() -> Arc<Ram> {
        let ram = Arc::new(Ram(Mutex::new(vec![0; 1 << 20])));
        let cd0 = 16 | (1 << 31) | (1 << 41) | (5 << 32) | (1 << 45) | (1 << 46) | (4u64 << 48);
        w(&ram, 0x1000, cd0);
        w(&ram, 0x1008, 0x2000);
        w(&ram, 0x2000, 0x3003);
        w(&ram, 0x3000 + 8, 0x4003);
        w(&ram, 0x4000, 0x5003);
        w(&ram, 0x5000, 0x8000 | 0x443);
        ram
    }

    #[test]
    fn device_walks_the_bound_stage1_and_reports_faults_with_the_vsid() {
        // 0x4000_1000 → IPA 0x9000 read-only too.
        let ram = guest_stage1();
        w(&ram, 0x5008, 0x9000 | 0x4c3);
        let dma = Stage1Dma::bind(ram.clone(), 0x42, [1 | (0b111 << 1) | 0x1000, 0]).unwrap();
        dma.write(0x4000_0ffc, &[1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap_err(); // crosses into RO
        dma.write(0x4000_0010, b"nested!").unwrap();
        let mut b = [0u8; 7];
        ram.read(0x8010, &mut b).unwrap();
        assert_eq!(&b, b"nested!");
        let mut c = [0u8; 7];
        dma.read(0x4000_0010, &mut c).unwrap();
        assert_eq!(c, b);
        // The cross-page write faulted on the read-only page: F_PERMISSION, vSID.
        let ev = dma.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].code, ev[0].sid, ev[0].input_addr),
            (0x13, 0x42, 0x4000_1000)
        );
        // The guest unmaps IOVA 0x4000_0000 and forwards TLBI_NH_VA + CMD_SYNC.
        w(&ram, 0x5000, 0);
        assert!(
            dma.read(0x4000_0010, &mut c).is_ok(),
            "IOTLB until invalidated"
        );
        dma.command([0x12 | (4u64 << 48), 0x4000_0000]).unwrap();
        dma.command([0x46, 0]).unwrap();
        assert!(matches!(
            dma.read(0x4000_0010, &mut c),
            Err(DmaError::Unmapped {
                iova: 0x4000_0010,
                ..
            })
        ));
        let ev = dma.take_events();
        assert_eq!((ev[0].code, ev[0].sid, ev[0].read), (0x10, 0x42, true));
        // Commands a guest may not forward, and STEs without stage 1.
        assert_eq!(
            dma.command([0x03, 0]),
            Err(Stage1Error::NotForwardable(0x03))
        );
        assert_eq!(
            dma.command([0x28, 0]),
            Err(Stage1Error::NotForwardable(0x28))
        );
        assert!(Stage1Dma::bind(ram.clone(), 1, [1 | (0b110 << 1), 0]).is_err());
        assert!(Stage1Dma::bind(ram.clone(), 1, [0, 0]).is_err());
        // Illegal stage-1 fields: reserved S1Fmt, S1CDMax beyond 8 bits, a two-level
        // CD table with S1CDMax 0, reserved S1DSS.
        for bad in [
            [0xb | (3 << 4) | (1 << 59), 0],
            [0xb | (9 << 59), 0],
            [0xb | (1 << 4), 0],
            [0xb, 3],
        ] {
            assert!(
                matches!(
                    Stage1Dma::bind(ram.clone(), 1, bad),
                    Err(Stage1Error::BadSte(_))
                ),
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn unmap_while_dma_in_flight_never_reads_another_page_and_ends_at_sync() {
        let ram = guest_stage1();
        ram.write(0x8000, &[0x11; 4096]).unwrap();
        ram.write(0x9000, &[0x22; 4096]).unwrap();
        let dma =
            Arc::new(Stage1Dma::bind(ram.clone(), 7, [1 | (0b101 << 1) | 0x1000, 0]).unwrap());
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let reader = {
            let (dma, stop, ok) = (dma.clone(), stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while !stop.load(SeqCst) {
                    if dma.read(0x4000_0100, &mut b).is_ok() {
                        assert!(b.iter().all(|&x| x == 0x11), "read another page: {b:?}");
                        ok.fetch_add(1, SeqCst);
                    }
                }
            })
        };
        // The guest unmaps the IOVA and maps it back, invalidating each time: a DMA
        // in flight reads the mapped page or faults (never the 0x22 neighbour), and
        // none gets through between an unmap's CMD_SYNC and the remap.
        for _ in 0..200 {
            w(&ram, 0x5000, 0);
            dma.command([0x12 | (4u64 << 48), 0x4000_0000]).unwrap();
            dma.command([0x46, 0]).unwrap();
            let mut b = [0u8; 8];
            assert!(
                dma.read(0x4000_0100, &mut b).is_err(),
                "after CMD_SYNC no DMA reaches it"
            );
            w(&ram, 0x5000, 0x8000 | 0x443);
            dma.command([0x12 | (4u64 << 48), 0x4000_0000]).unwrap();
            dma.command([0x46, 0]).unwrap();
        }
        // Mapped again: the reader gets through (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ok.load(SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        stop.store(true, SeqCst);
        reader.join().unwrap();
        assert!(ok.load(SeqCst) > 0, "DMA gets through while mapped");
        assert!(!dma.take_events().is_empty(), "faults were recorded");
    }

    #[test]
    fn a_faulting_access_touches_nothing() {
        let ram = guest_stage1();
        w(&ram, 0x5008, 0x9000 | 0x4c3); // 0x4000_1000 → 0x9000 read-only
        let dma = Stage1Dma::bind(ram.clone(), 3, [1 | (0b101 << 1) | 0x1000, 0]).unwrap();
        assert_eq!(
            dma.write(0x4000_0ff0, &[0xee; 32]),
            Err(DmaError::Permission {
                iova: 0x4000_1000,
                access: Access::Write
            })
        );
        let mut b = [0u8; 16];
        ram.read(0x8ff0, &mut b).unwrap();
        assert_eq!(b, [0; 16], "the mapped first page was not written either");
        // An unmapped third page: the read fails without filling the buffer.
        let mut big = [0x77u8; 0x2010];
        assert!(dma.read(0x4000_0000, &mut big).is_err());
        assert!(big.iter().all(|&x| x == 0x77));
    }

    /// Stage 2 that holds the DMA's data read until released, flagging when it
    /// finished.
    struct SlowRam {
        ram: Arc<Ram>,
        entered: Mutex<Option<std::sync::mpsc::Sender<()>>>,
        release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        finished: std::sync::atomic::AtomicBool,
    }

    impl DmaSpace for SlowRam {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            // Table walks read 8-byte descriptors; the DMA itself reads 64 bytes.
            if buf.len() == 64 {
                if let Some(tx) = self.entered.lock().take() {
                    let _ = tx.send(());
                    if let Some(rx) = self.release.lock().take() {
                        let _ = rx.recv();
                    }
                    self.finished
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            self.ram.read(iova, buf)
        }
        fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            self.ram.write(iova, data)
        }
    }

    #[test]
    fn quiesce_returns_only_after_dma_in_flight_completed() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let slow = Arc::new(SlowRam {
            ram: guest_stage1(),
            entered: Mutex::new(Some(tx)),
            release: Mutex::new(Some(release_rx)),
            finished: std::sync::atomic::AtomicBool::new(false),
        });
        let dma =
            Arc::new(Stage1Dma::bind(slow.clone(), 3, [1 | (0b101 << 1) | 0x1000, 0]).unwrap());
        let d2 = dma.clone();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            d2.read(0x4000_0000, &mut b)
        });
        rx.recv().unwrap();
        // The DMA is inside stage 2 with its translation: invalidate, then quiesce.
        dma.command([0x10, 0]).unwrap();
        dma.command([0x46, 0]).unwrap();
        assert!(
            !slow.finished.load(std::sync::atomic::Ordering::SeqCst),
            "commands alone do not wait"
        );
        // Release the DMA a little later: quiesce must wait for it.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            release_tx.send(()).unwrap();
        });
        dma.quiesce();
        assert!(
            slow.finished.load(std::sync::atomic::Ordering::SeqCst),
            "quiesce returned while a DMA using the old translation was running"
        );
        t.join().unwrap().unwrap();
        releaser.join().unwrap();
        // CMD_SYNC's completion signal is dropped (no MSI written into guest memory),
        // a reserved CS is still illegal.
        dma.command([0x46 | (1 << 12) | (0xabcd << 32), 0x8000])
            .unwrap();
        let mut b = [0u8; 4];
        slow.ram.read(0x8000, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        assert_eq!(
            dma.command([0x46 | (3 << 12), 0]),
            Err(Stage1Error::Illegal(regs::CERROR_ILL))
        );
        assert!(forwardable(0x12) && forwardable(0x46) && !forwardable(0x03));
    }
}
