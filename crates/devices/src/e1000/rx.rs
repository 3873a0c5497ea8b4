//! Receive: filtering and delivery of one frame into the descriptor ring.
//!
//! Called by the RX worker with the device lock held, for each frame the backend
//! hands over (Ethernet frame without FCS). Steps, following the datasheet:
//! 1. RCTL.EN off: the frame is not received (dropped, as the wire would).
//! 2. Address filter: perfect match against the 16 RAL/RAH entries with AV set;
//!    UPE accepts all unicast, MPE all multicast, BAM broadcast; other multicast goes
//!    through the 4096-bit MTA hash (RCTL.MO selects which 12 address bits index it).
//! 3. Size: frames shorter than 60 bytes are padded (as the MAC would see a padded
//!    frame); with SECRC clear the 4-byte FCS is appended (computed CRC-32); a frame
//!    over 1522 bytes with FCS is dropped and counted in ROC unless RCTL.LPE is set.
//!    The frame is not copied for this: buffer chunks inside the frame are DMAed
//!    from the caller's buffer, and a chunk that mixes frame bytes with padding / FCS
//!    is assembled in a scratch buffer the device keeps (no allocation per frame).
//! 4. Buffers: BSIZE/BSEX give the buffer size; the frame spans as many descriptors as
//!    it needs, EOP on the last. If fewer free descriptors than needed are between
//!    RDH and RDT, the frame is dropped: MPC and RNBC count it and RXO is raised (the
//!    receive FIFO would overflow) — never lost silently.
//! 5. Write-back: length, status DD (| EOP on the last | IXSM: no checksum offload),
//!    errors 0; RDH advances; RXT0 is raised at once when RDTR is 0, else after the
//!    receive delay timers (RDTR restarted by each frame, capped by RADV; see
//!    `delay.rs`); RXDMT0 is raised at once when the free descriptors fall to the
//!    RCTL.RDMTS threshold (1/2, 1/4, 1/8 of the ring).
//!
//! Hostile rings: as for transmit (see `tx.rs`): RDLEN keeps bits 19:7; a head or tail
//! beyond the ring or a DMA fault halts the receive queue (logged once; a DMA fault
//! sets PCI status "received master abort"); the frame in flight is counted in MPC;
//! RCTL.EN 0 -> 1 or a reset restarts it. Without PCI bus mastering nothing is DMAed
//! and frames are counted as missed.

use nestio_device::pci::PciFunction;
use nestio_dma::DmaSpace;

use super::regfile::{warn, Core, S64_GORC, S64_TOR};
use super::regs::*;
use super::tx::size_bucket;

/// Largest frame (with FCS) without RCTL.LPE.
pub const MAX_STD_FRAME: usize = 1522;
/// Largest frame (with FCS) the receiver accepts at all (LPE).
pub const MAX_LONG_FRAME: usize = 16384;
const MIN_FRAME: usize = 60;

/// Ethernet CRC-32 (reflected, polynomial 0xEDB88320), as the FCS is computed.
pub fn crc32(data: &[u8]) -> u32 {
    !crc32_update(0xFFFF_FFFF, data)
}

/// Continue a CRC-32 register (not inverted) over `data`.
fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    crc
}

/// Most bytes the receiver adds after a frame: padding of a 6-byte frame to 60, and
/// the FCS.
const TAIL_MAX: usize = MIN_FRAME - 6 + 4;

/// The bytes stored for one frame — the frame as received, zero padding up to
/// [`MIN_FRAME`] and, with RCTL.SECRC clear, the FCS — described without copying the
/// frame: buffer chunks that lie inside the frame are DMAed straight from the caller's
/// buffer (the backend's receive buffer or a pending frame); only a chunk that spans
/// the end of the frame and the added bytes is assembled, in a scratch buffer the
/// device keeps (so no allocation per frame once it has grown).
struct Stored<'a> {
    frame: &'a [u8],
    tail: [u8; TAIL_MAX],
    tail_len: usize,
}

impl<'a> Stored<'a> {
    /// `frame` is at least 6 bytes (the receiver drops shorter ones before).
    fn new(frame: &'a [u8], with_fcs: bool) -> Self {
        let pad = MIN_FRAME.saturating_sub(frame.len());
        let mut tail = [0u8; TAIL_MAX];
        let mut tail_len = pad;
        if with_fcs {
            let crc = !crc32_update(crc32_update(0xFFFF_FFFF, frame), &tail[..pad]);
            tail[pad..pad + 4].copy_from_slice(&crc.to_le_bytes());
            tail_len += 4;
        }
        Stored {
            frame,
            tail,
            tail_len,
        }
    }

    fn len(&self) -> usize {
        self.frame.len() + self.tail_len
    }

    /// Bytes `[start, end)` of the stored frame (`start <= end <= len()`).
    fn bytes<'s>(&'s self, start: usize, end: usize, scratch: &'s mut Vec<u8>) -> &'s [u8] {
        let f = self.frame.len();
        if end <= f {
            &self.frame[start..end]
        } else if start >= f {
            &self.tail[start - f..end - f]
        } else {
            scratch.clear();
            scratch.extend_from_slice(&self.frame[start..]);
            scratch.extend_from_slice(&self.tail[..end - f]);
            scratch
        }
    }
}

