//! Map/unmap churn of a [`MapTable`] at scale (feature `bench`; `nestio bench --only dma`).
//!
//! A shadowing vIOMMU turns every guest IOMMU page-table update into a DMA map or unmap,
//! so a table must take hundreds of thousands of page-sized mappings of one file (guest
//! RAM). [`churn`] builds `n` live 4 KiB mappings of one sealed memfd, each DMA_MAP with
//! its own fd as a vfio-user server receives it, reads one word through each (once to
//! fault the pages in, then timed), unmaps
//! them all, and peels a large mapping page by page with [`MapTable::unmap_split`]. It
//! reports rates, and the fds, VMAs and resident memory held at `n` live mappings.
//!
//! This machine is shared and noisy, so every rate is also given as a ratio to a floor
//! measured in the same run: the least any table does for the same work (receiving the
//! fd — a dup and a close — plus a `BTreeMap` insert, remove, or lookup and a read of the
//! same word through a plain mapping of the file, for the same count),
//! and `mmap` + `munmap` of one page of the file (what a table with one mmap per mapping
//! pays per map/unmap pair, before fds and `vm.max_map_count` stop it near 65530).
//! Nothing here asserts a time.

use std::collections::BTreeMap;
use std::fmt;
use std::hint::black_box;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use crate::memfd::sealed_memfd;
use crate::{DmaBacking, DmaError, DmaMapRequest, DmaRange, DmaSpaceExt, MapTable, Prot};

const PAGE: u64 = 4096;

/// Why the churn measurement could not run.
#[derive(Debug, thiserror::Error)]
pub enum ChurnError {
    /// Setting up the memory file or reading `/proc/self` failed.
    #[error("churn benchmark setup: {what}: {source}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The table refused an operation the benchmark needs.
    #[error("churn benchmark: the map table refused {what}: {source}")]
    Table {
        /// The operation.
        what: &'static str,
        /// The table's error.
        source: DmaError,
    },
    /// A count of zero or one too large for the address space.
    #[error("churn benchmark: {0} maps is not a usable count (1 ..= 2^40)")]
    Count(u64),
}

