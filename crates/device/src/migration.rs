//! VFIO migration v2: device states, the arcs between them, and a reusable state machine.
//!
//! The user asks for a *target* state; the device walks the shortest chain of single
//! arcs to it, as the Linux VFIO core does (`vfio_mig_get_next_state`). Data states
//! (STOP_COPY, RESUMING) are never passed through on the way somewhere else, nor are the
//! PRE_COPY states unless the walk starts in one. An arc that fails leaves the device in
//! ERROR, from which only a reset leaves.

use std::collections::VecDeque;

use crate::{DeviceError, Result};

/// `enum vfio_device_mig_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigState {
    /// The device failed a transition; reset to leave.
    Error = 0,
    /// Stopped: no DMA, no interrupts, no state change.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped, producing its final state on the data stream.
    StopCopy = 3,
    /// Stopped, consuming a state from the data stream.
    Resuming = 4,
    /// Running but quiet towards peers (no outgoing P2P DMA / interrupts).
    RunningP2p = 5,
    /// Running, producing an initial state on the data stream.
    PreCopy = 6,
    /// PRE_COPY, quiet towards peers.
    PreCopyP2p = 7,
}

impl MigState {
    /// From the wire value.
    pub fn from_u32(v: u32) -> Option<MigState> {
        Some(match v {
            0 => MigState::Error,
            1 => MigState::Stop,
            2 => MigState::Running,
            3 => MigState::StopCopy,
            4 => MigState::Resuming,
            5 => MigState::RunningP2p,
            6 => MigState::PreCopy,
            7 => MigState::PreCopyP2p,
            _ => return None,
        })
    }

    const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];
}

/// `VFIO_MIGRATION_*` flags a device supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigrationFlags(pub u64);

impl MigrationFlags {
    /// STOP_COPY (mandatory).
    pub const STOP_COPY: u64 = 1;
    /// The P2P states.
    pub const P2P: u64 = 2;
    /// The PRE_COPY states.
    pub const PRE_COPY: u64 = 4;

    /// Is the state offered with these flags?
    pub fn supports(self, s: MigState) -> bool {
        match s {
            MigState::Error | MigState::Stop | MigState::Running => true,
            MigState::StopCopy | MigState::Resuming => self.0 & Self::STOP_COPY != 0,
            MigState::RunningP2p => self.0 & Self::P2P != 0,
            MigState::PreCopy => self.0 & Self::PRE_COPY != 0,
            MigState::PreCopyP2p => {
                self.0 & (Self::P2P | Self::PRE_COPY) == Self::P2P | Self::PRE_COPY
            }
        }
    }
}

/// Is there a single arc `from -> to` with these flags?
pub fn is_arc(flags: MigrationFlags, from: MigState, to: MigState) -> bool {
    use MigState::*;
    if !flags.supports(from) || !flags.supports(to) || from == Error || to == Error {
        return false;
    }
    let p2p = flags.0 & MigrationFlags::P2P != 0;
    match (from, to) {
        (Running, Stop) | (Stop, Running) => !p2p,
        (Stop, StopCopy) | (StopCopy, Stop) | (Stop, Resuming) | (Resuming, Stop) => true,
        (Running, RunningP2p) | (RunningP2p, Running) | (RunningP2p, Stop) | (Stop, RunningP2p) => {
            true
        }
        (Running, PreCopy) | (PreCopy, Running) => true,
        (PreCopy, StopCopy) => !p2p,
        (PreCopy, PreCopyP2p) | (PreCopyP2p, PreCopy) | (PreCopyP2p, StopCopy) => true,
        (RunningP2p, PreCopyP2p) | (PreCopyP2p, RunningP2p) => true,
        _ => false,
    }
}

