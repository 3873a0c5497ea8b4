//! Live migration of a whole VM, its assigned devices included.
//!
//! **Source** ([`MigrationSource`], taken from a [`crate::Vm`] before it runs and used
//! from another thread while it runs):
//!
//! 1. Dirty logging on: every RAM memory slot is re-registered with
//!    `KVM_MEM_LOG_DIRTY_PAGES`, and each assigned device starts its DMA dirty log
//!    (`DMA_LOGGING_START` over vfio-user) over all of guest RAM, because a device
//!    writes guest RAM through its own mapping of the RAM file, which KVM never sees.
//! 2. Each device that offers PRE_COPY is moved to PRE_COPY: it keeps running and its
//!    state starts to stream (MIG_DATA_READ) alongside RAM.
//! 3. Pass 0 sends all of RAM; each later pass takes the dirty set (KVM_GET_DIRTY_LOG
//!    of every slot OR'd with every device's DMA_LOGGING_REPORT) and sends those pages.
//!    The send rate of the last pass gives the expected downtime of the remaining set;
//!    once it fits the target (`--downtime-ms`) or passes run out, stop-and-copy.
//! 4. Stop-and-copy: the vCPUs are paused, the devices moved to STOP_COPY (their DMA
//!    stops), the last dirty set is sent, then each device's remaining stream, each
//!    vCPU's full state (saved on its own thread, [`crate::vcpu::VcpuControl::capture`]),
//!    the in-kernel PIC/IOAPIC, PIT and KVM clock, the console UART and each assigned
//!    function's virtualised configuration and MSI-X table, and the end marker.
//! 5. The destination answers once it has loaded everything and its devices run. On
//!    success the source confirms (one byte: only then does the destination run, so a
//!    source that missed the answer and rolls back never leaves a second copy running),
//!    its devices go to STOP and the source VM stops
//!    ([`MigrationSource::migrated`]). On any failure — the destination closes, refuses,
//!    times out, a device refuses a state — the source rolls back: the devices return
//!    to RUNNING, dirty logging is turned off and the vCPUs resume. Nothing the source
//!    owns was changed, so the guest goes on as if nothing happened.
//!
//! **Destination** ([`crate::Vm::receive_migration`]): a VM built from the same
//! configuration (same RAM size, vCPUs and kinds of device, each device a *new*
//! process) loads the stream before it first runs: RAM pages go straight into guest
//! RAM; each device is moved to RESUMING and receives its stream; at the end marker the
//! devices go to STOP (they check and apply their state), the PCI configuration is
//! replayed through the ordinary write path (BAR mappings, MSI routes, irqfds and the
//! eventfds handed to the device are rebuilt), the in-kernel irqchip, PIT and clock and
//! the UART are set, every vCPU is loaded, and the devices go to RUNNING. Only then is
//! the source told to stop. The stream is hostile input throughout ([`format`]).

pub mod addr;
pub mod format;
pub mod state;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_irqchip, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use nestio_device_model::{MigState, VfioDevice};
use nestio_dma::DmaRange;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::pci::{AssignedDevice, PciRoot};
use crate::serial::SerialConsole;
use crate::vcpu::VcpuControl;
use format::{FormatError, Section, StreamReader, StreamWriter, Tag};
use state::{MachineConfig, PlatformState};

