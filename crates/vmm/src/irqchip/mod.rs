//! The interrupt controller seam: how a device's interrupt eventfds reach the guest's
//! interrupt controller, whatever that controller is.
//!
//! # Design
//!
//! Every interrupt a device raises is an eventfd write (`SET_IRQS` handed the device
//! the eventfd). What turns that write into a guest interrupt is the platform's
//! interrupt controller, and it differs per architecture: on x86 KVM's in-kernel
//! IOAPIC / 8259 pair and LAPIC, with MSIs delivered through GSI routes; on Power the
//! XIVE (a source number per interrupt, an event queue per target); on Arm the GIC
//! with its ITS. The bus code (PCI, platform devices) must not know which one it
//! talks to, so it only speaks the [`IrqChip`] trait, in the style of Cloud
//! Hypervisor's `vm-device` interrupt manager:
//!
//! 1. **Allocate a source** ([`IrqChip::allocate`]) for what the bus needs: the INTx
//!    pin of a PCI function ([`SourceRequest::PciIntx`]: the chip applies its own
//!    swizzle and wiring policy), a fixed legacy line ([`SourceRequest::Line`], e.g.
//!    the UART's), a wired line for a non-PCI device ([`SourceRequest::PlatformLine`]),
//!    or a message-signalled source ([`SourceRequest::Msi`]). The answer is an opaque
//!    [`IrqSource`] whose [`IrqSource::number`] is what the guest knows it by (a GSI on
//!    x86, a XIVE source number on Power).
//! 2. **Attach an eventfd** to a source ([`IrqChip::attach`]), with a resample eventfd
//!    for a level-triggered line (signalled when the guest EOIs, so the VMM can unmask
//!    the device's INTx) or without one for edges and messages. [`IrqChip::detach`]
//!    undoes it.
//! 3. **Program a message** ([`IrqChip::program_msi`]): what the guest wrote in an MSI
//!    capability or MSI-X table entry (address/data), for a batch of sources at once
//!    (on x86 every change rewrites KVM's whole routing table, so a batch is one
//!    ioctl). `None` removes a source's message.
//! 4. **Mask / unmask** ([`IrqChip::mask`], [`IrqChip::unmask`]): a masked source is a
//!    detached eventfd. The eventfd keeps counting while detached, so the bus can show
//!    the vector pending (MSI-X PBA), and the controller delivers it when the eventfd
//!    is attached again.
//! 5. **Describe itself for migration** ([`IrqChip::snapshot`]): a serialisable
//!    [`IrqChipSnapshot`] of every source, its message and attachment state.
//!
//! Implementations: [`x86::KvmIrqChip`] (KVM's in-kernel irqchip; the PCI INTx wiring
//! policy [`x86::IntxRouting`] lives there) is the first. [`xive::XiveIrqChip`] is the
//! second (sources are XIVE interrupt numbers; `attach` hands the eventfd to the chip's
//! delivery thread, which triggers the source in the model; `program_msi` steers a
//! vector by its data, the source number, when the address is the XIVE MSI address, as
//! sPAPR's MSI window does), with no change to `crate::pci`. A recording fake (`fake.rs`, tests only) makes the PCI
//! code testable without `/dev/kvm`.

pub mod x86;
pub mod xive;

#[cfg(test)]
pub(crate) mod fake;

use nestio_device_model::pci::MsiMessage;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Which interrupt controller a VM gets ([`crate::VmConfig::irqchip`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqChipKind {
    /// KVM's in-kernel IOAPIC/PIC/LAPIC with GSI routes ([`x86::KvmIrqChip`]).
    #[default]
    X86,
    /// The XIVE model ([`xive::XiveIrqChip`]): sources, event queues in guest RAM, a
    /// TIMA per vCPU, the `H_INT_*` hypercalls; notifications arrive as
    /// [`xive::XIVE_VECTOR`].
    Xive,
}

/// What a bus asks the interrupt controller for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRequest {
    /// The INTx line of PCI function `slot` (device number on bus 0), `pin` 1..=4
    /// (INTA..INTD): the controller decides which line that is.
    PciIntx {
        /// Device number.
        slot: u8,
        /// Interrupt pin, 1 = INTA .. 4 = INTD.
        pin: u8,
    },
    /// This exact legacy line (a platform-defined number: an x86 GSI).
    Line(u32),
    /// A free wired line for a non-PCI (platform) device.
    PlatformLine,
    /// A message-signalled source (MSI / MSI-X vector).
    Msi,
}

/// The kind of an allocated source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SourceKind {
    /// A wired line (level-triggered when attached with a resample eventfd).
    Line,
    /// A message-signalled source, delivered per its programmed message.
    Msi,
}

