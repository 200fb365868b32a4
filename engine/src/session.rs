//! One terminal's live connection as its shard sees it: identity, the bounded outbound queue
//! of shared frame bytes, close requests and activity. The socket itself is owned by the
//! connection task (`conn`); this module never does I/O except `write_queued` on a given fd.
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;

use crate::message::Wire;
use crate::parking::WakeList;
use crate::ratelimit::Gate;
use crate::ws::close_code;

/// A session's slot on its shard: slab index and a generation, so a stale key never reaches a
/// newer session that reused the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub slot: u32,
    pub generation: u32,
}

/// The platform a terminal says it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Web,
    Ios,
    Android,
    Desktop,
    Other,
}

impl Platform {
    pub fn parse(s: &str) -> Option<Platform> {
        Some(match s {
            "web" => Platform::Web,
            "ios" => Platform::Ios,
            "android" => Platform::Android,
            "desktop" => Platform::Desktop,
            "other" => Platform::Other,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Web => "web",
            Platform::Ios => "ios",
            Platform::Android => "android",
            Platform::Desktop => "desktop",
            Platform::Other => "other",
        }
    }
}

/// Why a connection was closed. Every close has one; it is counted and kept for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The terminal closed (close frame or EOF).
    PeerClosed,
    /// No frame within the idle timeout.
    Idle,
    /// Kicked through the API or the admin port.
    Kicked,
    /// The same (user, device) connected again.
    Replaced,
    /// The outbound queue went over its byte bound.
    SlowConsumer,
    /// Too many invalid frames.
    ProtocolViolation,
    /// A frame over the size limit.
    FrameTooBig,
    /// Broken WebSocket framing.
    ProtocolError,
    /// A text message (or a close reason) that is not UTF-8.
    InvalidPayload,
    /// A socket error.
    IoError,
    /// The node is draining.
    Drain,
    /// The node is stopping.
    Shutdown,
}

