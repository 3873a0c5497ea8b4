//! The host control API, with the semantics and errno of KVM's XIVE native device
//! (`KVM_DEV_TYPE_XIVE`, FACTS §4): device attributes by group, and the per-vCPU VP
//! state register.
//!
//! | group | attr | data | errors |
//! |---|---|---|---|
//! | CTRL (1) | RESET (1) | none | |
//! | CTRL | EQ_SYNC (2) | none | |
//! | CTRL | NR_SERVERS (3) | u32 | EINVAL 0 or too many, **EBUSY once a vCPU is connected** |
//! | SOURCE (2) | irq | u64: bit0 level, bit1 asserted | E2BIG irq out of range |
//! | SOURCE_CONFIG (3) | irq | u64: prio 2:0, server 31:3, masked 32, eisn 63:33 | ENOENT not allocated, EINVAL prio 7 or unknown server |
//! | EQ_CONFIG (4) | server << 3 \| prio | [`EqConfig`] (64 bytes) | EINVAL prio 7, ENOENT unknown server, EINVAL flags ≠ ALWAYS_NOTIFY, misaligned, bad size or not RAM |
//! | SOURCE_SYNC (5) | irq | none | ENOENT not allocated |
//!
//! `set_attr` / `get_attr` take the attribute's bytes exactly as the ioctl would
//! (host byte order); a buffer of the wrong size is EFAULT (the kernel's failed
//! `copy_from_user`), an unknown group or attribute ENXIO. SOURCE allocates the
//! source (or resets an allocated one): PQ = 01, routing masked, EISN 0. EQ_CONFIG
//! with `qshift == 0` resets the queue; otherwise the flags must be exactly
//! `ALWAYS_NOTIFY`, and a (toggle, index) other than the reset (1, 0) restores a
//! migrated producer position.

use crate::eq::{EqError, EventQueue, ALWAYS_NOTIFY};
use crate::router::{Server, State, Xive};
use crate::source::{Eas, Source, MAX_PRIO};
use crate::vp::VpState;

/// Attribute groups.
pub mod group {
    /// CTRL.
    pub const CTRL: u32 = 1;
    /// SOURCE.
    pub const SOURCE: u32 = 2;
    /// SOURCE_CONFIG.
    pub const SOURCE_CONFIG: u32 = 3;
    /// EQ_CONFIG.
    pub const EQ_CONFIG: u32 = 4;
    /// SOURCE_SYNC.
    pub const SOURCE_SYNC: u32 = 5;
}

/// CTRL attributes.
pub mod ctrl {
    /// Reset every source and queue.
    pub const RESET: u64 = 1;
    /// Flush in-flight events and mark every queue page dirty.
    pub const EQ_SYNC: u64 = 2;
    /// Number of servers (vCPU ids).
    pub const NR_SERVERS: u64 = 3;
}

/// SOURCE attribute bits.
pub const SOURCE_LEVEL: u64 = 1;
/// SOURCE: the level is asserted.
pub const SOURCE_ASSERTED: u64 = 2;

/// Errors of the control API, each with its errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Bad argument.
    #[error("invalid XIVE control request: {0}")]
    Invalid(String),
    /// No such source / server.
    #[error("XIVE {0} does not exist: allocate the source or connect the vCPU first")]
    NotFound(String),
    /// Source number out of range.
    #[error("XIVE source {irq} is beyond the device's {nr} sources")]
    TooBig {
        /// Source.
        irq: u64,
        /// Sources.
        nr: u32,
    },
    /// Not possible in the current state.
    #[error("XIVE busy: {0}")]
    Busy(String),
    /// Already there.
    #[error("XIVE: {0} already exists")]
    Exists(String),
    /// Wrong buffer size.
    #[error("XIVE attribute data must be {expected} bytes, got {got}")]
    Fault {
        /// Needed.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// Unknown group/attribute.
    #[error("XIVE has no attribute {attr} in group {group}")]
    NoAttr {
        /// Group.
        group: u32,
        /// Attribute.
        attr: u64,
    },
}

impl ControlError {
    /// The errno KVM answers with.
    pub fn errno(&self) -> i32 {
        match self {
            ControlError::Invalid(_) => libc_errno::EINVAL,
            ControlError::NotFound(_) => libc_errno::ENOENT,
            ControlError::TooBig { .. } => libc_errno::E2BIG,
            ControlError::Busy(_) => libc_errno::EBUSY,
            ControlError::Exists(_) => libc_errno::EEXIST,
            ControlError::Fault { .. } => libc_errno::EFAULT,
            ControlError::NoAttr { .. } => libc_errno::ENXIO,
        }
    }
}

