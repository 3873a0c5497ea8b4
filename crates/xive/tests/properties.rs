//! Property tests of the PQ machine, the event queue ring and the TIMA OS ring.

use nestio_xive::eq::EventQueue;
use nestio_xive::source::Source;
use nestio_xive::tima::{self, Tima};
use nestio_xive::{GuestMemory, Pq, VecMemory};
use proptest::prelude::*;

proptest! {
    /// No trigger is lost: every trigger of an enabled message source is followed (at
    /// the same step or later) by a forwarded event, once the guest EOIs until the
    /// source is idle; and no more events are forwarded than triggers.
    #[test]
    fn pq_loses_no_trigger(ops in prop::collection::vec(any::<bool>(), 0..64)) {
        let mut s = Source::new(false, false);
        s.set_pq(Pq::Reset);
        let mut forwards = Vec::new();
        let mut triggers = Vec::new();
        for (i, &t) in ops.iter().enumerate() {
            let f = if t { triggers.push(i); s.trigger() } else { s.eoi() };
            if f { forwards.push(i); }
        }
        let n = ops.len();
        for k in 0..2 {
            if s.eoi() { forwards.push(n + k); }
        }
        prop_assert_eq!(s.pq, Pq::Reset);
        prop_assert!(forwards.len() <= triggers.len());
        for t in triggers {
            prop_assert!(forwards.iter().any(|&f| f >= t), "trigger at {} lost", t);
        }
    }

    /// An OFF source never forwards, whatever happens, until PQ is set.
    #[test]
    fn off_source_is_silent(ops in prop::collection::vec(any::<bool>(), 0..64), lsi: bool) {
        let mut s = Source::new(lsi, false);
        for t in ops {
            let fwd = if t { s.trigger() } else { s.eoi() };
            prop_assert!(!fwd);
            prop_assert_eq!(s.pq, Pq::Off);
        }
    }

    /// A consumer that follows the generation-bit protocol reads exactly the events
    /// produced, in order, across any number of wraps, as long as it keeps up.
    #[test]
    fn eq_consumer_sees_every_event(batches in prop::collection::vec(0u32..1024, 1..12)) {
        let m = VecMemory::new(0, 1 << 16);
        let mut q = EventQueue::configure(&m, 0x1000, 12, true).unwrap();
        let (mut ctoggle, mut cidx, mut next) = (0u32, 0u32, 0u32);
        for b in batches {
            let start = next;
            for _ in 0..b {
                q.push(&m, next & 0x7fff_ffff).unwrap();
                next += 1;
            }
            let mut got = Vec::new();
            loop {
                let e = m.read_be32(0x1000 + u64::from(cidx) * 4).unwrap();
                if e >> 31 == ctoggle { break; }
                got.push(e & 0x7fff_ffff);
                cidx = (cidx + 1) % 1024;
                if cidx == 0 { ctoggle ^= 1; }
            }
            prop_assert_eq!(got, (start..next).collect::<Vec<_>>());
        }
        prop_assert!(m.contains(0x1000, 0x1000));
    }

    /// PIPR always mirrors IPB, an acknowledged priority is the most favoured pending
    /// one, and NSR is raised exactly when a pending priority beats CPPR.
    #[test]
    fn tima_invariants(ops in prop::collection::vec((0u8..3, 0u8..9), 0..64)) {
        let mut t = Tima::new(0);
        for (kind, v) in ops {
            match kind {
                0 => { t.present(v.min(7)); }
                1 => {
                    let (ipb, cppr, nsr, pipr) =
                        (t.os(tima::IPB), t.os(tima::CPPR), t.os(tima::NSR), t.os(tima::PIPR));
                    let a = t.ack();
                    if nsr & tima::NSR_EO != 0 {
                        let p = (a & 0xff) as u8;
                        prop_assert!(ipb & tima::prio_to_ipb(p) != 0);
                        // The most favoured pending one (QEMU 7.2 does not lower NSR when CPPR
                        // rises, so it may no longer beat CPPR).
                        prop_assert_eq!(p, pipr);
                        prop_assert_eq!(t.os(tima::IPB) & tima::prio_to_ipb(p), 0);
                    } else {
                        prop_assert_eq!(a, u16::from(cppr));
                    }
                }
                _ => { t.set_cppr(v); }
            }
            prop_assert_eq!(t.os(tima::PIPR), tima::ipb_to_pipr(t.os(tima::IPB)));
            if t.os(tima::PIPR) < t.os(tima::CPPR) {
                prop_assert_eq!(t.os(tima::NSR), tima::NSR_EO);
            }
        }
    }
}

/// A model with 2 servers, a priority-6 queue each, and sources 16..20 routed to
/// server 1 (priority 6) with PQ = 00; notifications and escalations recorded.
struct EscRig {
    x: nestio_xive::Xive,
    notes: std::sync::Arc<parking_lot::Mutex<Vec<(char, u32)>>>,
}

struct EscNotes(std::sync::Arc<parking_lot::Mutex<Vec<(char, u32)>>>);