/// Page size of dirty tracking and RAM runs.
pub const PAGE: u64 = 4096;
/// Pages per RAM section (1 MiB).
const RUN_PAGES: u64 = 256;
/// Bytes per device data section.
const DEVICE_CHUNK: usize = 64 * 1024;
/// How long the source waits for the destination's answer after the end marker.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The source's confirmation after the destination's answer: the destination runs.
const GO: u8 = 0x47;
/// How long a pause / vCPU capture may take.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream (format or transport).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A KVM call failed.
    #[error("KVM {what} failed during migration: {err}")]
    Kvm {
        /// Step.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// A device refused a migration step.
    #[error("device {device}: {what}: {message}")]
    Device {
        /// Device name.
        device: String,
        /// Step.
        what: &'static str,
        /// What it said.
        message: String,
    },
    /// The VM could not be paused or its vCPUs saved.
    #[error("cannot pause the VM for stop-and-copy: {0}")]
    Pause(String),
    /// A vCPU state could not be loaded.
    #[error("vCPU {index}: {message}")]
    Vcpu {
        /// vCPU.
        index: usize,
        /// What failed.
        message: String,
    },
    /// The destination's machine differs from the source's.
    #[error("the destination VM does not match the source: {0}; start the destination with the same --memory, --cpus and kinds of --device")]
    Mismatch(String),
    /// The stream lacks a part.
    #[error("the migration stream ended without {0}; the source failed or the stream was cut")]
    Incomplete(String),
    /// The destination refused the stream.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// Guest RAM access.
    #[error("guest RAM: {0}")]
    Ram(String),
    /// The VM is not in a state to migrate.
    #[error("{0}")]
    State(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MigrationError {
    move |err| MigrationError::Kvm { what, err }
}

/// Migration tunables.
#[derive(Debug, Clone, Copy)]
pub struct MigrationParams {
    /// Stop-and-copy once the remaining dirty set is expected to take at most this.
    pub downtime: Duration,
    /// At most this many pre-copy passes after the first full one.
    pub max_passes: u32,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime: Duration::from_millis(300),
            max_passes: 30,
        }
    }
}

/// Progress of a migration (reported after each pass).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// 0 = full RAM copy; then pre-copy passes; the stop-and-copy pass last.
    pub pass: u32,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Pages found dirty for the next pass.
    pub dirty_pages: u64,
    /// Dirtying rate seen during the last pass (bytes/s).
    pub dirty_rate: f64,
    /// Send rate of the last pass (bytes/s).
    pub send_rate: f64,
    /// Expected downtime for the dirty set at the send rate.
    pub expected_downtime: Duration,
    /// True for the final (stop-and-copy) report.
    pub stop_copy: bool,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {:.1} MiB sent, {} dirty pages, dirty rate {:.1} MiB/s, send rate {:.1} MiB/s, expected downtime {} ms",
            if self.stop_copy { "stop-and-copy" } else { "pass" },
            self.pass,
            self.bytes as f64 / (1 << 20) as f64,
            self.dirty_pages,
            self.dirty_rate / (1 << 20) as f64,
            self.send_rate / (1 << 20) as f64,
            self.expected_downtime.as_millis()
        )
    }
}

/// What a finished migration measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationReport {
    /// From start to the destination's answer.
    pub total: Duration,
    /// From the vCPU pause to the destination's answer (the guest ran nowhere).
    pub downtime: Duration,
    /// Bytes sent.
    pub bytes: u64,
    /// Pre-copy passes (the full copy included, stop-and-copy not).
    pub passes: u32,
    /// Device state bytes sent.
    pub device_bytes: u64,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "migration done: total {} ms, downtime {} ms, {:.1} MiB sent ({} bytes of device state), {} passes",
            self.total.as_millis(),
            self.downtime.as_millis(),
            self.bytes as f64 / (1 << 20) as f64,
            self.device_bytes,
            self.passes
        )
    }
}

/// One KVM memory slot of guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct RamSlot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Host virtual address of `gpa`.
    pub host: u64,
}

/// The source side of a migration: see the module documentation.
#[derive(Clone)]
pub struct MigrationSource {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) memory: u64,
    pub(crate) slots: Vec<RamSlot>,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) pci: Arc<PciRoot>,
    pub(crate) serial: Arc<SerialConsole>,
    pub(crate) cpus: usize,
    pub(crate) migrated: Arc<AtomicBool>,
    pub(crate) busy: Arc<AtomicBool>,
    /// Names of attached platform (non-PCI) devices: not migratable yet.
    pub(crate) platform_devices: Vec<String>,
}

/// The destination's answer after the end marker: `0` and nothing else, or `1`, a
/// u32 length (at most 4 KiB) and a UTF-8 message.
fn write_answer<W: Write>(w: &mut W, r: &Result<(), String>) -> std::io::Result<()> {
    match r {
        Ok(()) => w.write_all(&[0])?,
        Err(m) => {
            let m = &m.as_bytes()[..m.len().min(4096)];
            w.write_all(&[1])?;
            w.write_all(&(m.len() as u32).to_le_bytes())?;
            w.write_all(m)?;
        }
    }
    w.flush()
}

