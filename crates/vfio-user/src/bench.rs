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

use nestio_device_model::VfioDevice;

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
    Device(#[from] nestio_device_model::DeviceError),
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

/// The server's posted-write ring settings a benchmark was asked for: the ring thread's
/// polling window in µs from `NESTIO_RING_POLL_US` (for experiments), or `None` (the
/// default ring) when it is unset or not a number.
pub fn ring_config_from_env() -> Option<crate::posted_ring::RingConfig> {
    let us = std::env::var("NESTIO_RING_POLL_US").ok()?.parse().ok()?;
    Some(crate::posted_ring::RingConfig {
        poll: std::time::Duration::from_micros(us),
        ..Default::default()
    })
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
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        match usize::try_from(cpu) {
            Ok(cpu) => Pin::to(cpu),
            Err(_) => Pin(None),
        }
    }

    /// Pin to CPU `cpu` (a no-op `Pin` when the affinity cannot be changed, or `cpu`
    /// is not below `CPU_SETSIZE`).
    pub fn to(cpu: usize) -> Pin {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Pin(None);
        }
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE; writes only into the local set.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        Pin::set(&one)
    }

    /// Let the calling thread run on every configured CPU (the kernel intersects the
    /// set with the CPUs this process may use).
    pub fn all() -> Pin {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut all: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for cpu in 0..cpus().min(libc::CPU_SETSIZE as usize) {
            // SAFETY: `cpu` is below CPU_SETSIZE; writes only into the local set.
            unsafe { libc::CPU_SET(cpu, &mut all) };
        }
        Pin::set(&all)
    }

    /// Replace the calling thread's affinity with `set`, keeping the old one.
    fn set(set: &libc::cpu_set_t) -> Pin {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes to `old`.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) }
            != 0
        {
            return Pin(None);
        }
        // SAFETY: passes a valid cpu_set_t of the stated size.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
            return Pin(None);
        }
        Pin(Some(old))
    }
}

/// CPUs configured on this machine (not `available_parallelism`, which reads the
/// calling thread's affinity, perhaps pinned).
pub fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }).unwrap_or(1)
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

/// Results of [`nested_dma`] (nanoseconds per operation, median round).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NestedDmaReport {
    /// Iterations of each measurement.
    pub iterations: u64,
    /// The floor: a REGION_WRITE to a register that starts nothing.
    pub register_write_ns: f64,
    /// A 4 KiB device → guest DMA at an IPA (no stage 1 bound).
    pub dma_ipa_ns: f64,
    /// The same DMA at an IOVA through the bound stage 1, translation cached.
    pub dma_stage1_ns: f64,
    /// INVALIDATE of [TLBI_NH_ALL, CMD_SYNC].
    pub invalidate_ns: f64,
    /// INVALIDATE of [TLBI_NH_ALL, CMD_SYNC] followed by the DMA (a full 4-level walk).
    pub invalidate_dma_ns: f64,
    /// In process, no socket: a 4 KiB read from the map table.
    pub table_read_ns: f64,
    /// In process: the same read through the bound stage 1, translation cached.
    pub stage1_read_ns: f64,
    /// In process: TLBI_NH_ALL, then the read (a full 4-level walk through the table).
    pub stage1_walk_read_ns: f64,
}

impl NestedDmaReport {
    /// What the cached stage-1 translation adds to a 4 KiB DMA.
    pub fn stage1_cost_ns(&self) -> f64 {
        self.dma_stage1_ns - self.dma_ipa_ns
    }
    /// What a walk after invalidation adds to a 4 KiB DMA.
    pub fn walk_cost_ns(&self) -> f64 {
        self.invalidate_dma_ns - self.invalidate_ns - self.dma_ipa_ns
    }
}

