//! The allocator's side of the agent's memory (issue 22). Some of the
//! agent's work comes in bursts that are O(n) in the cluster's size: a
//! store snapshot of every record, a `peers` or `metrics` answer about
//! every peer. glibc keeps what such a burst freed resident (its heaps
//! shrink only from the top), so an agent's RSS followed its largest
//! burst. Measured with synthetic peers (docs/benchmarks.md, section 9):
//! trimming after each burst cut 1.3 MiB at 256 peers and 3.3 MiB at 1024.
//! One malloc arena for all threads (`M_ARENA_MAX` 1) was tried too and
//! cost 1.2 MiB at no peers and saved nothing over trimming alone (14.5
//! against 13.6 MiB at 256 peers): not used.

/// Gives the free pages of the heap back to the kernel after a burst that
/// was O(n) in the cluster's size: without it the peak of the last
/// snapshot or `peers` answer stays resident (the heap's free space is
/// returned by itself only from its top, and only above 128 KiB).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
