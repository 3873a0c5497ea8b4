//! A device's DMA port: where its owner maps memory, and what its DMA goes through.
//!
//! A local device that does DMA owns a [`DmaPort`]. The port holds two things:
//! - the device's [`MapTable`]: what the owner granted with DMA_MAP / DMA_UNMAP, and what
//!   dirty logging records (the `VfioDevice` defaults work on it);
//! - the [`DmaSpace`] the device model reads and writes through: at first the table
//!   itself; a translating space (an SMMUv3 stage, a TCE window, a nested level's window)
//!   is stacked on it as a decorator with [`DmaPort::stack`] or installed with
//!   [`DmaPort::set_space`], the way `nestio_nested::NestedDma` wraps its parent.
//!
//! Device models never name the concrete table for DMA: they take `&dyn DmaSpace` (the
//! port is one), so any stack of spaces sits between a device and its table without the
//! device knowing. Faults come back as [`DmaError`]s from whichever layer refused, in the
//! addresses the device used if the decorator rebases them (as `NestedDma` does).
//!
//! Swapping the space is atomic with respect to accesses: an access takes the current
//! space (one `Arc` clone under a read lock) and runs on it with the lock released, so a
//! decorator may block (a peer copy) without stalling a swap, and a swap never tears an
//! access in two.

use parking_lot::RwLock;
use std::sync::Arc;

use nestio_dma::{DmaError, DmaSpace, MapTable};

/// A device's DMA port. See the module documentation.
pub struct DmaPort {
    table: Arc<MapTable>,
    space: RwLock<Arc<dyn DmaSpace>>,
}

impl std::fmt::Debug for DmaPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaPort")
            .field("mappings", &self.table.len())
            .field("translated", &self.is_translated())
            .finish()
    }
}

impl Default for DmaPort {
    fn default() -> Self {
        DmaPort::new(MapTable::default())
    }
}

impl DmaPort {
    /// A port over `table`, DMA going straight to the table.
    pub fn new(table: MapTable) -> DmaPort {
        let table = Arc::new(table);
        DmaPort {
            space: RwLock::new(table.clone()),
            table,
        }
    }

    /// The map table the owner maps into.
    pub fn table(&self) -> &MapTable {
        &self.table
    }

    /// The map table, shared (to build a decorator over it).
    pub fn shared_table(&self) -> Arc<MapTable> {
        self.table.clone()
    }

    /// The space the device's DMA goes through now.
    pub fn space(&self) -> Arc<dyn DmaSpace> {
        self.space.read().clone()
    }

    /// Send the device's DMA through `space` from now on (it usually wraps
    /// [`DmaPort::shared_table`]).
    pub fn set_space(&self, space: Arc<dyn DmaSpace>) {
        *self.space.write() = space;
    }

    /// Stack a decorator on the current space: `wrap` gets the current space and returns
    /// the one to use instead.
    pub fn stack(&self, wrap: impl FnOnce(Arc<dyn DmaSpace>) -> Arc<dyn DmaSpace>) {
        let mut s = self.space.write();
        *s = wrap(s.clone());
    }

    /// Send DMA straight to the table again (drop every decorator).
    pub fn reset_space(&self) {
        self.set_space(self.table.clone());
    }

    /// True when DMA goes through something other than the bare table.
    pub fn is_translated(&self) -> bool {
        let table: Arc<dyn DmaSpace> = self.table.clone();
        !Arc::ptr_eq(&self.space(), &table)
    }
}

impl DmaSpace for DmaPort {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.space().read(iova, buf)
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.space().write(iova, data)
    }
}
