//! `Shard`: one core's share of the node. Owns its sessions, the per-user index of its users'
//! terminals, their inbox sequences, its timer wheel and its end of the mesh. Everything here
//! is single-threaded (one glommio executor); other shards are reached only through
//! [`ShardMsg`]s on the `FanoutMesh`.
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ether_proto::api::TerminalInfo;
use ether_proto::frame::{ClientFrameRef, FrameType, ServerFrame};
use ether_proto::ids::Chat;
use ether_proto::{ApiError, ErrorCode, Kind};
use futures_channel::oneshot;
use glommio::channels::local_channel::LocalReceiver;
use glommio::{Latency, Shares, TaskQueueHandle};
use serde_json::value::RawValue;
use slab::Slab;
use tracing::{debug, info, warn};

use crate::auth::TokenKeys;
use crate::config::Config;
use crate::error::EngineError;
use crate::event_batch::EventBatch;
use crate::mesh::{FanoutMesh, ShardMsg};
use crate::message::{encode_for, frame_set, unix_now_ms, IdGen, NewMessage, Wire};
use crate::parking::{Parking, WakeList};
use crate::ratelimit::{Gate, Rate};
use crate::session::{CloseReason, ParkState, Platform, Pushed, Session, SessionKey};
use crate::stats::{ClosedConn, ConnSnapshot, NodeShared, ShardCounters, ShardPublished};
use crate::storage::{Answer, CommitQueues, TerminalSend};
use crate::wheel::TimerWheel;
use ether_admin::Histogram;
use ether_store::{Op, StoreHandle};

/// Length of one shard tick (clock and timer wheel granularity).
pub const TICK: Duration = Duration::from_millis(250);
/// How often (in ticks) a shard considers giving freed heap back to the kernel.
const TRIM_EVERY_TICKS: u64 = 4;
/// Connects plus closes since the last trim that make one worth it.
const TRIM_CHURN_MIN: u64 = 256;
/// What a terminal frame was, as parking sees it: a heartbeat lets an active terminal park at
/// once; heartbeats and an occasional ack are served on a parked terminal without giving it a
/// task back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrameWeight {
    Heartbeat,
    Ack,
    Busy,
}

/// Ticks without I/O after which a connection is parked (at least one).
pub(crate) fn park_ticks(config: &Config) -> u64 {
    (config.limits.park_idle_after.as_millis() as u64).div_ceil(TICK.as_millis() as u64).max(1)
}

/// Slots of the resend wheel (later deadlines come due early and are scheduled again).
const RESEND_WHEEL_SLOTS: usize = 1024;
/// Size of the per-shard read buffer every connection reads into.
pub const READ_SCRATCH_BYTES: usize = 64 * 1024;
/// Scheduler shares of the terminal task queue: the same as the default queue's (1000), so
/// under load terminals and the rest of the shard get equal time (measured: 250 made no
/// difference in the group and chat scenarios).
const TERMINAL_QUEUE_SHARES: usize = 1000;

/// The home shard of `user`: every terminal of a user lives there.
pub fn home_shard(user: &str, shards: usize) -> usize {
    // A fixed seed: the same answer on every shard (and thread) of this process.
    const HOME: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x6574_6865_7220_696d);
    (HOME.hash_one(user) % shards as u64) as usize
}

/// A map keyed by user or group id, on a shard's per-message path: foldhash, not SipHash
/// (ids are the business's and its authenticated terminals', and the seed is random per run).
pub(crate) type ByName<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// Group → this shard's online member sessions (the group fan-out index).
pub(crate) type GroupIndex = ByName<Vec<SessionKey>>;

/// A user known to this shard: its terminals here and its inbox head.
#[derive(Debug, Default)]
pub(crate) struct UserEntry {
    pub(crate) sessions: Vec<SessionKey>,
    /// The highest inbox seq this shard has seen committed (a lower bound of the head until
    /// `heads_known`).
    pub(crate) inbox_seq: u64,
    /// `inbox_seq` was read from the store once, so it is the head.
    pub(crate) heads_known: bool,
    /// Terminals of this user being taken on (waiting for their heads): the entry stays while
    /// any is, so no committed delivery goes unseen in between.
    pub(crate) pending: u32,
    /// Cluster mode: a read of the inbox from the store is under way up to this seq (0: none);
    /// deliveries meanwhile only raise it (see `delivery::fill_inbox`).
    pub(crate) fill_to: u64,
    /// Membership changes of the user mirrored while `pending`: a terminal being taken on
    /// reads its heads again when this moved during the read (`conn::adopt`), since the
    /// change reached no session of it.
    pub(crate) membership_changes: u32,
}

/// Why a terminal could not be taken on.
#[derive(Debug)]
pub enum AdoptError {
    /// The user has `terminals_per_user_max` terminals already.
    TooManyTerminals(usize),
    ShuttingDown,
    /// The node drains: the terminal is to connect to another node.
    Draining,
    /// The store could not tell the user's heads.
    Store(String),
}

