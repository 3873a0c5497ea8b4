//! The DPAA2 object types a container holds, their command ids and the parameter
//! layouts nestio encodes — all with Linux's names, so `tests/fsl_mc_linux.rs` can
//! compare every number with Linux's headers (`drivers/bus/fsl-mc/fsl-mc-private.h`,
//! `drivers/net/ethernet/freescale/dpaa2/dpni-cmd.h`, `dpmac-cmd.h`,
//! `drivers/soc/fsl/dpio/dpio-cmd.h`).
//!
//! What each emulated type offers (regions and interrupts as the MC reports them):
//!
//! | type | regions | irqs | enable | commands beyond open/close/reset/api version |
//! |---|---|---|---|---|
//! | dpni | – | 1 (link changed) | yes | attributes, is-enabled, irq set, link state, max frame length |
//! | dpio | 2 QBMan portals (cache-enabled, cache-inhibited) | 1 | yes | attributes, is-enabled, irq set |
//! | dpbp | – | – | yes | attributes, is-enabled |
//! | dpcon | – | – | yes | attributes, is-enabled |
//! | dpmcp | 1 MC portal | 1 (command done) | – | irq set |
//! | dpmac | – | 1 | – | attributes, irq set |

use super::portal::CmdId;

/// Size of every region (MC portals and QBMan portals are 64 KiB since MC API 6.6).
pub const REGION_SIZE: u64 = 0x1_0000;
/// `FSL_MC_VENDOR_FREESCALE`.
pub const VENDOR_FREESCALE: u16 = 0x1957;
/// `FSL_MC_OBJ_STATE_OPEN`.
pub const OBJ_STATE_OPEN: u32 = 0x1;
/// `FSL_MC_OBJ_STATE_PLUGGED`.
pub const OBJ_STATE_PLUGGED: u32 = 0x2;
/// `FSL_MC_REGION_CACHEABLE`.
pub const REGION_CACHEABLE: u32 = 0x1;
/// `FSL_MC_REGION_SHAREABLE`.
pub const REGION_SHAREABLE: u32 = 0x2;
/// `FSL_MC_IS_DPRC` (object descriptor flag).
pub const IS_DPRC: u16 = 0x1;
/// `DPRC_RESET_OPTION_NON_RECURSIVE`.
pub const DPRC_RESET_OPTION_NON_RECURSIVE: u32 = 0x1;
/// `DPNI_IRQ_EVENT_LINK_CHANGED`.
pub const DPNI_IRQ_EVENT_LINK_CHANGED: u32 = 0x1;
/// nestio's DPMCP completion event (bit 0 of its irq 0): a command completed on the
/// portal without `MC_CMD_FLAG_INTR_DIS` (the flag Linux still defines).
pub const DPMCP_IRQ_EVENT_CMD_DONE: u32 = 0x1;

/// `enum dprc_region_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RegionType {
    /// `DPRC_REGION_TYPE_MC_PORTAL`.
    McPortal = 0,
    /// `DPRC_REGION_TYPE_QBMAN_PORTAL`.
    QbmanPortal = 1,
}

