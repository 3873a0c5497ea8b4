//! INTx unmask by eventfd end to end (issue 12, item 2): the VMM attaches the e1000's
//! INTx as a level-triggered KVM irqfd and hands its resample eventfd to the device as
//! the unmask eventfd, so the guest's EOIs unmask the device with no UNMASK message.
//! The e1000 is served over vfio-user from this process behind a wrapper that counts
//! the UNMASK requests it receives; the guest driver pings with INTx. A second run with
//! a device that refuses the unmask eventfd (an older server) shows the fallback: one
//! UNMASK message per EOI, and the ping still works.

mod common;

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nestio_device_model::{
    DeviceError, DeviceInfo, DmaPort, IoEventFd, IrqAction, IrqData, IrqInfo, RegionInfo, Result,
    VfioDevice,
};
use nestio_dma::{DmaMapRequest, MapTable};
use nestio_vfio_user::{Server, ServerConfig};
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig};

/// The e1000, counting UNMASK requests (ACTION_UNMASK | DATA_NONE / DATA_BOOL) and
/// optionally refusing unmask eventfds.
struct Counting {
    dev: Arc<dyn VfioDevice>,
    unmask_messages: AtomicU64,
    unmask_eventfds: AtomicU64,
    refuse_unmask_eventfd: bool,
}

impl VfioDevice for Counting {
    fn info(&self) -> DeviceInfo {
        self.dev.info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.dev.region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.dev.region_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.dev.region_write(index, offset, data)
    }
    fn region_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
        self.dev.region_io_fds(index)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.dev.irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        if action == IrqAction::Unmask {
            if matches!(data, IrqData::Eventfd(_)) {
                if self.refuse_unmask_eventfd {
                    return Err(DeviceError::Unsupported("unmask by eventfd".into()));
                }
                self.unmask_eventfds.fetch_add(1, Ordering::SeqCst);
            } else {
                self.unmask_messages.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.dev.set_irqs(index, action, start, count, data)
    }
    fn reset(&self) -> Result<()> {
        self.dev.reset()
    }
    fn dma_port(&self) -> Option<&DmaPort> {
        self.dev.dma_port()
    }
    fn dma_table(&self) -> Option<&MapTable> {
        self.dev.dma_table()
    }
    fn dma_map(&self, req: DmaMapRequest) -> Result<()> {
        self.dev.dma_map(req)
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.dev.dma_unmap(iova, size)
    }
    fn dma_unmap_all(&self) -> Result<()> {
        self.dev.dma_unmap_all()
    }
}

/// Ping with INTx through a counting e1000 served over vfio-user; returns (UNMASK
/// messages, unmask eventfds registered, RX interrupts the guest took).
fn ping(refuse_unmask_eventfd: bool) -> (u64, u64, u64) {
    let backend = nestio_net::open_backend("user", None).unwrap();
    let e1000 =
        nestio_emulated::e1000::E1000::new(nestio_emulated::e1000::E1000Config::new(backend))
            .unwrap();
    let dev = Arc::new(Counting {
        dev: e1000,
        unmask_messages: AtomicU64::new(0),
        unmask_eventfds: AtomicU64::new(0),
        refuse_unmask_eventfd,
    });
    let dir = std::env::temp_dir().join(format!(
        "nestio-intx-unmask-{}-{refuse_unmask_eventfd}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("e1000.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = Arc::new(Server::new(dev.clone(), ServerConfig::default()));
    let s = server.clone();
    let serving = std::thread::spawn(move || s.serve_owners(listener, 1));

    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = console;
    cfg.cmdline = "irq=intx".into();
    cfg.devices.push(DeviceConfig::VfioUser { socket });
    let report = Vm::new(cfg).unwrap().run().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("ping: echo reply from 10.0.2.2"), "{out}");
    assert!(out.contains("INTx on IOAPIC pin"), "{out}");
    let rx_irqs: u64 = out
        .split(" with RXT0")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no RX interrupt count in: {out}"));
    serving.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        dev.unmask_messages.load(Ordering::SeqCst),
        dev.unmask_eventfds.load(Ordering::SeqCst),
        rx_irqs,
    )
}

#[test]
fn intx_eois_unmask_through_the_resample_eventfd_with_no_message() {
    if !common::kvm_or_skip("intx_eois_unmask_through_the_resample_eventfd_with_no_message") {
        return;
    }
    let (messages, eventfds, irqs) = ping(false);
    println!("unmask eventfd: {irqs} RX interrupts, {messages} UNMASK messages");
    assert!(irqs >= 2, "RX interrupts taken: {irqs}");
    assert_eq!(eventfds, 1, "the resample eventfd was handed over once");
    assert_eq!(messages, 0, "UNMASK messages sent over {irqs} interrupts");

    // A device that refuses the unmask eventfd: unmasked by message, still working.
    let (messages, eventfds, irqs) = ping(true);
    println!("fallback: {irqs} RX interrupts, {messages} UNMASK messages");
    assert_eq!(eventfds, 0);
    assert!(
        messages >= irqs,
        "{messages} UNMASK messages for {irqs} RX interrupts in the fallback"
    );
}
