//! Platform settings a Linux guest needs from the VMM beyond the boot structures,
//! as small helpers the VMM core may call (they touch only the KVM objects passed in).
//!
//! - [`linux_cpuid`]: expose the TSC-deadline timer (without it Linux's APIC timer
//!   check fails on hosts that emulate guest code: the clock freezes and boot hangs)
//!   and the hypervisor bit (so the KVM paravirt clock is used).
//! - [`set_pic_level_triggered`]: mark PCI INTx lines level-triggered in the in-kernel
//!   8259s' ELCR. With `noapic` Linux takes a PCI device's IRQ from its config-space
//!   interrupt line and never programs the ELCR itself; an edge-triggered line that a
//!   resampling irqfd holds high would lose every interrupt after the first.
//! - [`BASE_CMDLINE`]: the command line the brief measured on these hosts.
//! - [`kernel_problems`]: the console lines that mean the platform or a device
//!   misbehaved (what the Linux tests check for).

use kvm_bindings::{kvm_irqchip, CpuId, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::VmFd;

/// Kernel command line for a nestio Linux guest (serial console, reset through the
/// keyboard controller, 8259 PIC, instructions the host emulator lacks turned off).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k noapic noxsave clearcpuid=smap,popcnt";

/// CPUID.1:ECX bit: TSC-deadline mode of the local APIC timer.
pub const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit: running under a hypervisor.
pub const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Errors of the platform helpers.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The CPUID table has no leaf 1.
    #[error("the CPUID table has no leaf 1; start from KVM_GET_SUPPORTED_CPUID")]
    NoLeaf1,
    /// The IRQ cannot be level-triggered on the 8259.
    #[error("IRQ {0} cannot be level-triggered on the 8259 PIC (0, 1, 2, 8 and 13 are edge-only; use 3-7, 9-12, 14 or 15)")]
    EdgeOnlyIrq(u8),
    /// A KVM irqchip ioctl failed.
    #[error("cannot {what} the in-kernel PIC state (was KVM_CREATE_IRQCHIP called?): {err}")]
    Kvm {
        /// get/set.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
}

/// Set the CPUID bits Linux needs (see the module doc) in a table obtained from
/// `KVM_GET_SUPPORTED_CPUID`.
pub fn linux_cpuid(cpuid: &mut CpuId) -> Result<(), PlatformError> {
    let mut found = false;
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= CPUID1_ECX_TSC_DEADLINE | CPUID1_ECX_HYPERVISOR;
            found = true;
        }
    }
    if found {
        Ok(())
    } else {
        Err(PlatformError::NoLeaf1)
    }
}

/// Whether `irq` may be level-triggered on the 8259 pair (KVM's ELCR masks: master
/// 0xf8, slave 0xde).
pub fn can_be_level(irq: u8) -> bool {
    matches!(irq, 3..=7 | 9..=12 | 14 | 15)
}

/// Mark `irqs` level-triggered in the in-kernel PICs' ELCR (others keep their mode).
pub fn set_pic_level_triggered(vm: &VmFd, irqs: &[u8]) -> Result<(), PlatformError> {
    if let Some(bad) = irqs.iter().find(|i| !can_be_level(**i)) {
        return Err(PlatformError::EdgeOnlyIrq(*bad));
    }
    for (chip_id, base) in [(KVM_IRQCHIP_PIC_MASTER, 0u8), (KVM_IRQCHIP_PIC_SLAVE, 8u8)] {
        let bits = irqs
            .iter()
            .filter(|i| (base..base + 8).contains(*i))
            .fold(0u8, |b, i| b | 1 << (i - base));
        if bits == 0 {
            continue;
        }
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|err| PlatformError::Kvm { what: "read", err })?;
        // SAFETY: for the PIC chip ids KVM fills (and reads) the `pic` member of the
        // union; it is plain bytes, every bit pattern is valid.
        unsafe {
            chip.chip.pic.elcr |= bits & chip.chip.pic.elcr_mask;
        }
        vm.set_irqchip(&chip)
            .map_err(|err| PlatformError::Kvm { what: "write", err })?;
    }
    Ok(())
}

