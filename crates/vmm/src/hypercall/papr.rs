//! PAPR hypercall numbers and return codes, as typed constants.
//!
//! Values from the primary sources: Linux `arch/powerpc/include/asm/hvcall.h` (return
//! codes, the pSeries opcodes, the XIVE `H_INT_*` block, the nested-virtualisation
//! `0xF800` block) and QEMU `include/hw/ppc/spapr.h` (the same numbers; `H_RTAS` is the
//! KVM/QEMU platform-specific call `0xF000`). Note that `H_NOT_FOUND` is **-7** there
//! (-5 is `H_BAD_MODE`), and `H_P2`..`H_P9` (-55..-62) name the bad parameter.
//!
//! Opcodes are multiples of 4 up to `0xFFFC`; `0xF000..=0xFFFC` is reserved by PAPR
//! for platform-specific calls, where nestio puts its own ([`H_NESTIO_RTAS_TOKEN`]).

use std::fmt;

/// A hypercall number (PAPR "opcode"): a multiple of 4, at most [`Opcode::MAX`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Opcode(u64);

impl Opcode {
    /// The largest opcode PAPR defines room for (the end of the platform-specific range).
    pub const MAX: u64 = 0xFFFC;

    /// A checked opcode: `None` unless `raw` is a multiple of 4 no larger than
    /// [`Opcode::MAX`] (a guest asking for anything else gets `H_FUNCTION`).
    pub const fn new(raw: u64) -> Option<Opcode> {
        if raw & 3 == 0 && raw <= Self::MAX {
            Some(Opcode(raw))
        } else {
            None
        }
    }

    /// The number.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The PAPR name of a known opcode.
    pub fn name(self) -> Option<&'static str> {
        KNOWN.iter().find(|(o, _)| *o == self).map(|(_, n)| *n)
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({:#x})", self.0),
            None => write!(f, "Opcode({:#x})", self.0),
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A hypercall return code (PAPR `r3`; negative values are errors).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HStatus(pub i64);

impl HStatus {
    /// The value as the guest's return register holds it (sign-extended 64-bit).
    pub const fn to_reg(self) -> u64 {
        self.0 as u64
    }

    /// The value read back from a return register.
    pub const fn from_reg(reg: u64) -> HStatus {
        HStatus(reg as i64)
    }

    /// True for `H_SUCCESS`.
    pub const fn is_success(self) -> bool {
        self.0 == 0
    }

    /// The PAPR name of a known code.
    pub fn name(self) -> Option<&'static str> {
        STATUS_NAMES
            .iter()
            .find(|(s, _)| *s == self)
            .map(|(_, n)| *n)
    }
}

impl fmt::Debug for HStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({})", self.0),
            None => write!(f, "HStatus({})", self.0),
        }
    }
}

impl fmt::Display for HStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

