//! The MC firmware's command interpreter: one [`Command`] read from a portal in, a
//! status and response parameters out. DPRC commands act on the container, object
//! commands on the object a token names.
//!
//! Rules (each refusal is an MC status, never a panic; the params of a refused command
//! are left as written):
//! - commands that take no token: DPRC / object OPEN, GET_API_VERSION of every type,
//!   DPRC_GET_CONT_ID, DPMNG_GET_VERSION;
//! - every other command needs a token opened *on the same portal*: an unknown token,
//!   a closed one or one opened on another portal is `AUTH_ERR`;
//! - a command id the target does not have (or a version of it nestio does not
//!   implement) is `UNSUPPORTED_OP`;
//! - a bad parameter (no such object, irq index, region index, malformed type name,
//!   a reset of another container) is `CONFIG_ERR`;
//! - opening the parent container is `NO_PRIVILEGE`, and so is every command that would
//!   add or remove objects (create/destroy container, assign/unassign): the container
//!   is assigned, its object set fixed;
//! - opening an object that is already open is `BUSY`; more than
//!   [`MAX_TOKENS`] open tokens is `NO_RESOURCE`;
//! - changing a DPNI's max frame length while it is enabled is `INVALID_STATE`.

use super::container::{Inner, IrqState, ObjState, State, Target};
use super::objects::{
    cmd, layout as l, ObjType, RegionType, DPNI_IRQ_EVENT_LINK_CHANGED,
    DPRC_RESET_OPTION_NON_RECURSIVE, IS_DPRC, OBJ_STATE_OPEN, OBJ_STATE_PLUGGED, REGION_CACHEABLE,
    REGION_SHAREABLE, REGION_SIZE, VENDOR_FREESCALE,
};
use super::portal::{CmdId, Command, McStatus, Params};

/// Most tokens open at once (all portals together).
pub const MAX_TOKENS: usize = 1024;
/// The MC firmware version GET_VERSION reports (major, minor, revision).
pub const MC_FIRMWARE_VERSION: (u32, u32, u32) = (10, 32, 0);
/// The parent (root) container's id: visible, never openable from inside.
pub const ROOT_CONTAINER_ID: u32 = 1;
/// Base of the synthetic MC physical addresses GET_OBJ_REG reports (`base_addr`).
pub const MC_PHYS_BASE: u64 = 0x0008_0c00_0000;
/// Default DPNI max frame length.
pub const DPNI_DEFAULT_MFL: u16 = 1536;
/// Largest DPNI max frame length accepted.
pub const DPNI_MAX_MFL: u16 = 10240;

/// What executing a command produced.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Final status (never READY).
    pub status: Option<McStatus>,
    /// Response parameters (success only).
    pub params: Option<Params>,
    /// Interrupts to signal once the state lock is released: (device, irq index).
    pub fire: Vec<(usize, u32)>,
    /// The token an OPEN returns in the response header.
    pub token: Option<u16>,
}

impl Outcome {
    fn status(s: McStatus) -> Outcome {
        Outcome {
            status: Some(s),
            ..Outcome::default()
        }
    }
    fn ok(p: Params) -> Outcome {
        Outcome {
            status: Some(McStatus::Ok),
            params: Some(p),
            ..Outcome::default()
        }
    }
}

type R = Result<Outcome, McStatus>;

impl Inner {
    /// Execute `c` arriving on portal `portal` against the container state.
    pub(crate) fn execute(&self, st: &mut State, portal: usize, c: &Command) -> Outcome {
        let r = self.dispatch(st, portal, c);
        let out = r.unwrap_or_else(Outcome::status);
        tracing::debug!(
            container = self.id,
            portal,
            cmd = format_args!("{:#x}", c.header.cmd_id.raw()),
            token = c.header.token,
            status = ?out.status,
            "MC command"
        );
        out
    }

