//! Event queues (EQs, the "END"s of the XIVE router): rings of big-endian 32-bit
//! entries in guest memory, one per (server, priority), that the router fills and the
//! guest drains.
//!
//! An entry is `(generation << 31) | (data & 0x7fff_ffff)`. The producer (this model)
//! starts with generation 1 at index 0 and flips the generation each time the index
//! wraps; the consumer starts with toggle 0 and treats an entry as empty when its top
//! bit equals its toggle, flipping its toggle on wrap too. So the guest never needs to
//! clear an entry and a full ring simply overwrites the oldest ones.
//!
//! Sizes: `qshift` 12, 16, 21 or 24 (4 KiB .. 16 MiB, PAPR's sizes), the address
//! naturally aligned; `qshift` 0 means "no queue" (the reset state): the router drops
//! events routed to it, as QEMU's does for an invalid END.
//!
//! Without `ALWAYS_NOTIFY`, notifications are coalesced through the queue's own
//! ESn PQ bits, as on the hardware: the first event notifies, later ones only enqueue
//! until something resets ESn — which the sPAPR guest interface never does. That is
//! why Linux always asks for `ALWAYS_NOTIFY`, and KVM's control API insists on it.

use crate::esb::Pq;
use crate::mem::{GuestMemory, MemError};

/// The queue flag "notify on every event".
pub const ALWAYS_NOTIFY: u32 = 1;
/// The queue sizes (log2 bytes) a queue may have.
pub const QSHIFTS: [u32; 4] = [12, 16, 21, 24];

/// Errors of configuring a queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EqError {
    /// Not one of [`QSHIFTS`].
    #[error("event queue size 2^{0} is not supported: use 2^12, 2^16, 2^21 or 2^24 bytes")]
    Size(u32),
    /// Not naturally aligned.
    #[error("event queue at {addr:#x} is not aligned to its size 2^{qshift}")]
    Alignment {
        /// Address.
        addr: u64,
        /// log2 size.
        qshift: u32,
    },
    /// Not in guest RAM.
    #[error("event queue at {addr:#x} (2^{qshift} bytes) is not in guest RAM")]
    NotRam {
        /// Address.
        addr: u64,
        /// log2 size.
        qshift: u32,
    },
    /// The index does not fit the queue.
    #[error("event queue index {index} is beyond the queue's {entries} entries")]
    Index {
        /// Index.
        index: u32,
        /// Entries.
        entries: u32,
    },
}

/// One event queue's configuration and producer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventQueue {
    /// Guest-physical address (0 when disabled).
    pub qaddr: u64,
    /// log2 of the size in bytes; 0 = disabled.
    pub qshift: u32,
    /// Notify on every event.
    pub always_notify: bool,
    /// Producer generation bit (1 after configuration).
    pub toggle: u32,
    /// Next entry to write.
    pub index: u32,
    /// The coalescing ESn bits (used without `always_notify`).
    pub esn: Pq,
}

impl Default for EventQueue {
    fn default() -> Self {
        EventQueue::RESET
    }
}

impl EventQueue {
    /// The reset (unconfigured) queue.
    pub const RESET: EventQueue = EventQueue {
        qaddr: 0,
        qshift: 0,
        always_notify: false,
        toggle: 1,
        index: 0,
        esn: Pq::Off,
    };

    /// A configured, empty queue, after the checks of the module documentation.
    pub fn configure(
        mem: &dyn GuestMemory,
        qaddr: u64,
        qshift: u32,
        always_notify: bool,
    ) -> Result<EventQueue, EqError> {
        if !QSHIFTS.contains(&qshift) {
            return Err(EqError::Size(qshift));
        }
        if qaddr & ((1u64 << qshift) - 1) != 0 {
            return Err(EqError::Alignment {
                addr: qaddr,
                qshift,
            });
        }
        if !mem.contains(qaddr, 1u64 << qshift) {
            return Err(EqError::NotRam {
                addr: qaddr,
                qshift,
            });
        }
        Ok(EventQueue {
            qaddr,
            qshift,
            always_notify,
            toggle: 1,
            index: 0,
            esn: Pq::Reset,
        })
    }

    /// Whether events are written to memory.
    pub fn enabled(&self) -> bool {
        self.qshift != 0
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        if self.enabled() {
            1 << (self.qshift - 2)
        } else {
            0
        }
    }

    /// Set the producer position (migration restore); `toggle` is reduced to its bit.
    pub fn set_position(&mut self, toggle: u32, index: u32) -> Result<(), EqError> {
        if self.enabled() && index >= self.entries() {
            return Err(EqError::Index {
                index,
                entries: self.entries(),
            });
        }
        self.toggle = toggle & 1;
        self.index = index;
        Ok(())
    }

    /// Write one event and advance; returns whether the presenter is to be notified.
    /// A write that fails (RAM gone) drops the event and is reported.
    pub fn push(&mut self, mem: &dyn GuestMemory, data: u32) -> Result<bool, MemError> {
        if !self.enabled() {
            return Ok(false);
        }
        {
            let entry = (self.toggle << 31) | (data & 0x7fff_ffff);
            let at = self.qaddr.wrapping_add(u64::from(self.index) * 4);
            mem.write(at, &entry.to_be_bytes())?;
            self.index = (self.index + 1) & (self.entries() - 1);
            if self.index == 0 {
                self.toggle ^= 1;
            }
        }
        if self.always_notify {
            return Ok(true);
        }
        let (esn, notify) = self.esn.trigger();
        self.esn = esn;
        Ok(notify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMemory;

    #[test]
    fn configuration_checks() {
        let m = VecMemory::new(0, 1 << 20);
        assert_eq!(
            EventQueue::configure(&m, 0x1000, 13, true),
            Err(EqError::Size(13))
        );
        assert!(matches!(
            EventQueue::configure(&m, 0x1800, 12, true),
            Err(EqError::Alignment { .. })
        ));
        assert!(matches!(
            EventQueue::configure(&m, 1 << 20, 12, true),
            Err(EqError::NotRam { .. })
        ));
        assert!(matches!(
            EventQueue::configure(&m, !0xfff, 12, true),
            Err(EqError::NotRam { .. })
        ));
        let q = EventQueue::configure(&m, 0x10000, 16, true).unwrap();
        assert_eq!((q.toggle, q.index, q.entries()), (1, 0, 16384));
    }

    #[test]
    fn generation_flips_on_wrap() {
        let m = VecMemory::new(0, 1 << 16);
        let mut q = EventQueue::configure(&m, 0x1000, 12, true).unwrap();
        for i in 0..1024 {
            assert!(q.push(&m, i).unwrap());
        }
        assert_eq!((q.toggle, q.index), (0, 0));
        assert_eq!(m.read_be32(0x1000).unwrap(), 0x8000_0000);
        assert_eq!(m.read_be32(0x1ffc).unwrap(), 0x8000_0000 | 1023);
        q.push(&m, 0xffff_ffff).unwrap();
        assert_eq!(
            m.read_be32(0x1000).unwrap(),
            0x7fff_ffff,
            "generation 0, data 31 bits"
        );
    }

    #[test]
    fn without_always_notify_only_the_first_event_notifies() {
        let m = VecMemory::new(0, 1 << 16);
        let mut q = EventQueue::configure(&m, 0x1000, 12, false).unwrap();
        assert!(q.push(&m, 1).unwrap());
        assert!(!q.push(&m, 2).unwrap());
        assert_eq!(q.index, 2, "both enqueued");
    }
}
