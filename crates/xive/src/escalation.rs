//! Escalation interrupts: how an event reaches a virtual processor (VP) that is not
//! running, as KVM's XIVE native device does it.
//!
//! # Design
//!
//! On POWER9 a VP's context is *pushed* into a hardware thread's TIMA when the
//! hypervisor dispatches the vCPU and *pulled* when the vCPU leaves it (for example
//! when the guest cedes the processor with `H_CEDE` and the thread is given to someone
//! else). While the VP is pushed, an event for one of its queues is presented through
//! the TIMA and the thread takes the exception. While it is not, nothing can present
//! it: the event is recorded in the VP's backlog (its IPB) and the queue's
//! **escalation** fires instead — an interrupt to the *hypervisor*, whose handler
//! wakes the vCPU so it is dispatched again and then takes the pending event.
//!
//! This model keeps, per server (VP):
//!
//! - `dispatched`: the VP is on its thread (the start state: an x86 vCPU thread that
//!   is not inside a cede is always "on its thread");
//! - per priority (one per event queue), an **escalation source** with its own PQ
//!   bits ([`crate::esb::Pq`], the same machine as a device source's ESB):
//!   - [`Xive::dispatch`] (the VP goes back on its thread) sets every escalation
//!     PQ to 01 (OFF): while dispatched, events are presented directly, escalations
//!     are off — as KVM's `kvmppc_xive_push_vcpu` does with the escalation's ESB;
//!   - [`Xive::cede`] (the VP leaves its thread to wait for an interrupt) re-arms the
//!     escalations of its configured queues: PQ = 00 — KVM's re-arm on cede;
//!   - an event written to queue (VP, prio) while the VP is not dispatched **triggers**
//!     that escalation: 00 -> 10 fires it (the VMM's [`crate::Notify::escalate`],
//!     which wakes the vCPU), 10 -> 11 and 11 -> 11 only coalesce. However many events
//!     arrive while the VP is off its thread, each queue escalates at most once per
//!     cede: no storm. The events themselves are all in the queue and the IPB.
//! - the TIMA OS ring stands for the VP's backlog while it is off its thread: the
//!   priority is recorded in IPB/PIPR as usual, but the vCPU is **not** notified
//!   (nothing is dispatched to take it). [`Xive::dispatch`] notifies it then, if an
//!   event presented meanwhile signals (PIPR < CPPR).
//!
//! [`Xive::cede`] answers whether the VP already has a signalled exception (NSR): the
//! VMM must then not wait at all (the guest cedes with its interrupts off, so the
//! exception is still to be taken). Escalation state is host state, like KVM's: it is
//! not part of the migrated VP state, and a restored VP starts dispatched.
//!
//! Only events that notify escalate: a queue without `ALWAYS_NOTIFY` whose ESn already
//! coalesced the event does not (the hardware escalates after the END's notification
//! check, too).

use crate::esb::Pq;
use crate::router::Xive;

/// The escalation state of one server (VP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    /// The VP is on its thread.
    pub dispatched: bool,
    /// PQ of the escalation source of each priority's queue.
    pub pq: [Pq; 8],
    /// Escalations fired (PQ 00 -> 10) since the server was connected.
    pub fired: u64,
    /// Events that found their escalation already fired (coalesced).
    pub coalesced: u64,
    /// An event was presented while the VP was off its thread (notify at dispatch).
    pub(crate) presented: bool,
}

impl Default for Escalation {
    fn default() -> Self {
        Escalation {
            dispatched: true,
            pq: [Pq::Off; 8],
            fired: 0,
            coalesced: 0,
            presented: false,
        }
    }
}

impl Escalation {
    /// An event of priority `prio` was queued while the VP is off its thread: record
    /// it; returns whether the escalation fires now (PQ was 00).
    pub fn trigger(&mut self, prio: u8) -> bool {
        self.presented = true;
        let Some(pq) = self.pq.get_mut(usize::from(prio)) else {
            return false;
        };
        let (next, fire) = pq.trigger();
        if *pq != Pq::Off && !fire {
            self.coalesced += 1;
        }
        *pq = next;
        if fire {
            self.fired += 1;
        }
        fire
    }

