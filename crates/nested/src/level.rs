//! Nesting levels: each nested guest's memory is a window of its parent's memory.
//!
//! Level 0 is the host (its "guest-physical" space is the host memory, `[0, host_size)`).
//! A level `n+1` guest sees physical addresses `[0, size)`; address `a` is the parent's
//! address `base + a`. A parent can only hand down memory it owns, so a child's window must
//! lie inside the parent's own space `[0, parent.size)` — [`Levels::add`] refuses anything
//! else. Windows are contiguous, so any chain of windows composes into a single host
//! window ([`Levels::host_window`]), but [`Levels::to_host`] still re-checks every level on
//! the way down (range inside the window, no overflow): the check costs one compare per
//! level and keeps the invariant local to each step.
//!
//! Siblings may receive overlapping windows (a parent may share its memory); isolation is
//! between a guest and everything outside its own window. Depth is bounded by
//! [`MAX_DEPTH`] so that a runaway chain cannot make translation unbounded.

use std::collections::BTreeMap;
use std::fmt;

/// Deepest nesting level accepted (the host is level 0).
pub const MAX_DEPTH: u32 = 64;

/// Identifies a level (the host is [`LevelId::HOST`]); plays the role of the seed's lpid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LevelId(u32);

impl LevelId {
    /// The host (level 0).
    pub const HOST: LevelId = LevelId(0);
    /// The raw id.
    pub fn raw(self) -> u32 {
        self.0
    }
    /// From a raw id as a guest passes it (a register); `None` if it cannot be an id.
    pub fn from_raw(raw: u64) -> Option<LevelId> {
        u32::try_from(raw).ok().map(LevelId)
    }
}

impl fmt::Display for LevelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "level-id {}", self.0)
    }
}

/// Errors of the level registry and of window translation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LevelError {
    /// No level has this id.
    #[error("unknown nested guest {0}; list the levels and use an existing id")]
    Unknown(LevelId),
    /// A window of zero size, or one that wraps the 64-bit space.
    #[error("invalid window base {base:#x} size {size:#x}: the size must be non-zero and base+size must not wrap")]
    BadWindow {
        /// Base.
        base: u64,
        /// Size.
        size: u64,
    },
    /// A child window that is not inside the parent's memory.
    #[error("window [{base:#x}, +{size:#x}) is outside the memory of its parent {parent} ({parent_size:#x} bytes); a level can only hand down memory it owns")]
    OutsideParent {
        /// The parent.
        parent: LevelId,
        /// Requested base.
        base: u64,
        /// Requested size.
        size: u64,
        /// The parent's memory size.
        parent_size: u64,
    },
    /// An access that is not inside a level's window.
    #[error("access of {len} bytes at {addr:#x} is outside the {size:#x}-byte memory of {level}")]
    OutOfWindow {
        /// Level whose window refused it.
        level: LevelId,
        /// Address in that level's space.
        addr: u64,
        /// Length.
        len: u64,
        /// That level's memory size.
        size: u64,
    },
    /// Address plus length (or window base plus address) wraps.
    #[error("access of {len} bytes at {addr:#x} in {level} wraps the 64-bit address space")]
    Overflow {
        /// Level.
        level: LevelId,
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The host level cannot be removed or given a parent.
    #[error("the host (level 0) cannot be removed")]
    Host,
    /// A level that still has children cannot be removed.
    #[error("{0} still has nested guests; remove them first")]
    HasChildren(LevelId),
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("nesting deeper than {MAX_DEPTH} levels is refused")]
    TooDeep,
    /// All ids are used.
    #[error("no free level id left")]
    NoFreeId,
}

/// A non-empty window `[base, base+size)` of a parent's guest-physical space that does not
/// wrap the 64-bit space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    base: u64,
    size: u64,
}

