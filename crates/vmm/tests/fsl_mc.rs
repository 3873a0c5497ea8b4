//! An FSL-MC DPRC container assigned to a KVM guest: every device of the container on
//! the platform bus (the DPRC's portal emulated through MMIO exits, the DPMCP's portal a
//! KVM memory slot, so the guest's commands through it never exit; interrupts wired
//! through the `IrqChip`), and the `fslmctest` payload scanning, opening, commanding,
//! taking dpni.0's interrupt and resetting the container through its portals — with the
//! container in this process, and served by vfio-user sockets.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use nestio_device_model::VfioDevice;
use nestio_emulated::fsl_mc::{parse_object_list, FslMcContainer, ObjType};
use nestio_vfio_user::server::{Server, ServerConfig};
use nestio_vmm::platform::fsl_mc::payload_args;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig};

/// Three MC interrupts (DPRC, DPNI, DPMCP): within x86's four platform lines.
const OBJECTS: &str = "dpni:1,dpbp:1,dpmcp:1";

fn run_payload(devices: Vec<DeviceConfig>, container: &FslMcContainer) -> String {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::FSLMCTEST);
    cfg.console = console;
    cfg.cmdline = "{fsl-mc}".into();
    cfg.devices = devices;
    let mut vm = Vm::new(cfg).expect("the container's devices attach");
    let devs = vm.platform().devices();
    assert_eq!(devs.len(), 4, "DPRC + 3 objects on the platform bus");
    assert!(vm.pci().devices().is_empty());
    // The DPRC's portal exits (not mmappable); the DPMCP's is a memory slot.
    let dprc = devs[0].placement();
    assert_eq!((dprc.regions.len(), dprc.regions[0].mapped_areas), (1, 0));
    let mcp = devs[3].placement();
    assert_eq!((mcp.regions.len(), mcp.regions[0].mapped_areas), (1, 1));
    assert_eq!(
        dprc.irqs.len() + mcp.irqs.len() + devs[1].placement().irqs.len(),
        3
    );
    let args = payload_args(vm.platform());
    assert!(
        args.contains("fslmc.dprc=0x") && args.contains("fslmc.dpmcp.0=0x"),
        "{args}"
    );
    assert!(args.contains("fslmc.irq.dpni.0="), "{args}");
    let before = container.commands_executed();
    let report = vm.run().expect("the guest runs");
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "{out}");
    assert!(
        container.commands_executed() - before >= 20,
        "the guest's commands reached the MC"
    );
    out
}

#[test]
fn a_guest_drives_an_in_process_container_through_its_portals() {
    if !common::kvm_or_skip("a_guest_drives_an_in_process_container_through_its_portals") {
        return;
    }
    let c = FslMcContainer::new(2, &parse_object_list(OBJECTS).unwrap()).unwrap();
    c.start_poller().unwrap();
    let devices = c
        .devices()
        .iter()
        .map(|d| DeviceConfig::Local {
            name: d.name(),
            device: d.clone() as Arc<dyn VfioDevice>,
        })
        .collect();
    let out = run_payload(devices, &c);
    assert!(
        out.contains("fslmc: dprc.2 obj dpmcp.0 irqs=1 regions=1"),
        "{out}"
    );
    assert!(out.contains("fslmc: ok objects=3 opened=3 irqs=1"), "{out}");
}

#[test]
fn a_guest_drives_a_container_served_over_vfio_user() {
    if !common::kvm_or_skip("a_guest_drives_a_container_served_over_vfio_user") {
        return;
    }
    let c = FslMcContainer::new(5, &parse_object_list(OBJECTS).unwrap()).unwrap();
    c.start_poller().unwrap();
    let base = std::env::temp_dir().join(format!("nestio-vmm-fslmc-{}.sock", std::process::id()));
    let mut devices = Vec::new();
    for (i, dev) in c.devices().iter().enumerate() {
        let path = if i == 0 {
            base.clone()
        } else {
            PathBuf::from(format!("{}.{}", base.display(), dev.name()))
        };
        let l = nestio_vfio_user::bind(&path).unwrap();
        let d: Arc<dyn VfioDevice> = dev.clone();
        std::thread::spawn(move || Server::new(d, ServerConfig::default()).serve_owners(l, 1));
        devices.push(DeviceConfig::VfioUser { socket: path });
    }
    assert_eq!(c.devices()[3].obj_type(), ObjType::Dpmcp);
    let out = run_payload(devices, &c);
    assert!(
        out.contains("fslmc: dprc.5 obj dpni.0 irqs=1 regions=0"),
        "{out}"
    );
    assert!(out.contains("fslmc: ok objects=3 opened=3 irqs=1"), "{out}");
    for (i, d) in c.devices().iter().enumerate() {
        let p = if i == 0 {
            base.clone()
        } else {
            PathBuf::from(format!("{}.{}", base.display(), d.name()))
        };
        let _ = std::fs::remove_file(p);
    }
}