/// Command ids (Linux names without the `_CMDID`): `(id << 4) | version`.
pub mod cmd {
    use super::CmdId;
    /// Generic `OBJ_CMDID_CLOSE` (every type).
    pub const CLOSE: CmdId = CmdId::v1(0x800);
    /// Generic enable.
    pub const ENABLE: CmdId = CmdId::v1(0x002);
    /// Generic disable.
    pub const DISABLE: CmdId = CmdId::v1(0x003);
    /// Generic get attributes.
    pub const GET_ATTR: CmdId = CmdId::v1(0x004);
    /// Generic `OBJ_CMDID_RESET` (DPRC: reset container).
    pub const RESET: CmdId = CmdId::v1(0x005);
    /// Generic is-enabled.
    pub const IS_ENABLED: CmdId = CmdId::v1(0x006);
    /// Set irq.
    pub const SET_IRQ: CmdId = CmdId::v1(0x010);
    /// Get irq.
    pub const GET_IRQ: CmdId = CmdId::v1(0x011);
    /// Set irq enable.
    pub const SET_IRQ_ENABLE: CmdId = CmdId::v1(0x012);
    /// Get irq enable.
    pub const GET_IRQ_ENABLE: CmdId = CmdId::v1(0x013);
    /// Set irq mask.
    pub const SET_IRQ_MASK: CmdId = CmdId::v1(0x014);
    /// Get irq mask.
    pub const GET_IRQ_MASK: CmdId = CmdId::v1(0x015);
    /// Get irq status.
    pub const GET_IRQ_STATUS: CmdId = CmdId::v1(0x016);
    /// Clear irq status.
    pub const CLEAR_IRQ_STATUS: CmdId = CmdId::v1(0x017);
    /// `DPRC_CMDID_RESET_CONT_V2` (with the options word).
    pub const DPRC_RESET_CONT_V2: CmdId = CmdId::v(0x005, 2);
    /// `DPRC_CMDID_GET_API_VERSION`.
    pub const DPRC_GET_API_VERSION: CmdId = CmdId::v1(0xa05);
    /// `DPRC_CMDID_GET_CONT_ID`.
    pub const DPRC_GET_CONT_ID: CmdId = CmdId::v1(0x830);
    /// `DPMNG_CMDID_GET_VERSION` (MC firmware version).
    pub const DPMNG_GET_VERSION: CmdId = CmdId::v1(0x831);
    /// `DPRC_CMDID_CREATE_CONT` (not in Linux 6.1's headers; MC API).
    pub const DPRC_CREATE_CONT: CmdId = CmdId::v1(0x151);
    /// `DPRC_CMDID_DESTROY_CONT` (MC API).
    pub const DPRC_DESTROY_CONT: CmdId = CmdId::v1(0x152);
    /// `DPRC_CMDID_ASSIGN` (MC API).
    pub const DPRC_ASSIGN: CmdId = CmdId::v1(0x157);
    /// `DPRC_CMDID_UNASSIGN` (MC API).
    pub const DPRC_UNASSIGN: CmdId = CmdId::v1(0x158);
    /// `DPRC_CMDID_GET_OBJ_COUNT`.
    pub const DPRC_GET_OBJ_COUNT: CmdId = CmdId::v1(0x159);
    /// `DPRC_CMDID_GET_OBJ`.
    pub const DPRC_GET_OBJ: CmdId = CmdId::v1(0x15A);
    /// `DPRC_CMDID_GET_OBJ_REG`.
    pub const DPRC_GET_OBJ_REG: CmdId = CmdId::v1(0x15E);
    /// `DPRC_CMDID_GET_OBJ_REG_V2`.
    pub const DPRC_GET_OBJ_REG_V2: CmdId = CmdId::v(0x15E, 2);
    /// `DPRC_CMDID_GET_OBJ_REG_V3`.
    pub const DPRC_GET_OBJ_REG_V3: CmdId = CmdId::v(0x15E, 3);
    /// `DPRC_CMDID_SET_OBJ_IRQ`.
    pub const DPRC_SET_OBJ_IRQ: CmdId = CmdId::v1(0x15F);
    /// `DPRC_CMDID_GET_CONNECTION`.
    pub const DPRC_GET_CONNECTION: CmdId = CmdId::v1(0x16C);
    /// `DPNI_CMDID_GET_LINK_STATE`.
    pub const DPNI_GET_LINK_STATE: CmdId = CmdId::v1(0x215);
    /// `DPNI_CMDID_SET_MAX_FRAME_LENGTH`.
    pub const DPNI_SET_MAX_FRAME_LENGTH: CmdId = CmdId::v1(0x216);
    /// `DPNI_CMDID_GET_MAX_FRAME_LENGTH`.
    pub const DPNI_GET_MAX_FRAME_LENGTH: CmdId = CmdId::v1(0x217);
}

