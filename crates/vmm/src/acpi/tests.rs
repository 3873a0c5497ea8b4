use super::*;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn tables(cpus: usize) -> AcpiTables {
    AcpiTables::build(ACPI_BASE, &AcpiConfig::new(cpus, IntxRouting::Pic).unwrap()).unwrap()
}

/// MADT structures as `(type, bytes)`.
fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        assert!(
            len >= 2 && off + len <= madt.len(),
            "entry at {off} overruns"
        );
        v.push((madt[off], madt[off + 1..off + len].to_vec()));
        off += len;
    }
    v
}

#[test]
fn every_table_sums_to_zero_and_has_its_length() {
    let t = tables(1);
    let rsdp = t.table(b"RSD ").unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert!(sums_to_zero(&rsdp[..20]), "RSDP v1 checksum");
    assert!(sums_to_zero(rsdp), "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "revision 2 (XSDT)");
    for sig in [b"XSDT", b"FACP", b"APIC", b"MCFG", b"DSDT"] {
        let b = t.table(sig).unwrap();
        assert_eq!(&b[..4], sig);
        assert_eq!(u32_at(b, 4) as usize, b.len(), "{sig:?} length");
        assert!(sums_to_zero(b), "{sig:?} checksum");
        assert_eq!(&b[10..16], &OEM_ID);
    }
    let facs = t.table(b"FACS").unwrap();
    assert_eq!((&facs[..4], u32_at(facs, 4)), (&b"FACS"[..], 64));
}

#[test]
fn layout_is_aligned_disjoint_inside_the_area() {
    let t = tables(4);
    assert_eq!(t.rsdp_addr(), ACPI_BASE);
    assert!(t.bytes().len() as u64 <= ACPI_AREA_LEN);
    let mut spans: Vec<(u64, u64)> = t
        .tables()
        .iter()
        .map(|i| (i.addr, i.addr + i.len as u64))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap {w:?}");
    }
    for i in t.tables() {
        let align = if &i.signature == b"FACS" { 64 } else { 16 };
        assert_eq!(i.addr % align, 0, "{:?} alignment", i.signature);
        assert!(i.addr >= ACPI_BASE && i.addr + i.len as u64 <= ACPI_BASE + ACPI_AREA_LEN);
    }
    // Inside the BIOS area the e820 map reserves, clear of the MP table.
    const { assert!(ACPI_BASE >= crate::linux::e820::BIOS_START) };
    const { assert!(ACPI_BASE + ACPI_AREA_LEN <= crate::linux::e820::HIGH_MEMORY) };
}

#[test]
fn pointers_chain_rsdp_xsdt_fadt_dsdt() {
    let t = tables(1);
    let addr_of = |sig: &[u8; 4]| {
        t.tables()
            .iter()
            .find(|i| &i.signature == sig)
            .unwrap()
            .addr
    };
    let rsdp = t.table(b"RSD ").unwrap();
    assert_eq!(u64_at(rsdp, 24), addr_of(b"XSDT"));
    let xsdt = t.table(b"XSDT").unwrap();
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    assert_eq!(
        entries,
        vec![addr_of(b"FACP"), addr_of(b"APIC"), addr_of(b"MCFG")]
    );
    let fadt = t.table(b"FACP").unwrap();
    assert_eq!(fadt.len(), 276, "FADT 6.x");
    assert_eq!(u64_at(fadt, 132), addr_of(b"FACS"), "X_FIRMWARE_CTRL");
    assert_eq!(u64_at(fadt, 140), addr_of(b"DSDT"), "X_DSDT");
    let flags = u32_at(fadt, 112);
    assert_eq!(
        flags & (1 << 20),
        0,
        "not hardware-reduced: Linux keeps the 8259s"
    );
    assert_ne!(flags & (1 << 10), 0, "reset register supported");
    assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), u16::from(SCI_IRQ));
    assert_eq!(
        u32_at(fadt, 48),
        0,
        "no SMI command port: always in ACPI mode"
    );
    assert_eq!(u32_at(fadt, 56), u32::from(PM_BASE), "PM1a_EVT_BLK");
    assert_eq!(u32_at(fadt, 64), u32::from(PM_BASE) + 4, "PM1a_CNT_BLK");
    assert_eq!(u32_at(fadt, 76), 0, "no PM timer");
    assert_eq!(
        (fadt[88], fadt[89], fadt[91]),
        (4, 2, 0),
        "PM1 lengths, no PM timer"
    );
    assert_eq!(fadt[128], RESET_REG.1);
    assert_eq!(u64_at(fadt, 116 + 4), u64::from(RESET_REG.0));
}