/// A source allocated by an [`IrqChip`]: small, copyable, meaningful only to the chip
/// that allocated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IrqSource {
    number: u32,
    kind: SourceKind,
}

impl IrqSource {
    /// A source handle; only interrupt controllers create these.
    pub fn new(number: u32, kind: SourceKind) -> Self {
        IrqSource { number, kind }
    }
    /// The number the guest knows the source by (an x86 GSI, a XIVE source number).
    pub fn number(&self) -> u32 {
        self.number
    }
    /// Line or message.
    pub fn kind(&self) -> SourceKind {
        self.kind
    }
}

/// Errors of an interrupt controller.
#[derive(Debug, thiserror::Error)]
pub enum IrqChipError {
    /// No source of the requested kind is left.
    #[error(
        "the {chip} interrupt controller has no free {what} left: assign fewer devices or vectors"
    )]
    Exhausted {
        /// Controller model.
        chip: &'static str,
        /// Which resource.
        what: &'static str,
    },
    /// A request the controller cannot satisfy.
    #[error("the {chip} interrupt controller cannot do this: {reason}")]
    Invalid {
        /// Controller model.
        chip: &'static str,
        /// Why.
        reason: String,
    },
    /// The source was not allocated by this controller.
    #[error("interrupt source {0} was not allocated by this interrupt controller")]
    UnknownSource(u32),
    /// The hypervisor refused an operation on a source.
    #[error("{what} failed for interrupt source {source_number}: {err}")]
    Hypervisor {
        /// The operation (an ioctl name).
        what: &'static str,
        /// The source.
        source_number: u32,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// The hypervisor refused the routing table.
    #[error("installing the interrupt routing table ({entries} routes) failed: {err}")]
    Routing {
        /// Routes in the table.
        entries: usize,
        /// Cause.
        err: kvm_ioctls::Error,
    },
}

/// A message programmed into one source, in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl From<MsiMessage> for MessageState {
    fn from(m: MsiMessage) -> Self {
        MessageState {
            address: m.address,
            data: m.data,
        }
    }
}

/// One source in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// [`IrqSource::number`].
    pub number: u32,
    /// Line or message.
    pub kind: SourceKind,
    /// The programmed message (message sources only; `None` until programmed).
    pub message: Option<MessageState>,
    /// Eventfds attached now (0: masked or unused).
    pub attached: u32,
    /// Attached with a resample eventfd (level-triggered).
    pub resample: bool,
}

/// What an interrupt controller reports of itself for migration: the model and the
/// state of every source it allocated, in source-number order. A destination rebuilds
/// the same sources, re-attaches the (new) eventfds and re-programs the messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqChipSnapshot {
    /// The controller model ([`IrqChip::model`]).
    pub model: String,
    /// Every allocated source.
    pub sources: Vec<SourceState>,
}

/// The interrupt controller the buses wire device interrupts into. See the module
/// documentation.
pub trait IrqChip: Send + Sync {
    /// Model name (e.g. "kvm-x86"), for messages and snapshots.
    fn model(&self) -> &'static str;
    /// Allocate a source for `request`.
    fn allocate(&self, request: SourceRequest) -> Result<IrqSource, IrqChipError>;
    /// Deliver `trigger`'s signals through `source`; with `resample`, the line is
    /// level-triggered and `resample` is signalled when the guest acknowledges it.
    fn attach(
        &self,
        source: IrqSource,
        trigger: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), IrqChipError>;
    /// Stop delivering `trigger`'s signals through `source`.
    fn detach(&self, source: IrqSource, trigger: &EventFd) -> Result<(), IrqChipError>;
    /// Set (`Some`) or remove (`None`) the message of several message sources at once.
    fn program_msi(&self, updates: &[(IrqSource, Option<MsiMessage>)]) -> Result<(), IrqChipError>;
    /// The state of every source, for migration.
    fn snapshot(&self) -> IrqChipSnapshot;

    /// Mask an edge or message source: its eventfd is detached and keeps counting.
    fn mask(&self, source: IrqSource, trigger: &EventFd) -> Result<(), IrqChipError> {
        self.detach(source, trigger)
    }
    /// Unmask: the eventfd is attached again and a signal counted meanwhile is
    /// delivered.
    fn unmask(&self, source: IrqSource, trigger: &EventFd) -> Result<(), IrqChipError> {
        self.attach(source, trigger, None)
    }
}
