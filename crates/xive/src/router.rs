//! The XIVE core: the state of every source, queue and server under one lock, the
//! routing of a forwarded event (source -> routing entry -> event queue ->
//! presenter -> [`Notify`]), and the guest's ESB and TIMA accesses.
//!
//! Routing of one forwarded event of source `lisn`:
//! 1. its routing entry is masked (or names an unknown server): dropped — the source
//!    stays PENDING, so later triggers only set Q until the guest EOIs;
//! 2. the (server, priority) queue is not configured: dropped (as QEMU does for an
//!    invalid END);
//! 3. the EISN is written to the queue; unless the queue asked for
//!    `ALWAYS_NOTIFY`, its ESn bits coalesce notifications;
//! 4. the server's TIMA records the priority in IPB; when PIPR < CPPR it raises NSR
//!    and the VMM's [`Notify::notify`] is called for that server (after the lock is
//!    released);
//! 5. unless the server's VP is off its thread (ceded): then the vCPU is not
//!    notified and the queue's escalation source is triggered instead, which calls
//!    [`Notify::escalate`] at most once per cede ([`crate::escalation`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::eq::EventQueue;
use crate::esb::{MgmtLoad, MgmtStore, Pq};
use crate::escalation::Escalation;
use crate::mem::GuestMemory;
use crate::source::Source;
use crate::tima::Tima;

/// How the model tells the VMM that a server (vCPU) has an exception to take.
pub trait Notify: Send + Sync {
    /// Server `server`'s OS ring signals an interrupt (NSR set).
    fn notify(&self, server: u32);
    /// The guest EOId source `lisn` (an EOI load on its management page, or through
    /// `H_INT_ESB`): a VMM that emulates a level-triggered line with a resample
    /// eventfd signals it here. The default does nothing.
    fn eoi(&self, _lisn: u32) {}
    /// The escalation of queue (`server`, `prio`) fired: an event arrived for a VP
    /// that is off its thread ([`Xive::cede`]); the VMM wakes that vCPU. The default
    /// does nothing.
    fn escalate(&self, _server: u32, _prio: u8) {}
}

impl<F: Fn(u32) + Send + Sync> Notify for F {
    fn notify(&self, server: u32) {
        self(server)
    }
}

/// Where the guest finds the pages (hypercall answers) and how big they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Guest address of source 0's trigger page; source `n`'s pages are at
    /// `esb_base + (n << (page_shift + 1))`, trigger then management.
    pub esb_base: u64,
    /// Guest address of the (server 0, priority 0) queue's ESB pages
    /// (`H_INT_GET_QUEUE_INFO`); queue `server * 8 + prio` follows at the same stride.
    pub end_base: u64,
    /// log2 of an ESB page (12 or 16).
    pub page_shift: u32,
}

impl Layout {
    /// QEMU's pseries layout (64 KiB pages at `0x0006010000000000`, the queues' ESB
    /// pages right after the 0x2000 sources' at `0x0006010040000000`, as measured with
    /// the scenario oracle): hypercall answers match QEMU 7.2's.
    pub const PSERIES: Layout = Layout {
        esb_base: 0x0006_0100_0000_0000,
        end_base: 0x0006_0100_4000_0000,
        page_shift: 16,
    };

    /// Trigger page address of `lisn`.
    pub fn trigger_page(&self, lisn: u32) -> u64 {
        self.esb_base
            .wrapping_add(u64::from(lisn) << (self.page_shift + 1))
    }

    /// Management (EOI) page address of `lisn`.
    pub fn mgmt_page(&self, lisn: u32) -> u64 {
        self.trigger_page(lisn).wrapping_add(1 << self.page_shift)
    }

