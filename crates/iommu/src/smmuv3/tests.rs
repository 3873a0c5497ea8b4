//! Whole-device tests: tables in a flat memory, programmed through MMIO.

use super::*;

const RAM: u64 = 0x4000_0000;
const STRTAB: u64 = RAM;
const CMDQ: u64 = RAM + 0x1_0000;
const EVTQ: u64 = RAM + 0x2_0000;
const CDS: u64 = RAM + 0x3_0000;
const SYNC_WORD: u64 = RAM + 0x3_f000;
const S1_RW: u64 = 3 | (1 << 10) | (1 << 6);
const S2_RW: u64 = 3 | (1 << 10) | (3 << 6);

struct Rig {
    mem: FlatMemory,
    smmu: Smmu,
    next_table: u64,
    cmd_prod: u32,
}

impl Rig {
    /// Linear stream table of 256 STEs, 64-entry queues, SMMU enabled.
    fn new() -> Self {
        let mut r = Rig {
            mem: FlatMemory::new(RAM, 0x40_0000),
            smmu: Smmu::new(),
            next_table: RAM + 0x10_0000,
            cmd_prod: 0,
        };
        r.w(regs::STRTAB_BASE, 8, STRTAB);
        r.w(regs::STRTAB_BASE_CFG, 4, 8);
        r.w(regs::CMDQ_BASE, 8, CMDQ | 6);
        r.w(regs::EVENTQ_BASE, 8, EVTQ | 6);
        r.w(
            regs::CR0,
            4,
            u64::from(regs::CR0_SMMUEN | regs::CR0_CMDQEN | regs::CR0_EVTQEN),
        );
        assert_eq!(r.smmu.read(regs::CR0ACK, 4), 0xd);
        r
    }
    fn w(&mut self, off: u64, size: u32, v: u64) {
        self.smmu.write(&self.mem, off, size, v);
    }
    fn alloc(&mut self) -> u64 {
        let a = self.next_table;
        self.next_table += 0x1000;
        a
    }
    fn ste(&self, sid: u32, d: [u64; 4]) {
        for (i, w) in d.iter().enumerate() {
            self.mem
                .write_u64(STRTAB + u64::from(sid) * 64 + i as u64 * 8, *w)
                .unwrap();
        }
    }
    fn cd(&self, addr: u64, ttb: u64, asid: u16, record: bool) {
        let d0 = 16
            | (1 << 31)
            | (1 << 41)
            | (5 << 32)
            | (u64::from(record) << 45)
            | (u64::from(asid) << 48);
        self.mem.write_u64(addr, d0).unwrap();
        self.mem.write_u64(addr + 8, ttb).unwrap();
    }
    /// Map `va` → `leaf` (a full level-3 descriptor) in a 4-level 4 KiB table.
    fn map(&mut self, root: u64, va: u64, leaf: u64) {
        let mut table = root;
        for level in 0..3 {
            let slot = table + ((va >> (39 - 9 * level)) & 0x1ff) * 8;
            let d = self.mem.read_u64(slot).unwrap();
            table = if d & 1 == 0 {
                let t = self.alloc();
                self.mem.write_u64(slot, t | 3).unwrap();
                t
            } else {
                d & 0xffff_ffff_f000
            };
        }
        self.mem
            .write_u64(table + ((va >> 12) & 0x1ff) * 8, leaf)
            .unwrap();
    }
    fn leaf_slot(&self, root: u64, va: u64) -> u64 {
        let mut table = root;
        for level in 0..3 {
            let d = self
                .mem
                .read_u64(table + ((va >> (39 - 9 * level)) & 0x1ff) * 8)
                .unwrap();
            table = d & 0xffff_ffff_f000;
        }
        table + ((va >> 12) & 0x1ff) * 8
    }
    fn cmd(&mut self, d0: u64, d1: u64) {
        let slot = CMDQ + u64::from(self.cmd_prod & 63) * 16;
        self.mem.write_u64(slot, d0).unwrap();
        self.mem.write_u64(slot + 8, d1).unwrap();
        self.cmd_prod = (self.cmd_prod + 1) & 127;
        let p = u64::from(self.cmd_prod);
        self.w(regs::CMDQ_PROD, 4, p);
    }
    fn dma(&mut self, sid: u32, addr: u64, write: bool) -> Result<Translation, TranslateError> {
        self.smmu.translate(
            &self.mem,
            Transaction {
                sid,
                ssid: None,
                addr,
                write,
            },
        )
    }
    fn events(&mut self) -> Vec<Event> {
        let prod = self.smmu.read(regs::EVENTQ_PROD, 4) as u32;
        let mut cons = self.smmu.read(regs::EVENTQ_CONS, 4) as u32;
        let mut out = Vec::new();
        while (prod & 127) != (cons & 127) {
            let mut rec = [0u8; 32];
            self.mem
                .read(EVTQ + u64::from(cons & 63) * 32, &mut rec)
                .unwrap();
            out.push(Event::decode(&rec));
            cons = (cons + 1) & 127;
        }
        self.w(regs::EVENTQ_CONS, 4, u64::from(cons));
        out
    }
    /// An S1-only stream `sid` with CD at CDS + sid*64, returning the table root.
    fn s1_stream(&mut self, sid: u32, asid: u16, record: bool) -> u64 {
        let root = self.alloc();
        let cd = CDS + u64::from(sid) * 64;
        self.cd(cd, root, asid, record);
        self.ste(sid, [1 | (5 << 1) | cd, 0, 0, 0]);
        root
    }
}

