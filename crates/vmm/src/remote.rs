//! Devices served by another process: `--device vfio-user=PATH` connects the vfio-user
//! client ([`nestio_vfio_user::Client`]), which is itself a [`VfioDevice`], so the VMM
//! wires it exactly like an in-process device.

use std::path::Path;
use std::sync::Arc;

use nestio_device::VfioDevice;

use crate::pci::PciHostError;

/// Connect to the vfio-user server at `socket`.
pub fn connect(socket: &Path) -> Result<Arc<dyn VfioDevice>, PciHostError> {
    let client = nestio_vfio_user::Client::connect(socket).map_err(|e| PciHostError::Connect {
        socket: socket.display().to_string(),
        message: match e {
            // The server is up and answered: it has another client.
            nestio_vfio_user::ClientError::Busy => e.to_string(),
            _ => format!(
                "{e} (is `nestio device ... --socket {}` running?)",
                socket.display()
            ),
        },
    })?;
    Ok(Arc::new(client))
}
