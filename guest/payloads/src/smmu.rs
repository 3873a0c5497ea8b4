//! A minimal guest-side SMMUv3 driver for payloads (included by `#[path]`).
//!
//! It programs what a real OS driver does for one device: a linear stream table of
//! 256 STEs (stream ID = PCI requester ID on bus 0), one stage-1 STE pointing at one
//! CD (ASID 1, T0SZ 16, 4 KiB granule, 4 levels), a command queue and an event queue
//! of 16 entries, then CFGI_ALL + TLBI_NSNH_ALL + CMD_SYNC and SMMUEN. Pages are
//! mapped at `IOVA = IOVA_BASE + GPA` (IOVA ≠ GPA: a device that ignored the SMMU
//! would DMA outside RAM); an unmap clears the leaf and issues TLBI_NH_VA + CMD_SYNC,
//! polling CMDQ_CONS for completion. Every table lives in this payload's statics
//! (identity-mapped, so their addresses are guest-physical).

use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use nestio_guest::io::{mmio_read32, mmio_write32};

/// Where the payload's pages appear to the device.
pub const IOVA_BASE: u64 = 0x80_0000_0000;
/// The IOVA of the MSI doorbell page (mapped to 0xFEE0_0000 by [`Smmu::map_at`]):
/// in the first GiB above `IOVA_BASE`, so it shares the L1/L2 tables.
pub const MSI_IOVA: u64 = IOVA_BASE + 0x3fe0_0000;

const CR0: u64 = 0x20;
const CR0ACK: u64 = 0x24;
const STRTAB_BASE: u64 = 0x80;
const STRTAB_BASE_CFG: u64 = 0x88;
const CMDQ_BASE: u64 = 0x90;
const CMDQ_PROD: u64 = 0x98;
const CMDQ_CONS: u64 = 0x9c;
const EVENTQ_BASE: u64 = 0xa0;
const EVENTQ_PROD: u64 = 0x100a8;
const EVENTQ_CONS: u64 = 0x100ac;
const GERROR: u64 = 0x60;
/// Valid + page/table, AF, AP[1] (unprivileged access), read-write.
const PTE_RW: u64 = 3 | (1 << 10) | (1 << 6);
const L3_TABLES: usize = 4;

#[repr(C, align(4096))]
struct Page([u64; 512]);
#[repr(C, align(4096))]
struct StreamTable([[u64; 8]; 256]);

static mut STRTAB: StreamTable = StreamTable([[0; 8]; 256]);
static mut CMDQ: Page = Page([0; 512]);
static mut EVTQ: Page = Page([0; 512]);
static mut CD: Page = Page([0; 512]);
static mut L0: Page = Page([0; 512]);
static mut L1: Page = Page([0; 512]);
static mut L2: Page = Page([0; 512]);
static mut L3: [Page; L3_TABLES] = [const { Page([0; 512]) }; L3_TABLES];

fn w64(base: u64, off: u64, v: u64) {
    mmio_write32(base + off, v as u32);
    mmio_write32(base + off + 4, (v >> 32) as u32);
}

/// An event record read back from the event queue.
pub struct Event {
    /// Event type.
    pub code: u8,
    /// Stream ID.
    pub sid: u32,
    /// Input address.
    pub iova: u64,
    /// The transaction was a read.
    pub read: bool,
}

/// The programmed SMMU.
pub struct Smmu {
    base: u64,
    prod: u32,
    evt_cons: u32,
    /// L2 index each L3 table serves (u64::MAX: free).
    l3_of: [u64; L3_TABLES],
    /// [`Smmu::map`] invalidates after mapping (a shadowing VMM needs it).
    inval_on_map: bool,
}

