//! Copy to and from a nested guest's memory (the seed's H_COPY_TOFROM_GUEST).
//!
//! [`NestedGuests`] owns the host memory and the [`Levels`] registry. A copy names a level,
//! an address space ([`AddressSpace::Physical`] or a guest-virtual space given by the
//! nested guest's CR3), an address and a length. It proceeds page by page: each page is
//! translated (page walk through the nested guest's own tables, then the level windows down
//! to host memory) and copied on its own, so a copy that crosses pages may stop midway.
//!
//! Semantics (as the seed's hcall):
//! - Parameter errors (both or neither direction, an address with bits 63:52 set for a
//!   physical copy or a non-canonical one for a virtual copy, a bad address-space id, an
//!   unknown level or one that is not the caller's nested guest) are found before any byte
//!   moves.
//! - The length is limited to [`MAX_COPY_LEN`] (16 MiB) per call when a bounce buffer is
//!   needed (the hcall form): a larger `n` is refused with `NoMemory` *before* allocating,
//!   and the allocation itself is fallible (`try_reserve_exact`), so a huge `n` neither
//!   crashes nor warns. The Rust-buffer forms (`copy_from_guest`/`copy_to_guest`) take the
//!   caller's buffer and need no limit.
//! - A page that does not translate, or lands outside the level's memory, stops the copy:
//!   the error ([`HcallStatus::NotFound`]) carries the number of bytes copied before it.
//!   On reads the uncopied tail of the buffer is zero-filled, so the caller never sees
//!   stale bytes; in the hcall form the whole (zero-tailed) buffer is still delivered to
//!   the parent's `gp_to` before the error is returned.
//!
//! Only the seed's checks on `eaddr` itself are Parameter errors; bytes past the end of
//! memory or past the canonical hole are found page by page and end in a short copy.

use std::ops::Range;

use crate::level::{LevelError, LevelId, Levels, Window};
use crate::memory::{GuestPhysMemory, MemError};
use crate::walk::{self, AccessKind, AccessMode, Cr3, WalkError};

/// Largest copy the hcall form accepts (it allocates a bounce buffer of `n` bytes).
pub const MAX_COPY_LEN: u64 = 16 << 20;

/// `pid` value that selects the guest-physical address space (any other value is a CR3).
pub const PHYSICAL_PID: u64 = u64::MAX;

/// Bits 63:52 of a physical `eaddr` must be clear (seed: H_PARAMETER).
const EADDR_HIGH_BITS: u64 = 0xfff0_0000_0000_0000;

/// Granule of physical copies: one page at a time, like virtual ones.
const PHYS_CHUNK: u64 = 4096;

/// hcall return codes (PAPR values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HcallStatus {
    /// H_SUCCESS.
    Success,
    /// H_PARAMETER.
    Parameter,
    /// H_NO_MEM.
    NoMemory,
    /// H_NOT_FOUND.
    NotFound,
}

impl HcallStatus {
    /// The numeric return code.
    pub fn code(self) -> i64 {
        match self {
            HcallStatus::Success => 0,
            HcallStatus::Parameter => -4,
            HcallStatus::NoMemory => -9,
            HcallStatus::NotFound => -7,
        }
    }
}

/// Which address space `eaddr` is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSpace {
    /// The nested guest's physical address space.
    Physical,
    /// A guest-virtual space: the nested guest's page tables at `cr3`.
    Virtual {
        /// The guest's CR3.
        cr3: Cr3,
        /// Check the access as a user-mode (CPL 3) access.
        user: bool,
    },
}

impl AddressSpace {
    /// From the hcall's `pid` argument: [`PHYSICAL_PID`] selects physical, anything else
    /// is a CR3 (supervisor access); a CR3 with reserved bits 63:52 set is a Parameter error.
    pub fn from_pid(pid: u64) -> Result<AddressSpace, CopyError> {
        if pid == PHYSICAL_PID {
            return Ok(AddressSpace::Physical);
        }
        Cr3::new(pid)
            .map(|cr3| AddressSpace::Virtual { cr3, user: false })
            .ok_or(CopyError::BadAddressSpace { pid })
    }
}

