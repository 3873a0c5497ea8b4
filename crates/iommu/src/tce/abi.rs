//! The guest ABI: hypercall and RTAS arguments decoded into typed calls, run on a
//! [`Pe`], and the outcome encoded as PAPR return codes / RTAS output cells.
//!
//! Everything here takes hostile input: any opcode and nine arbitrary 64-bit
//! arguments, any RTAS cell count; nothing panics, every failure is a PAPR code. The
//! layouts (LoPAPR; QEMU `spapr_rtas_ddw.c` answers the same):
//!
//! | call | arguments | outputs after the status |
//! |---|---|---|
//! | `H_PUT_TCE` 0x20 | liobn, ioba, tce | — |
//! | `H_GET_TCE` 0x1C | liobn, ioba | tce |
//! | `H_PUT_TCE_INDIRECT` 0x13C | liobn, ioba, list (4K-aligned gpa of BE u64s), n ≤ 512 | — |
//! | `H_STUFF_TCE` 0x138 | liobn, ioba, tce, n | — |
//! | `ibm,query-pe-dma-window` | config_addr, buid_hi, buid_lo (3) | 4 or 5: available, largest block (1 or 2 cells), page mask, migration (0) |
//! | `ibm,create-pe-dma-window` | config_addr, buid_hi, buid_lo, page_shift, window_shift (5) | 3: liobn, start_hi, start_lo |
//! | `ibm,remove-pe-dma-window` | liobn (1) | 0 |
//! | `ibm,reset-pe-dma-window` | config_addr, buid_hi, buid_lo (3) | 0 |
//!
//! RTAS statuses: 0 success, -3 parameter error (bad cell counts, unknown BUID/LIOBN,
//! page size not offered, window smaller than a page), -1 hardware error (no free
//! window, the device's DMA mask cannot reach the window, table budget).

use super::pe::{Pe, TceUpdate, MAX_INDIRECT};
use super::TceError;

/// `H_GET_TCE`.
pub const H_GET_TCE: u64 = 0x1C;
/// `H_PUT_TCE`.
pub const H_PUT_TCE: u64 = 0x20;
/// `H_STUFF_TCE`.
pub const H_STUFF_TCE: u64 = 0x138;
/// `H_PUT_TCE_INDIRECT`.
pub const H_PUT_TCE_INDIRECT: u64 = 0x13C;

/// `H_SUCCESS`.
pub const H_SUCCESS: i64 = 0;
/// `H_HARDWARE`.
pub const H_HARDWARE: i64 = -1;
/// `H_FUNCTION`.
pub const H_FUNCTION: i64 = -2;
/// `H_PARAMETER`.
pub const H_PARAMETER: i64 = -4;

/// RTAS success.
pub const RTAS_SUCCESS: i32 = 0;
/// RTAS hardware error.
pub const RTAS_HW_ERROR: i32 = -1;
/// RTAS parameter error.
pub const RTAS_PARAM_ERROR: i32 = -3;

/// RTAS call names.
pub const RTAS_QUERY: &str = "ibm,query-pe-dma-window";
/// See [`RTAS_QUERY`].
pub const RTAS_CREATE: &str = "ibm,create-pe-dma-window";
/// See [`RTAS_QUERY`].
pub const RTAS_REMOVE: &str = "ibm,remove-pe-dma-window";
/// See [`RTAS_QUERY`].
pub const RTAS_RESET: &str = "ibm,reset-pe-dma-window";
/// All four.
pub const RTAS_DDW_CALLS: [&str; 4] = [RTAS_QUERY, RTAS_CREATE, RTAS_REMOVE, RTAS_RESET];

/// Guest memory as the TCE model reads it (`H_PUT_TCE_INDIRECT` lists).
pub trait TceMemory {
    /// Fill `buf` from guest-physical `gpa`; `Err` if any byte is not guest RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), TceError>;
}

/// One TCE hypercall, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TceCall {
    /// `H_PUT_TCE`.
    Put {
        /// Window.
        liobn: u64,
        /// Bus address.
        ioba: u64,
        /// Value.
        tce: u64,
    },
    /// `H_GET_TCE`.
    Get {
        /// Window.
        liobn: u64,
        /// Bus address.
        ioba: u64,
    },
    /// `H_PUT_TCE_INDIRECT`.
    Indirect {
        /// Window.
        liobn: u64,
        /// Bus address of the first entry.
        ioba: u64,
        /// Guest-physical address of the list.
        list: u64,
        /// Entries.
        count: u64,
    },
    /// `H_STUFF_TCE`.
    Stuff {
        /// Window.
        liobn: u64,
        /// Bus address of the first entry.
        ioba: u64,
        /// Value.
        tce: u64,
        /// Entries.
        count: u64,
    },
}

