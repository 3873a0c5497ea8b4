//! The x86 in-kernel interrupt controller: KVM's IOAPIC, 8259 pair and LAPIC, driven
//! through GSIs.
//!
//! GSIs 0..24 are wired lines: each goes to the IOAPIC pin of the same number and, for
//! 0..16 except the cascade (2), to the 8259 line of the same number as well. Message
//! sources are GSIs from [`MSI_GSI_BASE`] up to [`MAX_GSI`], each with an MSI route
//! once a message is programmed. KVM_SET_GSI_ROUTING replaces the whole routing table,
//! so the table is rebuilt from this chip's state on every message change (one ioctl
//! per batch). Attaching an eventfd is KVM_IRQFD, with KVM_IRQFD_FLAG_RESAMPLE for a
//! level-triggered line.
//!
//! PCI INTx wiring is this chip's policy ([`IntxRouting`]): IOAPIC pins 16..24 for
//! guests that program the IOAPIC themselves, or 8259 lines for a Linux guest booted
//! with `noapic`. Platform (non-PCI) devices get edge lines from
//! [`PLATFORM_LINES`], ISA lines no device of this machine uses.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{kvm_irq_routing_entry, KvmIrqRouting};
use kvm_ioctls::VmFd;
use nestio_device_model::pci::MsiMessage;
use vmm_sys_util::eventfd::EventFd;

use super::{
    IrqChip, IrqChipError, IrqChipSnapshot, IrqSource, MessageState, SourceKind, SourceRequest,
    SourceState,
};

/// Number of wired GSIs (IOAPIC pins).
pub const WIRED_GSIS: u32 = 24;
/// First GSI for MSI routes (0..24 are the IOAPIC pins).
pub const MSI_GSI_BASE: u32 = WIRED_GSIS;
/// GSI limit we use (KVM allows at least 1024).
pub const MAX_GSI: u32 = 1024;
/// The 8259 lines PCI INTx uses under [`IntxRouting::Pic`] (all level-capable on the
/// 8259 ELCR), by `(slot + pin - 2) % 4`: 00:01.0 INTA gets 11.
pub const PIC_INTX_LINES: [u8; 4] = [11, 10, 9, 5];
/// The ISA lines handed to platform devices, in order: no device of this machine
/// (UART on 4, PIT on 0, PCI INTx per [`IntxRouting`]) uses them.
pub const PLATFORM_LINES: [u32; 4] = [12, 14, 15, 7];

const MODEL: &str = "kvm-x86";

/// Which interrupt lines PCI INTx is wired to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IntxRouting {
    /// I/O APIC pins 16..24 (`16 + (slot + pin - 1) % 8`), for guests that program the
    /// I/O APIC themselves (the `no_std` payloads).
    #[default]
    Ioapic,
    /// ISA lines that both the 8259 pair and the I/O APIC see ([`PIC_INTX_LINES`]),
    /// for a Linux guest booted with `noapic`: it takes the line from the
    /// configuration-space interrupt-line register and never reprograms the ELCR, so
    /// the VMM marks these lines level-triggered.
    Pic,
}

impl IntxRouting {
    /// The GSI that INTx pin `pin` (1..=4) of device `slot` raises.
    pub fn gsi(self, slot: u8, pin: u8) -> u32 {
        let (slot, pin) = (u32::from(slot), u32::from(pin.clamp(1, 4)));
        match self {
            IntxRouting::Ioapic => 16 + (slot + pin - 1) % 8,
            IntxRouting::Pic => u32::from(PIC_INTX_LINES[((slot + pin + 2) % 4) as usize]),
        }
    }
}

#[derive(Debug, Default)]
struct Source {
    kind: Option<SourceKind>,
    message: Option<MsiMessage>,
    attached: u32,
    resample: bool,
}

#[derive(Debug, Default)]
struct State {
    next_msi: u32,
    next_platform: usize,
    sources: BTreeMap<u32, Source>,
}

/// KVM's in-kernel x86 interrupt controller. See the module documentation.
pub struct KvmIrqChip {
    vm: Arc<VmFd>,
    intx: IntxRouting,
    state: Mutex<State>,
}