impl std::fmt::Display for NestedDmaReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "nested IOMMU over vfio-user ({} iterations each, median of {} rounds, one CPU)",
            self.iterations, ROUNDS
        )?;
        writeln!(
            f,
            "  REGION_WRITE, no DMA (floor)      : {:>9.0} ns",
            self.register_write_ns
        )?;
        writeln!(
            f,
            "  4 KiB DMA at an IPA               : {:>9.0} ns  ({:.2}x floor)",
            self.dma_ipa_ns,
            self.dma_ipa_ns / self.register_write_ns
        )?;
        writeln!(
            f,
            "  4 KiB DMA through stage 1 (cached): {:>9.0} ns  ({:.2}x the IPA DMA, +{:.0} ns)",
            self.dma_stage1_ns,
            self.dma_stage1_ns / self.dma_ipa_ns,
            self.stage1_cost_ns()
        )?;
        writeln!(
            f,
            "  INVALIDATE [TLBI_NH_ALL, SYNC]    : {:>9.0} ns  ({:.2}x floor)",
            self.invalidate_ns,
            self.invalidate_ns / self.register_write_ns
        )?;
        writeln!(
            f,
            "  INVALIDATE + DMA (4-level walk)   : {:>9.0} ns  (walk +{:.0} ns)",
            self.invalidate_dma_ns,
            self.walk_cost_ns()
        )?;
        writeln!(
            f,
            "  in process: 4 KiB read, map table: {:>9.0} ns",
            self.table_read_ns
        )?;
        writeln!(
            f,
            "  in process: through stage 1 (hit) : {:>9.0} ns  ({:.2}x, +{:.0} ns per translation)",
            self.stage1_read_ns,
            self.stage1_read_ns / self.table_read_ns,
            self.stage1_read_ns - self.table_read_ns
        )?;
        write!(
            f,
            "  in process: TLBI + walk + read    : {:>9.0} ns  ({:.2}x)",
            self.stage1_walk_read_ns,
            self.stage1_walk_read_ns / self.table_read_ns
        )
    }
}

/// Measure the device side of nested mode over a client/server pair: the test device's
/// 4 KiB DMA at an IPA, through the guest's bound stage 1 (IOTLB hit), and after an
/// invalidation (full walk), against a plain register write as the floor. Tables are
/// built with `nestio_iommu::smmuv3::tables` in a memfd the client maps.
pub fn nested_dma(iterations: u64) -> Result<NestedDmaReport, ProtocolBenchError> {
    let pin = Pin::current();
    let r = measure_nested(iterations);
    drop(pin);
    r
}