/// Kernel messages that are always a problem.
const PROBLEM_MARKERS: [&str; 8] = [
    "WARNING:",
    "BUG:",
    "Kernel panic",
    "Oops",
    "Call Trace",
    "nobody cared",
    "Hardware Error",
    "Tx Unit Hang",
];

/// The lines of a Linux guest's console that mean the platform or an emulated device
/// misbehaved: kernel warnings, oopses and panics, an unhandled interrupt, and e1000
/// driver errors (hardware error, TX unit hang, failed or invalid anything).
pub fn kernel_problems(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| {
            PROBLEM_MARKERS.iter().any(|k| l.contains(k))
                || (l.contains("e1000")
                    && (l.contains("rror") || l.contains("failed") || l.contains("invalid")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_problems_finds_warnings_and_e1000_errors_only() {
        let log = "[0.1] e1000 0000:00:01.0 eth0: Intel(R) PRO/1000 Network Connection\n\
                   [0.2] WARNING: CPU: 0 PID: 1 at kernel/x.c:1\n\
                   [0.3] e1000 0000:00:01.0 eth0: Detected Tx Unit Hang\n\
                   [0.4] e1000: probe of 0000:00:01.0 failed with error -5\n\
                   [0.5] Run /init as init process";
        assert_eq!(
            kernel_problems(log),
            vec![
                "[0.2] WARNING: CPU: 0 PID: 1 at kernel/x.c:1",
                "[0.3] e1000 0000:00:01.0 eth0: Detected Tx Unit Hang",
                "[0.4] e1000: probe of 0000:00:01.0 failed with error -5",
            ]
        );
    }
    use kvm_ioctls::Kvm;

    #[test]
    fn level_capable_irqs() {
        let ok: Vec<u8> = (0..16).filter(|i| can_be_level(*i)).collect();
        assert_eq!(ok, vec![3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15]);
        assert!(!can_be_level(16));
    }

    fn kvm_or_skip() -> Option<Kvm> {
        match Kvm::new() {
            Ok(k) => Some(k),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIP: /dev/kvm is not usable ({e}); the PIC/CPUID tests need KVM");
                None
            }
            Err(e) => panic!("CI=true but /dev/kvm is not usable: {e}"),
        }
    }

    #[test]
    fn cpuid_gets_tsc_deadline_and_hypervisor() {
        let Some(kvm) = kvm_or_skip() else { return };
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        linux_cpuid(&mut cpuid).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ecx & CPUID1_ECX_TSC_DEADLINE, CPUID1_ECX_TSC_DEADLINE);
        assert_eq!(leaf1.ecx & CPUID1_ECX_HYPERVISOR, CPUID1_ECX_HYPERVISOR);
        let mut empty = CpuId::new(0).unwrap();
        assert!(matches!(
            linux_cpuid(&mut empty),
            Err(PlatformError::NoLeaf1)
        ));
    }

    #[test]
    fn elcr_is_set_for_pci_lines_only() {
        let Some(kvm) = kvm_or_skip() else { return };
        let vm = kvm.create_vm().unwrap();
        assert!(
            matches!(
                set_pic_level_triggered(&vm, &[11]),
                Err(PlatformError::Kvm { .. })
            ),
            "no irqchip yet"
        );
        vm.create_irq_chip().unwrap();
        set_pic_level_triggered(&vm, &[5, 11]).unwrap();
        let elcr = |chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).unwrap();
            // SAFETY: PIC chip ids fill the `pic` member.
            unsafe { c.chip.pic.elcr }
        };
        assert_eq!(elcr(KVM_IRQCHIP_PIC_MASTER), 1 << 5);
        assert_eq!(elcr(KVM_IRQCHIP_PIC_SLAVE), 1 << 3);
        assert!(matches!(
            set_pic_level_triggered(&vm, &[2]),
            Err(PlatformError::EdgeOnlyIrq(2))
        ));
        assert_eq!(
            elcr(KVM_IRQCHIP_PIC_MASTER),
            1 << 5,
            "unchanged after the error"
        );
    }
}
