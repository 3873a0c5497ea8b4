//! Helpers shared by the CLI tests that start `nestio` processes serving sockets.
#![allow(dead_code)]

use std::path::Path;

/// True once a socket bound to `path` is listening in process `pid`'s network
/// namespace (see [`nestio_vfio_user::listening`]; a server started with
/// `ip netns exec` is found through its own pid).
pub fn listening(pid: u32, path: &Path) -> bool {
    nestio_vfio_user::listening(pid, path)
}
