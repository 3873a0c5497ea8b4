//! The 16550 console (vm-superio) at 0x3f8, IRQ 4 through a KVM irqfd.

use parking_lot::Mutex;
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, BusFault};

/// Base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Number of ports.
pub const SERIAL_PORTS: u64 = 8;
/// ISA IRQ (GSI) of the port.
pub const SERIAL_GSI: u32 = 4;

/// A function receiving console bytes ([`ConsoleOutput::Callback`]).
pub type ConsoleFn = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Where the console output goes.
#[derive(Clone, Default)]
pub enum ConsoleOutput {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// Discarded.
    Sink,
    /// Appended to a shared buffer (tests, embedding).
    Buffer(Arc<Mutex<Vec<u8>>>),
    /// Handed to a function as the guest writes it (called on the vCPU thread, one
    /// call per byte written to the UART; it must not block for long).
    Callback(ConsoleFn),
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsoleOutput::Stdout => "Stdout",
            ConsoleOutput::Sink => "Sink",
            ConsoleOutput::Buffer(_) => "Buffer",
            ConsoleOutput::Callback(_) => "Callback",
        })
    }
}

struct Out(ConsoleOutput);

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            ConsoleOutput::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(buf)?;
                if buf.contains(&b'\n') {
                    o.flush()?;
                }
            }
            ConsoleOutput::Sink => {}
            ConsoleOutput::Buffer(b) => b.lock().extend(buf),
            ConsoleOutput::Callback(f) => f(buf),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if let ConsoleOutput::Stdout = self.0 {
            std::io::stdout().flush()?;
        }
        Ok(())
    }
}

/// The serial interrupt: an eventfd registered as irqfd.
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The console device.
pub struct SerialConsole {
    uart: Mutex<Serial<IrqLine, NoEvents, Out>>,
    /// The UART's interrupt eventfd and output, kept to rebuild it from a migrated state.
    irq: Option<EventFd>,
    out: ConsoleOutput,
}

impl SerialConsole {
    /// A UART signalling `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        // A dup of the eventfd (same counter) for `restore`; if the process is out of
        // fds the console still works, only a restore would fail.
        let keep = irq.try_clone().ok();
        SerialConsole {
            uart: Mutex::new(Serial::new(IrqLine(irq), Out(out.clone()))),
            irq: keep,
            out,
        }
    }

    /// The UART's registers and receive FIFO (for migration).
    pub fn save(&self) -> vm_superio::serial::SerialState {
        self.uart.lock().state()
    }

    /// Replace the UART's registers and receive FIFO with a migrated state (a FIFO
    /// longer than the UART's is refused); raises the interrupt the state has pending.
    pub fn restore(&self, state: &vm_superio::serial::SerialState) -> std::io::Result<()> {
        let irq = match &self.irq {
            Some(fd) => fd.try_clone()?,
            None => return Err(std::io::Error::from_raw_os_error(libc::EMFILE)),
        };
        let uart = Serial::from_state(state, IrqLine(irq), NoEvents, Out(self.out.clone()))
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("serial state refused: {e:?}"),
                )
            })?;
        *self.uart.lock() = uart;
        Ok(())
    }
}

impl SerialConsole {
    /// Put received bytes into the UART's FIFO (raising the receive interrupt when the
    /// guest enabled it); returns how many fitted — the rest waits for the guest to
    /// read (see [`crate::serial_input`]).
    pub fn feed(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock();
        match uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                tracing::warn!(error = ?e, "serial receive interrupt failed");
                bytes.len().min(1)
            }
        }
    }

    /// Write `bytes` to the console output directly, not through the UART registers
    /// (the PAPR virtual terminal, [`crate::hypercall::console`]); serialised with the
    /// UART's own output.
    pub fn write_output(&self, bytes: &[u8]) {
        let mut uart = self.uart.lock();
        if let Err(e) = uart.writer_mut().write_all(bytes) {
            tracing::warn!(error = %e, "console write failed");
        }
    }

    /// Take up to `buf.len()` received bytes out of the receive FIFO (as the guest's
    /// reads of the data register would); 0 when none is waiting, or while the guest
    /// has the divisor latch selected (the data register is then the divisor).
    pub fn take_input(&self, buf: &mut [u8]) -> usize {
        const LCR: u8 = 3;
        const LSR: u8 = 5;
        const LCR_DLAB: u8 = 0x80;
        const LSR_DATA_READY: u8 = 0x01;
        let mut uart = self.uart.lock();
        if uart.read(LCR) & LCR_DLAB != 0 {
            return 0;
        }
        let mut n = 0;
        while n < buf.len() && uart.read(LSR) & LSR_DATA_READY != 0 {
            buf[n] = uart.read(0);
            n += 1;
        }
        n
    }
}

impl BusDevice for SerialConsole {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        data.fill(0xff);
        if data.len() == 1 {
            data[0] = self.uart.lock().read(offset as u8);
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        if data.len() == 1 {
            let r = self.uart.lock().write(offset as u8, data[0]);
            if let Err(e) = r {
                tracing::warn!(error = ?e, "serial console write failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_the_buffer_and_lsr_says_ready() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let s = SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::Buffer(buf.clone()),
        );
        for b in b"hi\n" {
            s.write(0, &[*b]).unwrap();
        }
        assert_eq!(&*buf.lock(), b"hi\n");
        let mut lsr = [0u8];
        s.read(5, &mut lsr).unwrap();
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let cb = SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::Callback(Arc::new(move |b: &[u8]| sink.lock().extend_from_slice(b))),
        );
        cb.write(0, b"x").unwrap();
        // Input: the FIFO takes 64 bytes, the guest reads them from RBR with LSR.DR set.
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(s.feed(&input), 64);
        assert_eq!(s.feed(&input[64..]), 0, "full");
        let mut lsr = [0u8];
        s.read(5, &mut lsr).unwrap();
        assert_ne!(lsr[0] & 0x01, 0, "data ready");
        let mut rbr = [0u8];
        s.read(0, &mut rbr).unwrap();
        assert_eq!(rbr[0], 0);
        assert_eq!(s.feed(&input[64..]), 1, "one byte of room again");
        assert_eq!(&*seen.lock(), b"x");
        let mut wide = [0u8; 2];
        s.read(0, &mut wide).unwrap();
        assert_eq!(wide, [0xff, 0xff], "16-bit access is not a UART access");
    }

    #[test]
    fn direct_output_and_fifo_input_for_the_virtual_terminal() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let s = SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::Buffer(buf.clone()),
        );
        s.write(0, b"a").unwrap();
        s.write_output(b"bc");
        assert_eq!(&*buf.lock(), b"abc");
        let mut got = [0u8; 4];
        assert_eq!(s.take_input(&mut got), 0, "nothing received");
        assert_eq!(s.feed(b"xyz"), 3);
        assert_eq!(s.take_input(&mut got[..2]), 2);
        assert_eq!(&got[..2], b"xy");
        // Divisor latch selected: the data register is not the FIFO.
        s.write(3, &[0x80]).unwrap();
        assert_eq!(s.take_input(&mut got), 0);
        s.write(3, &[0x03]).unwrap();
        assert_eq!(s.take_input(&mut got), 1);
        assert_eq!(got[0], b'z');
        let mut lsr = [0u8];
        s.read(5, &mut lsr).unwrap();
        assert_eq!(lsr[0] & 0x01, 0, "FIFO drained");
    }
}
