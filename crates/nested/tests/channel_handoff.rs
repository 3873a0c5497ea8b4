//! BAR channel grants carried down a chain of vfio-user sessions (issue 12, item 5):
//! the device side grants, each level passes the fd on, the innermost level's BAR
//! accesses skip every level, a revocation at any level falls back to the mediated
//! path without losing or repeating an access, and hostile peers get refusals.
//!
//! The chain is the one `nestio device` / `nestio run --export` build, with each level's
//! server in a thread on a socketpair: level 0 serves a [`ChannelGate`] over the device
//! with its [`ChannelGrants::for_device`] as the server extension; level 1 is a client
//! of it serving its own gate with [`ChannelGrants::from_parent`]; level 2 asks level 1.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::{
    flags, pci_index, region_flags, DeviceError, DeviceInfo, IrqAction, IrqData, IrqInfo,
    RegionInfo, Result, VfioDevice,
};
use nestio_nested::channel_handoff::BAR_CHANNEL_FEATURE;
use nestio_nested::{request_grant, ChannelBars, ChannelGate, ChannelGrants};
use nestio_vfio_user::proto::{feature, Command, Header, RegionAccess};
use nestio_vfio_user::socket::{recv_message, send_message};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

/// A PCI device whose BAR 0 (16 KiB) counts: a write of `v` at 0 adds `v`, a read at 0
/// returns the sum; other offsets are scratch. Its MSI-X capability puts the table at
/// 0x2000 and the PBA at 0x2800 of BAR 0, so that page is excluded from channels.
struct Counter {
    sum: AtomicU64,
    scratch: parking_lot::Mutex<Vec<u8>>,
    cfg: [u8; 256],
}

const BAR0: u64 = 0x4000;

impl Counter {
    fn new() -> Arc<Counter> {
        let mut cfg = [0u8; 256];
        cfg[0..4].copy_from_slice(&0x1234_1af4u32.to_le_bytes());
        cfg[6] = 0x10; // capability list
        cfg[0x34] = 0x40;
        cfg[0x40] = 0x11; // MSI-X, last capability
        cfg[0x42..0x44].copy_from_slice(&0u16.to_le_bytes()); // 1 vector
        cfg[0x44..0x48].copy_from_slice(&0x2000u32.to_le_bytes()); // table: BAR 0
        cfg[0x48..0x4c].copy_from_slice(&0x2800u32.to_le_bytes()); // PBA: BAR 0
        Arc::new(Counter {
            sum: AtomicU64::new(0),
            scratch: parking_lot::Mutex::new(vec![0; BAR0 as usize]),
            cfg,
        })
    }
}

impl VfioDevice for Counter {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: flags::PCI | flags::RESET,
            num_regions: pci_index::NUM_REGIONS,
            num_irqs: pci_index::NUM_IRQS,
        }
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        match index {
            0 => Ok(RegionInfo::rw(0, BAR0)),
            pci_index::CONFIG => Ok(RegionInfo::rw(index, 256)),
            i if i < pci_index::NUM_REGIONS => Ok(RegionInfo::absent(i)),
            i => Err(DeviceError::NoSuchRegion(i)),
        }
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.region_info(index)?.check(offset, buf.len())?;
        match index {
            0 if offset == 0 && buf.len() == 8 => {
                buf.copy_from_slice(&self.sum.load(Ordering::SeqCst).to_le_bytes())
            }
            0 => buf.copy_from_slice(&self.scratch.lock()[offset as usize..][..buf.len()]),
            _ => buf.copy_from_slice(&self.cfg[offset as usize..][..buf.len()]),
        }
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.region_info(index)?.check(offset, data.len())?;
        match index {
            0 if offset == 0 && data.len() == 8 => {
                let mut v = [0u8; 8];
                v.copy_from_slice(data);
                self.sum.fetch_add(u64::from_le_bytes(v), Ordering::SeqCst);
            }
            0 => self.scratch.lock()[offset as usize..][..data.len()].copy_from_slice(data),
            _ => {}
        }
        Ok(())
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        Ok(IrqInfo {
            index,
            flags: 0,
            count: 0,
        })
    }
    fn set_irqs(&self, _: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> Result<()> {
        Ok(())
    }
    fn reset(&self) -> Result<()> {
        Ok(())
    }
}

/// Serve `dev` on a new socketpair (with `ext` as the feature extension, if any) and
/// return a client of it.
fn serve(dev: Arc<dyn VfioDevice>, ext: Option<Arc<ChannelGrants>>) -> Arc<Client> {
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut server = Server::new(dev, ServerConfig::default());
        if let Some(x) = ext {
            server = server.with_extension(x);
        }
        let _ = server.serve_stream(a);
    });
    Arc::new(Client::from_stream(b, ClientConfig::default()).unwrap())
}

