//! One window's TCE table: the levels of [`TableGeometry`], allocated on first write.
//!
//! The upper levels are tables of child tables, the last level holds the TCEs. A child
//! table is created when a non-zero TCE is first written under it, so a huge window
//! (a dynamic window covering all of RAM, or far more) costs memory only for what the
//! guest maps. Reading an entry under a missing child gives 0 (no access), as a cleared
//! TCE does. Clearing never frees (the kernel's tables do not shrink either); a reset
//! drops everything. The number of last-level tables is bounded
//! ([`TceTable::with_budget`]): a guest filling a huge window with distinct non-zero
//! TCEs gets an error instead of exhausting host memory.

use super::entry::Tce;
use super::geometry::{TableGeometry, MAX_LEVELS};
use super::TceError;

enum Node {
    Dir(Vec<Option<Box<Node>>>),
    Leaf(Vec<Tce>),
}

/// A window's table. See the module documentation.
pub struct TceTable {
    geometry: TableGeometry,
    root: Node,
    leaves: u64,
    max_leaves: u64,
    populated: u64,
}

impl std::fmt::Debug for TceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TceTable")
            .field("geometry", &self.geometry)
            .field("leaves", &self.leaves)
            .field("populated", &self.populated)
            .finish()
    }
}

/// Default bound on last-level tables of one window (each at least one host page).
pub const DEFAULT_MAX_LEAVES: u64 = 1 << 16;

impl TceTable {
    /// An empty table with the default budget.
    pub fn new(geometry: TableGeometry) -> TceTable {
        TceTable::with_budget(geometry, DEFAULT_MAX_LEAVES)
    }

    /// An empty table allowed at most `max_leaves` last-level tables.
    pub fn with_budget(geometry: TableGeometry, max_leaves: u64) -> TceTable {
        let root = Self::node(&geometry, 0);
        TceTable {
            geometry,
            root,
            leaves: u64::from(geometry.levels() == 1),
            max_leaves: max_leaves.max(1),
            populated: 0,
        }
    }

    fn node(g: &TableGeometry, level: u32) -> Node {
        let n = g.entries_at(level) as usize;
        if level + 1 == g.levels() {
            Node::Leaf(vec![Tce::CLEAR; n])
        } else {
            let mut v = Vec::with_capacity(n);
            v.resize_with(n, || None);
            Node::Dir(v)
        }
    }

    /// The layout.
    pub fn geometry(&self) -> &TableGeometry {
        &self.geometry
    }

    /// Entries currently holding a non-zero TCE.
    pub fn populated(&self) -> u64 {
        self.populated
    }

    /// Last-level tables allocated.
    pub fn leaves(&self) -> u64 {
        self.leaves
    }

    /// The TCE at `index` (0 where nothing was written).
    pub fn get(&self, index: u64) -> Result<Tce, TceError> {
        let idx = self.indices(index)?;
        let mut node = &self.root;
        for &i in &idx[..self.geometry.levels() as usize] {
            match node {
                Node::Dir(children) => match &children[i as usize] {
                    Some(c) => node = c,
                    None => return Ok(Tce::CLEAR),
                },
                Node::Leaf(tces) => return Ok(tces[i as usize]),
            }
        }
        Ok(Tce::CLEAR)
    }

    /// Store `tce` at `index`; returns the previous TCE.
    pub fn set(&mut self, index: u64, tce: Tce) -> Result<Tce, TceError> {
        let idx = self.indices(index)?;
        let levels = self.geometry.levels();
        let geometry = self.geometry;
        let mut node = &mut self.root;
        for (l, &i) in idx[..levels as usize].iter().enumerate() {
            match node {
                Node::Dir(children) => {
                    let slot = &mut children[i as usize];
                    if slot.is_none() {
                        if tce.is_clear() {
                            return Ok(Tce::CLEAR);
                        }
                        let child_level = l as u32 + 1;
                        if child_level + 1 == levels {
                            if self.leaves >= self.max_leaves {
                                return Err(TceError::TableBudget {
                                    leaves: self.max_leaves,
                                });
                            }
                            self.leaves += 1;
                        }
                        *slot = Some(Box::new(Self::node(&geometry, child_level)));
                    }
                    node = slot.as_mut().map(|b| &mut **b).ok_or(TceError::Internal)?;
                }
                Node::Leaf(tces) => {
                    let old = std::mem::replace(&mut tces[i as usize], tce);
                    match (old.is_clear(), tce.is_clear()) {
                        (true, false) => self.populated += 1,
                        (false, true) => self.populated -= 1,
                        _ => {}
                    }
                    return Ok(old);
                }
            }
        }
        Err(TceError::Internal)
    }

    /// Visit every non-zero TCE with its index, in index order.
    pub fn for_each_populated(&self, f: impl FnMut(u64, Tce)) {
        self.for_each_populated_in(0, u64::MAX, f)
    }

