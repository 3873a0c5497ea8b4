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
//! The fds come from the peer and are hostile until checked: SET_IRQS accepts only
//! eventfds ([`PeerEventFd::from_peer`], EINVAL otherwise, and nothing of the request is
//! applied), and a vector is signalled *after* the state lock is released, through a
//! write that never blocks: a full counter is a dropped, counted interrupt. So no fd a
//! peer chooses can stall SET_IRQS, another vector or another device.

use parking_lot::Mutex;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::eventfd::{PeerEventFd, Signal};
use crate::{irq_flags, DeviceError, IrqAction, IrqData, IrqInfo, Result};

#[derive(Default)]
struct Vector {
    fd: Option<Arc<PeerEventFd>>,
    masked: bool,
    pending: bool,
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

/// The interrupt indices of one device. See the module documentation.
pub struct Irqs {
    indices: Mutex<Vec<Index>>,
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
            indices: Mutex::new(indices),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Vec<Index>> {
        self.indices.lock()
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
        let data = match data {
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
        let fire = self.apply(index, action, start, count, data)?;
        signal_all(fire);
        Ok(())
    }

    fn apply(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: Data,
    ) -> Result<Fire> {
        let mut fire = Fire::new();
        let mut all = self.lock();
        let idx = all
            .get_mut(index as usize)
            .ok_or(DeviceError::NoSuchIrq(index))?;
        let flags = idx.info.flags;
        // count 0 + DATA_NONE + TRIGGER: disable every vector of the index.
        if count == 0 {
            return match (action, &data) {
                (IrqAction::Trigger, Data::None) => {
                    for v in &mut idx.vectors {
                        *v = Vector::default();
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
        match &data {
            Data::Bool(b) if b.len() != n => {
                return Err(DeviceError::Invalid(format!(
                    "{} bools for {count} vectors",
                    b.len()
                )))
            }
            Data::Fds(f) if f.len() != n => {
                return Err(DeviceError::Invalid(format!(
                    "{} eventfds for {count} vectors",
                    f.len()
                )))
            }
            _ => {}
        }
        let range = start as usize..end as usize;
        match action {
            IrqAction::Mask | IrqAction::Unmask => {
                if flags & irq_flags::MASKABLE == 0 {
                    return Err(DeviceError::Invalid(format!(
                        "irq index {index} cannot be masked"
                    )));
                }
                let sel: Vec<bool> = match data {
                    Data::None => vec![true; n],
                    Data::Bool(b) => b,
                    Data::Fds(_) => {
                        return Err(DeviceError::Unsupported(
                            "mask/unmask by eventfd (resampling irqfd)".into(),
                        ))
                    }
                };
                for (v, s) in idx.vectors[range].iter_mut().zip(sel) {
                    if !s {
                        continue;
                    }
                    if action == IrqAction::Mask {
                        v.masked = true;
                    } else {
                        v.masked = false;
                        if v.pending {
                            v.pending = false;
                            fire.extend(fire_vector(v, flags));
                        }
                    }
                }
            }
            IrqAction::Trigger => match data {
                Data::None => {
                    for v in &mut idx.vectors[range] {
                        fire.extend(deliver(v, flags));
                    }
                }
                Data::Bool(b) => {
                    for (v, s) in idx.vectors[range].iter_mut().zip(b) {
                        if s {
                            fire.extend(deliver(v, flags));
                        }
                    }
                }
                Data::Fds(fds) => {
                    for (v, fd) in idx.vectors[range].iter_mut().zip(fds) {
                        v.fd = fd;
                        v.pending = false;
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

    /// True when vector `vector` of `index` is masked.
    pub fn is_masked(&self, index: u32, vector: u32) -> bool {
        self.lock()
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.masked)
    }

    /// Drop every eventfd and clear masks (the client went away).
    pub fn disable_all(&self) {
        for idx in self.lock().iter_mut() {
            for v in &mut idx.vectors {
                *v = Vector::default();
            }
        }
    }
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
    use std::os::fd::FromRawFd;

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd returns a new fd or -1; we check and take ownership.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn count(fd: &OwnedFd) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local u64.
        let r = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        if r == 8 {
            v
        } else {
            0
        }
    }

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

    #[test]
    fn automask_and_bad_requests() {
        let irqs = Irqs::new(&[
            IrqInfo {
                index: 0,
                flags: irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
                count: 1,
            },
            IrqInfo {
                index: 1,
                flags: irq_flags::EVENTFD | irq_flags::NORESIZE,
                count: 1,
            },
        ]);
        let e = eventfd();
        irqs.set_irqs(
            0,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(dup(&e))]),
        )
        .unwrap();
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
}
