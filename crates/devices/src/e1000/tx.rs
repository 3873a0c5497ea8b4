//! Transmit: the descriptor ring walked synchronously on the TDT (or TCTL) write.
//!
//! Each descriptor is read once by DMA into a local copy and acted on from that copy.
//! Supported formats: legacy (16 bytes; optional checksum insertion with CMD.IC at
//! CSO over CSS..end), the extended TCP/IP context descriptor (DEXT, DTYP 0: records
//! the IP/TCP-UDP checksum offsets) and the extended data descriptor (DEXT, DTYP 1:
//! 20-bit length, POPTS.IXSM/TXSM insert the checksums of the context), including TCP
//! segmentation (TSE: the packet, up to [`TX_MAX_TSO`] bytes, is cut into MSS-sized
//! segments with fixed-up headers; see `Core::segment`).
//!
//! Buffers are gathered until EOP into one frame of at most [`TX_MAX_FRAME`] bytes; a
//! longer packet is consumed to its EOP and dropped. A descriptor with RS gets DD
//! written back and raises TXDW — at once, or, with IDE set in its command byte and a
//! non-zero TIDV, after the transmit delay timers (TIDV restarted by each such
//! write-back, capped by TADV; see `delay.rs`); an emptied ring raises TXQE at once.
//! Frames go to the backend after the device lock is released (`Core::out_frames`).
//!
//! Hostile rings (the documented choice): TDLEN keeps only bits 19:7 (so the ring is a
//! whole number of 128-byte blocks; 0 means no ring). A head or tail beyond the ring,
//! or a DMA fault on a descriptor or buffer (an address outside the DMA mappings: a
//! master abort on real hardware), halts the transmit queue: the fault is logged once,
//! PCI status "received master abort" is set for DMA faults, registers keep being
//! served, and the queue restarts when the driver re-enables it (TCTL.EN 0 -> 1) or
//! resets the device. The walk is bounded by the ring size per kick. Without PCI bus
//! mastering the queue simply waits (no DMA); a later enable or TDT write restarts it.

use nestio_device::pci::PciFunction;
use nestio_dma::DmaSpace;

use super::regfile::{warn, Core, S64_GOTC, S64_TOT};
use super::regs::*;

/// Largest packet the transmitter assembles (bytes, without FCS).
pub const TX_MAX_FRAME: usize = 16384;
/// Largest TCP segmentation (TSE) packet assembled: 64 KiB of payload plus headers.
pub const TX_MAX_TSO: usize = 65536 + 256;
/// Smallest MSS accepted for segmentation (bounds the segments per packet).
const MIN_MSS: usize = 64;
/// Minimum frame with PSP padding (without FCS).
const MIN_FRAME: usize = 60;

/// Checksum offsets from the last context descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxContext {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    /// TUCMD byte (TCP bit 0, IP bit 1, TSE bit 2).
    pub tucmd: u8,
    /// Segmentation: header length (headers copied into every segment).
    pub hdrlen: u8,
    /// Segmentation: maximum segment size (payload bytes per segment).
    pub mss: u16,
}

/// Packet assembly state across descriptors (and across TDT writes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxState {
    /// Bytes gathered so far.
    pub pkt: Vec<u8>,
    /// The packet exceeded [`TX_MAX_FRAME`]; it is dropped at EOP.
    pub oversize: bool,
    /// Checksum insertion requested by the first data descriptor (legacy IC / POPTS).
    pub popts: u8,
    /// Legacy checksum offsets (CSO, CSS) when IC is set.
    pub legacy_csum: Option<(u8, u8)>,
    /// The packet uses TCP segmentation (dropped).
    pub tse: bool,
    /// Last context.
    pub ctx: TxContext,
}

/// One's complement checksum of `data` (as used by IP/TCP/UDP), not inverted.
fn ones_sum(data: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum
}

