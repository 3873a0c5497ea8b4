//! Command decoding (16-byte commands, opcode in bits 7:0).
//!
//! Every command this model accepts is decoded into [`Command`] with its operands;
//! anything else — an unknown opcode, or a command for a feature the IDRs do not
//! advertise (ATS, PRI, stalls, EL2/EL3 TLBs) — is CERROR_ILL, which stops the
//! queue at that command (CMDQ_CONS.ERR, GERROR.CMDQ_ERR) until software
//! acknowledges it through GERRORN. Field positions are Linux's `CMDQ_*`.

/// Opcodes (the architecture's names).
#[allow(missing_docs)]
pub mod op {
    pub const PREFETCH_CONFIG: u8 = 0x01;
    pub const PREFETCH_ADDR: u8 = 0x02;
    pub const CFGI_STE: u8 = 0x03;
    pub const CFGI_STE_RANGE: u8 = 0x04;
    pub const CFGI_CD: u8 = 0x05;
    pub const CFGI_CD_ALL: u8 = 0x06;
    pub const CFGI_ALL: u8 = 0x07;
    pub const TLBI_NH_ALL: u8 = 0x10;
    pub const TLBI_NH_ASID: u8 = 0x11;
    pub const TLBI_NH_VA: u8 = 0x12;
    pub const TLBI_NH_VAA: u8 = 0x13;
    pub const TLBI_S12_VMALL: u8 = 0x28;
    pub const TLBI_S2_IPA: u8 = 0x2a;
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    pub const CMD_SYNC: u8 = 0x46;
}

/// CMD_SYNC completion signal (CS); fields are the command's MSIAddr / MSIData.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSignal {
    None,
    /// SIG_IRQ: an MSI of `data` at `addr` (0: the wired interrupt).
    Irq {
        addr: u64,
        data: u32,
    },
    /// SIG_SEV: the event is not modelled; completion is visible in CMDQ_CONS.
    Sev,
}

/// A decoded command. Operands carry the architecture's field names (SID, SSID,
/// VMID, ASID, Address, Range).
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Prefetch,
    /// CFGI_STE (`leaf` ignored: there are no cached L1 descriptors).
    CfgiSte {
        sid: u32,
    },
    /// CFGI_STE_RANGE: 2^(range+1) stream IDs from `sid` aligned down.
    CfgiSteRange {
        sid: u32,
        range: u32,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
    },
    CfgiCdAll {
        sid: u32,
    },
    CfgiAll,
    TlbiNhAll {
        vmid: u16,
    },
    TlbiNhAsid {
        vmid: u16,
        asid: u16,
    },
    TlbiNhVa {
        vmid: u16,
        asid: u16,
        addr: u64,
    },
    TlbiNhVaa {
        vmid: u16,
        addr: u64,
    },
    TlbiS12Vmall {
        vmid: u16,
    },
    TlbiS2Ipa {
        vmid: u16,
        ipa: u64,
    },
    TlbiNsnhAll,
    Sync(SyncSignal),
}

/// An illegal command (CERROR_ILL) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal SMMU command {opcode:#04x}: {why}")]
pub struct IllegalCommand {
    /// The opcode (bits 7:0).
    pub opcode: u8,
    /// Why it is illegal.
    pub why: &'static str,
}

impl Command {
    /// The raw opcode of a command.
    pub fn opcode(raw: &[u64; 2]) -> u8 {
        raw[0] as u8
    }

    /// Decode a command, or say why it is illegal.
    pub fn decode(raw: &[u64; 2]) -> Result<Command, IllegalCommand> {
        let [d0, d1] = *raw;
        let opcode = d0 as u8;
        let ill = |why| IllegalCommand { opcode, why };
        let sid = (d0 >> 32) as u32;
        let vmid = (d0 >> 32) as u16;
        let asid = (d0 >> 48) as u16;
        // SSec (bit 10) selects the Secure stream table: no Secure state here.
        let ssec = d0 & (1 << 10) != 0;
        let cmd = match opcode {
            op::PREFETCH_CONFIG | op::PREFETCH_ADDR => Command::Prefetch,
            op::CFGI_STE | op::CFGI_STE_RANGE | op::CFGI_CD | op::CFGI_CD_ALL if ssec => {
                return Err(ill("SSec set without Secure state"))
            }
            op::CFGI_STE => Command::CfgiSte { sid },
            op::CFGI_STE_RANGE => Command::CfgiSteRange {
                sid,
                range: (d1 & 0x1f) as u32,
            },
            op::CFGI_CD => Command::CfgiCd {
                sid,
                ssid: ((d0 >> 12) & 0xf_ffff) as u32,
            },
            op::CFGI_CD_ALL => Command::CfgiCdAll { sid },
            op::CFGI_ALL => Command::CfgiAll,
            op::TLBI_NH_ALL => Command::TlbiNhAll { vmid },
            op::TLBI_NH_ASID => Command::TlbiNhAsid { vmid, asid },
            op::TLBI_NH_VA => Command::TlbiNhVa {
                vmid,
                asid,
                addr: d1 & !0xfff,
            },
            op::TLBI_NH_VAA => Command::TlbiNhVaa {
                vmid,
                addr: d1 & !0xfff,
            },
            op::TLBI_S12_VMALL => Command::TlbiS12Vmall { vmid },
            op::TLBI_S2_IPA => Command::TlbiS2Ipa {
                vmid,
                ipa: d1 & 0x000f_ffff_ffff_f000,
            },
            op::TLBI_NSNH_ALL => Command::TlbiNsnhAll,
            op::CMD_SYNC => Command::Sync(match (d0 >> 12) & 3 {
                0 => SyncSignal::None,
                1 => SyncSignal::Irq {
                    addr: d1 & 0x000f_ffff_ffff_fffc,
                    data: (d0 >> 32) as u32,
                },
                2 => SyncSignal::Sev,
                _ => return Err(ill("reserved CMD_SYNC.CS")),
            }),
            0x40 => return Err(ill("ATC_INV: ATS is not implemented")),
            0x41 => return Err(ill("PRI_RESP: PRI is not implemented")),
            0x44 | 0x45 => return Err(ill("RESUME/STALL_TERM: stalls are not implemented")),
            0x18 | 0x1a | 0x20..=0x23 => return Err(ill("EL2/EL3 TLBI: no HYP or Secure")),
            _ => return Err(ill("unknown opcode")),
        };
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_operands() {
        let c = Command::decode(&[0x12 | (5u64 << 48) | (3u64 << 32), 0x1234_5fff]).unwrap();
        assert_eq!(
            c,
            Command::TlbiNhVa {
                vmid: 3,
                asid: 5,
                addr: 0x1234_5000
            }
        );
        let s = Command::decode(&[0x46 | (1 << 12) | (0xabcdu64 << 32), 0x8003]).unwrap();
        assert_eq!(
            s,
            Command::Sync(SyncSignal::Irq {
                addr: 0x8000,
                data: 0xabcd
            })
        );
        assert_eq!(
            Command::decode(&[0x04 | (0x10u64 << 32), 31]).unwrap(),
            Command::CfgiSteRange {
                sid: 0x10,
                range: 31
            }
        );
        assert!(Command::decode(&[0x46 | (3 << 12), 0]).is_err());
        assert!(Command::decode(&[0x40, 0]).is_err());
        assert!(Command::decode(&[0xff, 0]).is_err());
        assert!(Command::decode(&[0x03 | (1 << 10), 0]).is_err());
    }
}