    /// KVM's device-region layout: what page `page` of the region is — `Tima(ring)`
    /// for pages 0..4 (HW, HV, OS, USER), `Esb { lisn, mgmt }` from page 4.
    pub fn region_page(page: u64) -> RegionPage {
        if page < 4 {
            RegionPage::Tima(page as u8)
        } else {
            let n = page - 4;
            match u32::try_from(n / 2) {
                Ok(lisn) => RegionPage::Esb {
                    lisn,
                    mgmt: n % 2 == 1,
                },
                Err(_) => RegionPage::Beyond,
            }
        }
    }
}

/// A page of the device region ([`Layout::region_page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionPage {
    /// TIMA ring page (2 = OS, the only one a guest may use).
    Tima(u8),
    /// A source's trigger (`mgmt == false`) or management page.
    Esb {
        /// Source.
        lisn: u32,
        /// Management page.
        mgmt: bool,
    },
    /// Not a page of this device.
    Beyond,
}

/// The size of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XiveConfig {
    /// Source numbers `0..nr_irqs` exist.
    pub nr_irqs: u32,
    /// Most servers (vCPUs) the control API's NR_SERVERS may ask for.
    pub max_servers: u32,
    /// Guest addresses of the pages.
    pub layout: Layout,
}

impl XiveConfig {
    /// The largest source space a model may have.
    pub const MAX_IRQS: u32 = 1 << 20;
    /// The most servers.
    pub const MAX_SERVERS: u32 = 4096;

    /// A checked configuration; `None` when a count is 0 or beyond the maxima or the
    /// page shift is neither 12 nor 16.
    pub fn new(nr_irqs: u32, max_servers: u32, layout: Layout) -> Option<XiveConfig> {
        let ok = (1..=Self::MAX_IRQS).contains(&nr_irqs)
            && (1..=Self::MAX_SERVERS).contains(&max_servers)
            && (layout.page_shift == 12 || layout.page_shift == 16);
        ok.then_some(XiveConfig {
            nr_irqs,
            max_servers,
            layout,
        })
    }
}

/// One server (vCPU) once connected.
#[derive(Debug, Clone)]
pub(crate) struct Server {
    pub(crate) tima: Tima,
    pub(crate) eqs: [EventQueue; 8],
    pub(crate) reporting_line: u64,
    pub(crate) escalation: Escalation,
}

impl Server {
    pub(crate) fn new(id: u32) -> Server {
        Server {
            tima: Tima::new(id),
            eqs: [EventQueue::RESET; 8],
            reporting_line: 0,
            escalation: Escalation::default(),
        }
    }
}

/// Everything under the lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) sources: BTreeMap<u32, Source>,
    pub(crate) servers: BTreeMap<u32, Server>,
    pub(crate) nr_servers: u32,
    /// Client-architecture-support selected exploitation mode (hcalls answer
    /// H_FUNCTION until then).
    pub(crate) exploitation: bool,
    /// PQ of each source before [`crate::migration`]'s save masked it.
    pub(crate) frozen: Option<BTreeMap<u32, Pq>>,
}

/// Servers to notify once the lock is released (and sources EOId, for
/// [`Notify::eoi`]; escalations fired, for [`Notify::escalate`]).
#[derive(Debug, Default)]
pub(crate) struct Pending(
    pub(crate) Vec<u32>,
    pub(crate) Vec<u32>,
    pub(crate) Vec<(u32, u8)>,
);

/// The XIVE model. See the crate documentation.
pub struct Xive {
    pub(crate) cfg: XiveConfig,
    pub(crate) state: Mutex<State>,
    pub(crate) mem: Arc<dyn GuestMemory>,
    notify: Arc<dyn Notify>,
}

impl std::fmt::Debug for Xive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xive").field("cfg", &self.cfg).finish()
    }
}