impl Window {
    /// Checked constructor: rejects a zero size and a window whose last byte wraps.
    pub fn new(base: u64, size: u64) -> Result<Window, LevelError> {
        if size == 0 || base.checked_add(size - 1).is_none() {
            return Err(LevelError::BadWindow { base, size });
        }
        Ok(Window { base, size })
    }
    /// Base in the parent's space.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// Size in bytes (never zero): the child's addresses are `0..size`.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Last parent address covered (inclusive).
    pub fn last(&self) -> u64 {
        self.base + (self.size - 1)
    }
    /// Translate `[addr, addr+len)` of the child to the parent's space, or `None` when
    /// the range is not inside the window. A zero `len` is checked as one byte.
    pub fn translate(&self, addr: u64, len: u64) -> Option<u64> {
        let end = addr.checked_add(len.max(1))?;
        if end > self.size {
            return None;
        }
        // addr < size, so base + addr <= last, which does not wrap.
        Some(self.base + addr)
    }
}

/// One registered level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    id: LevelId,
    parent: Option<LevelId>,
    window: Window,
    depth: u32,
}

impl Level {
    /// Its id.
    pub fn id(&self) -> LevelId {
        self.id
    }
    /// Its parent (`None` for the host).
    pub fn parent(&self) -> Option<LevelId> {
        self.parent
    }
    /// Its window in the parent's space (the host's is `[0, host_size)`).
    pub fn window(&self) -> Window {
        self.window
    }
    /// Size of its guest-physical space.
    pub fn size(&self) -> u64 {
        self.window.size
    }
    /// Nesting depth (host 0).
    pub fn depth(&self) -> u32 {
        self.depth
    }
}

/// The registry of levels. See the module documentation.
#[derive(Debug, Clone)]
pub struct Levels {
    levels: BTreeMap<LevelId, Level>,
    next: u32,
}

impl Levels {
    /// A registry holding only the host, whose memory is `host_size` bytes.
    pub fn new(host_size: u64) -> Result<Levels, LevelError> {
        let window = Window::new(0, host_size)?;
        let mut levels = BTreeMap::new();
        levels.insert(
            LevelId::HOST,
            Level {
                id: LevelId::HOST,
                parent: None,
                window,
                depth: 0,
            },
        );
        Ok(Levels { levels, next: 1 })
    }

    /// Look up a level.
    pub fn get(&self, id: LevelId) -> Result<&Level, LevelError> {
        self.levels.get(&id).ok_or(LevelError::Unknown(id))
    }

    /// Register a nested guest of `parent` whose memory is `window` of the parent's space.
    pub fn add(&mut self, parent: LevelId, window: Window) -> Result<LevelId, LevelError> {
        let p = self.get(parent)?;
        if window.last() >= p.size() {
            return Err(LevelError::OutsideParent {
                parent,
                base: window.base,
                size: window.size,
                parent_size: p.size(),
            });
        }
        let depth = p.depth + 1;
        if depth > MAX_DEPTH {
            return Err(LevelError::TooDeep);
        }
        let id = LevelId(self.next);
        self.next = self.next.checked_add(1).ok_or(LevelError::NoFreeId)?;
        self.levels.insert(
            id,
            Level {
                id,
                parent: Some(parent),
                window,
                depth,
            },
        );
        tracing::debug!(%id, %parent, base = window.base, size = window.size, "nested level added");
        Ok(id)
    }

    /// Remove a level that has no nested guests of its own.
    pub fn remove(&mut self, id: LevelId) -> Result<(), LevelError> {
        if id == LevelId::HOST {
            return Err(LevelError::Host);
        }
        self.get(id)?;
        if self.levels.values().any(|l| l.parent == Some(id)) {
            return Err(LevelError::HasChildren(id));
        }
        self.levels.remove(&id);
        tracing::debug!(%id, "nested level removed");
        Ok(())
    }