impl KvmIrqChip {
    /// The chip of `vm` (whose in-kernel irqchip was created with KVM_CREATE_IRQCHIP),
    /// with PCI INTx wired per `intx`; installs the wired routes.
    pub fn new(vm: Arc<VmFd>, intx: IntxRouting) -> Result<Self, IrqChipError> {
        let chip = KvmIrqChip {
            vm,
            intx,
            state: Mutex::new(State {
                next_msi: MSI_GSI_BASE,
                ..State::default()
            }),
        };
        let st = chip.lock();
        chip.commit_routes(&st)?;
        drop(st);
        Ok(chip)
    }

    /// How PCI INTx is wired.
    pub fn intx_routing(&self) -> IntxRouting {
        self.intx
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    fn commit_routes(&self, st: &State) -> Result<(), IrqChipError> {
        let entries = routing_entries(st.sources.iter().filter_map(|(&gsi, s)| {
            (s.kind == Some(SourceKind::Msi))
                .then_some(s.message.map(|m| (gsi, m)))
                .flatten()
        }));
        let err = |err| IrqChipError::Routing {
            entries: entries.len(),
            err,
        };
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| err(kvm_ioctls::Error::new(libc::E2BIG)))?;
        self.vm.set_gsi_routing(&routing).map_err(err)
    }
}

