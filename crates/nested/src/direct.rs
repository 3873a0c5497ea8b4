//! A direct channel from the innermost level to the device for BAR accesses.
//!
//! Passed through `d - 1` exporters, every register access of a level-`d` guest costs
//! `d` vfio-user round trips: each intermediate level receives the REGION_READ/WRITE,
//! forwards it to its parent and waits. Nothing in an intermediate level needs to see
//! those accesses: a BAR register is the device's, with no address in it that a level
//! must translate. What levels must mediate — DMA maps (translated into each parent's
//! terms and checked against the child's window), configuration space (it moves BARs
//! and enables interrupts and bus mastering) and interrupts (fd-to-fd anyway) — never
//! travels on a BAR access.
//!
//! So the level that owns the device's session opens a *BAR channel* to the device's
//! side — [`BarChannels::open`]: a socketpair whose far end is served, next to the
//! device, by [`serve_bar_channel`] — and hands the near end down through the levels to
//! the innermost one (an fd, like the interrupt eventfds that already pass down
//! unchanged). The innermost level wraps its device in [`DirectBars`]: BAR reads and
//! writes go over the channel, one round trip at any depth; everything else takes the
//! mediated path through every level.
//!
//! The channel speaks the vfio-user wire format, REGION_READ and REGION_WRITE only
//! (`no_reply` writes are executed without an answer). [`DirectBars`] sends its accesses
//! with the same code as nestio's vfio-user client
//! ([`nestio_vfio_user::region_port::RegionPort`] over an
//! [`nestio_vfio_user::endpoint::Endpoint`]), and posts writes to the BARs the VMM posts
//! ([`nestio_vfio_user::region_port::posted_bar_mask`]: plain memory BARs) as no_reply
//! messages: the channel's server executes them in order, so a BAR read after them sees
//! them. The mediated path is another connection, so before any mediated access that
//! could observe or change the device (config space, interrupts, DMA maps, reset,
//! migration) a `DirectBars` with posted writes outstanding first sends a *barrier* on
//! the channel — a zero-byte REGION_READ, which the channel answers (EINVAL) only after
//! every message before it — so a config write cannot overtake a BAR write posted before
//! it, as in PCI. Its server is as strict as the
//! main one — it serves only the device's BAR regions 0–5 that exist and are readable or
//! writable (configuration space, ROM, VGA and anything else: EINVAL, session kept),
//! accesses of at most [`MAX_ACCESS`] bytes (bounds checked by the device), any other
//! command ENOTSUP, received fds closed and refused, a malformed or oversized message
//! ends the channel. The owner keeps a [`BarChannelHandle`] and revokes the channel
//! when its session ends (drop), so the channel grants no more than the owner holds.
//!
//! Scope: in [`crate::stack::NestedStack`] (all levels in one process) the fd is handed
//! to the innermost level directly; between `nestio run` processes it is granted by the
//! device process and carried down each level's vfio-user session
//! ([`crate::channel_handoff`]).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nestio_device_model::{
    pci_index, region_flags, DeviceError, Forwarding, IrqAction, IrqData, MigState, Result,
    VfioDevice,
};
use nestio_dma::{DmaMapRequest, DmaRange};
use nestio_vfio_user::endpoint::{Endpoint, Incoming};
use nestio_vfio_user::proto::{hdr_flags, Command, Header, RegionAccess, HEADER_SIZE};
use nestio_vfio_user::region_port::{posted_bar_mask, RegionPort};
use nestio_vfio_user::socket::{recv_message, send_message};

/// Largest access one channel message carries (register accesses are 1–8 bytes).
pub const MAX_ACCESS: usize = 4096;

/// The last BAR region (BARs are regions 0..=5).
const LAST_BAR: u32 = pci_index::ROM - 1;

/// Largest message on a channel.
const MAX_MESSAGE: usize = HEADER_SIZE + RegionAccess::SIZE + MAX_ACCESS;

