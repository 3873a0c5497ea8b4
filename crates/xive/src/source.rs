//! Interrupt sources: their kind (message or level), ESB state and routing entry (the
//! EAS: target server, priority, event data, masked).
//!
//! A source exists once allocated (the control API's SOURCE attribute, or the VMM
//! asking for a device interrupt); it starts **masked with PQ = 01** (KVM's
//! semantics), so nothing is delivered until the guest configures it and sets PQ to
//! 00. The routing entry is separate from the ESB: masking the entry (priority 0xFF,
//! or the masked bit) drops events at the router, while PQ = 01 stops them at the
//! source.

use crate::esb::Pq;

/// Highest usable priority (0 is the most favoured); 7 is reserved (escalation).
pub const MAX_PRIO: u8 = 6;
/// The priority that means "masked" in hcalls.
pub const PRIO_MASKED: u8 = 0xFF;

/// Where a source's events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Eas {
    /// Target server (vCPU number).
    pub server: u32,
    /// Priority 0..=6 (meaningless while `masked`).
    pub prio: u8,
    /// Events are dropped at the router.
    pub masked: bool,
    /// Event data written to the queue (31 bits used).
    pub eisn: u32,
}

impl Eas {
    /// The reset entry: server 0, priority 0, masked, no data.
    pub const RESET: Eas = Eas {
        server: 0,
        prio: 0,
        masked: true,
        eisn: 0,
    };
}

/// One interrupt source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    /// Level-sensitive (LSI) rather than message / edge.
    pub lsi: bool,
    /// The level of an LSI line.
    pub asserted: bool,
    /// The ESB bits.
    pub pq: Pq,
    /// The routing entry.
    pub eas: Eas,
}

impl Source {
    /// A freshly allocated source: masked, PQ = 01.
    pub const fn new(lsi: bool, asserted: bool) -> Source {
        Source {
            lsi,
            asserted: lsi && asserted,
            pq: Pq::Off,
            eas: Eas::RESET,
        }
    }

    /// An event from the device (an edge, a message, or an LSI line going up): whether
    /// it is forwarded to the router.
    pub fn trigger(&mut self) -> bool {
        let (pq, fwd) = if self.lsi {
            self.asserted = true;
            self.pq.lsi_trigger()
        } else {
            self.pq.trigger()
        };
        self.pq = pq;
        fwd
    }

    /// The LSI line goes down (no effect on messages).
    pub fn deassert(&mut self) {
        if self.lsi {
            self.asserted = false;
        }
    }

    /// An EOI: whether an event is forwarded now (a queued event, or an LSI whose line
    /// is still asserted).
    pub fn eoi(&mut self) -> bool {
        let (pq, mut fwd) = self.pq.eoi();
        self.pq = pq;
        if self.lsi && self.asserted {
            let (pq, f) = self.pq.lsi_trigger();
            self.pq = pq;
            fwd = f;
        }
        fwd
    }

    /// Set PQ, returning the old bits.
    pub fn set_pq(&mut self, pq: Pq) -> Pq {
        std::mem::replace(&mut self.pq, pq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_source_is_off_and_masked() {
        let mut s = Source::new(false, false);
        assert_eq!(s.pq, Pq::Off);
        assert!(s.eas.masked);
        assert!(!s.trigger());
        assert_eq!(s.pq, Pq::Off);
    }

    #[test]
    fn lsi_retriggers_at_eoi_while_asserted() {
        let mut s = Source::new(true, false);
        s.set_pq(Pq::Reset);
        assert!(s.trigger());
        assert_eq!(s.pq, Pq::Pending);
        assert!(!s.trigger(), "an LSI does not queue");
        assert_eq!(s.pq, Pq::Pending);
        assert!(s.eoi(), "still asserted: forwarded again");
        assert_eq!(s.pq, Pq::Pending);
        s.deassert();
        assert!(!s.eoi());
        assert_eq!(s.pq, Pq::Reset);
    }

    #[test]
    fn msi_queues_one_event() {
        let mut s = Source::new(false, false);
        s.set_pq(Pq::Reset);
        assert!(s.trigger());
        assert!(!s.trigger());
        assert!(!s.trigger());
        assert_eq!(s.pq, Pq::Queued);
        assert!(s.eoi());
        assert!(!s.eoi());
        assert_eq!(s.pq, Pq::Reset);
    }
}