    /// The VP leaves its thread: the escalations of the priorities in `armed` (a bit
    /// per priority, bit `p` for priority `p`) are re-armed (PQ 00), the others off.
    /// A cede of a VP already off its thread re-arms only (what was presented
    /// meanwhile is still notified at dispatch).
    pub fn cede(&mut self, armed: u8) {
        if self.dispatched {
            self.presented = false;
        }
        self.dispatched = false;
        for (p, pq) in self.pq.iter_mut().enumerate() {
            *pq = if armed & (1 << p) != 0 {
                Pq::Reset
            } else {
                Pq::Off
            };
        }
    }

    /// The VP is back on its thread: escalations off; returns whether an event was
    /// presented while it was away.
    pub fn dispatch(&mut self) -> bool {
        self.dispatched = true;
        self.pq = [Pq::Off; 8];
        std::mem::take(&mut self.presented)
    }
}

/// What [`Xive::escalation`] reports of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscalationStats {
    /// The VP is on its thread.
    pub dispatched: bool,
    /// Escalations fired.
    pub fired: u64,
    /// Events coalesced into an already fired escalation.
    pub coalesced: u64,
}

impl Xive {
    /// The VP of `server` leaves its thread to wait for an interrupt (`H_CEDE`): the
    /// escalations of its configured queues are armed. Returns `Some(true)` when an
    /// exception is already signalled (the caller must not wait), `None` when the
    /// server is not connected.
    pub fn cede(&self, server: u32) -> Option<bool> {
        let mut st = self.state.lock();
        let srv = st.servers.get_mut(&server)?;
        let armed = srv
            .eqs
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled())
            .fold(0u8, |m, (p, _)| m | (1 << p));
        srv.escalation.cede(armed);
        let signalled = srv.tima.os(crate::tima::NSR) & crate::tima::NSR_EO != 0;
        tracing::trace!(server, armed, signalled, "xive: VP ceded");
        Some(signalled)
    }

    /// The VP of `server` is dispatched again: escalations off; an event presented
    /// while it was away that signals now notifies the vCPU. Returns `false` when the
    /// server is not connected.
    pub fn dispatch(&self, server: u32) -> bool {
        self.with(|st, p| {
            let Some(srv) = st.servers.get_mut(&server) else {
                return false;
            };
            let presented = srv.escalation.dispatch();
            if presented && srv.tima.os(crate::tima::NSR) & crate::tima::NSR_EO != 0 {
                p.0.push(server);
            }
            true
        })
    }

    /// The escalation counters of `server`, if connected.
    pub fn escalation(&self, server: u32) -> Option<EscalationStats> {
        let st = self.state.lock();
        let e = &st.servers.get(&server)?.escalation;
        Some(EscalationStats {
            dispatched: e.dispatched,
            fired: e.fired,
            coalesced: e.coalesced,
        })
    }

    /// The PQ of the escalation source of queue (`server`, `prio`), if it exists.
    pub fn escalation_pq(&self, server: u32, prio: u8) -> Option<Pq> {
        let st = self.state.lock();
        st.servers
            .get(&server)?
            .escalation
            .pq
            .get(usize::from(prio))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_per_cede_and_coalesces() {
        let mut e = Escalation::default();
        assert!(e.dispatched);
        e.cede(1 << 6);
        assert!(e.trigger(6));
        assert_eq!(e.pq[6], Pq::Pending);
        assert!(!e.trigger(6));
        assert!(!e.trigger(6));
        assert_eq!(e.pq[6], Pq::Queued);
        assert_eq!((e.fired, e.coalesced), (1, 2));
        assert!(!e.trigger(5), "an unconfigured queue's escalation is off");
        assert!(e.dispatch());
        assert_eq!(e.pq, [Pq::Off; 8]);
        assert!(!e.dispatch(), "nothing presented since");
        e.cede(1 << 6);
        assert!(e.trigger(6), "re-armed by the next cede");
        assert_eq!(e.fired, 2);
    }
}