/// Linux errno values (asm-generic), to keep the crate free of libc.
pub mod libc_errno {
    /// No such entry.
    pub const ENOENT: i32 = 2;
    /// No such device or address.
    pub const ENXIO: i32 = 6;
    /// Argument list too long.
    pub const E2BIG: i32 = 7;
    /// Bad address.
    pub const EFAULT: i32 = 14;
    /// Busy.
    pub const EBUSY: i32 = 16;
    /// Exists.
    pub const EEXIST: i32 = 17;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
}

impl From<EqError> for ControlError {
    fn from(e: EqError) -> Self {
        ControlError::Invalid(e.to_string())
    }
}

/// KVM's `struct kvm_ppc_xive_eq` (64 bytes in host byte order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EqConfig {
    /// Must be [`ALWAYS_NOTIFY`] (unless `qshift == 0`).
    pub flags: u32,
    /// log2 size; 0 resets.
    pub qshift: u32,
    /// Guest address.
    pub qaddr: u64,
    /// Producer generation.
    pub qtoggle: u32,
    /// Producer index.
    pub qindex: u32,
}

impl EqConfig {
    /// Size of the structure.
    pub const SIZE: usize = 64;

    /// Decode the ioctl bytes.
    pub fn from_bytes(b: &[u8]) -> Result<EqConfig, ControlError> {
        let b: &[u8; 64] = b.try_into().map_err(|_| ControlError::Fault {
            expected: Self::SIZE,
            got: b.len(),
        })?;
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut q = [0; 8];
        q.copy_from_slice(&b[8..16]);
        Ok(EqConfig {
            flags: u32_at(0),
            qshift: u32_at(4),
            qaddr: u64::from_ne_bytes(q),
            qtoggle: u32_at(16),
            qindex: u32_at(20),
        })
    }

    /// Encode for the ioctl.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0; 64];
        b[0..4].copy_from_slice(&self.flags.to_ne_bytes());
        b[4..8].copy_from_slice(&self.qshift.to_ne_bytes());
        b[8..16].copy_from_slice(&self.qaddr.to_ne_bytes());
        b[16..20].copy_from_slice(&self.qtoggle.to_ne_bytes());
        b[20..24].copy_from_slice(&self.qindex.to_ne_bytes());
        b
    }
}

/// A decoded SOURCE_CONFIG value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceConfig {
    /// Priority (3 bits).
    pub prio: u8,
    /// Server.
    pub server: u32,
    /// Masked.
    pub masked: bool,
    /// Event data (31 bits).
    pub eisn: u32,
}

impl SourceConfig {
    /// Decode the u64 (prio 2:0, server 31:3, masked 32, eisn 63:33).
    pub const fn decode(v: u64) -> SourceConfig {
        SourceConfig {
            prio: (v & 7) as u8,
            server: ((v >> 3) & 0x1FFF_FFFF) as u32,
            masked: (v >> 32) & 1 == 1,
            eisn: (v >> 33) as u32,
        }
    }

    /// Encode.
    pub const fn encode(&self) -> u64 {
        (self.prio as u64 & 7)
            | ((self.server as u64 & 0x1FFF_FFFF) << 3)
            | ((self.masked as u64) << 32)
            | ((self.eisn as u64 & 0x7FFF_FFFF) << 33)
    }
}

fn check_prio(prio: u8) -> Result<(), ControlError> {
    if prio > MAX_PRIO {
        return Err(ControlError::Invalid(format!(
            "priority {prio} is reserved: use 0..=6"
        )));
    }
    Ok(())
}

impl State {
    pub(crate) fn reset_all(&mut self) {
        for s in self.sources.values_mut() {
            s.pq = crate::Pq::Off;
            s.eas = Eas::RESET;
        }
        for srv in self.servers.values_mut() {
            srv.eqs = [EventQueue::RESET; 8];
        }
    }
}

impl Xive {
    /// Connect vCPU `server`: from now on NR_SERVERS is EBUSY. EINVAL beyond
    /// NR_SERVERS, EEXIST when already connected.
    pub fn connect_vcpu(&self, server: u32) -> Result<(), ControlError> {
        let mut st = self.state.lock();
        if server >= st.nr_servers {
            return Err(ControlError::Invalid(format!(
                "vCPU {server} is beyond NR_SERVERS {}",
                st.nr_servers
            )));
        }
        if st.servers.contains_key(&server) {
            return Err(ControlError::Exists(format!("vCPU {server} connection")));
        }
        st.servers.insert(server, Server::new(server));
        Ok(())
    }