/// Outcome of offering a frame to the receiver (for tests and tracing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written to guest buffers.
    Delivered,
    /// Receiver disabled.
    Disabled,
    /// Filtered out by address.
    Filtered,
    /// Too long (ROC).
    Oversize,
    /// No free descriptors (MPC, RXO).
    NoBuffers,
    /// Queue halted or DMA not possible (MPC).
    Halted,
}

impl Core {
    /// Does the address filter accept `dst`?
    pub fn rx_accepts(&self, dst: &[u8; 6]) -> bool {
        let rctl = self.reg(RCTL);
        for i in 0..RA_ENTRIES {
            let lo = self.reg(RA + 8 * i);
            let hi = self.reg(RA + 8 * i + 4);
            if hi & (1 << 31) == 0 {
                continue;
            }
            let l = lo.to_le_bytes();
            let h = hi.to_le_bytes();
            if dst[..4] == l && dst[4..] == h[..2] {
                return true;
            }
        }
        if *dst == [0xFF; 6] {
            return rctl & RCTL_BAM != 0;
        }
        if dst[0] & 1 != 0 {
            if rctl & RCTL_MPE != 0 {
                return true;
            }
            let h = mta_hash(dst, (rctl >> RCTL_MO_SHIFT) & 3);
            let word = self.reg(MTA + 4 * (h >> 5));
            return word & (1 << (h & 31)) != 0;
        }
        rctl & RCTL_UPE != 0
    }

    fn rx_ring(&self) -> (u64, u32) {
        let base = (u64::from(self.reg(RDBAH)) << 32) | u64::from(self.reg(RDBAL));
        (base, self.reg(RDLEN) / DESC_SIZE as u32)
    }

    fn rx_missed(&mut self) {
        self.stat_inc(MPC);
    }

    fn rx_dma_fault(&mut self, what: std::fmt::Arguments<'_>) {
        self.rx_halted = true;
        self.pci
            .lock_config()
            .set_status_bits(nestio_device::pci::status::REC_MASTER_ABORT, true);
        self.warn_once(
            warn::RX_DMA,
            format_args!("receive DMA fault ({what}); receive queue halted until RCTL.EN is toggled or the device is reset"),
        );
    }

    /// Write `data` into `needed` descriptors from RDH on (the caller checked they are
    /// free), advancing RDH after each write-back. A fault halts the queue and counts
    /// the frame as missed.
    fn rx_store(
        &mut self,
        data: &Stored<'_>,
        bufsize: usize,
        needed: usize,
        dma: &dyn DmaSpace,
        scratch: &mut Vec<u8>,
    ) -> Result<(), RxOutcome> {
        let (base, count) = self.rx_ring();
        let mut head = self.reg(RDH);
        for i in 0..needed {
            let start = i * bufsize;
            let end = (start + bufsize).min(data.len());
            let chunk = data.bytes(start, end, scratch);
            let Some(daddr) = base.checked_add(u64::from(head) * DESC_SIZE) else {
                self.rx_dma_fault(format_args!("descriptor address overflows"));
                self.rx_missed();
                return Err(RxOutcome::Halted);
            };
            let mut d = [0u8; 8];
            if let Err(e) = dma.read(daddr, &mut d) {
                self.rx_dma_fault(format_args!("descriptor read: {e}"));
                self.rx_missed();
                return Err(RxOutcome::Halted);
            }
            let baddr = u64::from_le_bytes(d);
            if let Err(e) = dma.write(baddr, chunk) {
                self.rx_dma_fault(format_args!("buffer write: {e}"));
                self.rx_missed();
                return Err(RxOutcome::Halted);
            }
            let last = i + 1 == needed;
            let mut wb = [0u8; 8];
            wb[..2].copy_from_slice(&(chunk.len() as u16).to_le_bytes());
            wb[4] = RXD_STA_DD | RXD_STA_IXSM | if last { RXD_STA_EOP } else { 0 };
            let r = match daddr.checked_add(8) {
                Some(a) => dma.write(a, &wb),
                None => Err(nestio_dma::DmaError::Overflow {
                    iova: daddr,
                    len: 16,
                }),
            };
            if let Err(e) = r {
                self.rx_dma_fault(format_args!("descriptor write-back: {e}"));
                self.rx_missed();
                return Err(RxOutcome::Halted);
            }
            head = (head + 1) % count;
            self.set_reg(RDH, head);
        }
        Ok(())
    }