/// Insert the checksum of `pkt[start..=end]` (end 0: to the packet end) at `at`.
/// Out-of-range offsets leave the packet unchanged (the hardware would send garbage;
/// we send the bytes as given).
fn insert_csum(pkt: &mut [u8], start: usize, at: usize, end: usize, udp: bool) {
    let last = if end == 0 {
        pkt.len()
    } else {
        (end + 1).min(pkt.len())
    };
    if start >= last || at.checked_add(2).is_none_or(|e| e > pkt.len()) {
        return;
    }
    let mut c = !(ones_sum(&pkt[start..last]) as u16);
    if udp && c == 0 {
        c = 0xFFFF;
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

impl Core {
    fn tx_ring(&self) -> (u64, u32) {
        let base = (u64::from(self.reg(TDBAH)) << 32) | u64::from(self.reg(TDBAL));
        (base, self.reg(TDLEN) / DESC_SIZE as u32)
    }

    /// Walk the transmit ring from TDH to TDT.
    pub fn process_tx(&mut self, irqs: &PciFunction, dma: &dyn DmaSpace) {
        if self.reg(TCTL) & TCTL_EN == 0 || self.tx_halted || !self.running() {
            return;
        }
        if !self.pci.bus_master() {
            self.warn_once(
                warn::TX_BME,
                format_args!("transmit enabled without PCI bus mastering; waiting"),
            );
            return;
        }
        let (base, count) = self.tx_ring();
        if count == 0 {
            return;
        }
        let mut head = self.reg(TDH);
        let tail = self.reg(TDT);
        if head >= count || tail >= count {
            self.tx_halted = true;
            self.warn_once(
                warn::TX_RING,
                format_args!(
                    "transmit head {head} or tail {tail} beyond the {count}-descriptor ring; queue halted until TCTL.EN is toggled or the device is reset"
                ),
            );
            return;
        }
        let mut causes = 0u32;
        let mut processed = 0u32;
        // Write-backs asking for TXDW now, and delayed ones after the last immediate.
        let (mut immediate, mut delayed) = (false, false);
        for _ in 0..count {
            if head == tail {
                break;
            }
            let daddr = match base.checked_add(u64::from(head) * DESC_SIZE) {
                Some(a) => a,
                None => {
                    self.tx_dma_fault(format_args!("descriptor address overflows"));
                    break;
                }
            };
            let mut d = [0u8; 16];
            if let Err(e) = dma.read(daddr, &mut d) {
                self.tx_dma_fault(format_args!("descriptor read: {e}"));
                break;
            }
            let ide = d[11] & TXD_CMD_IDE != 0;
            let rs = match self.tx_descriptor(&d, dma) {
                Ok(rs) => rs,
                Err(e) => {
                    self.tx_dma_fault(format_args!("buffer read: {e}"));
                    break;
                }
            };
            if rs {
                let r = match daddr.checked_add(12) {
                    Some(a) => dma.write(a, &[d[12] | TXD_STA_DD]),
                    None => Err(nestio_dma::DmaError::Overflow {
                        iova: daddr,
                        len: 13,
                    }),
                };
                if let Err(e) = r {
                    self.tx_dma_fault(format_args!("descriptor write-back: {e}"));
                    break;
                }
                if ide {
                    delayed = true;
                } else {
                    immediate = true;
                    delayed = false;
                }
            }
            head = (head + 1) % count;
            self.set_reg(TDH, head);
            processed += 1;
        }
        // TXQE: the queue ran dry after using descriptors (not on an idle ring).
        if processed > 0 && head == tail {
            causes |= ICR_TXQE;
        }
        if immediate || delayed {
            causes |= self.tx_written_back(std::time::Instant::now(), immediate, delayed);
        }
        self.raise(causes, irqs);
    }

    fn tx_dma_fault(&mut self, what: std::fmt::Arguments<'_>) {
        self.tx_halted = true;
        self.pci
            .lock_config()
            .set_status_bits(nestio_device::pci::status::REC_MASTER_ABORT, true);
        self.warn_once(
            warn::TX_DMA,
            format_args!("transmit DMA fault ({what}); transmit queue halted until TCTL.EN is toggled or the device is reset"),
        );
    }

    /// Act on one descriptor; returns whether RS was set.
    fn tx_descriptor(
        &mut self,
        d: &[u8; 16],
        dma: &dyn DmaSpace,
    ) -> Result<bool, nestio_dma::DmaError> {
        let addr = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        let cmd = d[11];
        let rs = cmd & TXD_CMD_RS != 0;
        let (len, eop) = if cmd & TXD_CMD_DEXT != 0 {
            let dtyp = (d[10] >> 4) & 0xF;
            match dtyp {
                0 => {
                    // Context descriptor.
                    self.tx.ctx = TxContext {
                        ipcss: d[0],
                        ipcso: d[1],
                        ipcse: u16::from_le_bytes([d[2], d[3]]),
                        tucss: d[4],
                        tucso: d[5],
                        tucse: u16::from_le_bytes([d[6], d[7]]),
                        tucmd: cmd,
                        hdrlen: d[13],
                        mss: u16::from_le_bytes([d[14], d[15]]),
                    };
                    if cmd & TXD_CMD_TSE != 0 {
                        self.stat_inc(TSCTC);
                    }
                    return Ok(rs);
                }
                1 => {
                    let len = u32::from_le_bytes([d[8], d[9], d[10] & 0x0F, 0]) as usize;
                    if self.tx.pkt.is_empty() && !self.tx.oversize {
                        self.tx.popts = d[13];
                        self.tx.tse = cmd & TXD_CMD_TSE != 0;
                        self.tx.legacy_csum = None;
                    }
                    (len, cmd & TXD_CMD_EOP != 0)
                }
                _ => return Ok(rs),
            }
        } else {
            let len = usize::from(u16::from_le_bytes([d[8], d[9]]));
            if self.tx.pkt.is_empty() && !self.tx.oversize {
                self.tx.popts = 0;
                self.tx.tse = false;
                self.tx.legacy_csum = (cmd & TXD_CMD_IC != 0).then_some((d[10], d[13]));
            }
            (len, cmd & TXD_CMD_EOP != 0)
        };
        if len > 0 && !self.tx.oversize {
            let have = self.tx.pkt.len();
            let limit = if self.tx.tse {
                TX_MAX_TSO
            } else {
                TX_MAX_FRAME
            };
            match have.checked_add(len) {
                Some(total) if total <= limit => {
                    self.tx.pkt.resize(total, 0);
                    if let Err(e) = dma.read(addr, &mut self.tx.pkt[have..]) {
                        self.tx.pkt.truncate(have);
                        return Err(e);
                    }
                }
                _ => {
                    self.tx.oversize = true;
                    self.tx.pkt.clear();
                }
            }
        }
        if eop {
            self.finish_packet();
        }
        Ok(rs)
    }

    fn finish_packet(&mut self) {
        let mut st = std::mem::take(&mut self.tx);
        self.tx.ctx = st.ctx;
        if st.oversize {
            self.warn_once(
                warn::TX_OVERSIZE,
                format_args!("transmit packet larger than {TX_MAX_FRAME} bytes ({TX_MAX_TSO} with segmentation) dropped"),
            );
            return;
        }
        if st.pkt.is_empty() {
            return;
        }
        if st.tse {
            self.segment(st.pkt, st.ctx, st.popts);
            return;
        }
        let pkt = &mut st.pkt;
        if let Some((cso, css)) = st.legacy_csum {
            insert_csum(pkt, usize::from(css), usize::from(cso), 0, false);
        }
        let ctx = st.ctx;
        if st.popts & TXD_POPTS_TXSM != 0 {
            let udp = ctx.tucmd & 0x01 == 0;
            insert_csum(
                pkt,
                usize::from(ctx.tucss),
                usize::from(ctx.tucso),
                usize::from(ctx.tucse),
                udp,
            );
        }
        if st.popts & TXD_POPTS_IXSM != 0 {
            // The IP header checksum field must be zero before summing.
            let at = usize::from(ctx.ipcso);
            if at + 2 <= pkt.len() {
                pkt[at] = 0;
                pkt[at + 1] = 0;
            }
            insert_csum(
                pkt,
                usize::from(ctx.ipcss),
                at,
                usize::from(ctx.ipcse),
                false,
            );
        }
        self.emit(st.pkt);
    }

    /// Pad (TCTL.PSP), count and queue one frame for the backend.
    fn emit(&mut self, mut pkt: Vec<u8>) {
        if self.reg(TCTL) & TCTL_PSP != 0 && pkt.len() < MIN_FRAME {
            pkt.resize(MIN_FRAME, 0);
        }
        let wire = pkt.len() as u64 + 4;
        self.stat_inc(TPT);
        self.stat_inc(GPTC);
        self.stat_add64(S64_GOTC, wire);
        self.stat_add64(S64_TOT, wire);
        if pkt[0] & 1 != 0 {
            if pkt.len() >= 6 && pkt[..6] == [0xFF; 6] {
                self.stat_inc(BPTC);
            } else {
                self.stat_inc(MPTC);
            }
        }
        self.stat_inc(size_bucket(PTC64, wire));
        self.out_frames.push(pkt);
    }

    /// TCP segmentation (TSE): split the payload after the `hdrlen` header bytes into
    /// MSS-sized segments, each sent with a copy of the header in which the IPv4 total
    /// length and identification (or IPv6 payload length), the TCP sequence number and
    /// flags (FIN/PSH only on the last) or the UDP length are fixed up, and the
    /// checksums selected by POPTS inserted. The TCP/UDP checksum field holds the
    /// pseudo-header sum without the length (as the datasheet asks of software); the
    /// segment length is added here. Inconsistent offsets drop the packet (logged once).
    fn segment(&mut self, pkt: Vec<u8>, ctx: TxContext, popts: u8) {
        let hdr = usize::from(ctx.hdrlen);
        let mss = usize::from(ctx.mss);
        let ipcss = usize::from(ctx.ipcss);
        let tucss = usize::from(ctx.tucss);
        let tucso = usize::from(ctx.tucso);
        let ipv4 = ctx.tucmd & 0x02 != 0;
        let tcp = ctx.tucmd & 0x01 != 0;
        let l4_min = if tcp { 20 } else { 8 };
        let l3_min = if ipv4 { 20 } else { 40 };
        let ok = hdr <= pkt.len()
            && mss >= MIN_MSS
            && ipcss + l3_min <= hdr
            && tucss + l4_min <= hdr
            && tucso + 2 <= hdr;
        if !ok {
            self.warn_once(
                warn::TX_TSO,
                format_args!(
                    "TCP segmentation context inconsistent (header {hdr} bytes of {}, MSS {mss}, IP at {ipcss}, L4 at {tucss}); packet dropped",
                    pkt.len()
                ),
            );
            return;
        }
        let (head, payload) = pkt.split_at(hdr);
        let ip_id = u16::from_be_bytes([head[ipcss + 4], head[ipcss + 5]]);
        let seq = u32::from_be_bytes([
            head[tucss + 4],
            head[tucss + 5],
            head[tucss + 6],
            head[tucss + 7],
        ]);
        let nseg = payload.len().div_ceil(mss).max(1);
        for i in 0..nseg {
            let start = i * mss;
            let chunk = &payload[start.min(payload.len())..(start + mss).min(payload.len())];
            let last = i + 1 == nseg;
            let mut f = Vec::with_capacity(hdr + chunk.len());
            f.extend_from_slice(head);
            f.extend_from_slice(chunk);
            if ipv4 {
                let total = (f.len() - ipcss) as u16;
                f[ipcss + 2..ipcss + 4].copy_from_slice(&total.to_be_bytes());
                let id = ip_id.wrapping_add(i as u16);
                f[ipcss + 4..ipcss + 6].copy_from_slice(&id.to_be_bytes());
            } else {
                let plen = (f.len() - ipcss - 40) as u16;
                f[ipcss + 4..ipcss + 6].copy_from_slice(&plen.to_be_bytes());
            }
            if tcp {
                let s = seq.wrapping_add(start as u32);
                f[tucss + 4..tucss + 8].copy_from_slice(&s.to_be_bytes());
                if !last {
                    f[tucss + 13] &= !(0x01 | 0x08);
                }
            } else {
                let ulen = (f.len() - tucss) as u16;
                f[tucss + 4..tucss + 6].copy_from_slice(&ulen.to_be_bytes());
            }
            if popts & TXD_POPTS_IXSM != 0 && ipv4 {
                let at = usize::from(ctx.ipcso);
                if at + 2 <= hdr {
                    f[at] = 0;
                    f[at + 1] = 0;
                    insert_csum(&mut f, ipcss, at, usize::from(ctx.ipcse), false);
                }
            }
            if popts & TXD_POPTS_TXSM != 0 {
                let l4_len = (f.len() - tucss) as u32;
                let mut sum = ones_sum(&f[tucss..]) + l4_len;
                while sum > 0xFFFF {
                    sum = (sum & 0xFFFF) + (sum >> 16);
                }
                let mut c = !(sum as u16);
                if !tcp && c == 0 {
                    c = 0xFFFF;
                }
                f[tucso..tucso + 2].copy_from_slice(&c.to_be_bytes());
            }
            self.emit(f);
        }
    }
}

/// The packet-size statistics register (64, 65-127, ..., 1023-1522 buckets starting at
/// `first`) for a frame of `wire` bytes including FCS.
pub(crate) fn size_bucket(first: u32, wire: u64) -> u32 {
    let i = match wire {
        0..=64 => 0,
        65..=127 => 1,
        128..=255 => 2,
        256..=511 => 3,
        512..=1023 => 4,
        _ => 5,
    };
    first + 4 * i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_insertion() {
        // An IPv4 header with a zero checksum field: the inserted value makes it sum to 0.
        let mut h = vec![
            0x45, 0, 0, 0x54, 0, 0, 0x40, 0, 0x40, 1, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ];
        insert_csum(&mut h, 0, 10, 19, false);
        assert_eq!(ones_sum(&h), 0xFFFF);
        // Out-of-range offsets change nothing.
        let before = h.clone();
        insert_csum(&mut h, 0, 19, 0, false);
        insert_csum(&mut h, 30, 0, 0, false);
        assert_eq!(h, before);
    }

    #[test]
    fn buckets() {
        assert_eq!(size_bucket(PTC64, 64), PTC64);
        assert_eq!(size_bucket(PTC64, 65), PTC64 + 4);
        assert_eq!(size_bucket(PTC64, 1522), PTC64 + 20);
    }
}