/// The raw hcall arguments (registers), as the seed defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HcallArgs {
    /// The nested guest (a [`LevelId`], must be a child of the caller).
    pub lpid: u64,
    /// Address space: [`PHYSICAL_PID`] or a CR3.
    pub pid: u64,
    /// Address in the nested guest.
    pub eaddr: u64,
    /// Parent guest-physical destination: copy *from* the nested guest to here (0 = unused).
    pub gp_to: u64,
    /// Parent guest-physical source: copy from here *to* the nested guest (0 = unused).
    pub gp_from: u64,
    /// Bytes.
    pub n: u64,
}

/// A refused or short copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// Both `gp_to` and `gp_from` given.
    #[error("both a destination ({gp_to:#x}) and a source ({gp_from:#x}) were given; pass exactly one direction")]
    BothDirections {
        /// Destination.
        gp_to: u64,
        /// Source.
        gp_from: u64,
    },
    /// Neither given.
    #[error("neither a destination nor a source was given; pass exactly one direction")]
    NoDirection,
    /// `eaddr` itself is invalid for the address space.
    #[error("address {eaddr:#x} is invalid: {reason}")]
    BadAddress {
        /// The address.
        eaddr: u64,
        /// Why.
        reason: &'static str,
    },
    /// A pid that is neither [`PHYSICAL_PID`] nor a valid CR3.
    #[error("address-space id {pid:#x} is neither the physical selector nor a CR3 (bits 63:52 must be clear)")]
    BadAddressSpace {
        /// The pid.
        pid: u64,
    },
    /// The level does not exist (or is the host).
    #[error("unknown nested guest {lpid}; pass the id of a registered nested guest")]
    UnknownLevel {
        /// The raw id given.
        lpid: u64,
    },
    /// The level exists but is not a nested guest of the caller.
    #[error("{level} is not a nested guest of {caller}; a level may only copy to and from its own nested guests")]
    NotChild {
        /// The caller.
        caller: LevelId,
        /// The level named.
        level: LevelId,
    },
    /// `n` above [`MAX_COPY_LEN`]: refused before allocating.
    #[error("copy of {n} bytes refused: at most {limit} bytes per call; split the copy")]
    TooLong {
        /// Requested length.
        n: u64,
        /// The limit.
        limit: u64,
    },
    /// The bounce buffer could not be allocated.
    #[error("cannot allocate a {n}-byte copy buffer")]
    NoMemory {
        /// Requested length.
        n: u64,
    },
    /// A page of the nested guest's virtual space did not translate.
    #[error("copy stopped after {copied} bytes: {source}")]
    Translate {
        /// Bytes copied before the failure.
        copied: u64,
        /// The walk error.
        #[source]
        source: WalkError,
    },
    /// The next page's address wrapped past 2^64.
    #[error("copy stopped after {copied} bytes: the address range starting at {eaddr:#x} wraps the 64-bit space")]
    AddressWrap {
        /// Start address.
        eaddr: u64,
        /// Bytes copied before the failure.
        copied: u64,
    },
    /// A page translated to memory the nested guest does not have.
    #[error("copy stopped after {copied} bytes at nested guest-physical {gpa:#x}: {source}")]
    GuestMemory {
        /// Guest-physical address that failed.
        gpa: u64,
        /// Bytes copied before the failure.
        copied: u64,
        /// Why.
        #[source]
        source: MemError,
    },
    /// The parent's buffer (`gp_to` / `gp_from`) is not in the parent's memory.
    #[error("the parent buffer at guest-physical {gpa:#x} cannot be accessed: {source}")]
    ParentMemory {
        /// Parent address.
        gpa: u64,
        /// Why.
        #[source]
        source: MemError,
    },
}

