//! SET_IRQS with hostile fds, end to end: a vfio-user `Client` hands the server (serving
//! the test device) fds of every kind the script picks — eventfds (non-blocking,
//! blocking, full), pipe ends, a socket with a full buffer, /dev/null, a memfd — then
//! masks, unmasks (by message or by an unmask eventfd the device watches) and raises
//! vectors while the "peer" flips its copies back to blocking and fills their counters. Nothing may hang (libFuzzer's -timeout catches a stuck
//! raise), panic or leak; a refused fd must be answered with EINVAL.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nestio_device_model::{IrqAction, IrqData, VfioDevice};
use nestio_vfio_user::testdev::TestDevice;
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

fn owned(raw: i32) -> Option<OwnedFd> {
    // SAFETY: a fresh fd owned by nothing else (checked non-negative).
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

fn pipe() -> Option<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two fds into the local array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    Some((owned(p[0])?, owned(p[1])?))
}

fn fill_counter(fd: &OwnedFd) {
    let v: u64 = u64::MAX - 1;
    // SAFETY: F_SETFL with an integer, then an 8-byte write from a local u64; the fd
    // is made non-blocking first so the harness itself never waits.
    unsafe {
        let f = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, f | libc::O_NONBLOCK);
        libc::write(fd.as_raw_fd(), (&v as *const u64).cast(), 8);
    }
}

fn make_blocking(fd: &OwnedFd) {
    // SAFETY: F_GETFL / F_SETFL with integers.
    unsafe {
        let f = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, f & !libc::O_NONBLOCK);
    }
}

/// An fd of the kind `k` picks; the harness keeps a peer copy in `keep` (for
/// eventfds) or the other end (pipes, sockets) so nothing drains them.
fn hostile_fd(k: u8, keep: &mut Vec<OwnedFd>) -> Option<OwnedFd> {
    match k % 9 {
        // SAFETY (all eventfd/memfd calls): no pointers but a literal; result checked.
        0 => owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) }),
        1 | 2 => {
            let e = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
            if k % 9 == 2 {
                fill_counter(&e);
                make_blocking(&e);
            }
            keep.push(e.try_clone().ok()?);
            Some(e)
        }
        3 => {
            let (r, w) = pipe()?;
            keep.push(r);
            Some(w)
        }
        4 => {
            let (r, w) = pipe()?;
            keep.push(w);
            Some(r)
        }
        5 => {
            let (a, b) = UnixStream::pair().ok()?;
            a.set_nonblocking(true).ok()?;
            let chunk = [0u8; 4096];
            while std::io::Write::write(&mut &a, &chunk).is_ok() {}
            a.set_nonblocking(false).ok()?;
            keep.push(b.into());
            Some(a.into())
        }
        6 => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .ok()
            .map(OwnedFd::from),
        7 => owned(unsafe { libc::memfd_create(c"fuzz-irq".as_ptr(), libc::MFD_CLOEXEC) }),
        _ => None,
    }
}

fn run(data: &[u8]) {
    // libFuzzer's main does not ignore SIGPIPE as a Rust binary's does, and the harness
    // writes to pipe ends whose reader the server dropped.
    static IGNORE_SIGPIPE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN installs no handler code.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let Ok(dev) = TestDevice::new() else { return };
    let dev = Arc::new(dev);
    let server = Server::new(dev.clone(), ServerConfig::default());
    let Ok((a, b)) = UnixStream::pair() else { return };
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = server.serve_stream(b);
        });
        let Ok(client) = Client::from_stream(
            a,
            ClientConfig {
                twin_socket: false,
                ..ClientConfig::default()
            },
        ) else {
            return;
        };
        let mut keep: Vec<OwnedFd> = Vec::new();
        let num_irqs = client.info().num_irqs.max(1);
        for op in data.chunks(4) {
            let [o, x, y, z] = [op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0), *op.get(3).unwrap_or(&0)];
            let index = u32::from(x) % num_irqs;
            let start = u32::from(y & 3);
            match o % 6 {
                0 => {
                    let count = u32::from(z % 4);
                    let mut any_bad = false;
                    let fds: Vec<Option<OwnedFd>> = (0..count)
                        .map(|i| {
                            let k = z.rotate_left(i * 2) ^ y;
                            any_bad |= matches!(k % 9, 3..=7);
                            hostile_fd(k, &mut keep)
                        })
                        .collect();
                    let r = client.set_irqs(index, IrqAction::Trigger, start, count, IrqData::Eventfd(fds));
                    if any_bad {
                        assert!(r.is_err(), "a non-eventfd was accepted for SET_IRQS");
                    }
                }
                1 => {
                    let _ = client.set_irqs(index, IrqAction::Mask, start, 1, IrqData::None);
                }
                2 if z & 0x80 != 0 => {
                    // An unmask eventfd (or fd -1): a non-eventfd must be refused; the
                    // device's watch thread then races the peer's tampering below.
                    let fd = if z & 0x40 != 0 { None } else { hostile_fd(z ^ y, &mut keep) };
                    let bad = fd.is_some() && matches!((z ^ y) % 9, 3..=7);
                    let r = client.set_irqs(index, IrqAction::Unmask, start, 1, IrqData::Eventfd(vec![fd]));
                    if bad {
                        assert!(r.is_err(), "a non-eventfd was accepted as an unmask eventfd");
                    }
                }
                2 => {
                    let _ = client.set_irqs(index, IrqAction::Unmask, start, 1, IrqData::None);
                }
                3 => {
                    // The device raises vectors (as its DMA engine would).
                    for _ in 0..=(z % 8) {
                        dev.trigger(index, start);
                    }
                }
                4 => {
                    let _ = client.set_irqs(index, IrqAction::Trigger, start, 1, IrqData::None);
                }
                _ => {
                    // The peer tampers with the eventfds it shares with the device.
                    for f in &keep {
                        if z & 1 != 0 {
                            make_blocking(f);
                        }
                        if z & 2 != 0 {
                            fill_counter(f);
                        }
                    }
                }
            }
        }
        drop(client);
    });
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