impl CloseReason {
    pub const ALL: [CloseReason; 12] = [
        CloseReason::PeerClosed,
        CloseReason::Idle,
        CloseReason::Kicked,
        CloseReason::Replaced,
        CloseReason::SlowConsumer,
        CloseReason::ProtocolViolation,
        CloseReason::FrameTooBig,
        CloseReason::ProtocolError,
        CloseReason::InvalidPayload,
        CloseReason::IoError,
        CloseReason::Drain,
        CloseReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Idle => "idle",
            CloseReason::Kicked => "kicked",
            CloseReason::Replaced => "replaced",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ProtocolViolation => "protocol_violation",
            CloseReason::FrameTooBig => "frame_too_big",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidPayload => "invalid_payload",
            CloseReason::IoError => "io_error",
            CloseReason::Drain => "drain",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// The WebSocket close code sent for this reason, if a close frame is sent at all.
    pub fn close_code(self) -> Option<u16> {
        match self {
            CloseReason::PeerClosed => Some(close_code::NORMAL),
            CloseReason::Idle => Some(close_code::IDLE),
            CloseReason::Kicked | CloseReason::Replaced => Some(close_code::KICKED),
            CloseReason::SlowConsumer => Some(close_code::SLOW_CONSUMER),
            CloseReason::ProtocolViolation => Some(close_code::POLICY_VIOLATION),
            CloseReason::FrameTooBig => Some(close_code::TOO_BIG),
            CloseReason::ProtocolError => Some(close_code::PROTOCOL_ERROR),
            CloseReason::InvalidPayload => Some(close_code::INVALID_PAYLOAD),
            CloseReason::IoError => None,
            CloseReason::Drain => Some(close_code::SERVICE_RESTART),
            CloseReason::Shutdown => Some(close_code::GOING_AWAY),
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Frames waiting to be written, as shared bytes; `front_offset` bytes of the first one are
/// already written.
#[derive(Debug, Default)]
struct OutQueue {
    frames: VecDeque<Bytes>,
    /// Queued bytes (at most `limits.outbound_queue_bytes_max`, which is below 4 GiB).
    bytes: u32,
    front_offset: u32,
}

/// Whether a session is served by a connection task or parked (see `parking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkState {
    /// A connection task serves it.
    Active,
    /// The shard asked its task to park it when nothing is in flight.
    Requested,
    /// No task: the socket waits in the shard's epoll set.
    Parked,
    /// Parked, and already queued to be taken back to a task.
    Waking,
}

/// A pushed inbox message waiting for the terminal's ack.
#[derive(Debug)]
struct Unacked {
    seq: u64,
    /// The message id (for `message.delivered`).
    id: u64,
    frame: Bytes,
    attempts: u32,
    /// Shard tick it was first pushed at.
    pushed_tick: u32,
    due_tick: u64,
    /// When it was first pushed, in ms of the shard's clock (for the ack latency).
    pushed_ms: u64,
}

/// A group a session is in, and how far its terminal acknowledged what this connection was
/// pushed of it. Nothing per message: what is unacknowledged is the range from `acked` to
/// the last seq its shard fanned out to the group's members (`Shard::group_pushed`).
#[derive(Debug)]
pub struct GroupCursor {
    pub group: Arc<str>,
    /// Group seq up to which nothing is pushed again: the terminal's cumulative ack, or the
    /// last seq before this connection's live pushes of the group began;
    /// [`GroupCursor::FROM_NEXT_PUSH`] until the shard knows that seq.
    pub acked: u64,
    /// Shard tick of the last ack that moved `acked` (or of the join).
    pub acked_tick: u64,
    /// Resends of the current unacknowledged range so far.
    pub attempts: u32,
    /// Shard tick before which no resend is due (0: nothing unacknowledged seen yet).
    pub due_tick: u64,
}

impl GroupCursor {
    /// `acked` of a member added while online to a group its shard has fanned out nothing
    /// of yet: its live pushes begin with the first the shard fans out (set on its next look).
    pub const FROM_NEXT_PUSH: u64 = u64::MAX;

    pub fn new(group: Arc<str>, acked: u64, now_tick: u64) -> Self {
        GroupCursor { group, acked, acked_tick: now_tick, attempts: 0, due_tick: 0 }
    }

    /// A cumulative ack of the group up to `seq`; true if it moved the position.
    pub fn ack(&mut self, seq: u64, now_tick: u64) -> bool {
        if self.acked != Self::FROM_NEXT_PUSH && seq <= self.acked {
            return false;
        }
        self.acked = seq;
        self.acked_tick = now_tick;
        self.attempts = 0;
        self.due_tick = 0;
        true
    }

    /// Whether a resend of `(acked, pushed]` is due at `now` (and counts it): after
    /// `timeout_ticks` without ack progress and from the first time the range was seen, then
    /// after twice as long each time, at most `attempts_max` times per position. The range
    /// to push again is the caller's to read from the store.
    pub fn resend_due(&mut self, pushed: u64, now: u64, timeout_ticks: u64, attempts_max: u32) -> bool {
        debug_assert_ne!(self.acked, Self::FROM_NEXT_PUSH, "resolved by the caller first");
        if pushed <= self.acked {
            self.due_tick = 0;
            return false;
        }
        if self.due_tick == 0 {
            self.due_tick = now + timeout_ticks;
            return false;
        }
        if now < self.due_tick.max(self.acked_tick + timeout_ticks) || self.attempts >= attempts_max {
            return false;
        }
        self.attempts += 1;
        self.due_tick = now + (timeout_ticks << self.attempts.min(16));
        true
    }
}

/// Most frames gathered into one `sendmsg`.
const IOV_MAX_PER_WRITE: usize = 64;

/// A live terminal on its home shard. Every parked terminal is one of these and little else,
/// so its size counts (`size_is_bounded` keeps it in mimalloc's 320-byte class with its `Rc`).
pub struct Session {
    pub key: SessionKey,
    /// Node-unique session id, sent in `welcome`.
    pub id: u64,
    /// The user id, shared with the shard's user index.
    pub user: Arc<str>,
    pub device: Box<str>,
    pub platform: Platform,
    /// The subprotocol: how every frame to this terminal is encoded.
    pub wire: Wire,
    pub remote: SocketAddr,
    /// Unix milliseconds when the terminal connected.
    pub since_ms: u64,
    out: RefCell<OutQueue>,
    waker: Cell<Option<Waker>>,
    close: Cell<Option<CloseReason>>,
    /// Shard tick of the last frame received (ticks of 250 ms fit 32 bits for 34 years).
    last_active: Cell<u32>,
    violations: Cell<u32>,
    /// Highest inbox seq the terminal acknowledged.
    pub acked_inbox: Cell<u64>,
    /// Highest inbox seq pushed to the terminal.
    pub pushed_inbox: Cell<u64>,
    /// Shard tick of the last ack that forgot tracked messages: resends wait while acks move.
    last_ack_progress: Cell<u32>,
    /// This terminal's push → ack time, smoothed, and its mean deviation, in ms (RFC 6298's
    /// SRTT and RTTVAR; 0 before the first sample): see [`Session::ack_timeout_ms`].
    ack_srtt_ms: Cell<u32>,
    ack_rttvar_ms: Cell<u32>,
    /// The session is in its shard's list of unsaved ack positions (inbox or groups).
    pub ack_dirty: Cell<bool>,
    /// `acked_inbox` moved since it was last saved to the store.
    pub inbox_dirty: Cell<bool>,
    /// Pushed inbox messages not yet acknowledged, oldest first (shared frame bytes).
    unacked: RefCell<VecDeque<Unacked>>,
    /// The groups this session is indexed under on its shard, each with how far the terminal
    /// acknowledged it (for group resends: `groups::Shard::resend_groups_due`).
    pub groups: RefCell<Vec<GroupCursor>>,
    /// A `sync` of this terminal is being answered: one at a time (each holds a page).
    pub sync_in_flight: Cell<bool>,
    /// Shard tick of the last write to the socket.
    last_write: Cell<u32>,
    park: Cell<ParkState>,
    /// The socket while parked (a task owns it otherwise).
    parked_fd: Cell<Option<OwnedFd>>,
    /// Where `wake` queues the session while it is parked.
    wake_list: Rc<WakeList>,
    /// `limits.terminal_sends_per_s` for this terminal.
    pub send_gate: Gate,
    /// `limits.terminal_requests_per_s` (`sync`, `read`) for this terminal.
    pub request_gate: Gate,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("key", &self.key)
            .field("id", &self.id)
            .field("user", &self.user)
            .field("device", &self.device)
            .field("platform", &self.platform)
            .field("wire", &self.wire)
            .field("remote", &self.remote)
            .field("close", &self.close.get())
            .field("park", &self.park.get())
            .field("queued_bytes", &self.queued_bytes())
            .finish_non_exhaustive()
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The session is closing; the frame was dropped (it will come back by `sync`).
    Closing,
    /// The queue went over its bound: the session is now closing as a slow consumer.
    Overflow,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: SessionKey,
        id: u64,
        user: Arc<str>,
        device: Box<str>,
        platform: Platform,
        wire: Wire,
        remote: SocketAddr,
        since_ms: u64,
        now_tick: u64,
        wake_list: Rc<WakeList>,
    ) -> Session {
        Session {
            key,
            id,
            user,
            device,
            platform,
            wire,
            remote,
            since_ms,
            out: RefCell::default(),
            waker: Cell::new(None),
            close: Cell::new(None),
            last_active: Cell::new(now_tick as u32),
            violations: Cell::new(0),
            acked_inbox: Cell::new(0),
            pushed_inbox: Cell::new(0),
            last_ack_progress: Cell::new(0),
            ack_srtt_ms: Cell::new(0),
            ack_rttvar_ms: Cell::new(0),
            ack_dirty: Cell::new(false),
            inbox_dirty: Cell::new(false),
            unacked: RefCell::default(),
            groups: RefCell::default(),
            sync_in_flight: Cell::new(false),
            last_write: Cell::new(now_tick as u32),
            park: Cell::new(ParkState::Active),
            parked_fd: Cell::new(None),
            wake_list,
            send_gate: Gate::default(),
            request_gate: Gate::default(),
        }
    }

    /// Queues a frame unless that would put more than `queue_bytes_max` bytes in the queue. An
    /// empty queue takes any one frame: a message bigger than the bound (a configured bound
    /// below the largest message) goes out alone instead of closing its terminal at every push
    /// and every `sync`, forever.
    pub fn push(&self, frame: Bytes, queue_bytes_max: usize) -> Pushed {
        if self.close.get().is_some() {
            return Pushed::Closing;
        }
        {
            let mut q = self.out.borrow_mut();
            if q.bytes > 0 && q.bytes as usize + frame.len() > queue_bytes_max {
                drop(q);
                self.request_close(CloseReason::SlowConsumer);
                return Pushed::Overflow;
            }
            q.bytes += frame.len() as u32;
            q.frames.push_back(frame);
        }
        self.wake();
        Pushed::Queued
    }

    /// Queues a frame that must go out even while closing (the close frame, `kicked`).
    pub fn push_final(&self, frame: Bytes) {
        {
            let mut q = self.out.borrow_mut();
            q.bytes += frame.len() as u32;
            q.frames.push_back(frame);
        }
        self.wake();
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.out.borrow().bytes as usize
    }

    /// Asks the connection task to close for `reason` (the first reason wins).
    pub fn request_close(&self, reason: CloseReason) {
        if self.close.get().is_none() {
            self.close.set(Some(reason));
            self.wake();
        }
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.get()
    }

    /// A whole frame was read at `tick` (bytes of an incomplete one are no activity).
    pub fn touch(&self, tick: u64) {
        self.last_active.set(tick as u32);
    }

    pub fn last_active(&self) -> u64 {
        u64::from(self.last_active.get())
    }

    /// Counts an invalid frame; returns the count so far.
    pub fn violation(&self) -> u32 {
        let v = self.violations.get() + 1;
        self.violations.set(v);
        v
    }

    /// Remembers the connection task's waker (cloned only when it changed).
    pub fn set_waker(&self, waker: &Waker) {
        let old = self.waker.take();
        self.waker.set(match old {
            Some(old) if old.will_wake(waker) => Some(old),
            _ => Some(waker.clone()),
        });
    }

    /// Wakes the connection task, or queues a parked session to get one.
    fn wake(&self) {
        match self.park.get() {
            ParkState::Parked => {
                self.park.set(ParkState::Waking);
                self.wake_list.push(self.key);
            }
            ParkState::Waking => {}
            ParkState::Active | ParkState::Requested => {
                let w = self.waker.take();
                if let Some(w) = &w {
                    w.wake_by_ref();
                }
                self.waker.set(w);
            }
        }
    }

    // ---- parking (see `parking`) ----------------------------------------------------------

    pub fn park_state(&self) -> ParkState {
        self.park.get()
    }

    /// Shard tick of the last frame read or bytes written.
    pub fn last_io(&self) -> u64 {
        u64::from(self.last_active.get().max(self.last_write.get()))
    }

    pub fn note_write(&self, tick: u64) {
        self.last_write.set(tick as u32);
    }

    /// Nothing in flight: no queued output, no unacknowledged push, not closing.
    pub fn quiet(&self) -> bool {
        self.close.get().is_none() && !self.has_queued() && self.unacked.borrow().is_empty()
    }

    /// Asks the connection task to park the session at its next idle moment.
    pub fn request_park(&self) {
        if self.park.get() == ParkState::Active {
            self.park.set(ParkState::Requested);
            self.wake();
        }
    }

    /// The task could not park now (a frame half read, say): it keeps serving.
    pub fn decline_park(&self) {
        if self.park.get() == ParkState::Requested {
            self.park.set(ParkState::Active);
        }
    }

    /// The task ended; the session keeps `fd` until it is woken. Drops the task's waker (it
    /// would keep the finished task's memory) and the queues' buffers.
    pub fn park_with(&self, fd: OwnedFd) {
        debug_assert!(self.quiet(), "parked with something in flight");
        debug_assert_eq!(self.park.get(), ParkState::Requested);
        self.parked_fd.set(Some(fd));
        self.park.set(ParkState::Parked);
        self.waker.set(None);
        self.out.borrow_mut().frames = VecDeque::new();
        *self.unacked.borrow_mut() = VecDeque::new();
    }

    /// The parked socket, still owned by the session (None when not parked).
    pub fn parked_raw_fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        let fd = self.parked_fd.take();
        let raw = fd.as_ref().map(AsRawFd::as_raw_fd);
        self.parked_fd.set(fd);
        raw
    }

    /// Served without a task (see `conn::serve_parked`): parked again, so the next push
    /// queues it again.
    pub fn stay_parked(&self) {
        debug_assert!(matches!(self.park.get(), ParkState::Parked | ParkState::Waking));
        self.park.set(ParkState::Parked);
        self.out.borrow_mut().frames = VecDeque::new();
    }

    /// Takes the parked socket back for a new connection task (None when not parked).
    pub fn unpark(&self) -> Option<OwnedFd> {
        match self.park.get() {
            ParkState::Parked | ParkState::Waking => {
                self.park.set(ParkState::Active);
                let fd = self.parked_fd.take();
                debug_assert!(fd.is_some(), "parked without its socket");
                fd
            }
            ParkState::Active | ParkState::Requested => None,
        }
    }

    /// Pushed inbox messages the terminal has not acknowledged yet.
    pub fn unacked(&self) -> u64 {
        self.pushed_inbox.get().saturating_sub(self.acked_inbox.get())
    }

    /// Remembers an inbox message pushed at shard tick `now` until it is acked (its first
    /// resend comes due a timeout after `now`, see [`Session::due_resends`]). Keeps at most
    /// `max`, in seq order (the lowest are then left to `sync`). Returns whether the caller
    /// must schedule a resend check a timeout after `now`: when nothing was tracked, and when
    /// nothing was tracked yet at this tick. The check already scheduled may be an older
    /// message's backoff (up to `timeout << attempts` away): this one's first resend must not
    /// wait for it. One check per tick of pushes, however many messages it pushed.
    pub fn track_unacked(&self, seq: u64, id: u64, frame: Bytes, now: u64, pushed_ms: u64, max: usize) -> bool {
        let mut u = self.unacked.borrow_mut();
        let needs_check = u.back().is_none_or(|last| last.pushed_tick != now as u32);
        let m = Unacked { seq, id, frame, attempts: 0, pushed_tick: now as u32, due_tick: now, pushed_ms };
        // Kept in seq order, once per seq, so a cumulative ack forgets a prefix: a `sync` page
        // (older seqs) pushed after live messages goes before them, a seq pushed again (live,
        // then by a `sync` from an older position) replaces its entry.
        match u.back() {
            Some(last) if last.seq >= seq => match u.binary_search_by_key(&seq, |m| m.seq) {
                Ok(i) => u[i] = m,
                Err(i) => u.insert(i, m),
            },
            _ => u.push_back(m),
        }
        debug_assert!(u.iter().zip(u.iter().skip(1)).all(|(a, b)| a.seq < b.seq), "tracked in seq order");
        while u.len() > max {
            u.pop_front();
        }
        needs_check
    }

    /// A cumulative ack at shard tick `now` (`now_ms` on the shard's ms clock): forgets every
    /// tracked message up to `seq`, telling `acked` when each was first pushed and its id;
    /// returns how many. The oldest one forgotten is a sample of this terminal's ack time,
    /// measured from its first push even if it was resent. Karn's rule (skip resent segments'
    /// samples) is not applied, on purpose: TCP's ambiguity is that a retransmitted segment's
    /// ack may answer either copy, but on one WebSocket connection the first push is never lost
    /// in transit, so the ack answers it and the sample is true. Skipping them starved the
    /// estimate (tried in 874c13a: a terminal acking slower than the configured timeout had
    /// every early message resent, so no sample ever came and every message went 2-3 times).
    pub fn ack_inbox(&self, seq: u64, now: u64, now_ms: u64, mut acked: impl FnMut(u64, u64)) -> usize {
        if seq > self.acked_inbox.get() {
            self.acked_inbox.set(seq);
        }
        let mut u = self.unacked.borrow_mut();
        let before = u.len();
        let mut oldest_pushed_ms = None;
        while u.front().is_some_and(|m| m.seq <= seq) {
            if let Some(m) = u.pop_front() {
                oldest_pushed_ms.get_or_insert(m.pushed_ms);
                acked(m.pushed_ms, m.id);
            }
        }
        if let Some(pushed_ms) = oldest_pushed_ms {
            self.sample_ack_time(now_ms.saturating_sub(pushed_ms));
        }
        if u.is_empty() && u.capacity() > 16 {
            *u = VecDeque::new();
        }
        let forgot = before - u.len();
        if forgot > 0 {
            self.last_ack_progress.set(now as u32);
        }
        forgot
    }

    /// Whether a tracked (pushed, not acked) inbox message is at or below `seq`.
    pub fn tracks_inbox_up_to(&self, seq: u64) -> bool {
        self.unacked.borrow().front().is_some_and(|m| m.seq <= seq)
    }

    /// Folds one push → ack time into the smoothed estimate (RFC 6298, 2.2 and 2.3).
    fn sample_ack_time(&self, ms: u64) {
        let r = ms.min(u64::from(u32::MAX / 8)) as u32;
        let (srtt, rttvar) = (self.ack_srtt_ms.get(), self.ack_rttvar_ms.get());
        if srtt == 0 && rttvar == 0 {
            self.ack_srtt_ms.set(r.max(1));
            self.ack_rttvar_ms.set(r / 2);
        } else {
            self.ack_rttvar_ms.set(((3 * u64::from(rttvar) + u64::from(srtt.abs_diff(r))) / 4) as u32);
            self.ack_srtt_ms.set(((7 * u64::from(srtt) + u64::from(r)) / 8).max(1) as u32);
        }
    }

    /// How long this terminal's acks have been taking, as a retransmission timeout: smoothed
    /// push → ack time plus four mean deviations (RFC 6298's RTO); 0 before the first ack. The
    /// shard waits the larger of this and `limits.resend_timeout_ms` before a resend, so a
    /// terminal whose acks take 5 s (a slow link, or a node behind under load) is not sent
    /// every message twice.
    pub fn ack_timeout_ms(&self) -> u64 {
        u64::from(self.ack_srtt_ms.get()) + 4 * u64::from(self.ack_rttvar_ms.get())
    }

    /// Frames due for a resend at `now`: each is pushed again at most `attempts_max` times,
    /// the first `timeout_ticks` after its push, then waiting `timeout_ticks << attempt`
    /// between pushes, then left to `sync`. Returns the frames to push and the next tick a
    /// check is due, if any message is still tracked. The caller gives the larger of its
    /// configured timeout and [`Session::ack_timeout_ms`].
    ///
    /// While the terminal's acks move (one forgot a tracked message within the last
    /// `timeout_ticks`), nothing is resent and no attempt is counted: the terminal is reading,
    /// only behind, and its ack for a due message is on its way behind the frames before it.
    /// Resending then would add to a backlog that is already the terminal's (or the node's)
    /// limit; as TCP restarts its retransmission timer on every ack, due messages wait for
    /// `timeout_ticks` without ack progress instead.
    pub fn due_resends(&self, now: u64, timeout_ticks: u64, attempts_max: u32) -> (Vec<Bytes>, Option<u64>) {
        let mut u = self.unacked.borrow_mut();
        let mut frames = Vec::new();
        let acks_quiet_at = u64::from(self.last_ack_progress.get()) + timeout_ticks;
        u.retain_mut(|m| {
            if m.due_tick > now {
                return true;
            }
            let wait_until = if m.attempts == 0 {
                acks_quiet_at.max(u64::from(m.pushed_tick) + timeout_ticks)
            } else {
                acks_quiet_at
            };
            if wait_until > now {
                m.due_tick = wait_until;
                return true;
            }
            if m.attempts >= attempts_max {
                return false;
            }
            m.attempts += 1;
            m.due_tick = now + (timeout_ticks << m.attempts.min(16));
            frames.push(m.frame.clone());
            true
        });
        let next = u.iter().map(|m| m.due_tick).min();
        (frames, next)
    }

    pub fn has_queued(&self) -> bool {
        !self.out.borrow().frames.is_empty()
    }

    /// Forgets every queued frame not started yet (a frame partly written stays, so the
    /// stream stays well framed): a slow consumer's backlog, dropped so its close frame can
    /// go next.
    pub fn drop_unstarted(&self) {
        let mut q = self.out.borrow_mut();
        let keep = usize::from(q.front_offset > 0).min(q.frames.len());
        q.frames.truncate(keep);
        q.bytes = q.frames.front().map_or(0, |f| (f.len() - q.front_offset as usize) as u32);
    }

    /// The unwritten part of the first queued frame (what to hand to a readiness-waiting write).
    pub fn with_front<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let q = self.out.borrow();
        q.frames.front().map(|b| f(&b[q.front_offset as usize..]))
    }