impl CopyError {
    /// The hcall status this error is reported with.
    pub fn status(&self) -> HcallStatus {
        match self {
            CopyError::BothDirections { .. }
            | CopyError::NoDirection
            | CopyError::BadAddress { .. }
            | CopyError::BadAddressSpace { .. }
            | CopyError::UnknownLevel { .. }
            | CopyError::NotChild { .. } => HcallStatus::Parameter,
            CopyError::TooLong { .. } | CopyError::NoMemory { .. } => HcallStatus::NoMemory,
            CopyError::Translate { .. }
            | CopyError::AddressWrap { .. }
            | CopyError::GuestMemory { .. }
            | CopyError::ParentMemory { .. } => HcallStatus::NotFound,
        }
    }
    /// The hcall return code (H_PARAMETER -4, H_NO_MEM -9, H_NOT_FOUND -7).
    pub fn hcall_code(&self) -> i64 {
        self.status().code()
    }
    /// Bytes of the nested guest's memory copied before the failure (0 for refusals).
    pub fn copied(&self) -> u64 {
        match self {
            CopyError::Translate { copied, .. }
            | CopyError::AddressWrap { copied, .. }
            | CopyError::GuestMemory { copied, .. } => *copied,
            _ => 0,
        }
    }
}

/// The hcall return code for a copy result.
pub fn hcall_code<T>(r: &Result<T, CopyError>) -> i64 {
    match r {
        Ok(_) => HcallStatus::Success.code(),
        Err(e) => e.hcall_code(),
    }
}

/// One level's guest-physical memory, reached through the windows down to host memory.
pub struct LevelMemory<'a, M: GuestPhysMemory> {
    levels: &'a Levels,
    host: &'a M,
    id: LevelId,
    size: u64,
}

impl<M: GuestPhysMemory> LevelMemory<'_, M> {
    /// The level this view shows.
    pub fn level(&self) -> LevelId {
        self.id
    }
}

impl<M: GuestPhysMemory> GuestPhysMemory for LevelMemory<'_, M> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        crate::memory::check_range(gpa, buf.len() as u64, self.size)?;
        let host = self.levels.to_host(self.id, gpa, buf.len() as u64)?;
        self.host.read(host, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        crate::memory::check_range(gpa, data.len() as u64, self.size)?;
        let host = self.levels.to_host(self.id, gpa, data.len() as u64)?;
        self.host.write(host, data)
    }
}

/// Host memory plus the nesting levels carved out of it. See the module documentation.
pub struct NestedGuests<M: GuestPhysMemory> {
    host: M,
    levels: Levels,
}

impl<M: GuestPhysMemory> NestedGuests<M> {
    /// Only the host, whose memory is `host`.
    pub fn new(host: M) -> Result<Self, LevelError> {
        let levels = Levels::new(host.size())?;
        Ok(NestedGuests { host, levels })
    }

    /// The level registry.
    pub fn levels(&self) -> &Levels {
        &self.levels
    }

    /// The host memory.
    pub fn host(&self) -> &M {
        &self.host
    }

    /// Register a nested guest of `parent` (see [`Levels::add`]).
    pub fn add_level(&mut self, parent: LevelId, window: Window) -> Result<LevelId, LevelError> {
        self.levels.add(parent, window)
    }

    /// Remove a nested guest (see [`Levels::remove`]).
    pub fn remove_level(&mut self, id: LevelId) -> Result<(), LevelError> {
        self.levels.remove(id)
    }