/// One shard: see the module docs.
pub struct Shard {
    pub id: usize,
    pub shards: usize,
    pub config: Arc<Config>,
    pub keys: Arc<TokenKeys>,
    pub node: Arc<NodeShared>,
    mesh: FanoutMesh,
    /// The storage thread.
    pub store: StoreHandle,
    /// Committed deliveries for every shard (this one drains its own).
    pub commits: Arc<CommitQueues>,
    pub(crate) sessions: RefCell<Slab<Rc<Session>>>,
    generation: Cell<u32>,
    pub(crate) users: RefCell<ByName<UserEntry>>,
    /// Group → this shard's online sessions of its members.
    pub(crate) group_index: RefCell<GroupIndex>,
    /// Cluster mode: the last seq of each group pushed by this shard (see
    /// `groups::order_group_run`).
    pub(crate) group_heads: RefCell<ByName<u64>>,
    /// Cluster mode: the groups a task is ordering and pushing, with the work left for it
    /// (one task per group at a time: `groups::GroupWork`).
    pub(crate) group_work: RefCell<ByName<crate::groups::GroupWork>>,
    /// The first and the last seq of each group fanned out to this shard's members since it
    /// has had members here (both modes): a member's unacknowledged range runs to the last
    /// (`groups::resend_groups_due`).
    pub(crate) group_pushed: RefCell<ByName<(u64, u64)>>,
    /// Groups with a `group.unreached` computation running, and the messages stored since it
    /// began (covered by the next one; see `groups::emit_group_unreached`).
    pub(crate) unreached_pending: RefCell<ByName<Option<crate::groups::UnreachedRun>>>,
    wheel: RefCell<TimerWheel<SessionKey>>,
    /// Sessions with unacknowledged messages, keyed by when their next resend is due.
    pub(crate) resend_wheel: RefCell<TimerWheel<SessionKey>>,
    pub(crate) epoch: Instant,
    tick: Cell<u64>,
    pub(crate) ids: IdGen,
    /// The read buffer every connection of this shard reads into (never held across an await).
    pub scratch: RefCell<Vec<u8>>,
    /// The `pong` frame, per wire (index: `Wire as usize`).
    pong: [Bytes; 2],
    /// Set once this shard has told its terminals to reconnect: when each is to be closed.
    drain: RefCell<Option<DrainPlan>>,
    /// Sessions whose ack positions (inbox or groups) moved since they were last saved.
    pub(crate) ack_dirty: RefCell<Vec<SessionKey>>,
    /// Group ack positions not saved yet, per session (at most `groups_per_user_max` each).
    pub(crate) group_acks_pending: RefCell<HashMap<SessionKey, Vec<(String, u64)>>>,
    /// Terminals being taken on (between `pend_user` and `unpend_user`), and the newest seq of
    /// each group committed here meanwhile: a group message committed after a terminal's heads
    /// were read but before it joined the group's fan-out raises that group's head in its
    /// `welcome`, so the terminal syncs it (see `Shard::heads_seen_while_adopting`).
    adopting: Cell<u32>,
    group_seqs_while_adopting: RefCell<ByName<u64>>,
    /// This shard's taking-on bit is set in `commits.groups` (cleared by the tick after the
    /// last terminal taken on joined its groups: `GroupShards`).
    adopting_announced: Cell<bool>,
    /// Connects plus closes counted at the last heap trim.
    churn_at_trim: Cell<u64>,
    /// Churn, deliveries and messages taken at the last trim check: unchanged means quiet
    /// (heartbeats are not work).
    work_at_trim: Cell<u64>,
    /// Everything free was given back since the shard last did any work.
    quiet_trimmed: Cell<bool>,
    /// From first push to the terminal's ack.
    pub(crate) ack_latency: RefCell<Histogram>,
    /// From a message's acceptance to its push to a terminal's queue.
    pub(crate) push_latency: RefCell<Histogram>,
    /// API requests answered, by route and status.
    api_counts: RefCell<HashMap<(&'static str, u16), u64>>,
    /// Seconds to answer API requests, by route.
    api_latency: RefCell<HashMap<&'static str, Histogram>>,
    /// The task queue terminal connections run in (see `spawn_terminal_task`).
    terminal_queue: TaskQueueHandle,
    /// Idle connections parked out of their tasks (None: `limits.park_idle_after_ms = 0`, or
    /// the epoll set could not be made).
    pub(crate) parking: Option<Parking>,
    /// Where sessions queue themselves when woken while parked.
    wake_list: Rc<WakeList>,
    /// Sessions to look at for parking, keyed by when they may have been idle long enough.
    park_wheel: RefCell<TimerWheel<SessionKey>>,
    /// `limits.terminal_sends_per_s` / `_burst` (None: no limit).
    send_rate: Option<Rate>,
    /// `limits.terminal_requests_per_s` / `_burst` (`sync`, `read`; None: no limit).
    request_rate: Option<Rate>,
    /// `limits.api_requests_per_s` / `_burst` for the whole node (None: no limit), taken from
    /// the node's one gate (`NodeShared::api_gate`) by every shard.
    pub(crate) api_rate: Option<Rate>,
    /// Events on their way to the outbox (`events.batch_wait_ms`).
    pub(crate) events_out: EventBatch,
    /// What `event_flush_loop` waits on (taken by it when it starts).
    pub(crate) events_out_signal: RefCell<Option<LocalReceiver<()>>>,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        config: Arc<Config>,
        keys: Arc<TokenKeys>,
        node: Arc<NodeShared>,
        mesh: FanoutMesh,
        store: StoreHandle,
        commits: Arc<CommitQueues>,
    ) -> Shard {
        let idle_ticks = config.limits.idle_timeout.as_millis() as u64 / TICK.as_millis() as u64;
        let parking = if config.limits.park_idle_after.is_zero() {
            None
        } else {
            Parking::start(id)
                .map_err(|e| warn!(shard = id, error = %e, "cannot park idle connections; each keeps its task"))
                .ok()
        };
        let wake_list = parking.as_ref().map_or_else(|| Rc::new(WakeList::default()), |p| p.woken.clone());
        let park_ticks = park_ticks(&config);
        // In cluster mode each shard makes ids with the generator slot (of the cluster's 64) it
        // leases in Redis: ids stay unique across nodes.
        let ids = node.cluster().map_or_else(|| IdGen::new(id), |c| IdGen::leased(c.id_lease(id)));
        let (events_out, events_out_signal) =
            EventBatch::new(!config.events.batch_wait.is_zero(), config.limits.events_pending_max);
        Shard {
            id,
            shards: config.node.shards,
            keys,
            node,
            mesh,
            store,
            commits,
            sessions: RefCell::new(Slab::new()),
            generation: Cell::new(0),
            users: RefCell::new(ByName::default()),
            group_index: RefCell::new(ByName::default()),
            group_heads: RefCell::new(ByName::default()),
            group_work: RefCell::new(ByName::default()),
            group_pushed: RefCell::new(ByName::default()),
            unreached_pending: RefCell::new(ByName::default()),
            wheel: RefCell::new(TimerWheel::new(idle_ticks as usize + 2, 0)),
            resend_wheel: RefCell::new(TimerWheel::new(RESEND_WHEEL_SLOTS, 0)),
            epoch: Instant::now(),
            tick: Cell::new(0),
            ids,
            scratch: RefCell::new(vec![0; READ_SCRATCH_BYTES]),
            pong: [encode_for(&ServerFrame::Pong, Wire::Json), encode_for(&ServerFrame::Pong, Wire::Proto)],
            drain: RefCell::new(None),
            churn_at_trim: Cell::new(0),
            work_at_trim: Cell::new(0),
            quiet_trimmed: Cell::new(false),
            ack_dirty: RefCell::new(Vec::new()),
            group_acks_pending: RefCell::new(HashMap::new()),
            adopting: Cell::new(0),
            group_seqs_while_adopting: RefCell::new(ByName::default()),
            adopting_announced: Cell::new(false),
            ack_latency: RefCell::new(Histogram::latency()),
            push_latency: RefCell::new(Histogram::latency()),
            api_counts: RefCell::new(HashMap::new()),
            api_latency: RefCell::new(HashMap::new()),
            terminal_queue: glommio::executor().create_task_queue(
                Shares::Static(TERMINAL_QUEUE_SHARES),
                Latency::NotImportant,
                "terminals",
            ),
            parking,
            wake_list,
            park_wheel: RefCell::new(TimerWheel::new(park_ticks as usize + 2, 0)),
            send_rate: Rate::new(config.limits.terminal_sends_per_s, config.limits.terminal_sends_burst),
            request_rate: Rate::new(config.limits.terminal_requests_per_s, config.limits.terminal_requests_burst),
            api_rate: Rate::new(config.limits.api_requests_per_s, config.limits.api_requests_burst),
            events_out,
            events_out_signal: RefCell::new(Some(events_out_signal)),
            config,
        }
    }

