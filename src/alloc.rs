//! A global allocator that keeps a few large freed blocks for reuse.
//!
//! A training step allocates and frees the same handful of very large
//! buffers every micro-batch: the vocabulary logits and their gradient
//! (`tokens × 49,152` floats, about 100 MB each at 512 tokens). glibc serves
//! every block above 32 MiB with a fresh `mmap` and unmaps it on free, so each
//! step the kernel faults in and zeroes those pages again (about 4% of a step).
//! Like PyTorch's caching allocator, this one parks up to [`SLOTS`] freed
//! blocks of at least [`LARGE`] bytes (at most [`BUDGET`] in all) and hands
//! them back for requests of the same rounded size. Everything else goes
//! straight to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// Blocks at least this large are rounded and cached.
pub const LARGE: usize = 16 << 20;
/// Rounding of large sizes, so batches of slightly different lengths share blocks.
const GRAIN: usize = 4 << 20;
/// Cached blocks at most.
pub const SLOTS: usize = 8;
/// Cached bytes at most.
pub const BUDGET: usize = 1 << 30;

/// A parked block: its rounded size, alignment and address.
#[derive(Clone, Copy)]
struct Block {
    size: usize,
    align: usize,
    addr: usize,
}

/// The system allocator with a small cache of large blocks.
pub struct CachingAlloc {
    cache: Mutex<[Option<Block>; SLOTS]>,
    /// Bytes handed out and not yet freed (parked blocks not counted).
    live: AtomicUsize,
    /// The most `live` has been since [`CachingAlloc::reset_peak`].
    peak: AtomicUsize,
}

impl CachingAlloc {
    /// An empty cache.
    pub const fn new() -> Self {
        Self {
            cache: Mutex::new([None; SLOTS]),
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Bytes the program holds now (what it allocated and has not freed).
    pub fn live_bytes(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// The most bytes the program held at once since the last reset.
    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Relaxed)
    }

    /// Starts a new peak from what is held now.
    pub fn reset_peak(&self) {
        self.peak.store(self.live.load(Relaxed), Relaxed);
    }

    fn note(&self, p: *mut u8, size: usize) -> *mut u8 {
        if !p.is_null() {
            let now = self.live.fetch_add(size, Relaxed) + size;
            self.peak.fetch_max(now, Relaxed);
        }
        p
    }

    /// The layout actually requested from the system for `layout`.
    fn rounded(layout: Layout) -> Layout {
        if layout.size() < LARGE {
            return layout;
        }
        let size = layout.size().next_multiple_of(GRAIN);
        Layout::from_size_align(size, layout.align()).unwrap_or(layout)
    }

    /// Takes a parked block matching `layout` (already rounded).
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let mut cache = self.cache.lock().ok()?;
        let slot = cache
            .iter_mut()
            .find(|b| b.is_some_and(|b| b.size == layout.size() && b.align == layout.align()))?;
        slot.take().map(|b| b.addr as *mut u8)
    }

    /// Parks a block of `layout` (already rounded); false when the cache is full.
    fn park(&self, ptr: *mut u8, layout: Layout) -> bool {
        let Ok(mut cache) = self.cache.lock() else {
            return false;
        };
        let held: usize = cache.iter().flatten().map(|b| b.size).sum();
        if held + layout.size() > BUDGET {
            return false;
        }
        match cache.iter_mut().find(|b| b.is_none()) {
            Some(slot) => {
                *slot = Some(Block {
                    size: layout.size(),
                    align: layout.align(),
                    addr: ptr as usize,
                });
                true
            }
            None => false,
        }
    }
}