/// Byte offsets inside the parameter words, named `struct.field` as in Linux (the
/// encoders use exactly these; the Linux header test compares each). Each constant is
/// declared once with the `struct.field`s it stands for: its doc and the table
/// [`layout::ALL`] come from that one list.
pub mod layout {
    /// `NAME = offset => [struct, field], ...;` declares `pub const NAME: usize = offset`
    /// documented with its `struct.field`s, and puts each `(struct, field, NAME)` in
    /// [`ALL`].
    macro_rules! offsets {
        ($($(#[$note:meta])* $name:ident = $off:literal => $([$s:literal, $f:literal]),+;)*) => {
            $(
                #[doc = concat!($("`", $s, ".", $f, "` "),+)]
                $(#[$note])*
                pub const $name: usize = $off;
            )*
            /// `(struct, field, offset)` for every offset nestio encodes or decodes.
            pub const ALL: &[(&str, &str, usize)] = &[$($(($s, $f, $name)),+),*];
        };
    }

    offsets! {
        DPRC_OPEN_CONTAINER_ID = 0 => ["dprc_cmd_open", "container_id"];
        OBJ_OPEN_ID = 0 => ["fsl_mc_obj_cmd_open", "obj_id"];
        API_MAJOR = 0 => ["mc_rsp_api_ver", "major_ver"];
        API_MINOR = 2 => ["mc_rsp_api_ver", "minor_ver"];
        /// (GET_CONT_ID answers with it)
        CONT_ID = 0 => ["mc_rsp_create", "object_id"];
        RESET_CHILD_ID = 0 => ["dprc_cmd_reset_container", "child_container_id"];
        RESET_OPTIONS = 4 => ["dprc_cmd_reset_container", "options"];
        IRQ_VAL = 0 => ["dprc_cmd_set_irq", "irq_val"], ["dprc_cmd_set_obj_irq", "irq_val"];
        /// (every irq command)
        IRQ_INDEX = 4 =>
            ["dprc_cmd_set_irq", "irq_index"],
            ["dprc_cmd_set_irq_enable", "irq_index"],
            ["dprc_cmd_set_irq_mask", "irq_index"],
            ["dprc_cmd_get_irq_status", "irq_index"],
            ["dprc_cmd_clear_irq_status", "irq_index"],
            ["dpni_cmd_get_irq_enable", "irq_index"],
            ["dpni_cmd_get_irq_mask", "irq_index"],
            ["dprc_cmd_set_obj_irq", "irq_index"];
        IRQ_ADDR = 8 =>
            ["dprc_cmd_set_irq", "irq_addr"],
            ["dprc_cmd_set_obj_irq", "irq_addr"];
        IRQ_NUM = 16 =>
            ["dprc_cmd_set_irq", "irq_num"],
            ["dprc_cmd_set_obj_irq", "irq_num"];
        IRQ_ENABLE = 0 =>
            ["dprc_cmd_set_irq_enable", "enable"],
            ["dpni_rsp_get_irq_enable", "enabled"];
        IRQ_MASK = 0 =>
            ["dprc_cmd_set_irq_mask", "mask"],
            ["dpni_rsp_get_irq_mask", "mask"];
        IRQ_STATUS = 0 =>
            ["dprc_cmd_get_irq_status", "status"],
            ["dprc_rsp_get_irq_status", "status"],
            ["dprc_cmd_clear_irq_status", "status"];
        ATTR_CONTAINER_ID = 0 => ["dprc_rsp_get_attributes", "container_id"];
        ATTR_ICID = 4 => ["dprc_rsp_get_attributes", "icid"];
        ATTR_OPTIONS = 8 => ["dprc_rsp_get_attributes", "options"];
        ATTR_PORTAL_ID = 12 => ["dprc_rsp_get_attributes", "portal_id"];
        OBJ_COUNT = 4 => ["dprc_rsp_get_obj_count", "obj_count"];
        GET_OBJ_INDEX = 0 => ["dprc_cmd_get_obj", "obj_index"];
        OBJ_ID = 4 => ["dprc_rsp_get_obj", "id"];
        OBJ_VENDOR = 8 => ["dprc_rsp_get_obj", "vendor"];
        OBJ_IRQ_COUNT = 10 => ["dprc_rsp_get_obj", "irq_count"];
        OBJ_REGION_COUNT = 11 => ["dprc_rsp_get_obj", "region_count"];
        OBJ_STATE = 12 => ["dprc_rsp_get_obj", "state"];
        OBJ_VER_MAJOR = 16 => ["dprc_rsp_get_obj", "version_major"];
        OBJ_VER_MINOR = 18 => ["dprc_rsp_get_obj", "version_minor"];
        OBJ_FLAGS = 20 => ["dprc_rsp_get_obj", "flags"];
        OBJ_TYPE = 24 => ["dprc_rsp_get_obj", "type"];
        OBJ_LABEL = 40 => ["dprc_rsp_get_obj", "label"];
        REG_OBJ_ID = 0 => ["dprc_cmd_get_obj_region", "obj_id"];
        REG_INDEX = 6 => ["dprc_cmd_get_obj_region", "region_index"];
        REG_OBJ_TYPE = 24 => ["dprc_cmd_get_obj_region", "obj_type"];
        REG_BASE_OFFSET = 8 => ["dprc_rsp_get_obj_region", "base_offset"];
        REG_SIZE = 16 => ["dprc_rsp_get_obj_region", "size"];
        REG_TYPE = 20 => ["dprc_rsp_get_obj_region", "type"];
        REG_FLAGS = 24 => ["dprc_rsp_get_obj_region", "flags"];
        REG_BASE_ADDR = 32 => ["dprc_rsp_get_obj_region", "base_addr"];
        SET_OBJ_IRQ_OBJ_ID = 20 => ["dprc_cmd_set_obj_irq", "obj_id"];
        SET_OBJ_IRQ_OBJ_TYPE = 24 => ["dprc_cmd_set_obj_irq", "obj_type"];
        CONN_EP1_ID = 0 => ["dprc_cmd_get_connection", "ep1_id"];
        CONN_EP1_IF = 4 => ["dprc_cmd_get_connection", "ep1_interface_id"];
        CONN_EP1_TYPE = 8 => ["dprc_cmd_get_connection", "ep1_type"];
        CONN_EP2_ID = 24 => ["dprc_rsp_get_connection", "ep2_id"];
        CONN_EP2_IF = 28 => ["dprc_rsp_get_connection", "ep2_interface_id"];
        CONN_EP2_TYPE = 32 => ["dprc_rsp_get_connection", "ep2_type"];
        CONN_STATE = 48 => ["dprc_rsp_get_connection", "state"];
        /// (bit `DPNI_ENABLE_SHIFT` = 0)
        IS_ENABLED = 0 => ["dpni_rsp_is_enabled", "enabled"];
        DPNI_ATTR_OPTIONS = 0 => ["dpni_rsp_get_attr", "options"];
        DPNI_ATTR_NUM_QUEUES = 4 => ["dpni_rsp_get_attr", "num_queues"];
        DPNI_ATTR_NUM_TCS = 5 => ["dpni_rsp_get_attr", "num_tcs"];
        DPNI_ATTR_MAC_FILTERS = 6 => ["dpni_rsp_get_attr", "mac_filter_entries"];
        DPNI_ATTR_FS_ENTRIES = 12 => ["dpni_rsp_get_attr", "fs_entries"];
        DPNI_ATTR_WRIOP = 18 => ["dpni_rsp_get_attr", "wriop_version"];
        /// (bit 0: up)
        DPNI_LINK_FLAGS = 4 => ["dpni_rsp_get_link_state", "flags"];
        DPNI_LINK_RATE = 8 => ["dpni_rsp_get_link_state", "rate"];
        DPNI_LINK_OPTIONS = 16 => ["dpni_rsp_get_link_state", "options"];
        DPNI_MFL = 0 =>
            ["dpni_cmd_set_max_frame_length", "max_frame_length"],
            ["dpni_rsp_get_max_frame_length", "max_frame_length"];
        DPIO_ATTR_ID = 0 => ["dpio_rsp_get_attr", "id"];
        DPIO_ATTR_PORTAL_ID = 4 => ["dpio_rsp_get_attr", "qbman_portal_id"];
        DPIO_ATTR_NUM_PRIO = 6 => ["dpio_rsp_get_attr", "num_priorities"];
        DPIO_ATTR_CE_ADDR = 8 => ["dpio_rsp_get_attr", "qbman_portal_ce_addr"];
        DPIO_ATTR_CI_ADDR = 16 => ["dpio_rsp_get_attr", "qbman_portal_ci_addr"];
        DPIO_ATTR_QBMAN_VERSION = 24 => ["dpio_rsp_get_attr", "qbman_version"];
        DPBP_ATTR_BPID = 2 => ["dpbp_rsp_get_attributes", "bpid"];
        DPBP_ATTR_ID = 4 => ["dpbp_rsp_get_attributes", "id"];
        DPCON_ATTR_ID = 0 => ["dpcon_rsp_get_attr", "id"];
        DPCON_ATTR_CH_ID = 4 => ["dpcon_rsp_get_attr", "qbman_ch_id"];
        DPCON_ATTR_NUM_PRIO = 6 => ["dpcon_rsp_get_attr", "num_priorities"];
        DPMAC_ATTR_ETH_IF = 0 => ["dpmac_rsp_get_attributes", "eth_if"];
        DPMAC_ATTR_LINK_TYPE = 1 => ["dpmac_rsp_get_attributes", "link_type"];
        DPMAC_ATTR_ID = 2 => ["dpmac_rsp_get_attributes", "id"];
        DPMAC_ATTR_MAX_RATE = 4 => ["dpmac_rsp_get_attributes", "max_rate"];
        DPMNG_REVISION = 0 => ["dpmng_rsp_get_version", "revision"];
        DPMNG_MAJOR = 4 => ["dpmng_rsp_get_version", "version_major"];
        DPMNG_MINOR = 8 => ["dpmng_rsp_get_version", "version_minor"];
    }
}

/// The object types the MC knows (FACTS §8); [`ObjType::emulated`] says which nestio
/// emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjType {
    /// Resource container.
    Dprc,
    /// Network interface.
    Dpni,
    /// I/O (QBMan software portal).
    Dpio,
    /// Buffer pool.
    Dpbp,
    /// Concentrator.
    Dpcon,
    /// MC portal.
    Dpmcp,
    /// MAC.
    Dpmac,
    /// Security engine interface.
    Dpseci,
    /// Switch.
    Dpsw,
    /// Demultiplexer.
    Dpdmux,
}

impl ObjType {
    /// Every type.
    pub const ALL: [ObjType; 10] = [
        ObjType::Dprc,
        ObjType::Dpni,
        ObjType::Dpio,
        ObjType::Dpbp,
        ObjType::Dpcon,
        ObjType::Dpmcp,
        ObjType::Dpmac,
        ObjType::Dpseci,
        ObjType::Dpsw,
        ObjType::Dpdmux,
    ];

    /// The MC's name ("dpni").
    pub fn name(self) -> &'static str {
        match self {
            ObjType::Dprc => "dprc",
            ObjType::Dpni => "dpni",
            ObjType::Dpio => "dpio",
            ObjType::Dpbp => "dpbp",
            ObjType::Dpcon => "dpcon",
            ObjType::Dpmcp => "dpmcp",
            ObjType::Dpmac => "dpmac",
            ObjType::Dpseci => "dpseci",
            ObjType::Dpsw => "dpsw",
            ObjType::Dpdmux => "dpdmux",
        }
    }

    /// The type of a name.
    pub fn from_name(s: &str) -> Option<ObjType> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Linux's `<TYPE>_CMDID_OPEN` number (`OBJ_CMD(0x80N)`).
    pub fn open_id(self) -> u16 {
        match self {
            ObjType::Dpni => 0x801,
            ObjType::Dpsw => 0x802,
            ObjType::Dpio => 0x803,
            ObjType::Dpbp => 0x804,
            ObjType::Dprc => 0x805,
            ObjType::Dpdmux => 0x806,
            ObjType::Dpcon => 0x808,
            ObjType::Dpseci => 0x809,
            ObjType::Dpmcp => 0x80b,
            ObjType::Dpmac => 0x80c,
        }
    }

    /// The open command.
    pub fn open_cmd(self) -> CmdId {
        CmdId::v1(self.open_id())
    }

    /// The get-API-version command (`0xa0N` for open `0x80N`).
    pub fn api_version_cmd(self) -> CmdId {
        CmdId::v1(0xa00 | (self.open_id() & 0xff))
    }

    /// The type whose open (or API version) command has number `id`.
    pub fn from_open_id(id: u16) -> Option<ObjType> {
        Self::ALL.into_iter().find(|t| t.open_id() == id)
    }

    /// The type whose get-API-version command has number `id`.
    pub fn from_api_version_id(id: u16) -> Option<ObjType> {
        Self::ALL
            .into_iter()
            .find(|t| t.api_version_cmd().id() == id)
    }

    /// The API version nestio implements (Linux's `<TYPE>_VER_MAJOR/MINOR`; DPRC 6.6:
    /// 64 KiB portals and `base_addr` in GET_OBJ_REG).
    pub fn api_version(self) -> (u16, u16) {
        match self {
            ObjType::Dprc => (6, 6),
            ObjType::Dpni => (7, 0),
            ObjType::Dpio => (4, 2),
            ObjType::Dpbp => (3, 2),
            ObjType::Dpcon => (3, 2),
            ObjType::Dpmcp => (3, 0),
            ObjType::Dpmac => (4, 4),
            ObjType::Dpseci | ObjType::Dpsw | ObjType::Dpdmux => (1, 0),
        }
    }

    /// Whether nestio emulates objects of this type inside a container.
    pub fn emulated(self) -> bool {
        matches!(
            self,
            ObjType::Dpni
                | ObjType::Dpio
                | ObjType::Dpbp
                | ObjType::Dpcon
                | ObjType::Dpmcp
                | ObjType::Dpmac
        )
    }

    /// The regions of an object of this type.
    pub fn regions(self) -> &'static [RegionType] {
        match self {
            ObjType::Dprc | ObjType::Dpmcp => &[RegionType::McPortal],
            ObjType::Dpio => &[RegionType::QbmanPortal, RegionType::QbmanPortal],
            _ => &[],
        }
    }

