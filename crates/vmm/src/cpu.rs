//! The x86 CPU model: CPUID, the split-lock MSRs, and plain-words reports of split-lock
//! exits (seed 003 "core_capabilities and split lock").
//!
//! - CPUID is KVM's supported set, edited here: the hypervisor bit, APIC ID 0, and
//!   CORE_CAPABILITIES (CPUID.(7,0):EDX bit 30) offered or hidden by [`CpuModel`], plus a
//!   nestio leaf ([`NESTIO_CPUID_LEAF`]: EAX "nest", EBX = the leaf-7 EDX the VMM set)
//!   so a guest can tell whether the leaf 7 it sees is the VMM's. Measured on this
//!   project's CI host (a PVM-based KVM): the added leaf reaches the guest but leaf 7 is
//!   replaced by the host's own, so bit 30 cannot be offered there; a guest then relies
//!   on IA32_CORE_CAPABILITIES (readable or #GP), which the VMM always controls.
//! - Several vCPUs ([`set_topology`]): vCPU `i` has local APIC ID `i`; the machine is one
//!   package of `N` cores with one thread each. Each vCPU's CPUID says so: leaf 1 EBX
//!   (initial APIC ID, logical processor count) and EDX.HTT, leaf 4 EAX[31:26] (cores per
//!   package), leaves 0xB and 0x1F (x2APIC ID in EDX of every subleaf; SMT level of
//!   width 0, core level of width ceil(log2 N)), and on AMD leaf 0x8000_0008 ECX (cores
//!   per package) and 0x8000_001E EAX (extended APIC ID).
//! - A VM of several vCPUs does not offer KVM's hypercall-based IPIs, remote TLB flushes,
//!   yields and spinlock kicks ([`hide_pv_ipi`]): the guest uses the in-kernel LAPIC.
//! - IA32_CORE_CAPABILITIES (0xCF) and MSR_TEST_CTRL (0x33) are denied in KVM's MSR
//!   filter, so every guest RDMSR/WRMSR of them exits to this model
//!   (KVM_CAP_X86_USER_SPACE_MSR with the FILTER reason). With split-lock detection
//!   offered, 0xCF reads bit 5 and TEST_CTRL bit 29 is read/write; any other TEST_CTRL bit
//!   is reserved and a write setting it raises #GP. With it hidden, 0xCF raises #GP and
//!   TEST_CTRL reads 0 and accepts only 0. The value lives in [`CpuState`], part of the
//!   saved vCPU state.
//! - A guest #AC that KVM hands to user space is a split-locked access (KVM re-injects
//!   legacy alignment checks itself). When the guest enabled detection it asked for the
//!   #AC and gets it injected; otherwise the VM stops with [`explain`]'s text: guest
//!   RIP, what a split lock is, the host policy and how to change it. Bus-lock exits
//!   (KVM_EXIT_X86_BUS_LOCK) are reported the same way and the guest continues.

use std::str::FromStr;

use kvm_bindings::CpuId;

/// MSR_TEST_CTRL.
pub const MSR_TEST_CTRL: u32 = 0x33;
/// MSR_TEST_CTRL.SPLIT_LOCK_DETECT.
pub const TEST_CTRL_SPLIT_LOCK_DETECT: u64 = 1 << 29;
/// IA32_CORE_CAPABILITIES.
pub const MSR_IA32_CORE_CAPABILITIES: u32 = 0xcf;
/// IA32_CORE_CAPABILITIES.SPLIT_LOCK_DETECT.
pub const CORE_CAPS_SPLIT_LOCK_DETECT: u64 = 1 << 5;
/// CPUID.(EAX=7,ECX=0):EDX bit enumerating IA32_CORE_CAPABILITIES.
pub const CPUID_7_EDX_CORE_CAPABILITIES: u32 = 1 << 30;
/// A CPUID leaf the VMM adds so that a guest can tell whether the CPUID it executes is
/// the VMM's (some hosts run guest CPUID natively and ignore KVM_SET_CPUID2).
pub const NESTIO_CPUID_LEAF: u32 = 0x4000_00f0;
/// EAX of [`NESTIO_CPUID_LEAF`]: "nest".
pub const NESTIO_CPUID_SIGNATURE: u32 = u32::from_le_bytes(*b"nest");
/// The #AC vector.
pub const AC_VECTOR: u32 = 17;
/// KVM exit reason of a bus lock.
pub const KVM_EXIT_X86_BUS_LOCK: u32 = 33;

