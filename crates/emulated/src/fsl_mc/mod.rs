//! An NXP FSL-MC (DPAA2 Management Complex) resource container: a DPRC holding DPNI,
//! DPIO, DPBP, DPCON, DPMCP and DPMAC objects, assigned to its user as one unit.
//! Nothing emulates this elsewhere (QEMU has no model); the encodings are Linux's
//! (`include/linux/fsl/mc.h`, `drivers/bus/fsl-mc/`, the DPAA2 drivers' `*-cmd.h`),
//! checked against Linux 6.1's headers by `tests/fsl_mc_linux.rs`.
//!
//! # The pieces
//! - [`portal`]: the 64-byte MC command (header + 7 parameter words), the status codes,
//!   checked constructors and bounds-checked parameter overlays;
//! - [`objects`]: the object types, what each has (regions, interrupts, enable), command
//!   ids and every parameter offset nestio encodes, with Linux's names;
//! - `dprc`: the MC firmware's interpreter — tokens, DPRC commands (attributes, object
//!   count / get object / get region, IRQ set / enable / mask / status / clear, set
//!   object IRQ, connections, reset), object commands, one MC status for every refusal;
//! - `container`: the shared state and the VFIO devices ([`FslMcDevice`]).
//! - [`driver`]: a host-side MC driver (Linux's `mc_send_command` and `dprc_*` wrappers)
//!   over a portal region or a mapped portal, for tests, fuzzing and tools.
//!
//! # VFIO view (as Linux's `drivers/vfio/fsl-mc/` presents it)
//! Every object, and the DPRC itself, is one VFIO device with
//! `VFIO_DEVICE_FLAGS_FSL_MC`; only the DPRC has `RESET`, and its reset resets the whole
//! container (objects disabled, object tokens closed, MC interrupt state cleared);
//! DEVICE_RESET on an object is refused (ENOTSUP). Region `i` is 64 KiB at fd offset
//! `i << 40`; objects' regions are mmappable (the DPRC's is not, as in Linux), so a
//! driver, or a guest whose memory slot is the region, writes MC commands with plain
//! stores. Each MC interrupt is one VFIO irq index of count 1 with an eventfd; only
//! ACTION_TRIGGER is supported (DATA_NONE/BOOL loop a trigger back, as in Linux).
//!
//! # Commands and completion
//! A driver writes parameters 1..7, then the header with status READY. A REGION_WRITE
//! that writes the header executes the command before it returns (Linux's vfio write
//! waits for completion too); a portal written through an mmap is picked up by the
//! poller thread, as the real MC firmware polls its portals. Completion writes the
//! response parameters, then the header with its final status, so a reader that sees
//! the status leave READY sees the response. Every refusal has its MC status (see
//! `dprc`'s documentation); a command with status other than READY is not a command.
//!
//! # Socket layout (`nestio device fsl-mc`)
//! One vfio-user socket per VFIO device: the DPRC at `PATH`, each object at
//! `PATH.<type>.<id>` (`PATH.dpni.0`). This is how Linux binds them: vfio-fsl-mc binds
//! the DPRC first, scans it (`dprc_scan_container`) and binds every child object to
//! vfio-fsl-mc through `driver_override`; the user gets one VFIO device fd per object
//! (`VFIO_GROUP_GET_DEVICE_FD("dpni.0")`) in the container's group, and every object's
//! MC I/O goes through its container's portal. A vfio-user client does the same: connect
//! to the DPRC, scan it with GET_OBJ_COUNT/GET_OBJ, then connect to each object's socket
//! by the name the scan gave. One device per socket keeps the vfio-user server
//! unchanged (one owner per device) and lets a VMM attach objects one by one.
//!
//! # Assignment
//! The object set is fixed when the container is built ([`FslMcContainer::new`]): no
//! API adds or removes an object afterwards, and the MC commands that would (create /
//! destroy container, assign / unassign) answer `NO_PRIVILEGE`.

pub mod container;
mod dprc;
pub mod driver;
#[cfg(feature = "harness")]
mod fuzz;
pub mod objects;
pub mod portal;

pub use container::{FslMcContainer, FslMcDevice, FslMcError, ObjectDesc, REGION_OFFSET_SHIFT};
pub use dprc::{MAX_TOKENS, MC_FIRMWARE_VERSION, ROOT_CONTAINER_ID};
#[cfg(feature = "harness")]
pub use fuzz::fuzz_fsl_mc;
pub use objects::{parse_object_list, ObjType, DEFAULT_OBJECTS};
pub use portal::{CmdId, Command, Header, McStatus, Params};