fn read_answer<R: Read>(r: &mut R) -> Result<(), MigrationError> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).map_err(FormatError::Io)?;
    match b[0] {
        0 => Ok(()),
        1 => {
            let mut l = [0u8; 4];
            r.read_exact(&mut l).map_err(FormatError::Io)?;
            let n = (u32::from_le_bytes(l) as usize).min(4096);
            let mut m = vec![0u8; n];
            r.read_exact(&mut m).map_err(FormatError::Io)?;
            Err(MigrationError::Refused(
                String::from_utf8_lossy(&m).into_owned(),
            ))
        }
        x => Err(MigrationError::Refused(format!(
            "unknown answer byte {x:#x}"
        ))),
    }
}

/// A device taking part in a migration.
struct MigDevice {
    dev: Arc<AssignedDevice>,
    precopy: bool,
    logging: bool,
}

impl MigDevice {
    fn name(&self) -> String {
        self.dev.name().to_string()
    }
    fn set(&self, s: MigState, what: &'static str) -> Result<(), MigrationError> {
        self.dev
            .device()
            .mig_set_state(s)
            .map(|_| ())
            .map_err(|e| MigrationError::Device {
                device: self.name(),
                what,
                message: e.to_string(),
            })
    }
}

/// Streams that can bound how long the source waits for an answer.
pub trait MigrationStream: Read + Write {
    /// Set (or clear) the read timeout.
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl MigrationStream for std::os::unix::net::UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl MigrationStream for std::net::TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// Bitmap helpers: `bits[i / 64] >> (i % 64)` is page i of a slot.
fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl MigrationSource {
    /// True once this VM was migrated away (its vCPUs were then stopped).
    pub fn migrated(&self) -> bool {
        self.migrated.load(Ordering::SeqCst)
    }

    fn devices(&self) -> Result<Vec<MigDevice>, MigrationError> {
        if let Some(n) = self.platform_devices.first() {
            return Err(MigrationError::State(format!(
                "platform device {n} cannot be migrated yet (only PCI devices are): this VM cannot be migrated"
            )));
        }
        let mut out = Vec::new();
        for d in self.pci.devices() {
            let flags = d.device().migration_flags().ok_or_else(|| {
                MigrationError::State(format!(
                    "device {} does not support migration (no VFIO migration v2): this VM cannot be migrated",
                    d.name()
                ))
            })?;
            out.push(MigDevice {
                precopy: flags.supports(MigState::PreCopy),
                dev: d,
                logging: false,
            });
        }
        Ok(out)
    }

    fn set_logging(&self, on: bool) -> Result<(), MigrationError> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: s.gpa,
                memory_size: s.size,
                userspace_addr: s.host,
            };
            // SAFETY: the same mapping of guest RAM the VM registered at creation
            // (owned by the Vm, alive while it is), only the logging flag changes.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION (dirty logging)"))?;
        }
        Ok(())
    }

    /// The dirty set since the last call, per slot (KVM's log OR'd with the devices').
    fn dirty(&self, devs: &[MigDevice]) -> Result<Vec<Vec<u64>>, MigrationError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut bits = self
                .vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
            for d in devs.iter().filter(|d| d.logging) {
                let range = DmaRange::new(s.gpa, s.size)
                    .map_err(|e| MigrationError::State(format!("RAM slot range: {e}")))?;
                let dev_bits = d
                    .dev
                    .device()
                    .dma_logging_report(range, PAGE)
                    .map_err(|e| MigrationError::Device {
                        device: d.name(),
                        what: "DMA dirty log report",
                        message: e.to_string(),
                    })?;
                or_into(&mut bits, &dev_bits);
            }
            out.push(bits);
        }
        Ok(out)
    }

    /// Send the pages set in `dirty` (per slot) as runs.
    fn send_pages<W: Write>(
        &self,
        w: &mut StreamWriter<W>,
        dirty: &[Vec<u64>],
    ) -> Result<u64, MigrationError> {
        let mut buf = vec![0u8; (RUN_PAGES * PAGE) as usize];
        let mut pages = 0;
        for (s, bits) in self.slots.iter().zip(dirty) {
            let n = s.size / PAGE;
            let mut i = 0;
            while i < n {
                let set = |p: u64| {
                    bits.get((p / 64) as usize)
                        .is_some_and(|w| w >> (p % 64) & 1 == 1)
                };
                if !set(i) {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < n && j - i < RUN_PAGES && set(j) {
                    j += 1;
                }
                let gpa = s.gpa + i * PAGE;
                let len = ((j - i) * PAGE) as usize;
                self.mem
                    .read_slice(&mut buf[..len], GuestAddress(gpa))
                    .map_err(|e| MigrationError::Ram(e.to_string()))?;
                w.section_parts(Tag::Ram, 0, &[&gpa.to_le_bytes(), &buf[..len]])?;
                pages += j - i;
                i = j;
            }
        }
        Ok(pages)
    }

    /// Read what a device has in its stream now (all of it in STOP_COPY), send it.
    fn send_device_data<W: Write>(
        &self,
        w: &mut StreamWriter<W>,
        d: &MigDevice,
        limit: usize,
    ) -> Result<u64, MigrationError> {
        let mut buf = vec![0u8; DEVICE_CHUNK];
        let mut sent = 0u64;
        while (sent as usize) < limit {
            let n = d
                .dev
                .device()
                .mig_data_read(&mut buf)
                .map_err(|e| MigrationError::Device {
                    device: d.name(),
                    what: "MIG_DATA_READ",
                    message: e.to_string(),
                })?;
            if n == 0 {
                break;
            }
            w.section(
                Tag::DeviceData,
                u32::from(d.dev.slot()),
                &buf[..n.min(buf.len())],
            )?;
            sent += n as u64;
        }
        Ok(sent)
    }

    fn platform_state(&self) -> Result<PlatformState, MigrationError> {
        let mut st = PlatformState::default();
        for (i, c) in st.irqchips.iter_mut().enumerate() {
            *c = kvm_irqchip {
                chip_id: i as u32,
                ..Default::default()
            };
            self.vm.get_irqchip(c).map_err(kvm("KVM_GET_IRQCHIP"))?;
        }
        st.pit = self.vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        st.clock = self.vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        Ok(st)
    }

    /// Migrate the running VM over `stream` (see the module documentation), reporting
    /// progress after each pass. On success the VM is stopped (its `run` returns) and
    /// [`Self::migrated`] is true; on failure it runs on, its devices in RUNNING.
    pub fn migrate<S: MigrationStream>(
        &self,
        stream: S,
        params: MigrationParams,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationReport, MigrationError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(MigrationError::State(
                "a migration of this VM is already running".into(),
            ));
        }
        let mut devs = self.devices();
        let r = match &mut devs {
            Ok(devs) => self.migrate_inner(stream, params, progress, devs),
            Err(_) => Err(MigrationError::State(String::new())),
        };
        let r = match (devs, r) {
            (Err(e), _) => Err(e),
            (Ok(devs), Err(e)) => {
                tracing::warn!(error = %e, "migration failed; the VM resumes on the source");
                self.rollback(&devs);
                Err(e)
            }
            (Ok(devs), Ok(report)) => {
                for d in &devs {
                    if let Err(e) = d.set(MigState::Stop, "stop after migration") {
                        tracing::warn!(error = %e, "source device after migration");
                    }
                }
                self.migrated.store(true, Ordering::SeqCst);
                self.control.request_stop();
                Ok(report)
            }
        };
        self.busy.store(false, Ordering::SeqCst);
        r
    }

    fn rollback(&self, devs: &[MigDevice]) {
        for d in devs {
            if let Err(e) = d.set(
                MigState::Running,
                "back to RUNNING after a failed migration",
            ) {
                tracing::error!(error = %e, "device did not return to RUNNING");
            }
            if d.logging {
                let _ = d.dev.device().dma_logging_stop();
            }
        }
        if let Err(e) = self.set_logging(false) {
            tracing::warn!(error = %e, "cannot turn dirty logging off");
        }
        self.control.resume();
    }

    fn migrate_inner<S: MigrationStream>(
        &self,
        mut stream: S,
        params: MigrationParams,
        progress: &mut dyn FnMut(&Progress),
        devs: &mut [MigDevice],
    ) -> Result<MigrationReport, MigrationError> {
        let start = Instant::now();
        let mut device_bytes = 0u64;
        // Dirty logging first, so nothing written after the full copy's read is missed.
        self.set_logging(true)?;
        self.dirty(&[])?; // clear KVM's log
        for d in devs.iter_mut() {
            let ranges: Vec<DmaRange> = self
                .slots
                .iter()
                .filter_map(|s| DmaRange::new(s.gpa, s.size).ok())
                .collect();
            d.dev
                .device()
                .dma_logging_start(PAGE, &ranges)
                .map_err(|e| MigrationError::Device {
                    device: d.name(),
                    what: "DMA dirty logging start",
                    message: e.to_string(),
                })?;
            d.logging = true;
            if d.precopy {
                d.set(MigState::PreCopy, "enter PRE_COPY")?;
            }
        }
        let mut w = StreamWriter::new(&mut stream)?;
        let config = MachineConfig {
            memory: self.memory,
            cpus: self.cpus as u32,
            devices: devs
                .iter()
                .map(|d| {
                    let (ven, dev) = ids(&d.dev);
                    (d.dev.slot(), ven, dev)
                })
                .collect(),
        };
        w.section(Tag::Config, 0, &config.encode())?;

        // Pass 0: everything.
        let full: Vec<Vec<u64>> = self
            .slots
            .iter()
            .map(|s| vec![u64::MAX; (s.size / PAGE).div_ceil(64) as usize])
            .collect();
        let mut pass = 0u32;
        let mut to_send = full;
        loop {
            let t = Instant::now();
            let before = w.bytes();
            self.send_pages(&mut w, &to_send)?;
            for d in devs.iter().filter(|d| d.precopy) {
                device_bytes += self.send_device_data(&mut w, d, 4 << 20)?;
            }
            let took = t.elapsed().as_secs_f64().max(1e-6);
            let send_rate = (w.bytes() - before) as f64 / took;
            to_send = self.dirty(devs)?;
            let dirty_pages: u64 = to_send.iter().map(|b| count(b)).sum();
            let dirty_bytes = dirty_pages * PAGE;
            let expected = Duration::from_secs_f64(dirty_bytes as f64 / send_rate.max(1.0))
                .min(Duration::from_secs(3600));
            progress(&Progress {
                pass,
                bytes: w.bytes(),
                dirty_pages,
                dirty_rate: dirty_bytes as f64 / took,
                send_rate,
                expected_downtime: expected,
                stop_copy: false,
            });
            pass += 1;
            if expected <= params.downtime || pass > params.max_passes {
                break;
            }
        }

        // Stop-and-copy.
        let down = Instant::now();
        self.control
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| MigrationError::Pause(e.to_string()))?;
        for d in devs.iter() {
            d.set(MigState::StopCopy, "enter STOP_COPY")?;
        }
        let mut last = self.dirty(devs)?;
        for (l, t) in last.iter_mut().zip(&to_send) {
            or_into(l, t);
        }
        let final_pages = self.send_pages(&mut w, &last)?;
        for d in devs.iter_mut() {
            device_bytes += self.send_device_data(&mut w, d, usize::MAX)?;
            let _ = d.dev.device().dma_logging_stop();
            d.logging = false;
            w.section(Tag::DeviceEnd, u32::from(d.dev.slot()), &[])?;
            w.section(
                Tag::Pci,
                u32::from(d.dev.slot()),
                &state::encode_pci(&d.dev.save_migration()),
            )?;
        }
        let vcpus = self
            .control
            .capture(PAUSE_TIMEOUT)
            .map_err(|e| MigrationError::Pause(e.to_string()))?;
        for (i, v) in vcpus.iter().enumerate() {
            w.section(Tag::Vcpu, i as u32, &state::encode_vcpu(v))?;
        }
        let plat = self.platform_state()?;
        w.section(Tag::Irqchip, 0, &plat.encode_irqchip())?;
        w.section(Tag::Pit, 0, zerocopy::IntoBytes::as_bytes(&plat.pit))?;
        w.section(Tag::Clock, 0, zerocopy::IntoBytes::as_bytes(&plat.clock))?;
        w.section(Tag::Serial, 0, &state::encode_serial(&self.serial.save()))?;
        w.section(Tag::End, 0, &[])?;
        w.flush()?;
        let bytes = w.bytes();
        progress(&Progress {
            pass,
            bytes,
            dirty_pages: final_pages,
            dirty_rate: 0.0,
            send_rate: 0.0,
            expected_downtime: down.elapsed(),
            stop_copy: true,
        });
        stream
            .set_timeout(Some(ANSWER_TIMEOUT))
            .map_err(FormatError::Io)?;
        read_answer(&mut stream)?;
        // The destination runs only after this byte; the source stops once it is sent.
        stream.write_all(&[GO]).map_err(FormatError::Io)?;
        stream.flush().map_err(FormatError::Io)?;
        self.set_logging(false).ok();
        Ok(MigrationReport {
            total: start.elapsed(),
            downtime: down.elapsed(),
            bytes,
            passes: pass,
            device_bytes,
        })
    }
}

