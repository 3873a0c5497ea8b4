//! Payload codecs of the migration sections (see [`super::format::Tag`]).
//!
//! KVM structures travel as their exact bytes (`zerocopy`, the layout of the KVM uAPI
//! on x86-64): any byte pattern is a valid value of these plain structures, and KVM
//! checks their contents when they are set. Everything of nestio's own is explicit
//! little-endian fields with bounded counts.

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_msr_entry, kvm_pit_state2};
use zerocopy::IntoBytes;

use super::format::{Cursor, FormatError, Section};
use crate::cpu::CpuState;
use crate::pci::assigned::PciMigState;
use crate::vcpu::VcpuMigState;

/// Most MSRs a vCPU section may carry (KVM's own limit per call).
pub const MAX_MSRS: u32 = kvm_bindings::KVM_MAX_MSR_ENTRIES as u32;
/// Most assigned devices the config section may list.
pub const MAX_DEVICES: u32 = 32;

/// The machine's shape (section [`super::format::Tag::Config`]): checked against the
/// destination's VM before anything is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Guest RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Assigned PCI functions: (slot, vendor, device).
    pub devices: Vec<(u8, u16, u16)>,
}

impl MachineConfig {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.memory.to_le_bytes());
        v.extend_from_slice(&self.cpus.to_le_bytes());
        v.extend_from_slice(&(self.devices.len() as u32).to_le_bytes());
        for (s, ven, dev) in &self.devices {
            v.push(*s);
            v.extend_from_slice(&ven.to_le_bytes());
            v.extend_from_slice(&dev.to_le_bytes());
        }
        v
    }

    /// Decode.
    pub fn decode(s: &Section) -> Result<Self, FormatError> {
        let mut c = Cursor::new(s);
        let memory = c.u64()?;
        let cpus = c.u32()?;
        let n = c.u32()?;
        if n > MAX_DEVICES {
            return Err(c.bad(format!("{n} devices (at most {MAX_DEVICES})")));
        }
        let mut devices = Vec::with_capacity(n as usize);
        for _ in 0..n {
            devices.push((c.u8()?, c.u16()?, c.u16()?));
        }
        c.finish()?;
        Ok(MachineConfig {
            memory,
            cpus,
            devices,
        })
    }
}

/// Encode a vCPU state.
pub fn encode_vcpu(s: &VcpuMigState) -> Vec<u8> {
    let mut v = Vec::with_capacity(8192);
    v.extend_from_slice(s.regs.as_bytes());
    v.extend_from_slice(s.sregs.as_bytes());
    v.extend_from_slice(s.xsave.as_bytes());
    v.extend_from_slice(s.xcrs.as_bytes());
    v.extend_from_slice(s.lapic.as_bytes());
    v.extend_from_slice(s.events.as_bytes());
    v.extend_from_slice(s.mp_state.as_bytes());
    v.extend_from_slice(s.debugregs.as_bytes());
    v.extend_from_slice(&s.cpu.test_ctrl.to_le_bytes());
    v.extend_from_slice(&(s.msrs.len() as u32).to_le_bytes());
    for m in &s.msrs {
        v.extend_from_slice(m.as_bytes());
    }
    v
}

/// Decode a vCPU state.
pub fn decode_vcpu(s: &Section) -> Result<VcpuMigState, FormatError> {
    let mut c = Cursor::new(s);
    let mut st = VcpuMigState {
        regs: c.pod()?,
        sregs: c.pod()?,
        xsave: c.pod()?,
        xcrs: c.pod()?,
        lapic: c.pod()?,
        events: c.pod()?,
        mp_state: c.pod()?,
        debugregs: c.pod()?,
        cpu: CpuState {
            test_ctrl: c.u64()?,
        },
        msrs: Vec::new(),
    };
    let n = c.u32()?;
    if n > MAX_MSRS {
        return Err(c.bad(format!("{n} MSRs (at most {MAX_MSRS})")));
    }
    for _ in 0..n {
        st.msrs.push(c.pod::<kvm_msr_entry>()?);
    }
    c.finish()?;
    Ok(st)
}

