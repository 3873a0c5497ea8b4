//! The interrupt and mapping wiring of an assigned device, driven by configuration
//! space and BAR accesses as a guest makes them, checked against a recording
//! interrupt controller and address space (no `/dev/kvm` needed).

use std::sync::Arc;

use nestio_device::pci::MsiMessage;
use nestio_devices::sample::{SampleDevice, MSIX_TABLE_OFFSET};

use super::AssignedDevice;
use crate::address_space::fake::{RecordingSpace, SpaceCall};
use crate::bus::Bus;
use crate::iommu::{GuestRamFile, IdentityDomain};
use crate::irqchip::fake::{IrqCall, RecordingIrqChip};
use crate::irqchip::{IrqChip, SourceKind, SourceRequest};
use crate::memory::GuestRam;
use crate::pci::{ConfigSpaceFunction, PciRoot};
use crate::region_map::RegionMapper;

struct Rig {
    chip: Arc<RecordingIrqChip>,
    space: Arc<RecordingSpace>,
    root: Arc<PciRoot>,
    dev: Arc<AssignedDevice>,
    _ram: GuestRam,
}

fn rig() -> Rig {
    let chip = Arc::new(RecordingIrqChip::default());
    let space = Arc::new(RecordingSpace::default());
    let mapper = RegionMapper::new(space.clone(), Arc::new(Bus::new()), Arc::new(Bus::new()));
    let ram = GuestRam::new(4 << 20).unwrap();
    let dma = Arc::new(IdentityDomain::new(GuestRamFile::of(&ram)));
    let root = PciRoot::new(chip.clone(), mapper, dma);
    let sample = Arc::new(SampleDevice::new().unwrap());
    let dev = root.assign(1, "sample".into(), sample).unwrap();
    Rig {
        chip,
        space,
        root,
        dev,
        _ram: ram,
    }
}

fn cfg_write(d: &Arc<AssignedDevice>, reg: u16, v: &[u8]) {
    ConfigSpaceFunction::config_write(d, reg, v).unwrap();
}