/// What [`churn`] measured.
#[derive(Debug, Clone)]
pub struct ChurnReport {
    /// Live mappings at the peak.
    pub maps: u64,
    /// Time for all maps, exact unmaps, one-word reads, split unmaps.
    pub map: Duration,
    /// See `map`.
    pub unmap: Duration,
    /// See `map`.
    pub access: Duration,
    /// See `map`.
    pub split: Duration,
    /// The last unmap of the file: the backing's munmap (of every page the reads
    /// touched) and close.
    pub release: Duration,
    /// Floor for a map: fd dup + close + `BTreeMap` insert, per `maps`.
    pub floor_insert: Duration,
    /// Floor for an unmap: `BTreeMap` remove, per `maps`.
    pub floor_remove: Duration,
    /// Floor for a split unmap: the same peel on a bare `BTreeMap` of ranges.
    pub floor_split: Duration,
    /// Floor for an access: `BTreeMap` lookup + 8-byte read of the same word of the file
    /// through one plain mapping of it, per `maps`.
    pub floor_lookup: Duration,
    /// One `mmap` + `munmap` of a page of the file, per `maps` (extrapolated).
    pub mmap_pair: Duration,
    /// Fds this process held more at `maps` live mappings than before.
    pub fds_held: i64,
    /// VMAs (lines of `/proc/self/maps`) more at `maps` live mappings.
    pub vmas_added: i64,
    /// Resident memory growth at `maps` live mappings, bytes.
    pub rss_growth: i64,
    /// Resident memory growth of the floor `BTreeMap` of `maps` entries, bytes.
    pub floor_rss_growth: i64,
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> ChurnError {
    move |source| ChurnError::Setup { what, source }
}

fn table(what: &'static str) -> impl FnOnce(DmaError) -> ChurnError {
    move |source| ChurnError::Table { what, source }
}

fn count_fds() -> Result<i64, ChurnError> {
    Ok(std::fs::read_dir("/proc/self/fd")
        .map_err(setup("listing /proc/self/fd"))?
        .count() as i64)
}

fn count_vmas() -> Result<i64, ChurnError> {
    Ok(std::fs::read_to_string("/proc/self/maps")
        .map_err(setup("reading /proc/self/maps"))?
        .lines()
        .count() as i64)
}

fn rss_bytes() -> Result<i64, ChurnError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(setup("reading /proc/self/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .unwrap_or(0);
    Ok(kib * 1024)
}

/// Measure churn at `maps` live 4 KiB mappings of one memfd (module documentation),
/// `rounds` times, keeping the best time of each measurement and floor (memory and fd
/// counts come from the first round, on a fresh heap). The table is made with a limit
/// of `maps`.
pub fn churn(maps: u64, rounds: u32) -> Result<ChurnReport, ChurnError> {
    if maps == 0 || maps > 1 << 40 {
        return Err(ChurnError::Count(maps));
    }
    let mut best = round(maps)?;
    for _ in 1..rounds {
        let r = round(maps)?;
        for (b, r) in [
            (&mut best.map, r.map),
            (&mut best.unmap, r.unmap),
            (&mut best.access, r.access),
            (&mut best.split, r.split),
            (&mut best.release, r.release),
            (&mut best.floor_insert, r.floor_insert),
            (&mut best.floor_remove, r.floor_remove),
            (&mut best.floor_split, r.floor_split),
            (&mut best.floor_lookup, r.floor_lookup),
            (&mut best.mmap_pair, r.mmap_pair),
        ] {
            *b = (*b).min(r);
        }
    }
    Ok(best)
}

fn round(maps: u64) -> Result<ChurnReport, ChurnError> {
    let mem = sealed_memfd(c"nestio-churn", maps * PAGE).map_err(setup("memfd"))?;
    let order = |i: u64| (i.wrapping_mul(0x9e37_79b9) % maps) * PAGE; // a scattered order

    // The floor: receive the fd (dup + close) and insert, then look up, then remove.
    let rss_f0 = rss_bytes()?;
    let mut floor: BTreeMap<u64, (u64, u64, u64, Arc<()>)> = BTreeMap::new();
    let token = Arc::new(());
    let t0 = Instant::now();
    for i in 0..maps {
        let fd = mem.try_clone().map_err(setup("dup"))?;
        floor.insert(
            i * PAGE,
            (PAGE, i * PAGE, fd.as_raw_fd() as u64, token.clone()),
        );
        drop(fd);
    }
    let floor_insert = t0.elapsed();
    let floor_rss_growth = rss_bytes()? - rss_f0;
    // The lookup floor reads the same scattered words of the same file, through one raw
    // mapping of it (first pass faults the pages in, second is timed).
    let whole = MmapRegion::<()>::build(
        Some(FileOffset::new(
            std::fs::File::from(mem.try_clone().map_err(setup("dup"))?),
            0,
        )),
        usize::try_from(maps * PAGE).map_err(|_| ChurnError::Count(maps))?,
        libc::PROT_READ,
        libc::MAP_SHARED,
    )
    .map_err(|e| setup("mmap")(std::io::Error::other(e.to_string())))?;
    let floor_read = |iova: u64| -> Option<u64> {
        let (&start, v) = floor.range(..=iova).next_back()?;
        let at = (iova - start + v.1) as usize;
        whole.as_volatile_slice().read_obj::<u64>(at).ok()
    };
    for i in 0..maps {
        black_box(floor_read(order(i) + 8));
    }
    let t0 = Instant::now();
    for i in 0..maps {
        black_box(floor_read(order(i) + 8));
    }
    let floor_lookup = t0.elapsed();
    drop(whole);
    let t0 = Instant::now();
    for i in 0..maps {
        black_box(floor.remove(&(i * PAGE)));
    }
    let floor_remove = t0.elapsed();
    drop(floor);
    // The split floor: the same page-by-page peel on a bare tree of (start -> length,
    // file offset): find the containing range, remove it, insert what is left of it.
    let mut ranges: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    ranges.insert(0, (maps * PAGE, 0));
    let t0 = Instant::now();
    for i in 0..maps {
        let a = order(i);
        let Some((&start, &(len, off))) = ranges.range(..=a).next_back() else {
            continue;
        };
        ranges.remove(&start);
        if a > start {
            ranges.insert(start, (a - start, off));
        }
        let end = start + len;
        if a + PAGE < end {
            ranges.insert(a + PAGE, (end - a - PAGE, off + (a + PAGE - start)));
        }
    }
    let floor_split = t0.elapsed();
    black_box(ranges.len());
    drop(ranges);
    // Hand the floor's freed heap back to the system, so the table's growth below is not
    // hidden by reuse of it.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }

    // What one mmap per mapping pays: mmap + munmap of one page (sampled).
    let samples = maps.min(20_000);
    let t0 = Instant::now();
    for i in 0..samples {
        // SAFETY: a fresh shared mapping of one page of our own memfd, checked, and
        // unmapped right away; nothing else refers to it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                (order(i)) as libc::off_t,
            );
            if p == libc::MAP_FAILED {
                return Err(setup("mmap")(std::io::Error::last_os_error()));
            }
            libc::munmap(p, PAGE as usize);
        }
    }
    let mmap_pair = t0.elapsed().mul_f64(maps as f64 / samples as f64);