#[test]
fn reset_state_and_idrs() {
    let s = Smmu::new();
    assert_eq!(s.read(regs::IDR0, 4) & 3, 3, "S1P and S2P advertised");
    assert_eq!(s.read(regs::IDR0, 4) >> 27 & 3, 1, "2-level stream tables");
    assert_eq!(s.read(regs::IDR1, 4) & 0x3f, 16);
    assert_eq!(s.read(regs::IDR5, 4) & 7, 5, "48-bit OAS");
    assert_eq!(s.read(regs::CR0ACK, 4), 0);
    assert_eq!(s.read(regs::GERROR, 4), 0);
    // Disabled with GBPA = 0: bypass; with GBPA.ABORT: abort without event.
    let mem = FlatMemory::new(RAM, 0x1000);
    let mut s = Smmu::new();
    let t = Transaction {
        sid: 1,
        ssid: None,
        addr: 0x1234,
        write: true,
    };
    assert_eq!(s.translate(&mem, t).unwrap().addr, 0x1234);
    s.write(&mem, regs::GBPA, 4, u64::from(regs::GBPA_ABORT));
    assert_eq!(s.read(regs::GBPA, 4), 0, "GBPA changes only with UPDATE");
    s.write(
        &mem,
        regs::GBPA,
        4,
        u64::from(regs::GBPA_ABORT | regs::GBPA_UPDATE),
    );
    assert_eq!(s.read(regs::GBPA, 4), u64::from(regs::GBPA_ABORT));
    assert_eq!(s.translate(&mem, t), Err(TranslateError::Aborted));
}

#[test]
fn stage1_translation_and_translation_fault_event() {
    let mut r = Rig::new();
    let root = r.s1_stream(0x10, 7, true);
    r.map(root, 0x8000_1000, 0x4020_0000 | S1_RW);
    let tr = r.dma(0x10, 0x8000_1234, true).unwrap();
    assert_eq!(tr.addr, 0x4020_0234);
    assert_eq!(tr.size_bits, 12);
    // Unmapped IOVA: F_TRANSLATION with the SID, IOVA and direction.
    match r.dma(0x10, 0x8000_2008, false) {
        Err(TranslateError::Fault { event, recorded }) => {
            assert!(recorded);
            assert_eq!(event.code, evtq::code::F_TRANSLATION);
        }
        other => panic!("{other:?}"),
    }
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].code, evtq::code::F_TRANSLATION);
    assert_eq!(ev[0].sid, 0x10);
    assert_eq!(ev[0].input_addr, 0x8000_2008);
    assert!(ev[0].read);
    assert!(!ev[0].s2);
    assert_eq!(
        ev[0].class,
        FaultClass::Cd,
        "CLASS is 0 in a stage-1 fault record"
    );
}

#[test]
fn stage1_faults_are_recorded_only_with_cd_r() {
    let mut r = Rig::new();
    let root = r.s1_stream(3, 1, false);
    r.map(root, 0x1000, 0x4020_0000 | S1_RW | (1 << 7)); // read-only
    assert!(r.dma(3, 0x1000, false).is_ok());
    match r.dma(3, 0x1000, true) {
        Err(TranslateError::Fault { event, recorded }) => {
            assert_eq!(event.code, evtq::code::F_PERMISSION);
            assert!(!recorded);
        }
        other => panic!("{other:?}"),
    }
    assert!(r.events().is_empty());
}

