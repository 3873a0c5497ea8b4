//! Fuzzing entry point (feature `harness`; `fuzz/fuzz_targets/dma_guarded.rs`): a client
//! that truncates, regrows and writes its unsealed guest RAM while the device reads and
//! writes it, checked against a model of the file.
//!
//! [`guarded`] maps a four-page unsealed memfd into a [`MapTable`] — accessed in place
//! with the fault-tolerant copy, or by `pread`/`pwrite`, as the first byte says — and
//! runs the script: the owner sets the file's size (whole pages, so both paths fault at
//! the same byte), writes it, and the device reads and writes at any offset and length
//! around the mapping. Every access must agree with the model: inside the file it moves
//! exactly the model's bytes; past the end of file it is a [`DmaError::File`] fault with
//! errno 0 that writes nothing; outside the mapping it is [`DmaError::Unmapped`]. A
//! disagreement panics (a finding); a crash is one too.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::{
    DmaBacking, DmaError, DmaMapRequest, DmaRange, DmaSpace, MapTable, Prot, UnsealedAccess,
};

const PAGE: usize = 4096;
const PAGES: usize = 4;
const IOVA: u64 = 0x10_0000;

/// Run one script (module documentation).
pub fn guarded(data: &[u8]) {
    let Some((&mode, mut script)) = data.split_first() else {
        return;
    };
    let access = if mode & 1 == 0 {
        UnsealedAccess::Guarded
    } else {
        UnsealedAccess::SystemCalls
    };
    // SAFETY: memfd_create reads a NUL-terminated literal; the result is checked.
    let raw = unsafe { libc::memfd_create(c"fuzz-guarded".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return;
    }
    // SAFETY: a new descriptor owned by nothing else.
    let owner = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let total = PAGES * PAGE;
    if owner.set_len(total as u64).is_err() {
        return;
    }
    let Ok(fd) = owner.try_clone() else {
        return;
    };
    let table = MapTable::with_unsealed_access(4, access);
    table
        .map(DmaMapRequest {
            range: DmaRange::new(IOVA, total as u64).expect("a valid range"),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: Arc::new(OwnedFd::from(fd)),
                offset: 0,
            },
        })
        .expect("a fresh memfd maps");
    let mut model = vec![0u8; total];
    let mut buf = vec![0u8; total + 2 * PAGE];
    let mut next = |n: usize| -> Option<u64> {
        let (head, rest) = script.split_at_checked(n)?;
        script = rest;
        Some(head.iter().fold(0u64, |v, b| v << 8 | u64::from(*b)))
    };
    while let Some(op) = next(1) {
        match op % 4 {
            0 => {
                let Some(pages) = next(1) else { break };
                let size = (pages as usize % (PAGES + 1)) * PAGE;
                owner.set_len(size as u64).expect("set_len of our memfd");
                model.resize(size, 0);
            }
            1 => {
                let (Some(off), Some(b)) = (next(2), next(1)) else {
                    break;
                };
                let off = off as usize % total;
                let n = (b as usize * 7).min(total - off);
                if off + n <= model.len() {
                    let fill = vec![b as u8; n];
                    owner
                        .write_all_at(&fill, off as u64)
                        .expect("pwrite of our memfd");
                    model[off..off + n].fill(b as u8);
                }
            }
            op => {
                let (Some(at), Some(len), Some(fill)) = (next(2), next(2), next(1)) else {
                    break;
                };
                // Offsets from one page before the mapping to one page past it.
                let off = at as usize % (total + 2 * PAGE);
                let len = len as usize % (total + PAGE);
                let iova = IOVA + off as u64 - PAGE as u64;
                let write = op == 3;
                let r = if write {
                    buf[..len].fill(fill as u8);
                    table.write(iova, &buf[..len])
                } else {
                    table.read(iova, &mut buf[..len])
                };
                check(r, off, len, write, fill as u8, &mut model, &buf, iova);
            }
        }
    }
}

/// Compare one device access with the model.
#[allow(clippy::too_many_arguments)]
fn check(
    r: Result<(), DmaError>,
    off: usize,
    len: usize,
    write: bool,
    fill: u8,
    model: &mut [u8],
    buf: &[u8],
    iova: u64,
) {
    let total = PAGES * PAGE;
    if len == 0 {
        assert!(r.is_ok(), "an empty access at {iova:#x}: {r:?}");
        return;
    }
    // `off` counts from one page before the mapping.
    let Some(start) = off.checked_sub(PAGE).filter(|s| s + len <= total) else {
        assert!(
            matches!(r, Err(DmaError::Unmapped { .. })),
            "access [{iova:#x}, +{len:#x}) outside the mapping: {r:?}"
        );
        return;
    };
    if start + len > model.len() {
        assert!(
            matches!(r, Err(DmaError::File { errno: 0, .. })),
            "access [{iova:#x}, +{len:#x}) past the end of a {:#x}-byte file: {r:?}",
            model.len()
        );
        return;
    }
    assert!(
        r.is_ok(),
        "access [{iova:#x}, +{len:#x}) inside the file: {r:?}"
    );
    if write {
        model[start..start + len].fill(fill);
    } else {
        assert!(
            buf[..len] == model[start..start + len],
            "read [{iova:#x}, +{len:#x}) differs from the file"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths, with scripts that truncate, regrow, write and access across the end
    /// of file (what the fuzz target explores at random).
    #[test]
    fn scripted_truncations_agree_with_the_model() {
        for mode in [0u8, 1] {
            guarded(&[
                mode, 2, 0x14, 0x00, 0x00, 0x30, 0xaa, // read around the start
                1, 0x10, 0x00, 0x50, // owner writes
                0, 2, // shrink to two pages
                2, 0x2f, 0xf8, 0x00, 0x10, 0, // read across the new end: fault
                3, 0x2f, 0xf8, 0x00, 0x10, 0x77, // write across it: fault, nothing written
                3, 0x2f, 0xf0, 0x00, 0x10, 0x66, // write just below it
                0, 4, // regrow
                2, 0x10, 0x00, 0x40, 0x00, 0, // read it all back
                2, 0x50, 0x00, 0x20, 0x00, 0, // past the mapping: unmapped
            ]);
        }
        // Pseudo-random scripts.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..64 {
            let data: Vec<u8> = (0..256)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            guarded(&data);
        }
    }
}
