//! The VM operations that put host things into the guest's address space without an
//! exit: memory slots (host memory the guest touches directly) and ioeventfds (guest
//! writes that become eventfd signals).
//!
//! [`VmAddressSpace`] is a small trait over exactly those KVM ioctls so that the code
//! that decides *what* to map (the region mapper, PCI BARs) can be tested without
//! `/dev/kvm` by a recording fake; `kvm_ioctls::VmFd` is its implementation.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// Which address space an ioeventfd listens in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoSpace {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// An ioeventfd's guest address and optional datamatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoEventSpec {
    /// Address space.
    pub space: IoSpace,
    /// Guest address.
    pub addr: u64,
    /// `(value, width in bytes)`: signal only on a write of `value` with this width;
    /// `None`: any write.
    pub datamatch: Option<(u64, u64)>,
}

/// See the module documentation.
pub trait VmAddressSpace: Send + Sync {
    /// Install memory slot `slot`: guest physical `gpa..gpa + size` is host memory at
    /// `host`. A `size` of 0 removes the slot.
    ///
    /// # Safety
    /// With a non-zero size, `host..host + size` must be a mapping that stays valid
    /// until the slot is removed (size 0) or the VM is destroyed.
    unsafe fn set_memory_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
    ) -> Result<(), kvm_ioctls::Error>;
    /// Signal `fd` on guest writes matching `spec`.
    fn register_ioevent(&self, fd: &EventFd, spec: &IoEventSpec) -> Result<(), kvm_ioctls::Error>;
    /// Undo [`VmAddressSpace::register_ioevent`] with the same `spec`.
    fn unregister_ioevent(&self, fd: &EventFd, spec: &IoEventSpec)
        -> Result<(), kvm_ioctls::Error>;
}

/// Calls KVM's `$op` (register or unregister) with the datamatch width the device asked
/// for; both directions must use the same width or KVM will not find the entry.
macro_rules! ioevent_op {
    ($vm:expr, $op:ident, $fd:expr, $spec:expr) => {{
        let a = match $spec.space {
            IoSpace::Pio => IoEventAddress::Pio($spec.addr),
            IoSpace::Mmio => IoEventAddress::Mmio($spec.addr),
        };
        match $spec.datamatch {
            None => $vm.$op($fd, &a, NoDatamatch),
            Some((v, 1)) => $vm.$op($fd, &a, v as u8),
            Some((v, 2)) => $vm.$op($fd, &a, v as u16),
            Some((v, 4)) => $vm.$op($fd, &a, v as u32),
            Some((v, _)) => $vm.$op($fd, &a, v),
        }
    }};
}

impl VmAddressSpace for VmFd {
    unsafe fn set_memory_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the caller guarantees the host range outlives the slot.
        unsafe { self.set_user_memory_region(region) }
    }
    fn register_ioevent(&self, fd: &EventFd, spec: &IoEventSpec) -> Result<(), kvm_ioctls::Error> {
        ioevent_op!(self, register_ioevent, fd, spec)
    }
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        spec: &IoEventSpec,
    ) -> Result<(), kvm_ioctls::Error> {
        ioevent_op!(self, unregister_ioevent, fd, spec)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A recording [`VmAddressSpace`].
    use super::*;
    use parking_lot::Mutex;

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum SpaceCall {
        Slot { slot: u32, gpa: u64, size: u64 },
        Ioevent { spec: IoEventSpec, register: bool },
    }

    #[derive(Default)]
    pub(crate) struct RecordingSpace {
        calls: Mutex<Vec<SpaceCall>>,
    }

    impl RecordingSpace {
        pub(crate) fn take(&self) -> Vec<SpaceCall> {
            std::mem::take(&mut *self.calls.lock())
        }
    }

    impl VmAddressSpace for RecordingSpace {
        unsafe fn set_memory_slot(
            &self,
            slot: u32,
            gpa: u64,
            size: u64,
            _host: u64,
        ) -> Result<(), kvm_ioctls::Error> {
            self.calls.lock().push(SpaceCall::Slot { slot, gpa, size });
            Ok(())
        }
        fn register_ioevent(
            &self,
            _: &EventFd,
            spec: &IoEventSpec,
        ) -> Result<(), kvm_ioctls::Error> {
            self.calls.lock().push(SpaceCall::Ioevent {
                spec: *spec,
                register: true,
            });
            Ok(())
        }
        fn unregister_ioevent(
            &self,
            _: &EventFd,
            spec: &IoEventSpec,
        ) -> Result<(), kvm_ioctls::Error> {
            self.calls.lock().push(SpaceCall::Ioevent {
                spec: *spec,
                register: false,
            });
            Ok(())
        }
    }
}