/// The chain of states from `from` to `to` (excluding `from`), or an error when the
/// target is not reachable.
pub fn path(flags: MigrationFlags, from: MigState, to: MigState) -> Result<Vec<MigState>> {
    if from == to {
        return Ok(Vec::new());
    }
    if !flags.supports(to) || to == MigState::Error {
        return Err(DeviceError::Invalid(format!(
            "migration state {to:?} is not offered by this device"
        )));
    }
    if from == MigState::Error {
        return Err(DeviceError::Invalid(
            "device is in the migration ERROR state; reset it first".into(),
        ));
    }
    let from_pre = matches!(from, MigState::PreCopy | MigState::PreCopyP2p);
    let transit_ok = |s: MigState| match s {
        MigState::StopCopy | MigState::Resuming | MigState::Error => false,
        MigState::PreCopy | MigState::PreCopyP2p => from_pre,
        _ => true,
    };
    let mut prev: [Option<MigState>; 8] = [None; 8];
    let mut seen = [false; 8];
    seen[from as usize] = true;
    let mut q = VecDeque::from([from]);
    while let Some(s) = q.pop_front() {
        if s != from && !transit_ok(s) {
            continue;
        }
        for n in MigState::ALL {
            if seen[n as usize] || !is_arc(flags, s, n) {
                continue;
            }
            seen[n as usize] = true;
            prev[n as usize] = Some(s);
            if n == to {
                let mut out = vec![to];
                let mut c = to;
                while let Some(p) = prev[c as usize] {
                    if p == from {
                        break;
                    }
                    out.push(p);
                    c = p;
                }
                out.reverse();
                return Ok(out);
            }
            q.push_back(n);
        }
    }
    Err(DeviceError::Invalid(format!(
        "no migration transition from {from:?} to {to:?}"
    )))
}

/// A device's migration state machine: walks arcs and calls the device for each.
#[derive(Debug, Clone)]
pub struct MigrationFsm {
    flags: MigrationFlags,
    state: MigState,
}

impl MigrationFsm {
    /// A state machine in RUNNING.
    pub fn new(flags: MigrationFlags) -> Self {
        MigrationFsm {
            flags: MigrationFlags(flags.0 | MigrationFlags::STOP_COPY),
            state: MigState::Running,
        }
    }
    /// Offered flags.
    pub fn flags(&self) -> MigrationFlags {
        self.flags
    }
    /// Current state.
    pub fn state(&self) -> MigState {
        self.state
    }
    /// Back to RUNNING (device reset).
    pub fn reset(&mut self) {
        self.state = MigState::Running;
    }
    /// Walk to `target`, calling `step(from, to)` for every arc. A failing step puts the
    /// machine in ERROR and returns the step's error.
    pub fn transition(
        &mut self,
        target: MigState,
        mut step: impl FnMut(MigState, MigState) -> Result<()>,
    ) -> Result<MigState> {
        for next in path(self.flags, self.state, target)? {
            if let Err(e) = step(self.state, next) {
                tracing::warn!(from = ?self.state, to = ?next, error = %e, "migration arc failed");
                self.state = MigState::Error;
                return Err(e);
            }
            self.state = next;
        }
        Ok(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    const BASIC: MigrationFlags = MigrationFlags(1);
    const ALL: MigrationFlags = MigrationFlags(7);

    #[test]
    fn basic_paths() {
        assert_eq!(
            path(BASIC, Running, StopCopy).unwrap(),
            vec![Stop, StopCopy]
        );
        assert_eq!(
            path(BASIC, StopCopy, Resuming).unwrap(),
            vec![Stop, Resuming]
        );
        assert_eq!(path(BASIC, Resuming, Running).unwrap(), vec![Stop, Running]);
        assert!(path(BASIC, Running, PreCopy).is_err());
        assert!(path(BASIC, Error, Running).is_err());
        assert!(path(BASIC, Running, Error).is_err());
    }

    #[test]
    fn p2p_and_precopy_paths() {
        assert_eq!(
            path(ALL, Running, StopCopy).unwrap(),
            vec![RunningP2p, Stop, StopCopy]
        );
        assert_eq!(path(ALL, Running, PreCopy).unwrap(), vec![PreCopy]);
        assert_eq!(
            path(ALL, PreCopy, StopCopy).unwrap(),
            vec![PreCopyP2p, StopCopy]
        );
        assert_eq!(path(ALL, Stop, Running).unwrap(), vec![RunningP2p, Running]);
        // A data state is never a transit state.
        assert_eq!(path(ALL, Resuming, StopCopy).unwrap(), vec![Stop, StopCopy]);
    }

    #[test]
    fn failing_arc_enters_error() {
        let mut fsm = MigrationFsm::new(BASIC);
        let r = fsm.transition(StopCopy, |_, to| {
            if to == StopCopy {
                Err(DeviceError::Invalid("boom".into()))
            } else {
                Ok(())
            }
        });
        assert!(r.is_err());
        assert_eq!(fsm.state(), Error);
        assert!(fsm.transition(Running, |_, _| Ok(())).is_err());
        fsm.reset();
        assert_eq!(fsm.transition(Stop, |_, _| Ok(())).unwrap(), Stop);
    }
}
