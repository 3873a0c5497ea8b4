//! Entry points for the fuzz targets (kept in the crate so each target is two lines).
//!
//! [`fuzz_dispatch`] plays a client: it negotiates VERSION (with a twin socket, whose
//! DMA requests it answers with EFAULT so the server never waits forever), writes the
//! fuzz bytes as the rest of the stream, closes its write side and drains every reply
//! until the server ends the session. The server must neither panic nor hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::proto::{Capabilities, Command, Header, TwinSocket, Version};
use crate::server::{Server, ServerConfig};
use crate::socket::{recv_message, send_message};
use crate::testdev::TestDevice;

pub use crate::proto::fuzz_decode;

/// Feed `data` as a client byte stream to a server serving a [`TestDevice`].
pub fn fuzz_dispatch(data: &[u8]) {
    let Ok(dev) = TestDevice::new() else { return };
    let server = Server::new(
        Arc::new(dev),
        ServerConfig {
            max_data_xfer_size: 64 * 1024,
            max_msg_fds: 8,
            ..ServerConfig::default()
        },
    );
    let Ok((client, srv_end)) = UnixStream::pair() else {
        return;
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = server.serve_stream(srv_end);
        });
        if drive(s, &client, data).is_none() {
            // Handshake failed: unblock the server so the scope can end.
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    });
}

fn drive<'s>(s: &'s std::thread::Scope<'s, '_>, client: &UnixStream, data: &[u8]) -> Option<()> {
    let v = Version {
        major: crate::proto::VERSION_MAJOR,
        minor: crate::proto::VERSION_MINOR,
        caps: Capabilities {
            twin_socket: Some(TwinSocket {
                supported: true,
                fd_index: None,
            }),
            write_multiple: true,
            ..Capabilities::default()
        },
    };
    let mut p = Vec::new();
    v.encode_into(&mut p);
    let h = Header::command(0, Command::Version, p.len()).ok()?;
    send_message(client, &h, &p, &[]).ok()?;
    let reply = recv_message(client, 1 << 20).ok()??;
    if let Some(fd) = reply.fds.into_iter().next() {
        let twin = UnixStream::from(fd);
        s.spawn(move || {
            while let Ok(Some(m)) = recv_message(&twin, 1 << 20) {
                let _ = send_message(&twin, &m.header.error_reply(libc::EFAULT), &[], &[]);
            }
        });
    }
    let mut drain = client.try_clone().ok()?;
    s.spawn(move || {
        let mut b = vec![0u8; 65536];
        while matches!(drain.read(&mut b), Ok(n) if n > 0) {}
    });
    let mut w = client;
    let _ = w.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    Some(())
}