fn measure_nested(iterations: u64) -> Result<NestedDmaReport, ProtocolBenchError> {
    use crate::nested_iommu::NestedIommuCaps;
    use crate::testdev::reg;
    use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
    use nestio_iommu::smmuv3::memory::{MemoryError, SmmuMemory};
    use nestio_iommu::smmuv3::tables::{self, Stage1Tables, LEAF_RW};

    const RAM: u64 = 0x10_0000;
    const SIZE: u64 = 0x10_0000;
    const IOVA: u64 = 0x4000_0000;
    struct Ram(std::fs::File);
    impl SmmuMemory for Ram {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            use std::os::unix::fs::FileExt;
            let err = MemoryError {
                addr,
                len: buf.len(),
            };
            let off = addr.checked_sub(RAM).ok_or(err)?;
            self.0.read_exact_at(buf, off).map_err(|_| err)
        }
        fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
            use std::os::unix::fs::FileExt;
            let err = MemoryError {
                addr,
                len: data.len(),
            };
            let off = addr.checked_sub(RAM).ok_or(err)?;
            self.0.write_all_at(data, off).map_err(|_| err)
        }
    }

    let dev = Arc::new(TestDevice::new()?);
    let server = Arc::new(Server::new(dev, ServerConfig::default()));
    let (a, b) = UnixStream::pair()?;
    let s2 = server.clone();
    let t = std::thread::spawn(move || s2.serve_stream(b));
    let client = Client::from_stream(
        a,
        ClientConfig {
            nested_iommu: Some(NestedIommuCaps::default()),
            ..ClientConfig::default()
        },
    )?;
    let fd = nestio_dma::memfd::sealed_memfd(c"nestio-bench-nested", SIZE)?;
    let ram = Ram(std::fs::File::from(fd.try_clone()?));
    client.dma_map(DmaMapRequest {
        range: DmaRange::new(RAM, SIZE).map_err(nestio_device_model::DeviceError::from)?,
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: Arc::new(fd),
            offset: 0,
        },
    })?;
    let bad = |e: tables::TableError| {
        nestio_device_model::DeviceError::Invalid(format!("building the bench's tables: {e}"))
    };
    let mut t1 = Stage1Tables::new(RAM + 0x2000, RAM + 0x3000, 0x8000).map_err(bad)?;
    t1.map(&ram, IOVA, RAM + 0x2_0000, LEAF_RW).map_err(bad)?;
    tables::write_words(&ram, RAM + 0x1000, &tables::cd(t1.root(), 1, false))
        .map_err(|e| bad(e.into()))?;
    let regs = |addr: u64| -> Result<(), ProtocolBenchError> {
        client.region_write(1, reg::DMA_ADDR, &addr.to_le_bytes())?;
        client.region_write(1, reg::DMA_LEN, &4096u64.to_le_bytes())?;
        client.region_write(1, reg::DMA_OFF, &0u64.to_le_bytes())?;
        Ok(())
    };
    let go = 2u64.to_le_bytes();
    let cmd = |d0: u64| {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&d0.to_le_bytes());
        c
    };
    let inv = [cmd(0x10), cmd(0x46)];
    let per_round = (iterations / ROUNDS).max(1);
    let (mut floor, mut ipa, mut s1, mut invl, mut walk) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let ste = tables::ste_stage1(RAM + 0x1000);
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        for _ in 0..per_round {
            client.region_write(1, reg::DMA_LEN, &4096u64.to_le_bytes())?;
        }
        floor.push(per_op(t0, per_round));
        client.iommu_unbind()?;
        regs(RAM + 0x2_0000)?;
        let t0 = Instant::now();
        for _ in 0..per_round {
            client.region_write(1, reg::DMA_CMD, &go)?;
        }
        ipa.push(per_op(t0, per_round));
        client.iommu_bind(1, ste[0], ste[1])?;
        regs(IOVA)?;
        let t0 = Instant::now();
        for _ in 0..per_round {
            client.region_write(1, reg::DMA_CMD, &go)?;
        }
        s1.push(per_op(t0, per_round));
        let t0 = Instant::now();
        for _ in 0..per_round {
            client.iommu_invalidate(&inv)?;
        }
        invl.push(per_op(t0, per_round));
        let t0 = Instant::now();
        for _ in 0..per_round {
            client.iommu_invalidate(&inv)?;
            client.region_write(1, reg::DMA_CMD, &go)?;
        }
        walk.push(per_op(t0, per_round));
    }
    let mut status = [0u8; 8];
    client.region_read(1, reg::DMA_STATUS, &mut status)?;
    if status != [0; 8] {
        return Err(nestio_device_model::DeviceError::Invalid(format!(
            "the benchmark's DMA failed (status {})",
            u64::from_le_bytes(status)
        ))
        .into());
    }
    drop(client);
    let _ = t.join();

    // In process: the decorator itself over a map table of the same memory.
    use nestio_dma::DmaSpace;
    let table = Arc::new(nestio_dma::MapTable::default());
    table
        .map(DmaMapRequest {
            range: DmaRange::new(RAM, SIZE).map_err(nestio_device_model::DeviceError::from)?,
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: Arc::new(ram.0.try_clone()?.into()),
                offset: 0,
            },
        })
        .map_err(nestio_device_model::DeviceError::from)?;
    let stage1 = nestio_iommu::smmuv3::stage1_dma::Stage1Dma::bind(table.clone(), 1, ste)
        .map_err(|e| nestio_device_model::DeviceError::Invalid(format!("bench stage 1: {e}")))?;
    let mut buf = vec![0u8; 4096];
    let inproc = per_round.saturating_mul(4);
    let (mut tr, mut sr, mut wr) = (Vec::new(), Vec::new(), Vec::new());
    let dma_err = |e: nestio_dma::DmaError| nestio_device_model::DeviceError::from(e);
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        for _ in 0..inproc {
            table.read(RAM + 0x2_0000, &mut buf).map_err(dma_err)?;
        }
        tr.push(per_op(t0, inproc));
        let t0 = Instant::now();
        for _ in 0..inproc {
            stage1.read(IOVA, &mut buf).map_err(dma_err)?;
        }
        sr.push(per_op(t0, inproc));
        let t0 = Instant::now();
        for _ in 0..inproc {
            stage1.command([0x10, 0]).map_err(|e| {
                nestio_device_model::DeviceError::Invalid(format!("bench TLBI: {e}"))
            })?;
            stage1.read(IOVA, &mut buf).map_err(dma_err)?;
        }
        wr.push(per_op(t0, inproc));
    }
    Ok(NestedDmaReport {
        iterations: per_round * ROUNDS,
        register_write_ns: median(floor),
        dma_ipa_ns: median(ipa),
        dma_stage1_ns: median(s1),
        invalidate_ns: median(invl),
        invalidate_dma_ns: median(walk),
        table_read_ns: median(tr),
        stage1_read_ns: median(sr),
        stage1_walk_read_ns: median(wr),
    })
}
