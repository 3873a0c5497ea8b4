//! Devices served by another process:
//! `--device vfio-user=PATH[,posted-writes=on|off][,posted-ring=on|off]`
//! connects the vfio-user client ([`nestio_vfio_user::Client`]), which is itself a
//! [`VfioDevice`], so the VMM wires it exactly like an in-process device.
//!
//! # Posted MMIO writes
//!
//! PCI memory writes are posted: the CPU does not wait for the device. With
//! `posted-writes=on` (the default) a guest write to a memory BAR of a remote device is
//! sent as REGION_WRITE with the header's no_reply flag (`VFIO_USER_F_NO_REPLY`) and the
//! vCPU resumes as soon as the message is in the socket, instead of waiting for a reply
//! ([`PostedWrites`] wraps the client and decides per region, once, at connect).
//!
//! With a nestio server (and `posted-ring=on`, the default) the client does not even
//! send a message: a posted write of up to 8 bytes goes into nestio's shared-memory
//! ring ([`nestio_vfio_user::posted_ring`]), and the server's ring thread is kicked
//! through an eventfd only when it sleeps. The server executes every ring entry before
//! it handles any socket message, so the ordering below holds unchanged; a refused ring
//! write is logged by the server and counted in the ring; a session the server ended is
//! reported by the next posted write (`Disconnected`), and a server that died without
//! ending it when the ring fills (the overflow is sent synchronously and fails). Other
//! servers (libvfio-user, Cloud Hypervisor's) get today's no_reply messages.
//!
//! - **What is posted**: writes to PCI BARs 0–5 that are memory BARs (bit 0 of the BAR
//!   register clear: I/O writes are non-posted in PCI), writable, and not mmappable
//!   (a guest access to an mmapped area bypasses the socket, so it would not be ordered
//!   after writes still in flight). Config space writes (region 7) stay synchronous:
//!   they move BARs and change interrupts, and the VMM acts on their effect at once. So
//!   do every other region, non-PCI devices, and `posted-writes=off`.
//! - **Ordering**: the server reads one socket and executes its commands in arrival
//!   order on one thread (`nestio_vfio_user::server`), and every request of this VMM to
//!   the device — posted writes, reads, config accesses, SET_IRQS, DMA_MAP — goes over
//!   that one socket. A read after posted writes is therefore executed after them and
//!   sees them, as a PCI read pushes earlier posted writes ahead of it.
//! - **Errors**: the server cannot answer a no_reply command. A posted write the device
//!   *refuses* is logged by the server (`no_reply command failed`) and dropped — the
//!   outcome a refused synchronous BAR write already has (the VMM logs it and drops it,
//!   as PCI drops a failed posted write). A *dead connection* is noticed by the next
//!   access: a posted write's send fails at once (`EPIPE`: the device is disconnected,
//!   which stops the VM with the device named, as for a synchronous access), and so does
//!   the next synchronous request (a read, a config access). A server that stops
//!   reading blocks the vCPU once the socket buffer is full, as a synchronous write
//!   waits for its reply. No failure is silent beyond what PCI itself leaves silent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nestio_device_model::{
    DeviceInfo, IoEventFd, IrqAction, IrqData, IrqInfo, MigState, MigrationFlags, RegionInfo,
    Result, VfioDevice,
};
use nestio_dma::{DmaMapRequest, DmaRange, MapTable};
use nestio_vfio_user::Client;

use crate::pci::PciHostError;

/// Per-device options of a remote device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Send guest writes to memory BARs as posted (no-reply) REGION_WRITEs.
    pub posted_writes: bool,
    /// Offer nestio's shared-memory ring for posted writes (nestio servers only).
    pub posted_ring: bool,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            posted_writes: true,
            posted_ring: true,
        }
    }
}

/// Errors of a `--device vfio-user=...` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteSpecError {
    /// Not `vfio-user=PATH...`.
    #[error(
        "invalid --device {0:?}: use vfio-user=PATH[,posted-writes=on|off][,posted-ring=on|off]"
    )]
    NotVfioUser(String),
    /// An option this VMM does not know.
    #[error("unknown option {0:?} in --device: the options are posted-writes=on|off and posted-ring=on|off")]
    UnknownOption(String),
    /// A known option with a value that is not understood.
    #[error("invalid value {value:?} for {key} in --device: use on or off")]
    BadValue {
        /// The option.
        key: String,
        /// Its value.
        value: String,
    },
}