/// Errors of the CPU model options.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// Unknown `--cpu` item.
    #[error("unknown --cpu item {0:?}: use split-lock-detect=on|off (or +split-lock-detect / -split-lock-detect)")]
    BadOption(String),
}

/// The CPU model the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuModel {
    /// Offer CORE_CAPABILITIES with SPLIT_LOCK_DETECT (and a writable TEST_CTRL bit 29).
    pub split_lock_detect: bool,
}

impl Default for CpuModel {
    fn default() -> Self {
        CpuModel {
            split_lock_detect: true,
        }
    }
}

impl FromStr for CpuModel {
    type Err = CpuError;
    /// Comma-separated items: `host` (the default model), `split-lock-detect=on|off`,
    /// `+split-lock-detect`, `-split-lock-detect` (`core-capabilities` is an alias).
    fn from_str(s: &str) -> Result<Self, CpuError> {
        let mut m = CpuModel::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, on) = if let Some(n) = item.strip_prefix('+') {
                (n, true)
            } else if let Some(n) = item.strip_prefix('-') {
                (n, false)
            } else if let Some((n, v)) = item.split_once('=') {
                match v {
                    "on" | "true" | "yes" => (n, true),
                    "off" | "false" | "no" => (n, false),
                    _ => return Err(CpuError::BadOption(item.into())),
                }
            } else if item == "host" || item == "default" {
                continue;
            } else {
                return Err(CpuError::BadOption(item.into()));
            };
            match name {
                "split-lock-detect" | "core-capabilities" => m.split_lock_detect = on,
                _ => return Err(CpuError::BadOption(item.into())),
            }
        }
        Ok(m)
    }
}

/// Per-vCPU state owned by the model (saved and restored with the vCPU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuState {
    /// The guest's MSR_TEST_CTRL.
    pub test_ctrl: u64,
}

impl CpuState {
    /// True when the guest turned split-lock detection on.
    pub fn split_lock_detect(&self) -> bool {
        self.test_ctrl & TEST_CTRL_SPLIT_LOCK_DETECT != 0
    }
}

impl CpuModel {
    /// MSRs this model emulates (denied in KVM's filter so that they exit to us).
    pub const MSRS: [u32; 2] = [MSR_TEST_CTRL, MSR_IA32_CORE_CAPABILITIES];

    /// Edit KVM's supported CPUID into the guest's (and add [`NESTIO_CPUID_LEAF`]).
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) {
        let mut leaf7_edx = 0;
        for e in cpuid.as_mut_slice() {
            match (e.function, e.index) {
                (1, _) => {
                    e.ecx |= 1 << 31; // hypervisor
                    e.ebx &= 0x00ff_ffff; // initial APIC ID 0
                }
                (7, 0) => {
                    if self.split_lock_detect {
                        e.edx |= CPUID_7_EDX_CORE_CAPABILITIES;
                    } else {
                        e.edx &= !CPUID_7_EDX_CORE_CAPABILITIES;
                    }
                    leaf7_edx = e.edx;
                }
                _ => {}
            }
        }
        let has_leaf = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == NESTIO_CPUID_LEAF);
        if !has_leaf {
            let e = kvm_bindings::kvm_cpuid_entry2 {
                function: NESTIO_CPUID_LEAF,
                eax: NESTIO_CPUID_SIGNATURE,
                ebx: leaf7_edx,
                ..Default::default()
            };
            if let Err(err) = cpuid.push(e) {
                tracing::warn!(?err, "CPUID table full; the nestio leaf is missing");
            }
        }
    }

    /// RDMSR of an emulated MSR: `None` raises #GP.
    pub fn rdmsr(&self, st: &CpuState, index: u32) -> Option<u64> {
        match index {
            MSR_IA32_CORE_CAPABILITIES if self.split_lock_detect => {
                Some(CORE_CAPS_SPLIT_LOCK_DETECT)
            }
            MSR_TEST_CTRL => Some(if self.split_lock_detect {
                st.test_ctrl
            } else {
                0
            }),
            _ => None,
        }
    }

    /// WRMSR of an emulated MSR: false raises #GP (reserved bits, hidden feature).
    pub fn wrmsr(&self, st: &mut CpuState, index: u32, value: u64) -> bool {
        match index {
            MSR_TEST_CTRL => {
                let allowed = if self.split_lock_detect {
                    TEST_CTRL_SPLIT_LOCK_DETECT
                } else {
                    0
                };
                if value & !allowed != 0 {
                    return false;
                }
                st.test_ctrl = value;
                true
            }
            _ => false,
        }
    }
}