/// Vendor and device ID of an assigned function (from its configuration space).
fn ids(d: &AssignedDevice) -> (u16, u16) {
    let mut b = [0u8; 4];
    if d.device()
        .region_read(nestio_device_model::pci_index::CONFIG, 0, &mut b)
        .is_err()
    {
        return (0xffff, 0xffff);
    }
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    )
}

/// What the destination collected before applying anything.
#[derive(Default)]
struct Incoming {
    vcpus: Vec<Option<crate::vcpu::VcpuMigState>>,
    irqchips: Option<[kvm_irqchip; 3]>,
    pit: Option<kvm_bindings::kvm_pit_state2>,
    clock: Option<kvm_bindings::kvm_clock_data>,
    serial: Option<vm_superio::serial::SerialState>,
    pci: Vec<Option<crate::pci::assigned::PciMigState>>,
    device_done: Vec<bool>,
}

/// The destination's VM parts (borrowed from [`crate::Vm`]).
pub(crate) struct Destination<'a> {
    pub(crate) vm: &'a VmFd,
    pub(crate) mem: &'a GuestMemoryMmap,
    pub(crate) memory: u64,
    pub(crate) vcpus: &'a mut [crate::vcpu::Vcpu],
    pub(crate) pci: &'a Arc<PciRoot>,
    pub(crate) serial: &'a SerialConsole,
}