    // The table.
    let limit = usize::try_from(maps + 1).map_err(|_| ChurnError::Count(maps))?;
    let t = MapTable::new(limit);
    let (fds0, vmas0, rss0) = (count_fds()?, count_vmas()?, rss_bytes()?);
    let t0 = Instant::now();
    for i in 0..maps {
        let fd: Arc<OwnedFd> = Arc::new(mem.try_clone().map_err(setup("dup"))?);
        t.map(DmaMapRequest {
            range: DmaRange::new(i * PAGE, PAGE).map_err(table("a range"))?,
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd,
                offset: i * PAGE,
            },
        })
        .map_err(table("a map"))?;
    }
    let map = t0.elapsed();
    let (fds1, vmas1, rss1) = (count_fds()?, count_vmas()?, rss_bytes()?);
    // A first pass faults the file's pages into the mmap (a kernel cost paid once per
    // page, not per access); the second is timed.
    for i in 0..maps {
        black_box(t.read_u64(order(i) + 8).map_err(table("a read"))?);
    }
    let t0 = Instant::now();
    for i in 0..maps {
        black_box(t.read_u64(order(i) + 8).map_err(table("a read"))?);
    }
    let access = t0.elapsed();
    // A sentinel mapping keeps the file's backing alive through the timed unmaps, so
    // they measure the table, and the one-time teardown of the backing (munmap of all
    // the pages the reads faulted in) is timed on its own.
    let sentinel = DmaRange::new(1 << 52, PAGE).map_err(table("a range"))?;
    t.map(DmaMapRequest {
        range: sentinel,
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: Arc::new(mem.try_clone().map_err(setup("dup"))?),
            offset: 0,
        },
    })
    .map_err(table("the sentinel map"))?;
    let t0 = Instant::now();
    for i in 0..maps {
        t.unmap(i * PAGE, PAGE).map_err(table("an unmap"))?;
    }
    let unmap = t0.elapsed();

    // A vIOMMU tearing a large mapping down page by page.
    t.map(DmaMapRequest {
        range: DmaRange::new(0, maps * PAGE).map_err(table("a range"))?,
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: Arc::new(mem.try_clone().map_err(setup("dup"))?),
            offset: 0,
        },
    })
    .map_err(table("the large map"))?;
    let t0 = Instant::now();
    for i in 0..maps {
        let r = DmaRange::new(order(i), PAGE).map_err(table("a range"))?;
        t.unmap_split(r).map_err(table("a split unmap"))?;
    }
    let split = t0.elapsed();
    let t0 = Instant::now();
    t.unmap(sentinel.start(), PAGE)
        .map_err(table("the sentinel unmap"))?;
    let release = t0.elapsed();
    if !t.is_empty() {
        return Err(ChurnError::Table {
            what: "to be emptied by split unmaps",
            source: DmaError::Invalid(format!("{} mappings left", t.len())),
        });
    }

    Ok(ChurnReport {
        maps,
        map,
        unmap,
        access,
        split,
        release,
        floor_insert,
        floor_remove,
        floor_split,
        floor_lookup,
        mmap_pair,
        fds_held: fds1 - fds0,
        vmas_added: vmas1 - vmas0,
        rss_growth: rss1 - rss0,
        floor_rss_growth,
    })
}

fn per_sec(n: u64, d: Duration) -> String {
    let r = n as f64 / d.as_secs_f64().max(1e-9);
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.0} k/s", r / 1e3)
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.maps;
        writeln!(
            f,
            "DMA map table churn: {n} live 4 KiB maps of one sealed memfd (a fresh fd per DMA_MAP; best of each over the rounds)"
        )?;
        writeln!(
            f,
            "  map          {:>10}  {:5.2}x the floor (fd dup+close + BTreeMap insert), {:4.2}x one mmap+munmap of a page",
            per_sec(n, self.map),
            ratio(self.map, self.floor_insert),
            ratio(self.map, self.mmap_pair),
        )?;
        writeln!(
            f,
            "  unmap        {:>10}  {:5.2}x the floor (BTreeMap remove)",
            per_sec(n, self.unmap),
            ratio(self.unmap, self.floor_remove),
        )?;
        writeln!(
            f,
            "  8-byte read  {:>10}  {:5.2}x the floor (BTreeMap lookup + read of the same word), scattered over all maps",
            per_sec(n, self.access),
            ratio(self.access, self.floor_lookup),
        )?;
        writeln!(
            f,
            "  split unmap  {:>10}  {:5.2}x the floor (the same peel on a bare BTreeMap of ranges), pages peeled off one {n}-page map in scattered order",
            per_sec(n, self.split),
            ratio(self.split, self.floor_split),
        )?;
        writeln!(
            f,
            "  release of the file's backing (last unmap: munmap of {n} touched pages + close): {:.1} ms",
            self.release.as_secs_f64() * 1e3
        )?;
        write!(
            f,
            "  at {n} live maps: {} fds held, {} VMAs added, RSS +{:.1} MiB ({} B/map; {:.2}x the floor BTreeMap's +{:.1} MiB)",
            self.fds_held,
            self.vmas_added,
            self.rss_growth as f64 / (1 << 20) as f64,
            self.rss_growth / n as i64,
            self.rss_growth as f64 / (self.floor_rss_growth.max(1)) as f64,
            self.floor_rss_growth as f64 / (1 << 20) as f64,
        )
    }
}
