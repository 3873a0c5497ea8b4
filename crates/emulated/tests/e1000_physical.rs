//! The e1000 driver for devices without an IOMMU (`Driver::new_physical`, issue 18):
//! every address it gives the device is a page's "physical" address from the table it
//! was built with, never its own linear layout. The in-process e1000's map table stands
//! in for physical memory: the pages are mapped at scattered, reversed addresses, so a
//! ring or buffer address that skipped the translation would hit unmapped IOVA and the
//! pings would fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::VfioDevice;
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_emulated::e1000_bench::{
    device_pages, guest_memory, Driver, DriverError, IrqMode, BUF_SIZE, GATEWAY_IP, GUEST_IP, IOVA,
    PAGE, RX_BUF, TX_RING,
};

fn e1000() -> Arc<dyn VfioDevice> {
    let backend = nestio_net::open_backend("user", None).unwrap();
    E1000::new(E1000Config::new(backend)).unwrap()
}

/// Page `i` of `device_pages()` at `base + (n - i) * 2 pages`: reversed, with holes.
fn scattered(base: u64) -> BTreeMap<u64, u64> {
    let pages = device_pages();
    let n = pages.len() as u64;
    pages
        .iter()
        .enumerate()
        .map(|(i, &off)| (off, base + (n - i as u64) * 2 * PAGE))
        .collect()
}

#[test]
fn device_pages_cover_rings_and_buffers() {
    let pages = device_pages();
    // Two ring pages and 16 pages of 2 KiB buffers per direction.
    assert_eq!(pages.len(), 2 + 16 + 16);
    assert!(pages.windows(2).all(|w| w[0] < w[1]));
    assert!(pages.iter().all(|p| p % PAGE == 0));
    assert!(pages.contains(&(RX_BUF - IOVA + 31 * BUF_SIZE - (31 * BUF_SIZE) % PAGE)));
}

#[test]
fn pings_through_scattered_physical_pages() {
    let table = scattered(0x4000_0000);
    let mut drv = Driver::new_physical(
        e1000(),
        guest_memory().unwrap(),
        IrqMode::Intx,
        table.clone(),
    )
    .unwrap();
    // The device sees the translated addresses, inside one page each.
    assert_eq!(
        drv.dev_addr(TX_RING + 0x10, 16).unwrap(),
        table[&(TX_RING - IOVA)] + 0x10
    );
    drv.reset().unwrap();
    drv.probe().unwrap();
    drv.setup().unwrap();
    let gw = drv
        .arp(GUEST_IP, GATEWAY_IP, Duration::from_secs(5))
        .unwrap();
    let mut ping = |seq: u16, payload: &[u8]| {
        drv.ping(
            GUEST_IP,
            gw,
            GATEWAY_IP,
            0x77,
            seq,
            payload,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    for seq in 1..=3u16 {
        ping(seq, &[seq as u8; 56]);
    }
    // 40 frames: both rings wrap, so every buffer page was used.
    for seq in 4..44u16 {
        ping(seq, &[1; 8]);
    }
}

#[test]
fn addresses_outside_the_table_or_across_pages_are_refused() {
    let table = scattered(0x4000_0000);
    let drv = Driver::new_physical(e1000(), guest_memory().unwrap(), IrqMode::Intx, table).unwrap();
    for (iova, len) in [
        (TX_RING + PAGE - 8, 16), // crosses into the next page
        (IOVA + 0x5000, 16),      // a page the device never touches
        (IOVA - 0x1000, 16),      // below the driver's memory
        (TX_RING, 0),
        (TX_RING, u64::MAX), // a length that would wrap
    ] {
        let e = drv.dev_addr(iova, len).unwrap_err();
        assert!(
            matches!(e, DriverError::OutOfMemory { .. }),
            "{iova:#x}+{len}: {e}"
        );
    }
}

#[test]
fn a_table_missing_a_page_or_unaligned_is_refused_before_any_map() {
    let mut table = scattered(0x4000_0000);
    table.remove(&(RX_BUF - IOVA));
    let e = Driver::new_physical(e1000(), guest_memory().unwrap(), IrqMode::Intx, table)
        .err()
        .expect("missing page");
    assert!(matches!(e, DriverError::OutOfMemory { .. }), "{e}");
    let mut table = scattered(0x4000_0000);
    *table.get_mut(&0).unwrap() += 8;
    let e = Driver::new_physical(e1000(), guest_memory().unwrap(), IrqMode::Intx, table)
        .err()
        .expect("unaligned");
    assert!(matches!(e, DriverError::Misbehaved(_)), "{e}");
}