/// Parse `vfio-user=PATH[,posted-writes=on|off][,posted-ring=on|off]`. Options are peeled off the end, so a
/// path may contain commas as long as no comma is followed by `word=`.
pub fn parse_spec(s: &str) -> std::result::Result<(PathBuf, RemoteOptions), RemoteSpecError> {
    let rest = match s.split_once('=') {
        Some(("vfio-user", rest)) => rest,
        _ => return Err(RemoteSpecError::NotVfioUser(s.into())),
    };
    let mut path = rest;
    let mut opts = RemoteOptions::default();
    while let Some((head, tail)) = path.rsplit_once(',') {
        let Some((key, value)) = tail.split_once('=') else {
            break;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
            break;
        }
        let on = || match value {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(RemoteSpecError::BadValue {
                key: key.into(),
                value: value.into(),
            }),
        };
        match key {
            "posted-writes" => opts.posted_writes = on()?,
            "posted-ring" => opts.posted_ring = on()?,
            _ => return Err(RemoteSpecError::UnknownOption(tail.into())),
        }
        path = head;
    }
    if path.is_empty() {
        return Err(RemoteSpecError::NotVfioUser(s.into()));
    }
    Ok((PathBuf::from(path), opts))
}

/// Connect to the vfio-user server at `socket` with the default options.
pub fn connect(socket: &Path) -> std::result::Result<Arc<dyn VfioDevice>, PciHostError> {
    connect_with(socket, RemoteOptions::default())
}

/// Connect to the vfio-user server at `socket`.
pub fn connect_with(
    socket: &Path,
    options: RemoteOptions,
) -> std::result::Result<Arc<dyn VfioDevice>, PciHostError> {
    connect_nested(socket, options, false).map(|(d, _)| d)
}

/// A connected device, and its nested-IOMMU port when one was asked for.
pub type Connected = (
    Arc<dyn VfioDevice>,
    Option<Arc<dyn crate::iommu::smmuv3::NestedIommuPort>>,
);

/// Connect to the vfio-user server at `socket`; with `nested`, propose nestio's
/// nested-IOMMU extension (`docs/vfio-user-nested-iommu.md`) and return the
/// connection as a port too (whether the server agreed is the port's
/// `nested_caps`).
pub fn connect_nested(
    socket: &Path,
    options: RemoteOptions,
    nested: bool,
) -> std::result::Result<Connected, PciHostError> {
    let connect_err = |message: String| PciHostError::Connect {
        socket: socket.display().to_string(),
        message,
    };
    let config = nestio_vfio_user::ClientConfig {
        nested_iommu: nested.then(nestio_vfio_user::nested_iommu::NestedIommuCaps::default),
        posted_ring: options.posted_writes && options.posted_ring,
        ..nestio_vfio_user::ClientConfig::default()
    };
    let client = std::os::unix::net::UnixStream::connect(socket)
        .map_err(nestio_vfio_user::ClientError::from)
        .and_then(|s| nestio_vfio_user::Client::from_stream(s, config))
        .map_err(|e| {
            connect_err(match e {
                // The server is up and answered: it has another client.
                nestio_vfio_user::ClientError::Busy => e.to_string(),
                _ => format!(
                    "{e} (is `nestio device ... --socket {}` running?)",
                    socket.display()
                ),
            })
        })?;
    if !options.posted_writes {
        let c = Arc::new(client);
        let port = nested.then(|| c.clone() as Arc<dyn crate::iommu::smmuv3::NestedIommuPort>);
        return Ok((c, port));
    }
    let dev = Arc::new(
        PostedWrites::new(client)
            .map_err(|e| connect_err(format!("cannot read the device's BARs: {e}")))?,
    );
    let port = nested.then(|| dev.clone() as Arc<dyn crate::iommu::smmuv3::NestedIommuPort>);
    Ok((dev, port))
}

/// A vfio-user client whose writes to plain memory BARs are posted (see the module
/// documentation); everything else is the client's synchronous call.
pub struct PostedWrites {
    client: Client,
    /// Bit `i`: writes to region `i` are posted.
    posted: u8,
}

