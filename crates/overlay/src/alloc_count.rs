//! The lib tests' global allocator: it counts each thread's allocations, so
//! a test can show that a data path (the switch, a relayed datagram through
//! the stack) makes none, and the bytes each thread holds, so that a test
//! can show what a structure costs (e.g. per idle peer).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts this thread's allocations, to prove the data path makes none.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<i64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

/// Bytes allocated minus bytes freed on this thread (memory freed by
/// another thread than the one that allocated it skews both).
fn bytes(delta: i64) {
    let _ = BYTES.try_with(|c| c.set(c.get().wrapping_add(delta)));
}

// SAFETY: forwards to the system allocator unchanged; the counter is a
// const-initialised thread-local Cell, which neither allocates nor
// registers a destructor.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        bytes(layout.size() as i64);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        bytes(-(layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        bytes(new_size as i64 - layout.size() as i64);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

pub(crate) fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Bytes this thread holds on the heap, from its allocations and frees.
pub(crate) fn held() -> i64 {
    BYTES.with(Cell::get)
}
