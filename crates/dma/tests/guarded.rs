//! In-place DMA on files that are not sealed against shrinking: the fault-tolerant copy
//! turns a page its owner truncated away into a reported fault, and every other fault
//! still crashes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_dma::{
    Access, DmaBacking, DmaError, DmaMapRequest, DmaRange, DmaSpace, DmaSpaceExt, MapTable, Prot,
    UnsealedAccess,
};

/// A memfd its owner may still truncate (Cloud Hypervisor's guest RAM).
fn unsealed_memfd(size: u64) -> (Arc<OwnedFd>, std::fs::File) {
    // SAFETY: memfd_create with a valid NUL-terminated name; result checked.
    let fd = unsafe { libc::memfd_create(c"dma-guarded".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd owned by nobody else.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).unwrap();
    let owner = f.try_clone().unwrap();
    (Arc::new(OwnedFd::from(f)), owner)
}

fn map_rw(t: &MapTable, iova: u64, size: u64, fd: &Arc<OwnedFd>) {
    t.map(DmaMapRequest {
        range: DmaRange::new(iova, size).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: fd.clone(),
            offset: 0,
        },
    })
    .unwrap();
}

fn is_shrunk_fault(e: &DmaError, access: Access) -> bool {
    matches!(e, DmaError::File { access: a, errno: 0, .. } if *a == access)
        && e.errno() == libc::EFAULT
        && e.is_fault()
}