    /// Runs a terminal connection's task (handshake, session, goodbye) in the shard's
    /// terminal queue. Everything else of the shard (API requests, committed deliveries, the
    /// mesh, ticks) runs in the executor's default queue: the scheduler alternates between
    /// the two instead of serving an API request only after every ready terminal task, so
    /// messages keep being accepted under fan-out load and terminals' queues are written in
    /// bigger batches (fewer `sendmsg` per frame).
    pub fn spawn_terminal_task(&self, task: impl Future<Output = ()> + 'static) {
        // The queue lives as long as the shard (it is never removed), so this cannot fail; if
        // it ever did, the connection would be dropped (closed), never left half-served.
        match glommio::spawn_local_into(task, self.terminal_queue) {
            Ok(t) => drop(t.detach()),
            Err(e) => {
                debug_assert!(false, "terminal queue gone: {e}");
                tracing::error!(shard = self.id, error = %e, "terminal task not started: its connection is closed");
            }
        }
    }

    pub fn counters(&self) -> &ShardCounters {
        &self.node.shards[self.id]
    }

    /// The current tick (coarse clock, advanced by the tick loop).
    pub fn now_tick(&self) -> u64 {
        self.tick.get()
    }

    pub(crate) fn resend_ticks(&self) -> u64 {
        (self.config.limits.resend_timeout.as_millis() / TICK.as_millis()).max(1) as u64
    }

    fn idle_ticks(&self) -> u64 {
        (self.config.limits.idle_timeout.as_millis() / TICK.as_millis()) as u64
    }

    pub fn live_sessions(&self) -> usize {
        self.sessions.borrow().len()
    }

    pub fn session(&self, key: SessionKey) -> Option<Rc<Session>> {
        let sessions = self.sessions.borrow();
        sessions.get(key.slot as usize).filter(|s| s.key == key).cloned()
    }