struct Chain {
    device: Arc<Counter>,
    gate0: Arc<ChannelGate>,
    gate1: Arc<ChannelGate>,
    level2: Arc<Client>,
}

/// Device (level 0) -> level 1 (exporting) -> level 2's client.
fn chain() -> Chain {
    let device = Counter::new();
    let grants0 = ChannelGrants::for_device(device.clone()).unwrap();
    let gate0 = Arc::new(ChannelGate::new(device.clone(), grants0.clone()));
    let level1 = serve(gate0.clone(), Some(grants0));
    let grants1 = ChannelGrants::from_parent(level1.clone());
    let gate1 = Arc::new(ChannelGate::new(level1, grants1.clone()));
    let level2 = serve(gate1.clone(), Some(grants1));
    Chain {
        device,
        gate0,
        gate1,
        level2,
    }
}

fn innermost(c: &Chain) -> ChannelBars {
    let g = request_grant(&c.level2).unwrap().expect("a grant");
    assert_eq!(g.info().levels(), 1, "one exporting level crossed");
    assert_eq!(g.info().bar_mask(), 1);
    assert_eq!(g.info().exclusions().len(), 2, "MSI-X table and PBA pages");
    assert!(g.info().carries(0, 0x3000, 4) && !g.info().carries(0, 0x2ffc, 4));
    let client = c.level2.clone();
    ChannelBars::new(
        c.level2.clone(),
        g,
        Some(Box::new(move || request_grant(&client))),
    )
    .unwrap()
}

fn add(dev: &dyn VfioDevice, v: u64) {
    dev.region_write(0, 0, &v.to_le_bytes()).unwrap();
}