impl PostedWrites {
    /// Wrap `client`, reading once which of its regions take posted writes.
    pub fn new(client: Client) -> Result<Self> {
        let posted = nestio_vfio_user::region_port::posted_bar_mask(&client)?;
        tracing::debug!(regions = format!("{posted:#08b}"), "posted-write BARs");
        Ok(PostedWrites { client, posted })
    }

    /// Is a write to region `index` posted?
    pub fn is_posted(&self, index: u32) -> bool {
        index < 8 && self.posted & (1 << index) != 0
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl VfioDevice for PostedWrites {
    fn info(&self) -> DeviceInfo {
        self.client.info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.client.region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.client.region_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        if self.is_posted(index) && !data.is_empty() {
            self.client.region_write_posted(index, offset, data)
        } else {
            self.client.region_write(index, offset, data)
        }
    }
    fn region_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
        self.client.region_io_fds(index)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.client.irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.client.set_irqs(index, action, start, count, data)
    }
    fn reset(&self) -> Result<()> {
        self.client.reset()
    }
    fn dma_table(&self) -> Option<&MapTable> {
        self.client.dma_table()
    }
    fn dma_map(&self, req: DmaMapRequest) -> Result<()> {
        self.client.dma_map(req)
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.client.dma_unmap(iova, size)
    }
    fn dma_unmap_all(&self) -> Result<()> {
        self.client.dma_unmap_all()
    }
    fn migration_flags(&self) -> Option<MigrationFlags> {
        self.client.migration_flags()
    }
    fn mig_state(&self) -> Result<MigState> {
        self.client.mig_state()
    }
    fn mig_set_state(&self, target: MigState) -> Result<MigState> {
        self.client.mig_set_state(target)
    }
    fn mig_data_read(&self, buf: &mut [u8]) -> Result<usize> {
        self.client.mig_data_read(buf)
    }
    fn mig_data_write(&self, data: &[u8]) -> Result<()> {
        self.client.mig_data_write(data)
    }
    fn dma_logging_start(&self, page_size: u64, ranges: &[DmaRange]) -> Result<()> {
        self.client.dma_logging_start(page_size, ranges)
    }
    fn dma_logging_stop(&self) -> Result<()> {
        self.client.dma_logging_stop()
    }
    fn dma_logging_report(&self, range: DmaRange, page_size: u64) -> Result<Vec<u64>> {
        self.client.dma_logging_report(range, page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        let (p, o) = parse_spec("vfio-user=/tmp/e.sock").unwrap();
        assert_eq!((p, o.posted_writes), (PathBuf::from("/tmp/e.sock"), true));
        let (p, o) = parse_spec("vfio-user=/tmp/e.sock,posted-writes=off").unwrap();
        assert_eq!((p, o.posted_writes), (PathBuf::from("/tmp/e.sock"), false));
        let (_, o) = parse_spec("vfio-user=/tmp/e.sock,posted-writes=on").unwrap();
        assert!(o.posted_writes);
        let (p, _) = parse_spec("vfio-user=/tmp/a,b.sock").unwrap();
        assert_eq!(p, PathBuf::from("/tmp/a,b.sock"));
        assert_eq!(
            parse_spec("vfio-user=/x,posted-writes=maybe"),
            Err(RemoteSpecError::BadValue {
                key: "posted-writes".into(),
                value: "maybe".into()
            })
        );
        assert_eq!(
            parse_spec("vfio-user=/x,fast=yes"),
            Err(RemoteSpecError::UnknownOption("fast=yes".into()))
        );
        assert!(parse_spec("vfio-user=").is_err());
        assert!(parse_spec("vfio-user=,posted-writes=off").is_err());
        assert!(parse_spec("e1000").is_err());
        let (p, o) = parse_spec("vfio-user=/tmp/e.sock,posted-ring=off").unwrap();
        assert_eq!(p, PathBuf::from("/tmp/e.sock"));
        assert!(o.posted_writes && !o.posted_ring);
        let (_, o) = parse_spec("vfio-user=/e,posted-ring=on,posted-writes=off").unwrap();
        assert!(!o.posted_writes && o.posted_ring);
        assert!(matches!(
            parse_spec("vfio-user=/x,posted-ring=yes"),
            Err(RemoteSpecError::BadValue { .. })
        ));
    }
}
