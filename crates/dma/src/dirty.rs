//! Dirty-page logging for device DMA writes (VFIO DMA_LOGGING_START / REPORT).
//!
//! One bit per page per logged range, kept in atomics so that concurrent device writes
//! only need the table's shared lock. A report reads and clears the bits it covers.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{DmaError, DmaRange};

struct LoggedRange {
    range: DmaRange,
    bits: Vec<AtomicU64>,
}

/// Dirty bitmaps for a set of IOVA ranges.
pub struct DirtyLog {
    page_shift: u32,
    ranges: Vec<LoggedRange>,
}

/// Most pages one log may track (1 TiB of 4 KiB pages: 32 MiB of bitmap).
const MAX_PAGES: u64 = 1 << 28;

impl DirtyLog {
    /// Log `ranges` at `page_size` granularity (a power of two, at least 4 KiB... or any
    /// power of two >= 512 bytes). Ranges must not overlap.
    pub fn new(page_size: u64, ranges: &[DmaRange]) -> Result<Self, DmaError> {
        if !page_size.is_power_of_two() || page_size < 512 {
            return Err(DmaError::Invalid(format!(
                "dirty-log page size {page_size:#x} must be a power of two of at least 512"
            )));
        }
        if ranges.is_empty() {
            return Err(DmaError::Invalid(
                "dirty logging needs at least one range".into(),
            ));
        }
        let page_shift = page_size.trailing_zeros();
        let mut total = 0u64;
        let mut out: Vec<LoggedRange> = Vec::new();
        for r in ranges {
            if out.iter().any(|o| o.range.overlaps(r)) {
                return Err(DmaError::Invalid(format!(
                    "dirty-log range at {:#x} overlaps another",
                    r.start()
                )));
            }
            let pages = pages_of(*r, page_shift);
            total = total.saturating_add(pages);
            if total > MAX_PAGES {
                return Err(DmaError::Invalid(format!(
                    "dirty logging of more than {MAX_PAGES} pages refused; use a larger page size"
                )));
            }
            let words = pages.div_ceil(64) as usize;
            out.push(LoggedRange {
                range: *r,
                bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        Ok(DirtyLog {
            page_shift,
            ranges: out,
        })
    }

    /// The logging granularity.
    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Mark `[iova, iova+len)` dirty where it falls in a logged range.
    pub fn mark(&self, iova: u64, len: u64) {
        let Ok(w) = DmaRange::new(iova, len.max(1)) else {
            return;
        };
        for r in &self.ranges {
            if !r.range.overlaps(&w) {
                continue;
            }
            let lo = w.start().max(r.range.start()) - r.range.start();
            let hi = w.last().min(r.range.last()) - r.range.start();
            let base = r.range.start() & !((1u64 << self.page_shift) - 1);
            let off = r.range.start() - base;
            for page in ((lo + off) >> self.page_shift)..=((hi + off) >> self.page_shift) {
                let (word, bit) = ((page / 64) as usize, page % 64);
                if let Some(a) = r.bits.get(word) {
                    a.fetch_or(1 << bit, Ordering::Relaxed);
                }
            }
        }
    }

    /// Read and clear the bitmap for `range` (which must lie inside one logged range and
    /// be aligned to `page_size`, a power of two at least the logging page size).
    pub fn report(&self, range: DmaRange, page_size: u64) -> Result<Vec<u64>, DmaError> {
        if !page_size.is_power_of_two() || page_size < self.page_size() {
            return Err(DmaError::Invalid(format!(
                "report page size {page_size:#x} must be a power of two >= {:#x}",
                self.page_size()
            )));
        }
        if !range.start().is_multiple_of(page_size) {
            return Err(DmaError::Invalid(format!(
                "report range {:#x} is not aligned to {page_size:#x}",
                range.start()
            )));
        }
        let r = self
            .ranges
            .iter()
            .find(|r| r.range.contains(range.start()) && r.range.contains(range.last()))
            .ok_or_else(|| {
                DmaError::Invalid(format!(
                    "report range [{:#x}, +{:#x}) is not inside a logged range",
                    range.start(),
                    range.len()
                ))
            })?;
        let shift = page_size.trailing_zeros();
        let out_pages = range.len().div_ceil(page_size);
        if out_pages > MAX_PAGES {
            return Err(DmaError::Invalid("report bitmap too large".into()));
        }
        let mut out = vec![0u64; out_pages.div_ceil(64) as usize];
        let base = r.range.start() & !((1u64 << self.page_shift) - 1);
        let first = (range.start().max(base) - base) >> self.page_shift;
        let last = (range.last() - base) >> self.page_shift;
        for page in first..=last {
            let (word, bit) = ((page / 64) as usize, page % 64);
            let Some(a) = r.bits.get(word) else { break };
            if a.load(Ordering::Relaxed) & (1 << bit) == 0 {
                continue;
            }
            a.fetch_and(!(1 << bit), Ordering::Relaxed);
            let addr = base + (page << self.page_shift);
            let o = (addr.max(range.start()) - range.start()) >> shift;
            out[(o / 64) as usize] |= 1 << (o % 64);
        }
        Ok(out)
    }
}

fn pages_of(r: DmaRange, shift: u32) -> u64 {
    let first = r.start() >> shift;
    let last = r.last() >> shift;
    last - first + 1
}
