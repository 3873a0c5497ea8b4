//! Interrupt state of a device, with VFIO_DEVICE_SET_IRQS semantics.
//!
//! A device embeds an [`Irqs`] built from its [`IrqInfo`] table and forwards `irq_info`
//! and `set_irqs` to it; the device model then calls [`Irqs::trigger`] when it raises an
//! interrupt. The interrupt travels as an eventfd signal: whoever holds the other end
//! (a KVM irqfd, a VMM) receives it with no further hop.
//!
//! Per vector: an optional trigger eventfd, a mask bit and a pending bit. A trigger that
//! arrives while masked is remembered and delivered at unmask. Index flags decide what is
//! allowed: MASKABLE for mask/unmask, AUTOMASKED for level-style interrupts (INTx) that
//! mask themselves when they fire until the driver unmasks them.
//!
//! **Unmask by eventfd.** A maskable vector may also get an *unmask eventfd*
//! (ACTION_UNMASK | DATA_EVENTFD, as vfio-pci's INTx offers it): a VMM hands the device
//! the resample eventfd of its level-triggered KVM irqfd, KVM signals it when the guest
//! EOIs the line, and the device unmasks — no UNMASK message per interrupt. Semantics
//! follow Linux's `vfio_pci_set_intx_unmask`: the vector must have a trigger eventfd
//! first (EINVAL otherwise), fd -1 removes the unmask eventfd, and removing the trigger
//! eventfd (fd -1, or count 0 + DATA_NONE + ACTION_TRIGGER, or the owner leaving)
//! removes it too; a device reset keeps both (the owner's). MSI / MSI-X indices are not
//! maskable through VFIO and refuse it (EINVAL); mask by eventfd stays unsupported
//! (ENOTSUP, as in Linux). Each unmask eventfd is watched by an
//! [`EventFdWatch`](crate::eventfd::EventFdWatch) thread, which consumes the counter
//! and unmasks exactly as an ACTION_UNMASK | DATA_NONE message would, then runs the
//! device's after-unmask hook ([`Irqs::with_unmask_hook`]: a PCI function re-raises
//! INTx while its level is still high). A stale signal of a replaced or removed unmask
//! eventfd does nothing.
//!
//! The fds come from the peer and are hostile until checked: SET_IRQS accepts only
//! eventfds ([`PeerEventFd::from_peer`], EINVAL otherwise, and nothing of the request is
//! applied), and a vector is signalled *after* the state lock is released, through a
//! write that never blocks: a full counter is a dropped, counted interrupt. So no fd a
//! peer chooses can stall SET_IRQS, another vector or another device. Watches replaced
//! or removed are dropped (their threads joined, their fds closed) after the state lock
//! is released too, so a watch thread waiting for that lock can always finish.

use parking_lot::Mutex;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Weak};

use crate::eventfd::{EventFdWatch, PeerEventFd, Signal};
use crate::{irq_flags, DeviceError, IrqAction, IrqData, IrqInfo, Result};

#[derive(Default)]
struct Vector {
    fd: Option<Arc<PeerEventFd>>,
    /// The unmask eventfd's watch (ACTION_UNMASK | DATA_EVENTFD).
    unmask: Option<EventFdWatch>,
    masked: bool,
    pending: bool,
}

impl Vector {
    /// Back to the power-on state; the unmask watch (if any) goes to `graveyard`, to be
    /// dropped once the state lock is released.
    fn clear(&mut self, graveyard: &mut Vec<EventFdWatch>) {
        graveyard.extend(std::mem::take(self).unmask);
    }
}

/// Eventfds to signal once the state lock is released.
type Fire = Vec<Arc<PeerEventFd>>;

fn signal_all(fire: Fire) -> bool {
    let mut all = true;
    for fd in fire {
        all &= fd.signal() == Signal::Delivered;
    }
    all
}

struct Index {
    info: IrqInfo,
    vectors: Vec<Vector>,
}

/// Called after vectors of an index were unmasked (by message or by eventfd), outside
/// the state lock, with the index number.
pub type UnmaskHook = Box<dyn Fn(&Irqs, u32) + Send + Sync>;

struct Shared {
    indices: Mutex<Vec<Index>>,
    after_unmask: Option<UnmaskHook>,
}

/// The interrupt indices of one device. See the module documentation.
pub struct Irqs {
    shared: Arc<Shared>,
}