    /// Handles a message from another shard (or from this one).
    pub fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Adopt(h) => crate::conn::adopt(self, *h),
            ShardMsg::UserFrame { user, frame } => {
                let mut frames = frame_set(&frame);
                for s in self.sessions_of(&user) {
                    self.push(&s, frames.get(s.wire));
                }
            }
            ShardMsg::Presence { user, reply } => {
                let _ = reply.send(self.presence_local(&user));
            }
            ShardMsg::Kick { user, device, reason, reply } => {
                let _ = reply.send(self.kick_local(&user, device.as_deref(), &reason, None));
            }
            ShardMsg::Connections { user, reply } => {
                let _ = reply.send(self.connections_local(user.as_deref()));
            }
            ShardMsg::Broadcast { frame, reply } => {
                let _ = reply.send(self.broadcast_local(&frame));
            }
            ShardMsg::Offline { users, reply } => {
                let _ = reply.send(self.offline_local(users));
            }
        }
    }

    /// Sends `msg` to shard `to` (handled in place when `to` is this shard).
    pub async fn route(self: &Rc<Self>, to: usize, msg: ShardMsg) -> Result<(), EngineError> {
        if to == self.id {
            self.handle(msg);
            Ok(())
        } else {
            self.node.mesh_depth[to].fetch_add(1, Ordering::Relaxed);
            self.mesh.send(to, msg).await.map_err(|_| {
                self.node.mesh_depth[to].fetch_sub(1, Ordering::Relaxed);
                EngineError::ShardGone(to)
            })
        }
    }

    pub(crate) async fn ask<T>(
        self: &Rc<Self>,
        to: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.route(to, make(tx)).await?;
        rx.await.map_err(|_| EngineError::ShardGone(to))
    }

    // ---- sessions ----------------------------------------------------------------------

    /// Registers a terminal whose user lives here; replaces an older connection of the same
    /// device (which gets `kicked`). `elsewhere`: the user's devices connected to other nodes
    /// (cluster mode), counted with this node's against `limits.terminals_per_user_max`.
    pub fn add_session(
        &self,
        user: &Arc<str>,
        device: &str,
        platform: Platform,
        wire: Wire,
        remote: SocketAddr,
        elsewhere: &[&str],
    ) -> Result<Rc<Session>, AdoptError> {
        // A terminal taken on once a drain began would miss its `reconnect` (told once, to
        // the terminals there were) and be closed 1012 without it: refused, it reconnects.
        if self.node.stopping() {
            return Err(AdoptError::ShuttingDown);
        }
        if self.node.draining() {
            return Err(AdoptError::Draining);
        }
        debug_assert_eq!(home_shard(user, self.shards), self.id, "terminal adopted away from its home shard");
        let max = self.config.limits.terminals_per_user_max;
        let mut users = self.users.borrow_mut();
        let entry = users.entry(user.clone()).or_default();
        let mut replaced = None;
        for key in &entry.sessions {
            if let Some(s) = self.session(*key) {
                if &*s.device == device {
                    replaced = Some(s);
                }
            }
        }
        let here = entry.sessions.len() - usize::from(replaced.is_some());
        // Devices on other nodes, each once: not this one (its connection there is replaced)
        // nor one connected here as well (a replacement under way).
        let mut there: Vec<&str> = elsewhere.iter().copied().filter(|d| *d != device).collect();
        there.sort_unstable();
        there.dedup();
        there.retain(|d| !entry.sessions.iter().any(|k| self.session(*k).is_some_and(|s| &*s.device == *d)));
        if here + there.len() >= max {
            return Err(AdoptError::TooManyTerminals(max));
        }
        if let Some(old) = replaced {
            entry.sessions.retain(|k| *k != old.key);
            old.push_final(encode_for(&ServerFrame::Kicked { reason: "replaced".into() }, old.wire));
            old.request_close(CloseReason::Replaced);
        }
        let generation = self.generation.get().wrapping_add(1);
        self.generation.set(generation);
        let mut sessions = self.sessions.borrow_mut();
        let slot = sessions.vacant_key();
        let key = SessionKey { slot: slot as u32, generation };
        let session = Rc::new(Session::new(
            key,
            ((self.id as u64) << 56) | (u64::from(generation) << 24) | slot as u64,
            user.clone(),
            device.into(),
            platform,
            wire,
            remote,
            unix_now_ms(),
            self.now_tick(),
            self.wake_list.clone(),
        ));
        sessions.insert(session.clone());
        let first = entry.sessions.is_empty();
        entry.sessions.push(key);
        self.wheel.borrow_mut().schedule(key, self.now_tick() + self.idle_ticks());
        self.schedule_park_check(key);
        ShardCounters::add(&self.counters().connections, 1);
        // Per-connection lines are debug: at thousands of handshakes a second they would cost a
        // few percent of the shard (formatting and a write each); operators have the counters,
        // the admin port's connections and recent closes, and `user.online`/`offline` events.
        debug!(user = %user, device, shard = self.id, session = session.id, %remote, "terminal connected");
        drop(users);
        drop(sessions);
        if first && self.events_enabled() {
            self.emit(
                "user.online",
                serde_json::json!({ "user": &**user, "device": device, "platform": platform.as_str() }),
            );
        }
        Ok(session)
    }

    /// How many membership changes of `user` were mirrored while a terminal of it was being
    /// taken on (see `UserEntry::membership_changes`).
    pub(crate) fn membership_changes(&self, user: &Arc<str>) -> u32 {
        self.users.borrow().get(user).map_or(0, |e| e.membership_changes)
    }

    /// Marks a terminal of `user` as being taken on (see `UserEntry::pending`).
    pub fn pend_user(&self, user: &Arc<str>) {
        self.users.borrow_mut().entry(user.clone()).or_default().pending += 1;
        self.adopting.set(self.adopting.get() + 1);
        if !self.adopting_announced.replace(true) {
            // Before the heads are read: every group's messages committed from now on come here.
            self.commits.groups.set_adopting(self.id, true);
        }
    }

    /// Every tick: with no terminal being taken on any more (each joined its groups' fan-out,
    /// so the groups' own bits stand for it), group messages need not all come here.
    fn unannounce_adopting(&self) {
        if self.adopting.get() == 0 && self.adopting_announced.replace(false) {
            self.commits.groups.set_adopting(self.id, false);
        }
    }

    /// Notes a committed group message while terminals are being taken on (see `adopting`).
    pub(crate) fn note_group_seq(&self, group: &Arc<str>, seq: u64) {
        if self.adopting.get() > 0 {
            let mut seen = self.group_seqs_while_adopting.borrow_mut();
            let s = seen.entry(group.clone()).or_insert(0);
            *s = (*s).max(seq);
        }
    }

    /// Raises `heads` (read from the store for a terminal being taken on) to the group
    /// messages committed since: call it when the terminal joins its groups' fan-out, before
    /// its `welcome`, so what no fan-out pushed to it is within the heads it syncs to.
    pub(crate) fn heads_seen_while_adopting(&self, groups: &mut std::collections::BTreeMap<String, u64>) {
        let seen = self.group_seqs_while_adopting.borrow();
        if seen.is_empty() {
            return;
        }
        for (group, head) in groups.iter_mut() {
            if let Some(&seq) = seen.get(group.as_str()) {
                *head = (*head).max(seq);
            }
        }
    }

    /// The terminal marked by `pend_user` was taken on or refused.
    pub fn unpend_user(&self, user: &str) {
        let left = self.adopting.get().saturating_sub(1);
        self.adopting.set(left);
        if left == 0 {
            self.group_seqs_while_adopting.borrow_mut().clear();
        }
        let mut users = self.users.borrow_mut();
        if let Some(entry) = users.get_mut(user) {
            entry.pending = entry.pending.saturating_sub(1);
            if entry.sessions.is_empty() && entry.pending == 0 {
                users.remove(user);
            }
        }
    }

    /// Forgets a session whose connection task has ended.
    pub fn remove_session(&self, session: &Session, reason: CloseReason) {
        let removed = {
            let mut sessions = self.sessions.borrow_mut();
            match sessions.get(session.key.slot as usize) {
                Some(s) if s.key == session.key => {
                    sessions.remove(session.key.slot as usize);
                    true
                }
                _ => false,
            }
        };
        debug_assert!(removed, "session removed twice");
        self.leave_all_groups(session);
        self.flush_ack_position(session);
        let mut users = self.users.borrow_mut();
        let mut last = false;
        if let Some(entry) = users.get_mut(&*session.user) {
            entry.sessions.retain(|k| *k != session.key);
            last = entry.sessions.is_empty();
            if last && entry.pending == 0 {
                users.remove(&*session.user);
            }
        }
        drop(users);
        if last && self.events_enabled() {
            self.emit("user.offline", serde_json::json!({ "user": &*session.user, "reason": reason.as_str() }));
        }
        if let Some(cluster) = self.node.cluster() {
            // A newer connection of the same device (the one that replaced this one) keeps
            // the device's presence entry.
            if !self.sessions_of(&session.user).iter().any(|s| s.device == session.device) {
                cluster.offline(&session.user, &session.device);
            }
        }
        self.node.record_close(self.id, ClosedConn { conn: self.snapshot(session), closed_ms: unix_now_ms(), reason });
        let c = self.counters();
        c.connections.fetch_sub(1, Ordering::Relaxed);
        ShardCounters::add(&c.closes[reason.index()], 1);
        debug!(user = %session.user, device = %session.device, shard = self.id, session = session.id, reason = reason.as_str(), "terminal closed");
    }

    /// The `welcome` frame for a new session.
    pub fn welcome_frame(
        &self,
        s: &Session,
        groups: std::collections::BTreeMap<String, u64>,
        delivered: Option<ether_proto::frame::Positions>,
    ) -> Bytes {
        let inbox_seq = self.users.borrow().get(&*s.user).map_or(0, |u| u.inbox_seq);
        encode_for(
            &ServerFrame::Welcome {
                user: s.user.to_string(),
                device: s.device.to_string(),
                session: format!("{:x}", s.id),
                heartbeat_s: self.config.limits.heartbeat_s,
                inbox_seq,
                groups,
                delivered,
            },
            s.wire,
        )
    }

    /// Queues a frame for a session, closing it if it cannot keep up.
    pub fn push(&self, s: &Session, frame: Bytes) -> bool {
        match s.push(frame, self.config.limits.outbound_queue_bytes_max) {
            Pushed::Queued => {
                ShardCounters::add(&self.counters().frames_out, 1);
                true
            }
            Pushed::Closing => false,
            Pushed::Overflow => {
                warn!(user = %s.user, device = %s.device, shard = self.id, "slow consumer: outbound queue over its bound, closing");
                false
            }
        }
    }

    /// Every terminal session of this shard.
    pub(crate) fn all_sessions(&self) -> Vec<Rc<Session>> {
        self.sessions.borrow().iter().map(|(_, s)| s.clone()).collect()
    }

    pub(crate) fn sessions_of(&self, user: &str) -> Vec<Rc<Session>> {
        let users = self.users.borrow();
        let Some(entry) = users.get(user) else {
            return Vec::new();
        };
        entry.sessions.iter().filter_map(|k| self.session(*k)).collect()
    }

    // ---- delivery ----------------------------------------------------------------------

    // ---- presence, kick, broadcast ---------------------------------------------------

    /// Those of `users` (who live here) without a live terminal on this shard.
    pub(crate) fn offline_local(&self, users: Vec<Arc<str>>) -> Vec<Arc<str>> {
        users.into_iter().filter(|u| self.sessions_of(u).iter().all(|s| s.close_reason().is_some())).collect()
    }

    fn presence_local(&self, user: &str) -> Vec<TerminalInfo> {
        self.sessions_of(user)
            .iter()
            .filter(|s| s.close_reason().is_none())
            .map(|s| TerminalInfo {
                device: s.device.to_string(),
                platform: s.platform.as_str().to_owned(),
                node: self.node.node_id.clone(),
                since: s.since_ms,
            })
            .collect()
    }

    /// The user's terminals: on this node (from their home shard) and, in cluster mode, on the
    /// other live nodes.
    pub async fn presence(self: &Rc<Self>, user: &str) -> Result<Vec<TerminalInfo>, EngineError> {
        let name: Arc<str> = Arc::from(user);
        let mut here =
            self.ask(home_shard(&name, self.shards), |reply| ShardMsg::Presence { user: name, reply }).await?;
        if let Some(cluster) = self.node.cluster() {
            here.extend(cluster.presence_elsewhere(user).await);
        }
        Ok(here)
    }

    /// Kicks the user's terminals here (one device, or all; with `before_ms`, only those that
    /// connected before it); returns how many.
    pub(crate) fn kick_local(&self, user: &str, device: Option<&str>, reason: &str, before_ms: Option<u64>) -> u64 {
        let mut n = 0;
        for s in self.sessions_of(user) {
            if device.is_some_and(|d| d != &*s.device)
                || s.close_reason().is_some()
                || before_ms.is_some_and(|t| s.since_ms >= t)
            {
                continue;
            }
            s.push_final(encode_for(&ServerFrame::Kicked { reason: reason.to_owned() }, s.wire));
            s.request_close(CloseReason::Kicked);
            n += 1;
        }
        n
    }

    /// Refuses from now on the user's terminal tokens (used on `device` only, when given)
    /// issued up to now: stored first (so it outlives a restart and reaches every node's
    /// store reads), then known here and, in cluster mode, told to every node. Returns the
    /// time (Unix ms) before which they are refused.
    pub async fn revoke_tokens(self: &Rc<Self>, user: &str, device: Option<&str>) -> Result<u64, EngineError> {
        // Tokens issued at or before now: the one in the terminal's hands was, at the latest.
        let before_ms = crate::message::unix_now_ms() + 1;
        let op = Op::RevokeTokens { user: user.to_owned(), device: device.map(str::to_owned), before_ms };
        let in_force = self.store.call(op).await?.count()?;
        self.node.revocations.note(user, device, in_force);
        if let Some(cluster) = self.node.cluster() {
            cluster.publish(crate::cluster::BusEvent::Revoke {
                user: user.to_owned(),
                device: device.map(str::to_owned),
                before_ms: in_force,
            });
        }
        info!(user, device, before_ms = in_force, shard = self.id, "terminal tokens revoked");
        Ok(in_force)
    }

    /// Kicks the user's terminals (one device, or all); returns how many. In cluster mode the
    /// other nodes kick theirs too, and the count adds the terminals cluster presence lists for
    /// them (read just before the kick is published; the other nodes do not answer back).
    pub async fn kick(self: &Rc<Self>, user: &str, device: Option<&str>, reason: &str) -> Result<u64, EngineError> {
        let mut elsewhere = 0;
        if let Some(cluster) = self.node.cluster() {
            let there = cluster.presence_elsewhere(user).await;
            elsewhere = there.iter().filter(|t| device.is_none_or(|d| d == t.device)).count() as u64;
            cluster.publish(crate::cluster::BusEvent::Kick {
                user: user.to_owned(),
                device: device.map(str::to_owned),
                reason: reason.to_owned(),
                before_ms: None,
            });
        }
        let user: Arc<str> = Arc::from(user);
        let device = device.map(Box::from);
        let reason: Arc<str> = Arc::from(reason);
        let here =
            self.ask(home_shard(&user, self.shards), |reply| ShardMsg::Kick { user, device, reason, reply }).await?;
        Ok(here + elsewhere)
    }

    pub(crate) fn broadcast_local(&self, frame: &ServerFrame) -> u64 {
        let sessions = self.all_sessions();
        let mut frames = frame_set(frame);
        let mut n = 0;
        for s in sessions {
            if self.push(&s, frames.get(s.wire)) {
                n += 1;
            }
        }
        ShardCounters::add(&self.counters().deliveries, n);
        n
    }

    /// Writes `frame` to every terminal of the node; returns how many got it. In cluster mode
    /// the other nodes write it to theirs, counted as their last heartbeats reported them.
    pub async fn broadcast(self: &Rc<Self>, frame: Arc<ServerFrame>) -> Result<u64, EngineError> {
        let mut total = 0;
        if let Some(cluster) = self.node.cluster() {
            cluster.publish(crate::cluster::BusEvent::Broadcast { frame: (*frame).clone() });
            total += cluster.terminals_elsewhere().await;
        }
        let mut waits = Vec::new();
        for to in 0..self.shards {
            let frame = frame.clone();
            waits.push(self.ask(to, |reply| ShardMsg::Broadcast { frame, reply }));
        }
        for w in waits {
            total += w.await?;
        }
        Ok(total)
    }

    // ---- terminal frames -------------------------------------------------------------

    /// Sends an `error` frame and counts a violation; too many close the connection (1008).
    /// `of` is the refused frame's type, when it could be read; `reference` a `send`'s `cid`.
    pub fn reject_frame(
        &self,
        s: &Session,
        code: ErrorCode,
        message: String,
        of: Option<FrameType>,
        reference: Option<String>,
    ) {
        self.push(s, encode_for(&ServerFrame::Error { code, message, reference, of }, s.wire));
        let v = s.violation();
        if v > self.config.limits.protocol_violations_max {
            debug!(user = %s.user, device = %s.device, shard = self.id, violations = v, "closing for repeated invalid frames");
            s.request_close(CloseReason::ProtocolViolation);
        }
    }

    /// Handles one complete text (or binary) frame from a terminal.
    /// Handles one terminal frame (a text frame's JSON, or a binary frame's Protocol Buffers on
    /// an `ether.v1.proto` connection); says what kind it was (for parking).
    pub fn on_client_frame(self: &Rc<Self>, s: &Rc<Session>, bytes: &[u8], binary: bool) -> FrameWeight {
        ShardCounters::add(&self.counters().frames_in, 1);
        let parsed = match (s.wire, binary) {
            (Wire::Proto, true) => ether_proto::pb::decode_client(bytes),
            (Wire::Proto, false) => Err(ether_proto::frame::FrameError::shape(
                None,
                "this connection speaks ether.v1.proto: send binary frames",
            )),
            // JSON in text frames; a binary frame holding JSON is taken as it always was.
            (Wire::Json, _) => ClientFrameRef::parse(bytes),
        };
        let frame = match parsed {
            Ok(f) => f,
            // A well-formed `send` of a kind there is not: refused for what it asks, like a bad
            // body (answered with its `cid`, within the send rate, not a violation).
            Err(ether_proto::frame::FrameError::UnknownKind { cid, message }) => {
                if self.admit(s, FrameType::Send, Some(&cid)) {
                    self.frame_error(s, &ApiError::new(ErrorCode::InvalidBody, message), FrameType::Send, Some(cid));
                }
                return FrameWeight::Busy;
            }
            Err(e) => {
                self.reject_frame(s, e.code(), e.to_string(), e.of(), None);
                return FrameWeight::Busy;
            }
        };
        match frame {
            ClientFrameRef::Ping => {
                self.push(s, self.pong[s.wire as usize].clone());
                return FrameWeight::Heartbeat;
            }
            ClientFrameRef::Ack { seq, group } => {
                self.on_ack(s, seq, group.map(Cow::into_owned));
                return FrameWeight::Ack;
            }
            ClientFrameRef::Send { cid, to, group, kind, body } => {
                if self.admit(s, FrameType::Send, Some(&cid)) {
                    self.on_send(s, &cid, to, group, kind, &body);
                }
            }
            ClientFrameRef::Sync { inbox_seq, groups, limit } => {
                if self.admit(s, FrameType::Sync, None) {
                    self.on_sync(s, inbox_seq, groups, limit);
                }
            }
            ClientFrameRef::Read { chat, seq } => {
                if self.admit(s, FrameType::Read, None) {
                    self.on_read(s, chat.into_owned(), seq);
                }
            }
        }
        FrameWeight::Busy
    }

    /// Microseconds of the shard's clock (for rate limits).
    pub(crate) fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Whether a terminal's frame of type `of` keeps within its rate (`send`s within the send
    /// rate, `sync`s and `read`s within the request rate; acks and pings are never limited); if
    /// not, it is answered `rate_limited` (with `reference`, a send's `cid`), counted, and not
    /// handled. Not a protocol violation: a client that waits may go on.
    fn admit(&self, s: &Session, of: FrameType, reference: Option<&str>) -> bool {
        let (gate, rate, limit): (&Gate, _, _) = match of {
            FrameType::Send => (&s.send_gate, self.send_rate, "limits.terminal_sends_per_s"),
            FrameType::Sync | FrameType::Read => (&s.request_gate, self.request_rate, "limits.terminal_requests_per_s"),
            FrameType::Ack | FrameType::Ping => return true,
        };
        let Some(rate) = rate else { return true };
        let now = self.now_us();
        if gate.allow(&rate, now) {
            return true;
        }
        ShardCounters::add(&self.counters().rate_limited, 1);
        let wait_ms = rate.retry_after_us(gate, now).div_ceil(1000).max(1);
        let e = ApiError::new(ErrorCode::RateLimited, format!("over {limit}: slow down, try again in {wait_ms} ms"));
        self.frame_error(s, &e, of, reference.map(str::to_owned));
        false
    }

    fn on_send(
        self: &Rc<Self>,
        s: &Rc<Session>,
        cid: &str,
        to: Option<Cow<'_, str>>,
        group: Option<Cow<'_, str>>,
        kind: Kind,
        body: &RawValue,
    ) {
        // A well-formed `send` refused for what it asks (sending disabled, a bad body or id)
        // is answered, not counted as a protocol violation: an app bug or a policy must not
        // cut the terminal off for good (1008 is final). Rate limits bound how often.
        let reject = |code, msg: String| {
            self.frame_error(s, &ApiError::new(code, msg), FrameType::Send, Some(cid.to_owned()));
        };
        if !self.config.terminal_send_enabled {
            return reject(ErrorCode::Forbidden, "sending from terminals is disabled on this node".into());
        }
        if cid.is_empty() || cid.len() > ether_proto::api::CID_LEN_MAX {
            return reject(ErrorCode::InvalidBody, format!("cid: must be 1-{} bytes", ether_proto::api::CID_LEN_MAX));
        }
        let target = match (to, group) {
            (Some(to), None) => ether_proto::ids::check_id("to", &to).map(|()| Chat::User(to.into_owned())),
            (None, Some(g)) => ether_proto::ids::check_id("group", &g).map(|()| Chat::Group(g.into_owned())),
            _ => return reject(ErrorCode::InvalidBody, "send: exactly one of `to` and `group` is required".into()),
        };
        let target = match target {
            Ok(t) => t,
            Err(e) => return reject(e.code, e.message),
        };
        if let Err(e) = ether_proto::body::validate_raw("body", kind, body) {
            return reject(ErrorCode::InvalidBody, e.to_string());
        }
        // The body is stored and pushed as the JSON text the terminal sent. The commit loop
        // answers (`sent`) when it is durable: no task waits for it.
        let raw = crate::message::stored_body(body.to_owned());
        if !self.ids.usable() {
            return reject(ErrorCode::Unavailable, crate::cluster::NO_ID_LEASE.into());
        }
        let from: Box<str> = (*s.user).into();
        let answer = TerminalSend { shard: self.id, session: s.key, cid: cid.into() };
        let submitted = match target {
            Chat::User(to) => self.submit_single(
                NewMessage { from, to: to.into(), kind, body: raw, cid: Some(cid.into()) },
                Answer::Terminal(answer),
            ),
            Chat::Group(g) => self.submit_group(
                crate::groups::NewGroupPost {
                    from,
                    system: false,
                    group: g.into(),
                    kind,
                    body: raw,
                    cid: Some(cid.into()),
                },
                Answer::Terminal(answer),
            ),
        };
        if let Err(e) = submitted {
            // Not the terminal's fault (the node is stopping, the store overloaded): no
            // violation counted.
            self.frame_error(s, &e.to_api(), FrameType::Send, Some(cid.to_owned()));
        }
    }

    // ---- operators ---------------------------------------------------------------------

    /// Unix ms of a shard tick.
    fn tick_ms(&self, tick: u64) -> u64 {
        self.node.started_ms + tick * TICK.as_millis() as u64
    }

    /// A session as operators see it.
    pub fn snapshot(&self, s: &Session) -> ConnSnapshot {
        ConnSnapshot {
            session: s.id,
            user: s.user.to_string(),
            device: s.device.to_string(),
            platform: s.platform.as_str(),
            shard: self.id,
            remote: s.remote,
            since_ms: s.since_ms,
            last_activity_ms: self.tick_ms(s.last_active()),
            unacked: s.unacked(),
            queued_bytes: s.queued_bytes() as u64,
        }
    }

    fn connections_local(&self, user: Option<&str>) -> Vec<ConnSnapshot> {
        match user {
            Some(u) => self.sessions_of(u).iter().map(|s| self.snapshot(s)).collect(),
            None => self.sessions.borrow().iter().map(|(_, s)| self.snapshot(s)).collect(),
        }
    }

    /// Every terminal of the node (`user: None`) or one user's, from every shard.
    pub async fn connections(self: &Rc<Self>, user: Option<&str>) -> Result<Vec<ConnSnapshot>, EngineError> {
        if let Some(u) = user {
            let user: Option<Arc<str>> = Some(Arc::from(u));
            return self.ask(home_shard(u, self.shards), |reply| ShardMsg::Connections { user, reply }).await;
        }
        let mut waits = Vec::new();
        for to in 0..self.shards {
            waits.push(self.ask(to, |reply| ShardMsg::Connections { user: None, reply }));
        }
        let mut all = Vec::new();
        for w in waits {
            all.extend(w.await?);
        }
        Ok(all)
    }

    /// One drain step per tick: first every terminal is told to `reconnect` after a jittered
    /// delay within the drain window (`after_ms`), then each is closed (1012) on the first tick
    /// at or past its own `after_ms` since then: the closes follow the jitter the terminals were
    /// told, none is cut off before its time, and the shard is empty by the window's end.
    fn drain_step(&self) {
        let now_us = self.now_us();
        let mut guard = self.drain.borrow_mut();
        let Some(plan) = guard.as_mut() else {
            let window_ms = (self.config.limits.drain_window.as_millis() as u64).max(1);
            let sessions = self.all_sessions();
            let closes = sessions
                .iter()
                .map(|s| {
                    let after_ms = rand::random::<u64>() % window_ms;
                    s.push_final(encode_for(&ServerFrame::Reconnect { after_ms }, s.wire));
                    (after_ms, s.key)
                })
                .collect();
            *guard = Some(DrainPlan::new(now_us, window_ms, closes));
            info!(shard = self.id, terminals = sessions.len(), "draining");
            return;
        };
        let mut due = Vec::new();
        let over = plan.due(now_us, &mut due);
        drop(guard);
        for key in due {
            if let Some(s) = self.session(key) {
                s.request_close(CloseReason::Drain);
            }
        }
        if over {
            // Every terminal told was closed above; none is taken on while draining, but
            // whatever is still open goes too.
            for s in self.all_sessions() {
                s.request_close(CloseReason::Drain);
            }
        }
    }

    /// Gives freed heap back to the kernel: all of it after a burst of connects, closes or
    /// parks (the handshakes' transient buffers and parked connections' tasks would otherwise
    /// stay in the process as idle RSS) and once the shard turns quiet (what a burst of
    /// messages freed, held for reuse while they came); meanwhile what has been free for the
    /// purge delay (see `allocator`).
    fn trim_after_churn(&self) {
        let c = self.counters();
        let churn = ShardCounters::get(&c.handshakes)
            + c.closes.iter().map(ShardCounters::get).sum::<u64>()
            + ShardCounters::get(&c.handshake_failures)
            + ShardCounters::get(&c.parks);
        let work = churn + ShardCounters::get(&c.deliveries) + ShardCounters::get(&c.messages_accepted);
        let busy = work != self.work_at_trim.replace(work);
        if churn.abs_diff(self.churn_at_trim.replace(churn)) >= TRIM_CHURN_MIN {
            crate::allocator::release_free_memory();
            self.quiet_trimmed.set(false);
        } else if busy {
            crate::allocator::purge_expired();
            self.quiet_trimmed.set(false);
        } else if !self.quiet_trimmed.replace(true) {
            crate::allocator::release_free_memory();
        }
    }

    /// Counts an API answer and the time it took (from its handler's start).
    pub fn count_api(&self, route: &'static str, status: u16, took: Duration) {
        *self.api_counts.borrow_mut().entry((route, status)).or_insert(0) += 1;
        self.api_latency.borrow_mut().entry(route).or_insert_with(Histogram::latency).record_duration(took);
    }

    /// Publishes histograms and API counts for readers on other threads.
    fn publish(&self) {
        let api = self.api_counts.borrow().iter().map(|((r, s), n)| (*r, *s, *n)).collect();
        let api_latency = self.api_latency.borrow().iter().map(|(r, h)| (*r, h.snapshot())).collect();
        self.node.publish(
            self.id,
            ShardPublished {
                ack_latency: self.ack_latency.borrow().snapshot(),
                push_latency: self.push_latency.borrow().snapshot(),
                api,
                api_latency,
            },
        );
    }

    // ---- time --------------------------------------------------------------------------

    /// Looks again at `key` for parking once it may have been idle long enough.
    pub(crate) fn schedule_park_check(&self, key: SessionKey) {
        if self.parking.is_some() {
            self.park_wheel.borrow_mut().schedule(key, self.now_tick() + park_ticks(&self.config));
        }
    }

    /// Asks the tasks of sessions without I/O for `limits.park_idle_after_ms` and nothing in
    /// flight to park them (see `parking`); the others are looked at again when they may be.
    fn park_idle(&self, now: u64, due: &mut Vec<SessionKey>) {
        if self.parking.is_none() {
            return;
        }
        let ticks = park_ticks(&self.config);
        self.park_wheel.borrow_mut().advance(now, due);
        for key in due.drain(..) {
            let Some(s) = self.session(key) else { continue };
            // Parked sessions are scheduled again when they get a task back.
            if matches!(s.park_state(), ParkState::Parked | ParkState::Waking) || s.close_reason().is_some() {
                continue;
            }
            let idle_until = s.last_io() + ticks;
            if idle_until <= now && s.quiet() {
                s.request_park();
                // Looked at again in case the task cannot park it now.
                self.park_wheel.borrow_mut().schedule(key, now + ticks);
            } else {
                self.park_wheel.borrow_mut().schedule(key, idle_until.max(now + 1));
            }
        }
    }

    /// Advances the clock and the wheel every tick: closes idle terminals. Ends when the node
    /// stops.
    pub async fn tick_loop(self: Rc<Self>) {
        let mut due = Vec::new();
        while !self.node.stopping() {
            glommio::timer::sleep(TICK).await;
            let now = (self.epoch.elapsed().as_millis() / TICK.as_millis()) as u64;
            self.tick.set(now);
            self.wheel.borrow_mut().advance(now, &mut due);
            let idle = self.idle_ticks();
            for key in due.drain(..) {
                let Some(s) = self.session(key) else { continue };
                if s.close_reason().is_some() {
                    continue;
                }
                let deadline = s.last_active() + idle;
                if deadline <= now {
                    debug!(user = %s.user, device = %s.device, shard = self.id, "idle timeout");
                    s.request_close(CloseReason::Idle);
                } else {
                    self.wheel.borrow_mut().schedule(key, deadline);
                }
            }
            self.resend_due(now, &mut due);
            self.resend_groups_due(now);
            self.unannounce_adopting();
            self.park_idle(now, &mut due);
            self.save_ack_positions();
            if self.node.draining() {
                self.drain_step();
            }
            self.publish();
            if now.is_multiple_of(TRIM_EVERY_TICKS) {
                self.trim_after_churn();
            }
            let queued: usize = self.sessions.borrow().iter().map(|(_, s)| s.queued_bytes()).sum();
            self.counters().queued_bytes.store(queued as u64, Ordering::Relaxed);
            self.counters().events_retried.store(self.events_out.retried(), Ordering::Relaxed);
            self.counters().events_dropped.store(self.events_out.dropped(), Ordering::Relaxed);
        }
        // Stopping: close every terminal.
        let sessions: Vec<Rc<Session>> = self.sessions.borrow().iter().map(|(_, s)| s.clone()).collect();
        for s in sessions {
            s.request_close(CloseReason::Shutdown);
        }
    }

    /// Rejects a request from the API with a public error.
    pub fn api_error(code: ErrorCode, message: impl Into<String>) -> EngineError {
        EngineError::Api(ApiError::new(code, message))
    }
}

