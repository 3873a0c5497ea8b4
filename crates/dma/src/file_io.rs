//! Memory reached through its file by system call (`pread`/`pwrite`), with the rules
//! both sides of a DMA by file keep: memory that is not there — past the end of a file
//! the owner truncated — is a fault, never zeros, and a write never grows the file
//! back. The map table uses it for mappings it cannot map in place; the vfio-user
//! client uses it to serve the server's DMA_READ/WRITE of memory shared by fd.
//!
//! Errors are errnos, with 0 meaning "past the end of the file" (what
//! [`crate::DmaError::File`] reports as a truncated mapping).

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// Read `buf.len()` bytes at file offset `at` of `file`.
pub fn read_at(file: &File, at: u64, buf: &mut [u8]) -> Result<(), i32> {
    file.read_exact_at(buf, at).map_err(errno)
}

/// Write `data` at file offset `at` of `file`, refusing (0) a write that would reach
/// past its end. (A truncate between the check and the `pwrite` still grows the file
/// back — sparse, and harmless to the caller.)
pub fn write_at(file: &File, at: u64, data: &[u8]) -> Result<(), i32> {
    let size = file.metadata().map_err(errno)?.len();
    if at
        .checked_add(data.len() as u64)
        .is_none_or(|end| end > size)
    {
        return Err(0);
    }
    file.write_all_at(data, at).map_err(errno)
}

/// Run `f` on `fd` viewed as a [`File`], without duplicating or closing it.
pub fn with_file<R>(fd: BorrowedFd<'_>, f: impl FnOnce(&File) -> R) -> R {
    // SAFETY: the fd is open for the borrow's lifetime, which outlives this call; the
    // `File` is never dropped (ManuallyDrop), so it does not close the fd it borrows.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
    f(&file)
}

/// The errno of an I/O error; 0 for an end of file (no OS error).
fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// An unlinked temporary file of `len` bytes.
    fn file(len: u64) -> File {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "nestio-file-io-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn reads_and_writes_inside_the_file_and_faults_past_its_end() {
        let f = file(8192);
        write_at(&f, 4090, &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut b = [0u8; 6];
        read_at(&f, 4090, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6]);
        // Past the end: a fault (0), and the file does not grow.
        assert_eq!(read_at(&f, 8190, &mut b), Err(0));
        assert_eq!(write_at(&f, 8190, &b), Err(0));
        assert_eq!(write_at(&f, u64::MAX - 2, &b), Err(0));
        assert_eq!(f.metadata().unwrap().len(), 8192);
    }

    #[test]
    fn a_borrowed_fd_is_neither_duplicated_nor_closed() {
        let f = file(4096);
        let n = with_file(f.as_fd(), |g| {
            write_at(g, 0, &[7]).unwrap();
            g.metadata().unwrap().len()
        });
        assert_eq!(n, 4096);
        // Still open: the view did not close it.
        let mut b = [0u8; 1];
        read_at(&f, 0, &mut b).unwrap();
        assert_eq!(b, [7]);
    }
}