    /// Visit the non-zero TCEs with indices in `first..first + count`, in index order;
    /// only the table parts overlapping the range are walked.
    pub fn for_each_populated_in(&self, first: u64, count: u64, mut f: impl FnMut(u64, Tce)) {
        let end = first.saturating_add(count);
        let bits = self.geometry.bits_per_level();
        // Entries covered by one entry at `level` (from the top).
        let span = |level: u32| -> u64 {
            let below = self.geometry.levels() - 1 - level;
            1u64.checked_shl(bits * below).unwrap_or(u64::MAX)
        };
        fn walk(
            node: &Node,
            level: u32,
            base: u64,
            range: (u64, u64),
            span: &dyn Fn(u32) -> u64,
            f: &mut dyn FnMut(u64, Tce),
        ) {
            let s = span(level);
            let (first, end) = range;
            let n = match node {
                Node::Leaf(t) => t.len(),
                Node::Dir(c) => c.len(),
            } as u64;
            // Entries of this table whose span meets the range.
            let lo = first.saturating_sub(base) / s;
            let hi = (end.saturating_sub(base).saturating_add(s - 1) / s).min(n);
            for i in lo..hi {
                let at = base + i * s;
                match node {
                    Node::Leaf(t) => {
                        let tce = t[i as usize];
                        if !tce.is_clear() && at >= first && at < end {
                            f(at, tce);
                        }
                    }
                    Node::Dir(c) => {
                        if let Some(c) = &c[i as usize] {
                            walk(c, level + 1, at, range, span, f);
                        }
                    }
                }
            }
        }
        walk(&self.root, 0, 0, (first, end), &span, &mut f);
    }

    /// Forget every TCE.
    pub fn clear(&mut self) {
        self.root = Self::node(&self.geometry, 0);
        self.leaves = u64::from(self.geometry.levels() == 1);
        self.populated = 0;
    }

    fn indices(&self, index: u64) -> Result<[u64; MAX_LEVELS as usize], TceError> {
        self.geometry.indices(index).ok_or(TceError::Index {
            index,
            entries: self.geometry.entries(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::geometry::PageShift;
    use super::*;

    proptest::proptest! {
        #[test]
        fn range_walk_equals_a_filtered_full_walk(
            levels in 1u32..4,
            idx in proptest::collection::vec(0u64..(1 << 20), 0..40),
            first in 0u64..(1 << 20),
            count in 0u64..(1 << 21),
        ) {
            let g = TableGeometry::new(super::super::geometry::PageShift::K4, 1 << 32, levels, 12).unwrap();
            let mut t = TceTable::new(g);
            for (k, i) in idx.iter().enumerate() {
                t.set(*i, Tce((k as u64 + 1) << 12 | 3)).unwrap();
            }
            let mut all = vec![];
            t.for_each_populated(|i, v| all.push((i, v)));
            let want: Vec<_> = all.into_iter().filter(|(i, _)| *i >= first && *i - first < count).collect();
            let mut got = vec![];
            t.for_each_populated_in(first, count, |i, v| got.push((i, v)));
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn multi_level_tables_allocate_on_write_and_read_back() {
        let g = TableGeometry::new(PageShift::K4, 1 << 40, 3, 12).unwrap();
        let mut t = TceTable::with_budget(g, 3);
        assert_eq!(t.get(12345).unwrap(), Tce::CLEAR);
        assert_eq!(t.set(12345, Tce::CLEAR).unwrap(), Tce::CLEAR);
        assert_eq!(t.leaves(), 0, "clearing allocates nothing");
        let a = Tce(0x1234_5000 | 3);
        assert_eq!(t.set(12345, a).unwrap(), Tce::CLEAR);
        assert_eq!(t.get(12345).unwrap(), a);
        assert_eq!(t.get(12346).unwrap(), Tce::CLEAR);
        let last = g.entries() - 1;
        t.set(last, Tce(0x9000 | 1)).unwrap();
        t.set(last / 2, Tce(0xa000 | 2)).unwrap();
        assert_eq!(t.leaves(), 3);
        // The budget: a fourth leaf is refused, the table unchanged.
        assert!(matches!(
            t.set(1 << 20, Tce(0xb000 | 3)),
            Err(TceError::TableBudget { leaves: 3 })
        ));
        assert_eq!(t.get(1 << 20).unwrap(), Tce::CLEAR);
        let mut seen = vec![];
        t.for_each_populated(|i, tce| seen.push((i, tce)));
        let mut part = vec![];
        t.for_each_populated_in(12346, last / 2 - 12345, |i, tce| part.push((i, tce)));
        assert_eq!(part, vec![(last / 2, Tce(0xa002))]);
        part.clear();
        t.for_each_populated_in(12345, 1, |i, _| part.push((i, Tce::CLEAR)));
        assert_eq!(part.len(), 1);
        assert_eq!(
            seen,
            vec![(12345, a), (last / 2, Tce(0xa002)), (last, Tce(0x9001))]
        );
        assert_eq!(t.populated(), 3);
        assert_eq!(t.set(12345, Tce::CLEAR).unwrap(), a);
        assert_eq!(t.populated(), 2);
        assert!(matches!(t.get(g.entries()), Err(TceError::Index { .. })));
        t.clear();
        assert_eq!((t.populated(), t.leaves()), (0, 0));
        assert_eq!(t.get(last).unwrap(), Tce::CLEAR);
    }
}
