//! Fuzzing entry point for device state restore: [`fuzz_migration`] feeds a hostile
//! migration stream (what a vfio-user client sends with MIG_DATA_WRITE) to the e1000
//! or the sample device and checks that the restore either fails cleanly or leaves a
//! consistent device.
//!
//! Input layout: byte 0 picks the device (bit 0: e1000 / sample), how the stream is
//! built (bit 1: *raw* — the bytes are the stream, length-prefixed; or *patch* — the
//! device's own stream, saved from a configured device, with overwrite / insert /
//! delete / truncate edits; bit 2: in patch mode, recompute the sample stream's
//! checksum so the edits reach the field checks) and the chunking of MIG_DATA_WRITE
//! (bits 3-4 with byte 1). Whatever remains drives the device after the restore.
//!
//! Checks besides "no panic, no hang":
//! - a refused restore leaves the device in the migration ERROR state, and a reset
//!   brings it back to RUNNING;
//! - an accepted restore leaves it in STOP; the state it then saves must be accepted
//!   by a fresh device, which must save the very same bytes (a device never produces
//!   a stream it refuses, and restore + save is a fixed point);
//! - register, configuration and DMA activity afterwards (on a mapped 64 KiB memfd)
//!   and a reset all return `Ok` or an error, and after the reset the device is
//!   RUNNING again.

use std::sync::Arc;

use nestio_device_model::{pci_index, IrqAction, IrqData, MigState, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_net::NoneBackend;

use crate::e1000::{regs as e1k, E1000Config, E1000};
use crate::fuzz_input::FuzzInput;
use crate::sample::{self, SampleDevice};

/// IOVA of the memory mapped to the device under test.
const IOVA: u64 = 0x10000;
const MEM: u64 = 0x10000;

/// Which device, and how to poke it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sample,
    E1000,
}

/// The device under test, concrete so the e1000 can also be handed frames.
enum Dev {
    Sample(Box<SampleDevice>),
    E1000(Arc<E1000>),
}

impl Dev {
    fn new(kind: Kind) -> Option<Dev> {
        let d = match kind {
            Kind::Sample => Dev::Sample(Box::new(SampleDevice::new().ok()?)),
            Kind::E1000 => {
                Dev::E1000(E1000::new(E1000Config::new(Box::new(NoneBackend::new().ok()?))).ok()?)
            }
        };
        let fd = nestio_dma::memfd::sealed_memfd(c"fuzz-migration", MEM).ok()?;
        d.dev()
            .dma_map(DmaMapRequest {
                range: DmaRange::new(IOVA, MEM).ok()?,
                prot: Prot::RW,
                backing: DmaBacking::Fd {
                    fd: Arc::new(fd),
                    offset: 0,
                },
            })
            .ok()?;
        Some(d)
    }

    fn dev(&self) -> &dyn VfioDevice {
        match self {
            Dev::Sample(d) => d.as_ref(),
            Dev::E1000(d) => d.as_ref(),
        }
    }

    fn w32(&self, region: u32, off: u64, v: u32) {
        let _ = self.dev().region_write(region, off, &v.to_le_bytes());
    }

    /// Give the device some state worth saving: bus master, rings, masks, MSI-X.
    fn configure(&self) {
        self.w32(pci_index::CONFIG, 4, 0x0007);
        match self {
            Dev::Sample(_) => {
                use sample::regs::*;
                for (r, v) in [
                    (SCRATCH, 0x5a5a_1234),
                    (INT_MASK, 0x2),
                    (DMA_SRC_LO, IOVA as u32),
                    (DMA_DST_LO, IOVA as u32 + 0x1000),
                    (DMA_LEN, 0x100),
                    (DMA_PATTERN, 0xdead_beef),
                ] {
                    self.w32(0, r, v);
                }
                self.w32(0, sample::MSIX_TABLE_OFFSET, 0xfee0_0000);
                self.w32(0, sample::MSIX_TABLE_OFFSET + 8, 0x41);
                let _ = self
                    .dev()
                    .region_write(sample::RAM_BAR, 0x100, b"nestio sample ram");
            }
            Dev::E1000(_) => {
                for (r, v) in [
                    (e1k::RDBAL, IOVA as u32),
                    (e1k::RDLEN, 128),
                    (e1k::TDBAL, IOVA as u32 + 0x1000),
                    (e1k::TDLEN, 128),
                    (e1k::IMS, 0x9d),
                    (e1k::RCTL, 0x0400_8002),
                    (e1k::TCTL, 0x0004_010a),
                    (e1k::RDT, 3),
                ] {
                    self.w32(0, u64::from(r), v);
                }
            }
        }
    }