    fn dispatch(&self, st: &mut State, portal: usize, c: &Command) -> R {
        let id = c.header.cmd_id;
        let p = &c.params;
        // Token-free commands.
        if id == cmd::DPMNG_GET_VERSION {
            let (maj, min, rev) = MC_FIRMWARE_VERSION;
            let mut r = Params::default();
            r.set_u32(l::DPMNG_REVISION, rev);
            r.set_u32(l::DPMNG_MAJOR, maj);
            r.set_u32(l::DPMNG_MINOR, min);
            return Ok(Outcome::ok(r));
        }
        if id == cmd::DPRC_GET_CONT_ID {
            let mut r = Params::default();
            r.set_u32(l::CONT_ID, self.id);
            return Ok(Outcome::ok(r));
        }
        if let Some(t) = ObjType::from_api_version_id(id.id()) {
            if id.version() != 1 {
                return Err(McStatus::UnsupportedOp);
            }
            let (maj, min) = t.api_version();
            let mut r = Params::default();
            r.set_u16(l::API_MAJOR, maj);
            r.set_u16(l::API_MINOR, min);
            return Ok(Outcome::ok(r));
        }
        if let Some(t) = ObjType::from_open_id(id.id()) {
            if id.version() != 1 {
                return Err(McStatus::UnsupportedOp);
            }
            return self.open(st, portal, t, p.u32(l::OBJ_OPEN_ID));
        }
        // Everything else needs a token of this portal.
        let target = match st.tokens.get(&c.header.token) {
            Some(&(pt, target)) if pt == portal => target,
            _ => return Err(McStatus::AuthErr),
        };
        if id == cmd::CLOSE {
            st.tokens.remove(&c.header.token);
            if let Target::Object(i) = target {
                st.objs[i].open = None;
            }
            return Ok(Outcome::ok(Params::default()));
        }
        match target {
            Target::Dprc => self.dprc_command(st, id, p),
            Target::Object(i) => self.object_command(st, i, id, p),
        }
    }

    fn new_token(&self, st: &mut State, portal: usize, target: Target) -> Result<u16, McStatus> {
        if st.tokens.len() >= MAX_TOKENS {
            return Err(McStatus::NoResource);
        }
        loop {
            st.next_token = st.next_token.wrapping_add(1).max(1);
            if !st.tokens.contains_key(&st.next_token) {
                break;
            }
        }
        st.tokens.insert(st.next_token, (portal, target));
        Ok(st.next_token)
    }

    fn open(&self, st: &mut State, portal: usize, t: ObjType, obj_id: u32) -> R {
        let target = if t == ObjType::Dprc {
            if obj_id == self.id {
                Target::Dprc
            } else if obj_id == ROOT_CONTAINER_ID {
                return Err(McStatus::NoPrivilege);
            } else {
                return Err(McStatus::ConfigErr);
            }
        } else {
            let i = self.find(t, obj_id).ok_or(McStatus::ConfigErr)?;
            if st.objs[i].open.is_some() {
                return Err(McStatus::Busy);
            }
            Target::Object(i)
        };
        let token = self.new_token(st, portal, target)?;
        if let Target::Object(i) = target {
            st.objs[i].open = Some(token);
        }
        let mut out = Outcome::ok(Params::default());
        // The token comes back in the response header (Linux's mc_cmd_hdr_read_token).
        out.token = Some(token);
        Ok(out)
    }

    /// Index of object `(t, id)`.
    pub(crate) fn find(&self, t: ObjType, id: u32) -> Option<usize> {
        self.objects.iter().position(|o| o.ty == t && o.id == id)
    }

