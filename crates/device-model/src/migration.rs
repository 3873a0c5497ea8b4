//! VFIO migration v2: device states, the arcs between them, and a reusable state machine.
//!
//! The user asks for a *target* state; the device walks the shortest chain of single
//! arcs to it, as the Linux VFIO core does (`vfio_mig_get_next_state`). Data states
//! (STOP_COPY, RESUMING) are never passed through on the way somewhere else, nor are the
//! PRE_COPY states unless the walk starts in one. An arc that fails leaves the device in
//! ERROR, from which only a reset leaves.
//!
//! [`MigrationData`] is the other half a device needs: the data stream. It holds the
//! serialised state while it is read out in chunks (saving) and collects the chunks of
//! an incoming state (resuming), checking the migration state, offsets and bounds of
//! every MIG_DATA_READ / MIG_DATA_WRITE in one place, so every device answers the same
//! request with the same errno.

use std::collections::VecDeque;

use crate::{DeviceError, Result, VfioDevice};

/// The whole data stream `dev` has to send in its current saving state (PRE_COPY or
/// STOP_COPY): MIG_DATA_READs of `chunk` bytes until one returns nothing. The first
/// failed read is the error.
pub fn read_stream<D: VfioDevice + ?Sized>(dev: &D, chunk: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = dev.mig_data_read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

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

/// The open data transfer session of a [`MigrationData`].
#[derive(Debug, Default)]
enum Session {
    /// No session: the device is in a state without a data stream.
    #[default]
    Closed,
    /// Saving: `data` is read out from `pos`.
    Saving { data: Vec<u8>, pos: usize },
    /// Resuming: chunks are appended to `data`.
    Resuming { data: Vec<u8> },
}

/// The device side of the migration data stream (VFIO v2 `data_fd`, vfio-user
/// MIG_DATA_READ / MIG_DATA_WRITE).
///
/// A device opens a session on the arcs that start one and closes it on the arcs that
/// end one (see [`MigrationData::begin_save`], [`MigrationData::begin_resume`],
/// [`MigrationData::finish_resume`], [`MigrationData::close`]); reads and writes in
/// between are checked here:
///
/// - a read is served only in a saving state (STOP_COPY, PRE_COPY, PRE_COPY_P2P) with
///   a saving session open; it returns the next bytes, 0 at the end of the stream;
/// - a write is accepted only in RESUMING with a resuming session open, and only while
///   the collected stream stays within the device's limit (given at construction).
///
/// **Errno of a read or write without an open stream: EINVAL**
/// ([`DeviceError::Invalid`]). In the Linux VFIO migration v2 uAPI a data transfer
/// session exists only between the arc that opens it (entering STOP_COPY, PRE_COPY or
/// RESUMING returns a new data fd) and the arc that terminates it; outside it there is
/// no stream to read or write, so the request is invalid for the device's current
/// state rather than temporarily impossible. The one state-dependent errno the uAPI
/// names for an operation on the data stream is EINVAL (VFIO_MIG_GET_PRECOPY_INFO
/// outside the PRE_COPY states). The vfio-user specification defines MIG_DATA_READ for
/// the saving states and MIG_DATA_WRITE for RESUMING without naming an errno, and
/// carries VFIO's semantics over. EBUSY would tell the client to retry the same
/// request later, which can never succeed without a state change it must make itself.
/// A write beyond the device's limit is EINVAL too (a stream no device of this kind
/// produced).
#[derive(Debug)]
pub struct MigrationData {
    device: &'static str,
    max_resume: usize,
    session: Session,
}

impl MigrationData {
    /// No session open. `device` names the device in error messages; `max_resume` is
    /// the largest stream accepted while resuming.
    pub fn new(device: &'static str, max_resume: usize) -> Self {
        MigrationData {
            device,
            max_resume,
            session: Session::Closed,
        }
    }

    /// The largest stream accepted while resuming.
    pub fn max_resume(&self) -> usize {
        self.max_resume
    }

    /// Open a saving session over the serialised state `data` (on STOP -> STOP_COPY, or
    /// RUNNING -> PRE_COPY). Replaces any open session, so it is not for PRE_COPY ->
    /// STOP_COPY, which continues the stream PRE_COPY opened.
    pub fn begin_save(&mut self, data: Vec<u8>) {
        self.session = Session::Saving { data, pos: 0 };
    }

    /// Append `more` to the open saving session (PRE_COPY -> STOP_COPY: the final
    /// state follows what PRE_COPY streamed, unread bytes included); opens a session
    /// over `more` when none is open.
    pub fn continue_save(&mut self, more: Vec<u8>) {
        match &mut self.session {
            Session::Saving { data, .. } => data.extend_from_slice(&more),
            _ => self.begin_save(more),
        }
    }

    /// Open an empty resuming session (on STOP -> RESUMING). Replaces any open session.
    pub fn begin_resume(&mut self) {
        self.session = Session::Resuming { data: Vec::new() };
    }

    /// Close the resuming session and hand over the collected stream (on RESUMING ->
    /// STOP). Fails, closing whatever was open, when no resuming session was open.
    pub fn finish_resume(&mut self) -> Result<Vec<u8>> {
        match std::mem::take(&mut self.session) {
            Session::Resuming { data } => Ok(data),
            _ => Err(DeviceError::Invalid(format!(
                "{} migration: no resuming session to complete; move the device to RESUMING first",
                self.device
            ))),
        }
    }

    /// Close any session (an arc that ends one, or a device reset).
    pub fn close(&mut self) {
        self.session = Session::Closed;
    }

    /// True while a saving session is open.
    pub fn saving(&self) -> bool {
        matches!(self.session, Session::Saving { .. })
    }

    /// True while a resuming session is open.
    pub fn resuming(&self) -> bool {
        matches!(self.session, Session::Resuming { .. })
    }

    /// Bytes of the saving session not read yet (0 without one).
    pub fn remaining(&self) -> usize {
        match &self.session {
            Session::Saving { data, pos } => data.len().saturating_sub(*pos),
            _ => 0,
        }
    }

    /// Bytes collected by the resuming session (0 without one).
    pub fn received(&self) -> usize {
        match &self.session {
            Session::Resuming { data } => data.len(),
            _ => 0,
        }
    }

    /// MIG_DATA_READ in migration state `state`: copy the next bytes of the stream
    /// into `buf`; returns how many (0: end of stream). See the type documentation for
    /// the errors.
    pub fn read(&mut self, state: MigState, buf: &mut [u8]) -> Result<usize> {
        let saving_state = matches!(
            state,
            MigState::StopCopy | MigState::PreCopy | MigState::PreCopyP2p
        );
        match &mut self.session {
            Session::Saving { data, pos } if saving_state => {
                let start = (*pos).min(data.len());
                let n = buf.len().min(data.len() - start);
                buf[..n].copy_from_slice(&data[start..start + n]);
                *pos = start + n;
                Ok(n)
            }
            _ => Err(DeviceError::Invalid(format!(
                "{} migration data can be read only in STOP_COPY or PRE_COPY (device is in {state:?}); move it to STOP_COPY first",
                self.device
            ))),
        }
    }

    /// MIG_DATA_WRITE in migration state `state`: append `chunk` to the incoming
    /// stream. See the type documentation for the errors; a refused chunk leaves the
    /// collected stream unchanged.
    pub fn write(&mut self, state: MigState, chunk: &[u8]) -> Result<()> {
        match &mut self.session {
            Session::Resuming { data } if state == MigState::Resuming => {
                match data.len().checked_add(chunk.len()) {
                    Some(total) if total <= self.max_resume => {
                        data.extend_from_slice(chunk);
                        Ok(())
                    }
                    _ => Err(DeviceError::Invalid(format!(
                        "{} migration stream is longer than the {} bytes such a device produces; resume only from a stream saved by the same kind of device and nestio version",
                        self.device, self.max_resume
                    ))),
                }
            }
            _ => Err(DeviceError::Invalid(format!(
                "{} migration data can be written only in RESUMING (device is in {state:?}); move it to RESUMING first",
                self.device
            ))),
        }
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

    #[test]
    fn data_stream_read_in_chunks() {
        let mut d = MigrationData::new("test", 16);
        let mut buf = [0u8; 4];
        d.begin_save((0u8..10).collect());
        assert!(d.saving() && !d.resuming());
        assert_eq!(d.remaining(), 10);
        assert_eq!(d.read(StopCopy, &mut buf).unwrap(), 4);
        assert_eq!(buf, [0, 1, 2, 3]);
        assert_eq!(d.read(StopCopy, &mut buf).unwrap(), 4);
        assert_eq!(d.read(StopCopy, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], &[8, 9]);
        assert_eq!(d.read(StopCopy, &mut buf).unwrap(), 0, "end of stream");
        assert_eq!(d.read(StopCopy, &mut []).unwrap(), 0);
        assert_eq!(d.remaining(), 0);
        d.close();
        assert!(!d.saving());
        assert_eq!(
            d.read(StopCopy, &mut buf).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn precopy_stream_continues_into_stop_copy() {
        let mut d = MigrationData::new("test", 16);
        let mut buf = [0u8; 2];
        d.begin_save(vec![1, 2, 3]);
        assert_eq!(d.read(PreCopy, &mut buf).unwrap(), 2);
        d.continue_save(vec![4, 5]);
        assert_eq!(d.remaining(), 3, "the unread PRE_COPY byte stays ahead");
        let mut rest = [0u8; 8];
        assert_eq!(d.read(StopCopy, &mut rest).unwrap(), 3);
        assert_eq!(&rest[..3], &[3, 4, 5]);
        d.close();
        d.continue_save(vec![9]);
        assert_eq!(d.remaining(), 1, "without a session it opens one");
    }

    #[test]
    fn data_stream_write_bounded() {
        let mut d = MigrationData::new("test", 8);
        assert!(d.finish_resume().is_err(), "no session");
        d.begin_resume();
        d.write(Resuming, &[1, 2, 3]).unwrap();
        d.write(Resuming, &[]).unwrap();
        d.write(Resuming, &[4, 5, 6, 7, 8]).unwrap();
        assert_eq!(d.received(), 8);
        let e = d.write(Resuming, &[9]).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert_eq!(d.received(), 8, "a refused chunk is not kept");
        assert_eq!(d.finish_resume().unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(!d.resuming());
        assert!(d.finish_resume().is_err(), "finish closes the session");
    }

    #[test]
    fn data_stream_wrong_state_is_einval() {
        let mut d = MigrationData::new("test", 8);
        let mut buf = [0u8; 4];
        for s in MigState::ALL {
            // No session open: every state refuses both directions.
            assert_eq!(d.read(s, &mut buf).unwrap_err().errno(), libc::EINVAL);
            assert_eq!(d.write(s, &[1]).unwrap_err().errno(), libc::EINVAL);
        }
        d.begin_save(vec![1, 2, 3]);
        for s in [Error, Stop, Running, Resuming, RunningP2p] {
            assert_eq!(d.read(s, &mut buf).unwrap_err().errno(), libc::EINVAL);
        }
        for s in MigState::ALL {
            assert_eq!(
                d.write(s, &[1]).unwrap_err().errno(),
                libc::EINVAL,
                "no write into a saving session ({s:?})"
            );
        }
        assert_eq!(d.read(PreCopy, &mut buf).unwrap(), 3);
        d.begin_resume();
        for s in [
            Error, Stop, Running, StopCopy, RunningP2p, PreCopy, PreCopyP2p,
        ] {
            assert_eq!(d.write(s, &[1]).unwrap_err().errno(), libc::EINVAL);
        }
        for s in MigState::ALL {
            assert_eq!(d.read(s, &mut buf).unwrap_err().errno(), libc::EINVAL);
        }
        assert_eq!(d.received(), 0);
    }
}