/// A shard's drain: when it told its terminals to `reconnect`, and the `after_ms` each was
/// told, which is when it is closed.
#[derive(Debug)]
pub(crate) struct DrainPlan {
    /// Shard clock (`Shard::now_us`) when the `reconnect`s were queued.
    started_us: u64,
    /// `limits.drain_window_ms` (at least 1): every `after_ms` is below it.
    window_ms: u64,
    /// `(after_ms, session)`, latest first: the next to close is the last.
    closes: Vec<(u64, SessionKey)>,
}

impl DrainPlan {
    pub(crate) fn new(started_us: u64, window_ms: u64, mut closes: Vec<(u64, SessionKey)>) -> DrainPlan {
        closes.sort_unstable_by_key(|&(after_ms, _)| std::cmp::Reverse(after_ms));
        DrainPlan { started_us, window_ms, closes }
    }

    /// Moves to `due`, in the order of their `after_ms`, the sessions whose `after_ms` has
    /// passed at `now_us` (all of them once the window has); says whether the window has.
    pub(crate) fn due(&mut self, now_us: u64, due: &mut Vec<SessionKey>) -> bool {
        let elapsed_ms = now_us.saturating_sub(self.started_us) / 1000;
        let over = elapsed_ms >= self.window_ms;
        while let Some(&(after_ms, key)) = self.closes.last() {
            if after_ms > elapsed_ms && !over {
                break;
            }
            self.closes.pop();
            due.push(key);
        }
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slot: u32) -> SessionKey {
        SessionKey { slot, generation: 1 }
    }