    /// The guest-physical memory of level `id`.
    pub fn memory(&self, id: LevelId) -> Result<LevelMemory<'_, M>, LevelError> {
        let size = self.levels.get(id)?.size();
        Ok(LevelMemory {
            levels: &self.levels,
            host: &self.host,
            id,
            size,
        })
    }

    fn level_memory(&self, id: LevelId) -> Result<LevelMemory<'_, M>, CopyError> {
        self.memory(id).map_err(|_| CopyError::UnknownLevel {
            lpid: u64::from(id.raw()),
        })
    }

    /// Translate one address of `space` in level `level` to that level's guest-physical
    /// address (what `nestio inspect` shows next to the bytes).
    pub fn translate(
        &self,
        level: LevelId,
        space: AddressSpace,
        eaddr: u64,
        access: AccessMode,
    ) -> Result<u64, CopyError> {
        check_eaddr(space, eaddr)?;
        let mem = self.level_memory(level)?;
        match space {
            AddressSpace::Physical => Ok(eaddr),
            AddressSpace::Virtual { cr3, user } => {
                let access = AccessMode { user, ..access };
                walk::walk(&mem, cr3, eaddr, access)
                    .map(|t| t.gpa)
                    .map_err(|source| CopyError::Translate { copied: 0, source })
            }
        }
    }

    /// Copy `buf.len()` bytes at `eaddr` of level `level` into `buf`. On error, `buf`
    /// holds the bytes copied ([`CopyError::copied`]) followed by zeros.
    pub fn copy_from_guest(
        &self,
        level: LevelId,
        space: AddressSpace,
        eaddr: u64,
        buf: &mut [u8],
    ) -> Result<(), CopyError> {
        let r = self.copy_from_inner(level, space, eaddr, buf);
        if let Err(e) = &r {
            zero_tail(buf, e.copied());
        }
        r
    }

    fn copy_from_inner(
        &self,
        level: LevelId,
        space: AddressSpace,
        eaddr: u64,
        buf: &mut [u8],
    ) -> Result<(), CopyError> {
        check_eaddr(space, eaddr)?;
        let mem = self.level_memory(level)?;
        for_each_page(&mem, space, eaddr, buf.len(), AccessKind::Read, |gpa, r| {
            mem.read(gpa, &mut buf[r])
        })
    }

    /// Copy `data` to `eaddr` of level `level`. On error the first
    /// [`CopyError::copied`] bytes were written.
    pub fn copy_to_guest(
        &self,
        level: LevelId,
        space: AddressSpace,
        eaddr: u64,
        data: &[u8],
    ) -> Result<(), CopyError> {
        check_eaddr(space, eaddr)?;
        let mem = self.level_memory(level)?;
        for_each_page(
            &mem,
            space,
            eaddr,
            data.len(),
            AccessKind::Write,
            |gpa, r| mem.write(gpa, &data[r]),
        )
    }

    /// H_COPY_TOFROM_GUEST issued by level `caller` about its nested guest `args.lpid`.
    /// `gp_to` / `gp_from` are addresses in the caller's guest-physical space. Returns the
    /// bytes copied (`n`) or the error; [`hcall_code`] gives the return code.
    pub fn h_copy_tofrom_guest(&self, caller: LevelId, args: &HcallArgs) -> Result<u64, CopyError> {
        let r = self.hcall_inner(caller, args);
        match &r {
            Ok(n) => tracing::trace!(%caller, ?args, n, "H_COPY_TOFROM_GUEST"),
            Err(e) => tracing::debug!(%caller, ?args, error = %e, "H_COPY_TOFROM_GUEST failed"),
        }
        r
    }

    fn hcall_inner(&self, caller: LevelId, a: &HcallArgs) -> Result<u64, CopyError> {
        match (a.gp_to != 0, a.gp_from != 0) {
            (true, true) => {
                return Err(CopyError::BothDirections {
                    gp_to: a.gp_to,
                    gp_from: a.gp_from,
                })
            }
            (false, false) => return Err(CopyError::NoDirection),
            _ => {}
        }
        let space = AddressSpace::from_pid(a.pid)?;
        check_eaddr(space, a.eaddr)?;
        let level = LevelId::from_raw(a.lpid)
            .filter(|&id| id != LevelId::HOST && self.levels.get(id).is_ok())
            .ok_or(CopyError::UnknownLevel { lpid: a.lpid })?;
        if !self.levels.is_child_of(level, caller) {
            return Err(CopyError::NotChild { caller, level });
        }
        if a.n > MAX_COPY_LEN {
            return Err(CopyError::TooLong {
                n: a.n,
                limit: MAX_COPY_LEN,
            });
        }
        if a.n == 0 {
            return Ok(0);
        }
        // n <= 16 MiB fits usize.
        let n = a.n as usize;
        let mut buf = Vec::new();
        buf.try_reserve_exact(n)
            .map_err(|_| CopyError::NoMemory { n: a.n })?;
        buf.resize(n, 0);
        let parent = self.level_memory(caller)?;
        if a.gp_to != 0 {
            let r = self.copy_from_guest(level, space, a.eaddr, &mut buf);
            // Deliver the copied bytes and the zero-filled tail even after a short copy.
            parent
                .write(a.gp_to, &buf)
                .map_err(|source| CopyError::ParentMemory {
                    gpa: a.gp_to,
                    source,
                })?;
            r.map(|()| a.n)
        } else {
            parent
                .read(a.gp_from, &mut buf)
                .map_err(|source| CopyError::ParentMemory {
                    gpa: a.gp_from,
                    source,
                })?;
            self.copy_to_guest(level, space, a.eaddr, &buf)
                .map(|()| a.n)
        }
    }

    /// [`NestedGuests::h_copy_tofrom_guest`] reduced to its return code.
    pub fn hcall(&self, caller: LevelId, args: &HcallArgs) -> i64 {
        hcall_code(&self.h_copy_tofrom_guest(caller, args))
    }
}