impl TceCall {
    /// Decode; `None` for an opcode that is not a TCE call.
    pub fn decode(opcode: u64, a: &[u64; 9]) -> Option<TceCall> {
        Some(match opcode {
            H_PUT_TCE => TceCall::Put {
                liobn: a[0],
                ioba: a[1],
                tce: a[2],
            },
            H_GET_TCE => TceCall::Get {
                liobn: a[0],
                ioba: a[1],
            },
            H_PUT_TCE_INDIRECT => TceCall::Indirect {
                liobn: a[0],
                ioba: a[1],
                list: a[2],
                count: a[3],
            },
            H_STUFF_TCE => TceCall::Stuff {
                liobn: a[0],
                ioba: a[1],
                tce: a[2],
                count: a[3],
            },
            _ => return None,
        })
    }
}

/// A hypercall's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcallOutcome {
    /// PAPR return code.
    pub status: i64,
    /// `H_GET_TCE`'s value.
    pub ret: Option<u64>,
    /// What changed (also on failure: the entries written before it).
    pub updates: Vec<TceUpdate>,
    /// Why it failed.
    pub error: Option<TceError>,
}

impl HcallOutcome {
    fn done(updates: Vec<TceUpdate>, r: Result<(), TceError>) -> HcallOutcome {
        match r {
            Ok(()) => HcallOutcome {
                status: H_SUCCESS,
                ret: None,
                updates,
                error: None,
            },
            Err(e) => HcallOutcome {
                status: e.hcall_status(),
                ret: None,
                updates,
                error: Some(e),
            },
        }
    }
}

/// Run a TCE hypercall.
pub fn hcall(pe: &mut Pe, mem: &dyn TceMemory, call: TceCall) -> HcallOutcome {
    match call {
        TceCall::Put { liobn, ioba, tce } => match pe.put_tce(liobn, ioba, tce) {
            Ok(u) => HcallOutcome::done(vec![u], Ok(())),
            Err(e) => HcallOutcome::done(vec![], Err(e)),
        },
        TceCall::Get { liobn, ioba } => match pe.get_tce(liobn, ioba) {
            Ok(t) => HcallOutcome {
                ret: Some(t.0),
                ..HcallOutcome::done(vec![], Ok(()))
            },
            Err(e) => HcallOutcome::done(vec![], Err(e)),
        },
        TceCall::Indirect {
            liobn,
            ioba,
            list,
            count,
        } => {
            // The order of QEMU's checks: LIOBN, then count and alignment, then entries.
            if pe.window(liobn).is_none() {
                return HcallOutcome::done(vec![], Err(TceError::NoSuchLiobn(liobn)));
            }
            if count == 0 || count > MAX_INDIRECT {
                return HcallOutcome::done(vec![], Err(TceError::IndirectCount(count)));
            }
            if !list.is_multiple_of(super::pe::INDIRECT_LIST_ALIGN) {
                return HcallOutcome::done(vec![], Err(TceError::IndirectAlign(list)));
            }
            let mut bytes = vec![0u8; count as usize * 8];
            if let Err(e) = mem.read(list, &mut bytes) {
                return HcallOutcome::done(vec![], Err(e));
            }
            let tces: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    u64::from_be_bytes(b)
                })
                .collect();
            let (u, r) = pe.put_tce_indirect(liobn, ioba, list, &tces);
            HcallOutcome::done(u, r)
        }
        TceCall::Stuff {
            liobn,
            ioba,
            tce,
            count,
        } => {
            let (u, r) = pe.stuff_tce(liobn, ioba, tce, count);
            HcallOutcome::done(u, r)
        }
    }
}