    fn dprc_command(&self, st: &mut State, id: CmdId, p: &Params) -> R {
        let mut r = Params::default();
        match id {
            _ if id == cmd::GET_ATTR => {
                r.set_u32(l::ATTR_CONTAINER_ID, self.id);
                r.set_u32(l::ATTR_ICID, self.icid);
                r.set_u32(l::ATTR_OPTIONS, 0);
                r.set_u32(l::ATTR_PORTAL_ID, 0);
            }
            _ if id == cmd::RESET || id == cmd::DPRC_RESET_CONT_V2 => {
                let child = p.u32(l::RESET_CHILD_ID);
                let options = if id == cmd::RESET {
                    0
                } else {
                    p.u32(l::RESET_OPTIONS)
                };
                if child != self.id || options & !DPRC_RESET_OPTION_NON_RECURSIVE != 0 {
                    return Err(McStatus::ConfigErr);
                }
                self.reset_objects(st);
            }
            _ if id == cmd::DPRC_GET_OBJ_COUNT => {
                r.set_u32(l::OBJ_COUNT, self.objects.len() as u32);
            }
            _ if id == cmd::DPRC_GET_OBJ => {
                let i = p.u32(l::GET_OBJ_INDEX) as usize;
                let o = self.objects.get(i).ok_or(McStatus::ConfigErr)?;
                r.set_u32(l::OBJ_ID, o.id);
                r.set_u16(l::OBJ_VENDOR, VENDOR_FREESCALE);
                r.set_u8(l::OBJ_IRQ_COUNT, o.ty.irq_count());
                r.set_u8(l::OBJ_REGION_COUNT, o.ty.regions().len() as u8);
                let open = if st.objs[i].open.is_some() {
                    OBJ_STATE_OPEN
                } else {
                    0
                };
                r.set_u32(l::OBJ_STATE, OBJ_STATE_PLUGGED | open);
                let (maj, min) = o.ty.api_version();
                r.set_u16(l::OBJ_VER_MAJOR, maj);
                r.set_u16(l::OBJ_VER_MINOR, min);
                r.set_u16(
                    l::OBJ_FLAGS,
                    if o.ty == ObjType::Dprc { IS_DPRC } else { 0 },
                );
                r.set_type_name(l::OBJ_TYPE, o.ty.name());
                r.set_type_name(l::OBJ_LABEL, "");
            }
            _ if id.id() == cmd::DPRC_GET_OBJ_REG.id() && (1..=3).contains(&id.version()) => {
                let t = p
                    .type_name(l::REG_OBJ_TYPE)
                    .ok()
                    .and_then(|n| ObjType::from_name(&n))
                    .ok_or(McStatus::ConfigErr)?;
                let i = self
                    .find(t, p.u32(l::REG_OBJ_ID))
                    .ok_or(McStatus::ConfigErr)?;
                let ri = p.u8(l::REG_INDEX) as usize;
                let kind = *t.regions().get(ri).ok_or(McStatus::ConfigErr)?;
                // Offsets are relative to the portal base the MC knows; v1/v2 firmware
                // reported 64-byte MC portals, v3 the hardware's 64 KiB.
                let size = if id.version() < 3 && kind == RegionType::McPortal {
                    64
                } else {
                    REGION_SIZE as u32
                };
                r.set_u64(l::REG_BASE_OFFSET, 0);
                r.set_u32(l::REG_SIZE, size);
                r.set_u8(l::REG_TYPE, kind as u8);
                let flags = if kind == RegionType::QbmanPortal && ri == 0 {
                    REGION_CACHEABLE | REGION_SHAREABLE
                } else {
                    0
                };
                r.set_u32(l::REG_FLAGS, flags);
                if id.version() >= 2 {
                    r.set_u64(l::REG_BASE_ADDR, self.phys_addr(i + 1, ri));
                }
            }
            _ if id == cmd::DPRC_SET_OBJ_IRQ => {
                let t = p
                    .type_name(l::SET_OBJ_IRQ_OBJ_TYPE)
                    .ok()
                    .and_then(|n| ObjType::from_name(&n))
                    .ok_or(McStatus::ConfigErr)?;
                let i = self
                    .find(t, p.u32(l::SET_OBJ_IRQ_OBJ_ID))
                    .ok_or(McStatus::ConfigErr)?;
                let irq = irq_of(&mut st.objs[i].irqs, p)?;
                irq.val = p.u32(l::IRQ_VAL);
                irq.addr = p.u64(l::IRQ_ADDR);
                irq.num = p.u32(l::IRQ_NUM);
            }
            _ if id == cmd::DPRC_GET_CONNECTION => {
                let t = p
                    .type_name(l::CONN_EP1_TYPE)
                    .ok()
                    .and_then(|n| ObjType::from_name(&n))
                    .ok_or(McStatus::ConfigErr)?;
                let ep1 = p.u32(l::CONN_EP1_ID);
                self.find(t, ep1).ok_or(McStatus::ConfigErr)?;
                // dpni.N <-> dpmac.N when both exist; state: -1 none, 0 down, 1 up.
                let peer = match t {
                    ObjType::Dpni => Some(ObjType::Dpmac),
                    ObjType::Dpmac => Some(ObjType::Dpni),
                    _ => None,
                };
                match peer.and_then(|pt| self.find(pt, ep1).map(|j| (pt, j))) {
                    Some((pt, j)) => {
                        let ni = if t == ObjType::Dpni {
                            self.find(t, ep1)
                        } else {
                            Some(j)
                        };
                        let up = ni.is_some_and(|n| st.objs[n].enabled);
                        r.set_u32(l::CONN_EP2_ID, ep1);
                        r.set_u16(l::CONN_EP2_IF, 0);
                        r.set_type_name(l::CONN_EP2_TYPE, pt.name());
                        r.set_u32(l::CONN_STATE, up as u32);
                    }
                    None => {
                        r.set_u32(l::CONN_EP2_ID, u32::MAX);
                        r.set_u32(l::CONN_STATE, u32::MAX);
                    }
                }
            }
            _ if id == cmd::DPRC_CREATE_CONT
                || id == cmd::DPRC_DESTROY_CONT
                || id == cmd::DPRC_ASSIGN
                || id == cmd::DPRC_UNASSIGN =>
            {
                tracing::warn!(
                    container = self.id,
                    cmd = format_args!("{:#x}", id.raw()),
                    "refused: objects cannot be added to or removed from an assigned container"
                );
                return Err(McStatus::NoPrivilege);
            }
            _ => return irq_command(&mut st.dprc_irqs, 0, id, p),
        }
        Ok(Outcome::ok(r))
    }

