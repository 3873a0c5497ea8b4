//! Exit and interrupt costs, measured by a guest in one run (`nestio bench`).
//!
//! The guest (`payloads::SAMPLETEST` with `mode=bench`) drives every nestio sample
//! device (1b36:7e57) assigned to the VM and times with its TSC: 200 MMIO reads and
//! writes of the scratch register (each one a full exit round trip: KVM exit, VMM bus,
//! the device — in this process, or a vfio-user message to another process — and back),
//! and 20 interrupts (an INT_SET write makes the device signal its MSI eventfd, KVM's
//! irqfd injects, the guest handler reads the TSC). Interrupt delivery from the device's
//! eventfd to the guest is the interrupt time minus the write round trip.
//!
//! The results are cycle counts of the guest TSC; only ratios are reported as results,
//! since absolute numbers depend on the host (this project's CI host emulates guest code).

use std::path::PathBuf;
use std::sync::Arc;

use nestio_device_model::VfioDevice;

use crate::serial::ConsoleOutput;
use crate::vm::{DeviceConfig, Vm, VmConfig, VmError};

/// Costs for one device, in guest TSC cycles per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCosts {
    /// MMIO read round trip.
    pub read: u64,
    /// MMIO write round trip.
    pub write: u64,
    /// INT_SET write until the guest handler runs.
    pub irq: u64,
}

impl DeviceCosts {
    /// Interrupt delivery, device eventfd -> guest handler (irq minus the write).
    pub fn delivery(&self) -> u64 {
        self.irq.saturating_sub(self.write)
    }
}

/// The result of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitBenchReport {
    /// The in-process device.
    pub local: DeviceCosts,
    /// The vfio-user device.
    pub remote: DeviceCosts,
}

impl ExitBenchReport {
    /// vfio-user MMIO read round trip / in-process one.
    pub fn remote_over_local_read(&self) -> f64 {
        self.remote.read as f64 / self.local.read.max(1) as f64
    }
    /// vfio-user MMIO write round trip / in-process one.
    pub fn remote_over_local_write(&self) -> f64 {
        self.remote.write as f64 / self.local.write.max(1) as f64
    }
    /// Interrupt delivery (eventfd -> guest) / in-process MMIO read round trip.
    pub fn delivery_over_local_read(&self) -> f64 {
        self.local.delivery() as f64 / self.local.read.max(1) as f64
    }
    /// Interrupt delivery of the remote device / of the local one (both are eventfd
    /// signals into KVM; the ratio shows no process hop on the way).
    pub fn remote_over_local_delivery(&self) -> f64 {
        self.remote.delivery() as f64 / self.local.delivery().max(1) as f64
    }
}

impl std::fmt::Display for ExitBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "guest TSC cycles per operation (one run):")?;
        for (name, c) in [("in-process", self.local), ("vfio-user", self.remote)] {
            writeln!(
                f,
                "  {name:>10}: MMIO read {:>8}  MMIO write {:>8}  INT_SET->handler {:>8}  eventfd->guest {:>8}",
                c.read,
                c.write,
                c.irq,
                c.delivery()
            )?;
        }
        writeln!(f, "ratios:")?;
        writeln!(
            f,
            "  MMIO read,  vfio-user / in-process: {:.2}",
            self.remote_over_local_read()
        )?;
        writeln!(
            f,
            "  MMIO write, vfio-user / in-process: {:.2}",
            self.remote_over_local_write()
        )?;
        writeln!(
            f,
            "  interrupt delivery (eventfd->guest) / in-process MMIO read: {:.2}",
            self.delivery_over_local_read()
        )?;
        write!(
            f,
            "  interrupt delivery, vfio-user / in-process: {:.2}",
            self.remote_over_local_delivery()
        )
    }
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ExitBenchError {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest did not report what was expected.
    #[error("the benchmark guest failed (status {status}); console:\n{console}")]
    Guest {
        /// Exit status.
        status: i32,
        /// Console output.
        console: String,
    },
}

fn parse(console: &str, dev: usize) -> Option<DeviceCosts> {
    let line = console
        .lines()
        .find(|l| l.starts_with(&format!("bench dev={dev} ")))?;
    let field = |k: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
    };
    Some(DeviceCosts {
        read: field("read")?,
        write: field("write")?,
        irq: field("irq")?,
    })
}

/// Run the benchmark: `local` must be a sample device object, `remote_socket` a
/// vfio-user server serving a sample device.
pub fn exit_costs(
    payload: impl Into<PathBuf>,
    local: Arc<dyn VfioDevice>,
    remote_socket: PathBuf,
) -> Result<ExitBenchReport, ExitBenchError> {
    let devices = vec![
        DeviceConfig::Local {
            name: "sample (in-process)".into(),
            device: local,
        },
        DeviceConfig::VfioUser {
            socket: remote_socket,
        },
    ];
    let c = run_guest(payload.into(), devices)?;
    Ok(ExitBenchReport {
        local: c[0],
        remote: c[1],
    })
}

