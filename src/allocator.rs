//! How the process's allocator (mimalloc, set in `main.rs`) is tuned for the service's load:
//! writes allocate and free large batches on blocking threads, many times a second.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

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
