//! Fuzzing entry point: [`fuzz_fsl_mc`] turns bytes into a sequence of MC commands and
//! VFIO operations against a fresh container, checking the MC's invariants after each.
//!
//! Each step is one selector byte and, for commands, 64 bytes of command: the selector
//! picks the path (the DPRC portal by REGION_WRITE, a DPMCP portal by REGION_WRITE, a
//! mapped portal by plain stores + one poll), whether the token is replaced by one an
//! earlier OPEN returned (so deep states are reachable), or a VFIO operation (reset of
//! the DPRC or an object, SET_IRQS loopback, a region read or write anywhere).
//! Invariants: a command written with status READY by REGION_WRITE has completed when
//! the write returns, with a status the MC defines; an object's DEVICE_RESET is refused;
//! nothing panics.

use nestio_device_model::{IrqAction, IrqData, VfioDevice};

use super::driver::MappedPortal;
use super::objects::{ObjType, DEFAULT_OBJECTS};
use super::portal::{Command, McStatus, COMMAND_SIZE};
use super::{parse_object_list, FslMcContainer};

/// Run one fuzz input (see the module documentation).
pub fn fuzz_fsl_mc(data: &[u8]) {
    let objs = parse_object_list(&format!("{DEFAULT_OBJECTS},dpmac:1,dpcon:1"))
        .expect("the fuzz container's object list is valid");
    let Ok(c) = FslMcContainer::new(2, &objs) else {
        return;
    };
    let devs = c.devices().to_vec();
    let mcp: Vec<_> = devs
        .iter()
        .filter(|d| d.obj_type() == ObjType::Dpmcp)
        .cloned()
        .collect();
    let mapped = mcp[0].region_info(0).ok().and_then(|ri| {
        ri.fd
            .and_then(|fd| MappedPortal::new(&fd, ri.fd_offset, 4096).ok())
    });
    let mut tokens: Vec<u16> = Vec::new();
    let mut rest = data;
    while let Some((&sel, tail)) = rest.split_first() {
        rest = tail;
        match sel >> 5 {
            0..=4 => {
                let Some(b) = rest.get(..COMMAND_SIZE) else {
                    return;
                };
                rest = &rest[COMMAND_SIZE..];
                let Ok(mut cmd) = Command::from_bytes(b) else {
                    return;
                };
                if sel & 0x10 != 0 && !tokens.is_empty() {
                    cmd.header.token = tokens[(sel as usize & 0xf) % tokens.len()];
                }
                if sel & 0x08 != 0 {
                    cmd.header.status = McStatus::Ready as u8;
                }
                let ready = cmd.header.status == McStatus::Ready as u8;
                let r = match sel >> 5 {
                    0 | 1 => send(&*devs[0], &cmd),
                    2 | 3 => send(&*mcp[(sel as usize) & 1], &cmd),
                    _ => mapped.as_ref().map(|m| {
                        m.post(&cmd);
                        c.poll_once();
                        m.read()
                    }),
                };
                if let Some(r) = r {
                    if ready {
                        let st = r.header.mc_status();
                        assert!(
                            st.is_some() && st != Some(McStatus::Ready),
                            "a READY command did not complete: {r:?}"
                        );
                        if st == Some(McStatus::Ok) && cmd.header.cmd_id.id() & 0xff0 == 0x800 {
                            tokens.push(r.header.token);
                        }
                    }
                }
            }
            5 => {
                let d = &devs[(sel as usize & 0x1f) % devs.len()];
                let r = d.reset();
                if d.obj_type() != ObjType::Dprc {
                    assert!(r.is_err(), "an object alone is never reset");
                }
            }
            6 => {
                let d = &devs[(sel as usize & 0x1f) % devs.len()];
                let _ = d.set_irqs(u32::from(sel & 1), IrqAction::Trigger, 0, 1, IrqData::None);
            }
            _ => {
                let Some(b) = rest.get(..4) else {
                    return;
                };
                rest = &rest[4..];
                let d = &devs[(sel as usize & 0xf) % devs.len()];
                let off = u64::from(u16::from_le_bytes([b[0], b[1]])) << (b[2] & 7);
                let len = usize::from(b[3] & 0x7f);
                let region = u32::from(sel >> 4 & 1);
                if sel & 0x8 != 0 {
                    let _ = d.region_write(region, off, &vec![b[3]; len]);
                } else {
                    let _ = d.region_read(region, off, &mut vec![0; len]);
                }
            }
        }
    }
}

/// REGION_WRITE the command, REGION_READ the portal back.
fn send(d: &dyn VfioDevice, c: &Command) -> Option<Command> {
    d.region_write(0, 0, &c.to_bytes()).ok()?;
    let mut b = [0u8; COMMAND_SIZE];
    d.region_read(0, 0, &mut b).ok()?;
    Command::from_bytes(&b).ok()
}