    /// Interrupts of an object of this type.
    pub fn irq_count(self) -> u8 {
        match self {
            ObjType::Dpbp | ObjType::Dpcon => 0,
            _ => 1,
        }
    }

    /// Whether it has ENABLE / DISABLE / IS_ENABLED.
    pub fn has_enable(self) -> bool {
        matches!(
            self,
            ObjType::Dpni | ObjType::Dpio | ObjType::Dpbp | ObjType::Dpcon
        )
    }
}

/// Errors of an object list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectListError {
    /// A malformed entry.
    #[error(
        "object list entry '{0}' is not TYPE:COUNT (for example dpni:2,dpio:1,dpbp:1,dpmcp:2)"
    )]
    Syntax(String),
    /// An unknown or unemulated type.
    #[error("object type '{0}' is not emulated: use dpni, dpio, dpbp, dpcon, dpmcp or dpmac")]
    Type(String),
    /// A type listed twice.
    #[error("object type '{0}' is listed twice: give one count per type")]
    Duplicate(String),
    /// A count out of range.
    #[error("{ty}: count {count} is out of range 1..={max}")]
    Count {
        /// Type.
        ty: String,
        /// Count.
        count: String,
        /// Largest.
        max: u32,
    },
}

/// At most this many objects of one type.
pub const MAX_PER_TYPE: u32 = 16;

