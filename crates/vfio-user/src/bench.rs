//! Round-trip and throughput measurement of the client/server pair against raw floors.
//!
//! One run measures, with the server on a thread of this process:
//! - the floor: a 4-byte round trip over a raw socketpair (one write + one read each way);
//! - a 4-byte REGION_READ through `Client` + `Server` (header, decode, device, reply);
//! - the floors for bulk data: memcpy of 64 KiB, and a raw 64 KiB send over a socketpair
//!   answered by a 4-byte acknowledgement (the two kernel copies any socket transport
//!   pays);
//! - 64 KiB REGION_WRITE through client and server.
//!
//! Each measurement is split into [`ROUNDS`] rounds (raw and client/server alternating);
//! the report gives the median round's time per operation and the ratios (goals:
//! REGION_READ within 1.2x of the raw round trip; REGION_WRITE close to the raw transfer
//! plus the device's own copy, i.e. bounded by copies, not by the protocol).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use nestio_device::VfioDevice;

use crate::client::{Client, ClientConfig};
use crate::server::{Server, ServerConfig};
use crate::testdev::TestDevice;

/// Bytes moved per bulk operation.
pub const BULK: usize = 64 * 1024;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolBenchError {
    /// Setup or I/O failed.
    #[error("benchmark I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The client could not connect.
    #[error("benchmark client failed: {0}")]
    Client(#[from] crate::client::ClientError),
    /// A device call failed.
    #[error("benchmark device call failed: {0}")]
    Device(#[from] nestio_device::DeviceError),
}

/// Results of one run (nanoseconds per operation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtocolBenchReport {
    /// Iterations of each measurement.
    pub iterations: u64,
    /// Raw socketpair 4-byte round trip.
    pub raw_rtt_ns: f64,
    /// 4-byte REGION_READ round trip.
    pub region_read_ns: f64,
    /// memcpy of 64 KiB.
    pub memcpy_64k_ns: f64,
    /// Raw socketpair: 64 KiB sent, 4-byte acknowledgement back.
    pub raw_64k_ns: f64,
    /// 64 KiB REGION_WRITE.
    pub region_write_64k_ns: f64,
}

impl ProtocolBenchReport {
    /// REGION_READ round trip / raw round trip.
    pub fn rtt_ratio(&self) -> f64 {
        self.region_read_ns / self.raw_rtt_ns
    }
    /// 64 KiB REGION_WRITE / 64 KiB memcpy.
    pub fn bulk_ratio(&self) -> f64 {
        self.region_write_64k_ns / self.memcpy_64k_ns
    }
    /// 64 KiB REGION_WRITE / (raw 64 KiB transfer + one 64 KiB memcpy): what the protocol
    /// adds on top of the copies it cannot avoid.
    pub fn bulk_floor_ratio(&self) -> f64 {
        self.region_write_64k_ns / (self.raw_64k_ns + self.memcpy_64k_ns)
    }
}

impl std::fmt::Display for ProtocolBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mbs = |ns: f64| BULK as f64 / ns * 1e9 / (1 << 20) as f64;
        writeln!(
            f,
            "vfio-user benchmark ({} iterations each, median of {} rounds, one CPU)",
            self.iterations, ROUNDS
        )?;
        writeln!(
            f,
            "  raw socketpair 4 B round trip : {:>10.0} ns",
            self.raw_rtt_ns
        )?;
        writeln!(
            f,
            "  REGION_READ 4 B round trip    : {:>10.0} ns  ({:.2}x raw)",
            self.region_read_ns,
            self.rtt_ratio()
        )?;
        writeln!(
            f,
            "  memcpy 64 KiB                 : {:>10.0} ns  ({:.0} MiB/s)",
            self.memcpy_64k_ns,
            mbs(self.memcpy_64k_ns)
        )?;
        writeln!(
            f,
            "  raw socketpair 64 KiB + ack   : {:>10.0} ns  ({:.0} MiB/s)",
            self.raw_64k_ns,
            mbs(self.raw_64k_ns)
        )?;
        write!(
            f,
            "  REGION_WRITE 64 KiB           : {:>10.0} ns  ({:.0} MiB/s, {:.1}x memcpy, \
             {:.2}x raw transfer + memcpy)",
            self.region_write_64k_ns,
            mbs(self.region_write_64k_ns),
            self.bulk_ratio(),
            self.bulk_floor_ratio()
        )
    }
}