#[test]
fn unsealed_file_is_used_in_place_and_truncation_is_a_fault() {
    let (fd, owner) = unsealed_memfd(0x4000);
    let t = MapTable::default();
    map_rw(&t, 0x10000, 0x4000, &fd);
    // Zero copy: what the owner writes to the file, the device reads, and back.
    owner.write_all_at(b"from the guest", 0x3ff0).unwrap();
    let mut b = [0u8; 14];
    t.read(0x13ff0, &mut b).unwrap();
    assert_eq!(&b, b"from the guest");
    t.write(0x10ffc, b"crosses a page").unwrap();
    let mut f = [0u8; 14];
    owner.read_exact_at(&mut f, 0xffc).unwrap();
    assert_eq!(&f, b"crosses a page");
    t.write_u64(0x10008, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(t.read_u64(0x10008).unwrap(), 0x1122_3344_5566_7788);
    let st = t.stats();
    assert_eq!(st.guarded_bytes, 14 + 14 + 16);
    assert_eq!((st.file_bytes, st.in_place_bytes), (44, 0));

    owner.set_len(0x2000).unwrap();
    let mut b = [0u8; 16];
    let e = t.read(0x11ff8, &mut b).unwrap_err();
    assert!(is_shrunk_fault(&e, Access::Read), "{e:?}");
    assert_eq!(e.fault_iova(), Some(0x11ff8));
    let e = t.read_u32(0x13000).unwrap_err();
    assert!(is_shrunk_fault(&e, Access::Read), "{e:?}");
    // A write that would cross the new end of file writes nothing: its last byte is
    // probed first.
    owner.write_all_at(&[0xaa; 4], 0x1ffc).unwrap();
    let e = t.write(0x11ffc, &[0x55; 8]).unwrap_err();
    assert!(is_shrunk_fault(&e, Access::Write), "{e:?}");
    assert_eq!(t.read_u32(0x11ffc).unwrap(), 0xaaaa_aaaa);
    assert_eq!(
        owner.metadata().unwrap().len(),
        0x2000,
        "the file did not grow"
    );
    assert_eq!(t.stats().faults, 3);

    // The owner grows the file back: the pages are new (zero) and usable again.
    owner.set_len(0x4000).unwrap();
    assert_eq!(t.read_u32(0x13ff0).unwrap(), 0);
    t.write(0x13ff0, b"back").unwrap();
    let mut f = [0u8; 4];
    owner.read_exact_at(&mut f, 0x3ff0).unwrap();
    assert_eq!(&f, b"back");
}

#[test]
fn system_calls_mode_keeps_the_pread_pwrite_path() {
    let (fd, owner) = unsealed_memfd(0x2000);
    let t = MapTable::with_unsealed_access(16, UnsealedAccess::SystemCalls);
    map_rw(&t, 0, 0x2000, &fd);
    t.write_u32(0x1ffc, 7).unwrap();
    owner.set_len(0x1000).unwrap();
    let e = t.read_u32(0x1ffc).unwrap_err();
    assert!(is_shrunk_fault(&e, Access::Read), "{e:?}");
    let st = t.stats();
    assert_eq!(
        (st.file_bytes, st.guarded_bytes, st.in_place_bytes),
        (4, 0, 0)
    );
}

/// The device is mid-DMA while its client truncates and regrows the file over and over:
/// every access that meets the hole is a fault, the process survives, and once the file
/// is back every access works.
#[test]
fn truncation_racing_device_dma_is_a_fault_and_regrowth_heals() {
    const SIZE: u64 = 0x10000;
    let (fd, owner) = unsealed_memfd(SIZE);
    let t = Arc::new(MapTable::default());
    map_rw(&t, 0x100000, SIZE, &fd);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, faults) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let device = {
        let (t, stop, ok, faults) = (t.clone(), stop.clone(), ok.clone(), faults.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 0x3000];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let access = if i.is_multiple_of(2) {
                    Access::Read
                } else {
                    Access::Write
                };
                // Accesses of several sizes around the truncation point (half the file).
                let at = 0x100000 + SIZE / 2 - 0x2000 + (i * 0x123) % 0x3000;
                let len = [8usize, 0x40, 0x1000, 0x3000][(i % 4) as usize];
                let r = if access == Access::Read {
                    t.read(at, &mut buf[..len])
                } else {
                    t.write(at, &buf[..len])
                };
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        assert!(is_shrunk_fault(&e, access), "{e:?}");
                        faults.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut cycles = 0;
    while Instant::now() < deadline || faults.load(Ordering::Relaxed) < 10 {
        owner.set_len(SIZE / 2).unwrap();
        std::thread::sleep(Duration::from_micros(200));
        owner.set_len(SIZE).unwrap();
        std::thread::sleep(Duration::from_micros(200));
        cycles += 1;
        assert!(
            Instant::now() < deadline + Duration::from_secs(20),
            "no fault seen"
        );
    }
    stop.store(true, Ordering::Relaxed);
    device
        .join()
        .expect("the device thread survived every fault");
    let (ok, faults) = (ok.load(Ordering::Relaxed), faults.load(Ordering::Relaxed));
    eprintln!("{cycles} truncate/regrow cycles: {ok} accesses done, {faults} faults");
    assert!(ok > 0 && faults >= 10, "{ok} ok, {faults} faults");
    assert_eq!(t.stats().faults, faults);
    // After regrowth the whole mapping works.
    let data: Vec<u8> = (0..SIZE).map(|i| i as u8).collect();
    t.write(0x100000, &data).unwrap();
    let mut back = vec![0u8; SIZE as usize];
    t.read(0x100000, &mut back).unwrap();
    assert_eq!(back, data);
    let mut f = vec![0u8; SIZE as usize];
    owner.read_exact_at(&mut f, 0).unwrap();
    assert_eq!(f, data);
}

/// Which crash a child process runs (see `faults_outside_the_routine_still_crash`).
const CHILD: &str = "NESTIO_DMA_GUARDED_CHILD";

/// In a child: make the table install its handler, then fault outside the routine.
fn crash_child(case: &str) {
    if case == "chain" {
        // A handler installed before ours must still see the faults that are not ours.
        extern "C" fn exit_42(_: libc::c_int) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(42) }
        }
        // SAFETY: a zeroed sigaction is valid; the handler is a plain function.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = exit_42 as *const () as usize;
            assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
        }
    }
    let (fd, owner) = unsealed_memfd(0x2000);
    let t = MapTable::default();
    map_rw(&t, 0, 0x2000, &fd);
    owner.set_len(0x1000).unwrap();
    // The table recovers its own fault ...
    assert!(t.read_u32(0x1800).is_err());
    match case {
        "sigbus" | "chain" => {
            // ... but not the same fault made by other code: a plain mmap of the file.
            // SAFETY: a fresh shared mapping of a file we own; the read past the end of
            // file is the crash this child exists to show.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    0x2000,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                std::ptr::read_volatile(p.cast::<u8>().add(0x1800));
            }
        }
        "sigsegv" => {
            // SAFETY: none: reading an unmapped address is the crash this child shows.
            unsafe {
                std::ptr::read_volatile(16 as *const u8);
            }
        }
        other => panic!("unknown crash case {other}"),
    }
    eprintln!("child survived a fault outside the guarded routine");
    std::process::exit(0);
}

/// Faults anywhere but inside the guarded copy on a guarded range still kill the
/// process with their signal (or reach the handler that was there before).
#[test]
fn faults_outside_the_routine_still_crash() {
    if let Ok(case) = std::env::var(CHILD) {
        crash_child(&case);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for (case, expect_signal, expect_code) in [
        ("sigbus", Some(libc::SIGBUS), None),
        ("sigsegv", Some(libc::SIGSEGV), None),
        ("chain", None, Some(42)),
    ] {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "faults_outside_the_routine_still_crash",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, case)
            .output()
            .unwrap();
        let st = out.status;
        assert_eq!(
            (st.signal(), st.code()),
            (expect_signal, expect_code),
            "{case}: {st:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
