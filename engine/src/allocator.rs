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

/// Milliseconds freed memory stays in the process before it may be returned (arenas: ten
/// times as long, mimalloc's `arena_purge_mult`). Not 0: under load the shards free and
/// allocate frames and store commands all the time, and returning each freed page at once
/// (`madvise`) only to fault it in again (the kernel zeroing it) cost about 5% of the node's
/// CPU in the chat scenario, about a tenth fewer messages per second. Idle memory still goes:
/// every shard purges what expired once a second ([`purge_expired`]) and everything once it
/// turns quiet; the storage thread everything when idle ([`release_when_idle`]).
#[cfg(feature = "mimalloc")]
const PURGE_DELAY_MS: std::os::raw::c_long = 100;

/// Tunes the allocator; call first thing in `main`, before threads start. An option given in
/// the environment (`MIMALLOC_ARENA_EAGER_COMMIT`, `MIMALLOC_PURGE_DELAY`) is left as given.
pub fn setup() {
    #[cfg(feature = "mimalloc")]
    for (opt, env, value) in [
        (option::ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (option::PURGE_DELAY, "MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: a plain option setter of the mimalloc library, valid at any time.
            unsafe { libmimalloc_sys::mi_option_set(opt, value) };
        }
    }
}

/// Returns free memory whose purge delay has passed to the OS (cheap; call periodically).
pub fn purge_expired() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: a normal (not forced) collection of the calling thread's mimalloc heap.
    unsafe {
        libmimalloc_sys::mi_collect(false);
    }
}

/// For a thread that is idle (the storage thread between commands): returns its free heap
/// memory to the OS, at most once a second.
pub fn release_when_idle() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = std::time::Instant::now();
    if LAST.get().is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1)) {
        LAST.set(Some(now));
        release_free_memory();
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