impl Default for CachingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every block comes from `System` with the rounded layout, goes back
// to it with the same rounded layout, and is handed out by the cache to one
// owner at a time (taken under the lock).
unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let layout = Self::rounded(layout);
        if layout.size() >= LARGE {
            if let Some(p) = self.take(layout) {
                return self.note(p, layout.size());
            }
        }
        self.note(System.alloc(layout), layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let layout = Self::rounded(layout);
        if layout.size() >= LARGE {
            if let Some(p) = self.take(layout) {
                p.write_bytes(0, layout.size());
                return self.note(p, layout.size());
            }
        }
        self.note(System.alloc_zeroed(layout), layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let layout = Self::rounded(layout);
        self.live.fetch_sub(layout.size(), Relaxed);
        if layout.size() >= LARGE && self.park(ptr, layout) {
            return;
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = Self::rounded(layout);
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = Self::rounded(new);
        if old.size() < LARGE && new.size() < LARGE {
            let moved = System.realloc(ptr, layout, new_size);
            if !moved.is_null() {
                self.live.fetch_sub(old.size(), Relaxed);
                self.note(moved, new.size());
            }
            return moved;
        }
        if old.size() == new.size() {
            return ptr;
        }
        let fresh = self.alloc(new);
        if !fresh.is_null() {
            fresh.copy_from_nonoverlapping(ptr, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_reused_small_ones_are_not_cached() {
        let a = CachingAlloc::new();
        let big = Layout::from_size_align(LARGE + 123, 64).unwrap();
        unsafe {
            let p = a.alloc(big);
            assert!(!p.is_null());
            p.write_bytes(7, big.size());
            a.dealloc(p, big);
            // A request of the same rounded size gets the parked block back…
            let same = Layout::from_size_align(LARGE + 4000, 64).unwrap();
            let q = a.alloc(same);
            assert_eq!(p, q);
            a.dealloc(q, same);
            // …zeroed when asked.
            let z = a.alloc_zeroed(big);
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, big.size())
                .iter()
                .all(|&b| b == 0));
            // A different alignment does not match.
            let other = Layout::from_size_align(LARGE + 123, 4096).unwrap();
            let r = a.alloc(other);
            assert_ne!(r, z);
            a.dealloc(r, other);
            a.dealloc(z, big);
            // Growing keeps the contents.
            let small = Layout::from_size_align(1024, 8).unwrap();
            let s = a.alloc(small);
            s.write_bytes(9, 1024);
            let g = a.realloc(s, small, LARGE * 2);
            assert!(std::slice::from_raw_parts(g, 1024).iter().all(|&b| b == 9));
            a.dealloc(g, Layout::from_size_align(LARGE * 2, 8).unwrap());
        }
        let held: usize = a
            .cache
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|b| b.size)
            .sum();
        assert!(held <= BUDGET);
    }

    #[test]
    fn live_bytes_and_their_peak_are_counted() {
        let a = CachingAlloc::new();
        let small = Layout::from_size_align(1000, 8).unwrap();
        let big = Layout::from_size_align(LARGE + 1, 64).unwrap();
        let rounded = LARGE + GRAIN;
        unsafe {
            let s = a.alloc(small);
            let b = a.alloc(big);
            assert_eq!(a.live_bytes(), 1000 + rounded);
            a.dealloc(b, big); // parked: no longer the program's
            assert_eq!(a.live_bytes(), 1000);
            assert_eq!(a.peak_bytes(), 1000 + rounded);
            a.reset_peak();
            assert_eq!(a.peak_bytes(), 1000);
            let b = a.alloc_zeroed(big); // from the cache, counted again
            let s = a.realloc(s, small, 3000);
            assert_eq!(a.live_bytes(), 3000 + rounded);
            assert_eq!(a.peak_bytes(), 3000 + rounded);
            a.dealloc(s, Layout::from_size_align(3000, 8).unwrap());
            a.dealloc(b, big);
        }
        assert_eq!(a.live_bytes(), 0);
    }

    #[test]
    fn the_budget_bounds_what_is_parked() {
        let a = CachingAlloc::new();
        let huge = Layout::from_size_align(BUDGET / 2 + GRAIN, 8).unwrap();
        unsafe {
            let (p, q, r) = (a.alloc(huge), a.alloc(huge), a.alloc(huge));
            a.dealloc(p, huge);
            a.dealloc(q, huge); // over budget: back to the system
            a.dealloc(r, huge);
        }
        let parked = a.cache.lock().unwrap().iter().flatten().count();
        assert_eq!(parked, 1);
    }
}
