//! MSI doorbell binding: what a device's MSI address means behind a vIOMMU.
//!
//! # Design
//!
//! An MSI is a DMA write, so behind a vIOMMU the address the guest programs in a
//! device's MSI capability or MSI-X table is an IOVA of that device's stream, not the
//! platform's doorbell. The VMM never lets the device perform that write (its vectors
//! are eventfds wired to the interrupt controller), so the VMM must do what the
//! IOMMU would: translate the address and program the interrupt route with the
//! *translated* message.
//!
//! The seam is [`MsiTranslator`], provided by the machine's DMA domain
//! ([`crate::iommu::DmaDomain::msi_translator`]): the interrupt wiring of an assigned
//! device (`pci::assigned::interrupts`) calls [`MsiTranslator::translate`] for every
//! message it programs and [`MsiTranslator::watch`] once, so it is told to translate
//! again when the guest invalidates translations that may cover its messages. Without
//! a vIOMMU the domain gives [`IdentityMsi`]: the address is used as programmed.
//!
//! A translation that fails (the vIOMMU recorded the fault in the guest's event
//! queue) or lands anywhere but the platform's doorbell window ([`X86_DOORBELL`]) is
//! an [`MsiError`]: the wiring programs *no* route for that vector, so the vector
//! stays masked at the interrupt controller — the device may signal its eventfd as
//! often as it likes, the guest sees no interrupt (no storm) until it fixes its
//! tables and invalidates.

use std::sync::{Arc, Weak};

use crate::iommu::StreamId;

/// The x86 local-APIC MSI doorbell window: `[0xFEE0_0000, 0xFEF0_0000)`.
pub const X86_DOORBELL: (u64, u64) = (0xFEE0_0000, 0x10_0000);

/// Why an MSI address cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsiError {
    /// The vIOMMU refused the write (an event was recorded for the guest if its
    /// configuration asks for it).
    #[error("{stream}: the MSI address {iova:#x} does not translate (fault recorded in the vIOMMU's event queue); the vector stays masked until the guest maps it and invalidates")]
    Fault {
        /// The device's stream.
        stream: StreamId,
        /// The programmed address.
        iova: u64,
    },
    /// It translates, but not to the platform's MSI doorbell.
    #[error("{stream}: the MSI address {iova:#x} translates to {addr:#x}, which is not the MSI doorbell window; the vector stays masked")]
    NotDoorbell {
        /// The device's stream.
        stream: StreamId,
        /// The programmed address.
        iova: u64,
        /// Where it translates.
        addr: u64,
    },
}

/// A device's interest in re-translation: called with the IOVA range an
/// invalidation covered (`None`: everything may have changed).
pub trait MsiWatcher: Send + Sync {
    /// Translate the device's messages again if any lies in `range` (`(start, len)`).
    fn retranslate(&self, range: Option<(u64, u64)>);
}

/// Translates the MSI addresses of a machine's devices. See the module documentation.
pub trait MsiTranslator: Send + Sync {
    /// The doorbell address a device of `stream` writing its MSI to `iova` reaches.
    fn translate(&self, stream: StreamId, iova: u64) -> Result<u64, MsiError>;
    /// Call `watcher` after invalidations that may change what `stream`'s MSI
    /// addresses translate to (held weakly: a device that goes away stops it).
    fn watch(&self, stream: StreamId, watcher: Weak<dyn MsiWatcher>);
}

/// No vIOMMU: the programmed address is the doorbell address.
#[derive(Debug, Default)]
pub struct IdentityMsi;

impl MsiTranslator for IdentityMsi {
    fn translate(&self, _: StreamId, iova: u64) -> Result<u64, MsiError> {
        Ok(iova)
    }
    fn watch(&self, _: StreamId, _: Weak<dyn MsiWatcher>) {}
}

/// The identity translator, shared.
pub fn identity() -> Arc<dyn MsiTranslator> {
    Arc::new(IdentityMsi)
}

/// Whether `addr` is inside the doorbell window `(start, len)`.
pub fn in_doorbell(window: (u64, u64), addr: u64) -> bool {
    addr >= window.0 && addr - window.0 < window.1
}

/// A set of watchers per stream, pruned of the ones that went away.
#[derive(Default)]
pub struct Watchers(parking_lot::Mutex<Vec<(StreamId, Weak<dyn MsiWatcher>)>>);

impl Watchers {
    /// Add one.
    pub fn add(&self, stream: StreamId, w: Weak<dyn MsiWatcher>) {
        let mut v = self.0.lock();
        v.retain(|(_, w)| w.strong_count() > 0);
        v.push((stream, w));
    }

    /// Tell the watchers of `stream` (every stream if None) that `range` changed.
    /// Must be called without locks a watcher takes (it translates again).
    pub fn notify(&self, stream: Option<StreamId>, range: Option<(u64, u64)>) {
        let live: Vec<Arc<dyn MsiWatcher>> = self
            .0
            .lock()
            .iter()
            .filter(|(s, _)| stream.is_none_or(|x| x == *s))
            .filter_map(|(_, w)| w.upgrade())
            .collect();
        for w in live {
            w.retranslate(range);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl MsiWatcher for Count {
        fn retranslate(&self, _: Option<(u64, u64)>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn identity_and_doorbell_window() {
        let s = StreamId::pci(0, 1, 0);
        assert_eq!(IdentityMsi.translate(s, 0x1234), Ok(0x1234));
        assert!(in_doorbell(X86_DOORBELL, 0xfee0_0000));
        assert!(in_doorbell(X86_DOORBELL, 0xfeef_fffc));
        assert!(!in_doorbell(X86_DOORBELL, 0xfef0_0000));
        assert!(!in_doorbell(X86_DOORBELL, 0xfedf_fffc));
        assert!(!in_doorbell(X86_DOORBELL, 0));
        let e = MsiError::Fault {
            stream: s,
            iova: 0x9000,
        }
        .to_string();
        assert!(e.contains("0x9000") && e.contains("masked"), "{e}");
    }

    #[test]
    fn watchers_are_per_stream_and_weak() {
        let ws = Watchers::default();
        let a = Arc::new(Count(AtomicUsize::new(0)));
        let b = Arc::new(Count(AtomicUsize::new(0)));
        let aw: Arc<dyn MsiWatcher> = a.clone();
        let bw: Arc<dyn MsiWatcher> = b.clone();
        ws.add(StreamId::Pci(8), Arc::downgrade(&aw));
        ws.add(StreamId::Pci(16), Arc::downgrade(&bw));
        ws.notify(Some(StreamId::Pci(8)), None);
        assert_eq!(a.0.load(Ordering::SeqCst), 1);
        assert_eq!(b.0.load(Ordering::SeqCst), 0);
        ws.notify(None, Some((0, 0x1000)));
        assert_eq!(a.0.load(Ordering::SeqCst), 2);
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
        drop((bw, b));
        ws.notify(None, None);
        assert_eq!(a.0.load(Ordering::SeqCst), 3);
        ws.add(StreamId::Pci(8), Arc::downgrade(&aw));
        assert_eq!(ws.0.lock().len(), 2, "the dead watcher was pruned");
    }
}
