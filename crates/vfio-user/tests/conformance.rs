//! The conformance suite (`nestio_vfio_user::conformance`) against nestio's own server
//! serving the crate's TestDevice — every applicable check passes — and against servers
//! that answer one check wrongly, to prove each such check can fail.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use common::Harness;
use nestio_device_model::{
    DeviceError, DmaPort, Forwarding, IrqAction, IrqData, Result, VfioDevice,
};
use nestio_dma::{DmaMapRequest, MapTable};
use nestio_vfio_user::conformance::{self, Options, Report, Verdict, CHECKS};
use nestio_vfio_user::testdev::TestDevice;
use nestio_vfio_user::{Server, ServerConfig};

fn run_against(dev: Arc<dyn VfioDevice>) -> Report {
    let server = Server::new(dev, ServerConfig::default());
    let report = conformance::run_in_process(&server, &Options::default())
        .expect("the suite runs and the session ends cleanly");
    eprintln!("{report}");
    report
}

#[test]
fn test_device_passes_every_applicable_check() {
    let h = Harness::new(ServerConfig::default());
    let (a, t) = h.session();
    let report = conformance::run(a, &Options::default()).unwrap();
    t.join().unwrap().unwrap();
    eprintln!("{report}");
    let names: Vec<&str> = report.results.iter().map(|r| r.name).collect();
    assert_eq!(names, CHECKS, "every check runs once, in order");
    // The TestDevice is a bare fixture: it sets the PCI flag with only 3 regions, no
    // config space (QEMU's vfio-user-pci would refuse it). That is the one failure.
    assert_eq!(failures(&report), ["device_info"], "{report}");
    assert!(
        matches!(report.verdict("device_info"), Some(Verdict::Fail(r)) if r.contains("no config space region")),
        "{report}"
    );
    assert_eq!(report.restricted(), 0, "{report}");
    // The TestDevice has readable regions, maskable INTx with eventfds, DMA and reset:
    // these checks must really run, not be skipped.
    for name in [
        "region.read",
        "region.bounds",
        "set_irqs.trigger",
        "set_irqs.mask",
        "dma.map_unmap",
        "dma.overlap",
        "device_reset",
    ] {
        assert!(
            report.verdict(name).is_some_and(Verdict::is_pass),
            "{name}: {report}"
        );
    }
    assert!(report.to_string().lines().count() == CHECKS.len() + 1);
    assert!(report
        .to_string()
        .ends_with(&format!("CONFORMANCE summary: {}", report.summary())));
}

/// How a [`Broken`] device misbehaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// Reads outside a region succeed (zeros) instead of EINVAL.
    IgnoresBounds,
    /// A read-only DMA map is refused (EINVAL).
    RefusesReadOnlyMaps,
    /// SET_IRQS loopback triggers never signal the eventfd.
    NoLoopback,
    /// Not a flaw: a device without DMA (the trait's default: every map accepted,
    /// nothing recorded). The server itself must still refuse overlapping maps and
    /// unmaps of ranges never mapped.
    NoDmaTable,
    /// Not a flaw: a device that cannot translate DMA addresses (as a noiommu kernel
    /// device whose IOVAs must be physical) refuses ordinary maps with ENOTSUP.
    NoTranslation,
}

/// The TestDevice with one deliberate flaw.
struct Broken {
    inner: TestDevice,
    flaw: Flaw,
}