/// Errors opening or serving a BAR channel.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// The socketpair or the thread could not be created.
    #[error("cannot open a BAR channel: {0} (out of fds or threads?)")]
    Open(#[source] std::io::Error),
    /// The device's regions could not be described.
    #[error("cannot describe the device's BARs for a BAR channel: {0}")]
    Device(#[source] DeviceError),
    /// The device has no BAR a channel could serve.
    #[error("the device has no readable or writable BAR: nothing for a BAR channel to carry")]
    NoBars,
}

/// Bit `i` set: BAR `i` (0..=5) exists and is readable or writable.
fn bar_mask(dev: &dyn VfioDevice) -> std::result::Result<u8, DirectError> {
    let mut mask = 0u8;
    for index in pci_index::BAR0..=LAST_BAR {
        let info = match dev.region_info(index) {
            Ok(i) => i,
            Err(DeviceError::NoSuchRegion(_)) => continue,
            Err(e) => return Err(DirectError::Device(e)),
        };
        if info.size != 0 && info.flags & (region_flags::READ | region_flags::WRITE) != 0 {
            mask |= 1 << index;
        }
    }
    if mask == 0 {
        return Err(DirectError::NoBars);
    }
    Ok(mask)
}

fn allowed(mask: u8, region: u32) -> bool {
    region <= LAST_BAR && mask & (1 << region) != 0
}

/// The device side: opens BAR channels to one device (run where the device is).
#[derive(Clone)]
pub struct BarChannels {
    dev: Arc<dyn VfioDevice>,
    mask: u8,
}

impl BarChannels {
    /// Channels to `dev`'s BARs.
    pub fn new(dev: Arc<dyn VfioDevice>) -> std::result::Result<BarChannels, DirectError> {
        let mask = bar_mask(dev.as_ref())?;
        Ok(BarChannels { dev, mask })
    }

    /// A new channel: the near end to hand down, and the handle that revokes it.
    pub fn open(&self) -> std::result::Result<(UnixStream, BarChannelHandle), DirectError> {
        let (near, far) = UnixStream::pair().map_err(DirectError::Open)?;
        let handle = serve_bar_channel(self.dev.clone(), self.mask, far)?;
        Ok((near, handle))
    }
}

/// Revokes a BAR channel when dropped: the channel's socket is shut down and its
/// server thread joined.
pub struct BarChannelHandle {
    sock: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BarChannelHandle {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serve `sock` as a BAR channel to `dev` (BARs in `mask` only) on a new thread.
pub fn serve_bar_channel(
    dev: Arc<dyn VfioDevice>,
    mask: u8,
    sock: UnixStream,
) -> std::result::Result<BarChannelHandle, DirectError> {
    let keep = sock.try_clone().map_err(DirectError::Open)?;
    let thread = std::thread::Builder::new()
        .name("nestio-bar-channel".into())
        .spawn(move || serve(dev.as_ref(), mask, &sock))
        .map_err(DirectError::Open)?;
    Ok(BarChannelHandle {
        sock: keep,
        thread: Some(thread),
    })
}

fn serve(dev: &dyn VfioDevice, mask: u8, sock: &UnixStream) {
    let mut buf = Vec::new();
    loop {
        let m = match recv_message(sock, MAX_MESSAGE) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "BAR channel: malformed message; channel closed");
                return;
            }
        };
        let h = m.header;
        if h.check_flags().is_err() || h.flags & hdr_flags::TYPE_MASK != hdr_flags::TYPE_COMMAND {
            tracing::warn!(
                flags = h.flags,
                "BAR channel: not a command; channel closed"
            );
            return;
        }
        let r = if !m.fds.is_empty() {
            // The fds are owned by `m` and closed with it.
            Err(libc::EINVAL)
        } else {
            access(dev, mask, &h, &m.payload, &mut buf)
        };
        if h.no_reply() {
            if let Err(errno) = r {
                tracing::debug!(errno, cmd = h.cmd, "BAR channel: posted access refused");
            }
            continue;
        }
        let sent = match r {
            Ok(payload) => h
                .reply(payload.len())
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|rh| send_message(sock, &rh, &payload, &[])),
            Err(errno) => send_message(sock, &h.error_reply(errno), &[], &[]),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Execute one access; the reply payload or an errno.
fn access(
    dev: &dyn VfioDevice,
    mask: u8,
    h: &Header,
    payload: &[u8],
    buf: &mut Vec<u8>,
) -> std::result::Result<Vec<u8>, i32> {
    let write = match h.cmd {
        c if c == Command::RegionRead as u16 => false,
        c if c == Command::RegionWrite as u16 => true,
        _ => return Err(libc::ENOTSUP),
    };
    let a = RegionAccess::decode(payload, write).map_err(|_| libc::EINVAL)?;
    if !allowed(mask, a.region) || a.count as usize > MAX_ACCESS || a.count == 0 {
        return Err(libc::EINVAL);
    }
    let mut out = Vec::with_capacity(RegionAccess::SIZE + if write { 0 } else { a.count as usize });
    if write {
        dev.region_write(a.region, a.offset, a.data)
            .map_err(|e| e.errno())?;
        RegionAccess { data: &[], ..a }.encode_into(&mut out);
    } else {
        buf.clear();
        buf.resize(a.count as usize, 0);
        dev.region_read(a.region, a.offset, buf)
            .map_err(|e| e.errno())?;
        RegionAccess { data: buf, ..a }.encode_into(&mut out);
    }
    Ok(out)
}

/// The innermost level's device: BAR accesses over a BAR channel, everything else
/// (configuration space, interrupts, DMA maps, reset, migration) through `inner`, the
/// mediated path. See the module documentation.
pub struct DirectBars {
    inner: Arc<dyn VfioDevice>,
    mask: u8,
    /// BARs whose writes are posted over the channel.
    posted: u8,
    chan: Endpoint,
    /// Accesses sent over the channel.
    sent: AtomicU64,
    /// Posted writes sent so far, and how many of them a reply on the channel has
    /// since shown executed (a barrier is due while they differ).
    posted_sent: AtomicU64,
    posted_synced: AtomicU64,
}

impl DirectBars {
    /// Wrap `inner`, whose BAR accesses then go over `channel` (the near end of
    /// [`BarChannels::open`]). The BARs carried are those `inner` describes as readable
    /// or writable.
    pub fn new(
        inner: Arc<dyn VfioDevice>,
        channel: UnixStream,
    ) -> std::result::Result<DirectBars, DirectError> {
        let mask = bar_mask(inner.as_ref())?;
        let posted = posted_bar_mask(inner.as_ref()).map_err(DirectError::Device)? & mask;
        Ok(DirectBars {
            inner,
            mask,
            posted,
            chan: Endpoint::new(channel, MAX_MESSAGE, Incoming::Refuse, "bar-channel"),
            sent: AtomicU64::new(0),
            posted_sent: AtomicU64::new(0),
            posted_synced: AtomicU64::new(0),
        })
    }

    /// Like [`DirectBars::new`], but every write waits for its answer (nothing is
    /// posted), so each access is either answered on the channel or refused at its send.
    /// A channel that another process may revoke needs this: after a revocation the
    /// caller re-issues refused accesses on the mediated path, which could otherwise
    /// overtake writes still queued on the channel.
    pub fn new_unposted(
        inner: Arc<dyn VfioDevice>,
        channel: UnixStream,
    ) -> std::result::Result<DirectBars, DirectError> {
        let mut d = DirectBars::new(inner, channel)?;
        d.posted = 0;
        Ok(d)
    }

    /// BAR accesses sent over the channel so far.
    pub fn channel_accesses(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The mediated device underneath.
    pub fn inner(&self) -> &Arc<dyn VfioDevice> {
        &self.inner
    }

    fn port(&self) -> RegionPort<'_> {
        RegionPort::new(&self.chan, MAX_ACCESS)
    }

    /// One access over the channel; a lost channel is reported as such.
    fn on_channel(&self, len: usize, f: impl FnOnce(RegionPort<'_>) -> Result<()>) -> Result<()> {
        if len > MAX_ACCESS {
            return Err(DeviceError::Invalid(format!(
                "BAR channel access of {len} bytes: at most {MAX_ACCESS}"
            )));
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        f(self.port()).map_err(|e| match e {
            DeviceError::Disconnected(why) => DeviceError::Disconnected(format!(
                "BAR channel: {why}; the device side or the level that opened it went away"
            )),
            e => e,
        })
    }

    /// A reply came for a request sent when `posted` writes had been posted: those
    /// have been executed.
    fn synced(&self, posted: u64) {
        self.posted_synced.fetch_max(posted, Ordering::AcqRel);
    }

    /// Before a mediated access: make sure every write posted on the channel has been
    /// executed (the barrier of the module documentation).
    fn barrier(&self) -> Result<()> {
        let posted = self.posted_sent.load(Ordering::Acquire);
        if self.posted_synced.load(Ordering::Acquire) >= posted {
            return Ok(());
        }
        let first = self.mask.trailing_zeros();
        let r = self.on_channel(0, |p| p.read(first, 0, &mut []));
        match r {
            // The channel refuses a zero-byte access: any answer is the barrier.
            Ok(()) | Err(DeviceError::Remote { .. }) => {
                self.synced(posted);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Forwarding for DirectBars {
    fn forward_to(&self) -> &dyn VfioDevice {
        &*self.inner
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        if !allowed(self.mask, index) || buf.is_empty() {
            self.barrier()?;
            return self.inner.region_read(index, offset, buf);
        }
        let posted = self.posted_sent.load(Ordering::Acquire);
        self.on_channel(buf.len(), |p| p.read(index, offset, buf))?;
        self.synced(posted);
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        if !allowed(self.mask, index) || data.is_empty() {
            self.barrier()?;
            return self.inner.region_write(index, offset, data);
        }
        if self.posted & (1 << index) != 0 {
            self.on_channel(data.len(), |p| p.write_posted(index, offset, data))?;
            self.posted_sent.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        let posted = self.posted_sent.load(Ordering::Acquire);
        self.on_channel(data.len(), |p| p.write(index, offset, data))?;
        self.synced(posted);
        Ok(())
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.barrier()?;
        self.inner.set_irqs(index, action, start, count, data)
    }
    fn reset(&self) -> Result<()> {
        self.barrier()?;
        self.inner.reset()
    }
    fn dma_map(&self, req: DmaMapRequest) -> Result<()> {
        self.barrier()?;
        self.inner.dma_map(req)
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.barrier()?;
        self.inner.dma_unmap(iova, size)
    }
    fn dma_unmap_all(&self) -> Result<()> {
        self.barrier()?;
        self.inner.dma_unmap_all()
    }
    fn mig_state(&self) -> Result<MigState> {
        self.barrier()?;
        self.inner.mig_state()
    }
    fn mig_set_state(&self, target: MigState) -> Result<MigState> {
        self.barrier()?;
        self.inner.mig_set_state(target)
    }
    fn mig_data_read(&self, buf: &mut [u8]) -> Result<usize> {
        self.barrier()?;
        self.inner.mig_data_read(buf)
    }
    fn dma_logging_report(&self, range: DmaRange, page_size: u64) -> Result<Vec<u64>> {
        self.barrier()?;
        self.inner.dma_logging_report(range, page_size)
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(DirectBars);
