//! A whole nesting stack in one process: the device's level 0 served on a socket, one
//! [`ExportedDevice`] per intermediate level served over vfio-user, and the innermost
//! level's client; plus [`bench_depths`], which measures how costs grow with depth.
//!
//! Memory layout (all levels share one memfd, as nested guests' RAM is a piece of their
//! parent's RAM): level k's RAM is GPA `g_k..g_k+r_k` at file offsets `0..r_k`, where the
//! innermost level's `g` is [`StackConfig::inner_gpa`] and each level further out adds
//! [`StackConfig::step`] (`g_k = g_{k+1} + step`), and each level further in loses
//! [`StackConfig::shrink`] bytes of RAM (`r_{k+1} = r_k - shrink`). The child's window is
//! therefore `[step, g_k + r_{k+1})` of its parent: a non-trivial translation, and the top
//! `shrink` bytes of every parent's RAM are outside the child's reach.
//!
//! Each level is connected by a socketpair; [`NestedStack::kill_level`] closes a level's
//! socket and drops its exporter (a level going away). Depth d means the innermost
//! guest is level d: depth 1 is a plain client of the device, depth 2 has one exporter.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nestio_device_model::{pci_index, VfioDevice};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

use crate::direct::{BarChannelHandle, BarChannels, DirectBars, DirectError};
use crate::export::{ExportConfig, ExportError, ExportedDevice, LevelRam, RamRegion};
use crate::level::{LevelError, LevelId, Window};

/// Errors building a stack or benchmarking it.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The layout does not fit.
    #[error("bad stack layout: {0}; give more RAM or fewer levels")]
    Layout(String),
    /// A window is malformed.
    #[error(transparent)]
    Level(#[from] LevelError),
    /// An exporter could not be built.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A socket or memfd failed.
    #[error("I/O error building the stack: {0}")]
    Io(#[from] std::io::Error),
    /// A vfio-user connection failed.
    #[error("cannot connect level {level}: {reason}")]
    Connect {
        /// Level.
        level: u32,
        /// Why.
        reason: String,
    },
    /// The BAR channel could not be set up.
    #[error(transparent)]
    Direct(#[from] DirectError),
    /// The caller's workload failed.
    #[error("benchmark workload at depth {depth} failed: {reason}")]
    Workload {
        /// Depth.
        depth: u32,
        /// Why.
        reason: String,
    },
}

/// Layout of a [`NestedStack`].
#[derive(Debug, Clone, Copy)]
pub struct StackConfig {
    /// Level 1's RAM size (the whole memfd).
    pub ram_size: u64,
    /// GPA of file offset 0 in the innermost level.
    pub inner_gpa: u64,
    /// GPA shift between a level and its child.
    pub step: u64,
    /// RAM each level has less than its parent.
    pub shrink: u64,
    /// Level 1's exporter serves device DMA by copy instead of passing its RAM fd.
    pub no_shared_memory: bool,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            ram_size: 8 << 20,
            inner_gpa: 0x10_0000,
            step: 1 << 20,
            shrink: 1 << 20,
            no_shared_memory: false,
        }
    }
}

struct LevelThread {
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

/// A device passed through `depth - 1` exporters. See the module documentation.
pub struct NestedStack {
    ram: Arc<OwnedFd>,
    client: Option<Arc<Client>>,
    exporters: Vec<Option<Arc<ExportedDevice>>>,
    levels: Vec<LevelThread>,
    regions: Vec<RamRegion>,
    windows: Vec<Window>,
    depth: u32,
    /// The innermost level's device with a BAR channel, and the channel's handle (held
    /// by level 1, the owner of the device's session).
    direct: Option<(Arc<DirectBars>, BarChannelHandle)>,
}

fn memfd(size: u64) -> Result<Arc<OwnedFd>, StackError> {
    Ok(Arc::new(nestio_dma::memfd::sealed_memfd(
        c"nestio-level1-ram",
        size,
    )?))
}

impl NestedStack {
    /// Connect to the device served at `device_socket` (level 0) and pass it down to
    /// level `depth` (>= 1) through `depth - 1` exporters.
    pub fn build(
        device_socket: &Path,
        depth: u32,
        cfg: StackConfig,
    ) -> Result<NestedStack, StackError> {
        Self::build_with(device_socket, depth, cfg, None)
    }