/// Boot the bench guest with `devices` (all sample devices) and return each one's costs
/// in order.
fn run_guest(
    payload: PathBuf,
    devices: Vec<DeviceConfig>,
) -> Result<Vec<DeviceCosts>, ExitBenchError> {
    let buf = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let n = devices.len();
    let mut cfg = VmConfig::new(payload);
    cfg.console = ConsoleOutput::Buffer(buf.clone());
    cfg.cmdline = "mode=bench".into();
    cfg.devices = devices;
    let report = Vm::new(cfg)?.run()?;
    let console = String::from_utf8_lossy(&buf.lock()).into_owned();
    let status = report.exit_status();
    let costs: Option<Vec<DeviceCosts>> = (0..n).map(|i| parse(&console, i)).collect();
    match (status, costs) {
        (0, Some(c)) => Ok(c),
        _ => Err(ExitBenchError::Guest { status, console }),
    }
}

/// Posted versus synchronous MMIO writes to a vfio-user device, from one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostedReport {
    /// The in-process device.
    pub local: DeviceCosts,
    /// The vfio-user device with `posted-writes=off` (every write waits for its reply).
    pub sync: DeviceCosts,
    /// The vfio-user device with posted writes over the socket (`posted-ring=off`).
    pub posted: DeviceCosts,
    /// The vfio-user device with posted writes through nestio's shared-memory ring (the
    /// default).
    pub ring: DeviceCosts,
}

impl PostedReport {
    /// Synchronous vfio-user MMIO write / in-process one ("before").
    pub fn sync_over_local_write(&self) -> f64 {
        self.sync.write as f64 / self.local.write.max(1) as f64
    }
    /// Posted (socket) vfio-user MMIO write / in-process one.
    pub fn posted_over_local_write(&self) -> f64 {
        self.posted.write as f64 / self.local.write.max(1) as f64
    }
    /// Posted (ring) vfio-user MMIO write / in-process one.
    pub fn ring_over_local_write(&self) -> f64 {
        self.ring.write as f64 / self.local.write.max(1) as f64
    }
}

impl std::fmt::Display for PostedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "guest TSC cycles per operation (one run):")?;
        for (name, c) in [
            ("in-process", self.local),
            ("vfio-user, posted-writes=off", self.sync),
            ("vfio-user, posted, socket", self.posted),
            ("vfio-user, posted, ring", self.ring),
        ] {
            writeln!(
                f,
                "  {name:>28}: MMIO read {:>8}  MMIO write {:>8}  INT_SET->handler {:>8}",
                c.read, c.write, c.irq
            )?;
        }
        writeln!(f, "ratios:")?;
        writeln!(
            f,
            "  MMIO write, vfio-user / in-process, posted-writes=off:               {:.2}",
            self.sync_over_local_write()
        )?;
        writeln!(
            f,
            "  MMIO write, vfio-user / in-process, posted over the socket (before): {:.2}",
            self.posted_over_local_write()
        )?;
        write!(
            f,
            "  MMIO write, vfio-user / in-process, posted through the ring (after): {:.2}",
            self.ring_over_local_write()
        )
    }
}

/// Run the posted-write benchmark: `local` a sample device object; `sync_socket`,
/// `posted_socket` and `ring_socket` three vfio-user servers each serving a sample
/// device (a server serves one client at a time). The same guest times all four
/// devices in one run.
pub fn posted_write_costs(
    payload: impl Into<PathBuf>,
    local: Arc<dyn VfioDevice>,
    sync_socket: PathBuf,
    posted_socket: PathBuf,
    ring_socket: PathBuf,
) -> Result<PostedReport, ExitBenchError> {
    let devices = vec![
        DeviceConfig::Local {
            name: "sample (in-process)".into(),
            device: local,
        },
        DeviceConfig::VfioUserWith {
            socket: sync_socket,
            options: crate::remote::RemoteOptions {
                posted_writes: false,
                posted_ring: false,
            },
        },
        DeviceConfig::VfioUserWith {
            socket: posted_socket,
            options: crate::remote::RemoteOptions {
                posted_writes: true,
                posted_ring: false,
            },
        },
        DeviceConfig::VfioUserWith {
            socket: ring_socket,
            options: crate::remote::RemoteOptions::default(),
        },
    ];
    let c = run_guest(payload.into(), devices)?;
    Ok(PostedReport {
        local: c[0],
        sync: c[1],
        posted: c[2],
        ring: c[3],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        let c =
            "x\nbench dev=0 read=100 write=90 irq=400\nbench dev=1 read=900 write=800 irq=1300\n";
        let l = parse(c, 0).unwrap();
        let r = parse(c, 1).unwrap();
        assert_eq!((l.read, l.write, l.irq, l.delivery()), (100, 90, 400, 310));
        let b = ExitBenchReport {
            local: l,
            remote: r,
        };
        assert!((b.remote_over_local_read() - 9.0).abs() < 1e-9);
        assert!((b.delivery_over_local_read() - 3.1).abs() < 1e-9);
        assert!(parse(c, 2).is_none());
        assert!(parse("bench dev=0 read=x write=1 irq=2", 0).is_none());
    }
}