    fn object_command(&self, st: &mut State, i: usize, id: CmdId, p: &Params) -> R {
        let o = self.objects[i];
        let dev = i + 1;
        let mut r = Params::default();
        let s = &mut st.objs[i];
        if o.ty.has_enable() && (id == cmd::ENABLE || id == cmd::DISABLE) {
            let on = id == cmd::ENABLE;
            let mut out = Outcome::ok(r);
            if s.enabled != on {
                s.enabled = on;
                if o.ty == ObjType::Dpni {
                    raise(
                        &mut s.irqs,
                        dev,
                        0,
                        DPNI_IRQ_EVENT_LINK_CHANGED,
                        &mut out.fire,
                    );
                }
            }
            return Ok(out);
        }
        if o.ty.has_enable() && id == cmd::IS_ENABLED {
            r.set_u8(l::IS_ENABLED, s.enabled as u8);
            return Ok(Outcome::ok(r));
        }
        if id == cmd::RESET {
            let token = s.open;
            *s = ObjState::new(o.ty);
            s.open = token;
            return Ok(Outcome::ok(r));
        }
        if id == cmd::GET_ATTR {
            match o.ty {
                ObjType::Dpni => {
                    r.set_u32(l::DPNI_ATTR_OPTIONS, 0);
                    r.set_u8(l::DPNI_ATTR_NUM_QUEUES, 8);
                    r.set_u8(l::DPNI_ATTR_NUM_TCS, 1);
                    r.set_u8(l::DPNI_ATTR_MAC_FILTERS, 16);
                    r.set_u16(l::DPNI_ATTR_FS_ENTRIES, 64);
                    r.set_u16(l::DPNI_ATTR_WRIOP, 0x1100);
                }
                ObjType::Dpio => {
                    r.set_u32(l::DPIO_ATTR_ID, o.id);
                    r.set_u16(l::DPIO_ATTR_PORTAL_ID, o.id as u16);
                    r.set_u8(l::DPIO_ATTR_NUM_PRIO, 8);
                    r.set_u64(l::DPIO_ATTR_CE_ADDR, self.phys_addr(dev, 0));
                    r.set_u64(l::DPIO_ATTR_CI_ADDR, self.phys_addr(dev, 1));
                    r.set_u32(l::DPIO_ATTR_QBMAN_VERSION, 0x0420_0000);
                }
                ObjType::Dpbp => {
                    r.set_u16(l::DPBP_ATTR_BPID, 1 + o.id as u16);
                    r.set_u32(l::DPBP_ATTR_ID, o.id);
                }
                ObjType::Dpcon => {
                    r.set_u32(l::DPCON_ATTR_ID, o.id);
                    r.set_u16(l::DPCON_ATTR_CH_ID, o.id as u16);
                    r.set_u8(l::DPCON_ATTR_NUM_PRIO, 2);
                }
                ObjType::Dpmac => {
                    r.set_u8(l::DPMAC_ATTR_ETH_IF, 8); // DPMAC_ETH_IF_SGMII
                    r.set_u8(l::DPMAC_ATTR_LINK_TYPE, 2); // DPMAC_LINK_TYPE_PHY
                    r.set_u16(l::DPMAC_ATTR_ID, o.id as u16);
                    r.set_u32(l::DPMAC_ATTR_MAX_RATE, 1000);
                }
                _ => return Err(McStatus::UnsupportedOp),
            }
            return Ok(Outcome::ok(r));
        }
        if o.ty == ObjType::Dpni {
            if id == cmd::DPNI_GET_LINK_STATE {
                r.set_u8(l::DPNI_LINK_FLAGS, s.enabled as u8);
                r.set_u32(l::DPNI_LINK_RATE, if s.enabled { 1000 } else { 0 });
                r.set_u64(l::DPNI_LINK_OPTIONS, 0);
                return Ok(Outcome::ok(r));
            }
            if id == cmd::DPNI_SET_MAX_FRAME_LENGTH {
                if s.enabled {
                    return Err(McStatus::InvalidState);
                }
                let v = p.u16(l::DPNI_MFL);
                if !(64..=DPNI_MAX_MFL).contains(&v) {
                    return Err(McStatus::ConfigErr);
                }
                s.max_frame = v;
                return Ok(Outcome::ok(r));
            }
            if id == cmd::DPNI_GET_MAX_FRAME_LENGTH {
                r.set_u16(l::DPNI_MFL, s.max_frame);
                return Ok(Outcome::ok(r));
            }
        }
        if o.ty.irq_count() > 0 {
            return irq_command(&mut s.irqs, dev, id, p);
        }
        Err(McStatus::UnsupportedOp)
    }