/// The default objects of `nestio device fsl-mc`.
pub const DEFAULT_OBJECTS: &str = "dpni:2,dpio:1,dpbp:1,dpmcp:2";

/// Parse `dpni:2,dpio:1,...` into `(type, count)` pairs, in the given order.
pub fn parse_object_list(s: &str) -> Result<Vec<(ObjType, u32)>, ObjectListError> {
    let mut out: Vec<(ObjType, u32)> = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (t, c) = entry
            .split_once(':')
            .ok_or_else(|| ObjectListError::Syntax(entry.to_string()))?;
        let ty = ObjType::from_name(t)
            .filter(|t| t.emulated())
            .ok_or_else(|| ObjectListError::Type(t.to_string()))?;
        let count = c
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_PER_TYPE).contains(n))
            .ok_or_else(|| ObjectListError::Count {
                ty: t.to_string(),
                count: c.to_string(),
                max: MAX_PER_TYPE,
            })?;
        if out.iter().any(|(o, _)| *o == ty) {
            return Err(ObjectListError::Duplicate(t.to_string()));
        }
        out.push((ty, count));
    }
    if out.is_empty() {
        return Err(ObjectListError::Syntax(s.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_lists_are_checked() {
        assert_eq!(
            parse_object_list(DEFAULT_OBJECTS).unwrap(),
            vec![
                (ObjType::Dpni, 2),
                (ObjType::Dpio, 1),
                (ObjType::Dpbp, 1),
                (ObjType::Dpmcp, 2)
            ]
        );
        for (bad, what) in [
            ("", "TYPE:COUNT"),
            ("dpni", "TYPE:COUNT"),
            ("dprc:1", "not emulated"),
            ("dpsw:1", "not emulated"),
            ("dpni:0", "out of range"),
            ("dpni:17", "out of range"),
            ("dpni:x", "out of range"),
            ("dpni:1,dpni:2", "twice"),
        ] {
            let e = parse_object_list(bad).unwrap_err().to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn open_and_api_version_ids_pair_up() {
        for t in ObjType::ALL {
            assert_eq!(ObjType::from_open_id(t.open_id()), Some(t));
            assert_eq!(
                ObjType::from_api_version_id(t.api_version_cmd().id()),
                Some(t)
            );
            assert_eq!(t.open_cmd().version(), 1);
        }
        assert_eq!(ObjType::Dprc.api_version_cmd(), cmd::DPRC_GET_API_VERSION);
    }
}