/// Every method the flaw does not touch is the TestDevice's own.
impl Forwarding for Broken {
    fn forward_to(&self) -> &dyn VfioDevice {
        &self.inner
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.inner.region_read(index, offset, buf) {
            Err(DeviceError::OutOfRange { .. }) | Err(DeviceError::Invalid(_))
                if self.flaw == Flaw::IgnoresBounds =>
            {
                buf.fill(0);
                Ok(())
            }
            r => r,
        }
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        if self.flaw == Flaw::NoLoopback
            && action == IrqAction::Trigger
            && matches!(data, IrqData::None | IrqData::Bool(_))
            && count > 0
        {
            return Ok(());
        }
        self.inner.set_irqs(index, action, start, count, data)
    }
    fn dma_port(&self) -> Option<&DmaPort> {
        match self.flaw {
            Flaw::NoDmaTable => None,
            _ => self.inner.dma_port(),
        }
    }
    fn dma_table(&self) -> Option<&MapTable> {
        match self.flaw {
            Flaw::NoDmaTable => None,
            _ => self.inner.dma_table(),
        }
    }
    fn dma_map(&self, req: DmaMapRequest) -> Result<()> {
        if self.flaw == Flaw::NoDmaTable {
            return Ok(());
        }
        if self.flaw == Flaw::NoTranslation {
            return Err(DeviceError::Unsupported(
                "no IOMMU: IOVA must be physical".into(),
            ));
        }
        if self.flaw == Flaw::RefusesReadOnlyMaps && !req.prot.writable() {
            return Err(DeviceError::Invalid("read-only maps refused".into()));
        }
        self.inner.dma_map(req)
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        if self.flaw == Flaw::NoDmaTable {
            return Ok(());
        }
        self.inner.dma_unmap(iova, size)
    }
    fn dma_unmap_all(&self) -> Result<()> {
        if self.flaw == Flaw::NoDmaTable {
            return Ok(());
        }
        self.inner.dma_unmap_all()
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(Broken);

fn broken(flaw: Flaw) -> Report {
    run_against(Arc::new(Broken {
        inner: TestDevice::new().unwrap(),
        flaw,
    }))
}

fn failures(report: &Report) -> Vec<&'static str> {
    report
        .results
        .iter()
        .filter(|r| r.verdict.is_fail())
        .map(|r| r.name)
        .collect()
}

/// Only the check the flaw concerns fails beyond the TestDevice's own finding
/// (`device_info`); the others still pass.
fn assert_only_fails(report: &Report, name: &str, why: &str) {
    match report.verdict(name) {
        Some(Verdict::Fail(r)) => assert!(r.contains(why), "{name}: {r}"),
        v => panic!("{name} must fail, got {v:?}:\n{report}"),
    }
    let mut want = vec!["device_info", name];
    want.sort_by_key(|n| CHECKS.iter().position(|c| c == n));
    assert_eq!(failures(report), want, "{report}");
}

#[test]
fn a_server_that_ignores_region_bounds_fails_region_bounds() {
    let r = broken(Flaw::IgnoresBounds);
    assert_only_fails(&r, "region.bounds", "accepted (must be refused)");
}

#[test]
fn a_device_that_refuses_read_only_maps_fails_dma_map_unmap() {
    let r = broken(Flaw::RefusesReadOnlyMaps);
    assert_only_fails(&r, "dma.map_unmap", "DMA_MAP read-only: error reply EINVAL");
}

#[test]
fn a_device_that_never_raises_fails_set_irqs_trigger() {
    let r = broken(Flaw::NoLoopback);
    assert_only_fails(&r, "set_irqs.trigger", "was not signalled");
}

/// A server that dies mid-suite: the check that lost the connection and every later
/// one fail, none hangs or passes.
#[test]
fn a_server_that_goes_away_fails_the_rest() {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        // Answer VERSION like a server, then close.
        let m = common::recv(&b).unwrap();
        let mut p = Vec::new();
        nestio_vfio_user::proto::Version {
            major: 0,
            minor: 2,
            caps: Default::default(),
        }
        .encode_into(&mut p);
        let h = m.header.reply(p.len()).unwrap();
        nestio_vfio_user::socket::send_message(&b, &h, &p, &[]).unwrap();
        drop(b);
    });
    let report = conformance::run(a, &Options::default()).unwrap();
    t.join().unwrap();
    eprintln!("{report}");
    assert!(report.verdict("version").is_some_and(Verdict::is_pass));
    assert_eq!(report.failed(), CHECKS.len() - 1, "{report}");
    assert!(
        matches!(report.verdict("version.repeat"), Some(Verdict::Fail(r)) if r.contains("connection lost")),
        "{report}"
    );
}

/// The server keeps the owner's mappings itself: a device that records none still gets
/// EEXIST for an overlapping map and ENOENT for an unmap of a range never mapped.
#[test]
fn a_device_without_a_map_table_still_gets_spec_dma_semantics() {
    let r = broken(Flaw::NoDmaTable);
    assert_eq!(failures(&r), ["device_info"], "{r}");
    for name in ["dma.map_unmap", "dma.overlap", "dma.unmap_unmapped"] {
        assert!(r.verdict(name).is_some_and(Verdict::is_pass), "{name}: {r}");
    }
}

/// A device-declared DMA restriction: every DMA check is RESTRICTED (naming the
/// errno), none passes silently and none fails.
#[test]
fn a_device_that_cannot_translate_dma_is_reported_restricted() {
    let r = broken(Flaw::NoTranslation);
    assert_eq!(failures(&r), ["device_info"], "{r}");
    let dma: Vec<&str> = CHECKS
        .iter()
        .copied()
        .filter(|c| c.starts_with("dma."))
        .collect();
    assert_eq!(r.restricted(), dma.len(), "{r}");
    for name in dma {
        assert!(
            matches!(r.verdict(name), Some(Verdict::Restricted(why)) if why.contains("ENOTSUP")),
            "{name}: {r}"
        );
    }
    assert!(r
        .summary()
        .ends_with(&format!("restricted {}", r.restricted())));
}