/// Signal an eventfd the device created itself, non-blocking (add 1 to its counter).
/// Peer-given fds go through [`PeerEventFd::signal`] instead.
pub fn signal_eventfd(fd: &OwnedFd) -> std::io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid local u64 to an fd we own; no memory is shared.
    let r = unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    if r == 8 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        // EAGAIN: the counter is saturated, the interrupt is pending anyway.
        if e.raw_os_error() == Some(libc::EAGAIN) {
            Ok(())
        } else {
            Err(e)
        }
    }
}

impl Irqs {
    /// Irq indices described by `infos` (index `i` is `infos[i]`).
    pub fn new(infos: &[IrqInfo]) -> Self {
        Self::build(infos, None)
    }

    /// Like [`Irqs::new`], with `hook` run after every unmask (see [`UnmaskHook`]).
    pub fn with_unmask_hook(infos: &[IrqInfo], hook: UnmaskHook) -> Self {
        Self::build(infos, Some(hook))
    }

    fn build(infos: &[IrqInfo], after_unmask: Option<UnmaskHook>) -> Self {
        let indices = infos
            .iter()
            .enumerate()
            .map(|(i, info)| Index {
                info: IrqInfo {
                    index: i as u32,
                    ..*info
                },
                vectors: (0..info.count).map(|_| Vector::default()).collect(),
            })
            .collect();
        Irqs {
            shared: Arc::new(Shared {
                indices: Mutex::new(indices),
                after_unmask,
            }),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Vec<Index>> {
        self.shared.indices.lock()
    }

    /// Number of indices.
    pub fn num_irqs(&self) -> u32 {
        self.lock().len() as u32
    }

    /// Info of `index`.
    pub fn info(&self, index: u32) -> Result<IrqInfo> {
        self.lock()
            .get(index as usize)
            .map(|i| i.info)
            .ok_or(DeviceError::NoSuchIrq(index))
    }

    /// Apply a SET_IRQS request.
    pub fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        // Check every fd before touching any state: a refused request changes nothing.
        let mut data = match data {
            IrqData::Eventfd(fds) => {
                let checked = fds
                    .into_iter()
                    .map(|f| f.map(checked_eventfd).transpose())
                    .collect::<Result<Vec<_>>>()?;
                Data::Fds(checked)
            }
            IrqData::None => Data::None,
            IrqData::Bool(b) => Data::Bool(b),
        };
        let mut graveyard = Vec::new();
        let r = self.apply(index, action, start, count, &mut data, &mut graveyard);
        // Watches replaced, removed, or of a refused request stop here, unlocked.
        drop(graveyard);
        drop(data);
        signal_all(r?);
        if action == IrqAction::Unmask {
            self.after_unmask(index);
        }
        Ok(())
    }

    fn after_unmask(&self, index: u32) {
        if let Some(hook) = &self.shared.after_unmask {
            hook(self, index);
        }
    }

    /// Start a watch for the unmask eventfd `fd` of vector `vector` of `index`. Called
    /// with the state lock held, after the request was validated: the watch is
    /// installed before its thread can take the lock, so a signal that is already
    /// pending finds it current (spawning takes no lock of ours).
    fn watch(&self, index: u32, vector: u32, fd: Arc<PeerEventFd>) -> Result<EventFdWatch> {
        let (target, key) = (Arc::downgrade(&self.shared), Arc::as_ptr(&fd) as usize);
        EventFdWatch::spawn(&format!("irq-unmask-{index}.{vector}"), fd, move || {
            unmask_by_eventfd(&target, index, vector, key)
        })
        .map_err(|e| {
            tracing::warn!(error = %e, "unmask eventfd not watched");
            match e {
                crate::eventfd::EventFdError::Watch { source, .. } => DeviceError::Io(source),
                other => DeviceError::Invalid(other.to_string()),
            }
        })
    }

    fn apply(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: &mut Data,
        graveyard: &mut Vec<EventFdWatch>,
    ) -> Result<Fire> {
        let mut fire = Fire::new();
        let mut all = self.lock();
        let idx = all
            .get_mut(index as usize)
            .ok_or(DeviceError::NoSuchIrq(index))?;
        let flags = idx.info.flags;
        // count 0 + DATA_NONE + TRIGGER: disable every vector of the index.
        if count == 0 {
            return match (action, &*data) {
                (IrqAction::Trigger, Data::None) => {
                    for v in &mut idx.vectors {
                        v.clear(graveyard);
                    }
                    Ok(fire)
                }
                _ => Err(DeviceError::Invalid(
                    "SET_IRQS with count 0 is only valid as DATA_NONE|ACTION_TRIGGER".into(),
                )),
            };
        }
        let end = start
            .checked_add(count)
            .filter(|&e| e <= idx.info.count)
            .ok_or_else(|| {
                DeviceError::Invalid(format!(
                    "vectors {start}..+{count} exceed irq index {index}'s {} vectors",
                    idx.info.count
                ))
            })?;
        let n = count as usize;
        let given = match &*data {
            Data::Bool(b) => Some((b.len(), "bools")),
            Data::Fds(f) => Some((f.len(), "eventfds")),
            Data::None => None,
        };
        if let Some((len, what)) = given.filter(|&(len, _)| len != n) {
            return Err(DeviceError::Invalid(format!(
                "{len} {what} for {count} vectors"
            )));
        }
        let range = start as usize..end as usize;
        match action {
            IrqAction::Mask | IrqAction::Unmask => {
                if flags & irq_flags::MASKABLE == 0 {
                    return Err(DeviceError::Invalid(format!(
                        "irq index {index} cannot be masked"
                    )));
                }
                let sel: Vec<bool> = match &mut *data {
                    Data::None => vec![true; n],
                    Data::Bool(b) => std::mem::take(b),
                    Data::Fds(_) if action == IrqAction::Mask => {
                        return Err(DeviceError::Unsupported(
                            "mask by eventfd (Linux's vfio-pci does not offer it either)".into(),
                        ))
                    }
                    Data::Fds(fds) => {
                        // Unmask eventfds: each vector given one needs a trigger eventfd.
                        if let Some(i) = fds
                            .iter()
                            .zip(&idx.vectors[range.clone()])
                            .position(|(f, v)| f.is_some() && v.fd.is_none())
                        {
                            return Err(DeviceError::Invalid(format!(
                                "vector {} of irq index {index} has no trigger eventfd: set it before its unmask eventfd",
                                start as usize + i
                            )));
                        }
                        // Start every watch first: a failure changes nothing (the ones
                        // started are stopped once the lock is released).
                        let mut watches = Vec::with_capacity(n);
                        for (i, fd) in fds.iter_mut().enumerate() {
                            match fd.take() {
                                None => watches.push(None),
                                Some(fd) => match self.watch(index, start + i as u32, fd) {
                                    Ok(w) => watches.push(Some(w)),
                                    Err(e) => {
                                        graveyard.extend(watches.into_iter().flatten());
                                        return Err(e);
                                    }
                                },
                            }
                        }
                        for (v, w) in idx.vectors[range].iter_mut().zip(watches) {
                            graveyard.extend(std::mem::replace(&mut v.unmask, w));
                        }
                        return Ok(fire);
                    }
                };
                for (v, s) in idx.vectors[range].iter_mut().zip(sel) {
                    if !s {
                        continue;
                    }
                    if action == IrqAction::Mask {
                        v.masked = true;
                    } else {
                        unmask(v, flags, &mut fire);
                    }
                }
            }
            IrqAction::Trigger => match &mut *data {
                Data::None => {
                    for v in &mut idx.vectors[range] {
                        fire.extend(deliver(v, flags));
                    }
                }
                Data::Bool(b) => {
                    for (v, &s) in idx.vectors[range].iter_mut().zip(b.iter()) {
                        if s {
                            fire.extend(deliver(v, flags));
                        }
                    }
                }
                Data::Fds(fds) => {
                    for (v, fd) in idx.vectors[range].iter_mut().zip(fds.iter_mut()) {
                        v.fd = fd.take();
                        v.pending = false;
                        if v.fd.is_none() {
                            // No trigger, no unmask eventfd (as vfio_intx_disable).
                            graveyard.extend(v.unmask.take());
                        }
                    }
                }
            },
        }
        Ok(fire)
    }

    /// Raise vector `vector` of `index`. Returns true when an eventfd was signalled now
    /// (false: masked and left pending, no eventfd, no such vector, or the eventfd's
    /// counter was full and the interrupt dropped). The eventfd is written after the
    /// state lock is released and never blocks.
    pub fn trigger(&self, index: u32, vector: u32) -> bool {
        let fd = {
            let mut all = self.lock();
            let Some(idx) = all.get_mut(index as usize) else {
                return false;
            };
            let flags = idx.info.flags;
            match idx.vectors.get_mut(vector as usize) {
                Some(v) => deliver(v, flags),
                None => None,
            }
        };
        fd.is_some_and(|fd| fd.signal() == Signal::Delivered)
    }

    /// Interrupts dropped so far on vector `vector` of `index` because its eventfd's
    /// counter was full (0 without an eventfd).
    pub fn dropped(&self, index: u32, vector: u32) -> u64 {
        self.lock()
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .and_then(|v| v.fd.as_ref())
            .map_or(0, |fd| fd.dropped())
    }

    /// True when vector `vector` of `index` has an eventfd.
    pub fn has_eventfd(&self, index: u32, vector: u32) -> bool {
        self.lock()
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.fd.is_some())
    }

