//! Parked connections: idle terminals whose socket waits in one epoll set per shard instead of
//! in a glommio task of their own. Owns the shard's `Parking` (the epoll set, the watcher
//! thread that waits on it, the queues of sessions to wake). Never touches sessions or
//! sockets' contents: the shard decides when to park and what to do with a woken session.
//!
//! Why: an idle terminal held in a task costs about 1 KiB of user memory beyond its session
//! (the task and its future, glommio's poll source for the pending read, the outbound queue's
//! buffer). Most terminals of an IM fleet are idle most of the time (a heartbeat every 30 s),
//! so after `limits.park_idle_after_ms` without I/O the connection task ends and only the
//! session and its fd remain, the fd registered here (one-shot, readable). A new terminal is
//! parked as soon as its `welcome` is written, and one that only sent a heartbeat as soon as
//! the pong is, so connect storms and heartbeats leave no tasks behind. The session is
//! looked at again when its socket becomes readable (the watcher thread queues its key) or when
//! anything is pushed to it on its shard (`Session::wake` queues it in `WakeList`): the shard
//! serves pushes, heartbeats and occasional acks without a task (`conn::serve_parked`) and
//! gives it a task back for anything else (a terminal acking again within the park delay is
//! busy receiving: its own task serves it for less).
use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use atomic_waker::AtomicWaker;
use crossbeam::queue::SegQueue;

use crate::session::SessionKey;

/// Events taken from the epoll set per wait.
const EVENTS_PER_WAIT: usize = 1024;

/// Sessions of this shard woken by a push while parked (shard thread only).
#[derive(Debug, Default)]
pub struct WakeList {
    pub(crate) keys: RefCell<Vec<SessionKey>>,
    waker: RefCell<Option<Waker>>,
}

impl WakeList {
    /// Queues `key` to be taken back to a task and wakes the shard's unpark loop.
    pub fn push(&self, key: SessionKey) {
        self.keys.borrow_mut().push(key);
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.borrow().is_empty()
    }
}

/// What the watcher thread shares with the shard.
struct Ready {
    keys: SegQueue<u64>,
    waker: AtomicWaker,
    stop: AtomicBool,
}

/// One shard's parked sockets: an epoll set (through `polling`) and the thread waiting on it.
pub struct Parking {
    poller: Arc<polling::Poller>,
    ready: Arc<Ready>,
    /// Sessions woken on the shard itself (by pushes).
    pub woken: Rc<WakeList>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

/// The epoll key of a session: slot and generation, so a stale event finds no session.
fn key_bits(key: SessionKey) -> usize {
    ((u64::from(key.slot) << 32) | u64::from(key.generation)) as usize
}

fn key_of(bits: u64) -> SessionKey {
    SessionKey { slot: (bits >> 32) as u32, generation: bits as u32 }
}

impl Parking {
    /// Makes the epoll set and starts its watcher thread (`ether-park-<shard>`).
    pub fn start(shard: usize) -> std::io::Result<Parking> {
        let poller = Arc::new(polling::Poller::new()?);
        let ready = Arc::new(Ready { keys: SegQueue::new(), waker: AtomicWaker::new(), stop: AtomicBool::new(false) });
        let watcher = {
            let (poller, ready) = (poller.clone(), ready.clone());
            std::thread::Builder::new()
                .name(format!("ether-park-{shard}"))
                .stack_size(128 * 1024)
                .spawn(move || watch(&poller, &ready))?
        };
        Ok(Parking { poller, ready, woken: Rc::new(WakeList::default()), watcher: Some(watcher) })
    }

    /// Registers a parked session's socket: its key comes back once when it turns readable
    /// (or errors, or the peer hangs up), including right away if it already is.
    pub fn park(&self, key: SessionKey, fd: &OwnedFd) -> std::io::Result<()> {
        // SAFETY: the fd stays open while registered: the session owns it and `unpark` (or the
        // session's drop, which closes it and so leaves the epoll set) ends the registration.
        unsafe { self.poller.add(fd.as_raw_fd(), polling::Event::readable(key_bits(key))) }
    }

    /// Arms a parked socket again after its readiness was reported and served without a task.
    pub fn rearm(&self, key: SessionKey, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        // SAFETY: the fd is the parked session's open socket, registered by `park`.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        self.poller.modify(fd, polling::Event::readable(key_bits(key)))
    }

    /// Removes a socket from the epoll set before it goes back to a task.
    pub fn unpark(&self, fd: &OwnedFd) {
        // Only fails if it is not registered (it always is here); nothing to undo then.
        let _ = self.poller.delete(fd);
    }

    /// Waits until a session is to be woken, then moves every such key into `out` with whether
    /// its socket turned readable (sessions woken by a push first; a key may be stale or
    /// repeated, the shard checks).
    pub async fn next_batch(&self, out: &mut Vec<(SessionKey, bool)>) {
        std::future::poll_fn(|cx| {
            self.ready.waker.register(cx.waker());
            {
                let mut w = self.woken.waker.borrow_mut();
                if !w.as_ref().is_some_and(|old| old.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
            }
            out.extend(self.woken.keys.borrow_mut().drain(..).map(|k| (k, false)));
            while let Some(bits) = self.ready.keys.pop() {
                out.push((key_of(bits), true));
            }
            if out.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

impl Parking {
    /// Ends the watcher thread (the node is stopping; its sessions are closed).
    pub fn stop(&self) {
        self.ready.stop.store(true, Ordering::Release);
        let _ = self.poller.notify();
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }
}

/// The watcher thread: waits on the epoll set and hands ready keys to the shard.
fn watch(poller: &polling::Poller, ready: &Ready) {
    let mut events = polling::Events::with_capacity(NonZeroUsize::new(EVENTS_PER_WAIT).expect("non-zero"));
    while !ready.stop.load(Ordering::Acquire) {
        events.clear();
        match poller.wait(&mut events, None) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "parked connections: epoll wait failed; stopping the watcher");
                return;
            }
        }
        let mut any = false;
        for ev in events.iter() {
            ready.keys.push(ev.key as u64);
            any = true;
        }
        if any {
            ready.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn keys_round_trip() {
        let k = SessionKey { slot: 123_456, generation: u32::MAX - 3 };
        assert_eq!(key_of(key_bits(k) as u64), k);
    }

    #[test]
    fn a_readable_parked_socket_comes_back_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let fd = OwnedFd::from(server);
        let parking = Parking::start(0).unwrap();
        let key = SessionKey { slot: 7, generation: 9 };
        parking.park(key, &fd).unwrap();
        client.write_all(b"ping").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.is_empty() && std::time::Instant::now() < deadline {
            while let Some(bits) = parking.ready.keys.pop() {
                got.push(key_of(bits));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got, vec![key]);
        // One-shot: more input does not queue the key again until it is parked again.
        client.write_all(b"more").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(parking.ready.keys.pop().is_none());
        parking.unpark(&fd);
        drop(parking); // the watcher stops
    }
}