/// The in-kernel platform devices: PIC master, PIC slave, IOAPIC, PIT, KVM clock.
#[derive(Clone, Default)]
pub struct PlatformState {
    /// `KVM_GET_IRQCHIP` for chip ids 0 (PIC master), 1 (PIC slave), 2 (IOAPIC).
    pub irqchips: [kvm_irqchip; 3],
    /// `KVM_GET_PIT2`.
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK`.
    pub clock: kvm_clock_data,
}

impl PlatformState {
    /// Encode the irqchip section.
    pub fn encode_irqchip(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for c in &self.irqchips {
            v.extend_from_slice(c.as_bytes());
        }
        v
    }

    /// Decode the irqchip section (chip ids must be 0, 1, 2 in order).
    pub fn decode_irqchip(s: &Section) -> Result<[kvm_irqchip; 3], FormatError> {
        let mut c = Cursor::new(s);
        let chips: [kvm_irqchip; 3] = [c.pod()?, c.pod()?, c.pod()?];
        for (i, chip) in chips.iter().enumerate() {
            if chip.chip_id != i as u32 {
                return Err(c.bad(format!("chip {i} has id {}", chip.chip_id)));
            }
        }
        c.finish()?;
        Ok(chips)
    }

    /// Decode the PIT section.
    pub fn decode_pit(s: &Section) -> Result<kvm_pit_state2, FormatError> {
        let mut c = Cursor::new(s);
        let p = c.pod()?;
        c.finish()?;
        Ok(p)
    }

    /// Decode the clock section.
    pub fn decode_clock(s: &Section) -> Result<kvm_clock_data, FormatError> {
        let mut c = Cursor::new(s);
        let p = c.pod()?;
        c.finish()?;
        Ok(p)
    }
}

/// Encode the serial console's state.
pub fn encode_serial(s: &vm_superio::serial::SerialState) -> Vec<u8> {
    let mut v = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    v.push(s.in_buffer.len().min(255) as u8);
    v.extend_from_slice(&s.in_buffer[..s.in_buffer.len().min(255)]);
    v
}

/// The receive FIFO of the 16550 (vm-superio's).
const SERIAL_FIFO: usize = 64;

/// Decode the serial console's state.
pub fn decode_serial(s: &Section) -> Result<vm_superio::serial::SerialState, FormatError> {
    let mut c = Cursor::new(s);
    let regs = c.take(9)?;
    let n = usize::from(c.u8()?);
    if n > SERIAL_FIFO {
        return Err(c.bad(format!("{n} bytes in a {SERIAL_FIFO}-byte FIFO")));
    }
    let in_buffer = c.take(n)?.to_vec();
    c.finish()?;
    Ok(vm_superio::serial::SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer,
    })
}

/// Most MSI-X vectors a PCI section may carry (the PCI limit).
const MAX_MSIX: u32 = 2048;

/// Encode an assigned function's VMM-side state.
pub fn encode_pci(s: &PciMigState) -> Vec<u8> {
    let mut v = Vec::with_capacity(600);
    v.extend_from_slice(&s.shadow);
    v.extend(s.virt.iter().map(|&b| u8::from(b)));
    v.extend_from_slice(&s.command.to_le_bytes());
    v.extend_from_slice(&(s.msix.len() as u32).to_le_bytes());
    for e in &s.msix {
        for w in e {
            v.extend_from_slice(&w.to_le_bytes());
        }
    }
    v
}

/// Decode an assigned function's VMM-side state.
pub fn decode_pci(s: &Section) -> Result<PciMigState, FormatError> {
    let mut c = Cursor::new(s);
    let shadow = c.take(256)?.to_vec();
    let mut virt = Vec::with_capacity(256);
    for &b in c.take(256)? {
        match b {
            0 => virt.push(false),
            1 => virt.push(true),
            _ => return Err(c.bad(format!("virtual flag {b} is neither 0 nor 1"))),
        }
    }
    let command = c.u16()?;
    let n = c.u32()?;
    if n > MAX_MSIX {
        return Err(c.bad(format!("{n} MSI-X entries (at most {MAX_MSIX})")));
    }
    let mut msix = Vec::with_capacity(n as usize);
    for _ in 0..n {
        msix.push([c.u32()?, c.u32()?, c.u32()?, c.u32()?]);
    }
    c.finish()?;
    Ok(PciMigState {
        shadow,
        virt,
        command,
        msix,
    })
}

/// Decode a RAM run: its guest-physical address and whole pages.
pub fn decode_ram(s: &Section) -> Result<(u64, &[u8]), FormatError> {
    let mut c = Cursor::new(s);
    let gpa = c.u64()?;
    let data = c.rest();
    if !gpa.is_multiple_of(super::PAGE)
        || !(data.len() as u64).is_multiple_of(super::PAGE)
        || data.is_empty()
    {
        return Err(c.bad(format!(
            "RAM run at {gpa:#x} of {} bytes is not whole pages",
            data.len()
        )));
    }
    Ok((gpa, data))
}

#[cfg(test)]
mod tests {
    use super::super::format::Tag;
    use super::*;

    fn section(tag: Tag, payload: Vec<u8>) -> Section {
        Section {
            tag,
            instance: 0,
            payload,
        }
    }

    #[test]
    fn vcpu_round_trip_and_bounds() {
        let mut st = VcpuMigState::default();
        st.regs.rip = 0x1234;
        st.sregs.cr0 = 0x8000_0011;
        st.lapic.regs[0x20] = 7;
        st.msrs.push(kvm_msr_entry {
            index: 0x10,
            data: 99,
            ..Default::default()
        });
        st.cpu.test_ctrl = 1 << 29;
        let enc = encode_vcpu(&st);
        let back = decode_vcpu(&section(Tag::Vcpu, enc.clone())).unwrap();
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.sregs.cr0, 0x8000_0011);
        assert_eq!(back.lapic.regs[0x20], 7);
        assert_eq!(back.msrs.len(), 1);
        assert_eq!(back.msrs[0].data, 99);
        assert_eq!(back.cpu, st.cpu);
        // Every truncation fails cleanly; so does a trailing byte and a huge MSR count.
        for n in 0..enc.len() {
            assert!(decode_vcpu(&section(Tag::Vcpu, enc[..n].to_vec())).is_err());
        }
        let mut more = enc.clone();
        more.push(0);
        assert!(decode_vcpu(&section(Tag::Vcpu, more)).is_err());
        let mut huge = enc.clone();
        let at = enc.len() - 16 - 4;
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_vcpu(&section(Tag::Vcpu, huge)).is_err());
    }

    #[test]
    fn serial_pci_config_round_trip() {
        let ser = vm_superio::serial::SerialState {
            in_buffer: vec![1, 2, 3],
            scratch: 9,
            ..Default::default()
        };
        let back = decode_serial(&section(Tag::Serial, encode_serial(&ser))).unwrap();
        assert_eq!(back.in_buffer, vec![1, 2, 3]);
        assert_eq!(back.scratch, 9);
        let mut big = encode_serial(&ser);
        big[9] = 200;
        assert!(decode_serial(&section(Tag::Serial, big)).is_err());

        let pci = PciMigState {
            shadow: (0..=255).collect(),
            virt: (0..256).map(|i| i % 3 == 0).collect(),
            command: 6,
            msix: vec![[0xfee0_0000, 0, 0x33, 1]],
        };
        assert_eq!(
            decode_pci(&section(Tag::Pci, encode_pci(&pci))).unwrap(),
            pci
        );
        let mut badflag = encode_pci(&pci);
        badflag[256] = 2;
        assert!(decode_pci(&section(Tag::Pci, badflag)).is_err());

        let cfg = MachineConfig {
            memory: 64 << 20,
            cpus: 2,
            devices: vec![(1, 0x1b36, 0x7e57)],
        };
        assert_eq!(
            MachineConfig::decode(&section(Tag::Config, cfg.encode())).unwrap(),
            cfg
        );
    }

    #[test]
    fn ram_runs_are_whole_pages() {
        let mut p = 0x2000u64.to_le_bytes().to_vec();
        p.extend(vec![0u8; 4096]);
        assert_eq!(decode_ram(&section(Tag::Ram, p.clone())).unwrap().0, 0x2000);
        p.pop();
        assert!(decode_ram(&section(Tag::Ram, p)).is_err());
        let mut q = 0x2001u64.to_le_bytes().to_vec();
        q.extend(vec![0u8; 4096]);
        assert!(decode_ram(&section(Tag::Ram, q)).is_err());
        assert!(decode_ram(&section(Tag::Ram, 0u64.to_le_bytes().to_vec())).is_err());
    }
}