    /// CTRL/RESET: every source masked with PQ = 01, every queue reset.
    pub fn reset(&self) {
        self.state.lock().reset_all();
    }

    /// CTRL/EQ_SYNC: mark every configured queue's pages dirty (events are routed
    /// synchronously, so none is in flight).
    pub fn eq_sync(&self) {
        let st = self.state.lock();
        for srv in st.servers.values() {
            for q in srv.eqs.iter().filter(|q| q.enabled()) {
                self.mem.mark_dirty(q.qaddr, 1u64 << q.qshift);
            }
        }
    }

    /// CTRL/NR_SERVERS.
    pub fn set_nr_servers(&self, n: u32) -> Result<(), ControlError> {
        let mut st = self.state.lock();
        if n == 0 || n > self.cfg.max_servers {
            return Err(ControlError::Invalid(format!(
                "NR_SERVERS {n} must be 1..={}",
                self.cfg.max_servers
            )));
        }
        if !st.servers.is_empty() {
            return Err(ControlError::Busy(
                "NR_SERVERS cannot change once a vCPU is connected".into(),
            ));
        }
        st.nr_servers = n;
        Ok(())
    }

    /// SOURCE: allocate (or reset) source `irq`.
    pub fn set_source(&self, irq: u64, val: u64) -> Result<(), ControlError> {
        let lisn = self.lisn(irq)?;
        let lsi = val & SOURCE_LEVEL != 0;
        self.state
            .lock()
            .sources
            .insert(lisn, Source::new(lsi, val & SOURCE_ASSERTED != 0));
        Ok(())
    }

    fn lisn(&self, irq: u64) -> Result<u32, ControlError> {
        match u32::try_from(irq) {
            Ok(l) if l < self.cfg.nr_irqs => Ok(l),
            _ => Err(ControlError::TooBig {
                irq,
                nr: self.cfg.nr_irqs,
            }),
        }
    }

    /// SOURCE_CONFIG.
    pub fn set_source_config(&self, irq: u64, cfg: SourceConfig) -> Result<(), ControlError> {
        let lisn = self.lisn(irq)?;
        check_prio(cfg.prio)?;
        let mut st = self.state.lock();
        if !cfg.masked && !st.servers.contains_key(&cfg.server) {
            return Err(ControlError::Invalid(format!(
                "server {} is not a connected vCPU",
                cfg.server
            )));
        }
        let src = st
            .sources
            .get_mut(&lisn)
            .ok_or_else(|| ControlError::NotFound(format!("source {lisn}")))?;
        src.eas = Eas {
            server: cfg.server,
            prio: cfg.prio,
            masked: cfg.masked,
            eisn: cfg.eisn & 0x7FFF_FFFF,
        };
        Ok(())
    }

    /// The SOURCE_CONFIG of `irq` (for migration; KVM has no such get).
    pub fn source_config(&self, irq: u64) -> Result<SourceConfig, ControlError> {
        let lisn = self.lisn(irq)?;
        let st = self.state.lock();
        let s = st
            .sources
            .get(&lisn)
            .ok_or_else(|| ControlError::NotFound(format!("source {lisn}")))?;
        Ok(SourceConfig {
            prio: s.eas.prio,
            server: s.eas.server,
            masked: s.eas.masked,
            eisn: s.eas.eisn,
        })
    }

    /// SOURCE_SYNC: nothing is in flight in this model; checks the source exists.
    pub fn source_sync(&self, irq: u64) -> Result<(), ControlError> {
        let lisn = self.lisn(irq)?;
        if self.state.lock().sources.contains_key(&lisn) {
            Ok(())
        } else {
            Err(ControlError::NotFound(format!("source {lisn}")))
        }
    }

    fn eq_attr(attr: u64) -> Result<(u32, u8), ControlError> {
        let prio = (attr & 7) as u8;
        check_prio(prio)?;
        Ok((((attr >> 3) & 0xFFFF_FFFF) as u32, prio))
    }

