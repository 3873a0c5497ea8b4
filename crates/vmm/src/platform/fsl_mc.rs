//! FSL-MC containers on the platform bus: how a guest finds them.
//!
//! A DPRC container is attached as its devices — the DPRC first, then each object,
//! every one an ordinary FSL-MC-flagged platform device ([`super::PlatformBus::attach`]):
//! each portal region lands in the platform MMIO window, mmappable portals (the objects'
//! MC and QBMan portals) as KVM memory slots, so a guest's MC commands through them
//! never exit — the device process's portal poller executes them — while the DPRC's own
//! portal (not mmappable, as in Linux's vfio-fsl-mc) is emulated through MMIO exits;
//! each MC interrupt is a wired line of the platform's `IrqChip` with the device's
//! eventfd attached.
//!
//! On Arm a device tree node (`fsl,qoriq-mc` with the DPRC's portal) tells the guest
//! where the container is; the x86 payloads here are told by their command line:
//! [`payload_args`] describes every FSL-MC device — `fslmc.<name>=<portal address>` and
//! `fslmc.irq.<name>=<line>` — with `<name>` `dprc` for the container (the only FSL-MC
//! device with VFIO `RESET`) and the object's Linux name (`dpmcp.0`, the last two
//! dot-separated parts of the attached device's name, so `vfio-user:/run/mc.sock.dpmcp.0`
//! is `dpmcp.0`) for the others. A payload's [`FSL_MC_CMDLINE_TOKEN`] is replaced by it.

use nestio_device_model::flags;

use super::PlatformBus;

/// The word of a payload command line replaced by [`payload_args`].
pub const FSL_MC_CMDLINE_TOKEN: &str = "{fsl-mc}";

/// The FSL-MC name of an attached device: `dprc`, or the trailing `<type>.<id>`.
fn fsl_mc_name(name: &str, dev_flags: u32) -> String {
    if dev_flags & flags::RESET != 0 {
        return "dprc".into();
    }
    let parts: Vec<&str> = name.rsplitn(3, ['.', '/', ':']).collect();
    match parts.as_slice() {
        [id, ty, ..] if id.chars().all(|c| c.is_ascii_digit()) && !id.is_empty() => {
            format!("{ty}.{id}")
        }
        _ => name.rsplit(['/', ':']).next().unwrap_or(name).to_string(),
    }
}

/// The command-line description of the FSL-MC devices on `bus` (see the module
/// documentation), space separated, in attach order.
pub fn payload_args(bus: &PlatformBus) -> String {
    let mut out = Vec::new();
    for d in bus.devices() {
        let f = d.device().info().flags;
        if f & flags::FSL_MC == 0 {
            continue;
        }
        let n = fsl_mc_name(d.name(), f);
        let p = d.placement();
        if let Some(r) = p.regions.iter().find(|r| r.index == 0) {
            out.push(format!("fslmc.{n}={:#x}", r.addr));
        }
        if let Some(i) = p.irqs.iter().find(|i| i.index == 0) {
            out.push(format!("fslmc.irq.{n}={}", i.source));
        }
    }
    out.join(" ")
}

/// `cmdline` with [`FSL_MC_CMDLINE_TOKEN`] replaced by [`payload_args`] (unchanged when
/// it has no such token).
pub fn expand_cmdline(cmdline: &str, bus: &PlatformBus) -> String {
    if cmdline.contains(FSL_MC_CMDLINE_TOKEN) {
        cmdline.replace(FSL_MC_CMDLINE_TOKEN, &payload_args(bus))
    } else {
        cmdline.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_linux_object_names() {
        assert_eq!(fsl_mc_name("dprc.2", flags::FSL_MC | flags::RESET), "dprc");
        assert_eq!(
            fsl_mc_name("vfio-user:/tmp/x", flags::FSL_MC | flags::RESET),
            "dprc"
        );
        assert_eq!(fsl_mc_name("dpmcp.0", flags::FSL_MC), "dpmcp.0");
        assert_eq!(
            fsl_mc_name("vfio-user:/run/mc.sock.dpni.12", flags::FSL_MC),
            "dpni.12"
        );
        assert_eq!(fsl_mc_name("vfio-user:/run/odd", flags::FSL_MC), "odd");
    }
}