fn zero_tail(buf: &mut [u8], copied: u64) {
    let start = usize::try_from(copied).unwrap_or(usize::MAX).min(buf.len());
    buf[start..].fill(0);
}

/// The Parameter checks on `eaddr` itself.
fn check_eaddr(space: AddressSpace, eaddr: u64) -> Result<(), CopyError> {
    match space {
        AddressSpace::Physical if eaddr & EADDR_HIGH_BITS != 0 => Err(CopyError::BadAddress {
            eaddr,
            reason: "bits 63:52 are set; guest-physical addresses are below 2^52",
        }),
        AddressSpace::Virtual { .. } if !walk::is_canonical(eaddr) => Err(CopyError::BadAddress {
            eaddr,
            reason: "not a canonical x86-64 virtual address (bits 63:47 must all equal bit 47)",
        }),
        _ => Ok(()),
    }
}

/// Walk `[eaddr, eaddr+len)` page by page, calling `f(gpa, buffer range)` for each piece.
fn for_each_page<G: GuestPhysMemory + ?Sized>(
    mem: &G,
    space: AddressSpace,
    eaddr: u64,
    len: usize,
    kind: AccessKind,
    mut f: impl FnMut(u64, Range<usize>) -> Result<(), MemError>,
) -> Result<(), CopyError> {
    let mut done = 0usize;
    while done < len {
        let copied = done as u64;
        let cur = eaddr
            .checked_add(copied)
            .ok_or(CopyError::AddressWrap { eaddr, copied })?;
        let (gpa, in_page) = match space {
            AddressSpace::Physical => (cur, PHYS_CHUNK - (cur % PHYS_CHUNK)),
            AddressSpace::Virtual { cr3, user } => {
                let t = walk::walk(mem, cr3, cur, AccessMode { kind, user })
                    .map_err(|source| CopyError::Translate { copied, source })?;
                (t.gpa, t.bytes_to_page_end())
            }
        };
        let chunk = usize::try_from(in_page)
            .unwrap_or(usize::MAX)
            .min(len - done);
        f(gpa, done..done + chunk).map_err(|source| CopyError::GuestMemory {
            gpa,
            copied,
            source,
        })?;
        done += chunk;
    }
    Ok(())
}
