//! A recording [`IrqChip`] for tests: allocates numbers like the x86 chip (wired lines
//! as asked, messages from 100 up) and records every call, so the PCI code's interrupt
//! wiring can be checked without `/dev/kvm`.

use nestio_device_model::pci::MsiMessage;
use parking_lot::Mutex;
use vmm_sys_util::eventfd::EventFd;

use super::{
    IrqChip, IrqChipError, IrqChipSnapshot, IrqSource, MessageState, SourceKind, SourceRequest,
    SourceState,
};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IrqCall {
    Allocate(SourceRequest, u32),
    Attach { source: u32, resample: bool },
    Detach { source: u32 },
    ProgramMsi(Vec<(u32, Option<MsiMessage>)>),
}

#[derive(Default)]
pub(crate) struct RecordingIrqChip {
    calls: Mutex<Vec<IrqCall>>,
    next_msi: Mutex<u32>,
    state: Mutex<std::collections::BTreeMap<u32, SourceState>>,
}

impl RecordingIrqChip {
    /// Every call so far, and forget them.
    pub(crate) fn take(&self) -> Vec<IrqCall> {
        std::mem::take(&mut *self.calls.lock())
    }
    fn record(&self, c: IrqCall) {
        self.calls.lock().push(c);
    }
}

impl IrqChip for RecordingIrqChip {
    fn model(&self) -> &'static str {
        "recording"
    }
    fn allocate(&self, request: SourceRequest) -> Result<IrqSource, IrqChipError> {
        let (n, kind) = match request {
            SourceRequest::PciIntx { slot, pin } => {
                (16 + u32::from(slot + pin) % 8, SourceKind::Line)
            }
            SourceRequest::Line(n) => (n, SourceKind::Line),
            SourceRequest::PlatformLine => (12, SourceKind::Line),
            SourceRequest::Msi => {
                let mut m = self.next_msi.lock();
                *m += 1;
                (99 + *m, SourceKind::Msi)
            }
        };
        self.state.lock().entry(n).or_insert(SourceState {
            number: n,
            kind,
            message: None,
            attached: 0,
            resample: false,
        });
        self.record(IrqCall::Allocate(request, n));
        Ok(IrqSource::new(n, kind))
    }
    fn attach(
        &self,
        source: IrqSource,
        _trigger: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), IrqChipError> {
        let mut st = self.state.lock();
        let s = st
            .get_mut(&source.number())
            .ok_or(IrqChipError::UnknownSource(source.number()))?;
        s.attached += 1;
        s.resample |= resample.is_some();
        self.record(IrqCall::Attach {
            source: source.number(),
            resample: resample.is_some(),
        });
        Ok(())
    }
    fn detach(&self, source: IrqSource, _trigger: &EventFd) -> Result<(), IrqChipError> {
        let mut st = self.state.lock();
        let s = st
            .get_mut(&source.number())
            .ok_or(IrqChipError::UnknownSource(source.number()))?;
        s.attached = s.attached.saturating_sub(1);
        self.record(IrqCall::Detach {
            source: source.number(),
        });
        Ok(())
    }
    fn program_msi(&self, updates: &[(IrqSource, Option<MsiMessage>)]) -> Result<(), IrqChipError> {
        let mut st = self.state.lock();
        for (s, m) in updates {
            if let Some(x) = st.get_mut(&s.number()) {
                x.message = m.map(MessageState::from);
            }
        }
        self.record(IrqCall::ProgramMsi(
            updates.iter().map(|(s, m)| (s.number(), *m)).collect(),
        ));
        Ok(())
    }
    fn snapshot(&self) -> IrqChipSnapshot {
        IrqChipSnapshot {
            model: "recording".into(),
            sources: self.state.lock().values().cloned().collect(),
        }
    }
}