    /// [`NestedStack::build`]; with `channels` (the device side's [`BarChannels`]) and
    /// depth >= 2, level 1 opens a BAR channel and the innermost level's device
    /// ([`NestedStack::device`]) sends its BAR accesses over it: one hop at any depth,
    /// while configuration space, interrupts and DMA maps still pass every level.
    pub fn build_with(
        device_socket: &Path,
        depth: u32,
        cfg: StackConfig,
        channels: Option<&BarChannels>,
    ) -> Result<NestedStack, StackError> {
        if depth == 0 || depth > crate::level::MAX_DEPTH {
            return Err(StackError::Layout(format!("depth {depth} out of 1..=64")));
        }
        let d = u64::from(depth);
        cfg.shrink
            .checked_mul(d - 1)
            .filter(|s| *s < cfg.ram_size)
            .ok_or_else(|| StackError::Layout("RAM too small for the shrink".into()))?;
        let ram = memfd(cfg.ram_size)?;
        // Level k (1-based) GPA of file offset 0 and RAM size.
        let g = |k: u64| -> Option<u64> { cfg.step.checked_mul(d - k)?.checked_add(cfg.inner_gpa) };
        let r = |k: u64| cfg.ram_size - cfg.shrink * (k - 1);
        let mut regions = Vec::new();
        for k in 1..=d {
            let gk = g(k).ok_or_else(|| StackError::Layout("GPA overflow".into()))?;
            regions.push(RamRegion::new(ram.clone(), gk, r(k), 0)?);
        }
        let mut windows = Vec::new();
        for k in 1..d {
            // Child k+1 in level k: [g_k - g_{k+1}, g_k + r_{k+1}).
            let gk = regions[(k - 1) as usize].gpa();
            let gc = regions[k as usize].gpa();
            // g_k >= g_{k+1} by construction; the end is checked against overflow.
            let base = gk - gc;
            let size = gk
                .checked_add(r(k + 1))
                .map(|end| end - base)
                .ok_or_else(|| StackError::Layout("window end overflows".into()))?;
            windows.push(Window::new(base, size)?);
        }
        let stream = UnixStream::connect(device_socket).map_err(|e| StackError::Connect {
            level: 1,
            reason: format!("{}: {e}", device_socket.display()),
        })?;
        let mut client = Arc::new(
            Client::from_stream(stream, ClientConfig::default()).map_err(|e| {
                StackError::Connect {
                    level: 1,
                    reason: e.to_string(),
                }
            })?,
        );
        let mut exporters = Vec::new();
        let mut levels = Vec::new();
        for k in 1..d {
            let exp = Arc::new(ExportedDevice::new(
                client,
                LevelRam::Shared(regions[(k - 1) as usize].clone()),
                ExportConfig {
                    window: windows[(k - 1) as usize],
                    no_shared_memory: cfg.no_shared_memory && k == 1,
                    child: LevelId::from_raw(k + 1).unwrap_or(LevelId::HOST),
                },
            )?);
            let (srv_end, cli_end) = UnixStream::pair()?;
            let keep = srv_end.try_clone()?;
            let dev: Arc<dyn VfioDevice> = exp.clone();
            let thread = std::thread::Builder::new()
                .name(format!("nestio-level{k}-export"))
                .spawn(move || {
                    let server = Server::new(dev, ServerConfig::default());
                    if let Err(e) = server.serve_stream(srv_end) {
                        tracing::warn!(level = k, error = %e, "export session ended with an error");
                    }
                })?;
            levels.push(LevelThread {
                stream: keep,
                thread: Some(thread),
            });
            exporters.push(Some(exp));
            client = Arc::new(
                Client::from_stream(cli_end, ClientConfig::default()).map_err(|e| {
                    StackError::Connect {
                        level: (k + 1) as u32,
                        reason: e.to_string(),
                    }
                })?,
            );
        }
        let direct = match channels {
            Some(ch) if depth >= 2 => {
                let (near, handle) = ch.open()?;
                let dev: Arc<dyn VfioDevice> = client.clone();
                Some((Arc::new(DirectBars::new(dev, near)?), handle))
            }
            _ => None,
        };
        Ok(NestedStack {
            ram,
            client: Some(client),
            exporters,
            levels,
            regions,
            windows,
            depth,
            direct,
        })
    }