    /// Close every object token and bring every object back to its reset state (the
    /// DPRC's own tokens and interrupt stay).
    pub(crate) fn reset_objects(&self, st: &mut State) {
        st.tokens.retain(|_, (_, t)| matches!(t, Target::Dprc));
        for (s, o) in st.objs.iter_mut().zip(&self.objects) {
            *s = ObjState::new(o.ty);
        }
    }

    /// The synthetic MC physical address of region `region` of device `dev`.
    pub(crate) fn phys_addr(&self, dev: usize, region: usize) -> u64 {
        MC_PHYS_BASE + ((dev as u64) << 20) + region as u64 * REGION_SIZE
    }
}

/// The irq state a command's `irq_index` names.
fn irq_of<'a>(irqs: &'a mut [IrqState], p: &Params) -> Result<&'a mut IrqState, McStatus> {
    irqs.get_mut(p.u8(l::IRQ_INDEX) as usize)
        .ok_or(McStatus::ConfigErr)
}

/// Set event bits on an irq and queue its trigger when enabled and unmasked.
pub(crate) fn raise(
    irqs: &mut [IrqState],
    dev: usize,
    index: u32,
    bits: u32,
    fire: &mut Vec<(usize, u32)>,
) {
    if let Some(s) = irqs.get_mut(index as usize) {
        s.status |= bits;
        if s.enable && s.status & s.mask & bits != 0 {
            fire.push((dev, index));
        }
    }
}

/// The irq commands every object with interrupts (and the DPRC) has.
fn irq_command(irqs: &mut [IrqState], dev: usize, id: CmdId, p: &Params) -> R {
    let mut r = Params::default();
    let index = p.u8(l::IRQ_INDEX) as u32;
    let known = [
        cmd::SET_IRQ,
        cmd::GET_IRQ,
        cmd::SET_IRQ_ENABLE,
        cmd::GET_IRQ_ENABLE,
        cmd::SET_IRQ_MASK,
        cmd::GET_IRQ_MASK,
        cmd::GET_IRQ_STATUS,
        cmd::CLEAR_IRQ_STATUS,
    ];
    if !known.contains(&id) {
        return Err(McStatus::UnsupportedOp);
    }
    let s = irq_of(irqs, p)?;
    let mut out_fire = Vec::new();
    match id {
        _ if id == cmd::SET_IRQ => {
            s.val = p.u32(l::IRQ_VAL);
            s.addr = p.u64(l::IRQ_ADDR);
            s.num = p.u32(l::IRQ_NUM);
        }
        _ if id == cmd::GET_IRQ => {
            r.set_u32(l::IRQ_VAL, s.val);
            r.set_u64(l::IRQ_ADDR, s.addr);
            r.set_u32(l::IRQ_NUM, s.num);
        }
        _ if id == cmd::SET_IRQ_ENABLE => {
            let en = p.u8(l::IRQ_ENABLE);
            if en > 1 {
                return Err(McStatus::ConfigErr);
            }
            s.enable = en == 1;
            if s.enable && s.status & s.mask != 0 {
                out_fire.push((dev, index));
            }
        }
        _ if id == cmd::GET_IRQ_ENABLE => r.set_u8(l::IRQ_ENABLE, s.enable as u8),
        _ if id == cmd::SET_IRQ_MASK => {
            let before = s.status & s.mask;
            s.mask = p.u32(l::IRQ_MASK);
            if s.enable && before == 0 && s.status & s.mask != 0 {
                out_fire.push((dev, index));
            }
        }
        _ if id == cmd::GET_IRQ_MASK => r.set_u32(l::IRQ_MASK, s.mask),
        _ if id == cmd::GET_IRQ_STATUS => r.set_u32(l::IRQ_STATUS, s.status),
        _ => s.status &= !p.u32(l::IRQ_STATUS),
    }
    let mut out = Outcome::ok(r);
    out.fire = out_fire;
    Ok(out)
}