impl Smmu {
    /// Program the SMMU at `base` to translate stream `sid` through this payload's
    /// stage-1 tables (initially empty).
    pub fn init(base: u64, sid: u16) -> Result<Smmu, &'static str> {
        if mmio_read32(base) & 2 == 0 {
            return Err("IDR0.S1P clear: no stage 1");
        }
        // SAFETY: single-threaded set-up of this module's statics; the device reads
        // them only after the registers below point at them.
        unsafe {
            let cd = addr_of_mut!(CD) as u64;
            let l0 = addr_of_mut!(L0) as u64;
            let l1 = addr_of_mut!(L1) as u64;
            let l2 = addr_of_mut!(L2) as u64;
            let cdp = addr_of_mut!(CD.0) as *mut u64;
            // CD: T0SZ 16, EPD1, V, IPS 48 bits, AA64, R, A, ASID 1; TTB0.
            write_volatile(
                cdp,
                16 | (1 << 30)
                    | (1 << 31)
                    | (5 << 32)
                    | (1 << 41)
                    | (1 << 45)
                    | (1 << 46)
                    | (1 << 48),
            );
            write_volatile(cdp.add(1), l0);
            let i0 = ((IOVA_BASE >> 39) & 0x1ff) as usize;
            write_volatile(addr_of_mut!(L0.0[i0]), l1 | 3);
            write_volatile(addr_of_mut!(L1.0[0]), l2 | 3);
            let ste = addr_of_mut!(STRTAB.0[usize::from(sid & 0xff)]) as *mut u64;
            // STE: V, Config = S1 translate, bypass S2; S1ContextPtr.
            write_volatile(ste, 1 | (0b101 << 1) | cd);
            w64(base, STRTAB_BASE, addr_of_mut!(STRTAB) as u64);
            mmio_write32(base + STRTAB_BASE_CFG, 8);
            w64(base, CMDQ_BASE, addr_of_mut!(CMDQ) as u64 | 4);
            w64(base, EVENTQ_BASE, addr_of_mut!(EVTQ) as u64 | 4);
        }
        mmio_write32(base + CMDQ_PROD, 0);
        mmio_write32(base + CMDQ_CONS, 0);
        mmio_write32(base + EVENTQ_PROD, 0);
        mmio_write32(base + EVENTQ_CONS, 0);
        mmio_write32(base + CR0, 0xc); // CMDQEN | EVTQEN
        if mmio_read32(base + CR0ACK) != 0xc {
            return Err("CR0ACK does not acknowledge the queues");
        }
        let mut s = Smmu {
            base,
            prod: 0,
            evt_cons: 0,
            l3_of: [u64::MAX; L3_TABLES],
            inval_on_map: true,
        };
        s.cmd(0x4, 31)?; // CFGI_ALL (CFGI_STE_RANGE, Range 31)
        s.cmd(0x30, 0)?; // TLBI_NSNH_ALL
        s.sync()?;
        mmio_write32(base + CR0, 0xd);
        if mmio_read32(base + CR0ACK) != 0xd {
            return Err("CR0ACK does not acknowledge SMMUEN");
        }
        Ok(s)
    }

    fn cmd(&mut self, d0: u64, d1: u64) -> Result<(), &'static str> {
        let i = (self.prod & 15) as usize;
        // SAFETY: slot i of the command queue; the SMMU reads it after PROD moves.
        unsafe {
            write_volatile(addr_of_mut!(CMDQ.0[2 * i]), d0);
            write_volatile(addr_of_mut!(CMDQ.0[2 * i + 1]), d1);
        }
        self.prod = (self.prod + 1) & 31;
        mmio_write32(self.base + CMDQ_PROD, self.prod);
        Ok(())
    }

    /// CMD_SYNC, completion by polling CMDQ_CONS.
    fn sync(&mut self) -> Result<(), &'static str> {
        self.cmd(0x46, 0)?;
        for _ in 0..100_000 {
            let cons = mmio_read32(self.base + CMDQ_CONS);
            if cons & 31 == self.prod {
                return Ok(());
            }
            if mmio_read32(self.base + GERROR) & 1 != 0 {
                return Err("command error (GERROR.CMDQ_ERR)");
            }
        }
        Err("CMD_SYNC did not complete")
    }

    fn l3_for(&mut self, iova: u64) -> Result<*mut u64, &'static str> {
        let l2i = (iova >> 21) & 0x1ff;
        let slot = match self.l3_of.iter().position(|&x| x == l2i) {
            Some(s) => s,
            None => {
                let s = self
                    .l3_of
                    .iter()
                    .position(|&x| x == u64::MAX)
                    .ok_or("out of L3 tables")?;
                self.l3_of[s] = l2i;
                // SAFETY: table s is ours; publish it in L2 before any leaf is used.
                unsafe {
                    let t = addr_of_mut!(L3[s]) as u64;
                    write_volatile(addr_of_mut!(L2.0[l2i as usize]), t | 3);
                }
                s
            }
        };
        // SAFETY: entry of table `slot`.
        Ok(unsafe { addr_of_mut!(L3[slot].0[((iova >> 12) & 0x1ff) as usize]) })
    }

    /// Whether [`Smmu::map`] / [`Smmu::map_at`] invalidate after mapping (default
    /// on). Off is what Linux does: correct on hardware, and on a nested vIOMMU
    /// (the device walks the live tables), invisible to a shadowing one.
    pub fn set_invalidate_on_map(&mut self, on: bool) {
        self.inval_on_map = on;
    }

    /// Map guest-physical `gpa..gpa + len` (whole pages) read-write at
    /// `IOVA_BASE + gpa`, then issue TLBI_NH_ASID + CMD_SYNC. The architecture does
    /// not need that (invalid entries are never cached, and Linux does not do it);
    /// a shadowing VMM does: it learns of a new mapping only from a command. That is
    /// the requirement shadow mode puts on the guest (VT-d makes it architectural with
    /// its caching mode; SMMUv3 has no such bit, which is why nested mode exists).
    pub fn map(&mut self, gpa: u64, len: u64) -> Result<(), &'static str> {
        let mut p = gpa & !0xfff;
        while p < gpa + len {
            let e = self.l3_for(IOVA_BASE + p)?;
            // SAFETY: a leaf of our table.
            unsafe { write_volatile(e, p | PTE_RW) };
            p += 0x1000;
        }
        if !self.inval_on_map {
            return Ok(());
        }
        self.cmd(0x11 | (1 << 48), 0)?; // TLBI_NH_ASID 1
        self.sync()
    }

    /// Map the page at `iova` (in the first GiB above `IOVA_BASE`) to physical page
    /// `pa` read-write, then TLBI_NH_ASID + CMD_SYNC (see [`Smmu::map`]).
    pub fn map_at(&mut self, iova: u64, pa: u64) -> Result<(), &'static str> {
        if iova.wrapping_sub(IOVA_BASE) >> 30 != 0 {
            return Err("IOVA outside the first GiB above IOVA_BASE");
        }
        let e = self.l3_for(iova)?;
        // SAFETY: a leaf of our table.
        unsafe { write_volatile(e, (pa & !0xfff) | PTE_RW) };
        if !self.inval_on_map {
            return Ok(());
        }
        self.cmd(0x11 | (1 << 48), 0)?;
        self.sync()
    }

    /// Unmap the page of `iova` and invalidate it (TLBI_NH_VA + CMD_SYNC).
    pub fn unmap_page(&mut self, iova: u64) -> Result<(), &'static str> {
        self.set_leaf(iova, 0)
    }

    /// Make the page of `iova` read-only for the device (AP[2]) and invalidate it.
    pub fn protect_page(&mut self, iova: u64) -> Result<(), &'static str> {
        let e = self.l3_for(iova)?;
        // SAFETY: a leaf of our table.
        let old = unsafe { read_volatile(e) };
        if old & 1 == 0 {
            return Err("page not mapped");
        }
        self.set_leaf(iova, old | (1 << 7))
    }

    fn set_leaf(&mut self, iova: u64, v: u64) -> Result<(), &'static str> {
        let e = self.l3_for(iova)?;
        // SAFETY: a leaf of our table.
        unsafe { write_volatile(e, v) };
        self.cmd(0x12 | (1 << 48), iova & !0xfff)?;
        self.sync()
    }

    /// The next unread event record, if any.
    pub fn next_event(&mut self) -> Option<Event> {
        let prod = mmio_read32(self.base + EVENTQ_PROD) & 31;
        if prod == self.evt_cons {
            return None;
        }
        let i = (self.evt_cons & 15) as usize;
        // SAFETY: record i, written by the SMMU before it moved PROD.
        let (d0, d1, d2) = unsafe {
            (
                read_volatile(addr_of_mut!(EVTQ.0[4 * i])),
                read_volatile(addr_of_mut!(EVTQ.0[4 * i + 1])),
                read_volatile(addr_of_mut!(EVTQ.0[4 * i + 2])),
            )
        };
        self.evt_cons = (self.evt_cons + 1) & 31;
        mmio_write32(self.base + EVENTQ_CONS, self.evt_cons);
        Some(Event {
            code: d0 as u8,
            sid: (d0 >> 32) as u32,
            iova: d2,
            read: d1 & (1 << 35) != 0,
        })
    }
}

/// Parse a `0x`-hex or decimal command-line value.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}
