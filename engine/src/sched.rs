//! Scheduling hints for the node's threads: the time slice they ask the Linux scheduler for
//! (`node.sched_slice_us`). Owns one system call; knows nothing of shards or connections.
//!
//! Set once on the thread that starts the node, before it spawns any: a thread inherits its
//! creator's scheduling attributes, so the shards, the storage thread and every helper thread
//! get the same slice.
use std::time::Duration;

/// `struct sched_attr` of `sched_setattr(2)` (the fields up to `sched_period`; `size` says so).
#[repr(C)]
#[derive(Debug, Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// `SCHED_OTHER` (the fair class).
const SCHED_OTHER: u32 = 0;

/// Asks the scheduler to run the calling thread (and the threads it creates afterwards) in
/// slices of `slice` (EEVDF's custom slice, Linux 6.12+; the kernel keeps it within
/// 100 µs..100 ms; older kernels take the call and ignore the slice). Keeps the thread's nice
/// value. `Duration::ZERO` leaves the kernel's default.
pub fn request_slice(slice: Duration) -> std::io::Result<()> {
    if slice.is_zero() {
        return Ok(());
    }
    // SAFETY: getpriority only reads the calling process's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: SCHED_OTHER,
        sched_nice: nice,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        ..SchedAttr::default()
    };
    // SAFETY: `attr` is a valid, fully initialised `sched_attr` of the size it declares;
    // pid 0 is the calling thread; the kernel only reads it.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sched_getattr` of the calling thread: (policy, runtime ns).
    fn current() -> (u32, u64) {
        let mut attr = SchedAttr::default();
        // SAFETY: the kernel writes at most `size` bytes into `attr`.
        let r = unsafe {
            libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, std::mem::size_of::<SchedAttr>(), 0)
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        (attr.sched_policy, attr.sched_runtime)
    }

    #[test]
    fn a_thread_and_the_threads_it_creates_get_the_slice() {
        std::thread::spawn(|| {
            request_slice(Duration::from_micros(200)).expect("sched_setattr");
            if current().1 == 0 {
                eprintln!("skipped: this kernel keeps no custom slice for SCHED_OTHER (before 6.12)");
                return;
            }
            assert_eq!(current(), (SCHED_OTHER, 200_000));
            let child = std::thread::spawn(current).join().unwrap();
            assert_eq!(child, (SCHED_OTHER, 200_000), "inherited");
            request_slice(Duration::ZERO).unwrap();
            assert_eq!(current().1, 200_000, "zero changes nothing");
        })
        .join()
        .unwrap();
    }
}
