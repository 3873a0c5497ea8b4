//! A host-side MC driver: what Linux's `mc_send_command` + `dprc_*` / `fsl_mc_obj_*`
//! wrappers do, over any [`PortalIo`] — a VFIO device's portal region by REGION_WRITE /
//! REGION_READ ([`RegionPortal`], Linux's vfio-fsl-mc write/read semantics), or a
//! mapped portal. Tests, the fuzz target and tools use it to drive a container.

use nestio_device_model::{DeviceError, VfioDevice};

use super::objects::{cmd, layout as l, ObjType};
use super::portal::{CmdId, Command, McStatus, Params, PortalMapping, COMMAND_SIZE};

/// Errors of a command.
#[derive(Debug, thiserror::Error)]
pub enum McIoError {
    /// The portal could not be accessed.
    #[error("MC portal access failed: {0}")]
    Device(#[from] DeviceError),
    /// The MC answered with an error status.
    #[error("MC command {cmd:#06x} failed with status {status:?}")]
    Status {
        /// Raw command id.
        cmd: u16,
        /// Status.
        status: McStatus,
    },
    /// The status is not one the MC defines, or stayed READY.
    #[error("MC command {cmd:#06x} ended with status byte {status:#x}: not a completion (the command was not executed)")]
    BadStatus {
        /// Raw command id.
        cmd: u16,
        /// Raw status.
        status: u8,
    },
}

/// Something a 64-byte command can be sent through, returning the completed portal.
pub trait PortalIo {
    /// Send `c` and return the portal's 64 bytes after completion.
    fn send(&mut self, c: &Command) -> Result<Command, McIoError>;
}

/// A portal region of a VFIO device, accessed by region writes and reads.
pub struct RegionPortal<'a> {
    /// The device.
    pub dev: &'a dyn VfioDevice,
    /// Its portal region index.
    pub index: u32,
}

impl PortalIo for RegionPortal<'_> {
    fn send(&mut self, c: &Command) -> Result<Command, McIoError> {
        self.dev.region_write(self.index, 0, &c.to_bytes())?;
        let mut b = [0u8; COMMAND_SIZE];
        self.dev.region_read(self.index, 0, &mut b)?;
        Ok(Command::from_bytes(&b).unwrap_or(*c))
    }
}

/// An object as DPRC_GET_OBJ describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjInfo {
    /// Type name.
    pub ty: String,
    /// Id.
    pub id: u32,
    /// Vendor.
    pub vendor: u16,
    /// Interrupts.
    pub irq_count: u8,
    /// Regions.
    pub region_count: u8,
    /// State bits.
    pub state: u32,
}

/// MC commands over a portal.
pub struct Mc<P: PortalIo> {
    /// The portal.
    pub io: P,
}

