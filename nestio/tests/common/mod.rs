//! Helpers shared by the CLI tests that start `nestio` processes serving sockets.
#![allow(dead_code)]

use std::path::Path;

/// The `__SO_ACCEPTCON` bit of the Flags column of `/proc/net/unix`: listening.
const SO_ACCEPTCON: u32 = 0x1_0000;

/// True once a socket bound to `path` is listening, as seen in `/proc/<pid>/net/unix`
/// (the table of the network namespace process `pid` is in, so a server started with
/// `ip netns exec` is found too).
///
/// A server's socket file appears at bind(), a moment before listen(); a client that
/// connects in between is refused. Waiting for the file alone is therefore not enough
/// on a loaded machine, where the server can be descheduled between the two calls.
pub fn listening(pid: u32, path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        // Without the socket tables (a restricted /proc), the file is all there is to
        // go by; otherwise the process is gone.
        return !Path::new("/proc/self/net/unix").exists() && path.exists();
    };
    let want = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() == 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}
