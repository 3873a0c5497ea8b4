//! Input for the serial console: bytes from a file descriptor (the VMM's stdin, a pipe)
//! fed into the 16550's receive FIFO, which raises the guest's receive interrupt.
//!
//! A pump thread polls the descriptor (so it notices the VM stopping within
//! [`POLL_MS`]), reads what is there and hands it to the UART as its 64-byte FIFO
//! drains — the guest reads at its own pace, nothing is dropped. End of input stops
//! the reading; bytes already read are still delivered.
//!
//! When the descriptor is a terminal it is switched out of canonical mode and echo for
//! the VM's lifetime (the guest's own tty echoes and edits lines, as on a serial line);
//! signal keys stay on, so Ctrl-C still stops the VM. The terminal is restored on stop.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::serial::SerialConsole;
use crate::threads::{ThreadHooks, ThreadRole};

/// How long the pump waits for input before looking at the stop flag again.
pub const POLL_MS: i32 = 50;

/// Where the console's input comes from.
#[derive(Debug, Clone, Default)]
pub enum ConsoleInput {
    /// No input: the receive FIFO stays empty.
    #[default]
    None,
    /// The VMM's standard input.
    Stdin,
    /// Any readable descriptor (a pipe, a socket, a file).
    Fd(Arc<OwnedFd>),
}

/// A terminal's settings, restored on drop.
struct RawTerminal {
    fd: OwnedFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Put `fd` in non-canonical, no-echo mode when it is a terminal.
    fn enter(fd: &OwnedFd) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd.as_raw_fd()) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it (result checked).
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a termios to fill.
        if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: valid descriptor and a fully initialised termios.
        if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal {
            fd: fd.try_clone().ok()?,
            saved,
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores settings read from this terminal.
        unsafe { libc::tcsetattr(self.fd.as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// The running pump; [`InputPump::stop`] (or drop) ends it and restores the terminal.
pub struct InputPump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _terminal: Option<RawTerminal>,
}

impl InputPump {
    /// Start feeding `input` into `uart`; `None` for [`ConsoleInput::None`]. The pump
    /// thread calls `hooks` with [`ThreadRole::SerialInput`] first.
    pub fn start(
        input: ConsoleInput,
        uart: Arc<SerialConsole>,
        hooks: ThreadHooks,
    ) -> io::Result<Option<Self>> {
        let fd = match input {
            ConsoleInput::None => return Ok(None),
            ConsoleInput::Stdin => std::io::stdin().as_fd().try_clone_to_owned()?,
            ConsoleInput::Fd(fd) => fd.try_clone()?,
        };
        let terminal = RawTerminal::enter(&fd);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || {
                hooks.enter(ThreadRole::SerialInput);
                pump(&fd, &uart, &flag)
            })?;
        Ok(Some(InputPump {
            stop,
            thread: Some(thread),
            _terminal: terminal,
        }))
    }

    /// Stop the pump and wait for it (at most about [`POLL_MS`]).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for InputPump {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Wait up to [`POLL_MS`] for `fd` to be readable.
fn readable(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, POLL_MS) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

fn pump(fd: &OwnedFd, uart: &SerialConsole, stop: &AtomicBool) {
    let mut pending: Vec<u8> = Vec::new();
    let mut open = true;
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::SeqCst) {
        if !pending.is_empty() {
            let n = uart.feed(&pending);
            pending.drain(..n);
            if !pending.is_empty() {
                // The guest has not drained the FIFO yet.
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
        }
        if !open {
            std::thread::sleep(std::time::Duration::from_millis(POLL_MS as u64));
            continue;
        }
        if !readable(fd) {
            continue;
        }
        // SAFETY: reads into a local buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => pending.extend_from_slice(&buf[..n as usize]),
            0 => {
                tracing::debug!("console input ended");
                open = false;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    tracing::warn!(error = %e, "console input failed; no more input");
                    open = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::serial::ConsoleOutput;
    use std::io::Write;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EventFd;

    /// Everything written to the input arrives in order through the 64-byte FIFO, read
    /// the way a guest driver reads it (LSR.DR, then RBR), and the pump stops on request.
    #[test]
    fn pipe_input_reaches_the_guest_in_order_through_the_fifo() {
        let uart = Arc::new(SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::Sink,
        ));
        let (rx, mut tx) = std::os::unix::net::UnixStream::pair().unwrap();
        let pump = InputPump::start(
            ConsoleInput::Fd(Arc::new(OwnedFd::from(rx))),
            uart.clone(),
            ThreadHooks::default(),
        )
        .unwrap()
        .expect("a pump for an fd");
        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&sent).unwrap();
        drop(tx); // end of input: what was read is still delivered
        let mut got = Vec::new();
        let t0 = Instant::now();
        while got.len() < sent.len() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "got {} bytes",
                got.len()
            );
            let mut lsr = [0u8];
            uart.read(5, &mut lsr).unwrap();
            if lsr[0] & 1 != 0 {
                let mut b = [0u8];
                uart.read(0, &mut b).unwrap();
                got.push(b[0]);
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(got, sent);
        pump.stop();
    }

    #[test]
    fn no_input_starts_no_pump() {
        let uart = Arc::new(SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::Sink,
        ));
        assert!(
            InputPump::start(ConsoleInput::None, uart, ThreadHooks::default())
                .unwrap()
                .is_none()
        );
    }
}
