//! `FanoutMesh`: the bounded lock-free queues between every pair of shards (glommio shared
//! channels), and `ShardMsg`, everything that may travel on them. Carries already-encoded
//! frames and shared messages, never copies of them. Owns no shard state.
use std::os::fd::OwnedFd;
use std::sync::Arc;

use ether_proto::api::TerminalInfo;
use ether_proto::frame::ServerFrame;
use futures_channel::oneshot;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};
use glommio::sync::Semaphore;

/// A terminal authenticated on one shard and handed to its user's home shard (the raw fd
/// moves, not the bytes).
#[derive(Debug)]
pub struct Handoff {
    pub fd: OwnedFd,
    pub user: Arc<str>,
    pub device: Box<str>,
    pub platform: crate::session::Platform,
    pub remote: std::net::SocketAddr,
    /// `Sec-WebSocket-Key`, answered by the home shard.
    pub ws_key: Box<str>,
    /// The subprotocol the terminal chose (None: it named none, JSON).
    pub subprotocol: Option<crate::message::Wire>,
    /// Bytes read after the upgrade request (normally none).
    pub leftover: Vec<u8>,
}

/// Everything one shard asks of another. Not membership changes: two of them sent by two
/// shards, each on its own queue, could reach a home shard in the other order than the store
/// committed them; they go through the storage thread's commit queues (`storage::Committed`).
#[derive(Debug)]
pub enum ShardMsg {
    /// Take over a terminal of a user who lives here.
    Adopt(Box<Handoff>),
    /// Push `frame` to every terminal of `user` (who lives here): receipts, read syncs.
    UserFrame { user: Arc<str>, frame: Arc<ServerFrame> },
    /// The user's terminals on this shard.
    Presence { user: Arc<str>, reply: oneshot::Sender<Vec<TerminalInfo>> },
    /// Kick the user's terminals (one device, or all); answers how many.
    Kick { user: Arc<str>, device: Option<Box<str>>, reason: Arc<str>, reply: oneshot::Sender<u64> },
    /// Snapshots of the shard's terminals (all of them, or one user's).
    Connections { user: Option<Arc<str>>, reply: oneshot::Sender<Vec<crate::stats::ConnSnapshot>> },
    /// Write `frame` to every terminal on the shard; answers how many.
    Broadcast { frame: Arc<ServerFrame>, reply: oneshot::Sender<u64> },
    /// Which of these users (who live here) have no terminal on this shard.
    Offline { users: Vec<Arc<str>>, reply: oneshot::Sender<Vec<Arc<str>>> },
}

/// Capacity of each shard-to-shard queue, in messages.
pub const MESH_QUEUE_CAPACITY: usize = 4096;

/// The unconnected ends of the mesh, made on the main thread before the shards start.
pub struct MeshPlan {
    /// `senders[from][to]`
    senders: Vec<Vec<Option<SharedSender<ShardMsg>>>>,
    /// `receivers[to][from]`
    receivers: Vec<Vec<Option<SharedReceiver<ShardMsg>>>>,
}

/// One shard's share of the plan.
pub struct MeshEnds {
    senders: Vec<Option<SharedSender<ShardMsg>>>,
    receivers: Vec<Option<SharedReceiver<ShardMsg>>>,
}

impl MeshPlan {
    pub fn new(shards: usize) -> MeshPlan {
        let mut senders: Vec<Vec<Option<SharedSender<ShardMsg>>>> =
            (0..shards).map(|_| (0..shards).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<SharedReceiver<ShardMsg>>>> =
            (0..shards).map(|_| (0..shards).map(|_| None).collect()).collect();
        for from in 0..shards {
            for to in 0..shards {
                if from != to {
                    let (tx, rx) = shared_channel::new_bounded(MESH_QUEUE_CAPACITY);
                    senders[from][to] = Some(tx);
                    receivers[to][from] = Some(rx);
                }
            }
        }
        MeshPlan { senders, receivers }
    }

    /// Splits the plan into each shard's ends, in shard order.
    pub fn into_ends(self) -> Vec<MeshEnds> {
        self.senders
            .into_iter()
            .zip(self.receivers)
            .map(|(senders, receivers)| MeshEnds { senders, receivers })
            .collect()
    }
}

/// A shard's connected senders to every other shard.
pub struct FanoutMesh {
    me: usize,
    senders: Vec<Option<(ConnectedSender<ShardMsg>, Semaphore)>>,
}

impl MeshEnds {
    /// Connects this shard's ends (on its executor); returns the mesh and one receiver per peer.
    pub async fn connect(self, me: usize) -> (FanoutMesh, Vec<(usize, ConnectedReceiver<ShardMsg>)>) {
        // Each connect waits for its peer's: start them all at once, or two shards each
        // waiting on their own sender first would wait for each other forever.
        let senders: Vec<_> = self.senders.into_iter().map(|s| s.map(|s| glommio::spawn_local(s.connect()))).collect();
        let receivers: Vec<_> = self
            .receivers
            .into_iter()
            .enumerate()
            .filter_map(|(from, r)| r.map(|r| (from, glommio::spawn_local(r.connect()))))
            .collect();
        let mut connected = Vec::with_capacity(senders.len());
        for s in senders {
            connected.push(match s {
                Some(task) => Some((task.await, Semaphore::new(1))),
                None => None,
            });
        }
        let mut rx = Vec::with_capacity(receivers.len());
        for (from, task) in receivers {
            rx.push((from, task.await));
        }
        (FanoutMesh { me, senders: connected }, rx)
    }
}

/// The destination shard is gone (the node is stopping); the message is dropped.
#[derive(Debug)]
pub struct MeshClosed;

impl FanoutMesh {
    pub fn me(&self) -> usize {
        self.me
    }

    /// Sends to another shard, waiting while its queue is full.
    pub async fn send(&self, to: usize, msg: ShardMsg) -> Result<(), MeshClosed> {
        let Some(Some((tx, gate))) = self.senders.get(to) else {
            debug_assert!(to == self.me, "no queue to shard {to}");
            return Err(MeshClosed);
        };
        // Every send goes through the gate: with one task at a time waiting for room, a freed
        // slot is never taken by another task first (glommio's `send` panics if it is).
        let Ok(_permit) = gate.acquire_permit(1).await else {
            return Err(MeshClosed);
        };
        tx.send(msg).await.map_err(|_| MeshClosed)
    }
}