fn sum(dev: &dyn VfioDevice) -> u64 {
    let mut b = [0u8; 8];
    dev.region_read(0, 0, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn bar_accesses_skip_every_level_and_the_rest_is_mediated() {
    let c = chain();
    let bars = innermost(&c);
    for _ in 0..100 {
        add(&bars, 1);
    }
    assert_eq!(sum(&bars), 100);
    bars.region_write(0, 0x100, b"scratch!").unwrap();
    let mut s = [0u8; 8];
    bars.region_read(0, 0x100, &mut s).unwrap();
    assert_eq!(&s, b"scratch!");
    assert_eq!(
        c.gate1.stats().bar_accesses,
        0,
        "no BAR access crossed level 1"
    );
    assert_eq!(c.gate0.stats().bar_accesses, 0, "nor the device's session");
    assert_eq!(bars.stats().channel, 103);
    // Configuration space and interrupts still pass every level. (The channel's setup
    // read the BAR registers through the levels to learn which BARs take posted
    // writes: count from here.)
    let config_before = [
        c.gate0.stats().config_accesses,
        c.gate1.stats().config_accesses,
    ];
    let mut id = [0u8; 4];
    bars.region_read(pci_index::CONFIG, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1234_1af4);
    bars.set_irqs(0, IrqAction::Trigger, 0, 0, IrqData::None)
        .unwrap();
    for (g, before) in [&c.gate0, &c.gate1].into_iter().zip(config_before) {
        assert_eq!(g.stats().config_accesses, before + 1);
        assert_eq!(g.stats().set_irqs, 1);
    }
    // The MSI-X table page is not carried: mediated, seen by every level.
    let mut t = [0u8; 4];
    bars.region_read(0, 0x2000, &mut t).unwrap();
    assert_eq!(c.gate1.stats().bar_accesses, 1);
    assert_eq!(bars.stats().mediated, 1);
}

#[test]
fn a_revocation_at_any_level_loses_and_repeats_no_access() {
    let c = chain();
    let bars = Arc::new(innermost(&c));
    // Level 1 revokes while the innermost level writes as fast as it can; then the
    // device side revokes (a reset re-grants first).
    const N: u64 = 3000;
    let writer = {
        let bars = bars.clone();
        std::thread::spawn(move || {
            for _ in 0..N {
                add(bars.as_ref(), 1);
            }
        })
    };
    while bars.stats().channel < N / 4 {
        std::thread::yield_now();
    }
    assert_eq!(c.gate1.grants().revoke_all("test"), 1);
    writer.join().unwrap();
    let st = bars.stats();
    assert!(!bars.has_channel());
    assert_eq!(st.fallbacks, 1, "{st:?}");
    assert!(st.channel >= N / 4 && st.mediated >= 1, "{st:?}");
    assert_eq!(st.channel + st.mediated, N, "{st:?}");
    assert_eq!(
        c.device.sum.load(Ordering::SeqCst),
        N,
        "each write exactly once"
    );
    assert_eq!(
        c.gate1.stats().bar_accesses,
        st.mediated,
        "level 1 saw exactly the fallbacks"
    );

    // A reset revokes on the way down (every level) and the innermost asks again.
    bars.reset().unwrap();
    assert!(bars.has_channel());
    assert_eq!(bars.stats().grants, 2);
    assert_eq!(c.gate0.grants().live(), 1);
    let before = bars.stats();
    add(bars.as_ref(), 5);
    assert_eq!(bars.stats().channel, before.channel + 1);
    // The device side revokes this time.
    let writer = {
        let bars = bars.clone();
        std::thread::spawn(move || {
            for _ in 0..N {
                add(bars.as_ref(), 1);
            }
        })
    };
    while bars.stats().channel < before.channel + N / 4 {
        std::thread::yield_now();
    }
    assert_eq!(c.gate0.grants().revoke_all("test"), 1);
    writer.join().unwrap();
    assert_eq!(c.device.sum.load(Ordering::SeqCst), 2 * N + 5);
    let st = bars.stats();
    assert_eq!(st.fallbacks, 2);
    assert_eq!(st.channel + st.mediated, 2 * N + 1, "{st:?}");
}

#[test]
fn migration_blocks_grants_until_running() {
    use nestio_device_model::MigState;
    let c = chain();
    let bars = innermost(&c);
    // Level 1 moves the device out of RUNNING (the counter has no migration: the state
    // change itself fails, the block stays until a RUNNING succeeds).
    let _ = c.gate1.mig_set_state(MigState::Stop);
    add(&bars, 1);
    assert_eq!(bars.stats().fallbacks, 1);
    assert!(
        request_grant(&c.level2).unwrap().is_none(),
        "EBUSY while not running"
    );
    assert!(c.gate1.grants().stats().refused >= 1);
}

#[test]
fn the_session_end_revokes_a_stolen_channel() {
    let c = chain();
    let g = request_grant(&c.level2).unwrap().unwrap();
    let (_, sock) = g.into_parts();
    // The channel works for its holder...
    let h = Header::command(1, Command::RegionRead, RegionAccess::SIZE).unwrap();
    let mut b = Vec::new();
    RegionAccess {
        offset: 8,
        region: 0,
        count: 8,
        data: &[],
    }
    .encode_into(&mut b);
    send_message(&sock, &h, &b, &[]).unwrap();
    let r = recv_message(&sock, 4096).unwrap().unwrap();
    assert!(!r.header.is_error());
    // ...until the session it was granted to ends (level 2 leaves).
    let grants1 = c.gate1.grants().clone();
    drop(c.level2);
    let t = std::time::Instant::now();
    while grants1.live() != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "never revoked");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(send_message(&sock, &h, &b, &[]).is_err(), "revoked: EPIPE");
}

/// A hostile holder of a channel: excluded pages, configuration space, other commands,
/// fds and out-of-range accesses are refused with the right errno; the device lives.
#[test]
fn a_hostile_channel_peer_gets_refusals() {
    let c = chain();
    let (_, sock) = request_grant(&c.level2).unwrap().unwrap().into_parts();
    let mut id = 0u16;
    let mut ask = |cmd: Command, region: u32, offset: u64, count: u32, fds: &[i32]| {
        id += 1;
        let data = vec![
            0u8;
            if cmd == Command::RegionWrite {
                count as usize
            } else {
                0
            }
        ];
        let mut b = Vec::new();
        RegionAccess {
            offset,
            region,
            count,
            data: &data,
        }
        .encode_into(&mut b);
        send_message(&sock, &Header::command(id, cmd, b.len()).unwrap(), &b, fds).unwrap();
        let r = recv_message(&sock, 8192).unwrap().unwrap();
        assert_eq!(r.header.msg_id, id);
        r.header.is_error().then_some(r.header.error as i32)
    };
    assert_eq!(ask(Command::RegionRead, 0, 0x100, 4, &[]), None);
    assert_eq!(
        ask(Command::RegionRead, 0, 0x2000, 4, &[]),
        Some(libc::EACCES),
        "MSI-X table"
    );
    assert_eq!(
        ask(Command::RegionWrite, 0, 0x2800, 4, &[]),
        Some(libc::EACCES),
        "PBA"
    );
    assert_eq!(
        ask(Command::RegionRead, 0, 0x1ffe, 4, &[]),
        Some(libc::EACCES),
        "straddles"
    );
    assert_eq!(
        ask(Command::RegionRead, pci_index::CONFIG, 0, 4, &[]),
        Some(libc::EINVAL)
    );
    assert_eq!(
        ask(Command::RegionRead, 1, 0, 4, &[]),
        Some(libc::EINVAL),
        "absent BAR"
    );
    assert_eq!(
        ask(Command::RegionRead, 0, BAR0 - 2, 4, &[]),
        Some(libc::EINVAL),
        "bounds"
    );
    assert_eq!(
        ask(Command::RegionRead, 0, u64::MAX - 1, 4, &[]),
        Some(libc::EINVAL),
        "wrap"
    );
    assert_eq!(ask(Command::DeviceReset, 0, 0, 4, &[]), Some(libc::ENOTSUP));
    let (p, _q) = UnixStream::pair().unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(
        ask(Command::RegionRead, 0, 0, 8, &[p.as_raw_fd()]),
        Some(libc::EINVAL)
    );
    // Still serving the honest path.
    assert_eq!(ask(Command::RegionRead, 0, 0, 8, &[]), None);
}

#[test]
fn an_old_parent_gives_no_channel_and_bad_requests_are_refused() {
    // A server without the extension: the probe gets ENOTTY, no grant, no error.
    let old = serve(Counter::new(), None);
    assert!(request_grant(&old).unwrap().is_none());
    // With it: SET, data, and a GET without room for the grant are EINVAL.
    let c = chain();
    for (flags, data, room) in [
        (feature::SET, &[][..], 256),
        (feature::GET, &[1u8, 2][..], 256),
        (feature::GET, &[][..], 8),
    ] {
        let e = c
            .level2
            .device_feature(BAR_CHANNEL_FEATURE, flags, data, room)
            .unwrap_err();
        assert!(
            matches!(e, DeviceError::Remote { errno, .. } if errno == libc::EINVAL),
            "{e}"
        );
    }
    assert_eq!(c.gate1.grants().stats().granted, 0);
    // A device without BARs has nothing to grant.
    struct NoBars;
    impl VfioDevice for NoBars {
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                flags: flags::PCI,
                num_regions: 9,
                num_irqs: 0,
            }
        }
        fn region_info(&self, i: u32) -> Result<RegionInfo> {
            let mut r = RegionInfo::absent(i);
            if i == pci_index::CONFIG {
                r = RegionInfo::rw(i, 256);
                r.flags = region_flags::READ;
            }
            Ok(r)
        }
        fn region_read(&self, _: u32, _: u64, b: &mut [u8]) -> Result<()> {
            b.fill(0);
            Ok(())
        }
        fn region_write(&self, _: u32, _: u64, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn irq_info(&self, i: u32) -> Result<IrqInfo> {
            Err(DeviceError::NoSuchIrq(i))
        }
        fn set_irqs(&self, _: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> Result<()> {
            Ok(())
        }
    }
    assert!(ChannelGrants::for_device(Arc::new(NoBars)).is_err());
}

/// A child that keeps asking gets at most MAX_GRANTS live channels (threads in the
/// device process); revoked ones make room again.
#[test]
fn grants_are_bounded() {
    use nestio_nested::channel_handoff::MAX_GRANTS;
    let c = chain();
    let mut kept = Vec::new();
    for _ in 0..MAX_GRANTS {
        kept.push(request_grant(&c.level2).unwrap().expect("within the bound"));
    }
    assert!(request_grant(&c.level2).unwrap().is_none(), "EBUSY beyond");
    assert_eq!(c.gate1.grants().live(), MAX_GRANTS);
    c.gate1.grants().revoke_all("test");
    assert!(request_grant(&c.level2).unwrap().is_some(), "room again");
}

/// A channel the innermost level replaces (after a reset at a level that keeps grants)
/// or drops is shut, so every level sees it revoked: nothing piles up.
#[test]
fn replaced_and_dropped_channels_are_shut() {
    let c = chain();
    let g = request_grant(&c.level2).unwrap().unwrap();
    let (_, watch) = request_grant(&c.level2).unwrap().unwrap().into_parts();
    drop(watch);
    let bars = ChannelBars::new(c.level2.clone(), g, None).unwrap();
    add(&bars, 1);
    // Level 1 holds a duplicate of each grant; after the drop, the zero-length send
    // of the bound check finds the channel shut: fill up to the bound and ask again.
    drop(bars);
    let mut kept = Vec::new();
    while let Some(g) = request_grant(&c.level2).unwrap() {
        kept.push(g);
        assert!(kept.len() <= nestio_nested::channel_handoff::MAX_GRANTS);
    }
    // Two grants were made before; the dropped one was released to make room, the
    // merely closed one (no shutdown) still counts against the bound.
    assert_eq!(kept.len(), nestio_nested::channel_handoff::MAX_GRANTS - 1);
}