#[test]
fn config_cache_needs_cfgi_and_iotlb_needs_tlbi() {
    let mut r = Rig::new();
    let root = r.s1_stream(5, 9, true);
    r.map(root, 0x2000, 0x4030_0000 | S1_RW);
    assert_eq!(r.dma(5, 0x2000, false).unwrap().addr, 0x4030_0000);
    // Clear the PTE: the IOTLB still has it until TLBI_NH_VA + SYNC.
    let slot = r.leaf_slot(root, 0x2000);
    r.mem.write_u64(slot, 0).unwrap();
    assert_eq!(r.dma(5, 0x2000, false).unwrap().addr, 0x4030_0000);
    // TLBI for another ASID does nothing.
    r.cmd(0x12 | (8u64 << 48), 0x2000);
    assert!(r.dma(5, 0x2000, false).is_ok());
    r.cmd(0x12 | (9u64 << 48), 0x2000);
    r.cmd(0x46, 0);
    assert!(r.dma(5, 0x2000, false).is_err());
    // Turn the STE into abort: still the cached config until CFGI_STE.
    r.map(root, 0x2000, 0x4030_0000 | S1_RW);
    r.ste(5, [1, 0, 0, 0]);
    assert!(r.dma(5, 0x2000, false).is_ok());
    r.cmd(0x03 | (5u64 << 32), 0);
    assert_eq!(r.dma(5, 0x2000, false), Err(TranslateError::Aborted));
    assert_eq!(r.smmu.read(regs::CMDQ_CONS, 4), 4);
}

#[test]
fn illegal_command_stops_the_queue_until_gerrorn_ack() {
    let mut r = Rig::new();
    r.cmd(0x46 | (1 << 12) | (0x55u64 << 32), SYNC_WORD);
    assert_eq!(r.mem.read_u64(SYNC_WORD).unwrap() as u32, 0x55);
    r.cmd(0xff, 0); // illegal
    r.cmd(0x46 | (1 << 12) | (0x66u64 << 32), SYNC_WORD);
    let cons = r.smmu.read(regs::CMDQ_CONS, 4) as u32;
    assert_eq!(cons & 0xff, 1, "CONS stops at the illegal command");
    assert_eq!(cons >> 24, regs::CERROR_ILL);
    let gerror = r.smmu.read(regs::GERROR, 4) as u32;
    assert_eq!(gerror & regs::GERROR_CMDQ_ERR, regs::GERROR_CMDQ_ERR);
    assert_eq!(r.mem.read_u64(SYNC_WORD).unwrap() as u32, 0x55);
    // Software replaces the bad command with a no-op and acknowledges.
    r.mem.write_u64(CMDQ + 16, 0x01).unwrap();
    r.w(regs::GERRORN, 4, u64::from(gerror));
    assert_eq!(
        r.smmu.read(regs::CMDQ_CONS, 4) & 0xff,
        3,
        "resumed; ERR keeps the last code"
    );
    assert_eq!(r.mem.read_u64(SYNC_WORD).unwrap() as u32, 0x66);
    assert_eq!(r.mem.take_msis().len(), 2);
}

#[test]
fn bad_ste_and_bad_streamid_events() {
    let mut r = Rig::new();
    r.ste(1, [0, 0, 0, 0]);
    assert!(r.dma(1, 0, false).is_err());
    assert!(r.dma(300, 0, false).is_err()); // LOG2SIZE 8
    let ev = r.events();
    assert_eq!(
        ev.iter().map(|e| (e.code, e.sid)).collect::<Vec<_>>(),
        vec![
            (evtq::code::C_BAD_STE, 1),
            (evtq::code::C_BAD_STREAMID, 300)
        ]
    );
}

#[test]
fn event_queue_overflow_sets_ovflg_and_loses_records() {
    let mut r = Rig::new();
    r.ste(1, [0, 0, 0, 0]);
    for _ in 0..70 {
        let _ = r.dma(1, 0, false);
    }
    let prod = r.smmu.read(regs::EVENTQ_PROD, 4) as u32;
    assert_eq!(prod & regs::EVENTQ_OVFLG, regs::EVENTQ_OVFLG);
    assert_eq!(prod & 127, 64, "full: PROD one lap ahead of CONS");
    assert_eq!(r.smmu.stats().events, 64);
    assert_eq!(r.smmu.stats().events_lost, 6);
}