    /// Run to STOP_COPY, read the whole stream (in chunks), go back to STOP.
    fn save(&self) -> Option<Vec<u8>> {
        let d = self.dev();
        d.mig_set_state(MigState::StopCopy).ok()?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = d.mig_data_read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            assert!(out.len() <= 1 << 24, "a device stream that never ends");
        }
        d.mig_set_state(MigState::Stop).ok()?;
        Some(out)
    }

    /// STOP -> RESUMING, write `stream` in `chunk`-byte pieces, -> STOP.
    fn restore(&self, stream: &[u8], chunk: usize) -> nestio_device_model::Result<MigState> {
        let d = self.dev();
        d.mig_set_state(MigState::Stop)?;
        d.mig_set_state(MigState::Resuming)?;
        for c in stream.chunks(chunk.max(1)) {
            if d.mig_data_write(c).is_err() {
                break;
            }
        }
        d.mig_set_state(MigState::Stop)
    }
}

/// FNV-1a 64, the sample stream's trailer.
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The device's own stream with the edits `inp` describes.
fn patched(kind: Kind, fix_sum: bool, inp: &mut FuzzInput<'_>) -> Option<Vec<u8>> {
    let src = Dev::new(kind)?;
    src.configure();
    src.dev().mig_set_state(MigState::Stop).ok()?;
    if let Dev::E1000(e) = &src {
        // A frame that arrives while the device is stopped waits in the state.
        let mut frame = vec![0xffu8; 60];
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        let _ = e.inject_frame(&frame);
    }
    let mut s = src.save()?;
    let n = inp.u8().unwrap_or(0) % 16;
    for _ in 0..n {
        let (Some(kind), Some(off)) = (inp.u8(), inp.u32()) else {
            break;
        };
        let off = off as usize % (s.len() + 1);
        let len = usize::from(kind >> 2);
        match kind & 3 {
            0 => {
                let bytes = inp.take(len);
                let end = (off + bytes.len()).min(s.len());
                s[off..end].copy_from_slice(&bytes[..end - off]);
            }
            1 => {
                let bytes = inp.take(len).to_vec();
                s.splice(off..off, bytes);
            }
            2 => {
                let end = (off + len).min(s.len());
                s.drain(off..end);
            }
            _ => s.truncate(off),
        }
    }
    if fix_sum && kind == Kind::Sample && s.len() >= 8 {
        let at = s.len() - 8;
        let sum = fnv1a64(&s[..at]);
        s[at..].copy_from_slice(&sum.to_le_bytes());
    }
    Some(s)
}

/// Restore a hostile migration stream into a fresh device. See the module documentation.
pub fn fuzz_migration(data: &[u8]) {
    run(data);
}

/// [`fuzz_migration`]'s body: `Some(accepted)` once a restore was tried.
fn run(data: &[u8]) -> Option<bool> {
    let mut inp = FuzzInput(data);
    let (sel, cp) = (inp.u8()?, inp.u8()?);
    let kind = if sel & 1 != 0 {
        Kind::E1000
    } else {
        Kind::Sample
    };
    let stream = if sel & 2 != 0 {
        patched(kind, sel & 4 != 0, &mut inp)?
    } else {
        let n = usize::from(inp.u16().unwrap_or(0));
        inp.take(n).to_vec()
    };
    let chunk = match (sel >> 3) & 3 {
        0 => stream.len(),
        1 => usize::from(cp) + 1,
        2 => 4096,
        _ => (usize::from(cp) + 1) * 64,
    };
    let dst = Dev::new(kind)?;
    let d = dst.dev();
    let result = dst.restore(&stream, chunk);
    match &result {
        Ok(s) => {
            let s = *s;
            assert_eq!(s, MigState::Stop);
            assert_eq!(d.mig_state().ok(), Some(MigState::Stop));
            // Restore + save is a fixed point, and a device accepts what it saves.
            let Some(saved) = dst.save() else {
                panic!("a restored device cannot save its state");
            };
            if let Some(twin) = Dev::new(kind) {
                if let Err(e) = twin.restore(&saved, 4096) {
                    panic!("a device refused the stream it saved after a restore: {e}");
                }
                assert!(
                    twin.save().as_deref() == Some(&saved[..]),
                    "restore + save is not a fixed point"
                );
            }
            let _ = d.mig_set_state(MigState::Running);
        }
        Err(_) => {
            let st = d.mig_state().ok();
            assert!(
                matches!(st, Some(MigState::Error) | Some(MigState::Stop)),
                "a refused restore left the device in {st:?}"
            );
            let _ = d.mig_set_state(MigState::Running);
        }
    }
    exercise(&dst, &mut inp);
    assert!(d.reset().is_ok(), "reset after a restore failed");
    assert_eq!(d.mig_state().ok(), Some(MigState::Running));
    exercise(
        &dst,
        &mut FuzzInput(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]),
    );
    Some(result.is_ok())
}

