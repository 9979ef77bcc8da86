//! The process's allocator (mimalloc, set in `main.rs`) and how it is tuned for the service's
//! load: writes allocate and free large batches on blocking threads, many times a second.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_option_get, mi_option_set, mi_option_t, mi_realloc,
    mi_realloc_aligned, mi_zalloc, mi_zalloc_aligned,
};

/// The alignment every mimalloc block has: block sizes are whole words, and a page's first
/// block is aligned to 16 bytes (`MI_PAGE_MIN_START_BLOCK_ALIGN`).
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator, asked for plain blocks where the layout's alignment is a
/// word or less, as nearly all of the service's are.
///
/// The `mimalloc` crate's allocator asks for every block through `mi_malloc_aligned`. mimalloc
/// v3 takes that call's fast path only while a page of the size's bin has a free block; past
/// it, a size whose block is not a power of two (48 bytes, 1,500) is over-allocated into a
/// larger bin through the generic aligned path, so the bin's own pages never fill: the call
/// costs more and the block more memory (mimalloc's `alloc-aligned.c`,
/// `mi_malloc_is_naturally_aligned`). Callgrind counted that path at about 3% of the
/// pipeline's instructions (docs/benchmarks.md, "Plain blocks from mimalloc").
pub struct Allocator;

/// Whether a block of `align` needs the aligned API.
fn needs_aligned_api(align: usize) -> bool {
    align > WORD
}

// SAFETY: every block comes from mimalloc and goes back to it through `mi_free`, which takes
// blocks from either API. A plain block is word-aligned (see `WORD`), which satisfies any
// layout of that alignment or less; larger alignments go through the aligned API.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if needs_aligned_api(layout.align()) {
            mi_malloc_aligned(layout.size(), layout.align()).cast()
        } else {
            mi_malloc(layout.size()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if needs_aligned_api(layout.align()) {
            mi_zalloc_aligned(layout.size(), layout.align()).cast()
        } else {
            mi_zalloc(layout.size()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if needs_aligned_api(layout.align()) {
            mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        } else {
            mi_realloc(ptr.cast(), new_size).cast()
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v3: after `mi_option_eager_commit_delay`,
/// 14, and before `mi_option_use_numa_nodes`, 16, which `libmimalloc-sys` names).
const PURGE_DELAY: mi_option_t = 15;

/// Keeps the pages mimalloc frees for reuse instead of returning them to the system a second
/// after they fall empty. The store stage's batches came back on fresh pages, which the kernel
/// zeroes first: a tenth of the store stage's samples went to those page faults, and never
/// purging took about 6% off the CPU per event for about 50 MiB more peak RSS (six runs each;
/// docs/benchmarks.md, "Freed pages kept"). The process then stays near its peak. A purge delay
/// set in the environment (`MIMALLOC_PURGE_DELAY`, in milliseconds) is left as it is: where
/// memory is short, returning pages is worth their faults.
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's integer options, which it reads when it next decides to
    // purge; any value is valid for it, and -1 means never.
    unsafe { mi_option_set(PURGE_DELAY, -1) };
}

/// mimalloc's purge delay, in milliseconds (-1: never).
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: reads one of mimalloc's integer options.
    unsafe { mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_every_size_have_their_alignment_and_keep_their_bytes() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 64, 4096] {
            // Sizes around mimalloc's bins, small to large, many of each so that pages fill
            // and fresh ones are taken.
            for size in (1..=4200).step_by(37).chain([48, 1500, 65_536, 300_000]) {
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                let blocks: Vec<*mut u8> = (0..64)
                    .map(|i| {
                        // SAFETY: a layout of non-zero size.
                        let p = unsafe {
                            if i % 2 == 0 {
                                a.alloc(layout)
                            } else {
                                a.alloc_zeroed(layout)
                            }
                        };
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                        // SAFETY: `p` holds `size` bytes.
                        unsafe { p.write_bytes(0xA5, size) };
                        p
                    })
                    .collect();
                for p in blocks {
                    let grown = size * 3 + 5;
                    // SAFETY: `p` came from `alloc` with `layout`, and `grown` is non-zero.
                    let q = unsafe { a.realloc(p, layout, grown) };
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "grown from {size}, align {align}");
                    // SAFETY: `q` holds the first `size` bytes of `p`.
                    let kept = unsafe { std::slice::from_raw_parts(q, size) };
                    assert!(
                        kept.iter().all(|b| *b == 0xA5),
                        "size {size} kept its bytes"
                    );
                    let grown = Layout::from_size_align(grown, align).expect("a valid layout");
                    // SAFETY: `q` came from `realloc` to `grown`'s size.
                    unsafe { a.dealloc(q, grown) };
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_where_a_freed_block_is_taken_again() {
        let a = Allocator;
        let layout = Layout::from_size_align(1500, 8).expect("a valid layout");
        for _ in 0..100 {
            // SAFETY: a layout of non-zero size; each block is freed with it.
            unsafe {
                let p = a.alloc(layout);
                p.write_bytes(0xFF, layout.size());
                a.dealloc(p, layout);
                let z = a.alloc_zeroed(layout);
                assert!(std::slice::from_raw_parts(z, layout.size())
                    .iter()
                    .all(|b| *b == 0));
                a.dealloc(z, layout);
            }
        }
    }

    #[test]
    fn the_option_set_is_the_purge_delay() {
        // mimalloc v3's default purge delay: were the option's index another option's, this
        // would read that option's default instead.
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Err(_) => {
                assert_eq!(purge_delay_ms(), 1000);
                keep_freed_pages();
                assert_eq!(purge_delay_ms(), -1);
            }
            // The environment's delay is mimalloc's, and stays.
            Ok(delay) => {
                keep_freed_pages();
                assert_eq!(purge_delay_ms().to_string(), delay);
            }
        }
    }
}