    /// Marks `n` queued bytes as written.
    pub fn advance(&self, mut n: usize) {
        let mut q = self.out.borrow_mut();
        q.bytes -= n as u32;
        while n > 0 {
            let Some(front) = q.frames.front() else {
                debug_assert!(false, "advanced past the queue");
                return;
            };
            let left = front.len() - q.front_offset as usize;
            if n >= left {
                n -= left;
                q.frames.pop_front();
                q.front_offset = 0;
            } else {
                q.front_offset += n as u32;
                n = 0;
            }
        }
        if q.frames.is_empty() && q.frames.capacity() > 8 {
            // Give back the queue's memory once a burst is written: idle sessions hold none.
            q.frames = VecDeque::new();
        }
    }

    /// Writes as much of the queue as the socket takes, gathering frames into one `sendmsg`
    /// (non-blocking). Returns bytes written; `WouldBlock` when the socket is full.
    pub fn write_queued(&self, fd: RawFd) -> std::io::Result<usize> {
        let n = {
            let q = self.out.borrow();
            let mut iov: [libc::iovec; IOV_MAX_PER_WRITE] =
                [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOV_MAX_PER_WRITE];
            let mut count = 0;
            for (i, frame) in q.frames.iter().take(IOV_MAX_PER_WRITE).enumerate() {
                let part = if i == 0 { &frame[q.front_offset as usize..] } else { &frame[..] };
                iov[i] = libc::iovec { iov_base: part.as_ptr() as *mut libc::c_void, iov_len: part.len() };
                count += 1;
            }
            if count == 0 {
                return Ok(0);
            }
            // SAFETY: a zeroed msghdr is valid; iov points at `count` live buffers borrowed from
            // the queue, which is not touched until sendmsg returns.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = count;
            // SAFETY: fd is a socket owned by the caller; msg is fully initialised above.
            let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            r as usize
        };
        self.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::new(
            SessionKey { slot: 0, generation: 1 },
            1,
            Arc::from("u"),
            "d".into(),
            Platform::Web,
            Wire::Json,
            "127.0.0.1:1".parse().unwrap(),
            0,
            0,
            Rc::new(WakeList::default()),
        )
    }