    /// True when vector `vector` of `index` has an unmask eventfd.
    pub fn has_unmask_eventfd(&self, index: u32, vector: u32) -> bool {
        self.lock()
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.unmask.is_some())
    }

    /// True when vector `vector` of `index` is masked.
    pub fn is_masked(&self, index: u32, vector: u32) -> bool {
        self.lock()
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.masked)
    }

    /// Drop every eventfd (trigger and unmask) and clear masks (the client went away).
    pub fn disable_all(&self) {
        let mut graveyard = Vec::new();
        for idx in self.lock().iter_mut() {
            for v in &mut idx.vectors {
                v.clear(&mut graveyard);
            }
        }
    }
}

/// A watched unmask eventfd of vector `vector` of `index` was signalled: unmask it, as
/// ACTION_UNMASK | DATA_NONE does, if `key` is still that vector's unmask eventfd (a
/// replaced or removed one does nothing) and the device still exists.
fn unmask_by_eventfd(target: &Weak<Shared>, index: u32, vector: u32, key: usize) {
    let Some(shared) = target.upgrade() else {
        return;
    };
    let irqs = Irqs { shared };
    let mut fire = Fire::new();
    {
        let mut all = irqs.lock();
        let Some(idx) = all.get_mut(index as usize) else {
            return;
        };
        let flags = idx.info.flags;
        let Some(v) = idx.vectors.get_mut(vector as usize) else {
            return;
        };
        let current = v
            .unmask
            .as_ref()
            .is_some_and(|w| Arc::as_ptr(w.fd()) as usize == key);
        if !current {
            return;
        }
        unmask(v, flags, &mut fire);
    }
    tracing::trace!(index, vector, "unmasked by eventfd");
    signal_all(fire);
    irqs.after_unmask(index);
}