macro_rules! table {
    ($ty:ident, $list:ident, $( $(#[$m:meta])* $name:ident = $v:expr ),* $(,)?) => {
        $( $(#[$m])* pub const $name: $ty = $ty($v); )*
        const $list: &[($ty, &str)] = &[ $( ($name, stringify!($name)) ),* ];
    };
}

table! {HStatus, STATUS_NAMES,
    /// Success.
    H_SUCCESS = 0,
    /// Hardware busy, retry later.
    H_BUSY = 1,
    /// Resource closed.
    H_CLOSED = 2,
    /// Not available.
    H_NOT_AVAILABLE = 3,
    /// Request constrained to the allowed maximum.
    H_CONSTRAINED = 4,
    /// Partially done.
    H_PARTIAL = 5,
    /// In progress.
    H_IN_PROGRESS = 14,
    /// Hardware error.
    H_HARDWARE = -1,
    /// Function not supported (unknown opcode).
    H_FUNCTION = -2,
    /// Caller not privileged.
    H_PRIVILEGE = -3,
    /// Parameter invalid, out of range or conflicting.
    H_PARAMETER = -4,
    /// Illegal MSR value.
    H_BAD_MODE = -5,
    /// PTEG full.
    H_PTEG_FULL = -6,
    /// Not found.
    H_NOT_FOUND = -7,
    /// Out of memory.
    H_NO_MEM = -9,
    /// Not authorised.
    H_AUTHORITY = -10,
    /// Permission denied.
    H_PERMISSION = -11,
    /// Dropped.
    H_DROPPED = -12,
    /// Source parameter.
    H_SOURCE_PARM = -13,
    /// Destination parameter.
    H_DEST_PARM = -14,
    /// Resource unavailable.
    H_RESOURCE = -16,
    /// Second parameter invalid.
    H_P2 = -55,
    /// Third parameter invalid.
    H_P3 = -56,
    /// Fourth parameter invalid.
    H_P4 = -57,
    /// Fifth parameter invalid.
    H_P5 = -58,
    /// Sixth parameter invalid.
    H_P6 = -59,
    /// Seventh parameter invalid.
    H_P7 = -60,
    /// Eighth parameter invalid.
    H_P8 = -61,
    /// Ninth parameter invalid.
    H_P9 = -62,
    /// Too big.
    H_TOO_BIG = -64,
    /// Overlap.
    H_OVERLAP = -68,
    /// Bad data.
    H_BAD_DATA = -70,
    /// Not active.
    H_NOT_ACTIVE = -71,
    /// Bad scatter/gather list.
    H_SG_LIST = -72,
}

table! {Opcode, KNOWN,
    /// Read a TCE: `liobn, ioba` -> the TCE in ret 0.
    H_GET_TCE = 0x1C,
    /// Write a TCE: `liobn, ioba, tce`.
    H_PUT_TCE = 0x20,
    /// Read up to 16 characters from a virtual terminal: `termno` -> `len, chars0_7,
    /// chars8_15` (characters packed big-endian, first character in the top byte).
    H_GET_TERM_CHAR = 0x54,
    /// Write up to 16 characters to a virtual terminal: `termno, len, chars0_7,
    /// chars8_15`.
    H_PUT_TERM_CHAR = 0x58,
    /// Idle the processor until an interrupt.
    H_CEDE = 0xE0,
    /// Write one TCE value to `count` consecutive entries: `liobn, ioba, tce, count`.
    H_STUFF_TCE = 0x138,
    /// Write up to 512 TCEs listed in a guest page: `liobn, ioba, tce_list, count`.
    H_PUT_TCE_INDIRECT = 0x13C,
    /// XIVE: source information.
    H_INT_GET_SOURCE_INFO = 0x3A8,
    /// XIVE: route a source.
    H_INT_SET_SOURCE_CONFIG = 0x3AC,
    /// XIVE: a source's route.
    H_INT_GET_SOURCE_CONFIG = 0x3B0,
    /// XIVE: event queue information.
    H_INT_GET_QUEUE_INFO = 0x3B4,
    /// XIVE: configure an event queue.
    H_INT_SET_QUEUE_CONFIG = 0x3B8,
    /// XIVE: an event queue's configuration.
    H_INT_GET_QUEUE_CONFIG = 0x3BC,
    /// XIVE: set the OS reporting line.
    H_INT_SET_OS_REPORTING_LINE = 0x3C0,
    /// XIVE: the OS reporting line.
    H_INT_GET_OS_REPORTING_LINE = 0x3C4,
    /// XIVE: ESB load/store on behalf of the guest.
    H_INT_ESB = 0x3C8,
    /// XIVE: synchronise a source.
    H_INT_SYNC = 0x3CC,
    /// XIVE: reset the interrupt controller.
    H_INT_RESET = 0x3D0,
    /// RTAS call: `rtas_args` guest-physical address (KVM/QEMU platform call).
    H_RTAS = 0xF000,
    /// Nested virtualisation: copy to/from a nested guest (FACTS §3).
    H_COPY_TOFROM_GUEST = 0xF80C,
    /// nestio: the RTAS token of a call by name (`name_gpa, name_len` -> token in ret 0).
    /// Stands in for the device tree's `/rtas` node, which these guests do not have.
    H_NESTIO_RTAS_TOKEN = 0xFF00,
}

/// The XIVE exploitation calls, `H_INT_GET_SOURCE_INFO..=H_INT_RESET`, for registering
/// one handler for all of them.
pub const H_INT_ALL: [Opcode; 11] = [
    H_INT_GET_SOURCE_INFO,
    H_INT_SET_SOURCE_CONFIG,
    H_INT_GET_SOURCE_CONFIG,
    H_INT_GET_QUEUE_INFO,
    H_INT_SET_QUEUE_CONFIG,
    H_INT_GET_QUEUE_CONFIG,
    H_INT_SET_OS_REPORTING_LINE,
    H_INT_GET_OS_REPORTING_LINE,
    H_INT_ESB,
    H_INT_SYNC,
    H_INT_RESET,
];

/// The TCE calls, for registering one handler for all of them.
pub const H_TCE_ALL: [Opcode; 4] = [H_GET_TCE, H_PUT_TCE, H_STUFF_TCE, H_PUT_TCE_INDIRECT];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_are_checked_and_named() {
        assert_eq!(Opcode::new(0x20), Some(H_PUT_TCE));
        assert_eq!(Opcode::new(0x21), None, "not a multiple of 4");
        assert_eq!(Opcode::new(0x1_0000), None, "past the platform range");
        assert_eq!(Opcode::new(u64::MAX), None);
        assert_eq!(H_PUT_TCE_INDIRECT.name(), Some("H_PUT_TCE_INDIRECT"));
        assert_eq!(format!("{H_RTAS}"), "H_RTAS(0xf000)");
        assert_eq!(
            format!("{:?}", Opcode::new(0x400).unwrap()),
            "Opcode(0x400)"
        );
        for o in KNOWN {
            assert_eq!(Opcode::new(o.0.raw()), Some(o.0), "{}", o.1);
        }
        // The XIVE block is contiguous, every 4.
        for w in H_INT_ALL.windows(2) {
            assert_eq!(w[1].raw() - w[0].raw(), 4);
        }
    }

    #[test]
    fn status_codes_round_trip_through_a_register() {
        assert_eq!(H_FUNCTION.to_reg(), 0xFFFF_FFFF_FFFF_FFFE);
        assert_eq!(HStatus::from_reg(H_NOT_FOUND.to_reg()), H_NOT_FOUND);
        assert_eq!(H_NOT_FOUND.0, -7);
        assert_eq!(H_P3.0, -56);
        assert!(H_SUCCESS.is_success() && !H_PARAMETER.is_success());
        assert_eq!(format!("{H_PARAMETER}"), "H_PARAMETER(-4)");
        assert_eq!(format!("{}", HStatus(-1000)), "HStatus(-1000)");
    }

    /// Differential check against Linux's own table
    /// (`arch/powerpc/include/asm/hvcall.h` of the kernel source `linux/build.sh`
    /// unpacks into `target/linux`, which `scripts/test.sh` always does): every opcode
    /// and return code here has Linux's name and value. Only nestio's own
    /// `H_NESTIO_*` calls are absent from Linux. Without the source this SKIPs loudly,
    /// and fails in CI.
    #[test]
    fn every_number_matches_linux_hvcall_h() {
        let h = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/linux/linux-source-6.1/arch/powerpc/include/asm/hvcall.h");
        let Ok(text) = std::fs::read_to_string(&h) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{} is missing in CI: scripts/test.sh unpacks the kernel source",
                h.display()
            );
            eprintln!(
                "SKIP: {} is missing (run linux/build.sh): PAPR numbers not compared with Linux",
                h.display()
            );
            return;
        };
        let mut linux = std::collections::BTreeMap::new();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if let (Some("#define"), Some(name), Some(value)) = (w.next(), w.next(), w.next()) {
                let v = match value
                    .strip_prefix("0x")
                    .or_else(|| value.strip_prefix("0X"))
                {
                    Some(hex) => i64::from_str_radix(hex, 16).ok(),
                    None => value.parse::<i64>().ok(),
                };
                if let Some(v) = v {
                    linux.insert(name.to_string(), v);
                }
            }
        }
        let mut compared = 0;
        for (status, name) in STATUS_NAMES {
            assert_eq!(linux.get(*name), Some(&status.0), "{name}");
            compared += 1;
        }
        for (op, name) in KNOWN {
            if name.starts_with("H_NESTIO_") {
                assert!(!linux.contains_key(*name), "{name} is nestio's own");
                continue;
            }
            assert_eq!(linux.get(*name), Some(&(op.raw() as i64)), "{name}");
            compared += 1;
        }
        assert!(compared > 40, "only {compared} names compared");
    }
}