/// Bits of an APIC ID that number the cores of a package of `count` cores.
fn core_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Make `cpuid` (one copy per vCPU, after [`CpuModel::apply_cpuid`]) describe vCPU
/// `apic_id` of a package of `count` single-thread cores: see the module documentation.
pub fn set_topology(cpuid: &mut CpuId, apic_id: u8, count: u8) {
    let count = count.max(1);
    let bits = core_bits(count);
    let id = u32::from(apic_id);
    let mut max_basic = 0;
    let mut has_1f = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            0 => max_basic = e.eax,
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            4 => {
                // Cores per package - 1 (a power of two minus one), on every cache level;
                // each cache is private to its core except the last level.
                let level = (e.eax >> 5) & 7;
                if e.eax & 0x1f != 0 {
                    let sharing = if level >= 3 { (1 << bits) - 1 } else { 0 };
                    e.eax = (e.eax & 0x3fff) | (((1 << bits) - 1) << 26) | (sharing << 14);
                }
            }
            0x1f => has_1f = true,
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (u32::from(count) - 1);
            }
            0x8000_001e => {
                e.eax = id;
                e.ebx &= !0xff; // core ID = APIC ID >> 0 (one thread per core)
                e.ebx |= id;
            }
            _ => {}
        }
    }
    // Replace leaves 0xB (and 0x1F where offered) with the topology above.
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();
    let mut leaves = vec![0xbu32];
    if has_1f || max_basic >= 0x1f {
        leaves.push(0x1f);
    }
    let mut out = entries;
    for leaf in leaves {
        if leaf > max_basic && max_basic != 0 {
            continue;
        }
        // (shift to the next level, logical processors at this level, level type)
        let levels = [(0u32, 1u32, 1u32), (bits, u32::from(count), 2), (0, 0, 0)];
        for (sub, (shift, n, kind)) in levels.into_iter().enumerate() {
            out.push(kvm_bindings::kvm_cpuid_entry2 {
                function: leaf,
                index: sub as u32,
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: n,
                ecx: (kind << 8) | sub as u32,
                edx: id,
                ..Default::default()
            });
        }
    }
    match CpuId::from_entries(&out) {
        Ok(c) => *cpuid = c,
        Err(err) => tracing::warn!(?err, "CPUID table full; topology leaves not replaced"),
    }
}

/// KVM's paravirtual feature leaf (CPUID 0x4000_0001 EAX).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_* bits whose hypercalls a multi-vCPU guest would use for IPIs, remote TLB
/// flushes, yields and spinlock kicks.
pub const KVM_PV_IPI_FEATURES: u32 = (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13);

/// Hide KVM's hypercall-based IPI features, so that the guest sends IPIs, flushes remote
/// TLBs and waits on spinlocks through the (in-kernel) local APIC.
pub fn hide_pv_ipi(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == KVM_CPUID_FEATURES {
            e.eax &= !KVM_PV_IPI_FEATURES;
        }
    }
}

/// What the host does about split locks (kernel command line, CPU flag, sysctl).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSplitLockPolicy {
    /// The CPU advertises split-lock detection (`split_lock_detect` in /proc/cpuinfo).
    pub cpu_detects: bool,
    /// `split_lock_detect=` from the kernel command line, if given.
    pub cmdline: Option<String>,
    /// `kernel.split_lock_mitigate` sysctl, if present.
    pub mitigate: Option<u32>,
}

impl HostSplitLockPolicy {
    /// Read the policy of this host.
    pub fn detect() -> Self {
        let cmdline = std::fs::read_to_string("/proc/cmdline").ok().and_then(|c| {
            c.split_whitespace()
                .find_map(|w| w.strip_prefix("split_lock_detect=").map(str::to_string))
        });
        let cpu_detects = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "split_lock_detect"))
            })
            .unwrap_or(false);
        let mitigate = std::fs::read_to_string("/proc/sys/kernel/split_lock_mitigate")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        HostSplitLockPolicy {
            cpu_detects,
            cmdline,
            mitigate,
        }
    }

    /// The policy in words.
    pub fn describe(&self) -> String {
        let mode = self.cmdline.as_deref().unwrap_or(if self.cpu_detects {
            "warn (kernel default)"
        } else {
            "not available on this CPU"
        });
        let mut s = format!("host split_lock_detect={mode}");
        if let Some(m) = self.mitigate {
            s.push_str(&format!(", kernel.split_lock_mitigate={m}"));
        }
        s
    }
}