/// A SET_IRQS payload whose fds were checked.
enum Data {
    None,
    Bool(Vec<bool>),
    Fds(Vec<Option<Arc<PeerEventFd>>>),
}

fn checked_eventfd(fd: OwnedFd) -> Result<Arc<PeerEventFd>> {
    PeerEventFd::from_peer(fd).map(Arc::new).map_err(|e| {
        tracing::debug!(error = %e, "SET_IRQS fd refused");
        DeviceError::Invalid(e.to_string())
    })
}

/// Unmask `v`; a pending interrupt fires now.
fn unmask(v: &mut Vector, flags: u32, fire: &mut Fire) {
    v.masked = false;
    if v.pending {
        v.pending = false;
        fire.extend(fire_vector(v, flags));
    }
}

/// Raise `v`: the eventfd to signal, or None (masked: now pending; or no eventfd).
fn deliver(v: &mut Vector, flags: u32) -> Option<Arc<PeerEventFd>> {
    if v.masked {
        v.pending = true;
        return None;
    }
    fire_vector(v, flags)
}

/// `v` fires: automask it if its index says so, and return its eventfd to signal.
fn fire_vector(v: &mut Vector, flags: u32) -> Option<Arc<PeerEventFd>> {
    let fd = v.fd.clone()?;
    if flags & irq_flags::AUTOMASKED != 0 {
        v.masked = true;
    }
    Some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventfd::test_fds::{count, eventfd};

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    #[test]
    fn trigger_mask_pending_unmask() {
        let irqs = Irqs::new(&[IrqInfo {
            index: 0,
            flags: irq_flags::EVENTFD | irq_flags::MASKABLE,
            count: 2,
        }]);
        let e = eventfd();
        irqs.set_irqs(
            0,
            IrqAction::Trigger,
            1,
            1,
            IrqData::Eventfd(vec![Some(dup(&e))]),
        )
        .unwrap();
        assert!(irqs.trigger(0, 1));
        assert_eq!(count(&e), 1);
        assert!(!irqs.trigger(0, 0), "vector 0 has no fd");
        irqs.set_irqs(0, IrqAction::Mask, 1, 1, IrqData::None)
            .unwrap();
        assert!(!irqs.trigger(0, 1));
        assert_eq!(count(&e), 0);
        irqs.set_irqs(0, IrqAction::Unmask, 0, 2, IrqData::Bool(vec![false, true]))
            .unwrap();
        assert_eq!(count(&e), 1, "pending interrupt delivered at unmask");
        irqs.set_irqs(0, IrqAction::Trigger, 0, 0, IrqData::None)
            .unwrap();
        assert!(!irqs.has_eventfd(0, 1));
    }

    /// Index 0: one automasked, maskable line (INTx-like) with an eventfd trigger
    /// attached, returned with the `Irqs`; index 1: `count` eventfd vectors that can be
    /// neither masked nor resized (MSI-like).
    fn automasked_with_trigger(count: u32) -> (Irqs, OwnedFd) {
        let irqs = Irqs::new(&[
            IrqInfo {
                index: 0,
                flags: irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
                count: 1,
            },
            IrqInfo {
                index: 1,
                flags: irq_flags::EVENTFD | irq_flags::NORESIZE,
                count,
            },
        ]);
        let trigger = eventfd();
        irqs.set_irqs(
            0,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(dup(&trigger))]),
        )
        .unwrap();
        (irqs, trigger)
    }

    #[test]
    fn automask_and_bad_requests() {
        let (irqs, e) = automasked_with_trigger(1);
        assert!(irqs.trigger(0, 0));
        assert!(irqs.is_masked(0, 0));
        assert!(!irqs.trigger(0, 0));
        irqs.set_irqs(0, IrqAction::Unmask, 0, 1, IrqData::None)
            .unwrap();
        assert_eq!(count(&e), 2);
        assert!(irqs
            .set_irqs(1, IrqAction::Mask, 0, 1, IrqData::None)
            .is_err());
        assert!(irqs
            .set_irqs(0, IrqAction::Trigger, 0, 2, IrqData::None)
            .is_err());
        assert!(irqs
            .set_irqs(0, IrqAction::Trigger, u32::MAX, 2, IrqData::None)
            .is_err());
        assert!(irqs
            .set_irqs(2, IrqAction::Trigger, 0, 1, IrqData::None)
            .is_err());
        assert!(irqs
            .set_irqs(0, IrqAction::Trigger, 0, 1, IrqData::Bool(vec![true, true]))
            .is_err());
        assert!(irqs
            .set_irqs(0, IrqAction::Mask, 0, 0, IrqData::None)
            .is_err());
    }

    #[test]
    fn unmask_eventfd_errors() {
        let (irqs, trigger) = automasked_with_trigger(2);
        let unmask = |index, fd: OwnedFd| {
            irqs.set_irqs(
                index,
                IrqAction::Unmask,
                0,
                1,
                IrqData::Eventfd(vec![Some(fd)]),
            )
            .map_err(|e| e.errno())
        };
        // MSI-style index (not maskable): EINVAL, and no thread or fd kept.
        assert_eq!(unmask(1, eventfd()), Err(libc::EINVAL));
        // Not an eventfd: EINVAL.
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert_eq!(unmask(0, null), Err(libc::EINVAL));
        // No such index; too many vectors.
        assert_eq!(unmask(7, eventfd()), Err(libc::EINVAL));
        assert_eq!(
            irqs.set_irqs(
                0,
                IrqAction::Unmask,
                0,
                2,
                IrqData::Eventfd(vec![Some(eventfd()), Some(eventfd())])
            )
            .map_err(|e| e.errno()),
            Err(libc::EINVAL)
        );
        // Mask by eventfd stays unsupported.
        assert_eq!(
            irqs.set_irqs(
                0,
                IrqAction::Mask,
                0,
                1,
                IrqData::Eventfd(vec![Some(eventfd())])
            )
            .map_err(|e| e.errno()),
            Err(libc::ENOTSUP)
        );
        assert!(!irqs.has_unmask_eventfd(0, 0));
        unmask(0, eventfd()).unwrap();
        assert!(irqs.has_unmask_eventfd(0, 0));
        irqs.disable_all();
        assert!(!irqs.has_unmask_eventfd(0, 0));
        assert_eq!(count(&trigger), 0);
    }

    #[test]
    fn a_signal_pending_at_registration_is_not_lost() {
        let irqs = Irqs::new(&[IrqInfo {
            index: 0,
            flags: irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
            count: 1,
        }]);
        let trigger = eventfd();
        irqs.set_irqs(
            0,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(dup(&trigger))]),
        )
        .unwrap();
        assert!(irqs.trigger(0, 0));
        assert!(irqs.is_masked(0, 0));
        let unmask = eventfd();
        crate::irq::signal_eventfd(&unmask).unwrap();
        irqs.set_irqs(
            0,
            IrqAction::Unmask,
            0,
            1,
            IrqData::Eventfd(vec![Some(dup(&unmask))]),
        )
        .unwrap();
        let t = std::time::Instant::now();
        while irqs.is_masked(0, 0) {
            assert!(t.elapsed().as_secs() < 5, "the pending unmask was lost");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