/// Register, config and interrupt traffic after the restore.
fn exercise(dst: &Dev, inp: &mut FuzzInput<'_>) {
    let d = dst.dev();
    // Everything readable reads without panicking.
    let mut buf = [0u8; 4];
    for off in (0..256).step_by(4) {
        let _ = d.region_read(pci_index::CONFIG, off, &mut buf);
    }
    match dst {
        Dev::Sample(_) => {
            for off in (0..0x50).chain(0x800..0x820).chain(0xc00..0xc08).step_by(4) {
                let _ = d.region_read(0, off, &mut buf);
            }
        }
        Dev::E1000(_) => {
            for r in [
                e1k::CTRL,
                e1k::STATUS,
                e1k::EECD,
                e1k::EERD,
                e1k::ICR,
                e1k::RDH,
                e1k::RDT,
                e1k::TDH,
                e1k::TDT,
                e1k::MDIC,
            ] {
                let _ = d.region_read(0, u64::from(r), &mut buf);
            }
            for off in (0..e1k::IO_SIZE).step_by(4) {
                let _ = d.region_read(1, off, &mut buf);
            }
        }
    }
    for _ in 0..32 {
        let (Some(op), Some(v)) = (inp.u8(), inp.u32()) else {
            break;
        };
        match (op % 8, dst) {
            (0, _) => dst.w32(pci_index::CONFIG, u64::from(op >> 3) * 4, v),
            (1, Dev::Sample(_)) => {
                let off = u64::from(op >> 3) * 4;
                dst.w32(0, off, v);
                let _ = d.region_read(0, off, &mut buf);
            }
            (2, Dev::Sample(_)) => {
                dst.w32(0, sample::regs::DMA_CMD, u32::from(op >> 3) % 4);
            }
            (3, _) => {
                let action = [IrqAction::Mask, IrqAction::Unmask, IrqAction::Trigger]
                    [usize::from(op >> 3) % 3];
                let _ = d.set_irqs(v % 3, action, 0, 1, IrqData::None);
            }
            (4, Dev::Sample(_)) => {
                dst.w32(0, sample::MSIX_TABLE_OFFSET + u64::from(op >> 3) * 4, v);
            }
            (1 | 2 | 4, Dev::E1000(_)) => {
                const REGS: [u32; 16] = [
                    e1k::CTRL,
                    e1k::ICR,
                    e1k::ICS,
                    e1k::IMS,
                    e1k::IMC,
                    e1k::RCTL,
                    e1k::TCTL,
                    e1k::RDT,
                    e1k::TDT,
                    e1k::RDH,
                    e1k::TDH,
                    e1k::EECD,
                    e1k::EERD,
                    e1k::MDIC,
                    e1k::RDLEN,
                    e1k::TDLEN,
                ];
                dst.w32(0, u64::from(REGS[usize::from(op >> 4)]), v);
            }
            (5, Dev::E1000(e)) => {
                let mut frame = vec![0xffu8; 60];
                frame[12..14].copy_from_slice(&(v as u16).to_be_bytes());
                let _ = e.inject_frame(&frame);
            }
            (6, _) => {
                let _ = d.mig_set_state(MigState::Stop);
                let _ = dst.save();
                let _ = d.mig_set_state(MigState::Running);
            }
            _ => {
                let _ = d.region_read(u32::from(op >> 5), u64::from(v), &mut buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device's own stream (patch mode, no edits) is accepted in any chunking, by
    /// both devices: the harness reaches the fixed-point check.
    #[test]
    fn own_streams_are_accepted() {
        for dev in [0u8, 1] {
            for (chunks, cp) in [(0u8, 0u8), (1, 6), (2, 0), (3, 1)] {
                let sel = dev | 2 | chunks << 3;
                assert_eq!(
                    run(&[sel, cp, 0]),
                    Some(true),
                    "device {dev} chunks {chunks}"
                );
            }
        }
    }

    /// Edited streams: a flipped byte is caught by the sample's checksum unless the
    /// harness recomputes it; a truncated or empty stream is refused by both.
    #[test]
    fn edited_streams_are_refused_cleanly() {
        // Overwrite the magic's first byte.
        let flip = |dev: u8, fix: u8| [dev | 2 | fix << 2, 0, 1, 1 << 2, 0, 0, 0, 0, 0x55];
        assert_eq!(run(&flip(0, 0)), Some(false));
        assert_eq!(run(&flip(0, 1)), Some(false), "bad magic, good checksum");
        assert_eq!(run(&flip(1, 0)), Some(false));
        // Truncate at byte 100.
        for dev in [0u8, 1] {
            assert_eq!(run(&[dev | 2, 0, 1, 3, 100, 0, 0, 0]), Some(false));
            assert_eq!(run(&[dev, 0, 0, 0]), Some(false), "empty raw stream");
        }
    }
}
