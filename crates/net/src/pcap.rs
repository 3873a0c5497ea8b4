//! Classic pcap capture files (LINKTYPE_ETHERNET = 1, microsecond
//! timestamps) and [`PcapBackend`], a wrapper that records every frame the
//! wrapped backend sends or receives.
//!
//! The file header and records are written little-endian (magic
//! 0xa1b2c3d4 read back as d4 c3 b2 a1), which every pcap reader accepts.
//! Each record is flushed, so a capture stays readable if the process dies.
//! Frames longer than the snap length are stored truncated, with their
//! original length recorded. If writing fails the wrapper logs a warning
//! once and stops capturing; the network keeps running.

use crate::{NetBackend, NetError};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::warn;

/// pcap magic for microsecond timestamps.
pub const PCAP_MAGIC: u32 = 0xa1b2_c3d4;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Snap length written in the header; longer frames are cut to it.
pub const PCAP_SNAPLEN: u32 = 262_144;

/// Writes a pcap stream to any `Write`.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapWriter<W> {
    /// Write the 24-byte global header.
    pub fn new(mut out: W) -> std::io::Result<Self> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&PCAP_MAGIC.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes()); // thiszone
        h.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        h.extend_from_slice(&PCAP_SNAPLEN.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        out.flush()?;
        Ok(PcapWriter { out })
    }

    /// Append one frame stamped with the current time.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.write_frame_at(frame, now.as_secs(), now.subsec_micros())
    }

    /// Append one frame with an explicit timestamp (seconds are stored
    /// modulo 2^32, as the format allows no more).
    pub fn write_frame_at(&mut self, frame: &[u8], secs: u64, micros: u32) -> std::io::Result<()> {
        let orig = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let incl = orig.min(PCAP_SNAPLEN);
        let mut rec = Vec::with_capacity(16 + incl as usize);
        rec.extend_from_slice(&(secs as u32).to_le_bytes());
        rec.extend_from_slice(&micros.min(999_999).to_le_bytes());
        rec.extend_from_slice(&incl.to_le_bytes());
        rec.extend_from_slice(&orig.to_le_bytes());
        rec.extend_from_slice(&frame[..incl as usize]);
        self.out.write_all(&rec)?;
        self.out.flush()
    }

    /// Recover the writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A backend wrapper that records both directions to a pcap file.
pub struct PcapBackend {
    inner: Box<dyn NetBackend>,
    writer: Option<PcapWriter<BufWriter<File>>>,
    path: PathBuf,
}

impl PcapBackend {
    /// Create (truncate) `path` and wrap `inner`.
    pub fn create(inner: Box<dyn NetBackend>, path: &Path) -> Result<Self, NetError> {
        let err = |source| NetError::PcapCreate {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(err)?;
        let writer = PcapWriter::new(BufWriter::new(file)).map_err(err)?;
        Ok(PcapBackend {
            inner,
            writer: Some(writer),
            path: path.to_path_buf(),
        })
    }

    /// Is the capture still being written (no write error so far)?
    pub fn capturing(&self) -> bool {
        self.writer.is_some()
    }

    fn record(&mut self, frame: &[u8]) {
        if let Some(w) = &mut self.writer {
            if let Err(e) = w.write_frame(frame) {
                warn!(
                    "{}; capture to {} stopped, network continues",
                    NetError::PcapWrite(e),
                    self.path.display()
                );
                self.writer = None;
            }
        }
    }
}

impl NetBackend for PcapBackend {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        self.record(frame);
        self.inner.send(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        let r = self.inner.recv(buf)?;
        if let Some(n) = r {
            // `n <= buf.len()` is the trait contract; `get` keeps a broken inner backend from panicking here.
            if let Some(f) = buf.get(..n) {
                let f = f.to_vec();
                self.record(&f);
            }
        }
        Ok(r)
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.inner.poll_fd()
    }

    fn hold_notifications(&mut self, hold: bool) {
        self.inner.hold_notifications(hold)
    }

    fn describe(&self) -> String {
        format!("{}, pcap {}", self.inner.describe(), self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_record_layout() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        w.write_frame_at(&[1, 2, 3], 0x1_0000_0005, 42).unwrap();
        let b = w.into_inner();
        assert_eq!(&b[0..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(&b[4..8], &[2, 0, 4, 0]);
        assert_eq!(&b[20..24], &[1, 0, 0, 0]);
        assert_eq!(b.len(), 24 + 16 + 3);
        assert_eq!(&b[24..28], &5u32.to_le_bytes()); // seconds modulo 2^32
        assert_eq!(&b[28..32], &42u32.to_le_bytes());
        assert_eq!(&b[32..36], &3u32.to_le_bytes());
        assert_eq!(&b[36..40], &3u32.to_le_bytes());
        assert_eq!(&b[40..], &[1, 2, 3]);
    }

    #[test]
    fn oversized_frame_truncated_to_snaplen() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        let big = vec![7u8; PCAP_SNAPLEN as usize + 10];
        w.write_frame_at(&big, 1, 0).unwrap();
        let b = w.into_inner();
        assert_eq!(&b[32..36], &PCAP_SNAPLEN.to_le_bytes());
        assert_eq!(&b[36..40], &(PCAP_SNAPLEN + 10).to_le_bytes());
        assert_eq!(b.len(), 24 + 16 + PCAP_SNAPLEN as usize);
    }
}
