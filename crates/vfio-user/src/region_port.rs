//! Region accesses over one vfio-user connection — REGION_READ, REGION_WRITE and
//! posted (no_reply) REGION_WRITE — and which BARs take posted writes: the one
//! implementation shared by nestio's [`crate::Client`], the VMM's posted writes
//! (`nestio_vmm::remote`) and the nested BAR channel (`nestio_nested::direct`).
//!
//! An access larger than the peer's `max_data_xfer_size` is split into chunks; each
//! reply must echo the chunk it answers (offset, region, count), else the peer is out of
//! step and the access fails. A posted write is sent with the header's no_reply flag and
//! returns once the message is in the socket; the peer executes messages in order, so a
//! later read on the same connection sees it.

use nestio_device_model::{pci_index, region_flags, DeviceError, Result, VfioDevice};

use crate::client::{bad_reply, disconnected, reply_errno};
use crate::endpoint::Endpoint;
use crate::proto::{Command, RegionAccess};
use crate::socket::Message;

/// Region accesses over `ep`, in chunks of at most `max_xfer` bytes.
#[derive(Clone, Copy)]
pub struct RegionPort<'a> {
    ep: &'a Endpoint,
    max_xfer: usize,
}

impl<'a> RegionPort<'a> {
    /// Accesses over `ep`, each message carrying at most `max_xfer` (≥ 1) data bytes.
    pub fn new(ep: &'a Endpoint, max_xfer: usize) -> RegionPort<'a> {
        RegionPort {
            ep,
            max_xfer: max_xfer.max(1),
        }
    }

    fn call(&self, what: &str, cmd: Command, payload: &[u8]) -> Result<Message> {
        let m = self.ep.request(cmd, payload, &[]).map_err(disconnected)?;
        if m.header.is_error() {
            return Err(DeviceError::Remote {
                what: what.to_string(),
                errno: reply_errno(&m),
            });
        }
        Ok(m)
    }

    /// Encodes into `b` the REGION_READ/WRITE request for the next chunk (at most
    /// `max_xfer` bytes) of a `len`-byte access at `offset`, `done` bytes in; `data` is
    /// the whole write buffer (`None` for a read). Returns the chunk's offset and length.
    fn encode_chunk(
        &self,
        b: &mut Vec<u8>,
        index: u32,
        offset: u64,
        len: usize,
        done: usize,
        data: Option<&[u8]>,
    ) -> Result<(u64, usize)> {
        let n = len.saturating_sub(done).min(self.max_xfer);
        let off = offset
            .checked_add(done as u64)
            .ok_or_else(|| DeviceError::Invalid("offset overflows".into()))?;
        let count =
            u32::try_from(n).map_err(|_| DeviceError::Invalid("access too large".into()))?;
        let chunk = match data {
            Some(d) => d
                .get(done..done + n)
                .ok_or_else(|| DeviceError::Invalid("access outside the buffer".into()))?,
            None => &[],
        };
        b.clear();
        RegionAccess {
            offset: off,
            region: index,
            count,
            data: chunk,
        }
        .encode_into(b);
        Ok((off, n))
    }

    /// REGION_READ of `buf.len()` bytes (an empty `buf` sends one zero-count request).
    pub fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        let mut b = Vec::with_capacity(RegionAccess::SIZE);
        while done < buf.len() || (buf.is_empty() && done == 0) {
            let (off, n) = self.encode_chunk(&mut b, index, offset, buf.len(), done, None)?;
            let m = self.call("REGION_READ", Command::RegionRead, &b)?;
            let r =
                RegionAccess::decode(&m.payload, true).map_err(|e| bad_reply("REGION_READ", e))?;
            check_region_reply("REGION_READ", &r, off, index, n)?;
            buf[done..done + n].copy_from_slice(r.data);
            done += n;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// REGION_WRITE of `data`, waiting for each chunk's reply.
    pub fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        let mut b = Vec::with_capacity(RegionAccess::SIZE + data.len().min(self.max_xfer));
        while done < data.len() || (data.is_empty() && done == 0) {
            let (off, n) =
                self.encode_chunk(&mut b, index, offset, data.len(), done, Some(data))?;
            let m = self.call("REGION_WRITE", Command::RegionWrite, &b)?;
            let r = RegionAccess::decode(&m.payload, false)
                .map_err(|e| bad_reply("REGION_WRITE", e))?;
            check_region_reply("REGION_WRITE", &r, off, index, n)?;
            done += n;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Posted REGION_WRITE of `data` (no_reply: errors are only logged by the peer).
    pub fn write_posted(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        let mut b = Vec::with_capacity(RegionAccess::SIZE + data.len().min(self.max_xfer));
        while done < data.len() {
            let (_, n) = self.encode_chunk(&mut b, index, offset, data.len(), done, Some(data))?;
            self.ep
                .post(Command::RegionWrite, &b, &[])
                .map_err(disconnected)?;
            done += n;
        }
        Ok(())
    }
}

/// A REGION_READ/WRITE reply must echo the access it answers (offset, region, count).
fn check_region_reply(
    what: &str,
    r: &RegionAccess<'_>,
    offset: u64,
    region: u32,
    count: usize,
) -> Result<()> {
    if r.offset != offset || r.region != region || r.count as usize != count {
        return Err(bad_reply(what, "reply describes a different access"));
    }
    Ok(())
}

/// The BARs of a PCI device whose writes may be posted (bit `i`: BAR `i`): memory
/// BARs (bit 0 of the BAR register clear: I/O writes are non-posted in PCI) that exist,
/// are writable, and are not mmappable (a guest access to an mmapped area bypasses the
/// connection, so it would not be ordered after writes still in flight). Non-PCI
/// devices: none.
pub fn posted_bar_mask(dev: &dyn VfioDevice) -> Result<u8> {
    if dev.info().flags & nestio_device_model::flags::PCI == 0 {
        return Ok(0);
    }
    let mut mask = 0u8;
    let bars = dev.info().num_regions.min(pci_index::ROM);
    for index in 0..bars {
        let info = match dev.region_info(index) {
            Ok(i) => i,
            Err(DeviceError::NoSuchRegion(_)) => continue,
            Err(e) => return Err(e),
        };
        let plain = info.size != 0
            && info.flags & region_flags::WRITE != 0
            && info.flags & region_flags::MMAP == 0;
        if !plain {
            continue;
        }
        let mut bar = [0u8; 4];
        dev.region_read(pci_index::CONFIG, 0x10 + 4 * u64::from(index), &mut bar)?;
        if u32::from_le_bytes(bar) & 1 == 0 {
            mask |= 1 << index;
        }
    }
    Ok(mask)
}