    /// EQ_CONFIG set.
    pub fn set_eq_config(&self, attr: u64, c: &EqConfig) -> Result<(), ControlError> {
        let (server, prio) = Self::eq_attr(attr)?;
        let mut st = self.state.lock();
        let srv = st
            .servers
            .get_mut(&server)
            .ok_or_else(|| ControlError::NotFound(format!("server {server}")))?;
        if c.qshift == 0 {
            srv.eqs[usize::from(prio)] = EventQueue::RESET;
            return Ok(());
        }
        if c.flags != ALWAYS_NOTIFY {
            return Err(ControlError::Invalid(format!(
                "queue flags {:#x} must be ALWAYS_NOTIFY (1)",
                c.flags
            )));
        }
        let mut q = EventQueue::configure(self.mem.as_ref(), c.qaddr, c.qshift, true)?;
        if c.qtoggle != 1 || c.qindex != 0 {
            q.set_position(c.qtoggle, c.qindex)?;
        }
        srv.eqs[usize::from(prio)] = q;
        Ok(())
    }

    /// EQ_CONFIG get.
    pub fn eq_config(&self, attr: u64) -> Result<EqConfig, ControlError> {
        let (server, prio) = Self::eq_attr(attr)?;
        let st = self.state.lock();
        let srv = st
            .servers
            .get(&server)
            .ok_or_else(|| ControlError::NotFound(format!("server {server}")))?;
        let q = &srv.eqs[usize::from(prio)];
        if !q.enabled() {
            return Ok(EqConfig::default());
        }
        Ok(EqConfig {
            flags: if q.always_notify { ALWAYS_NOTIFY } else { 0 },
            qshift: q.qshift,
            qaddr: q.qaddr,
            qtoggle: q.toggle,
            qindex: q.index,
        })
    }

    /// The VP state of `server` (ENOENT unless connected).
    pub fn vp_state(&self, server: u32) -> Result<VpState, ControlError> {
        let st = self.state.lock();
        let srv = st
            .servers
            .get(&server)
            .ok_or_else(|| ControlError::NotFound(format!("vCPU {server}")))?;
        Ok(VpState::from_w01(srv.tima.w01()))
    }

    /// Restore the VP state of `server`; a restored pending priority that beats
    /// CPPR notifies the vCPU.
    pub fn set_vp_state(&self, server: u32, vp: VpState) -> Result<(), ControlError> {
        self.with(|st, p| {
            let srv = st
                .servers
                .get_mut(&server)
                .ok_or_else(|| ControlError::NotFound(format!("vCPU {server}")))?;
            if srv.tima.set_w01(vp.w01()) {
                p.0.push(server);
            }
            Ok(())
        })
    }

    /// The device-attribute ioctl (`KVM_SET_DEVICE_ATTR`): `data` holds the
    /// attribute's bytes (empty for attributes without data).
    pub fn set_attr(&self, group: u32, attr: u64, data: &[u8]) -> Result<(), ControlError> {
        let u64_of = |d: &[u8]| -> Result<u64, ControlError> {
            let b: [u8; 8] = d.try_into().map_err(|_| ControlError::Fault {
                expected: 8,
                got: d.len(),
            })?;
            Ok(u64::from_ne_bytes(b))
        };
        match (group, attr) {
            (group::CTRL, ctrl::RESET) => {
                self.reset();
                Ok(())
            }
            (group::CTRL, ctrl::EQ_SYNC) => {
                self.eq_sync();
                Ok(())
            }
            (group::CTRL, ctrl::NR_SERVERS) => {
                let b: [u8; 4] = data.try_into().map_err(|_| ControlError::Fault {
                    expected: 4,
                    got: data.len(),
                })?;
                self.set_nr_servers(u32::from_ne_bytes(b))
            }
            (group::SOURCE, irq) => {
                self.lisn(irq)?;
                self.set_source(irq, u64_of(data)?)
            }
            (group::SOURCE_CONFIG, irq) => {
                self.lisn(irq)?;
                self.set_source_config(irq, SourceConfig::decode(u64_of(data)?))
            }
            (group::EQ_CONFIG, a) => self.set_eq_config(a, &EqConfig::from_bytes(data)?),
            (group::SOURCE_SYNC, irq) => self.source_sync(irq),
            (group, attr) => Err(ControlError::NoAttr { group, attr }),
        }
    }

    /// `KVM_GET_DEVICE_ATTR`: only EQ_CONFIG has a get.
    pub fn get_attr(&self, group: u32, attr: u64, out: &mut [u8]) -> Result<(), ControlError> {
        match group {
            group::EQ_CONFIG => {
                if out.len() != EqConfig::SIZE {
                    return Err(ControlError::Fault {
                        expected: EqConfig::SIZE,
                        got: out.len(),
                    });
                }
                out.copy_from_slice(&self.eq_config(attr)?.to_bytes());
                Ok(())
            }
            group => Err(ControlError::NoAttr { group, attr }),
        }
    }
}