/// What the destination received.
#[derive(Debug, Clone, Copy)]
pub struct IncomingReport {
    /// Bytes read.
    pub bytes: u64,
    /// RAM pages written (a page sent in several passes counts each time).
    pub pages: u64,
}

impl Destination<'_> {
    /// Load a whole stream and answer the source (see the module documentation).
    pub(crate) fn receive<S: Read + Write>(
        &mut self,
        stream: &mut S,
    ) -> Result<IncomingReport, MigrationError> {
        let devs: Vec<Arc<AssignedDevice>> = self.pci.devices();
        let r = self.receive_inner(stream, &devs);
        let answer = r.as_ref().map(|_| ()).map_err(|e| e.to_string());
        if r.is_err() {
            // A device left half-loaded (RESUMING, or ERROR after a refused state) is
            // reset: back to RUNNING, as fresh as it came.
            for d in &devs {
                if let Err(e) = d.device().reset() {
                    tracing::warn!(device = d.name(), error = %e, "cannot reset the device after a failed incoming migration");
                }
            }
        }
        if let Err(e) = write_answer(stream, &answer) {
            tracing::warn!(error = %e, "cannot answer the migration source");
            if r.is_ok() {
                // The source may not know we took over: it will roll back. Do not run
                // a second copy of the guest.
                return Err(MigrationError::Format(FormatError::Io(e)));
            }
        }
        let report = r?;
        // Run only once the source has confirmed it stops: a source that did not get
        // our answer rolls back, and then this copy must not run.
        let mut go = [0u8; 1];
        match stream.read_exact(&mut go) {
            Ok(()) if go[0] == GO => Ok(report),
            Ok(()) => Err(MigrationError::Refused(format!(
                "the source sent {:#x} instead of its confirmation",
                go[0]
            ))),
            Err(e) => Err(MigrationError::Incomplete(format!(
                "the source's confirmation ({e}); the source keeps the VM"
            ))),
        }
    }

    fn receive_inner<S: Read + Write>(
        &mut self,
        stream: &mut S,
        devs: &[Arc<AssignedDevice>],
    ) -> Result<IncomingReport, MigrationError> {
        let mut r = StreamReader::new(stream)?;
        let first = r.next_section()?;
        if first.tag != Tag::Config {
            return Err(MigrationError::Incomplete(
                "the machine description first".into(),
            ));
        }
        let cfg = MachineConfig::decode(&first)?;
        let mine: Vec<(u8, u16, u16)> = devs
            .iter()
            .map(|d| {
                let (v, i) = ids(d);
                (d.slot(), v, i)
            })
            .collect();
        if cfg.memory != self.memory {
            return Err(MigrationError::Mismatch(format!(
                "{} bytes of RAM on the source, {} here",
                cfg.memory, self.memory
            )));
        }
        if cfg.cpus as usize != self.vcpus.len() {
            return Err(MigrationError::Mismatch(format!(
                "{} vCPUs on the source, {} here",
                cfg.cpus,
                self.vcpus.len()
            )));
        }
        if cfg.devices != mine {
            return Err(MigrationError::Mismatch(format!(
                "devices (slot, vendor, device) {:04x?} on the source, {:04x?} here",
                cfg.devices, mine
            )));
        }
        for d in devs {
            d.device()
                .mig_set_state(MigState::Resuming)
                .map_err(|e| MigrationError::Device {
                    device: d.name().into(),
                    what: "enter RESUMING",
                    message: e.to_string(),
                })?;
        }
        let mut inc = Incoming {
            vcpus: std::iter::repeat_with(|| None)
                .take(self.vcpus.len())
                .collect(),
            pci: vec![None; devs.len()],
            device_done: vec![false; devs.len()],
            ..Default::default()
        };
        let slot_index = |instance: u32| devs.iter().position(|d| u32::from(d.slot()) == instance);
        let mut pages = 0u64;
        loop {
            let s: Section = r.next_section()?;
            let inst = s.instance;
            let unknown_slot = || FormatError::Payload {
                tag: s.tag,
                instance: inst,
                reason: "no assigned device in that slot".into(),
            };
            match s.tag {
                Tag::Config => {
                    return Err(MigrationError::Incomplete(
                        "a second machine description".into(),
                    ))
                }
                Tag::Ram => {
                    let (gpa, data) = state::decode_ram(&s)?;
                    let end = gpa
                        .checked_add(data.len() as u64)
                        .filter(|&e| e <= self.memory)
                        .ok_or_else(|| {
                            MigrationError::Ram(format!(
                                "RAM run at {gpa:#x} of {} bytes is outside the {} bytes of RAM",
                                data.len(),
                                self.memory
                            ))
                        })?;
                    let _ = end;
                    self.mem
                        .write_slice(data, GuestAddress(gpa))
                        .map_err(|e| MigrationError::Ram(e.to_string()))?;
                    pages += data.len() as u64 / PAGE;
                }
                Tag::DeviceData => {
                    let i = slot_index(inst).ok_or_else(unknown_slot)?;
                    if inc.device_done[i] {
                        return Err(MigrationError::Incomplete(
                            "device data after its end".into(),
                        ));
                    }
                    devs[i].device().mig_data_write(&s.payload).map_err(|e| {
                        MigrationError::Device {
                            device: devs[i].name().into(),
                            what: "MIG_DATA_WRITE",
                            message: e.to_string(),
                        }
                    })?;
                }
                Tag::DeviceEnd => {
                    let i = slot_index(inst).ok_or_else(unknown_slot)?;
                    inc.device_done[i] = true;
                }
                Tag::Pci => {
                    let i = slot_index(inst).ok_or_else(unknown_slot)?;
                    inc.pci[i] = Some(state::decode_pci(&s)?);
                }
                Tag::Vcpu => {
                    let slot =
                        inc.vcpus
                            .get_mut(inst as usize)
                            .ok_or_else(|| FormatError::Payload {
                                tag: s.tag,
                                instance: inst,
                                reason: "no such vCPU".into(),
                            })?;
                    *slot = Some(state::decode_vcpu(&s)?);
                }
                Tag::Irqchip => inc.irqchips = Some(PlatformState::decode_irqchip(&s)?),
                Tag::Pit => inc.pit = Some(PlatformState::decode_pit(&s)?),
                Tag::Clock => inc.clock = Some(PlatformState::decode_clock(&s)?),
                Tag::Serial => inc.serial = Some(state::decode_serial(&s)?),
                Tag::End => break,
            }
        }
        let bytes = r.bytes();
        self.apply(devs, inc)?;
        Ok(IncomingReport { bytes, pages })
    }

    fn apply(&mut self, devs: &[Arc<AssignedDevice>], inc: Incoming) -> Result<(), MigrationError> {
        let missing = |what: &str| MigrationError::Incomplete(what.into());
        if let Some(i) = inc.device_done.iter().position(|d| !d) {
            return Err(missing(&format!(
                "the end of device {}'s state",
                devs[i].name()
            )));
        }
        if let Some(i) = inc.pci.iter().position(Option::is_none) {
            return Err(missing(&format!("the PCI state of {}", devs[i].name())));
        }
        if let Some(i) = inc.vcpus.iter().position(Option::is_none) {
            return Err(missing(&format!("the state of vCPU {i}")));
        }
        let chips = inc
            .irqchips
            .ok_or_else(|| missing("the interrupt controller state"))?;
        let pit = inc.pit.ok_or_else(|| missing("the PIT state"))?;
        let mut clock = inc.clock.ok_or_else(|| missing("the KVM clock"))?;
        let serial = inc.serial.ok_or_else(|| missing("the console state"))?;
        for d in devs {
            d.device()
                .mig_set_state(MigState::Stop)
                .map_err(|e| MigrationError::Device {
                    device: d.name().into(),
                    what: "load the state (RESUMING -> STOP)",
                    message: e.to_string(),
                })?;
        }
        for (d, p) in devs.iter().zip(&inc.pci) {
            if let Some(p) = p {
                d.restore_migration(p).map_err(|f| MigrationError::Device {
                    device: f.device,
                    what: "PCI configuration replay",
                    message: f.message,
                })?;
            }
        }
        for c in &chips {
            self.vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        self.vm.set_pit2(&pit).map_err(kvm("KVM_SET_PIT2"))?;
        clock.flags = 0;
        self.vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        self.serial
            .restore(&serial)
            .map_err(|e| MigrationError::State(format!("console: {e}")))?;
        for (i, (v, s)) in self.vcpus.iter_mut().zip(&inc.vcpus).enumerate() {
            if let Some(s) = s {
                v.restore_migration(s).map_err(|e| MigrationError::Vcpu {
                    index: i,
                    message: e.to_string(),
                })?;
            }
        }
        for d in devs {
            d.device()
                .mig_set_state(MigState::Running)
                .map_err(|e| MigrationError::Device {
                    device: d.name().into(),
                    what: "resume (STOP -> RUNNING)",
                    message: e.to_string(),
                })?;
        }
        Ok(())
    }
}