    /// Each terminal is due once its own `after_ms` has passed, in that order (not in the
    /// order the shard holds them), none before; all are due once the window has passed.
    #[test]
    fn drain_closes_each_terminal_at_its_own_after_ms() {
        let told = vec![(1800, key(0)), (100, key(1)), (900, key(2)), (100, key(3)), (1999, key(4))];
        let mut plan = DrainPlan::new(5_000_000, 2000, told);
        let mut due = Vec::new();
        let at = |ms: u64| 5_000_000 + ms * 1000;
        assert!(!plan.due(at(0), &mut due));
        assert!(due.is_empty(), "none before its after_ms: {due:?}");
        assert!(!plan.due(at(99), &mut due));
        assert!(due.is_empty(), "none before its after_ms: {due:?}");
        assert!(!plan.due(at(250), &mut due));
        due.sort_unstable_by_key(|k| k.slot);
        assert_eq!(due, [key(1), key(3)], "the two told 100 ms");
        due.clear();
        assert!(!plan.due(at(1000), &mut due));
        assert_eq!(due, [key(2)]);
        due.clear();
        assert!(!plan.due(at(1900), &mut due));
        assert_eq!(due, [key(0)], "told 1800 ms, not the one told 1999 ms");
        due.clear();
        assert!(plan.due(at(2000), &mut due), "the window is over");
        assert_eq!(due, [key(4)]);
        due.clear();
        assert!(plan.due(at(2250), &mut due));
        assert!(due.is_empty(), "each is due once");
    }

    /// A tick late past the window closes whatever is left, in the order of their `after_ms`.
    #[test]
    fn a_late_tick_closes_what_is_due_in_after_ms_order() {
        let mut plan = DrainPlan::new(0, 1000, vec![(700, key(0)), (20, key(1)), (400, key(2))]);
        let mut due = Vec::new();
        assert!(plan.due(5_000_000, &mut due));
        assert_eq!(due, [key(1), key(2), key(0)]);
    }

    #[test]
    fn home_shard_is_stable_and_spread() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let u = format!("user-{i}");
            assert_eq!(home_shard(&u, 4), home_shard(&u, 4));
            counts[home_shard(&u, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