impl Xive {
    /// A model with no source allocated and no server connected; NR_SERVERS starts at
    /// `cfg.max_servers`; exploitation mode is on (see
    /// [`Xive::set_exploitation`]).
    pub fn new(cfg: XiveConfig, mem: Arc<dyn GuestMemory>, notify: Arc<dyn Notify>) -> Xive {
        Xive {
            cfg,
            state: Mutex::new(State {
                sources: BTreeMap::new(),
                servers: BTreeMap::new(),
                nr_servers: cfg.max_servers,
                exploitation: true,
                frozen: None,
            }),
            mem,
            notify,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &XiveConfig {
        &self.cfg
    }

    /// Whether the guest may use the `H_INT_*` calls (a pseries guest negotiates it
    /// with client-architecture-support; the x86 VMM turns it on at creation).
    pub fn set_exploitation(&self, on: bool) {
        self.state.lock().exploitation = on;
    }

    /// Run `f` under the lock, then deliver the notifications it produced.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State, &mut Pending) -> R) -> R {
        let mut pending = Pending::default();
        let r = {
            let mut st = self.state.lock();
            f(&mut st, &mut pending)
        };
        for l in pending.1 {
            self.notify.eoi(l);
        }
        for (s, prio) in pending.2 {
            tracing::trace!(server = s, prio, "xive: escalation fired");
            self.notify.escalate(s, prio);
        }
        for s in pending.0 {
            tracing::trace!(server = s, "xive: notify vCPU");
            self.notify.notify(s);
        }
        r
    }

    /// Route a forwarded event of `lisn` (the numbered steps of the module docs).
    pub(crate) fn route(&self, st: &mut State, p: &mut Pending, lisn: u32) {
        let Some(src) = st.sources.get(&lisn) else {
            return;
        };
        let eas = src.eas;
        if eas.masked {
            tracing::trace!(lisn, "xive: event dropped, routing entry masked");
            return;
        }
        let Some(server) = st.servers.get_mut(&eas.server) else {
            tracing::debug!(
                lisn,
                server = eas.server,
                "xive: event for an unknown server dropped"
            );
            return;
        };
        let Some(eq) = server.eqs.get_mut(usize::from(eas.prio)) else {
            return;
        };
        if !eq.enabled() {
            tracing::debug!(
                lisn,
                server = eas.server,
                prio = eas.prio,
                "xive: event for an unconfigured queue dropped"
            );
            return;
        }
        match eq.push(self.mem.as_ref(), eas.eisn) {
            Ok(true) => {
                let signal = server.tima.present(eas.prio);
                if server.escalation.dispatched {
                    if signal {
                        p.0.push(eas.server);
                    }
                } else if server.escalation.trigger(eas.prio) {
                    p.2.push((eas.server, eas.prio));
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(lisn, error = %e, "xive: event queue write failed, event dropped")
            }
        }
    }

    /// A trigger of `lisn` (a device's eventfd, a trigger-page store): returns
    /// `false` when no such source is allocated.
    pub fn trigger(&self, lisn: u32) -> bool {
        self.with(|st, p| {
            let Some(src) = st.sources.get_mut(&lisn) else {
                return false;
            };
            if src.trigger() {
                self.route(st, p, lisn);
            }
            true
        })
    }

    /// Set the level of a level-sensitive source (`true` triggers it); returns
    /// `false` when no such source is allocated.
    pub fn set_level(&self, lisn: u32, asserted: bool) -> bool {
        if asserted {
            return self.trigger(lisn);
        }
        self.with(|st, _| match st.sources.get_mut(&lisn) {
            Some(s) => {
                s.deassert();
                true
            }
            None => false,
        })
    }

    /// The PQ bits of `lisn`, if allocated.
    pub fn pq(&self, lisn: u32) -> Option<Pq> {
        self.state.lock().sources.get(&lisn).map(|s| s.pq)
    }

    /// A load from `lisn`'s trigger (`mgmt == false`) or management page at `off`.
    /// 8-byte loads only; anything invalid returns all ones.
    pub fn esb_load(&self, lisn: u32, mgmt: bool, off: u64, size: u32) -> u64 {
        if !mgmt || size != 8 {
            return u64::MAX;
        }
        self.with(|st, p| {
            let Some(src) = st.sources.get_mut(&lisn) else {
                return u64::MAX;
            };
            match MgmtLoad::decode(off) {
                MgmtLoad::Eoi => {
                    let fwd = src.eoi();
                    p.1.push(lisn);
                    if fwd {
                        self.route(st, p, lisn);
                    }
                    u64::from(fwd)
                }
                MgmtLoad::Get => u64::from(src.pq.bits()),
                MgmtLoad::Set(pq) => u64::from(src.set_pq(pq).bits()),
            }
        })
    }

    /// A store to `lisn`'s trigger or management page at `off` (invalid ones are
    /// ignored).
    pub fn esb_store(&self, lisn: u32, mgmt: bool, off: u64, size: u32, _value: u64) {
        if size != 8 {
            return;
        }
        if !mgmt {
            self.trigger(lisn);
            return;
        }
        match MgmtStore::decode(off) {
            MgmtStore::Trigger => {
                self.trigger(lisn);
            }
            MgmtStore::Set(pq) => self.with(|st, _| {
                if let Some(s) = st.sources.get_mut(&lisn) {
                    s.set_pq(pq);
                }
            }),
            MgmtStore::Invalid => {
                tracing::debug!(lisn, off, "xive: invalid ESB store ignored");
            }
        }
    }

    /// A load of `size` bytes at `off` of `server`'s TIMA ring page `ring` (only
    /// the OS page, 2, answers; all ones otherwise).
    pub fn tima_load(&self, server: u32, ring: u8, off: u64, size: u32) -> u64 {
        if ring != 2 {
            return u64::MAX;
        }
        self.with(|st, _| match st.servers.get_mut(&server) {
            Some(s) => s.tima.os_load(off, size),
            None => u64::MAX,
        })
    }

    /// A store to `server`'s TIMA ring page `ring`.
    pub fn tima_store(&self, server: u32, ring: u8, off: u64, size: u32, value: u64) {
        if ring != 2 {
            return;
        }
        self.with(|st, p| {
            if let Some(s) = st.servers.get_mut(&server) {
                if s.tima.os_store(off, size, value) {
                    p.0.push(server);
                }
            }
        })
    }

    /// A load from the device region (KVM's mmap layout), as `server`.
    pub fn region_load(&self, server: u32, offset: u64, size: u32) -> u64 {
        let shift = self.cfg.layout.page_shift;
        let off = offset & ((1 << shift) - 1);
        match Layout::region_page(offset >> shift) {
            RegionPage::Tima(ring) => self.tima_load(server, ring, off, size),
            RegionPage::Esb { lisn, mgmt } => self.esb_load(lisn, mgmt, off, size),
            RegionPage::Beyond => u64::MAX,
        }
    }

    /// A store to the device region, as `server`.
    pub fn region_store(&self, server: u32, offset: u64, size: u32, value: u64) {
        let shift = self.cfg.layout.page_shift;
        let off = offset & ((1 << shift) - 1);
        match Layout::region_page(offset >> shift) {
            RegionPage::Tima(ring) => self.tima_store(server, ring, off, size, value),
            RegionPage::Esb { lisn, mgmt } => self.esb_store(lisn, mgmt, off, size, value),
            RegionPage::Beyond => {}
        }
    }

    /// A copy of `server`'s OS ring word (NSR .. PIPR), if connected.
    pub fn os_ring(&self, server: u32) -> Option<u64> {
        self.state.lock().servers.get(&server).map(|s| s.tima.w01())
    }

    /// The (toggle, index) of `server`'s priority-`prio` queue, if connected.
    pub fn queue_position(&self, server: u32, prio: u8) -> Option<(u32, u32)> {
        let st = self.state.lock();
        let q = st.servers.get(&server)?.eqs.get(usize::from(prio))?;
        Some((q.toggle, q.index))
    }

    /// Allocated source numbers.
    pub fn sources(&self) -> Vec<u32> {
        self.state.lock().sources.keys().copied().collect()
    }

    /// Connected servers.
    pub fn servers(&self) -> Vec<u32> {
        self.state.lock().servers.keys().copied().collect()
    }
}