    /// All levels, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Level> {
        self.levels.values()
    }

    /// True when `child` is a direct nested guest of `parent`.
    pub fn is_child_of(&self, child: LevelId, parent: LevelId) -> bool {
        self.levels
            .get(&child)
            .is_some_and(|l| l.parent == Some(parent))
    }

    /// Translate `[addr, addr+len)` of level `id` to its parent's space (checked against
    /// the level's window). For the host this checks the range against host memory and
    /// returns `addr`.
    pub fn to_parent(&self, id: LevelId, addr: u64, len: u64) -> Result<u64, LevelError> {
        let l = self.get(id)?;
        let end = addr.checked_add(len.max(1)).ok_or(LevelError::Overflow {
            level: id,
            addr,
            len,
        })?;
        if end > l.size() {
            return Err(LevelError::OutOfWindow {
                level: id,
                addr,
                len,
                size: l.size(),
            });
        }
        if l.parent.is_none() {
            return Ok(addr);
        }
        l.window.base.checked_add(addr).ok_or(LevelError::Overflow {
            level: id,
            addr,
            len,
        })
    }

    /// Translate `[addr, addr+len)` of level `id` to a host address, checking the range at
    /// every level on the way (window, overflow). A zero `len` is checked as one byte.
    pub fn to_host(&self, id: LevelId, addr: u64, len: u64) -> Result<u64, LevelError> {
        let mut cur = id;
        let mut a = addr;
        loop {
            a = self.to_parent(cur, a, len)?;
            match self.get(cur)?.parent {
                Some(p) => cur = p,
                None => return Ok(a),
            }
        }
    }

    /// The chain from `id` up to the host, inclusive (`[id, parent, ..., HOST]`).
    pub fn chain(&self, id: LevelId) -> Result<Vec<LevelId>, LevelError> {
        let mut out = vec![id];
        let mut cur = self.get(id)?;
        while let Some(p) = cur.parent {
            out.push(p);
            cur = self.get(p)?;
        }
        Ok(out)
    }

    /// The single host window that level `id`'s memory occupies (windows compose).
    pub fn host_window(&self, id: LevelId) -> Result<Window, LevelError> {
        let size = self.get(id)?.size();
        let base = self.to_host(id, 0, size)?;
        Window::new(base, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_constructor_checks() {
        assert!(Window::new(0, 0).is_err());
        assert!(Window::new(u64::MAX, 2).is_err());
        let w = Window::new(u64::MAX, 1).unwrap();
        assert_eq!(w.last(), u64::MAX);
        let w = Window::new(0x1000, 0x1000).unwrap();
        assert_eq!(w.translate(0xfff, 1), Some(0x1fff));
        assert_eq!(w.translate(0xfff, 2), None);
        assert_eq!(w.translate(0x1000, 0), None);
        assert_eq!(w.translate(u64::MAX, 1), None);
    }

    #[test]
    fn child_window_must_lie_in_parent() {
        let mut l = Levels::new(0x10000).unwrap();
        let l1 = l
            .add(LevelId::HOST, Window::new(0x4000, 0x8000).unwrap())
            .unwrap();
        assert!(matches!(
            l.add(l1, Window::new(0x4000, 0x4001).unwrap()),
            Err(LevelError::OutsideParent { .. })
        ));
        let l2 = l.add(l1, Window::new(0x4000, 0x4000).unwrap()).unwrap();
        assert_eq!(l.to_host(l2, 0, 1).unwrap(), 0x8000);
        assert!(matches!(
            l.add(LevelId(99), Window::new(0, 1).unwrap()),
            Err(LevelError::Unknown(_))
        ));
        assert_eq!(l.remove(l1), Err(LevelError::HasChildren(l1)));
        assert_eq!(l.remove(LevelId::HOST), Err(LevelError::Host));
        l.remove(l2).unwrap();
        l.remove(l1).unwrap();
        assert_eq!(l.get(l1).unwrap_err(), LevelError::Unknown(l1));
    }

    #[test]
    fn depth_is_bounded() {
        let mut l = Levels::new(1 << 40).unwrap();
        let mut cur = LevelId::HOST;
        for _ in 0..MAX_DEPTH {
            cur = l.add(cur, Window::new(0, 1 << 20).unwrap()).unwrap();
        }
        assert_eq!(l.get(cur).unwrap().depth(), MAX_DEPTH);
        assert_eq!(
            l.add(cur, Window::new(0, 1).unwrap()),
            Err(LevelError::TooDeep)
        );
        assert_eq!(l.chain(cur).unwrap().len(), MAX_DEPTH as usize + 1);
    }
}