    #[test]
    fn queue_is_bounded_in_bytes() {
        let s = session();
        assert_eq!(s.push(Bytes::from_static(&[1; 60]), 100), Pushed::Queued);
        assert_eq!(s.push(Bytes::from_static(&[2; 40]), 100), Pushed::Queued);
        assert_eq!(s.queued_bytes(), 100);
        assert_eq!(s.push(Bytes::from_static(&[3; 1]), 100), Pushed::Overflow);
        assert_eq!(s.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(s.push(Bytes::from_static(&[3; 1]), 100), Pushed::Closing);
        assert_eq!(s.queued_bytes(), 100, "nothing queued after the overflow");
    }

    #[test]
    fn an_empty_queue_takes_one_frame_bigger_than_the_bound() {
        let s = session();
        assert_eq!(s.push(Bytes::from_static(&[1; 150]), 100), Pushed::Queued, "alone, it goes out");
        assert_eq!(s.push(Bytes::from_static(&[2; 1]), 100), Pushed::Overflow, "nothing after it until written");
        assert_eq!(s.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn a_dropped_backlog_keeps_the_frame_partly_written() {
        let s = session();
        s.push(Bytes::from_static(b"abc"), 100);
        s.push(Bytes::from_static(b"defg"), 100);
        s.drop_unstarted();
        assert!(!s.has_queued(), "nothing started: everything goes");
        assert_eq!(s.queued_bytes(), 0);
        s.push(Bytes::from_static(b"abc"), 100);
        s.push(Bytes::from_static(b"defg"), 100);
        s.advance(1);
        s.drop_unstarted();
        assert_eq!(s.with_front(<[u8]>::to_vec), Some(b"bc".to_vec()), "the started frame is finished");
        assert_eq!(s.queued_bytes(), 2);
        s.advance(2);
        assert!(!s.has_queued());
    }

    #[test]
    fn partial_writes_advance_through_frames() {
        let s = session();
        s.push(Bytes::from_static(b"abc"), 100);
        s.push(Bytes::from_static(b"defg"), 100);
        s.advance(2);
        assert_eq!(s.with_front(|b| b.to_vec()), Some(b"c".to_vec()));
        s.advance(2);
        assert_eq!(s.with_front(|b| b.to_vec()), Some(b"efg".to_vec()));
        s.advance(3);
        assert!(!s.has_queued());
        assert_eq!(s.queued_bytes(), 0);
    }

    #[test]
    fn write_queued_gathers_frames() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = session();
        for part in [&b"hello "[..], b"big ", b"world"] {
            s.push(Bytes::copy_from_slice(part), 100);
        }
        use std::os::fd::AsRawFd;
        assert_eq!(s.write_queued(a.as_raw_fd()).unwrap(), 15);
        let mut got = [0u8; 15];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(&got, b"hello big world");
        assert!(!s.has_queued());
    }

    #[test]
    fn unacked_messages_are_resent_with_backoff_then_left_to_sync() {
        let s = session();
        assert!(s.track_unacked(1, 11, Bytes::from_static(b"one"), 0, 0, 100));
        assert!(s.track_unacked(2, 12, Bytes::from_static(b"two"), 2, 0, 100), "a check of its own");
        assert_eq!(s.due_resends(9, 10, 2), (vec![], Some(10)));
        let (frames, next) = s.due_resends(10, 10, 2);
        assert_eq!(frames, vec![Bytes::from_static(b"one")]);
        assert_eq!(next, Some(12));
        let (frames, next) = s.due_resends(12, 10, 2);
        assert_eq!(frames, vec![Bytes::from_static(b"two")]);
        assert_eq!(next, Some(30), "second attempt waits twice as long");
        let (frames, _) = s.due_resends(30, 10, 2);
        assert_eq!(frames, vec![Bytes::from_static(b"one")]);
        // Attempts used up: dropped from tracking, left to sync.
        let (frames, next) = s.due_resends(1000, 10, 2);
        assert_eq!(frames, vec![Bytes::from_static(b"two")]);
        assert_eq!(s.due_resends(10_000, 10, 2), (vec![], None));
        assert_eq!(next, Some(1000 + 40));
    }

    #[test]
    fn a_message_pushed_during_an_older_ones_backoff_asks_for_a_check_of_its_own() {
        let s = session();
        assert!(s.track_unacked(1, 11, Bytes::from_static(b"old"), 0, 0, 100), "the first: a check");
        assert!(!s.track_unacked(2, 12, Bytes::from_static(b"same tick"), 0, 0, 100), "covered by that check");
        // 1 and 2 resent at 10, 1 and 2 again at 30: the next check is due at 70.
        assert_eq!(s.due_resends(10, 10, 5).1, Some(30));
        assert_eq!(s.due_resends(30, 10, 5).1, Some(70));
        // Pushed at 31, 3 is due at 41: the check at 70 is far too late for it.
        assert!(s.track_unacked(3, 13, Bytes::from_static(b"new"), 31, 0, 100), "a check of its own");
        assert!(!s.track_unacked(4, 14, Bytes::from_static(b"new too"), 31, 0, 100));
        assert_eq!(
            s.due_resends(41, 10, 5),
            (vec![Bytes::from_static(b"new"), Bytes::from_static(b"new too")], Some(61)),
            "resent a timeout after their push"
        );
    }

    #[test]
    fn nothing_is_resent_while_acks_move_and_resends_start_once_they_stop() {
        let s = session();
        // Pushed at tick 0 and 1, due at 10 and 11 (timeout 10 ticks).
        s.track_unacked(1, 11, Bytes::from_static(b"one"), 0, 0, 100);
        s.track_unacked(2, 12, Bytes::from_static(b"two"), 1, 0, 100);
        s.track_unacked(3, 13, Bytes::from_static(b"three"), 1, 0, 100);
        // The terminal is behind but reading: it acks 1 at tick 8.
        assert_eq!(s.ack_inbox(1, 8, 2000, |_, _| ()), 1);
        // 2 and 3 came due at 11, but acks moved within the last 10 ticks: no resend, no
        // attempt counted; they wait until 10 ticks after that ack.
        assert_eq!(s.due_resends(11, 10, 2), (vec![], Some(18)));
        // An older or equal ack is not progress.
        assert_eq!(s.ack_inbox(1, 15, 3750, |_, _| ()), 0);
        // Acks stopped: at 18 both are resent (first attempt), the next check after 20 ticks.
        let (frames, next) = s.due_resends(18, 10, 2);
        assert_eq!(frames, vec![Bytes::from_static(b"two"), Bytes::from_static(b"three")]);
        assert_eq!(next, Some(38));
        // The terminal acks 2 at 30: 3 is not resent at 38, but waits until 40.
        assert_eq!(s.ack_inbox(2, 30, 7500, |_, _| ()), 1);
        assert_eq!(s.due_resends(38, 10, 2), (vec![], Some(40)));
        let (frames, next) = s.due_resends(40, 10, 2);
        assert_eq!(
            frames,
            vec![Bytes::from_static(b"three")],
            "second attempt: attempts were not used up while waiting"
        );
        assert_eq!(next, Some(80));
        assert_eq!(s.due_resends(80, 10, 2), (vec![], None), "attempts used up: left to sync");
    }

    #[test]
    fn the_ack_timeout_follows_the_terminals_own_ack_times() {
        let s = session();
        assert_eq!(s.ack_timeout_ms(), 0, "no sample yet: the configured timeout alone");
        for seq in 1..=3 {
            s.track_unacked(seq, seq, Bytes::from_static(b"m"), 0, 1_000 * seq, 100);
        }
        // One ack for 1 and 2: the oldest (pushed at 1,000 ms, acked at 5,000) is the sample.
        assert_eq!(s.ack_inbox(2, 20, 5_000, |_, _| ()), 2);
        assert_eq!(s.ack_timeout_ms(), 4_000 + 4 * 2_000, "first sample R: SRTT = R, RTTVAR = R/2");
        assert_eq!(s.ack_inbox(3, 28, 7_000, |_, _| ()), 1);
        assert_eq!(s.ack_timeout_ms(), 4_000 + 4 * 1_500, "same time again: the deviation shrinks");
        // A terminal whose acks take 4 s: with a 3 s (12-tick) configured timeout the shard
        // passes 40 ticks (10 s); a message pushed at 100 is not resent at 112 but at 140.
        s.track_unacked(4, 4, Bytes::from_static(b"four"), 100, 25_000, 100);
        assert_eq!(s.due_resends(112, 40, 3), (vec![], Some(140)));
        assert_eq!(s.due_resends(140, 40, 3).0, vec![Bytes::from_static(b"four")]);
    }

    #[test]
    fn acks_are_cumulative_and_tracking_is_bounded() {
        let s = session();
        for seq in 1..=10 {
            s.track_unacked(seq, seq, Bytes::from_static(b"m"), 0, seq, 4);
        }
        let mut pushed = Vec::new();
        assert_eq!(s.ack_inbox(8, 0, 10, |p, _| pushed.push(p)), 2, "only 7 and 8 of the 4 kept were acked");
        assert_eq!(pushed, vec![7, 8]);
        assert_eq!(s.acked_inbox.get(), 8);
        assert_eq!(s.ack_inbox(3, 0, 10, |_, _| ()), 0, "an older ack changes nothing");
        assert_eq!(s.acked_inbox.get(), 8);
        assert_eq!(s.ack_inbox(10, 0, 10, |_, _| ()), 2);
        assert_eq!(s.due_resends(100, 1, 3), (vec![], None));
    }

    #[test]
    fn parking_moves_through_its_states_once() {
        let wake_list = Rc::new(WakeList::default());
        let s = Session::new(
            SessionKey { slot: 3, generation: 4 },
            1,
            Arc::from("u"),
            "d".into(),
            Platform::Web,
            Wire::Json,
            "127.0.0.1:1".parse().unwrap(),
            0,
            0,
            wake_list.clone(),
        );
        assert_eq!(s.park_state(), ParkState::Active);
        assert!(s.unpark().is_none(), "an active session has no parked socket");
        // Asked, then declined: active again.
        s.request_park();
        assert_eq!(s.park_state(), ParkState::Requested);
        s.decline_park();
        assert_eq!(s.park_state(), ParkState::Active);
        // Parked: pushes queue it once for a task, however many come.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        s.request_park();
        s.park_with(OwnedFd::from(a));
        assert_eq!(s.park_state(), ParkState::Parked);
        assert!(wake_list.is_empty());
        s.push(Bytes::from_static(b"one"), 100);
        s.push(Bytes::from_static(b"two"), 100);
        s.request_close(CloseReason::Kicked);
        assert_eq!(s.park_state(), ParkState::Waking);
        assert_eq!(wake_list.keys.borrow().as_slice(), &[s.key], "queued once");
        // Taken back once: the socket comes out, the queue is intact.
        assert!(s.unpark().is_some());
        assert!(s.unpark().is_none());
        assert_eq!(s.park_state(), ParkState::Active);
        assert_eq!(s.queued_bytes(), 6);
    }

    #[test]
    fn size_is_bounded() {
        // With the `Rc` header (16 bytes) a session fits mimalloc's 320-byte size class; one
        // byte more and every terminal costs 64 bytes more (the 384-byte class).
        assert!(std::mem::size_of::<Session>() + 16 <= 320, "{}", std::mem::size_of::<Session>());
    }

    #[test]
    fn a_group_cursor_resends_after_quiet_acks_with_backoff_and_a_bound() {
        let mut c = GroupCursor::new("g".into(), 5, 0);
        // Nothing beyond the ack position: nothing due.
        assert!(!c.resend_due(5, 100, 4, 2));
        // Seq 6 pushed, seen at tick 10: due a timeout (4 ticks) later, not before.
        assert!(!c.resend_due(6, 10, 4, 2));
        assert!(!c.resend_due(6, 13, 4, 2));
        assert!(c.resend_due(6, 14, 4, 2), "first resend after the timeout");
        assert!(!c.resend_due(6, 21, 4, 2), "the next waits twice as long");
        assert!(c.resend_due(6, 22, 4, 2));
        assert!(!c.resend_due(6, 1000, 4, 2), "at most attempts_max per position");
        // An ack that moves the position starts over, and the resend waits for quiet acks.
        assert!(c.ack(6, 1000));
        assert!(!c.ack(6, 1001), "not moved");
        assert!(!c.resend_due(7, 1001, 4, 2));
        assert!(!c.resend_due(7, 1003, 4, 2), "acks moved within the timeout");
        assert!(!c.resend_due(7, 1004, 4, 2), "due a timeout after it was seen");
        assert!(c.resend_due(7, 1005, 4, 2));
        // Caught up: nothing due, and the next range waits a full timeout again.
        assert!(c.ack(7, 1006));
        assert!(!c.resend_due(7, 1006, 4, 2));
        assert!(!c.resend_due(8, 1020, 4, 2));
        assert!(c.resend_due(8, 1024, 4, 2));
    }

    #[test]
    fn first_close_reason_wins() {
        let s = session();
        s.request_close(CloseReason::Kicked);
        s.request_close(CloseReason::Idle);
        assert_eq!(s.close_reason(), Some(CloseReason::Kicked));
        assert_eq!(CloseReason::Kicked.close_code(), Some(4001));
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