fn cfg_read32(d: &Arc<AssignedDevice>, reg: u16) -> u32 {
    let mut b = [0u8; 4];
    ConfigSpaceFunction::config_read(d, reg, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn find_cap(d: &Arc<AssignedDevice>, id: u8) -> u16 {
    let mut p = (cfg_read32(d, 0x34) & 0xfc) as u16;
    while p != 0 {
        let h = cfg_read32(d, p);
        if h as u8 == id {
            return p;
        }
        p = ((h >> 8) & 0xfc) as u16;
    }
    panic!("capability {id:#x} not found");
}

#[test]
fn intx_is_a_level_source_from_the_irqchip_and_its_number_is_the_line_register() {
    let r = rig();
    assert_eq!(
        r.chip.take(),
        vec![
            IrqCall::Allocate(SourceRequest::PciIntx { slot: 1, pin: 1 }, 18),
            IrqCall::Attach {
                source: 18,
                resample: true
            },
        ]
    );
    assert_eq!(r.dev.intx_gsi(), Some(18));
    assert_eq!(cfg_read32(&r.dev, 0x3c) & 0xff, 18);
    let snap = r.chip.snapshot();
    assert_eq!(snap.sources.len(), 1);
    assert_eq!(snap.sources[0].kind, SourceKind::Line);
    assert!(snap.sources[0].resample);
}

#[test]
fn enabling_msi_allocates_attaches_and_programs_each_vector_and_mask_bits_detach() {
    let r = rig();
    let cap = find_cap(&r.dev, 0x05);
    cfg_write(&r.dev, cap + 4, &0xfee0_1000u32.to_le_bytes());
    cfg_write(&r.dev, cap + 8, &0u32.to_le_bytes());
    cfg_write(&r.dev, cap + 0xc, &0x4041u16.to_le_bytes());
    r.chip.take();
    // Enable, two vectors (MME = 1).
    cfg_write(&r.dev, cap + 2, &(1u16 | 1 << 4).to_le_bytes());
    let msg = |data| {
        Some(MsiMessage {
            address: 0xfee0_1000,
            data,
        })
    };
    assert_eq!(
        r.chip.take(),
        vec![
            IrqCall::Allocate(SourceRequest::Msi, 100),
            IrqCall::Attach {
                source: 100,
                resample: false
            },
            IrqCall::Allocate(SourceRequest::Msi, 101),
            IrqCall::Attach {
                source: 101,
                resample: false
            },
            IrqCall::ProgramMsi(vec![(100, msg(0x4040)), (101, msg(0x4041))]),
        ],
        "one batch of messages; vector v's data has its low bit replaced by v"
    );
    // Per-vector mask of vector 1 detaches its eventfd; clearing it re-attaches.
    cfg_write(&r.dev, cap + 0x10, &2u32.to_le_bytes());
    let calls = r.chip.take();
    assert!(
        calls.contains(&IrqCall::Detach { source: 101 }),
        "{calls:?}"
    );
    assert!(!calls
        .iter()
        .any(|c| matches!(c, IrqCall::Detach { source: 100 })));
    cfg_write(&r.dev, cap + 0x10, &0u32.to_le_bytes());
    assert!(r.chip.take().contains(&IrqCall::Attach {
        source: 101,
        resample: false
    }));
    // Disable: the messages are removed, no source is allocated again.
    cfg_write(&r.dev, cap + 2, &0u16.to_le_bytes());
    let calls = r.chip.take();
    assert!(calls.contains(&IrqCall::ProgramMsi(vec![(100, None), (101, None)])));
    assert!(!calls.iter().any(|c| matches!(c, IrqCall::Allocate(..))));
}

#[test]
fn msix_entries_program_messages_and_the_mask_bit_detaches() {
    let r = rig();
    let cap = find_cap(&r.dev, 0x11);
    // Memory decode on: BAR0 is placed in the MMIO bus.
    cfg_write(&r.dev, 4, &2u16.to_le_bytes());
    let (bar0, _) = r.dev.bar_mapping(0).expect("BAR0 decoded");
    r.chip.take();
    // Enable MSI-X: sources for both vectors, messages from the (reset) table, and no
    // eventfd attached while the entries are masked.
    cfg_write(&r.dev, cap + 3, &[0x80]);
    let zero = Some(MsiMessage {
        address: 0,
        data: 0,
    });
    assert_eq!(
        r.chip.take(),
        vec![
            IrqCall::Allocate(SourceRequest::Msi, 100),
            IrqCall::Allocate(SourceRequest::Msi, 101),
            IrqCall::ProgramMsi(vec![(100, zero), (101, zero)]),
        ]
    );
    // Program entry 1 through the BAR, then unmask it.
    let entry = bar0 + MSIX_TABLE_OFFSET + 16;
    let mmio = r.root.mapper().mmio_bus();
    mmio.write(entry, &0xfee0_2000u32.to_le_bytes()).unwrap();
    mmio.write(entry + 8, &0x55u32.to_le_bytes()).unwrap();
    r.chip.take();
    mmio.write(entry + 12, &0u32.to_le_bytes()).unwrap();
    let want = Some(MsiMessage {
        address: 0xfee0_2000,
        data: 0x55,
    });
    assert_eq!(
        r.chip.take(),
        vec![
            IrqCall::ProgramMsi(vec![(100, zero), (101, want)]),
            IrqCall::Attach {
                source: 101,
                resample: false
            },
        ]
    );
    let mut b = [0u8; 4];
    mmio.read(entry + 8, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x55, "the table reads back");
    // The function mask detaches every attached vector; clearing it re-attaches.
    cfg_write(&r.dev, cap + 3, &[0xc0]);
    assert!(r.chip.take().contains(&IrqCall::Detach { source: 101 }));
    cfg_write(&r.dev, cap + 3, &[0x80]);
    assert!(r.chip.take().contains(&IrqCall::Attach {
        source: 101,
        resample: false
    }));
    // Masking the entry again detaches it.
    mmio.write(entry + 12, &1u32.to_le_bytes()).unwrap();
    assert!(r.chip.take().contains(&IrqCall::Detach { source: 101 }));
}

#[test]
fn bar_decode_maps_mmappable_areas_as_slots_and_unmaps_them_on_decode_off() {
    let r = rig();
    assert!(r.space.take().is_empty(), "nothing mapped before decode");
    cfg_write(&r.dev, 4, &2u16.to_le_bytes());
    let (bar2, size) = r.dev.bar_mapping(2).expect("BAR2 decoded");
    let calls = r.space.take();
    let slots: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            SpaceCall::Slot { gpa, size, .. } => Some((*gpa, *size)),
            _ => None,
        })
        .collect();
    assert!(
        slots.iter().any(|&(g, s)| g == bar2 && s > 0 && s <= size),
        "BAR2's RAM is a memory slot: {calls:?}"
    );
    cfg_write(&r.dev, 4, &0u16.to_le_bytes());
    assert_eq!(r.dev.bar_mapping(2), None);
    let calls = r.space.take();
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, SpaceCall::Slot { gpa, size: 0, .. } if *gpa == bar2)),
        "the slot is removed: {calls:?}"
    );
}

#[test]
fn the_dma_domain_maps_guest_ram_at_attach_and_takes_it_back_when_the_vm_goes() {
    let r = rig();
    let sample = r.dev.device().clone();
    let maps = sample.dma_table().unwrap().mappings();
    assert_eq!(maps.len(), 1);
    assert_eq!((maps[0].range.start(), maps[0].range.len()), (0, 4 << 20));
    assert_eq!(maps[0].prot, nestio_dma::Prot::RW);
    assert_eq!(r.root.dma_domain().model(), "identity");
    drop(r);
    assert!(
        sample.dma_table().unwrap().mappings().is_empty(),
        "detached from the domain when the device went away"
    );
}