#[test]
fn event_irq_by_msi() {
    let mut r = Rig::new();
    r.w(regs::EVENTQ_IRQ_CFG0, 8, 0x0800_0040);
    r.w(regs::EVENTQ_IRQ_CFG1, 4, 0x21);
    r.w(regs::IRQ_CTRL, 4, u64::from(regs::IRQ_CTRL_EVTQ_EN));
    assert_eq!(r.smmu.read(regs::IRQ_CTRLACK, 4), 4);
    r.ste(1, [0, 0, 0, 0]);
    let _ = r.dma(1, 0, false);
    assert_eq!(r.mem.take_msis(), vec![(0x0800_0040, 0x21)]);
}

/// STE for stage 2 with a 40-bit IPA at level 1 (two concatenated tables).
fn s2_dwords(config: u64, s1: u64, vmid: u16, ttb: u64) -> [u64; 4] {
    let vtcr: u64 = 24 | (1 << 6) | (5 << 16);
    [
        1 | (config << 1) | s1,
        0,
        (vtcr << 32) | (1 << 51) | (1 << 58) | u64::from(vmid),
        ttb,
    ]
}

impl Rig {
    /// Map IPA → PA in a stage-2 table rooted at `root` (40-bit IPA, level 1 start).
    fn map_s2(&mut self, root: u64, ipa: u64, leaf: u64) {
        let l1 = root + ((ipa >> 30) & 0x3ff) * 8;
        let mut d = self.mem.read_u64(l1).unwrap();
        if d & 1 == 0 {
            d = self.alloc() | 3;
            self.mem.write_u64(l1, d).unwrap();
        }
        let l2 = (d & 0xffff_ffff_f000) + ((ipa >> 21) & 0x1ff) * 8;
        let mut d = self.mem.read_u64(l2).unwrap();
        if d & 1 == 0 {
            d = self.alloc() | 3;
            self.mem.write_u64(l2, d).unwrap();
        }
        self.mem
            .write_u64((d & 0xffff_ffff_f000) + ((ipa >> 12) & 0x1ff) * 8, leaf)
            .unwrap();
    }
    fn alloc2(&mut self) -> u64 {
        // 8 KiB-aligned pair for the concatenated level-1 tables.
        self.next_table = (self.next_table + 0x1fff) & !0x1fff;
        let a = self.next_table;
        self.next_table += 0x2000;
        a
    }
}

#[test]
fn stage2_only_translation_and_fault_with_ipa() {
    let mut r = Rig::new();
    let s2root = r.alloc2();
    r.ste(2, s2_dwords(0b110, 0, 4, s2root));
    r.map_s2(s2root, 0x1_0000_5000, 0x4021_0000 | S2_RW);
    assert_eq!(r.dma(2, 0x1_0000_5010, true).unwrap().addr, 0x4021_0010);
    assert!(r.dma(2, 0x1_0000_6000, true).is_err());
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert!(ev[0].s2 && !ev[0].read);
    assert_eq!(ev[0].input_addr, 0x1_0000_6000);
    assert_eq!(ev[0].addr2, 0x1_0000_6000);
    // TLBI_S2_IPA drops the entry.
    let slot_ipa = 0x1_0000_5000u64;
    r.map_s2(s2root, slot_ipa, 0);
    assert!(r.dma(2, 0x1_0000_5010, true).is_ok(), "cached");
    r.cmd(0x2a | (4u64 << 32), slot_ipa);
    assert!(r.dma(2, 0x1_0000_5010, true).is_err());
}

