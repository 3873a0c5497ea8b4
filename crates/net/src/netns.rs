//! Network namespaces for tests and demos that need the host's network stack as a peer:
//! run `ip` and delete the namespace (with whatever is left in it) when done.

use std::process::Command;

/// Run `ip ARGS…`; the error carries the command and ip's own message.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace by name, deleted (with the interfaces moved into it) on drop.
/// Create it with `ip netns add NAME`, then wrap the name.
pub struct Netns(pub String);

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.0]) {
            eprintln!("warning: network namespace cleanup failed: {e}");
        }
    }
}
