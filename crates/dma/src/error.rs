//! The DMA error type: every way a device access can be refused.

use std::fmt;

/// Direction of a DMA, from the device's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Device reads memory.
    Read,
    /// Device writes memory.
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// A refused DMA or mapping operation. Accesses are faults reported to the device model;
/// mapping errors carry the errno a vfio-user reply needs ([`DmaError::errno`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// No mapping covers (part of) the access.
    #[error("DMA fault: {access} of {len} bytes at IOVA {iova:#x} is outside every DMA mapping; the driver must map that memory first")]
    Unmapped {
        /// First faulting address.
        iova: u64,
        /// Bytes requested from that address.
        len: u64,
        /// Direction.
        access: Access,
    },
    /// The mapping exists but does not allow this direction.
    #[error("DMA fault: {access} at IOVA {iova:#x} denied: the mapping does not permit {access}s")]
    Permission {
        /// Faulting address.
        iova: u64,
        /// Direction.
        access: Access,
    },
    /// Address plus length wraps the 64-bit space.
    #[error("DMA range at {iova:#x} with length {len:#x} wraps the 64-bit address space")]
    Overflow {
        /// Start.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The memory owner reached by messages refused the access.
    #[error("DMA {access} of {len} bytes at {iova:#x} failed at the peer (errno {errno})")]
    Peer {
        /// Address.
        iova: u64,
        /// Length.
        len: u64,
        /// Direction.
        access: Access,
        /// errno from the peer.
        errno: i32,
    },
    /// A `pread`/`pwrite` on the file behind an unsealed fd mapping failed or came up
    /// short (errno 0 means end of file: the file's owner shrank it after mapping).
    #[error("DMA {access} of {len} bytes at IOVA {iova:#x} failed on the file behind its mapping (errno {errno}; 0 means the file was shrunk after DMA_MAP); the client must keep mapped files at their size, e.g. by sealing its memfd with F_SEAL_SHRINK")]
    File {
        /// Address.
        iova: u64,
        /// Length.
        len: u64,
        /// Direction.
        access: Access,
        /// errno of the system call, 0 for end of file.
        errno: i32,
    },
    /// The file descriptor of a DMA_MAP cannot be used for DMA.
    #[error("cannot use the file of DMA mapping [{iova:#x}, +{size:#x}): {reason}")]
    BadFile {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
        /// errno for the reply.
        errno: i32,
        /// What is wrong, for the user.
        reason: String,
    },
    /// A new mapping overlaps an existing one.
    #[error("DMA mapping [{iova:#x}, +{size:#x}) overlaps an existing mapping; unmap it first")]
    Overlap {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// An unmap that does not name an existing mapping exactly.
    #[error("no DMA mapping is exactly [{iova:#x}, +{size:#x}); unmap must name a whole mapping")]
    NotMapped {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// An unmap range that cuts a mapping (VFIO type1 v2 refuses to bisect one).
    #[error("unmap of [{iova:#x}, +{size:#x}) would bisect the DMA mapping [{map_iova:#x}, +{map_size:#x}); unmap whole mappings")]
    Bisect {
        /// Start of the unmap.
        iova: u64,
        /// Size of the unmap.
        size: u64,
        /// Start of the mapping it cuts.
        map_iova: u64,
        /// Size of that mapping.
        map_size: u64,
    },
    /// The table already holds its maximum number of mappings.
    #[error("too many DMA mappings (limit {limit}); unmap some or raise max_dma_maps")]
    TooManyMappings {
        /// The limit.
        limit: usize,
    },
    /// A malformed request.
    #[error("invalid DMA request: {0}")]
    Invalid(String),
    /// Mapping the backing file descriptor failed.
    #[error("cannot mmap DMA region [{iova:#x}, +{size:#x}) from its file descriptor: {errno_text} (errno {errno})")]
    Mmap {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
        /// errno.
        errno: i32,
        /// strerror text.
        errno_text: String,
    },
}

impl DmaError {
    /// The errno this error is reported with on the wire.
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Unmapped { .. } | DmaError::Permission { .. } => libc::EFAULT,
            DmaError::Overflow { .. } | DmaError::Invalid(_) | DmaError::Bisect { .. } => {
                libc::EINVAL
            }
            DmaError::Peer { errno, .. } => *errno,
            DmaError::File { .. } => libc::EFAULT,
            DmaError::Overlap { .. } => libc::EEXIST,
            DmaError::NotMapped { .. } => libc::ENOENT,
            DmaError::TooManyMappings { .. } => libc::ENOSPC,
            DmaError::Mmap { errno, .. } | DmaError::BadFile { errno, .. } => *errno,
        }
    }

    /// The faulting device address of an access fault (`None` for mapping errors).
    pub fn fault_iova(&self) -> Option<u64> {
        match self {
            DmaError::Unmapped { iova, .. }
            | DmaError::Permission { iova, .. }
            | DmaError::Overflow { iova, .. }
            | DmaError::Peer { iova, .. }
            | DmaError::File { iova, .. } => Some(*iova),
            _ => None,
        }
    }

    /// The same error with its faulting address rewritten by `f` (a translating space
    /// reporting a fault in its own device's terms); mapping errors are unchanged.
    pub fn map_fault_iova(mut self, f: impl FnOnce(u64) -> u64) -> DmaError {
        match &mut self {
            DmaError::Unmapped { iova, .. }
            | DmaError::Permission { iova, .. }
            | DmaError::Overflow { iova, .. }
            | DmaError::Peer { iova, .. }
            | DmaError::File { iova, .. } => *iova = f(*iova),
            _ => {}
        }
        self
    }

    /// True for faults raised by a device access (as opposed to mapping management).
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            DmaError::Unmapped { .. }
                | DmaError::Permission { .. }
                | DmaError::Peer { .. }
                | DmaError::File { .. }
        )
    }
}