/// One DDW RTAS call, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdwCall {
    /// `ibm,query-pe-dma-window`.
    Query {
        /// PCI config address of the device.
        config_addr: u32,
        /// PHB.
        buid: u64,
        /// 6 outputs (two-cell largest block) rather than 5.
        wide: bool,
    },
    /// `ibm,create-pe-dma-window`.
    Create {
        /// PCI config address of the device.
        config_addr: u32,
        /// PHB.
        buid: u64,
        /// IOMMU page shift.
        page_shift: u32,
        /// log2 of the window size.
        window_shift: u32,
    },
    /// `ibm,remove-pe-dma-window`.
    Remove {
        /// The window.
        liobn: u32,
    },
    /// `ibm,reset-pe-dma-window`.
    Reset {
        /// PCI config address of the device.
        config_addr: u32,
        /// PHB.
        buid: u64,
    },
}

impl DdwCall {
    /// Decode the call `name` from its input cells and `nret` (status included).
    pub fn decode(name: &str, args: &[u32], nret: usize) -> Result<DdwCall, TceError> {
        let bad = || TceError::RtasCells {
            call: match name {
                RTAS_QUERY => RTAS_QUERY,
                RTAS_CREATE => RTAS_CREATE,
                RTAS_REMOVE => RTAS_REMOVE,
                RTAS_RESET => RTAS_RESET,
                _ => "an unknown RTAS call",
            },
            nargs: args.len(),
            nret,
        };
        let buid = |hi: u32, lo: u32| u64::from(hi) << 32 | u64::from(lo);
        match (name, args, nret) {
            (RTAS_QUERY, &[config_addr, hi, lo], 5 | 6) => Ok(DdwCall::Query {
                config_addr,
                buid: buid(hi, lo),
                wide: nret == 6,
            }),
            (RTAS_CREATE, &[config_addr, hi, lo, page_shift, window_shift], 4) => {
                Ok(DdwCall::Create {
                    config_addr,
                    buid: buid(hi, lo),
                    page_shift,
                    window_shift,
                })
            }
            (RTAS_REMOVE, &[liobn], 1) => Ok(DdwCall::Remove { liobn }),
            (RTAS_RESET, &[config_addr, hi, lo], 1) => Ok(DdwCall::Reset {
                config_addr,
                buid: buid(hi, lo),
            }),
            _ => Err(bad()),
        }
    }
}

/// An RTAS call's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtasOutcome {
    /// RTAS status.
    pub status: i32,
    /// Output cells after the status (`nret - 1` of them on success; none on failure).
    pub outs: Vec<u32>,
    /// TCEs taken away (remove / reset).
    pub updates: Vec<TceUpdate>,
    /// `ibm,remove-pe-dma-window` restored the default window.
    pub restored_default: bool,
    /// Why it failed.
    pub error: Option<TceError>,
}

impl RtasOutcome {
    fn ok(outs: Vec<u32>, updates: Vec<TceUpdate>) -> RtasOutcome {
        RtasOutcome {
            status: RTAS_SUCCESS,
            outs,
            updates,
            restored_default: false,
            error: None,
        }
    }
    fn err(e: TceError) -> RtasOutcome {
        RtasOutcome {
            status: e.rtas_status(),
            outs: Vec::new(),
            updates: Vec::new(),
            restored_default: false,
            error: Some(e),
        }
    }
}

/// Run a DDW RTAS call.
pub fn rtas(pe: &mut Pe, call: DdwCall) -> RtasOutcome {
    match call {
        DdwCall::Query { buid, wide, .. } => match pe.ddw_query(buid, wide) {
            Ok(q) => {
                let mut outs = vec![q.available];
                if wide {
                    outs.push((q.largest_block >> 32) as u32);
                }
                outs.push(q.largest_block as u32);
                outs.extend([q.page_mask, 0]);
                RtasOutcome::ok(outs, vec![])
            }
            Err(e) => RtasOutcome::err(e),
        },
        DdwCall::Create {
            buid,
            page_shift,
            window_shift,
            ..
        } => match pe.ddw_create(buid, page_shift, window_shift) {
            Ok(w) => RtasOutcome::ok(
                vec![w.liobn, (w.start >> 32) as u32, w.start as u32],
                vec![],
            ),
            Err(e) => RtasOutcome::err(e),
        },
        DdwCall::Remove { liobn } => match pe.ddw_remove(u64::from(liobn)) {
            Ok((u, restored)) => RtasOutcome {
                restored_default: restored,
                ..RtasOutcome::ok(vec![], u)
            },
            Err(e) => RtasOutcome::err(e),
        },
        DdwCall::Reset { buid, .. } => match pe.ddw_reset(buid) {
            Ok(u) => RtasOutcome::ok(vec![], u),
            Err(e) => RtasOutcome::err(e),
        },
    }
}