fn per_op(start: Instant, n: u64) -> f64 {
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Rounds each measurement is split into; the report takes the median round, so a burst
/// of load from other processes skews one round, not the result.
pub const ROUNDS: u64 = 9;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Run every measurement about `iterations` times (at least one per round). Raw and
/// client/server round trips alternate round by round so both see the same load.
pub fn run(iterations: u64) -> Result<ProtocolBenchReport, ProtocolBenchError> {
    // Pin this thread (and so the threads it spawns) to the CPU it runs on: a wake-up
    // across (virtual) CPUs costs tens of microseconds on a nested VM and would measure
    // the scheduler, not the protocol. The previous mask is restored at the end.
    let pin = Pin::current();
    let r = measure(iterations);
    drop(pin);
    r
}

/// Pins the calling thread — and so every thread it spawns afterwards — to the CPU it
/// runs on; restores the CPU affinity it replaced when dropped. Benchmarks use it so
/// that they measure the code, not cross-CPU wake-ups (tens of microseconds on a nested
/// VM, and bimodal with the scheduler's placement).
pub struct Pin(Option<libc::cpu_set_t>);

impl Pin {
    /// Pin to the current CPU (a no-op `Pin` when the affinity cannot be changed).
    pub fn current() -> Pin {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes to `old`.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) }
            != 0
        {
            return Pin(None);
        }
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        if cpu < 0 {
            return Pin(None);
        }
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: CPU_SET stays in bounds for a cpu number the kernel returned (below
        // CPU_SETSIZE) and writes only into the local set.
        unsafe { libc::CPU_SET(cpu as usize, &mut one) };
        // SAFETY: passes a valid cpu_set_t of the stated size.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) } != 0
        {
            return Pin(None);
        }
        Pin(Some(old))
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores a mask previously read from the kernel.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

fn measure(iterations: u64) -> Result<ProtocolBenchReport, ProtocolBenchError> {
    let per = iterations.div_ceil(ROUNDS).max(1);
    let n = per * ROUNDS;

    // Raw floor: a thread echoing 4 bytes.
    let (mut a, mut b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 4];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    // Client + server.
    let dev = Arc::new(TestDevice::new()?);
    let server = Arc::new(Server::new(dev, ServerConfig::default()));
    let (cs, ss) = UnixStream::pair()?;
    let srv = server.clone();
    let st = std::thread::spawn(move || {
        let _ = srv.serve_stream(ss);
    });
    let client = Client::from_stream(cs, ClientConfig::default())?;

    let mut buf = [0u8; 4];
    for _ in 0..per.min(1000) {
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
        client.region_read(0, 0, &mut buf)?;
    }
    let (mut raw, mut rpc) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..per {
            a.write_all(&buf)?;
            a.read_exact(&mut buf)?;
        }
        raw.push(per_op(t, per));
        let t = Instant::now();
        for _ in 0..per {
            client.region_read(0, 0, &mut buf)?;
        }
        rpc.push(per_op(t, per));
    }
    drop(a);
    let _ = echo.join();

    // Raw bulk floor: a thread that takes 64 KiB and acknowledges with 4 bytes.
    let (mut a, mut b) = UnixStream::pair()?;
    let sink = std::thread::spawn(move || {
        let mut buf = vec![0u8; BULK];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf[..4]).is_err() {
                break;
            }
        }
    });

    let src = vec![0x5au8; BULK];
    let mut dst = vec![0u8; BULK];
    let (mut copy, mut raw_bulk, mut write) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..per {
            dst.copy_from_slice(std::hint::black_box(&src));
            dst[0] = i as u8;
            std::hint::black_box(&mut dst);
        }
        copy.push(per_op(t, per));
        let t = Instant::now();
        for _ in 0..per {
            a.write_all(&src)?;
            a.read_exact(&mut buf)?;
        }
        raw_bulk.push(per_op(t, per));
        let t = Instant::now();
        for _ in 0..per {
            client.region_write(0, 0, &src)?;
        }
        write.push(per_op(t, per));
    }
    drop(client);
    let _ = st.join();
    drop(a);
    let _ = sink.join();

    Ok(ProtocolBenchReport {
        iterations: n,
        raw_rtt_ns: median(raw),
        region_read_ns: median(rpc),
        memcpy_64k_ns: median(copy),
        raw_64k_ns: median(raw_bulk),
        region_write_64k_ns: median(write),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_run_measures_everything() {
        let r = run(20).unwrap();
        assert_eq!(r.iterations, 3 * ROUNDS);
        for v in [
            r.raw_rtt_ns,
            r.region_read_ns,
            r.memcpy_64k_ns,
            r.raw_64k_ns,
            r.region_write_64k_ns,
        ] {
            assert!(v.is_finite() && v > 0.0, "{r:?}");
        }
        let text = r.to_string();
        assert!(
            text.contains("REGION_READ")
                && text.contains("x raw")
                && text.contains("x raw transfer + memcpy"),
            "{text}"
        );
    }
}