    /// The innermost level's device.
    pub fn client(&self) -> Arc<Client> {
        self.client.clone().expect("client present until drop")
    }
    /// The innermost level's device as its guest driver uses it: the client, or the
    /// client with a BAR channel ([`NestedStack::build_with`]).
    pub fn device(&self) -> Arc<dyn VfioDevice> {
        match &self.direct {
            Some((d, _)) => d.clone(),
            None => self.client(),
        }
    }
    /// BAR accesses the innermost level sent over its BAR channel (None without one).
    pub fn bar_channel_accesses(&self) -> Option<u64> {
        self.direct.as_ref().map(|(d, _)| d.channel_accesses())
    }
    /// True when the innermost level has a BAR channel.
    pub fn has_bar_channel(&self) -> bool {
        self.direct.is_some()
    }
    /// Depth of the innermost level.
    pub fn depth(&self) -> u32 {
        self.depth
    }
    /// The shared RAM file (level 1's RAM).
    pub fn ram(&self) -> &Arc<OwnedFd> {
        &self.ram
    }
    /// RAM region of `level` (1..=depth).
    pub fn region(&self, level: u32) -> Option<&RamRegion> {
        self.regions.get(level.checked_sub(1)? as usize)
    }
    /// Window of `level` (2..=depth) in its parent.
    pub fn window(&self, level: u32) -> Option<Window> {
        self.windows.get(level.checked_sub(2)? as usize).copied()
    }
    /// The exporter run by `level` (1..depth) for its child.
    pub fn exporter(&self, level: u32) -> Option<&Arc<ExportedDevice>> {
        self.exporters.get(level.checked_sub(1)? as usize)?.as_ref()
    }
    /// `level` (1..depth) goes away: its socket to the child closes and its exporter
    /// (with its connection to the level below) is dropped.
    pub fn kill_level(&mut self, level: u32) {
        let Some(i) = level.checked_sub(1).map(|i| i as usize) else {
            return;
        };
        if i == 0 {
            // Level 1 owned the device's session: its BAR channel is revoked with it.
            self.direct.take();
        }
        if let Some(l) = self.levels.get_mut(i) {
            let _ = l.stream.shutdown(std::net::Shutdown::Both);
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(e) = self.exporters.get_mut(i) {
            e.take();
        }
    }
}

impl Drop for NestedStack {
    fn drop(&mut self) {
        self.direct.take();
        self.client.take();
        for i in (0..self.levels.len()).rev() {
            self.kill_level(i as u32 + 1);
        }
    }
}

/// One row of [`bench_depths`].
#[derive(Debug, Clone, Copy)]
pub struct DepthRow {
    /// Depth of the innermost level.
    pub depth: u32,
    /// Best batch mean of one workload round trip (for the e1000: an ICMP echo), ns.
    pub round_trip_ns: f64,
    /// Best batch mean of one 4-byte config-space read, ns (always mediated by every
    /// level).
    pub region_access_ns: f64,
    /// Best batch mean of one 4-byte register read (BAR 0, offset 0), ns, when the
    /// device has a readable BAR 0: the access a BAR channel carries.
    pub bar_access_ns: Option<f64>,
    /// `bar_access_ns` over the first row's.
    pub bar_ratio: Option<f64>,
    /// `round_trip_ns` over the first row's.
    pub round_trip_ratio: f64,
    /// `region_access_ns` over the first row's.
    pub region_ratio: f64,
    /// Trapped region accesses per round trip (counted at level 1's exporter plus the
    /// innermost level's BAR channel, so known from depth 2 on; depth-1 rows take the
    /// value of the first deeper row).
    pub accesses_per_round_trip: Option<f64>,
    /// What is left of a round trip without its region accesses: DMA, interrupts, the
    /// backend (`round_trip_ns - accesses_per_round_trip * region_access_ns`).
    pub dma_irq_ns: Option<f64>,
    /// `dma_irq_ns` over the first row's.
    pub dma_irq_ratio: Option<f64>,
}

fn best_mean(
    batches: u32,
    per_batch: u32,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let mut best = f64::INFINITY;
    for _ in 0..batches.max(1) {
        let t = Instant::now();
        for _ in 0..per_batch.max(1) {
            f()?;
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(per_batch.max(1));
        best = best.min(ns);
    }
    Ok(best)
}

/// A workload run once per measured round trip.
pub type RoundTrip = Box<dyn FnMut() -> Result<(), String>>;

/// Measure, at each of `depths`, the caller's round trip (set up by `workload` on the
/// stack's innermost device: e.g. attach a guest driver and return a closure doing one
/// ping) and the cost of a trapped region access (config-space read), `iterations` per
/// batch, best of 3 batches; prints and returns the rows with ratios to the first depth.
pub fn bench_depths(
    device_socket: &Path,
    depths: &[u32],
    iterations: u32,
    cfg: StackConfig,
    workload: &mut dyn FnMut(&NestedStack) -> Result<RoundTrip, String>,
) -> Result<Vec<DepthRow>, StackError> {
    bench_depths_rounds(device_socket, depths, iterations, 1, cfg, workload)
}

/// [`bench_depths`] repeated `rounds` times, the depths interleaved within each round
/// (so drift on a shared machine hits every depth alike), keeping each depth's best
/// round trip and best region access over all rounds.
pub fn bench_depths_rounds(
    device_socket: &Path,
    depths: &[u32],
    iterations: u32,
    rounds: u32,
    cfg: StackConfig,
    workload: &mut dyn FnMut(&NestedStack) -> Result<RoundTrip, String>,
) -> Result<Vec<DepthRow>, StackError> {
    let mut all = Vec::new();
    for _ in 0..rounds.max(1) {
        all.push(measure_depths(
            device_socket,
            depths,
            iterations,
            cfg,
            workload,
        )?);
    }
    let rows = best_rows(&all);
    print_rows(&rows);
    Ok(rows)
}

/// One unprinted round of [`bench_depths`]: a row per depth, ratios to the first.
pub fn measure_depths(
    device_socket: &Path,
    depths: &[u32],
    iterations: u32,
    cfg: StackConfig,
    workload: &mut dyn FnMut(&NestedStack) -> Result<RoundTrip, String>,
) -> Result<Vec<DepthRow>, StackError> {
    measure_depths_with(device_socket, depths, iterations, cfg, None, workload)
}

/// [`measure_depths`] with stacks built by [`NestedStack::build_with`] (`channels`:
/// BAR channels from depth 2 on).
pub fn measure_depths_with(
    device_socket: &Path,
    depths: &[u32],
    iterations: u32,
    cfg: StackConfig,
    channels: Option<&BarChannels>,
    workload: &mut dyn FnMut(&NestedStack) -> Result<RoundTrip, String>,
) -> Result<Vec<DepthRow>, StackError> {
    let mut raw = Vec::with_capacity(depths.len());
    let mut bars = Vec::with_capacity(depths.len());
    for &depth in depths {
        let (r, bar) = measure_depth(device_socket, depth, iterations, cfg, channels, workload)?;
        raw.push(r);
        bars.push(bar);
    }
    Ok(finish_rows_bar(depths, &raw, &bars))
}

/// The best of several rounds of [`measure_depths`] over the same depths: per depth the
/// lowest round trip and the lowest region access, with the ratios recomputed.
pub fn best_rows(rounds: &[Vec<DepthRow>]) -> Vec<DepthRow> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    let depths: Vec<u32> = first.iter().map(|r| r.depth).collect();
    let mut best: Vec<(f64, f64, Option<f64>)> =
        vec![(f64::INFINITY, f64::INFINITY, None); depths.len()];
    let mut bars: Vec<Option<f64>> = vec![None; depths.len()];
    for round in rounds {
        for ((slot, bar), r) in best.iter_mut().zip(bars.iter_mut()).zip(round) {
            slot.0 = slot.0.min(r.round_trip_ns);
            slot.1 = slot.1.min(r.region_access_ns);
            slot.2 = slot.2.or(r.accesses_per_round_trip);
            *bar = match (*bar, r.bar_access_ns) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    finish_rows_bar(&depths, &best, &bars)
}

/// One depth: (best round trip ns, best region access ns, trapped accesses per trip).
#[allow(clippy::type_complexity)]
fn measure_depth(
    device_socket: &Path,
    depth: u32,
    iterations: u32,
    cfg: StackConfig,
    channels: Option<&BarChannels>,
    workload: &mut dyn FnMut(&NestedStack) -> Result<RoundTrip, String>,
) -> Result<((f64, f64, Option<f64>), Option<f64>), StackError> {
    let stack = NestedStack::build_with(device_socket, depth, cfg, channels)?;
    let werr = |reason: String| StackError::Workload { depth, reason };
    let mut rt = workload(&stack).map_err(werr)?;
    for _ in 0..iterations.clamp(1, 10) {
        rt().map_err(werr)?; // warm up
    }
    // Trapped region accesses: those level 1 forwarded plus those the BAR channel took
    // past every level.
    let count = |st: &NestedStack| {
        st.exporter(1)
            .map(|e| e.stats())
            .map(|s| s.region_reads + s.region_writes + st.bar_channel_accesses().unwrap_or(0))
    };
    let before = count(&stack);
    let round_trip_ns = best_mean(3, iterations, &mut rt).map_err(werr)?;
    let accesses = match (before, count(&stack)) {
        (Some(b), Some(a)) => {
            Some(a.saturating_sub(b) as f64 / (3.0 * f64::from(iterations.max(1))))
        }
        _ => None,
    };
    drop(rt);
    let dev = stack.device();
    let mut b = [0u8; 4];
    let region_access_ns = best_mean(3, iterations.saturating_mul(4), || {
        dev.region_read(pci_index::CONFIG, 0, &mut b)
            .map_err(|e| e.to_string())
    })
    .map_err(werr)?;
    let bar0_readable = dev
        .region_info(pci_index::BAR0)
        .is_ok_and(|r| r.size >= 4 && r.flags & nestio_device_model::region_flags::READ != 0);
    let bar_access_ns = if bar0_readable {
        Some(
            best_mean(3, iterations.saturating_mul(4), || {
                dev.region_read(pci_index::BAR0, 0, &mut b)
                    .map_err(|e| e.to_string())
            })
            .map_err(werr)?,
        )
    } else {
        None
    };
    Ok(((round_trip_ns, region_access_ns, accesses), bar_access_ns))
}

/// Rows with ratios to the first depth.
#[cfg(test)]
fn finish_rows(depths: &[u32], best: &[(f64, f64, Option<f64>)]) -> Vec<DepthRow> {
    finish_rows_bar(depths, best, &vec![None; best.len()])
}

/// Rows with ratios to the first depth; `bars[i]`: depth `i`'s register read, if
/// measured (then it, not the config read, is the cost of the trapped accesses of a
/// round trip).
fn finish_rows_bar(
    depths: &[u32],
    best: &[(f64, f64, Option<f64>)],
    bars: &[Option<f64>],
) -> Vec<DepthRow> {
    let mut rows: Vec<DepthRow> = Vec::new();
    let bar0 = bars.first().copied().flatten();
    for ((&depth, &(round_trip_ns, region_access_ns, accesses)), &bar) in
        depths.iter().zip(best).zip(bars)
    {
        let (rt0, ra0) = rows
            .first()
            .map(|r| (r.round_trip_ns, r.region_access_ns))
            .unwrap_or((round_trip_ns, region_access_ns));
        rows.push(DepthRow {
            depth,
            round_trip_ns,
            region_access_ns,
            bar_access_ns: bar,
            bar_ratio: bar.zip(bar0).map(|(b, b0)| b / b0),
            round_trip_ratio: round_trip_ns / rt0,
            region_ratio: region_access_ns / ra0,
            accesses_per_round_trip: accesses,
            dma_irq_ns: None,
            dma_irq_ratio: None,
        });
    }
    // Rows without an exporter (depth 1) run the same workload: borrow the count.
    let known = rows.iter().find_map(|r| r.accesses_per_round_trip);
    let mut base: Option<f64> = None;
    for r in &mut rows {
        r.accesses_per_round_trip = r.accesses_per_round_trip.or(known);
        let access = r.bar_access_ns.unwrap_or(r.region_access_ns);
        r.dma_irq_ns = r
            .accesses_per_round_trip
            .map(|a| (r.round_trip_ns - a * access).max(0.0));
        if base.is_none() {
            base = r.dma_irq_ns;
        }
        r.dma_irq_ratio = match (r.dma_irq_ns, base) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
    }
    rows
}

/// Print one line per row: times, ratios to the first row, and the DMA+irq remainder.
pub fn print_rows(rows: &[DepthRow]) {
    for r in rows {
        println!(
            "depth {}: round trip {:.1} us (x{:.2}), register (BAR 0) read {} (x{}), \
             config read {:.1} us (x{:.2}), \
             {:.1} region accesses per round trip, DMA+irq+backend {} (x{})",
            r.depth,
            r.round_trip_ns / 1e3,
            r.round_trip_ratio,
            r.bar_access_ns
                .map(|v| format!("{:.1} us", v / 1e3))
                .unwrap_or_else(|| "n/a".into()),
            r.bar_ratio
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "n/a".into()),
            r.region_access_ns / 1e3,
            r.region_ratio,
            r.accesses_per_round_trip.unwrap_or(f64::NAN),
            r.dma_irq_ns
                .map(|v| format!("{:.1} us", v / 1e3))
                .unwrap_or_else(|| "n/a".into()),
            r.dma_irq_ratio
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "n/a".into()),
        );
    }
}

/// A fresh socket path in the temp directory for a level-0 server.
pub fn socket_path(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("nestio-{tag}-{}-{n}.sock", std::process::id()))
}

/// How long [`bench_depths`] callers should allow one round trip (generous: CI is slow).
pub const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn row(depth: u32, rt: f64, ra: f64, acc: Option<f64>) -> DepthRow {
        finish_rows(&[depth], &[(rt, ra, acc)])[0]
    }

    #[test]
    fn best_rows_keeps_each_depths_minimum_and_recomputes_ratios() {
        let r1 = vec![row(1, 100.0, 10.0, None), row(2, 300.0, 20.0, Some(2.0))];
        let r2 = vec![row(1, 80.0, 12.0, None), row(2, 400.0, 16.0, Some(2.0))];
        let b = best_rows(&[r1, r2]);
        assert_eq!(b.iter().map(|r| r.depth).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((b[0].round_trip_ns, b[0].region_access_ns), (80.0, 10.0));
        assert_eq!((b[1].round_trip_ns, b[1].region_access_ns), (300.0, 16.0));
        assert_eq!(b[1].round_trip_ratio, 300.0 / 80.0);
        assert_eq!(b[1].region_ratio, 1.6);
        // Depth 1 borrows depth 2's access count; the remainder is the DMA+irq part.
        assert_eq!(b[0].accesses_per_round_trip, Some(2.0));
        assert_eq!(b[0].dma_irq_ns, Some(60.0));
        assert_eq!(b[1].dma_irq_ns, Some(268.0));
        assert_eq!(b[1].dma_irq_ratio, Some(268.0 / 60.0));
        assert!(best_rows(&[]).is_empty());
    }
}
