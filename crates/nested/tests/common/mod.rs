//! Test helpers: build x86-64 page tables in a guest memory.
#![allow(dead_code)]

use nestio_nested::walk::{PTE_ADDR_MASK, PTE_P, PTE_PS, PTE_RW, PTE_US};
use nestio_nested::{GuestPhysMemory, PageSize};

/// Builds 4-level page tables in `mem`, allocating table pages from `pool`.
pub struct PtBuilder<'a, M: GuestPhysMemory + ?Sized> {
    mem: &'a M,
    next: u64,
    /// Guest-physical address of the PML4.
    pub cr3: u64,
}

fn shift(level: u32) -> u32 {
    12 + 9 * (level - 1)
}

impl<'a, M: GuestPhysMemory + ?Sized> PtBuilder<'a, M> {
    pub fn new(mem: &'a M, pool: u64) -> Self {
        let mut b = PtBuilder {
            mem,
            next: pool,
            cr3: 0,
        };
        b.cr3 = b.alloc();
        b
    }

    /// A builder over existing tables rooted at `cr3`.
    pub fn with_root(mem: &'a M, cr3: u64, pool: u64) -> Self {
        PtBuilder {
            mem,
            next: pool,
            cr3,
        }
    }

    fn alloc(&mut self) -> u64 {
        let a = self.next;
        self.mem
            .write(a, &[0u8; 4096])
            .expect("table pool inside memory");
        self.next += 4096;
        a
    }

    /// Address of the entry for `va` at `level` (4 = PML4 .. 1 = PT), creating
    /// intermediate tables (P|RW|US) as needed.
    pub fn entry_addr(&mut self, va: u64, level: u32) -> u64 {
        let mut table = self.cr3;
        let mut l = 4;
        loop {
            let at = table + ((va >> shift(l)) & 0x1ff) * 8;
            if l == level {
                return at;
            }
            let e = self.mem.read_u64(at).unwrap();
            table = if e & PTE_P == 0 {
                let t = self.alloc();
                self.mem.write_u64(at, t | PTE_P | PTE_RW | PTE_US).unwrap();
                t
            } else {
                e & PTE_ADDR_MASK
            };
            l -= 1;
        }
    }

    /// Map `va` to `gpa` with a page of `size`; `flags` are added to P (and PS).
    pub fn map(&mut self, va: u64, gpa: u64, size: PageSize, flags: u64) {
        let (level, ps) = match size {
            PageSize::Size4K => (1, 0),
            PageSize::Size2M => (2, PTE_PS),
            PageSize::Size1G => (3, PTE_PS),
        };
        let at = self.entry_addr(va, level);
        self.mem.write_u64(at, gpa | flags | ps | PTE_P).unwrap();
    }

    /// Change the entry for `va` at `level`: set bits `set`, clear bits `clear`.
    pub fn modify(&mut self, va: u64, level: u32, set: u64, clear: u64) {
        let at = self.entry_addr(va, level);
        let e = self.mem.read_u64(at).unwrap();
        self.mem.write_u64(at, (e & !clear) | set).unwrap();
    }
}

/// Deterministic xorshift64* generator for randomized tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A recognisable byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
