//! The e1000 receive path does not allocate per frame: a frame is DMAed from the
//! caller's buffer, and the one chunk that mixes frame bytes with padding / FCS is
//! assembled in a scratch buffer the device reuses. This test binary counts heap
//! allocations made by the test thread (a counting global allocator with a per-thread
//! counter, so the RX worker and other tests do not disturb it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nestio_device_model::{pci_index, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, DmaSpace, Prot};
use nestio_emulated::e1000::regs::*;
use nestio_emulated::e1000::{crc32, E1000Config, RxOutcome, E1000};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    // try_with: the counter may be gone while the thread is being torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a
// const-initialised thread-local Cell, which needs no allocation to access.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

const IOVA: u64 = 0x10_0000;
const MEM: u64 = 1 << 20;
const RING: u64 = 0;
const BUFS: u64 = 0x1_0000;
const NDESC: u32 = 64;

struct Nic {
    dev: Arc<E1000>,
    mem: File,
}

impl Nic {
    fn new(rctl: u32) -> Nic {
        let backend = nestio_net::NoneBackend::new().unwrap();
        let dev = E1000::new(E1000Config::new(Box::new(backend))).unwrap();
        let fd = Arc::new(nestio_dma::memfd::sealed_memfd(c"rx-alloc", MEM).unwrap());
        let mem = File::from(fd.try_clone().unwrap());
        dev.dma_map(DmaMapRequest {
            range: DmaRange::new(IOVA, MEM).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd { fd, offset: 0 },
        })
        .unwrap();
        // Bus master, then a ring of NDESC descriptors with 4 KiB apart buffers.
        dev.region_write(pci_index::CONFIG, 4, &6u16.to_le_bytes())
            .unwrap();
        for i in 0..u64::from(NDESC) {
            let buf = IOVA + BUFS + i * 0x1000;
            mem.write_all_at(&buf.to_le_bytes(), RING + i * DESC_SIZE)
                .unwrap();
        }
        let w = |off: u32, v: u32| dev.region_write(0, off.into(), &v.to_le_bytes()).unwrap();
        w(RDBAL, (IOVA + RING) as u32);
        w(RDBAH, ((IOVA + RING) >> 32) as u32);
        w(RDLEN, NDESC * DESC_SIZE as u32);
        w(RDH, 0);
        w(RDT, NDESC - 1);
        w(RCTL, rctl | RCTL_EN | RCTL_UPE | RCTL_BAM);
        Nic { dev, mem }
    }

    /// Descriptor `i`: (length, status) from its write-back.
    fn desc(&self, i: u64) -> (u16, u8) {
        let mut d = [0u8; 16];
        self.mem
            .read_exact_at(&mut d, RING + i * DESC_SIZE)
            .unwrap();
        (u16::from_le_bytes([d[8], d[9]]), d[12])
    }

    fn buffer(&self, i: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_exact_at(&mut b, BUFS + i * 0x1000).unwrap();
        b
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    f[..6].copy_from_slice(&[0xff; 6]);
    f
}

/// Heap allocations the map table itself makes for the DMA of one single-buffer
/// frame: descriptor read, buffer write, descriptor write-back (none: in-place DMA is
/// checked and copied without allocating).
fn dma_allocations_per_frame(nic: &Nic, frame_len: usize) -> u64 {
    let table = nic.dev.dma_table().expect("the e1000 has a map table");
    let data = vec![0u8; frame_len];
    let mut desc = [0u8; 8];
    let at = IOVA + MEM / 2;
    let before = allocs();
    table.read(at, &mut desc).unwrap();
    table.write(at + 0x1000, &data).unwrap();
    table.write(at + 8, &desc).unwrap();
    allocs() - before
}

/// Inject `frames` (single-buffer ones) after two warm-up frames, and return the heap
/// allocations made on this thread while receiving them — DMA included.
fn receiver_allocations(nic: &Nic, frames: &[Vec<u8>]) -> u64 {
    for f in frames.iter().take(2) {
        assert_eq!(nic.dev.inject_frame(f), Some(RxOutcome::Delivered));
    }
    for f in &frames[2..] {
        assert_eq!(
            dma_allocations_per_frame(nic, f.len()),
            0,
            "the map table allocates for in-place DMA"
        );
    }
    let before = allocs();
    for f in &frames[2..] {
        let r = nic.dev.inject_frame(f);
        assert_eq!(r, Some(RxOutcome::Delivered));
    }
    allocs() - before
}

#[test]
fn rx_with_fcs_and_padding_does_not_allocate_per_frame() {
    let nic = Nic::new(0);
    // Short frames (padded) and full ones, FCS appended: every frame has a chunk that
    // mixes frame bytes and added bytes.
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|i| frame(if i % 2 == 0 { 42 } else { 1514 }, i as u8))
        .collect();
    let n = receiver_allocations(&nic, &frames);
    assert_eq!(n, 0, "{n} heap allocations for 18 received frames");
    // What was stored is the padded frame and its FCS.
    for (i, f) in frames.iter().enumerate() {
        let mut want = f.clone();
        want.resize(want.len().max(60), 0);
        let fcs = crc32(&want);
        want.extend_from_slice(&fcs.to_le_bytes());
        let (len, sta) = nic.desc(i as u64);
        assert_eq!(usize::from(len), want.len(), "frame {i}");
        assert_eq!(sta & (RXD_STA_DD | RXD_STA_EOP), RXD_STA_DD | RXD_STA_EOP);
        assert_eq!(nic.buffer(i as u64, want.len()), want, "frame {i}");
    }
}

#[test]
fn rx_without_fcs_does_not_allocate_per_frame() {
    let nic = Nic::new(RCTL_SECRC);
    let frames: Vec<Vec<u8>> = (0..20).map(|i| frame(60 + i * 70, i as u8)).collect();
    let n = receiver_allocations(&nic, &frames);
    assert_eq!(n, 0, "{n} heap allocations for 18 received frames");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(usize::from(nic.desc(i as u64).0), f.len());
        assert_eq!(&nic.buffer(i as u64, f.len()), f, "frame {i}");
    }
}

/// A frame over several 256-byte buffers whose last buffer holds the end of the frame
/// and its FCS, or the FCS alone.
#[test]
fn rx_multi_buffer_frames_split_fcs_correctly() {
    let nic = Nic::new(3 << RCTL_BSIZE_SHIFT); // 256-byte buffers
    let mut d = 0u64;
    for len in [300usize, 256, 254, 510, 512] {
        let f = frame(len, len as u8);
        assert_eq!(nic.dev.inject_frame(&f), Some(RxOutcome::Delivered));
        let mut want = f.clone();
        want.extend_from_slice(&crc32(&f).to_le_bytes());
        let mut got = Vec::new();
        for (k, chunk) in want.chunks(256).enumerate() {
            let (l, sta) = nic.desc(d);
            assert_eq!(usize::from(l), chunk.len(), "len {len} chunk {k}");
            let last = (k + 1) * 256 >= want.len();
            assert_eq!(sta & RXD_STA_EOP != 0, last, "len {len} chunk {k}");
            got.extend(nic.buffer(d, chunk.len()));
            d += 1;
        }
        assert_eq!(got, want, "frame of {len} bytes");
    }
}