impl nestio_xive::Notify for EscNotes {
    fn notify(&self, server: u32) {
        self.0.lock().push(('n', server));
    }
    fn escalate(&self, server: u32, prio: u8) {
        assert_eq!(prio, 6, "only priority 6 is configured");
        self.0.lock().push(('e', server));
    }
}

fn esc_rig() -> EscRig {
    use nestio_xive::hcall::{flags, op};
    use std::sync::Arc;
    let mem = Arc::new(VecMemory::new(0, 1 << 20));
    let notes = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let cfg = nestio_xive::XiveConfig::new(64, 2, nestio_xive::router::Layout::PSERIES).unwrap();
    let x = nestio_xive::Xive::new(cfg, mem, Arc::new(EscNotes(notes.clone())));
    for s in 0..2u32 {
        x.connect_vcpu(s).unwrap();
        let q = 0x1_0000 + u64::from(s) * 0x1000;
        assert_eq!(
            x.hcall(
                s,
                op::H_INT_SET_QUEUE_CONFIG,
                &[flags::EQ_ALWAYS_NOTIFY, s.into(), 6, q, 12]
            )
            .rc,
            0
        );
        x.tima_store(s, 2, 0x11, 1, 0xff);
    }
    for l in 16..20u32 {
        x.set_source(l.into(), 0).unwrap();
        assert_eq!(
            x.hcall(
                0,
                op::H_INT_SET_SOURCE_CONFIG,
                &[flags::SRC_SET_EISN, l.into(), 1, 6, l.into()]
            )
            .rc,
            0
        );
        x.esb_load(l, true, 0xc00, 8);
    }
    EscRig { x, notes }
}

proptest! {
    /// Escalations under any interleaving of triggers, guest acks/EOIs, cedes and
    /// dispatches of server 1:
    /// - while dispatched, no escalation fires; while ceded, no notification is sent;
    /// - at most one escalation per cede (no storm), and exactly one when at least one
    ///   event reached the ceded VP's queue;
    /// - no event is lost: each event either notified the dispatched vCPU, fired or
    ///   coalesced into the cede's escalation, and a dispatch after a cede in which an
    ///   event arrived notifies the vCPU (NSR set) so it takes the event;
    /// - the escalation PQ is OFF while dispatched.
    #[test]
    fn escalation_wakes_once_per_cede_and_never_storms(
        ops in prop::collection::vec((0u8..5, 16u32..20), 0..80)
    ) {
        let r = esc_rig();
        let mut ceded = false;
        let mut events_this_cede = 0u32;
        let mut fired_total = 0u64;
        for (op, lisn) in ops {
            r.notes.lock().clear();
            match op {
                0 | 1 => {
                    let before = r.x.queue_position(1, 6).unwrap();
                    r.x.trigger(lisn);
                    let queued = r.x.queue_position(1, 6).unwrap() != before;
                    let notes = std::mem::take(&mut *r.notes.lock());
                    if ceded {
                        prop_assert!(notes.iter().all(|n| n.0 == 'e'), "{:?}", notes);
                        if queued {
                            events_this_cede += 1;
                            let want = usize::from(events_this_cede == 1);
                            prop_assert_eq!(notes.len(), want, "escalate on the first event only");
                            fired_total += want as u64;
                        }
                    } else {
                        prop_assert!(notes.iter().all(|n| n.0 == 'n'), "{:?}", notes);
                    }
                }
                2 => {
                    // The guest (on server 1) acks and EOIs the source, CPPR back to 0xFF.
                    if !ceded {
                        r.x.tima_load(1, 2, 0x810, 2);
                        r.x.esb_load(lisn, true, 0, 8);
                        r.x.tima_store(1, 2, 0x11, 1, 0xff);
                    }
                }
                3 => {
                    if !ceded {
                        let signalled = r.x.cede(1).unwrap();
                        let nsr = r.x.os_ring(1).unwrap().to_be_bytes()[0];
                        prop_assert_eq!(signalled, nsr & tima::NSR_EO != 0);
                        prop_assert_eq!(r.x.escalation_pq(1, 6), Some(Pq::Reset));
                        prop_assert_eq!(r.x.escalation_pq(1, 5), Some(Pq::Off), "no queue, no escalation");
                        ceded = true;
                        events_this_cede = 0;
                    }
                }
                _ => {
                    if ceded {
                        r.x.dispatch(1);
                        let notes = std::mem::take(&mut *r.notes.lock());
                        let nsr = r.x.os_ring(1).unwrap().to_be_bytes()[0] & tima::NSR_EO != 0;
                        let want = events_this_cede > 0 && nsr;
                        prop_assert_eq!(notes, if want { vec![('n', 1)] } else { vec![] });
                        if events_this_cede > 0 {
                            prop_assert!(nsr, "an event arrived while ceded: signalled at dispatch");
                        }
                        ceded = false;
                    }
                }
            }
            let e = r.x.escalation(1).unwrap();
            prop_assert_eq!(e.dispatched, !ceded);
            prop_assert_eq!(e.fired, fired_total);
            if !ceded {
                prop_assert_eq!(r.x.escalation_pq(1, 6), Some(Pq::Off));
            }
            prop_assert_eq!(r.x.escalation(0).unwrap().fired, 0, "server 0 never ceded");
        }
    }
}
