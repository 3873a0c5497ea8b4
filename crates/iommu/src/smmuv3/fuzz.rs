//! Fuzzing entry point for the walker and the command queue (cargo-fuzz target
//! `smmuv3`, corpus replayed by `nestio/tests/fuzz_corpus.rs`).
//!
//! Input: the first byte picks the memory size (1..=16 pages), that many bytes of
//! the input become guest memory at address 0 (tables, queues, everything hostile),
//! and the rest is a program of operations: register writes (any register of the
//! map, any value, 32 or 64 bits — which consumes hostile commands), translations,
//! side-effect-free probes and stream views. Invariants checked beyond "no panic,
//! no hang": a probe records no event; every extent of a stream view translates (by
//! probe, with the extent's permission) to exactly the extent's output address; the
//! queue indices stay inside their queues.

use super::{regs, FlatMemory, Smmu, SmmuMemory, StreamView, Transaction, TranslateError};

const OFFSETS: [u64; 20] = [
    regs::CR0,
    regs::GBPA,
    regs::IRQ_CTRL,
    regs::GERRORN,
    regs::GERROR_IRQ_CFG0,
    regs::STRTAB_BASE,
    regs::STRTAB_BASE_CFG,
    regs::CMDQ_BASE,
    regs::CMDQ_PROD,
    regs::CMDQ_CONS,
    regs::EVENTQ_BASE,
    regs::EVENTQ_PROD,
    regs::EVENTQ_CONS,
    regs::EVENTQ_IRQ_CFG0,
    regs::EVENTQ_IRQ_CFG1,
    regs::CR1,
    0x84,
    0x94,
    0xa4,
    0x1234,
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u64(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..8 {
            v |= u64::from(self.u8()?) << (8 * i);
        }
        Some(v)
    }
}

/// Run one fuzz input (see the module documentation).
pub fn fuzz_smmuv3(data: &[u8]) {
    let mut input = Input(data);
    let Some(pages) = input.u8() else { return };
    let size = (usize::from(pages % 16) + 1) * 4096;
    let mem = FlatMemory::new(0, size);
    let image = &input.0[..input.0.len().min(size)];
    if mem.write(0, image).is_err() {
        return;
    }
    input.0 = &input.0[image.len()..];
    let mut smmu = Smmu::new();
    // Small addresses: keep the program's sids and IOVAs where the tables can be.
    for _ in 0..64 {
        let Some(op) = input.u8() else { break };
        match op % 5 {
            0 | 1 => {
                let Some(i) = input.u8() else { break };
                let Some(v) = input.u64() else { break };
                let off = OFFSETS[usize::from(i) % OFFSETS.len()];
                let size = if op & 0x80 != 0 { 8 } else { 4 };
                smmu.write(&mem, off, size, v);
            }
            2 => {
                let (Some(sid), Some(addr)) = (input.u8(), input.u64()) else {
                    break;
                };
                let t = Transaction {
                    sid: u32::from(sid),
                    ssid: (op & 0x40 != 0).then_some(u32::from(op >> 3 & 7)),
                    addr: addr & 0xffff_ffff_ffff,
                    write: op & 0x80 != 0,
                };
                let r = smmu.translate(&mem, t);
                if let Err(TranslateError::Fault { event, .. }) = r {
                    assert_eq!(event.sid, t.sid);
                }
            }
            3 => {
                let (Some(sid), Some(addr)) = (input.u8(), input.u64()) else {
                    break;
                };
                let before = smmu.stats();
                let _ = smmu.probe(
                    &mem,
                    Transaction {
                        sid: u32::from(sid),
                        ssid: None,
                        addr,
                        write: op & 0x80 != 0,
                    },
                );
                assert_eq!(smmu.stats(), before, "a probe has no side effects");
            }
            _ => {
                let Some(sid) = input.u8() else { break };
                let sid = u32::from(sid);
                if let Ok(StreamView::Mapped(extents)) = smmu.stream_view(&mem, sid, 64) {
                    for e in extents {
                        let t = Transaction {
                            sid,
                            ssid: None,
                            addr: e.input,
                            write: !e.perm.read,
                        };
                        let p = smmu.probe(&mem, t);
                        assert_eq!(
                            p.map(|t| t.addr),
                            Ok(e.output),
                            "stream view and walk disagree on {e:?}"
                        );
                    }
                }
            }
        }
        let cmdq_mask =
            (1u64 << (regs::queue_log2(smmu.read(regs::CMDQ_BASE, 8), regs::CMDQS) + 1)) - 1;
        assert_eq!(smmu.read(regs::CMDQ_CONS, 4) & 0xff_ffff & !cmdq_mask, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_entry_accepts_garbage_and_a_valid_setup() {
        fuzz_smmuv3(&[]);
        fuzz_smmuv3(&[0xff; 300]);
        let mut v = vec![0u8];
        v.extend(std::iter::repeat_n(0x5a, 4096));
        v.extend([
            0, 7, 0xd, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 4, 1,
        ]);
        fuzz_smmuv3(&v);
    }
}