/// Fuzz entry (feature `harness`): parse `data` as a migration stream and decode every
/// section's payload, as the destination does before touching the VM; whatever decodes
/// must encode back to exactly the bytes it came from (no field silently dropped or
/// invented).
#[cfg(feature = "harness")]
pub fn fuzz_stream(data: &[u8]) {
    let Ok(mut r) = StreamReader::new(data) else {
        return;
    };
    while let Ok(s) = r.next_section() {
        let again: Option<Vec<u8>> = match s.tag {
            Tag::Config => MachineConfig::decode(&s).ok().map(|c| c.encode()),
            Tag::Ram => {
                if let Ok((gpa, d)) = state::decode_ram(&s) {
                    assert!(gpa.is_multiple_of(PAGE) && !d.is_empty());
                    assert!((d.len() as u64).is_multiple_of(PAGE));
                }
                None
            }
            Tag::Vcpu => state::decode_vcpu(&s).ok().map(|v| state::encode_vcpu(&v)),
            Tag::Irqchip => PlatformState::decode_irqchip(&s).ok().map(|c| {
                PlatformState {
                    irqchips: c,
                    ..Default::default()
                }
                .encode_irqchip()
            }),
            Tag::Pit => PlatformState::decode_pit(&s)
                .ok()
                .map(|p| zerocopy::IntoBytes::as_bytes(&p).to_vec()),
            Tag::Clock => PlatformState::decode_clock(&s)
                .ok()
                .map(|p| zerocopy::IntoBytes::as_bytes(&p).to_vec()),
            Tag::Serial => state::decode_serial(&s)
                .ok()
                .map(|v| state::encode_serial(&v)),
            Tag::Pci => state::decode_pci(&s).ok().map(|v| state::encode_pci(&v)),
            Tag::DeviceData | Tag::DeviceEnd => None,
            Tag::End => break,
        };
        if let Some(a) = again {
            assert_eq!(a, s.payload, "{:?} does not round-trip", s.tag);
        }
    }
}
