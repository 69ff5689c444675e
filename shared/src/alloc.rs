//! The settings of the binaries' allocator (mimalloc, each binary's
//! `#[global_allocator]`).
//!
//! mimalloc gives memory it has not reused for `purge_delay` (1 s in mimalloc 3) back
//! to the operating system (`madvise`), and the next allocation there faults it in
//! again, zero-filled by the kernel, often a 2 MiB transparent huge page at a time.
//! Under the SRD load that was ~580 page faults and ~50 `madvise` calls a second in
//! the routers, nodes and load generator, and 2–9 % of the acknowledged updates a
//! second (BENCHMARKS.md, stop 28). A service that runs for days at a steady load
//! reuses that memory anyway: it is kept instead, and the process holds its
//! high-water mark.

/// mimalloc's `mi_option_purge_delay` (the same index in mimalloc 2 and 3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The environment variable that sets the purge delay instead (milliseconds; -1:
/// never), read by mimalloc itself at start-up.
pub const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// Keeps freed memory for reuse instead of returning it to the operating system,
/// unless [`PURGE_DELAY_ENV`] says otherwise. Call first thing in `main`.
pub fn keep_freed_memory() {
    if std::env::var_os(PURGE_DELAY_ENV).is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's global options: a store to a global that
    // mimalloc reads when it decides whether to purge (any thread, any time).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_is_mimallocs_purge_delay() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            return;
        }
        // mimalloc 3's default purge delay: the index names that option.
        // SAFETY: reads one of mimalloc's global options.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 1000);
    }
}