impl<P: PortalIo> Mc<P> {
    /// Send a command; `Ok` with the response (status OK) or the status as an error.
    pub fn call(&mut self, id: CmdId, token: u16, params: Params) -> Result<Command, McIoError> {
        let r = self.io.send(&Command::new(id, token, params))?;
        match r.header.mc_status() {
            Some(McStatus::Ok) => Ok(r),
            Some(s) if s != McStatus::Ready => Err(McIoError::Status {
                cmd: id.raw(),
                status: s,
            }),
            _ => Err(McIoError::BadStatus {
                cmd: id.raw(),
                status: r.header.status,
            }),
        }
    }
    /// The status of a command (OK included), for checking refusals.
    pub fn status(&mut self, id: CmdId, token: u16, params: Params) -> Result<McStatus, McIoError> {
        match self.call(id, token, params) {
            Ok(_) => Ok(McStatus::Ok),
            Err(McIoError::Status { status, .. }) => Ok(status),
            Err(e) => Err(e),
        }
    }
    /// DPRC_GET_CONT_ID.
    pub fn container_id(&mut self) -> Result<u32, McIoError> {
        Ok(self
            .call(cmd::DPRC_GET_CONT_ID, 0, Params::default())?
            .params
            .u32(l::CONT_ID))
    }
    /// `<TYPE>_GET_API_VERSION`.
    pub fn api_version(&mut self, t: ObjType) -> Result<(u16, u16), McIoError> {
        let r = self.call(t.api_version_cmd(), 0, Params::default())?;
        Ok((r.params.u16(l::API_MAJOR), r.params.u16(l::API_MINOR)))
    }
    /// Open object `(t, id)` (DPRC: `id` is the container id); returns the token.
    pub fn open(&mut self, t: ObjType, id: u32) -> Result<u16, McIoError> {
        let mut p = Params::default();
        p.set_u32(l::OBJ_OPEN_ID, id);
        Ok(self.call(t.open_cmd(), 0, p)?.header.token)
    }
    /// Close a token.
    pub fn close(&mut self, token: u16) -> Result<(), McIoError> {
        self.call(cmd::CLOSE, token, Params::default()).map(|_| ())
    }
    /// DPRC_GET_OBJ_COUNT.
    pub fn obj_count(&mut self, dprc: u16) -> Result<u32, McIoError> {
        Ok(self
            .call(cmd::DPRC_GET_OBJ_COUNT, dprc, Params::default())?
            .params
            .u32(l::OBJ_COUNT))
    }
    /// DPRC_GET_OBJ.
    pub fn obj(&mut self, dprc: u16, index: u32) -> Result<ObjInfo, McIoError> {
        let mut p = Params::default();
        p.set_u32(l::GET_OBJ_INDEX, index);
        let r = self.call(cmd::DPRC_GET_OBJ, dprc, p)?.params;
        Ok(ObjInfo {
            ty: r.type_name(l::OBJ_TYPE).unwrap_or_default(),
            id: r.u32(l::OBJ_ID),
            vendor: r.u16(l::OBJ_VENDOR),
            irq_count: r.u8(l::OBJ_IRQ_COUNT),
            region_count: r.u8(l::OBJ_REGION_COUNT),
            state: r.u32(l::OBJ_STATE),
        })
    }
    /// DPRC_GET_OBJ_REG (v3): (size, type, flags, base address).
    pub fn obj_region(
        &mut self,
        dprc: u16,
        t: &str,
        id: u32,
        region: u8,
    ) -> Result<(u32, u8, u32, u64), McIoError> {
        let mut p = Params::default();
        p.set_u32(l::REG_OBJ_ID, id);
        p.set_u8(l::REG_INDEX, region);
        p.set_type_name(l::REG_OBJ_TYPE, t);
        let r = self.call(cmd::DPRC_GET_OBJ_REG_V3, dprc, p)?.params;
        Ok((
            r.u32(l::REG_SIZE),
            r.u8(l::REG_TYPE),
            r.u32(l::REG_FLAGS),
            r.u64(l::REG_BASE_ADDR),
        ))
    }
    /// Set irq `index`'s enable and mask.
    pub fn irq_setup(
        &mut self,
        token: u16,
        index: u8,
        mask: u32,
        enable: bool,
    ) -> Result<(), McIoError> {
        let mut p = Params::default();
        p.set_u32(l::IRQ_MASK, mask);
        p.set_u8(l::IRQ_INDEX, index);
        self.call(cmd::SET_IRQ_MASK, token, p)?;
        let mut p = Params::default();
        p.set_u8(l::IRQ_ENABLE, enable as u8);
        p.set_u8(l::IRQ_INDEX, index);
        self.call(cmd::SET_IRQ_ENABLE, token, p).map(|_| ())
    }
    /// GET_IRQ_STATUS.
    pub fn irq_status(&mut self, token: u16, index: u8) -> Result<u32, McIoError> {
        let mut p = Params::default();
        p.set_u8(l::IRQ_INDEX, index);
        Ok(self
            .call(cmd::GET_IRQ_STATUS, token, p)?
            .params
            .u32(l::IRQ_STATUS))
    }
    /// CLEAR_IRQ_STATUS.
    pub fn clear_irq_status(&mut self, token: u16, index: u8, bits: u32) -> Result<(), McIoError> {
        let mut p = Params::default();
        p.set_u32(l::IRQ_STATUS, bits);
        p.set_u8(l::IRQ_INDEX, index);
        self.call(cmd::CLEAR_IRQ_STATUS, token, p).map(|_| ())
    }
    /// IS_ENABLED.
    pub fn is_enabled(&mut self, token: u16) -> Result<bool, McIoError> {
        Ok(self
            .call(cmd::IS_ENABLED, token, Params::default())?
            .params
            .u8(l::IS_ENABLED)
            & 1
            == 1)
    }
    /// DPRC_RESET_CONT_V2 of container `id` (non-recursive).
    pub fn reset_container(&mut self, dprc: u16, id: u32) -> Result<(), McIoError> {
        let mut p = Params::default();
        p.set_u32(l::RESET_CHILD_ID, id);
        p.set_u32(
            l::RESET_OPTIONS,
            super::objects::DPRC_RESET_OPTION_NON_RECURSIVE,
        );
        self.call(cmd::DPRC_RESET_CONT_V2, dprc, p).map(|_| ())
    }
}

/// A portal mapped from a region's fd (what a driver does after REGION_INFO says
/// MMAP): commands are plain stores — parameters, then the header — and completion is
/// polled on the header's status, as Linux's `mc_send_command` polls the hardware.
pub struct MappedPortal {
    map: PortalMapping,
    /// How long to poll for completion.
    pub timeout: std::time::Duration,
}

impl MappedPortal {
    /// Map `len` bytes (at least 64, page multiple) of `fd` at `offset`.
    pub fn new(fd: &std::os::fd::OwnedFd, offset: u64, len: usize) -> std::io::Result<Self> {
        Ok(MappedPortal {
            map: PortalMapping::new(fd, offset, len)?,
            timeout: std::time::Duration::from_secs(10),
        })
    }
    /// Store a command without waiting (parameters, then the header).
    pub fn post(&self, c: &Command) {
        self.map.store_params(&c.params);
        self.map
            .word(0)
            .store(c.header.encode(), std::sync::atomic::Ordering::Release);
    }
    /// The portal's eight words now.
    pub fn read(&self) -> Command {
        self.map.command(self.map.header())
    }
}

impl PortalIo for MappedPortal {
    fn send(&mut self, c: &Command) -> Result<Command, McIoError> {
        self.post(c);
        let start = std::time::Instant::now();
        loop {
            let r = self.read();
            if r.header.status != McStatus::Ready as u8 {
                return Ok(r);
            }
            if start.elapsed() > self.timeout {
                return Err(McIoError::Status {
                    cmd: c.header.cmd_id.raw(),
                    status: McStatus::Timeout,
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }
}