#[test]
fn madt_has_one_lapic_per_cpu_the_ioapic_and_overrides() {
    for cpus in [1usize, 2, 8] {
        let t = tables(cpus);
        let madt = t.table(b"APIC").unwrap();
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        let e = madt_entries(madt);
        let lapics: Vec<(u8, u8, u32)> = e
            .iter()
            .filter(|(k, _)| *k == 0)
            .map(|(_, b)| (b[1], b[2], u32_at(b, 3)))
            .collect();
        let want: Vec<(u8, u8, u32)> = (0..cpus as u8).map(|i| (i, i, 1)).collect();
        assert_eq!(lapics, want, "uid, APIC id, enabled");
        let ioapics: Vec<&Vec<u8>> = e.iter().filter(|(k, _)| *k == 1).map(|(_, b)| b).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(
            ioapics[0][1], cpus as u8,
            "I/O APIC id after the CPUs (as the MP table)"
        );
        assert_eq!(u32_at(ioapics[0], 3), IOAPIC_ADDR);
        assert_eq!(u32_at(ioapics[0], 7), 0, "GSI base");
        let isos: Vec<(u8, u32, u16)> = e
            .iter()
            .filter(|(k, _)| *k == 2)
            .map(|(_, b)| (b[2], u32_at(b, 3), u16::from_le_bytes([b[7], b[8]])))
            .collect();
        assert_eq!(
            isos,
            vec![(5, 5, 0xf), (9, 9, 0xf), (10, 10, 0xf), (11, 11, 0xf)],
            "the PIC INTx lines and the SCI: level, active low"
        );
        let nmis: Vec<&Vec<u8>> = e.iter().filter(|(k, _)| *k == 4).map(|(_, b)| b).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!((nmis[0][1], nmis[0][4]), (0xff, 1), "all CPUs, LINT1");
    }
}

#[test]
fn ioapic_routing_overrides_only_the_sci() {
    let cfg = AcpiConfig::new(1, IntxRouting::Ioapic).unwrap();
    assert_eq!(cfg.level_isa_lines(), vec![SCI_IRQ]);
    assert!(cfg.prt().iter().all(|(_, _, g)| (16..24).contains(g)));
}

#[test]
fn mcfg_describes_the_ecam_window() {
    let t = tables(1);
    let m = t.table(b"MCFG").unwrap();
    assert_eq!(m.len(), 44 + 16);
    assert_eq!(u64_at(m, 44), ECAM_BASE);
    assert_eq!(u16::from_le_bytes([m[52], m[53]]), 0, "segment");
    assert_eq!((m[54], m[55]), (0, ecam_last_bus()));
    assert_eq!(ecam_last_bus(), 0, "the VMM decodes bus 0 only");
}

#[test]
fn prt_matches_the_vmm_wiring() {
    let cfg = AcpiConfig::new(1, IntxRouting::Pic).unwrap();
    let prt = cfg.prt();
    assert_eq!(prt.len(), 31 * 4);
    assert!(
        prt.contains(&(1, 0, 11)),
        "00:01.0 INTA -> 11 as the e1000 gets today"
    );
    for (slot, pin, gsi) in &prt {
        assert_eq!(*gsi, IntxRouting::Pic.gsi(*slot, pin + 1));
    }
    // The AML holds each entry as Package {0xSSSSFFFF, pin, Zero, gsi}.
    let t = tables(1);
    let dsdt = t.table(b"DSDT").unwrap();
    for (slot, pin, gsi) in prt {
        // PackageOp, PkgLength, 4 elements, DWordPrefix + address, pin (ZeroOp,
        // OneOp or BytePrefix + value), ZeroOp, BytePrefix + GSI.
        let pin_aml = match pin {
            0 => vec![0x00],
            1 => vec![0x01],
            p => vec![0x0a, p],
        };
        let mut want = vec![0x12, 10 + pin_aml.len() as u8, 0x04, 0x0c];
        want.extend_from_slice(&((u32::from(slot) << 16) | 0xffff).to_le_bytes());
        want.extend_from_slice(&pin_aml);
        want.extend_from_slice(&[0x00, 0x0a, gsi as u8]);
        let found = dsdt.windows(want.len()).any(|w| w == want.as_slice());
        assert!(found, "no _PRT package for slot {slot} pin {pin} -> {gsi}");
    }
    for needle in [&b"PCI0"[..], b"MBRD", b"_PRT", b"_CRS", b"_S5_", b"_SB_"] {
        assert!(
            dsdt.windows(needle.len()).any(|w| w == needle),
            "{needle:?}"
        );
    }
}

#[test]
fn bad_inputs_are_refused() {
    assert_eq!(
        AcpiConfig::new(0, IntxRouting::Pic),
        Err(AcpiError::Cpus(0))
    );
    assert_eq!(
        AcpiConfig::new(255, IntxRouting::Pic),
        Err(AcpiError::Cpus(255))
    );
    assert!(AcpiConfig::new(254, IntxRouting::Pic).is_ok());
    let cfg = AcpiConfig::new(1, IntxRouting::Pic).unwrap();
    assert_eq!(
        AcpiTables::build(ACPI_BASE + 8, &cfg),
        Err(AcpiError::BadBase(ACPI_BASE + 8))
    );
    assert_eq!(
        AcpiTables::build(!63u64, &cfg),
        Err(AcpiError::BadBase(!63u64))
    );
    assert!(
        AcpiTables::build(0xffff_0000, &cfg).is_ok(),
        "ends exactly at 4 GiB"
    );
    // 254 CPUs still fit the area.
    let big =
        AcpiTables::build(ACPI_BASE, &AcpiConfig::new(254, IntxRouting::Pic).unwrap()).unwrap();
    assert!(big.bytes().len() as u64 <= ACPI_AREA_LEN);
}

#[test]
fn write_fails_cleanly_outside_guest_memory() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    let t = tables(1);
    assert!(matches!(
        t.write(&mem),
        Err(AcpiError::Write {
            addr: ACPI_BASE,
            ..
        })
    ));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    t.write(&mem).unwrap();
    let mut back = vec![0u8; t.bytes().len()];
    mem.read_slice(&mut back, GuestAddress(ACPI_BASE)).unwrap();
    assert_eq!(back, t.bytes());
}
