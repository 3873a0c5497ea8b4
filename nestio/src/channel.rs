//! BAR channels in the CLI's processes (`nestio_nested::channel_handoff`): the device
//! process grants them, each `nestio run --export` level passes them down, and the
//! innermost `nestio run` (a level with `--memory-from`) uses one. `--bar-channel off`
//! turns it off in any of them: the device process or an exporting level then answers
//! the probe with ENOTTY (as an old nestio does), and the innermost level never asks.

use std::path::Path;
use std::sync::Arc;

use nestio_device_model::VfioDevice;
use nestio_nested::{request_grant, ChannelBars, ChannelGate, ChannelGrants};
use nestio_vfio_user::{Client, Server};
use nestio_vmm::iommu::smmuv3::NestedIommuPort;

/// `--bar-channel on|off`.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: use on or off")),
    }
}

/// The device process: `device` served behind a [`ChannelGate`] with its grants as the
/// server's extension when `enabled` and the device can have channels (a PCI device
/// with a readable or writable BAR); else `device` as it is.
pub fn offer_device(
    device: Arc<dyn VfioDevice>,
    enabled: bool,
) -> (Arc<dyn VfioDevice>, Option<Arc<ChannelGrants>>) {
    if !enabled {
        return (device, None);
    }
    match ChannelGrants::for_device(device.clone()) {
        Ok(grants) => {
            let gate: Arc<dyn VfioDevice> = Arc::new(ChannelGate::new(device, grants.clone()));
            (gate, Some(grants))
        }
        Err(e) => {
            tracing::info!(error = %e, "no BAR channels for this device");
            (device, None)
        }
    }
}

/// `server` with `grants` as its feature extension, if any.
pub fn with_grants(server: Server, grants: Option<Arc<ChannelGrants>>) -> Server {
    match grants {
        Some(g) => server.with_extension(g),
        None => server,
    }
}

/// The device to attach, and its BAR channel wrapper when it has one.
pub type Innermost = (
    Arc<dyn VfioDevice>,
    Option<Arc<ChannelBars>>,
    Option<Arc<dyn NestedIommuPort>>,
);

/// The innermost level's device at `socket`: one session, and a BAR channel over it
/// when the level above grants one that crossed at least one exporting level (straight
/// from the device process a channel saves nothing). Without a channel the session is
/// wrapped with posted writes, as `--device vfio-user=PATH` would be.
///
/// With `nested` (`--viommu smmuv3,mode=nested`) the session proposes nestio's
/// nested-IOMMU extension, and its port comes back when the levels above agreed.
pub fn innermost_device(socket: &Path, nested: bool) -> Result<Innermost, String> {
    let config = nestio_vfio_user::ClientConfig {
        nested_iommu: nested.then(nestio_vfio_user::nested_iommu::NestedIommuCaps::default),
        ..nestio_vfio_user::ClientConfig::default()
    };
    let client = std::os::unix::net::UnixStream::connect(socket)
        .map_err(nestio_vfio_user::ClientError::from)
        .and_then(|s| Client::from_stream(s, config))
        .map_err(|e| match e {
        nestio_vfio_user::ClientError::Busy => format!("{}: {e}", socket.display()),
        _ => format!(
            "cannot connect to {}: {e} (is `nestio run --export` or `nestio device` running there?)",
            socket.display()
        ),
    })?;
    let client = Arc::new(client);
    let grant = match request_grant(&client) {
        Ok(g) => g.filter(|g| g.info().levels() >= 1),
        Err(e) => {
            tracing::warn!(error = %e, "no BAR channel; BAR accesses pass every level");
            None
        }
    };
    if let Some(g) = grant {
        let levels = g.info().levels();
        let asker = client.clone();
        let regrant: nestio_nested::channel_handoff::Regrant =
            Box::new(move || request_grant(&asker));
        match ChannelBars::new(client.clone(), g, Some(regrant)) {
            Ok(bars) => {
                tracing::info!(
                    levels,
                    "BAR channel to the device: BAR accesses skip the {levels} exporting level(s)"
                );
                let bars = Arc::new(bars);
                let port = nested.then(|| client.clone() as Arc<dyn NestedIommuPort>);
                return Ok((bars.clone(), Some(bars), port));
            }
            Err(e) => {
                tracing::warn!(error = %e, "BAR channel unusable; BAR accesses pass every level")
            }
        }
    }
    let client = Arc::into_inner(client).ok_or("the device session is still shared")?;
    let dev = nestio_vmm::remote::PostedWrites::new(client)
        .map_err(|e| format!("cannot read the device's BARs at {}: {e}", socket.display()))?;
    let dev = Arc::new(dev);
    let port = nested.then(|| dev.clone() as Arc<dyn NestedIommuPort>);
    Ok((dev, None, port))
}

/// The line the innermost level prints at its end (the tests read it).
pub fn report(bars: &[Arc<ChannelBars>]) {
    for b in bars {
        let s = b.stats();
        eprintln!(
            "nestio: bar channel: channel={} mediated={} fallbacks={} grants={}",
            s.channel, s.mediated, s.fallbacks, s.grants
        );
    }
}
