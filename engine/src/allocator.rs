//! The process allocator: mimalloc by default (the `mimalloc` feature; glibc's malloc with
//! `--no-default-features`), its tuning at start, and giving freed memory back after
//! connection churn. Owns no engine state; the binary installs the global allocator itself.
//!
//! Why mimalloc: the shards allocate and free small objects per message (frames, requests,
//! store commands) across threads; with glibc's malloc that cost ~20% of a shard's time in
//! the chat scenario (`_int_malloc`, `malloc_consolidate`), and mimalloc delivered 47% more
//! chat messages/s on the same machine. Tuned as below it holds no more memory per idle
//! connection than glibc (see bench-results/).

/// mimalloc option numbers (`mi_option_t` in mimalloc.h, v3).
#[cfg(feature = "mimalloc")]
mod option {
    /// Commit arena memory on first use rather than eagerly when an arena is reserved.
    pub const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    /// Milliseconds before freed pages are returned to the OS.
    pub const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
}

/// Tunes the allocator; call first thing in `main`, before threads start. An option given in
/// the environment (`MIMALLOC_ARENA_EAGER_COMMIT`, `MIMALLOC_PURGE_DELAY`) is left as given.
pub fn setup() {
    #[cfg(feature = "mimalloc")]
    for (opt, env, value) in [
        (option::ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (option::PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: a plain option setter of the mimalloc library, valid at any time.
            unsafe { libmimalloc_sys::mi_option_set(opt, value) };
        }
    }
}

/// Returns this thread's free heap memory to the OS (after many connections closed).
pub fn release_free_memory() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: collects the calling thread's mimalloc heap; harmless if it is not in use.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    // SAFETY: malloc_trim only returns free pages of glibc's heap to the kernel (a no-op
    // when glibc's malloc holds nothing).
    unsafe {
        libc::malloc_trim(0);
    }
}