    /// Offer one frame (without FCS) to the receiver.
    pub fn receive(&mut self, frame: &[u8], irqs: &PciFunction, dma: &dyn DmaSpace) -> RxOutcome {
        let rctl = self.reg(RCTL);
        if rctl & RCTL_EN == 0 {
            return RxOutcome::Disabled;
        }
        if frame.len() < 6 {
            self.stat_inc(RXERRC);
            return RxOutcome::Filtered;
        }
        self.stat_inc(TPR);
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        if !self.rx_accepts(&dst) {
            return RxOutcome::Filtered;
        }
        let wire = frame.len().max(MIN_FRAME) + 4;
        let limit = if rctl & RCTL_LPE != 0 {
            MAX_LONG_FRAME
        } else {
            MAX_STD_FRAME
        };
        if wire > limit {
            self.stat_inc(ROC);
            return RxOutcome::Oversize;
        }
        let data = Stored::new(frame, rctl & RCTL_SECRC == 0);
        let Some(bufsize) = rx_buffer_size(rctl) else {
            self.warn_once(
                warn::RX_BSIZE,
                format_args!(
                    "RCTL selects a reserved buffer size (BSEX with BSIZE 0); frames dropped"
                ),
            );
            self.rx_missed();
            return RxOutcome::Halted;
        };
        if self.rx_halted {
            self.rx_missed();
            return RxOutcome::Halted;
        }
        if !self.pci.bus_master() {
            self.warn_once(
                warn::RX_BME,
                format_args!("receive enabled without PCI bus mastering; frames counted as missed"),
            );
            self.rx_missed();
            return RxOutcome::Halted;
        }
        let (_, count) = self.rx_ring();
        let head = self.reg(RDH);
        let tail = self.reg(RDT);
        if count == 0 {
            self.rx_missed();
            self.stat_inc(RNBC);
            self.raise(ICR_RXO, irqs);
            return RxOutcome::NoBuffers;
        }
        if head >= count || tail >= count {
            self.rx_halted = true;
            self.warn_once(
                warn::RX_RING,
                format_args!("receive head {head} or tail {tail} beyond the {count}-descriptor ring; queue halted until RCTL.EN is toggled or the device is reset"),
            );
            self.rx_missed();
            return RxOutcome::Halted;
        }
        let free = (tail + count - head) % count;
        let needed = data.len().div_ceil(bufsize);
        if (free as usize) < needed {
            self.rx_missed();
            self.stat_inc(RNBC);
            self.raise(ICR_RXO, irqs);
            return RxOutcome::NoBuffers;
        }
        let mut scratch = std::mem::take(&mut self.rx_scratch);
        let stored = self.rx_store(&data, bufsize, needed, dma, &mut scratch);
        self.rx_scratch = scratch;
        if let Err(outcome) = stored {
            return outcome;
        }
        let head = self.reg(RDH);
        // Statistics count the frame with its FCS, whether or not the FCS was stored.
        let wire = wire as u64;
        self.stat_inc(GPRC);
        self.stat_add64(S64_GORC, wire);
        self.stat_add64(S64_TOR, wire);
        if dst == [0xFF; 6] {
            self.stat_inc(BPRC);
        } else if dst[0] & 1 != 0 {
            self.stat_inc(MPRC);
        }
        self.stat_inc(size_bucket(PRC64, wire));
        let mut causes = self.rx_stored(std::time::Instant::now());
        let free = (tail + count - head) % count;
        let shift = match (rctl >> RCTL_RDMTS_SHIFT) & 3 {
            0 => 1,
            1 => 2,
            _ => 3,
        };
        if free <= count >> shift {
            causes |= ICR_RXDMT0;
        }
        self.raise(causes, irqs);
        RxOutcome::Delivered
    }
}

/// The 12-bit multicast table index of `addr` for RCTL.MO `mo`.
pub fn mta_hash(addr: &[u8; 6], mo: u32) -> u32 {
    let (a4, a5) = (u32::from(addr[4]), u32::from(addr[5]));
    let h = match mo {
        0 => (a4 >> 4) | (a5 << 4),
        1 => (a4 >> 3) | (a5 << 5),
        2 => (a4 >> 2) | (a5 << 6),
        _ => a4 | (a5 << 8),
    };
    h & 0xFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    /// Every split of the stored bytes equals the same range of the frame copied,
    /// padded and extended with its FCS (what the receiver stored before it stopped
    /// copying frames).
    #[test]
    fn stored_bytes_match_padded_frame_with_fcs() {
        let mut scratch = Vec::new();
        for len in [6usize, 42, 59, 60, 61, 100, 1514] {
            let frame: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
            for with_fcs in [false, true] {
                let mut want = frame.clone();
                want.resize(len.max(MIN_FRAME), 0);
                if with_fcs {
                    let fcs = crc32(&want);
                    want.extend_from_slice(&fcs.to_le_bytes());
                }
                let s = Stored::new(&frame, with_fcs);
                assert_eq!(s.len(), want.len());
                for bufsize in [1, 3, 7, 59, 60, 64, 256, 2048] {
                    let mut got = Vec::new();
                    let mut start = 0;
                    while start < s.len() {
                        let end = (start + bufsize).min(s.len());
                        got.extend_from_slice(s.bytes(start, end, &mut scratch));
                        start = end;
                    }
                    assert_eq!(got, want, "len {len} fcs {with_fcs} bufsize {bufsize}");
                }
            }
        }
    }

    #[test]
    fn mta_hash_modes() {
        let a = [0x01, 0x00, 0x5E, 0x00, 0x00, 0xFB];
        assert_eq!(mta_hash(&a, 0), 0xFB0);
        assert_eq!(mta_hash(&a, 3), 0xB00);
    }
}