/// The full KVM routing table: the wired lines, then one MSI route per message.
fn routing_entries(
    messages: impl Iterator<Item = (u32, MsiMessage)>,
) -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: kvm_bindings::KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..WIRED_GSIS {
        entries.push(irqchip(gsi, kvm_bindings::KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 && gsi != 2 {
            let pic = if gsi < 8 {
                kvm_bindings::KVM_IRQCHIP_PIC_MASTER
            } else {
                kvm_bindings::KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, pic, gsi % 8));
        }
    }
    for (gsi, m) in messages {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    entries
}

impl IrqChip for KvmIrqChip {
    fn model(&self) -> &'static str {
        MODEL
    }

    fn allocate(&self, request: SourceRequest) -> Result<IrqSource, IrqChipError> {
        let mut st = self.lock();
        let (gsi, kind) = match request {
            SourceRequest::PciIntx { slot, pin } => {
                if !(1..=4).contains(&pin) {
                    return Err(IrqChipError::Invalid {
                        chip: MODEL,
                        reason: format!("INTx pin {pin} (use 1..=4)"),
                    });
                }
                (self.intx.gsi(slot, pin), SourceKind::Line)
            }
            SourceRequest::Line(gsi) if gsi < WIRED_GSIS => (gsi, SourceKind::Line),
            SourceRequest::Line(gsi) => {
                return Err(IrqChipError::Invalid {
                    chip: MODEL,
                    reason: format!("line {gsi} (the IOAPIC has {WIRED_GSIS} pins)"),
                })
            }
            SourceRequest::PlatformLine => {
                let Some(&gsi) = PLATFORM_LINES.get(st.next_platform) else {
                    return Err(IrqChipError::Exhausted {
                        chip: MODEL,
                        what: "platform-device lines",
                    });
                };
                st.next_platform += 1;
                (gsi, SourceKind::Line)
            }
            SourceRequest::Msi => {
                if st.next_msi >= MAX_GSI {
                    return Err(IrqChipError::Exhausted {
                        chip: MODEL,
                        what: "MSI GSIs",
                    });
                }
                st.next_msi += 1;
                (st.next_msi - 1, SourceKind::Msi)
            }
        };
        // Wired lines may be shared (PCI INTx swizzling); each is recorded once.
        st.sources.entry(gsi).or_default().kind = Some(kind);
        Ok(IrqSource::new(gsi, kind))
    }

    fn attach(
        &self,
        source: IrqSource,
        trigger: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), IrqChipError> {
        let gsi = source.number();
        let mut st = self.lock();
        let s = st
            .sources
            .get_mut(&gsi)
            .ok_or(IrqChipError::UnknownSource(gsi))?;
        let r = match resample {
            Some(_) if s.kind == Some(SourceKind::Msi) => {
                return Err(IrqChipError::Invalid {
                    chip: MODEL,
                    reason: "a message source cannot be level-triggered (no resample)".into(),
                })
            }
            Some(rs) => self
                .vm
                .register_irqfd_with_resample(trigger, rs, gsi)
                .map_err(|err| IrqChipError::Hypervisor {
                    what: "KVM_IRQFD (with resample)",
                    source_number: gsi,
                    err,
                }),
            None => self
                .vm
                .register_irqfd(trigger, gsi)
                .map_err(|err| IrqChipError::Hypervisor {
                    what: "KVM_IRQFD",
                    source_number: gsi,
                    err,
                }),
        };
        r?;
        s.attached += 1;
        s.resample |= resample.is_some();
        Ok(())
    }

    fn detach(&self, source: IrqSource, trigger: &EventFd) -> Result<(), IrqChipError> {
        let gsi = source.number();
        let mut st = self.lock();
        let s = st
            .sources
            .get_mut(&gsi)
            .ok_or(IrqChipError::UnknownSource(gsi))?;
        self.vm
            .unregister_irqfd(trigger, gsi)
            .map_err(|err| IrqChipError::Hypervisor {
                what: "KVM_IRQFD (deassign)",
                source_number: gsi,
                err,
            })?;
        s.attached = s.attached.saturating_sub(1);
        Ok(())
    }

    fn program_msi(&self, updates: &[(IrqSource, Option<MsiMessage>)]) -> Result<(), IrqChipError> {
        let mut st = self.lock();
        for (src, msg) in updates {
            let s = st
                .sources
                .get_mut(&src.number())
                .filter(|s| s.kind == Some(SourceKind::Msi))
                .ok_or(IrqChipError::UnknownSource(src.number()))?;
            s.message = *msg;
        }
        self.commit_routes(&st)
    }

    fn snapshot(&self) -> IrqChipSnapshot {
        let st = self.lock();
        IrqChipSnapshot {
            model: MODEL.into(),
            sources: st
                .sources
                .iter()
                .filter_map(|(&number, s)| {
                    Some(SourceState {
                        number,
                        kind: s.kind?,
                        message: s.message.map(MessageState::from),
                        attached: s.attached,
                        resample: s.resample,
                    })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_lines() {
        assert_eq!(IntxRouting::Ioapic.gsi(1, 1), 17);
        assert_eq!(IntxRouting::Ioapic.gsi(7, 2), 16);
        assert_eq!(IntxRouting::Pic.gsi(1, 1), 11);
        assert_eq!(IntxRouting::Pic.gsi(2, 1), 10);
        assert_eq!(IntxRouting::Pic.gsi(1, 4), 5);
        assert_eq!(IntxRouting::Pic.gsi(4, 1), 5);
        assert_eq!(IntxRouting::Pic.gsi(5, 1), 11);
        for slot in 1..32 {
            for pin in 1..=4 {
                let g = IntxRouting::Pic.gsi(slot, pin) as u8;
                assert!(crate::linux::platform::can_be_level(g), "{slot}/{pin}: {g}");
            }
        }
    }

    #[test]
    fn platform_lines_are_not_pci_or_console_lines() {
        for line in PLATFORM_LINES {
            assert!(line < 16 && line != 2 && line != 0);
            assert_ne!(line, crate::serial::SERIAL_GSI);
            assert!(!PIC_INTX_LINES.contains(&(line as u8)));
            for slot in 1..32 {
                for pin in 1..=4 {
                    assert_ne!(IntxRouting::Ioapic.gsi(slot, pin), line);
                }
            }
        }
    }

    /// A KVM VM with the in-kernel irqchip, or None (loudly) without /dev/kvm.
    fn kvm_chip(intx: IntxRouting) -> Option<KvmIrqChip> {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIP: /dev/kvm is missing, this KVM test did not run");
            return None;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        Some(KvmIrqChip::new(Arc::new(vm), intx).unwrap())
    }

    #[test]
    fn kvm_chip_allocates_attaches_programs_and_describes_its_sources() {
        let Some(chip) = kvm_chip(IntxRouting::Pic) else {
            return;
        };
        assert_eq!(chip.intx_routing(), IntxRouting::Pic);
        let intx = chip
            .allocate(SourceRequest::PciIntx { slot: 1, pin: 1 })
            .unwrap();
        assert_eq!((intx.number(), intx.kind()), (11, SourceKind::Line));
        assert!(chip
            .allocate(SourceRequest::PciIntx { slot: 1, pin: 5 })
            .is_err());
        assert!(chip.allocate(SourceRequest::Line(24)).is_err());
        let lines: Vec<u32> = (0..4)
            .map(|_| chip.allocate(SourceRequest::PlatformLine).unwrap().number())
            .collect();
        assert_eq!(lines, PLATFORM_LINES);
        assert!(matches!(
            chip.allocate(SourceRequest::PlatformLine),
            Err(IrqChipError::Exhausted { .. })
        ));
        let msi = chip.allocate(SourceRequest::Msi).unwrap();
        assert_eq!((msi.number(), msi.kind()), (MSI_GSI_BASE, SourceKind::Msi));

        let (trig, res) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        chip.attach(intx, &trig, Some(&res)).unwrap();
        let m = EventFd::new(0).unwrap();
        assert!(
            matches!(
                chip.attach(msi, &m, Some(&res)),
                Err(IrqChipError::Invalid { .. })
            ),
            "a message source is never level-triggered"
        );
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        chip.program_msi(&[(msi, Some(msg))]).unwrap();
        assert!(
            matches!(
                chip.program_msi(&[(intx, Some(msg))]),
                Err(IrqChipError::UnknownSource(11))
            ),
            "a line has no message"
        );
        chip.attach(msi, &m, None).unwrap();
        assert!(
            chip.attach(msi, &m, None).is_err(),
            "KVM refuses a second irqfd"
        );
        chip.mask(msi, &m).unwrap();
        let snap = chip.snapshot();
        assert_eq!(snap.model, "kvm-x86");
        let get = |n| snap.sources.iter().find(|s| s.number == n).unwrap().clone();
        let (l, s) = (get(11), get(MSI_GSI_BASE));
        assert_eq!(
            (l.kind, l.attached, l.resample, l.message),
            (SourceKind::Line, 1, true, None)
        );
        assert_eq!(
            (s.kind, s.attached),
            (SourceKind::Msi, 0),
            "masked: detached"
        );
        assert_eq!(s.message, Some(MessageState::from(msg)));
        chip.unmask(msi, &m).unwrap();
        assert_eq!(
            chip.snapshot()
                .sources
                .iter()
                .find(|x| x.number == MSI_GSI_BASE)
                .unwrap()
                .attached,
            1
        );
        let unknown = IrqSource::new(900, SourceKind::Msi);
        assert!(matches!(
            chip.attach(unknown, &m, None),
            Err(IrqChipError::UnknownSource(900))
        ));
    }

    #[test]
    fn routing_table_has_wired_lines_then_messages() {
        let msg = MsiMessage {
            address: 0x1_fee0_1000,
            data: 0x4041,
        };
        let e = routing_entries([(30, msg)].into_iter());
        // 24 IOAPIC pins + 15 PIC lines + 1 MSI.
        assert_eq!(e.len(), 24 + 15 + 1);
        let last = e.last().unwrap();
        assert_eq!(last.gsi, 30);
        assert_eq!(last.type_, kvm_bindings::KVM_IRQ_ROUTING_MSI);
        // SAFETY: the entry was built as an MSI route (`type_` checked above).
        let m = unsafe { last.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
        assert!(e.iter().all(
            |x| x.gsi != 2 || x.type_ != kvm_bindings::KVM_IRQ_ROUTING_IRQCHIP
                // SAFETY: IRQCHIP entries carry the irqchip member.
                || unsafe { x.u.irqchip.irqchip } == kvm_bindings::KVM_IRQCHIP_IOAPIC
        ));
    }
}