#[test]
fn nested_translation_composes_and_reports_ttd_faults() {
    let mut r = Rig::new();
    let s2root = r.alloc2();
    // Guest "IPA space": identity-ish at +1 GiB offset from PA for a few pages.
    let ipa_of = |pa: u64| pa + 0x10_0000_0000;
    let cd_pa = CDS + 0x800;
    let s1root_pa = r.alloc();
    r.map_s2(s2root, ipa_of(cd_pa) & !0xfff, (cd_pa & !0xfff) | S2_RW);
    r.cd(cd_pa, ipa_of(s1root_pa), 3, true);
    r.ste(6, s2_dwords(0b111, ipa_of(cd_pa), 2, s2root));
    // Stage-1 tables are built in PA but their pointers are IPAs.
    let mut table_pa = s1root_pa;
    r.map_s2(s2root, ipa_of(table_pa), table_pa | S2_RW);
    let va = 0x7000u64;
    for level in 0..3 {
        let next = r.alloc();
        r.map_s2(s2root, ipa_of(next), next | S2_RW);
        r.mem
            .write_u64(
                table_pa + ((va >> (39 - 9 * level)) & 0x1ff) * 8,
                ipa_of(next) | 3,
            )
            .unwrap();
        table_pa = next;
    }
    let data_ipa = 0x20_0000_0000u64;
    r.mem
        .write_u64(table_pa + ((va >> 12) & 0x1ff) * 8, data_ipa | S1_RW)
        .unwrap();
    r.map_s2(s2root, data_ipa, 0x4025_0000 | S2_RW);
    let tr = r.dma(6, va + 0x18, true).unwrap();
    assert_eq!(tr.addr, 0x4025_0018);
    // A stage-1 table that stage 2 does not map: S2 fault, CLASS TTD, IPA of it.
    let bad_ipa = 0x30_0000_0000u64;
    r.mem
        .write_u64(table_pa + ((0x8000u64 >> 12) & 0x1ff) * 8, 0)
        .unwrap();
    let l2_slot_va = 0x20_0000u64; // a new level-2 slot: point it at an unmapped IPA
    let l1_table = {
        let d0 = r.mem.read_u64(s1root_pa).unwrap();
        let l1_ipa = d0 & 0xffff_ffff_f000;
        l1_ipa - 0x10_0000_0000
    };
    let l2_table = r.mem.read_u64(l1_table).unwrap() & 0xffff_ffff_f000;
    r.mem
        .write_u64(l2_table - 0x10_0000_0000 + 8, bad_ipa | 3)
        .unwrap();
    assert!(r.dma(6, l2_slot_va, false).is_err());
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].code, evtq::code::F_TRANSLATION);
    assert!(ev[0].s2);
    assert_eq!(ev[0].class, FaultClass::Ttd);
    assert_eq!(ev[0].addr2, bad_ipa);
    assert_eq!(ev[0].input_addr, l2_slot_va);
    // TLBI_S12_VMALL for VMID 2 drops the nested entry.
    assert!(r.smmu.iotlb().count_vmid(2) > 0);
    r.cmd(0x28 | (2u64 << 32), 0);
    assert_eq!(r.smmu.iotlb().count_vmid(2), 0);
}

#[test]
fn substreams_two_level_cd_table() {
    let mut r = Rig::new();
    let l1 = r.alloc();
    let l2 = r.alloc();
    r.mem.write_u64(l1, l2 | 1).unwrap(); // SSIDs 0..63
    let root = r.alloc();
    r.cd(l2 + 5 * 64, root, 0x77, true);
    r.map(root, 0x3000, 0x4026_0000 | S1_RW);
    // S1Fmt 1 (4K leaves), S1CDMax 8, S1DSS terminate.
    r.ste(9, [1 | (5 << 1) | (1 << 4) | l1 | (8u64 << 59), 0, 0, 0]);
    let t = |ssid| Transaction {
        sid: 9,
        ssid,
        addr: 0x3000,
        write: false,
    };
    assert_eq!(
        r.smmu.translate(&r.mem, t(Some(5))).unwrap().addr,
        0x4026_0000
    );
    assert!(r.smmu.translate(&r.mem, t(None)).is_err()); // F_STREAM_DISABLED
    assert!(r.smmu.translate(&r.mem, t(Some(64))).is_err()); // L1 entry 1 invalid
    assert!(r.smmu.translate(&r.mem, t(Some(6))).is_err()); // CD V=0
    let codes: Vec<_> = r.events().iter().map(|e| (e.code, e.ssid)).collect();
    assert_eq!(
        codes,
        vec![
            (evtq::code::F_STREAM_DISABLED, None),
            (evtq::code::C_BAD_SUBSTREAMID, Some(64)),
            (evtq::code::C_BAD_CD, Some(6)),
        ]
    );
}

#[test]
fn two_level_stream_table_via_mmio() {
    let mut r = Rig::new();
    let l2 = r.alloc();
    // 16-bit SIDs, SPLIT 8, 2-level; L1[1] covers SIDs 0x100.. with span 9 (256 STEs).
    r.mem.write_u64(STRTAB + 8, l2 | 9).unwrap();
    r.w(regs::CR0, 4, u64::from(regs::CR0_CMDQEN | regs::CR0_EVTQEN));
    r.w(regs::STRTAB_BASE_CFG, 4, 16 | (8 << 6) | (1 << 16));
    r.w(
        regs::CR0,
        4,
        u64::from(regs::CR0_SMMUEN | regs::CR0_CMDQEN | regs::CR0_EVTQEN),
    );
    r.mem.write_u64(l2 + 0x23 * 64, 1 | (4 << 1)).unwrap(); // bypass
    assert_eq!(r.dma(0x123, 0xabc, true).unwrap().addr, 0xabc);
    assert!(r.dma(0x223, 0xabc, true).is_err());
    assert_eq!(r.events()[0].code, evtq::code::C_BAD_STREAMID);
}