/// A split-lock event from KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitLockEvent {
    /// KVM_EXIT_EXCEPTION with vector 17: the access faulted.
    AlignmentCheck {
        /// Guest RIP of the faulting instruction.
        rip: u64,
        /// Error code KVM reported.
        error_code: u32,
    },
    /// KVM_EXIT_X86_BUS_LOCK (or the BUS_LOCK run flag): the access completed.
    BusLock {
        /// Guest RIP after the instruction.
        rip: u64,
    },
}

/// What to do with an #AC exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcAction {
    /// The guest enabled split-lock detection: give it the #AC.
    InjectIntoGuest,
    /// Stop the VM with this explanation.
    Stop(String),
}

/// Decide what an #AC exit means for a guest in `st`.
pub fn on_alignment_check(
    st: &CpuState,
    rip: u64,
    error_code: u32,
    policy: &HostSplitLockPolicy,
) -> AcAction {
    if st.split_lock_detect() {
        AcAction::InjectIntoGuest
    } else {
        AcAction::Stop(explain(
            SplitLockEvent::AlignmentCheck { rip, error_code },
            policy,
            st,
        ))
    }
}

/// Plain-words report of a split-lock event.
pub fn explain(ev: SplitLockEvent, policy: &HostSplitLockPolicy, st: &CpuState) -> String {
    let guest = if st.split_lock_detect() {
        "the guest has enabled split-lock detection (MSR_TEST_CTRL bit 29)"
    } else {
        "the guest has not enabled split-lock detection (MSR_TEST_CTRL bit 29 is clear)"
    };
    match ev {
        SplitLockEvent::AlignmentCheck { rip, error_code } => format!(
            "guest stopped: alignment-check exception (#AC, vector 17, error code {error_code:#x}) \
             at guest RIP {rip:#x}. This is a split-locked access: a LOCK-prefixed instruction \
             (or XCHG with memory) whose operand spans two cache lines, which locks the whole \
             memory bus and slows every other CPU on the host. The host detected it and handed \
             it to the VMM because {guest}. Policy: {}. To go on: fix the guest code so the \
             locked operand is naturally aligned; or boot the host with split_lock_detect=warn \
             (log and continue) or split_lock_detect=off; or let the guest handle it itself by \
             offering the feature (--cpu split-lock-detect=on) and enabling MSR_TEST_CTRL bit \
             29 in the guest.",
            policy.describe()
        ),
        SplitLockEvent::BusLock { rip } => format!(
            "bus lock: the guest instruction before RIP {rip:#x} took a bus lock (a \
             split-locked or uncacheable locked access), which stalls memory traffic for the \
             whole host. The access completed and the guest continues. Policy: {}; {guest}. \
             To stop it: align the guest's locked operands; the host can rate-limit or \
             refuse such guests with split_lock_detect=ratelimit:N or =fatal.",
            policy.describe()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_option() {
        assert!(CpuModel::from_str("").unwrap().split_lock_detect);
        assert!(
            !CpuModel::from_str("-split-lock-detect")
                .unwrap()
                .split_lock_detect
        );
        assert!(
            !CpuModel::from_str("host,core-capabilities=off")
                .unwrap()
                .split_lock_detect
        );
        assert!(
            CpuModel::from_str("split-lock-detect=on")
                .unwrap()
                .split_lock_detect
        );
        assert!(CpuModel::from_str("avx512").is_err());
        assert!(CpuModel::from_str("split-lock-detect=maybe").is_err());
    }

    #[test]
    fn msrs_offered() {
        let m = CpuModel::default();
        let mut st = CpuState::default();
        assert_eq!(m.rdmsr(&st, MSR_IA32_CORE_CAPABILITIES), Some(1 << 5));
        assert!(!m.wrmsr(&mut st, MSR_IA32_CORE_CAPABILITIES, 0));
        assert!(m.wrmsr(&mut st, MSR_TEST_CTRL, TEST_CTRL_SPLIT_LOCK_DETECT));
        assert_eq!(m.rdmsr(&st, MSR_TEST_CTRL), Some(1 << 29));
        assert!(st.split_lock_detect());
        assert!(!m.wrmsr(&mut st, MSR_TEST_CTRL, 1 << 31), "reserved bit");
        assert!(!m.wrmsr(&mut st, MSR_TEST_CTRL, 1 << 29 | 1));
        assert_eq!(st.test_ctrl, 1 << 29, "a refused write changes nothing");
        assert!(m.wrmsr(&mut st, MSR_TEST_CTRL, 0));
        assert!(!st.split_lock_detect());
        assert_eq!(m.rdmsr(&st, 0x10), None);
    }

    #[test]
    fn msrs_hidden() {
        let m = CpuModel {
            split_lock_detect: false,
        };
        let mut st = CpuState::default();
        assert_eq!(m.rdmsr(&st, MSR_IA32_CORE_CAPABILITIES), None);
        assert_eq!(m.rdmsr(&st, MSR_TEST_CTRL), Some(0));
        assert!(!m.wrmsr(&mut st, MSR_TEST_CTRL, TEST_CTRL_SPLIT_LOCK_DETECT));
        assert!(m.wrmsr(&mut st, MSR_TEST_CTRL, 0));
    }

    #[test]
    fn cpuid_bit_follows_model() {
        let mut entries = vec![
            kvm_bindings::kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                edx: CPUID_7_EDX_CORE_CAPABILITIES,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0500_0000,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        CpuModel {
            split_lock_detect: false,
        }
        .apply_cpuid(&mut c);
        assert_eq!(c.as_slice()[0].edx & CPUID_7_EDX_CORE_CAPABILITIES, 0);
        assert_eq!(c.as_slice()[1].ebx >> 24, 0);
        assert_ne!(c.as_slice()[1].ecx & (1 << 31), 0);
        entries[0].edx = 0;
        let mut c = CpuId::from_entries(&entries).unwrap();
        CpuModel::default().apply_cpuid(&mut c);
        assert_ne!(c.as_slice()[0].edx & CPUID_7_EDX_CORE_CAPABILITIES, 0);
        let leaf = c
            .as_slice()
            .iter()
            .find(|e| e.function == NESTIO_CPUID_LEAF)
            .unwrap();
        assert_eq!(
            (leaf.eax, leaf.ebx),
            (NESTIO_CPUID_SIGNATURE, CPUID_7_EDX_CORE_CAPABILITIES)
        );
    }

    #[test]
    fn pv_ipi_features_hidden() {
        let mut c = CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax: 0xffff,
            ..Default::default()
        }])
        .unwrap();
        hide_pv_ipi(&mut c);
        let eax = c.as_slice()[0].eax;
        assert_eq!(eax & KVM_PV_IPI_FEATURES, 0);
        assert_eq!(eax | KVM_PV_IPI_FEATURES, 0xffff, "other features stay");
    }

    #[test]
    fn topology_per_vcpu() {
        let entries = [
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                edx: 7,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        set_topology(&mut c, 2, 3);
        let find = |f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        let l1 = find(1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x800, "the rest of EBX is kept");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT");
        let smt = find(0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        assert_eq!(find(0xb, 2).ecx >> 8 & 0xff, 0, "the list ends");
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == 0xb).count(),
            3,
            "KVM's own leaf 0xB is replaced"
        );
        assert!(
            c.as_slice().iter().all(|e| e.function != 0x1f),
            "0x1F beyond max leaf"
        );
        assert_eq!(core_bits(1), 0);
        assert_eq!(core_bits(2), 1);
        assert_eq!(core_bits(4), 2);
        assert_eq!(core_bits(5), 3);
    }

    #[test]
    fn alignment_check_is_explained_or_injected() {
        let policy = HostSplitLockPolicy {
            cpu_detects: true,
            cmdline: Some("fatal".into()),
            mitigate: Some(1),
        };
        let st = CpuState::default();
        let AcAction::Stop(msg) = on_alignment_check(&st, 0x20_1234, 0, &policy) else {
            panic!("a guest without detection must not get the #AC");
        };
        assert!(msg.contains("0x201234"), "{msg}");
        assert!(msg.contains("split-locked access"), "{msg}");
        assert!(msg.contains("split_lock_detect=fatal"), "{msg}");
        assert!(msg.contains("split_lock_detect=warn"), "{msg}");
        let on = CpuState {
            test_ctrl: TEST_CTRL_SPLIT_LOCK_DETECT,
        };
        assert_eq!(
            on_alignment_check(&on, 0x1000, 0, &policy),
            AcAction::InjectIntoGuest
        );
        let bl = explain(SplitLockEvent::BusLock { rip: 0xabc }, &policy, &st);
        assert!(bl.contains("0xabc") && bl.contains("bus lock"), "{bl}");
        let none = HostSplitLockPolicy {
            cpu_detects: false,
            cmdline: None,
            mitigate: None,
        };
        assert!(none.describe().contains("not available"));
    }
}
