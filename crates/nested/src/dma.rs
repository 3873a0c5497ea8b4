//! DMA for a device passed through to a nested guest.
//!
//! A device assigned to a level-n guest is programmed with that guest's physical
//! addresses. [`NestedDma`] is the [`DmaSpace`] such a device uses: it checks each access
//! against the level's window and hands it, rebased, to the parent's space. Chained level
//! by level ([`nested_dma_space`]) the parent of the top is the host's space (a vfio-user
//! map table, or messages to the owner when memory cannot be shared by fd). Whatever a
//! level-n guest programs, its device can only reach the level's own window: anything
//! outside (including ranges that wrap) is [`DmaError::Unmapped`] and no byte moves.
//!
//! Errors coming back from the parent name parent addresses; they are rebased to the
//! child's address space when the address lies in the window, so the device model sees
//! addresses it knows and never learns where its memory lives in the parent.
//!
//! The window is copied at construction: removing a level from [`Levels`] does not revoke
//! a `NestedDma` already handed out — drop it together with the device.

use std::sync::Arc;

use nestio_dma::{Access, DmaError, DmaSpace};

use crate::level::{LevelError, LevelId, Levels, Window};

/// A child level's DMA space: its window of the parent's space.
pub struct NestedDma {
    parent: Arc<dyn DmaSpace>,
    window: Window,
    level: LevelId,
}

impl std::fmt::Debug for NestedDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedDma")
            .field("level", &self.level)
            .field("window", &self.window)
            .finish()
    }
}

impl NestedDma {
    /// The DMA space of `level`, whose memory is `window` of `parent`.
    pub fn new(parent: Arc<dyn DmaSpace>, window: Window, level: LevelId) -> NestedDma {
        NestedDma {
            parent,
            window,
            level,
        }
    }
    /// The window in the parent's space.
    pub fn window(&self) -> Window {
        self.window
    }
    /// The level this space belongs to.
    pub fn level(&self) -> LevelId {
        self.level
    }

    fn translate(&self, iova: u64, len: usize, access: Access) -> Result<u64, DmaError> {
        let len = len as u64;
        self.window.translate(iova, len).ok_or_else(|| {
            tracing::debug!(level = %self.level, iova, len, %access, "nested DMA outside the window");
            DmaError::Unmapped { iova, len, access }
        })
    }

    /// Express a parent error in this level's addresses.
    fn rebase(&self, e: DmaError) -> DmaError {
        let back = |a: u64| {
            if a >= self.window.base() && a <= self.window.last() {
                a - self.window.base()
            } else {
                a
            }
        };
        e.map_fault_iova(back)
    }
}

impl DmaSpace for NestedDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if buf.is_empty() {
            return Ok(());
        }
        let p = self.translate(iova, buf.len(), Access::Read)?;
        self.parent.read(p, buf).map_err(|e| self.rebase(e))
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        if data.is_empty() {
            return Ok(());
        }
        let p = self.translate(iova, data.len(), Access::Write)?;
        self.parent.write(p, data).map_err(|e| self.rebase(e))
    }
}

/// The DMA space of level `id`: `host` (the host's space) wrapped once per level from the
/// host down to `id`, each wrapper checking that level's window. For the host itself the
/// result checks host-memory bounds only.
pub fn nested_dma_space(
    levels: &Levels,
    id: LevelId,
    host: Arc<dyn DmaSpace>,
) -> Result<Arc<dyn DmaSpace>, LevelError> {
    let chain = levels.chain(id)?;
    let mut space = host;
    for &l in chain.iter().rev() {
        let window = levels.get(l)?.window();
        space = Arc::new(NestedDma::new(space, window, l));
    }
    Ok(space)
}