#[test]
fn probe_has_no_side_effects() {
    let mut r = Rig::new();
    let root = r.s1_stream(4, 1, true);
    r.map(root, 0x1000, 0x4027_0000 | S1_RW);
    let t = Transaction {
        sid: 4,
        ssid: None,
        addr: 0x1000,
        write: true,
    };
    assert_eq!(r.smmu.probe(&r.mem, t).unwrap().addr, 0x4027_0000);
    assert!(r
        .smmu
        .probe(&r.mem, Transaction { addr: 0x9000, ..t })
        .is_err());
    assert!(r.smmu.iotlb().is_empty());
    assert!(r.events().is_empty());
}

#[test]
fn stream_view_of_s1_s2_nested_bypass() {
    let mut r = Rig::new();
    // S1 only.
    let root = r.s1_stream(4, 1, true);
    r.map(root, 0x1000, 0x4027_0000 | S1_RW);
    r.map(root, 0x5000, 0x4028_0000 | S1_RW | (1 << 7));
    match r.smmu.stream_view(&r.mem, 4, 100).unwrap() {
        StreamView::Mapped(e) => {
            let v: Vec<_> = e
                .iter()
                .map(|e| (e.input, e.output, e.size_bits, e.perm.write))
                .collect();
            assert_eq!(
                v,
                vec![
                    (0x1000, 0x4027_0000, 12, true),
                    (0x5000, 0x4028_0000, 12, false)
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    // S2 only: one IPA page.
    let s2root = r.alloc2();
    r.ste(2, s2_dwords(0b110, 0, 4, s2root));
    r.map_s2(s2root, 0x1_0000_5000, 0x4021_0000 | S2_RW);
    match r.smmu.stream_view(&r.mem, 2, 100).unwrap() {
        StreamView::Mapped(e) => {
            assert_eq!(e.len(), 1);
            assert_eq!((e[0].input, e[0].output), (0x1_0000_5000, 0x4021_0000));
        }
        other => panic!("{other:?}"),
    }
    // Nested: S1 tables, CD and data through S2 at +64 GiB.
    let s2n = r.alloc2();
    let off = 0x10_0000_0000u64;
    let cd_pa = CDS + 0xc00;
    r.map_s2(s2n, (cd_pa + off) & !0xfff, (cd_pa & !0xfff) | S2_RW);
    let s1root = r.alloc();
    r.cd(cd_pa, s1root + off, 3, true);
    r.ste(7, s2_dwords(0b111, cd_pa + off, 5, s2n));
    let mut table = s1root;
    r.map_s2(s2n, table + off, table | S2_RW);
    for level in 0..3 {
        let next = r.alloc();
        r.map_s2(s2n, next + off, next | S2_RW);
        r.mem
            .write_u64(
                table + ((0x3000u64 >> (39 - 9 * level)) & 0x1ff) * 8,
                (next + off) | 3,
            )
            .unwrap();
        table = next;
    }
    r.mem
        .write_u64(table + 3 * 8, 0x20_0000_0000 | S1_RW)
        .unwrap();
    r.map_s2(s2n, 0x20_0000_0000, 0x4029_0000 | (1 << 10) | 3 | (1 << 6)); // S2 read-only
    match r.smmu.stream_view(&r.mem, 7, 100).unwrap() {
        StreamView::Mapped(e) => {
            assert_eq!(e.len(), 1);
            assert_eq!((e[0].input, e[0].output), (0x3000, 0x4029_0000));
            assert!(e[0].perm.read && !e[0].perm.write);
        }
        other => panic!("{other:?}"),
    }
    // Abort STE and bypass STE.
    r.ste(8, [1, 0, 0, 0]);
    assert_eq!(
        r.smmu.stream_view(&r.mem, 8, 100).unwrap(),
        StreamView::Mapped(vec![])
    );
    r.ste(8, [1 | (4 << 1), 0, 0, 0]);
    assert_eq!(
        r.smmu.stream_view(&r.mem, 8, 100).unwrap(),
        StreamView::Bypass
    );
    // SMMU disabled: bypass unless GBPA.ABORT.
    r.w(regs::CR0, 4, 0);
    assert_eq!(
        r.smmu.stream_view(&r.mem, 4, 100).unwrap(),
        StreamView::Bypass
    );
}
