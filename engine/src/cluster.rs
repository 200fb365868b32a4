//! Cluster mode (`cluster.redis_url`, `--redis`): the node's link to the other nodes through
//! Redis. Owns what nodes tell each other (the bus: Redis streams), the node registry (a key
//! per node with a TTL), cluster-wide presence (a hash per user), and the two OS threads that
//! talk to Redis: `ether-cluster-out` (registry heartbeat, presence writes and lookups, bus
//! appends, batched) and `ether-cluster-in` (reads the bus). The message store itself is
//! shared through `ether_store::RedisBackend` (see `storage`).
//!
//! The bus has two kinds of stream. What concerns one user (an inbox message, a receipt or
//! read sync, a kick) goes only to the nodes holding that user's terminals: a script in Redis
//! reads the user's presence and appends the entry to each such live node's own stream,
//! `ether:bus:<node>` (none when the user has no terminal elsewhere), so a node reads only
//! its own users' traffic however many nodes there are. What concerns everybody (group
//! messages and membership, broadcasts, token revocations) goes to the shared stream,
//! `ether:bus`, which every node reads. A terminal's presence is written, and Redis has answered, before its node reads
//! the user's inbox head for `welcome` (`conn::adopt`): a message committed before the other
//! nodes could see the presence is within that head (the terminal syncs it), and every later
//! one is routed here. That first entry is marked connecting; once the terminal is taken on
//! it is written again without the mark, and Redis has answered, before the terminal's
//! socket gets its `welcome`. Only unmarked entries count as online for the other nodes
//! (`message.unreached`, `group.unreached`, presence): a terminal that fails while connecting
//! hid nobody's messages from the business.
//!
//! Never touches shard state: what arrives on the bus is queued for the shards through
//! `CommitQueues` (deliveries as for local commits, the rest as `Committed::Cluster`); shards and
//! store completions hand what goes out to [`Cluster::publish`] (a channel; never blocks).
//!
//! Order and loss: each node reads the bus from the streams' ends as they were before it
//! registered (the other nodes route to it from then on, and its terminals may connect before
//! its reader's first read), then from the last entry it saw, so neither its start nor a
//! reconnect loses anything still in the stream (trimmed to about `BUS_LEN` entries); nodes commit to the shared store
//! concurrently, so a shard does not trust the bus for order or completeness. It pushes an inbox
//! message at once only when it is the next seq it expects; anything else makes it read the
//! missing range from the store first (`delivery`), so terminals always get their inbox in seq
//! order, without gaps, and what a lost bus message carried comes from the store. When entries
//! may have been lost outright (trimmed while this node was away, or dropped by a node that
//! could not publish), every shard checks its users' inbox and group heads against the store
//! (`BusEvent::Resync`, `ClusterEvent::Resync`).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use ether_proto::api::TerminalInfo;
use ether_proto::frame::ServerFrame;
use ether_proto::Kind;
use futures_channel::oneshot;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

use crate::message::{unix_now_ms, Message, SHARDS_MAX};
use crate::shard::home_shard;
use crate::storage::{ClusterEvent, CommitQueues, Committed, GroupDelivery, InboxDelivery};

/// Prefix of every key and channel the engine uses in Redis.
pub const KEY_PREFIX: &str = "ether:";
/// How long a node's registry key lives without a heartbeat.
const NODE_TTL: Duration = Duration::from_secs(15);
/// How often a node renews its registry key.
const HEARTBEAT: Duration = Duration::from_secs(3);
/// How long the out thread waits for Redis to take a pipeline and answer it. Without a bound
/// a Redis that stops answering (paused, busy in a long script, or gone without a reset: a
/// failover behind a moved address) held the thread until the kernel gave up on the socket,
/// and with it every new terminal (`connecting`), every presence, kick and broadcast
/// answer, and the node's stop.
pub(crate) const REDIS_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Outgoing items written to Redis in one pipeline at most.
const OUT_BATCH_MAX: usize = 512;
/// Presence removals lost to failed writes kept for writing again (beyond it they are
/// dropped, logged, and their entries stay stale until the device connects again).
const LOST_REMOVALS_MAX: usize = 100_000;
/// Outgoing items queued before `publish` drops (and logs) them: the store is the truth, so a
/// dropped bus message only delays delivery until the next message or `sync`.
const OUT_QUEUE_MAX: usize = 100_000;
/// How long a bus read blocks (`XREAD BLOCK`) before looking at the stop flag, ms.
const BUS_BLOCK_MS: u64 = 500;
/// Bus entries read at once.
const BUS_READ_MAX: usize = 512;
/// Entries the bus stream keeps (about: `XADD MAXLEN ~`): a node away longer than this many
/// messages catches up from the store instead (gap fills, `sync`).
const BUS_LEN: u64 = 100_000;

/// Stream entries as Redis returns them: `(id, [(field, value)])`.
type BusEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;

fn bus_key() -> String {
    format!("{KEY_PREFIX}bus")
}

/// The stream of what concerns only the users with terminals on `node`.
fn node_bus_key(node: &str) -> String {
    format!("{KEY_PREFIX}bus:{node}")
}

/// Appends bus entries to the own streams of the live nodes, other than the sender, that hold
/// a terminal of each entry's user, in order. KEYS: the users' presence hashes (fields
/// `<node>/<device>`; node ids have no `/`), one per entry. ARGV: the sending node, the
/// streams' `MAXLEN ~`, the key prefix, then the entries (ARGV[3 + i] goes with KEYS[i]).
/// Returns how many appends it made. The streams and registry keys it touches are named from
/// the presence (single Redis only, like the store's functions). One call carries a run of
/// consecutive routed publishes (at most [`ROUTES_PER_CALL_MAX`]): a message's two (receiver
/// and sender) and those of the messages committed with it.
const ROUTE_SCRIPT: &str = r"
local alive = {}
local n = 0
for i = 1, #KEYS do
  local nodes = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[i])) do
    local node = string.match(field, '^([^/]+)/')
    if node and node ~= ARGV[1] then nodes[node] = true end
  end
  for node, _ in pairs(nodes) do
    if alive[node] == nil then
      alive[node] = redis.call('EXISTS', ARGV[3] .. 'node:' .. node) == 1
    end
    if alive[node] then
      redis.call('XADD', ARGV[3] .. 'bus:' .. node, 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[3 + i])
      n = n + 1
    end
  end
end
return n
";

/// Most routed publishes in one [`ROUTE_SCRIPT`] call.
const ROUTES_PER_CALL_MAX: usize = 256;

fn node_key(node: &str) -> String {
    format!("{KEY_PREFIX}node:{node}")
}

/// The lease on one message-id generator slot (`IdGen`'s shard field: 64 per cluster).
fn generator_key(slot: usize) -> String {
    format!("{KEY_PREFIX}idgen:{slot}")
}

/// Leases `shards` consecutive id-generator slots for this node (its shards make ids with
/// `base + shard`), so no two live nodes make the same message ids. A restarted node may take
/// back its own slots at once; others' expire with their node (`NODE_TTL`). Every slot taken,
/// its own of an earlier run included, gets a whole TTL from now ([`RENEW_LEASES_SCRIPT`]):
/// the shards use it until `lease_deadline` of now, and a slot left with the earlier run's
/// remaining TTL could lapse before that and be claimed by another node meanwhile (two nodes
/// making the same ids until the next heartbeat).
fn claim_generators(con: &mut redis::Connection, node_id: &str, shards: usize) -> Result<usize, ClusterError> {
    let ttl = NODE_TTL.as_millis() as u64;
    let take = redis::Script::new(RENEW_LEASES_SCRIPT);
    for base in 0..=SHARDS_MAX.saturating_sub(shards) {
        let mut taken = Vec::new();
        for slot in base..base + shards {
            let holders: Vec<String> = take.key(generator_key(slot)).arg(node_id).arg(ttl).invoke(con)?;
            let mine = holders.first().is_some_and(String::is_empty);
            if !mine {
                break;
            }
            taken.push(slot);
        }
        if taken.len() == shards {
            return Ok(base);
        }
        for slot in taken {
            redis::cmd("DEL").arg(generator_key(slot)).query::<()>(con)?;
        }
    }
    Err(ClusterError::NoIdGenerators { shards })
}

/// Why a shard refuses new messages while it holds no id-generator lease.
pub(crate) const NO_ID_LEASE: &str =
    "this shard has no message-id generator right now (its cluster lease was lost); try again";

/// How long before its Redis TTL runs out a shard stops making ids with a lease not renewed
/// since (the two clocks, Redis's and this node's, may not agree to the millisecond).
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// Until when (Unix ms) a lease whose renewal was sent at `sent_ms` may be used.
fn lease_deadline(sent_ms: u64) -> u64 {
    sent_ms + NODE_TTL.as_millis() as u64 - LEASE_MARGIN.as_millis() as u64
}

/// One shard's lease on a message-id generator slot, as its `IdGen` sees it: the slot and
/// until when it may make ids with it. Set by the out thread (at each renewal, and when the
/// slot was lost to another node), read by the shard at each id (one atomic load).
#[derive(Debug)]
pub struct IdLease(AtomicU64);

impl IdLease {
    /// The slot field of a lease that has no slot.
    const NO_SLOT: u64 = 0xff;

    fn new(slot: Option<usize>, until_ms: u64) -> IdLease {
        let lease = IdLease(AtomicU64::new(Self::NO_SLOT));
        lease.set(slot, until_ms);
        lease
    }

    fn set(&self, slot: Option<usize>, until_ms: u64) {
        let slot = slot.filter(|s| *s < SHARDS_MAX).map_or(Self::NO_SLOT, |s| s as u64);
        self.0.store(until_ms << 8 | slot, Ordering::Release);
    }

    /// The slot to make ids with at `now_ms`: none while the shard holds none, or once the
    /// lease may have lapsed in Redis (not renewed for about `NODE_TTL`: another node may have
    /// claimed the slot since).
    pub fn slot_at(&self, now_ms: u64) -> Option<usize> {
        let v = self.0.load(Ordering::Acquire);
        let slot = v & 0xff;
        (slot != Self::NO_SLOT && now_ms < v >> 8).then_some(slot as usize)
    }
}

/// Renews id-generator leases held by this node. KEYS: the slots' keys; ARGV: the node id,
/// the TTL (ms). A key absent (lapsed, nobody claimed it since) or holding this node's id is
/// set again with the TTL; one another node holds is left alone. Returns, per key, `''`
/// (renewed) or the holder's id.
const RENEW_LEASES_SCRIPT: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == false or holder == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    out[i] = ''
  else
    out[i] = holder
  end
end
return out
";

/// Deletes the keys (KEYS) that still hold ARGV[1]: this node's leases, never one another
/// node has taken since.
const RELEASE_LEASES_SCRIPT: &str = r"
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
";

/// Leases one free id-generator slot (the first, as at start), for a shard whose slot another
/// node took. `None` when all are held.
fn claim_slot(con: &mut redis::Connection, node_id: &str) -> redis::RedisResult<Option<usize>> {
    let ttl = NODE_TTL.as_millis() as u64;
    for slot in 0..SHARDS_MAX {
        let set: Option<String> =
            redis::cmd("SET").arg(generator_key(slot)).arg(node_id).arg("NX").arg("PX").arg(ttl).query(con)?;
        if set.is_some() {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

fn presence_key(user: &str) -> String {
    format!("{KEY_PREFIX}presence:{user}")
}

/// A message as it travels on the bus.
#[derive(Debug, Serialize, Deserialize)]
pub struct BusMessage {
    pub id: u64,
    pub ts: u64,
    pub from: String,
    pub kind: Kind,
    pub body: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
}

impl BusMessage {
    pub fn of(m: &Message) -> BusMessage {
        BusMessage {
            id: m.id,
            ts: m.ts,
            from: m.from.to_string(),
            kind: m.kind,
            body: m.body.clone(),
            cid: m.cid.as_deref().map(str::to_owned),
        }
    }

    fn into_message(self) -> Message {
        Message {
            id: self.id,
            ts: self.ts,
            from: self.from.into(),
            kind: self.kind,
            body: self.body,
            cid: self.cid.map(Into::into),
        }
    }
}

/// What one node tells the others. Externally tagged (`{"inbox":{…}}`): a message body is
/// carried as raw JSON, which serde cannot take from an internally tagged enum's buffer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusEvent {
    /// A message made durable in `owner`'s inbox.
    Inbox {
        owner: String,
        chat: String,
        seq: u64,
        msg: BusMessage,
    },
    /// A group message made durable.
    Group {
        group: String,
        seq: u64,
        msg: BusMessage,
    },
    /// A frame for every terminal of `user` (receipts, read syncs).
    UserFrame {
        user: String,
        frame: ServerFrame,
    },
    Kick {
        user: String,
        device: Option<String>,
        reason: String,
        /// Only terminals connected before this (Unix ms): a device that connected on another
        /// node replaces the older connections of the same device, never a newer one (`None`,
        /// an operator's kick, and from nodes before this field: all).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before_ms: Option<u64>,
    },
    Broadcast {
        frame: ServerFrame,
    },
    /// The user's tokens (on `device` only, when set) issued before `before_ms` are refused
    /// (already in the store): every node notes it, whether it holds the user or not.
    Revoke {
        user: String,
        device: Option<String>,
        before_ms: u64,
    },
    /// These users joined or left `group`.
    Membership {
        group: String,
        users: Vec<String>,
        joined: bool,
    },
    GroupGone {
        group: String,
    },
    /// The sender lost bus entries it should have published (a failed write, a full queue):
    /// every node checks its users' inboxes and groups against the store (see
    /// [`ClusterEvent::Resync`]).
    Resync,
}

impl BusEvent {
    /// The one user this event concerns, if it concerns only one: it then goes only to the
    /// nodes holding that user's terminals (see the module doc).
    fn addressee(&self) -> Option<&str> {
        match self {
            BusEvent::Inbox { owner, .. } => Some(owner),
            BusEvent::UserFrame { user, .. } | BusEvent::Kick { user, .. } => Some(user),
            BusEvent::Group { .. }
            | BusEvent::Broadcast { .. }
            | BusEvent::Membership { .. }
            | BusEvent::GroupGone { .. }
            | BusEvent::Revoke { .. }
            | BusEvent::Resync => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The sending node (a node ignores its own).
    node: String,
    event: BusEvent,
}

/// The registry entry of a node, rewritten at every heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeEntry {
    client: String,
    api: String,
    admin: String,
    started_ms: u64,
    /// Terminals connected at the last heartbeat (for cluster-wide broadcast counts).
    #[serde(default)]
    terminals: u64,
}

/// How a node counts its connected terminals (read at each heartbeat).
pub type TerminalCount = Arc<dyn Fn() -> u64 + Send + Sync>;

enum Out {
    Publish(BusEvent),
    /// Answered once Redis has the entry (dropped unanswered if the write failed).
    Online {
        user: String,
        device: String,
        platform: String,
        since: u64,
        /// The terminal is still being taken on (see [`Cluster::connecting`]).
        connecting: bool,
        written: Written,
    },
    Offline {
        user: String,
        device: String,
    },
    Presence {
        user: String,
        reply: oneshot::Sender<Vec<TerminalInfo>>,
    },
    TerminalsElsewhere {
        reply: oneshot::Sender<u64>,
    },
}

/// How a presence write is answered.
enum Written {
    /// Once Redis has the entry.
    Done(oneshot::Sender<()>),
    /// With the user's terminals on the other live nodes, read just after the entry was
    /// written (in the same pipeline, so two terminals connecting at once on two nodes each
    /// see the other's entry, or one of them does).
    WithOthers(oneshot::Sender<Vec<TerminalInfo>>),
}

/// What the cluster threads count (for `/admin/v1/stats` and Prometheus).
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub shared_entries_read: AtomicU64,
    pub own_entries_read: AtomicU64,
    pub published_shared: AtomicU64,
    pub published_routed: AtomicU64,
    pub routed_appends: AtomicU64,
    pub presence_writes: AtomicU64,
    pub dropped: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Checks of every local inbox and group against the store (after bus entries were lost).
    pub resyncs: AtomicU64,
    /// Message-id generator slots found held by another node at a renewal (this node's lease
    /// had lapsed): the shard moved to a free slot.
    pub idgen_slots_lost: AtomicU64,
    /// Set when a publish was dropped: the next successful write asks every node to resync.
    lost_publishes: AtomicBool,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The node's cluster link; `None` in `NodeShared` on a standalone node.
#[derive(Debug)]
pub struct Cluster {
    pub node_id: String,
    pub counters: Arc<ClusterCounters>,
    /// Each shard's lease on its message-id generator slot (`IdGen::leased`).
    id_leases: Vec<Arc<IdLease>>,
    out: Sender<Out>,
    /// Unix ms of the last successful Redis round trip of each thread (for `/readyz`).
    out_ok_ms: Arc<AtomicU64>,
    in_ok_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Why the cluster link could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error(
        "no {shards} free message-id generators: the live nodes of a cluster have at most {SHARDS_MAX} shards in all"
    )]
    NoIdGenerators { shards: usize },
    #[error(
        "node id {node_id:?} is already used by a live node of this cluster: give each node its own \
         --node-id (a node that just stopped frees its id within {ttl_s} s)"
    )]
    NodeIdTaken { node_id: String, ttl_s: u64 },
    #[error(
        "this node's secrets (auth.jwt_secret, auth.api_key, auth.admin_token) differ from the \
         cluster's: give every node the same ones (tokens and API keys must work on any node)"
    )]
    SecretsDiffer,
}

/// A digest of the node's secrets (HMAC-SHA256 keyed by the JWT secret over the other two), so
/// nodes can check they share them without putting them in Redis.
pub fn secrets_digest(jwt_secret: &str, api_key: &str, admin_token: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(jwt_secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"ether cluster secrets v1\n");
    mac.update(api_key.as_bytes());
    mac.update(b"\n");
    mac.update(admin_token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The first node sets the cluster's secrets digest; every later one must match it.
fn check_secrets(con: &mut redis::Connection, digest: &str) -> Result<(), ClusterError> {
    let key = format!("{KEY_PREFIX}secrets");
    let set: Option<String> = redis::cmd("SET").arg(&key).arg(digest).arg("NX").query(con)?;
    if set.is_some() {
        return Ok(());
    }
    let theirs: Option<String> = redis::cmd("GET").arg(&key).query(con)?;
    if theirs.as_deref() == Some(digest) {
        Ok(())
    } else {
        Err(ClusterError::SecretsDiffer)
    }
}

/// Warns when this node's webhook differs from the one the last node to join announced: the
/// outbox is shared, and a node without a webhook keeps its events out of it (they reach only
/// the `ether:events` stream), while one with another URL delivers everybody's events there
/// whenever it holds the delivery lease. Then announces this node's (a digest, never the URL).
/// A warning, not a refusal, so a rolling change of the URL can proceed node by node.
fn check_webhook(con: &mut redis::Connection, node_id: &str, webhook_url: Option<&str>) -> Result<(), ClusterError> {
    use sha2::Digest;
    let key = format!("{KEY_PREFIX}events:webhook");
    let mine = match webhook_url {
        Some(url) => hex::encode(sha2::Sha256::digest(url.as_bytes())),
        None => "none".to_owned(),
    };
    let theirs: Option<String> = redis::cmd("GETSET").arg(&key).arg(&mine).query(con)?;
    if let Some(theirs) = theirs.filter(|t| *t != mine) {
        let (yours, other) =
            (if mine == "none" { "none" } else { "one" }, if theirs == "none" { "none" } else { "another" });
        warn!(
            node = node_id,
            "this node's events.webhook_url ({yours}) differs from the cluster's ({other}): give every node the same one, or events accepted by some nodes miss the webhook"
        );
    }
    Ok(())
}

/// Where the node listens, for its registry entry.
pub struct Addresses {
    pub client: std::net::SocketAddr,
    pub api: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
}

/// Who joins: what the node tells the cluster about itself.
pub struct Joining<'a> {
    pub node_id: &'a str,
    pub addrs: &'a Addresses,
    /// [`secrets_digest`] of the node's secrets (must match the cluster's).
    pub secrets_digest: &'a str,
    /// The node's `events.webhook_url`, if any (compared with the other nodes', see
    /// [`check_webhook`]).
    pub webhook_url: Option<&'a str>,
    /// How the node counts its terminals (reported at each heartbeat).
    pub terminals: TerminalCount,
    /// The node's revoked tokens, raised by other nodes' revocations on the bus.
    pub revocations: Arc<crate::revocations::TokenRevocations>,
}

impl Cluster {
    /// Connects (checking Redis answers), registers the node, and starts both threads. What
    /// arrives on the bus goes to `commits` (`shards` shards).
    pub fn start(
        url: &str,
        joining: Joining<'_>,
        commits: Arc<CommitQueues>,
        shards: usize,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let Joining { node_id, addrs, secrets_digest, webhook_url, terminals, revocations } = joining;
        let client = redis::Client::open(url)?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
        check_secrets(&mut con, secrets_digest)?;
        check_webhook(&mut con, node_id, webhook_url)?;
        // Where the bus reader starts, taken before the node is registered: from then on the
        // other nodes route entries to it (its stream, and the shared one's for its members),
        // and its terminals may connect before the reader's first read. Taken by the reader
        // itself, at the streams' ends when it got round to it, it skipped what came between.
        let streams = [bus_key(), node_bus_key(node_id)];
        #[cfg(test)]
        tests::before_bus_position(node_id);
        let bus_from = bus_ends(&mut con, &streams)?;
        let entry = NodeEntry {
            client: addrs.client.to_string(),
            api: addrs.api.to_string(),
            admin: addrs.admin.to_string(),
            started_ms: unix_now_ms(),
            terminals: 0,
        };
        let first_entry = serde_json::to_string(&entry).unwrap_or_default();
        // One live node per id: two would share id generators and presence entries.
        let registered: Option<String> = redis::cmd("SET")
            .arg(node_key(node_id))
            .arg(&first_entry)
            .arg("NX")
            .arg("PX")
            .arg(NODE_TTL.as_millis() as u64)
            .query(&mut con)?;
        if registered.is_none() {
            return Err(ClusterError::NodeIdTaken { node_id: node_id.to_owned(), ttl_s: NODE_TTL.as_secs() });
        }
        let claimed_ms = unix_now_ms();
        let generator_base = match claim_generators(&mut con, node_id, shards) {
            Ok(base) => base,
            Err(e) => {
                let _ = redis::cmd("DEL").arg(node_key(node_id)).query::<()>(&mut con);
                return Err(e);
            }
        };
        let id_leases: Vec<Arc<IdLease>> = (generator_base..generator_base + shards)
            .map(|slot| Arc::new(IdLease::new(Some(slot), lease_deadline(claimed_ms))))
            .collect();
        let (tx, rx) = channel::bounded(OUT_QUEUE_MAX);
        let counters = Arc::new(ClusterCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let out_ok_ms = Arc::new(AtomicU64::new(unix_now_ms()));
        let in_ok_ms = Arc::new(AtomicU64::new(unix_now_ms()));
        let mut threads = Vec::new();
        {
            con.set_read_timeout(Some(REDIS_IO_TIMEOUT))?;
            con.set_write_timeout(Some(REDIS_IO_TIMEOUT))?;
            let w = OutWorker {
                node_id: node_id.to_owned(),
                held: (generator_base..generator_base + shards).map(Some).collect(),
                leases: id_leases.clone(),
                client: client.clone(),
                con: Some(con),
                route_sha: None,
                counters: counters.clone(),
                commits: commits.clone(),
                shards,
                presence_lost: false,
                lost_removals: LostRemovals::default(),
                registry_lapsed: false,
                rx,
                entry,
                terminals,
                stop: stop.clone(),
                ok_ms: out_ok_ms.clone(),
            };
            threads.push(std::thread::Builder::new().name("ether-cluster-out".into()).spawn(move || w.run())?);
        }
        {
            let r = InWorker {
                node_id: node_id.to_owned(),
                streams,
                from: bus_from,
                counters: counters.clone(),
                client,
                commits,
                shards,
                revocations,
                stop: stop.clone(),
                ok_ms: in_ok_ms.clone(),
            };
            threads.push(std::thread::Builder::new().name("ether-cluster-in".into()).spawn(move || r.run())?);
        }
        info!(node = node_id, generator_base, "joined the cluster");
        Ok(Arc::new(Cluster {
            node_id: node_id.to_owned(),
            counters,
            id_leases,
            out: tx,
            out_ok_ms,
            in_ok_ms,
            stop,
            threads: Mutex::new(threads),
        }))
    }

    /// `shard`'s lease on its message-id generator slot.
    pub fn id_lease(&self, shard: usize) -> Arc<IdLease> {
        self.id_leases[shard].clone()
    }

    /// Tells the other nodes (never blocks; dropped with a warning if the queue is full).
    pub fn publish(&self, event: BusEvent) {
        self.send(Out::Publish(event));
    }

    /// Registers a terminal taken on here (its `welcome` queued) in the cluster's presence:
    /// online for the other nodes ([`Self::presence_elsewhere`]). The answer comes once Redis
    /// has it (from then on the other nodes route the user's traffic here), or is dropped if
    /// the write failed (logged by the out thread; the terminal still works, reached through
    /// `sync`).
    pub fn online(&self, user: &str, device: &str, platform: &str, since: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let written = Written::Done(tx);
        let (user, device, platform) = (user.into(), device.into(), platform.into());
        self.send(Out::Online { user, device, platform, since, connecting: false, written });
        rx
    }

    /// Registers a terminal still being taken on here (before its heads are read for its
    /// `welcome`): the other nodes route the user's traffic here from then on, but do not
    /// count it as online ([`Self::presence_elsewhere`]: it may never be welcomed) until
    /// [`Self::online`] says so. Answered with the user's terminals on the other live nodes,
    /// those still connecting included, as Redis had them just after this write (for
    /// `limits.terminals_per_user_max` across the cluster).
    pub fn connecting(
        &self,
        user: &str,
        device: &str,
        platform: &str,
        since: u64,
    ) -> oneshot::Receiver<Vec<TerminalInfo>> {
        let (tx, rx) = oneshot::channel();
        let written = Written::WithOthers(tx);
        let (user, device, platform) = (user.into(), device.into(), platform.into());
        self.send(Out::Online { user, device, platform, since, connecting: true, written });
        rx
    }

    pub fn offline(&self, user: &str, device: &str) {
        self.send(Out::Offline { user: user.into(), device: device.into() });
    }

    /// Terminals connected to the other live nodes, as of their last heartbeats (at most
    /// `HEARTBEAT` old).
    pub async fn terminals_elsewhere(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        self.send(Out::TerminalsElsewhere { reply: tx });
        rx.await.unwrap_or_default()
    }

    /// The user's terminals online on the other live nodes: taken on there ([`Self::online`]),
    /// not those still connecting ([`Self::connecting`]). What `message.unreached`,
    /// `group.unreached`, presence and kick counts go by, as for this node's own terminals.
    pub async fn presence_elsewhere(&self, user: &str) -> Vec<TerminalInfo> {
        let (tx, rx) = oneshot::channel();
        self.send(Out::Presence { user: user.into(), reply: tx });
        rx.await.unwrap_or_default()
    }

    /// [`Self::presence_elsewhere`] of several users: every lookup is queued before the first
    /// answer is awaited, so the out thread pipelines them.
    pub async fn presence_elsewhere_many(&self, users: &[Arc<str>]) -> Vec<Vec<TerminalInfo>> {
        let answers: Vec<_> = users
            .iter()
            .map(|u| {
                let (tx, rx) = oneshot::channel();
                self.send(Out::Presence { user: u.to_string(), reply: tx });
                rx
            })
            .collect();
        let mut out = Vec::with_capacity(answers.len());
        for rx in answers {
            out.push(rx.await.unwrap_or_default());
        }
        out
    }

    fn send(&self, item: Out) {
        if let Err(e) = self.out.try_send(item) {
            if matches!(e.into_inner(), Out::Publish(_)) {
                self.counters.lost_publishes.store(true, Ordering::Relaxed);
            }
            add(&self.counters.dropped, 1);
            warn!(node = %self.node_id, "cluster queue full: a bus message was dropped (the store still has it)");
        }
    }

    /// Items waiting for the out thread.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Milliseconds since Redis last answered the out thread and the bus reader.
    pub fn redis_ages_ms(&self) -> (u64, u64) {
        let now = unix_now_ms();
        let age = |ok: &AtomicU64| now.saturating_sub(ok.load(Ordering::Relaxed));
        (age(&self.out_ok_ms), age(&self.in_ok_ms))
    }

    /// Why the node should not take traffic, if Redis has not answered lately.
    pub fn not_ready(&self) -> Option<String> {
        let now = unix_now_ms();
        let stale = |ok: &AtomicU64| now.saturating_sub(ok.load(Ordering::Relaxed)) > 2 * NODE_TTL.as_millis() as u64;
        (stale(&self.out_ok_ms) || stale(&self.in_ok_ms)).then(|| "redis (cluster) not reachable".to_owned())
    }

    /// Leaves the cluster: stops both threads (the out thread removes the registry key).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Presence removals `(user, device)` that failed writes lost, to be written again. Fed with
/// each write's presence changes in order (`(online, user, device)`): a removal lost is
/// kept; an entry of the same device written afterwards, or the removal itself written, ends
/// it (the device came back, or it is done).
#[derive(Debug, Default)]
struct LostRemovals(HashSet<(String, String)>);

impl LostRemovals {
    /// A write failed with these changes; returns how many removals were not kept (past `max`).
    fn lost(&mut self, changes: Vec<(bool, String, String)>, max: usize) -> usize {
        let mut dropped = 0;
        for (online, user, device) in changes {
            let key = (user, device);
            if online {
                self.0.remove(&key);
            } else if self.0.len() < max || self.0.contains(&key) {
                self.0.insert(key);
            } else {
                dropped += 1;
            }
        }
        dropped
    }

    /// A write with these changes succeeded: each device's latest state is in Redis.
    fn written(&mut self, changes: Vec<(bool, String, String)>) {
        for (_, user, device) in changes {
            self.0.remove(&(user, device));
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// `ether-cluster-out`: writes to Redis what the node queues, in pipelines.
struct OutWorker {
    node_id: String,
    /// The id-generator slot each shard leases (`None`: lost to another node, none free yet).
    held: Vec<Option<usize>>,
    /// What the shards see of those leases (see [`IdLease`]).
    leases: Vec<Arc<IdLease>>,
    client: redis::Client,
    con: Option<redis::Connection>,
    /// [`ROUTE_SCRIPT`]'s SHA1, loaded on each new connection.
    route_sha: Option<String>,
    counters: Arc<ClusterCounters>,
    /// Where a lost presence write is reported (the shards write their terminals' again).
    commits: Arc<CommitQueues>,
    shards: usize,
    /// A failed write lost presence entries: once Redis takes writes again, every shard
    /// writes its terminals' presence again.
    presence_lost: bool,
    /// Presence removals (user, device) a failed write lost, written again at the next
    /// heartbeat that Redis takes, unless the device came back here meanwhile (its new entry
    /// supersedes the removal). Without this, a lost `HDEL` left the device listed in the
    /// user's presence, and its messages routed to this node, until it connected again.
    lost_removals: LostRemovals,
    /// A heartbeat found this node's registry key gone (it lapsed while Redis was out of
    /// reach): once written again, every shard checks its users against the store, since the
    /// other nodes routed nothing here meanwhile.
    registry_lapsed: bool,
    rx: Receiver<Out>,
    entry: NodeEntry,
    terminals: TerminalCount,
    stop: Arc<AtomicBool>,
    ok_ms: Arc<AtomicU64>,
}

impl OutWorker {
    fn run(mut self) {
        let mut last_beat = Instant::now();
        let mut batch = Vec::with_capacity(OUT_BATCH_MAX);
        // Named and with the script loaded from the start (a failure is retried at the first
        // write).
        if let Err(e) = self.connection() {
            warn!(node = %self.node_id, error = %e, "cluster: cannot prepare the connection to Redis yet");
            self.con = None;
        }
        while !self.stop.load(Ordering::Acquire) {
            match self.rx.recv_timeout(HEARTBEAT / 3) {
                Ok(item) => batch.push(item),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < OUT_BATCH_MAX {
                match self.rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            // Published entries were lost: every node checks its users against the store (the
            // flag is set again if this write fails too).
            if self.counters.lost_publishes.swap(false, Ordering::Relaxed) {
                batch.push(Out::Publish(BusEvent::Resync));
            }
            let beat = last_beat.elapsed() >= HEARTBEAT;
            if batch.is_empty() && !beat {
                continue;
            }
            // Counted before `write` drains the batch: a failed write loses all of it.
            let items = batch.len();
            let publishes = batch.iter().any(|item| matches!(item, Out::Publish(_)));
            let presence = batch.iter().any(|item| matches!(item, Out::Online { .. }));
            let changes = self.presence_changes(&batch);
            match self.write(&mut batch, beat) {
                Ok(()) => {
                    self.ok_ms.store(unix_now_ms(), Ordering::Relaxed);
                    self.lost_removals.written(changes);
                    if beat {
                        last_beat = Instant::now();
                        self.remove_lost();
                    }
                    if std::mem::take(&mut self.registry_lapsed) {
                        warn!(node = %self.node_id, "cluster: this node's registry entry had lapsed (the other nodes routed nothing here meanwhile); checking every inbox and group against the store");
                        add(&self.counters.resyncs, 1);
                        for shard in 0..self.shards {
                            self.commits.push(shard, Committed::Cluster(ClusterEvent::Resync));
                        }
                        // The others may have removed its terminals' presence meanwhile (a
                        // dead node's entries go when looked at): written again below.
                        self.presence_lost = true;
                    }
                    if std::mem::take(&mut self.presence_lost) {
                        warn!(node = %self.node_id, "cluster: presence writes were lost; writing every terminal's again");
                        for shard in 0..self.shards {
                            self.commits.push(shard, Committed::Cluster(ClusterEvent::Present));
                        }
                    }
                }
                Err(e) => {
                    add(&self.counters.redis_errors, 1);
                    add(&self.counters.dropped, items as u64);
                    if publishes {
                        self.counters.lost_publishes.store(true, Ordering::Relaxed);
                    }
                    self.presence_lost |= presence;
                    let dropped = self.lost_removals.lost(changes, LOST_REMOVALS_MAX);
                    if dropped > 0 {
                        warn!(node = %self.node_id, dropped, "cluster: too many lost presence removals kept; these stay stale");
                    }
                    warn!(node = %self.node_id, error = %e, dropped = items, "cluster write failed; reconnecting");
                    batch.clear();
                    self.con = None;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        // What was queued while stopping (the presence removals of the terminals closed on the
        // way out, above all), written once: best effort, within the I/O timeout.
        batch.extend(self.rx.try_iter());
        if !batch.is_empty() {
            let items = batch.len();
            if let Err(e) = self.write(&mut batch, false) {
                warn!(node = %self.node_id, error = %e, dropped = items, "cluster: what was queued at the stop was not written");
                self.con = None;
            }
        }
        let slots: Vec<String> = self.held.iter().flatten().map(|slot| generator_key(*slot)).collect();
        let node_id = self.node_id.clone();
        if let Ok(con) = self.connection() {
            let _ = redis::cmd("DEL").arg(node_key(&node_id)).arg(node_bus_key(&node_id)).query::<()>(con);
            if !slots.is_empty() {
                let _ = redis::cmd("EVAL")
                    .arg(RELEASE_LEASES_SCRIPT)
                    .arg(slots.len())
                    .arg(slots)
                    .arg(&node_id)
                    .query::<i64>(con);
            }
        }
    }

    /// After a heartbeat: extends the leases Redis renewed (`renewed[i]`, `(shard, slot)`,
    /// answered `holders[i]`: `''`, or the id of the node that holds the slot now), takes
    /// away at once those another node holds, and claims a free slot for every shard left
    /// without one. `sent_ms`: when the renewal was sent (the TTL runs from after that).
    fn settle_leases(&mut self, sent_ms: u64, renewed: Vec<(usize, usize)>, holders: Vec<String>) {
        for ((shard, slot), holder) in renewed.into_iter().zip(holders) {
            if holder.is_empty() {
                self.leases[shard].set(Some(slot), lease_deadline(sent_ms));
                continue;
            }
            self.leases[shard].set(None, 0);
            self.held[shard] = None;
            add(&self.counters.idgen_slots_lost, 1);
            warn!(node = %self.node_id, shard, slot, holder = %holder, "cluster: another node holds this shard's message-id generator slot (this node's lease lapsed); the shard stops using it and moves to a free one");
        }
        for shard in 0..self.held.len() {
            if self.held[shard].is_some() {
                continue;
            }
            let Some(con) = self.con.as_mut() else { return };
            let claimed_ms = unix_now_ms();
            match claim_slot(con, &self.node_id) {
                Ok(Some(slot)) => {
                    self.held[shard] = Some(slot);
                    self.leases[shard].set(Some(slot), lease_deadline(claimed_ms));
                    warn!(node = %self.node_id, shard, slot, "cluster: the shard makes message ids with a new generator slot");
                }
                Ok(None) => {
                    warn!(node = %self.node_id, shard, "cluster: no free message-id generator slot: the shard refuses new messages until one frees");
                }
                Err(e) => {
                    add(&self.counters.redis_errors, 1);
                    warn!(node = %self.node_id, shard, error = %e, "cluster: cannot claim a message-id generator slot yet; trying again at the next heartbeat");
                    return;
                }
            }
        }
    }

    /// The batch's presence changes in order, `(online, user, device)`, when a lost removal
    /// could concern them (the batch removes an entry, or removals are waiting): what
    /// [`LostRemovals`] needs whether the write succeeds or fails. Empty otherwise (nothing copied).
    fn presence_changes(&self, batch: &[Out]) -> Vec<(bool, String, String)> {
        if self.lost_removals.is_empty() && !batch.iter().any(|item| matches!(item, Out::Offline { .. })) {
            return Vec::new();
        }
        batch
            .iter()
            .filter_map(|item| match item {
                Out::Online { user, device, .. } => Some((true, user.clone(), device.clone())),
                Out::Offline { user, device } => Some((false, user.clone(), device.clone())),
                _ => None,
            })
            .collect()
    }

    /// Writes the lost presence removals again, in a pipeline of their own (one Redis keeps
    /// refusing must not fail the node's other writes); kept for the next heartbeat if it
    /// fails.
    fn remove_lost(&mut self) {
        if self.lost_removals.is_empty() {
            return;
        }
        let node_id = self.node_id.clone();
        let mut pipe = redis::pipe();
        for (user, device) in self.lost_removals.iter() {
            pipe.cmd("HDEL").arg(presence_key(user)).arg(format!("{node_id}/{device}")).ignore();
        }
        let result = self.connection().and_then(|con| pipe.query::<()>(con));
        match result {
            Ok(()) => {
                info!(node = %node_id, removed = self.lost_removals.len(), "cluster: lost presence removals written again");
                add(&self.counters.presence_writes, self.lost_removals.len() as u64);
                self.lost_removals.clear();
            }
            Err(e) => {
                add(&self.counters.redis_errors, 1);
                warn!(node = %node_id, error = %e, waiting = self.lost_removals.len(), "cluster: lost presence removals not written yet");
                if e.is_io_error() {
                    self.con = None;
                }
            }
        }
    }

    fn connection(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.con.is_none() || self.route_sha.is_none() {
            let mut con = match self.con.take() {
                Some(con) => con,
                None => {
                    let con = self.client.get_connection_with_timeout(Duration::from_secs(2))?;
                    con.set_read_timeout(Some(REDIS_IO_TIMEOUT))?;
                    con.set_write_timeout(Some(REDIS_IO_TIMEOUT))?;
                    con
                }
            };
            // Named for operators (`CLIENT LIST`); the script is loaded on every new
            // connection: a restarted Redis has forgotten it.
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("ether-cluster-out:{}", self.node_id))
                .query::<()>(&mut con)?;
            self.route_sha = Some(redis::cmd("SCRIPT").arg("LOAD").arg(ROUTE_SCRIPT).query(&mut con)?);
            self.con = Some(con);
        }
        Ok(self.con.as_mut().expect("just set"))
    }

    fn write(&mut self, batch: &mut Vec<Out>, beat: bool) -> redis::RedisResult<()> {
        let node_id = self.node_id.clone();
        let entry = NodeEntry { terminals: (self.terminals)(), ..self.entry.clone() };
        let entry = serde_json::to_string(&entry).unwrap_or_default();
        let renewed: Vec<(usize, usize)> = if beat {
            self.held.iter().enumerate().filter_map(|(shard, slot)| slot.map(|slot| (shard, slot))).collect()
        } else {
            Vec::new()
        };
        let started_ms = self.entry.started_ms;
        self.connection()?;
        let route_sha = self.route_sha.clone().unwrap_or_default();
        let con = self.con.as_mut().expect("connected above");
        let mut pipe = redis::pipe();
        let mut lookups = Vec::new();
        let mut counts = Vec::new();
        let mut present = Vec::new();
        // What each answer of the pipeline that is not ignored is, in order.
        let mut answers = Vec::new();
        let (mut shared, mut routed) = (0, 0);
        if beat {
            let ttl = NODE_TTL.as_millis() as u64;
            // Whether the registry key was still there: if it lapsed (no heartbeat for
            // `NODE_TTL`: this node cut off from Redis while the others were not), the other
            // nodes took this node for dead and routed its users' messages nowhere.
            pipe.cmd("EXISTS").arg(node_key(&node_id));
            answers.push(Answer::Registered);
            pipe.cmd("SET").arg(node_key(&node_id)).arg(&entry).arg("PX").arg(ttl).ignore();
            // Compare-and-renew: a slot another node claimed while this node's lease had
            // lapsed stays that node's (see `settle_leases`).
            if !renewed.is_empty() {
                pipe.cmd("EVAL").arg(RENEW_LEASES_SCRIPT).arg(renewed.len());
                for (_, slot) in &renewed {
                    pipe.arg(generator_key(*slot));
                }
                pipe.arg(&node_id).arg(ttl);
                answers.push(Answer::Leases);
            }
        }
        // Consecutive routed publishes, sent as one route call (order kept: any other item
        // sends them first).
        let mut routes: Vec<(String, String)> = Vec::new();
        for item in batch.drain(..) {
            if !matches!(&item, Out::Publish(event) if event.addressee().is_some()) {
                route_call(&mut pipe, &route_sha, &node_id, &mut routes, &mut answers);
            }
            match item {
                Out::Publish(event) => {
                    let addressee = event.addressee().map(presence_key);
                    let text = serde_json::to_string(&Envelope { node: node_id.clone(), event }).unwrap_or_default();
                    match addressee {
                        Some(presence) => {
                            routes.push((presence, text));
                            routed += 1;
                            if routes.len() == ROUTES_PER_CALL_MAX {
                                route_call(&mut pipe, &route_sha, &node_id, &mut routes, &mut answers);
                            }
                        }
                        None => {
                            pipe.cmd("XADD")
                                .arg(bus_key())
                                .arg("MAXLEN")
                                .arg("~")
                                .arg(BUS_LEN)
                                .arg("*")
                                .arg("e")
                                .arg(text)
                                .ignore();
                            shared += 1;
                        }
                    }
                }
                Out::Online { user, device, platform, since, connecting, written } => {
                    let mut value =
                        serde_json::json!({ "platform": platform, "since": since, "node_started": started_ms });
                    if connecting {
                        value["connecting"] = serde_json::Value::Bool(true);
                    }
                    let value = value.to_string();
                    pipe.cmd("HSET").arg(presence_key(&user)).arg(format!("{node_id}/{device}")).arg(value).ignore();
                    if matches!(written, Written::WithOthers(_)) {
                        pipe.cmd("HGETALL").arg(presence_key(&user));
                        answers.push(Answer::Presence(present.len(), user));
                    }
                    present.push(written);
                }
                Out::Offline { user, device } => {
                    pipe.cmd("HDEL").arg(presence_key(&user)).arg(format!("{node_id}/{device}")).ignore();
                }
                Out::Presence { user, reply } => lookups.push((user, reply)),
                Out::TerminalsElsewhere { reply } => counts.push(reply),
            }
        }
        route_call(&mut pipe, &route_sha, &node_id, &mut routes, &mut answers);
        let sent_ms = unix_now_ms();
        let values: Vec<redis::Value> = pipe.query(con)?;
        debug_assert_eq!(values.len(), answers.len(), "one answer per command not ignored");
        let mut appends = 0;
        let mut presences = Vec::new();
        let mut holders = Vec::new();
        for (answer, value) in answers.into_iter().zip(values) {
            match answer {
                Answer::Registered => {
                    self.registry_lapsed |= !redis::from_owned_redis_value::<bool>(value)?;
                }
                Answer::Leases => holders = redis::from_owned_redis_value::<Vec<String>>(value)?,
                Answer::Appends => appends += redis::from_owned_redis_value::<u64>(value)?,
                Answer::Presence(i, user) => {
                    presences.push((i, user, redis::from_owned_redis_value::<HashMap<String, String>>(value)?))
                }
            }
        }
        if beat {
            self.settle_leases(sent_ms, renewed, holders);
        }
        let con =
            self.con.as_mut().ok_or_else(|| redis::RedisError::from((redis::ErrorKind::IoError, "not connected")))?;
        let c = &self.counters;
        add(&c.published_shared, shared);
        add(&c.published_routed, routed);
        add(&c.routed_appends, appends);
        add(&c.presence_writes, present.len() as u64);
        let mut others: HashMap<usize, Vec<TerminalInfo>> = HashMap::new();
        let mut alive = HashMap::new();
        for (i, user, all) in presences {
            // Those still connecting count against the cap too (they may be welcomed).
            others.insert(i, terminals_elsewhere_in(con, &node_id, &user, all, &mut alive, true)?);
        }
        for (i, written) in present.into_iter().enumerate() {
            match written {
                Written::Done(tx) => drop(tx.send(())),
                Written::WithOthers(tx) => drop(tx.send(others.remove(&i).unwrap_or_default())),
            }
        }
        for (user, reply) in lookups {
            let _ = reply.send(presence_of(con, &node_id, &user)?);
        }
        if !counts.is_empty() {
            let n = terminals_of_others(con, &node_id)?;
            for reply in counts {
                let _ = reply.send(n);
            }
        }
        Ok(())
    }
}

/// What an answer of the out thread's pipeline is (the commands not ignored, in order).
enum Answer {
    /// Whether this node's registry key still existed when the heartbeat renewed it.
    Registered,
    /// [`RENEW_LEASES_SCRIPT`]'s answer: per slot renewed, `''` or the node holding it.
    Leases,
    /// A route call's append count.
    Appends,
    /// The presence hash (of this user) read after the `present[i]` write.
    Presence(usize, String),
}

/// Adds one [`ROUTE_SCRIPT`] call for the pending routed publishes (none if there are none).
/// Not ignored: its answer is the call's append count.
fn route_call(
    pipe: &mut redis::Pipeline,
    sha: &str,
    node_id: &str,
    routes: &mut Vec<(String, String)>,
    answers: &mut Vec<Answer>,
) {
    if routes.is_empty() {
        return;
    }
    answers.push(Answer::Appends);
    pipe.cmd("EVALSHA").arg(sha).arg(routes.len());
    for (presence, _) in routes.iter() {
        pipe.arg(presence);
    }
    pipe.arg(node_id).arg(BUS_LEN).arg(KEY_PREFIX);
    for (_, entry) in routes.drain(..) {
        pipe.arg(entry);
    }
}

/// The terminals the live nodes other than `me` reported at their last heartbeats.
fn terminals_of_others(con: &mut redis::Connection, me: &str) -> redis::RedisResult<u64> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(node_key("*")).arg("COUNT").arg(1000).query(con)?;
        keys.extend(batch.into_iter().filter(|k| *k != node_key(me)));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if keys.is_empty() {
        return Ok(0);
    }
    let entries: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(con)?;
    Ok(entries.iter().flatten().filter_map(|e| serde_json::from_str::<NodeEntry>(e).ok()).map(|e| e.terminals).sum())
}

/// The user's terminals online on live nodes other than `me` (taken on, not still connecting).
fn presence_of(con: &mut redis::Connection, me: &str, user: &str) -> redis::RedisResult<Vec<TerminalInfo>> {
    let all: HashMap<String, String> = redis::cmd("HGETALL").arg(presence_key(user)).query(con)?;
    terminals_elsewhere_in(con, me, user, all, &mut HashMap::new(), false)
}

/// Deletes a presence entry if it still holds `value` (KEYS[1] the hash, ARGV field, value):
/// an entry of a node's earlier run, removed without touching one its current run wrote since.
const REMOVE_STALE_PRESENCE: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
";

/// Whether a presence entry (its JSON `value`) was written by the current run of a node
/// started at `started_ms` (its registry entry's). Entries carry the run's start
/// (`node_started`); older ones only their terminal's `since`, which a terminal of the current
/// run has at or after the start. A node killed without removing its terminals' entries
/// leaves them behind; when it comes back under the same id they are not its terminals.
fn of_current_run(value: &serde_json::Value, started_ms: u64) -> bool {
    if started_ms == 0 {
        return true; // a registry entry this version cannot read: its terminals count
    }
    match value["node_started"].as_u64() {
        Some(run) => run == started_ms,
        None => value["since"].as_u64().unwrap_or(0) >= started_ms,
    }
}

/// The terminals of `user`'s presence hash entries (`all`) registered by live nodes other
/// than `me`, by their current runs, those still connecting (`"connecting": true`, see
/// [`Cluster::connecting`]) only if `connecting_too`; `alive` caches which nodes are live (the
/// start of their run). Entries of dead nodes, and those a live node's earlier run left
/// behind, are removed.
fn terminals_elsewhere_in(
    con: &mut redis::Connection,
    me: &str,
    user: &str,
    all: HashMap<String, String>,
    alive: &mut HashMap<String, Option<u64>>,
    connecting_too: bool,
) -> redis::RedisResult<Vec<TerminalInfo>> {
    let mut out = Vec::new();
    for (field, value) in all {
        let Some((node, device)) = field.split_once('/') else { continue };
        if node == me {
            continue; // this node answers for its own terminals
        }
        let started = match alive.get(node) {
            Some(s) => *s,
            None => {
                let entry: Option<String> = redis::cmd("GET").arg(node_key(node)).query(con)?;
                let s = entry.map(|e| serde_json::from_str::<NodeEntry>(&e).map_or(0, |e| e.started_ms));
                alive.insert(node.to_owned(), s);
                s
            }
        };
        let remove = |con: &mut redis::Connection| {
            // Best effort: a refusal only leaves the entry to be skipped again.
            let _ = redis::Script::new(REMOVE_STALE_PRESENCE)
                .key(presence_key(user))
                .arg(&field)
                .arg(&value)
                .invoke::<i64>(con);
        };
        let Some(started) = started else {
            // A node that died with terminals registered (killed; with node ids that change at
            // every start, e.g. pods, it never comes back): its entries would pile up in the
            // user's presence, each costing every later lookup a registry read. Removed; a
            // node that was only cut off from Redis writes its terminals' entries again when
            // it finds its registry entry lapsed.
            remove(con);
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&value).unwrap_or_default();
        if !of_current_run(&v, started) {
            // Left by the node's run before this one (killed, or stopped before its removals
            // were written): no terminal of it, and never again one (its `since` is past).
            if v["node_started"].is_u64() {
                remove(con);
            }
            continue;
        }
        // Written by nodes of earlier versions without the mark: online, as they counted then.
        if !connecting_too && v["connecting"].as_bool() == Some(true) {
            continue;
        }
        out.push(TerminalInfo {
            device: device.to_owned(),
            platform: v["platform"].as_str().unwrap_or("other").to_owned(),
            node: node.to_owned(),
            since: v["since"].as_u64().unwrap_or(0),
        });
    }
    Ok(out)
}

/// Whether `stream` may have lost entries after `seen` to trimming (`MAXLEN`, oldest first):
/// `seen` itself is gone (then what followed it may be too: counted as lost, which costs a
/// resync at worst), or, read from an empty stream (`0-0`), fewer entries are left than were
/// ever added. A stream that does not exist lost nothing this node could have read.
fn trimmed_past(con: &mut redis::Connection, stream: &str, seen: &str) -> redis::RedisResult<bool> {
    let exists: bool = redis::cmd("EXISTS").arg(stream).query(con)?;
    if !exists {
        return Ok(false);
    }
    if stream_id(seen) == (0, 0) {
        let info: HashMap<String, redis::Value> = redis::cmd("XINFO").arg("STREAM").arg(stream).query(con)?;
        let field = |name: &str| info.get(name).and_then(|v| redis::from_redis_value::<u64>(v).ok()).unwrap_or(0);
        return Ok(field("entries-added") > field("length"));
    }
    let still: BusEntries = redis::cmd("XRANGE").arg(stream).arg(seen).arg(seen).query(con)?;
    Ok(still.is_empty())
}

/// A stream entry id (`<ms>-<seq>`) as a number pair, for comparing; 0-0 if malformed.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The last entry of each stream now (`0-0` for one empty or absent): where a reader reading
/// from here on starts.
fn bus_ends(con: &mut redis::Connection, streams: &[String; 2]) -> redis::RedisResult<[String; 2]> {
    let mut ends = [String::new(), String::new()];
    for (end, stream) in ends.iter_mut().zip(streams) {
        let newest: BusEntries =
            redis::cmd("XREVRANGE").arg(stream).arg("+").arg("-").arg("COUNT").arg(1).query(con)?;
        *end = newest.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id);
    }
    Ok(ends)
}

/// Where members joined a group, read from the shared store (its layout: `store.lua` in
/// `ether_store`, keys under `ARGV[1]`, the prefix `storage::open` gives it). ARGV: that
/// prefix, the group's id, the users. Returns the group's head now, then for each user the
/// group's head when it joined (`rd:<user>` field `j:<gid>`, absent: 0), or -1 when it is not
/// a member (any more); nothing when the group is gone.
const JOIN_HEADS_SCRIPT: &str = r"
local P = ARGV[1]
local gid = redis.call('GET', P .. 'gi:' .. ARGV[2])
if not gid then return {} end
local out = { tonumber(redis.call('GET', P .. 'gh:' .. gid) or '0') }
for i = 3, #ARGV do
  if redis.call('ZSCORE', P .. 'gm:' .. gid, ARGV[i]) then
    out[#out + 1] = tonumber(redis.call('HGET', P .. 'rd:' .. ARGV[i], 'j:' .. gid) or '0')
  else
    out[#out + 1] = -1
  end
end
return out
";

/// Most group messages a shard reads from the store to push new members what was posted
/// since their join and the bus has not brought yet (see [`InWorker::join_heads`]).
const JOIN_FILL_MAX: u64 = 1_000;

/// `ether-cluster-in`: reads the bus; hands what other nodes say to this node's shards.
struct InWorker {
    node_id: String,
    /// The shared stream and this node's own.
    streams: [String; 2],
    /// Where it starts reading them: their ends before the node registered ([`bus_ends`]).
    from: [String; 2],
    counters: Arc<ClusterCounters>,
    client: redis::Client,
    commits: Arc<CommitQueues>,
    shards: usize,
    revocations: Arc<crate::revocations::TokenRevocations>,
    stop: Arc<AtomicBool>,
    ok_ms: Arc<AtomicU64>,
}

impl InWorker {
    fn run(self) {
        #[cfg(test)]
        tests::held_reader(&self.node_id);
        // From the streams' ends before the node registered; from the last entry read after
        // that, so neither the start nor a lost connection loses anything.
        let mut last = self.from.clone();
        while !self.stop.load(Ordering::Acquire) {
            if let Err(e) = self.read_bus(&self.streams, &mut last) {
                add(&self.counters.redis_errors, 1);
                warn!(node = %self.node_id, error = %e, "cluster bus read failed; reading on from where it stopped");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Reads the shared stream and this node's own, from `last` (each stream's last id seen).
    fn read_bus(&self, streams: &[String; 2], last: &mut [String; 2]) -> redis::RedisResult<()> {
        let mut con = self.client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_millis(BUS_BLOCK_MS * 4)))?;
        redis::cmd("CLIENT").arg("SETNAME").arg(format!("ether-cluster-in:{}", self.node_id)).query::<()>(&mut con)?;
        // Back after a failure (or, at the start, since the node registered): entries trimmed
        // away meanwhile are lost to this node.
        let mut lost = false;
        for (stream, seen) in streams.iter().zip(last.iter()) {
            lost |= trimmed_past(&mut con, stream, seen)?;
        }
        if lost {
            warn!(node = %self.node_id, "cluster: the bus was trimmed past what this node read while it was away; checking every inbox and group against the store");
            self.resync();
        }
        while !self.stop.load(Ordering::Acquire) {
            let reply: Option<Vec<(String, BusEntries)>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BUS_READ_MAX)
                .arg("BLOCK")
                .arg(BUS_BLOCK_MS)
                .arg("STREAMS")
                .arg(&streams[..])
                .arg(&last[..])
                .query(&mut con)?;
            self.ok_ms.store(unix_now_ms(), Ordering::Relaxed);
            for (stream, entries) in reply.into_iter().flatten() {
                let i = usize::from(stream != streams[0]);
                let read = [&self.counters.shared_entries_read, &self.counters.own_entries_read][i];
                add(read, entries.len() as u64);
                // A full read may come from far behind: a reader that fell back (the node
                // stalled) with its connection fine, while the stream was trimmed past what it
                // had read. Trimming keeps at least `BUS_LEN` newer entries, so only a full read
                // can follow a loss: then whether the last entry read is still there tells.
                let behind = entries.len() >= BUS_READ_MAX && trimmed_past(&mut con, &streams[i], &last[i])?;
                for (id, fields) in entries {
                    last[i] = id;
                    for (_, payload) in fields {
                        match serde_json::from_slice::<Envelope>(&payload) {
                            Ok(env) if env.node == self.node_id => {}
                            Ok(env) => self.dispatch(&mut con, env.event),
                            Err(e) => warn!(node = %self.node_id, error = %e, "unreadable bus entry ignored"),
                        }
                    }
                }
                if behind {
                    warn!(node = %self.node_id, stream = %streams[i], "cluster: the bus was trimmed past what this node had read (it fell behind); checking every inbox and group against the store");
                    self.resync();
                }
            }
        }
        Ok(())
    }

    fn dispatch(&self, con: &mut redis::Connection, event: BusEvent) {
        let shards = self.shards;
        match event {
            BusEvent::Inbox { owner, chat, seq, msg } => {
                let owner: Arc<str> = Arc::from(owner);
                let delivery = InboxDelivery {
                    owner: owner.clone(),
                    chat: Arc::from(chat),
                    seq,
                    msg: Arc::new(msg.into_message()),
                    // `message.unreached` is the accepting node's to tell.
                    incoming: false,
                };
                self.commits.push(home_shard(&owner, shards), Committed::Inbox(delivery));
            }
            BusEvent::Group { group, seq, msg } => {
                let msg = Arc::new(msg.into_message());
                let frame = msg.encode_frame(&format!("g:{group}"), seq);
                let group: Arc<str> = Arc::from(group);
                self.commits.push_group(&group, || GroupDelivery {
                    group: group.clone(),
                    seq,
                    id: msg.id,
                    ts: msg.ts,
                    frame: frame.clone(),
                    msg: msg.clone(),
                });
            }
            BusEvent::UserFrame { user, frame } => {
                let to = home_shard(&user, shards);
                self.commits.push(
                    to,
                    Committed::Cluster(ClusterEvent::UserFrame { user: Arc::from(user), frame: Arc::new(frame) }),
                );
            }
            BusEvent::Kick { user, device, reason, before_ms } => {
                let to = home_shard(&user, shards);
                self.commits.push(to, Committed::Cluster(ClusterEvent::Kick { user, device, reason, before_ms }));
            }
            BusEvent::Revoke { user, device, before_ms } => {
                self.revocations.note(&user, device.as_deref(), before_ms);
            }
            BusEvent::Broadcast { frame } => {
                let frame = Arc::new(frame);
                for shard in 0..shards {
                    self.commits.push(shard, Committed::Cluster(ClusterEvent::Broadcast(frame.clone())));
                }
            }
            BusEvent::Membership { group, users, joined } => {
                let joined_at = if joined { self.join_heads(con, &group, &users) } else { HashMap::new() };
                let group: Arc<str> = Arc::from(group);
                let mut per_shard: Vec<Vec<Arc<str>>> = vec![Vec::new(); shards];
                for u in users {
                    per_shard[home_shard(&u, shards)].push(Arc::from(u));
                }
                for (shard, users) in per_shard.into_iter().enumerate().filter(|(_, u)| !u.is_empty()) {
                    if joined {
                        // What was posted after the join follows it on the bus: it must reach
                        // the shard even before the shard has handled the join. And where the
                        // members joined: the shard pushes them what came after it, in seq
                        // order, however late the bus brings some of it.
                        let at = users.iter().filter_map(|u| joined_at.get(&**u).copied()).min();
                        self.commits.groups.expect_join(&group, shard, at);
                    }
                    let e = ClusterEvent::Membership { group: group.clone(), users, joined };
                    self.commits.push(shard, Committed::Cluster(e));
                }
            }
            BusEvent::GroupGone { group } => {
                let group: Arc<str> = Arc::from(group);
                for shard in 0..shards {
                    self.commits.push(shard, Committed::Cluster(ClusterEvent::GroupGone(group.clone())));
                }
            }
            BusEvent::Resync => self.resync(),
        }
    }

    /// The group's head in the store when each of `users` joined `group` ([`JOIN_HEADS_SCRIPT`]):
    /// only for users still members whose join is at most [`JOIN_FILL_MAX`] messages back (a
    /// join read that late, or made by a node of an earlier version, which kept no join head,
    /// is left out: the shard then starts at the first message it gets, as before). Empty if
    /// Redis did not answer.
    fn join_heads(&self, con: &mut redis::Connection, group: &str, users: &[String]) -> HashMap<String, u64> {
        let store_prefix = format!("{KEY_PREFIX}store:");
        let mut call = redis::cmd("EVAL");
        call.arg(JOIN_HEADS_SCRIPT).arg(0).arg(store_prefix).arg(group).arg(users);
        match call.query::<Vec<i64>>(con) {
            Ok(answer) => {
                let Some((&head, joined)) = answer.split_first() else { return HashMap::new() };
                users
                    .iter()
                    .zip(joined)
                    .filter_map(|(u, &at)| u64::try_from(at).ok().map(|at| (u, at)))
                    .filter(|(_, at)| (head as u64).saturating_sub(*at) <= JOIN_FILL_MAX)
                    .map(|(u, at)| (u.clone(), at))
                    .collect()
            }
            Err(e) => {
                add(&self.counters.redis_errors, 1);
                warn!(node = %self.node_id, group, error = %e, "cluster: cannot read where members joined a group; its first message here starts their pushes");
                HashMap::new()
            }
        }
    }

    /// Every shard checks its users' inboxes and groups against the store.
    fn resync(&self) {
        add(&self.counters.resyncs, 1);
        for shard in 0..self.shards {
            self.commits.push(shard, Committed::Cluster(ClusterEvent::Resync));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What runs at a node's start just before it takes the bus reader's start, by node id.
    type BeforeBusPosition = (String, Box<dyn FnOnce() + Send>);

    /// Test builds only: see [`at_bus_position`].
    static BEFORE_BUS_POSITION: Mutex<Vec<BeforeBusPosition>> = Mutex::new(Vec::new());

    /// Test builds only: runs what a test left for node `node` ([`at_bus_position`]).
    pub(super) fn before_bus_position(node: &str) {
        let hook = {
            let mut hooks = BEFORE_BUS_POSITION.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            hooks.iter().position(|(n, _)| n == node).map(|i| hooks.swap_remove(i).1)
        };
        if let Some(hook) = hook {
            hook();
        }
    }

    /// Runs `hook` when the next node started as `node` is about to take its bus reader's
    /// start (in `Cluster::start`, on the starting thread): what another node does at that
    /// moment.
    pub(crate) fn at_bus_position(node: &str, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = BEFORE_BUS_POSITION.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        hooks.push((node.to_owned(), Box::new(hook)));
    }

    /// Appends `event` to the shared bus stream as node `from` sends it.
    pub(crate) fn publish_shared_as(con: &mut redis::Connection, from: &str, event: BusEvent) {
        let entry = serde_json::to_string(&Envelope { node: from.into(), event }).unwrap();
        redis::cmd("XADD").arg(bus_key()).arg("*").arg("e").arg(entry).query::<String>(con).unwrap();
    }

    /// Test builds only: bus readers to hold before their first read, by node id.
    static HELD_READERS: Mutex<Vec<(String, Receiver<()>)>> = Mutex::new(Vec::new());

    /// Test builds only: the bus reader of node `node` waits here, before it does anything, while
    /// a test holds it ([`hold_reader`]; at most 30 s).
    pub(super) fn held_reader(node: &str) {
        let held = {
            let mut held = HELD_READERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            held.iter().position(|(n, _)| n == node).map(|i| held.swap_remove(i).1)
        };
        if let Some(release) = held {
            let _ = release.recv_timeout(Duration::from_secs(30));
        }
    }

    /// Holds the bus reader of the next node started as `node` before its first read, until the
    /// answer is sent to or dropped.
    fn hold_reader(node: &str) -> Sender<()> {
        let (tx, rx) = channel::bounded(1);
        HELD_READERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((node.to_owned(), rx));
        tx
    }

    /// A node is reachable from the moment it registers: the other nodes route its users'
    /// entries to its stream, and post on the shared one, while its bus reader may not have
    /// read yet (its thread just started; its terminals may connect meanwhile). What came in
    /// between reaches its shards. Before, the reader took the streams' ends as its start at
    /// its first read, after the node had registered, and skipped it (the reader is held here
    /// to make that window certain).
    #[test]
    fn what_the_bus_gets_between_registering_and_the_readers_first_read_is_read() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        // Older entries of both streams (a restart): not read again.
        let old = |event| serde_json::to_string(&Envelope { node: "other".into(), event }).unwrap();
        for stream in [bus_key(), node_bus_key("late-reader")] {
            let entry = old(BusEvent::GroupGone { group: "before".into() });
            redis::cmd("XADD").arg(stream).arg("*").arg("e").arg(entry).query::<String>(&mut con).unwrap();
        }
        let release = hold_reader("late-reader");
        let commits = CommitQueues::new(2);
        let local: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let addrs = Addresses { client: local, api: local, admin: local };
        let joining = Joining {
            node_id: "late-reader",
            addrs: &addrs,
            secrets_digest: "digest",
            webhook_url: None,
            terminals: Arc::new(|| 0),
            revocations: Arc::new(crate::revocations::TokenRevocations::new(Vec::new())),
        };
        let cluster = Cluster::start(&redis.url(), joining, commits.clone(), 2).unwrap();
        // Registered, its reader not yet reading: node `other` routes a message to bob's
        // terminal here and tells every node a group is gone.
        redis::cmd("HSET").arg(presence_key("bob")).arg("late-reader/phone").arg("{}").query::<()>(&mut con).unwrap();
        let msg = BusMessage {
            id: 7,
            ts: 1,
            from: "ann".into(),
            kind: Kind::Text,
            body: RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap(),
            cid: None,
        };
        let inbox = old(BusEvent::Inbox { owner: "bob".into(), chat: "u:ann".into(), seq: 1, msg });
        let appends: u64 = redis::cmd("EVAL")
            .arg(ROUTE_SCRIPT)
            .arg(1)
            .arg(presence_key("bob"))
            .arg("other")
            .arg(BUS_LEN)
            .arg(KEY_PREFIX)
            .arg(inbox)
            .query(&mut con)
            .unwrap();
        assert_eq!(appends, 1, "a registered node is routed to");
        let gone = old(BusEvent::GroupGone { group: "crew".into() });
        redis::cmd("XADD").arg(bus_key()).arg("*").arg("e").arg(gone).query::<String>(&mut con).unwrap();
        release.send(()).unwrap();
        // Both reach the shards (the inbox message bob's home shard, the dissolution every
        // shard), and nothing older does.
        let mut inbox_seqs = Vec::new();
        let mut gone_per_shard = [Vec::new(), Vec::new()];
        let deadline = Instant::now() + Duration::from_secs(10);
        while (inbox_seqs.is_empty() || gone_per_shard.iter().any(Vec::is_empty)) && Instant::now() < deadline {
            for (shard, gone) in gone_per_shard.iter_mut().enumerate() {
                let mut batch = Vec::new();
                while !commits.is_empty(shard) {
                    futures_lite::future::block_on(commits.next_batch(shard, &mut batch, 64));
                }
                for item in batch {
                    match item {
                        Committed::Inbox(d) => inbox_seqs.push((shard, d.owner.to_string(), d.seq)),
                        Committed::Cluster(ClusterEvent::GroupGone(group)) => gone.push(group.to_string()),
                        _ => {}
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cluster.stop();
        assert_eq!(inbox_seqs, [(home_shard("bob", 2), "bob".to_string(), 1)]);
        assert_eq!(gone_per_shard, [["crew"], ["crew"]], "the shared stream from before the node registered");
    }

    fn change(online: bool, user: &str, device: &str) -> (bool, String, String) {
        (online, user.into(), device.into())
    }

    #[test]
    fn lost_removals_keep_what_failed_until_written_or_superseded() {
        let mut lost = LostRemovals::default();
        // A failed batch: the phone left, the desk left then came back.
        let failed = vec![change(false, "u", "phone"), change(false, "u", "desk"), change(true, "u", "desk")];
        assert_eq!(lost.lost(failed, 10), 0);
        assert_eq!(lost.iter().cloned().collect::<Vec<_>>(), vec![("u".to_string(), "phone".to_string())]);
        // The phone came back in a batch that failed too: its removal is void.
        lost.lost(vec![change(true, "u", "phone")], 10);
        assert!(lost.is_empty());
        // Lost again, then a successful batch writes the phone's entry: void as well.
        lost.lost(vec![change(false, "u", "phone"), change(false, "v", "web")], 10);
        lost.written(vec![change(true, "u", "phone")]);
        assert_eq!(lost.iter().cloned().collect::<Vec<_>>(), vec![("v".to_string(), "web".to_string())]);
    }

    #[test]
    fn lost_removals_are_bounded() {
        let mut lost = LostRemovals::default();
        let changes = (0..5).map(|i| change(false, &format!("u{i}"), "d")).collect();
        assert_eq!(lost.lost(changes, 3), 2, "two past the bound are not kept");
        assert_eq!(lost.len(), 3);
        // One already kept, lost again, is no new entry.
        assert_eq!(lost.lost(vec![change(false, "u0", "d")], 3), 0);
        lost.clear();
        assert!(lost.is_empty());
    }

    #[test]
    fn stream_ids_compare_as_numbers() {
        assert!(stream_id("1700000000010-0") > stream_id("1700000000009-7"));
        assert!(stream_id("5-10") > stream_id("5-9"));
        assert_eq!(stream_id("0-0"), (0, 0));
        assert_eq!(stream_id("junk"), (0, 0));
    }

    #[test]
    fn one_route_call_takes_each_entry_to_the_nodes_of_its_own_user() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(ROUTE_SCRIPT).query(&mut con).unwrap();
        // b and c are live; d left terminals in presence but is gone; a sends.
        for node in ["a", "b", "c"] {
            redis::cmd("SET").arg(node_key(node)).arg("{}").query::<()>(&mut con).unwrap();
        }
        let present = |con: &mut redis::Connection, user: &str, field: &str| {
            redis::cmd("HSET").arg(presence_key(user)).arg(field).arg("{}").query::<()>(con).unwrap();
        };
        present(&mut con, "u1", "b/phone");
        present(&mut con, "u2", "c/phone");
        present(&mut con, "u2", "b/desk");
        present(&mut con, "u3", "a/phone"); // the sender's own: not routed
        present(&mut con, "u4", "d/phone"); // a dead node: not routed
        let entries = ["e1", "e2", "e3", "e4", "e5"];
        let users = ["u1", "u2", "u3", "u4", "u1"];
        let mut routes: Vec<(String, String)> =
            users.iter().zip(entries).map(|(u, e)| (presence_key(u), e.to_string())).collect();
        let mut pipe = redis::pipe();
        let mut answers = Vec::new();
        route_call(&mut pipe, &sha, "a", &mut routes, &mut answers);
        assert!(routes.is_empty());
        route_call(&mut pipe, &sha, "a", &mut routes, &mut answers); // nothing pending: no call
        assert!(matches!(answers[..], [Answer::Appends]), "one call, one answer");
        let appends: Vec<u64> = pipe.query(&mut con).unwrap();
        assert_eq!(appends, [4]);
        let stream = |con: &mut redis::Connection, node: &str| -> Vec<String> {
            let rows: Vec<(String, Vec<(String, String)>)> =
                redis::cmd("XRANGE").arg(node_bus_key(node)).arg("-").arg("+").query(con).unwrap();
            rows.into_iter().map(|(_, fields)| fields[0].1.clone()).collect()
        };
        assert_eq!(stream(&mut con, "b"), ["e1", "e2", "e5"]);
        assert_eq!(stream(&mut con, "c"), ["e2"]);
        assert!(stream(&mut con, "a").is_empty());
        assert!(stream(&mut con, "d").is_empty());
    }

    #[test]
    fn a_stream_trimmed_past_what_was_read_says_so() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        assert!(!trimmed_past(&mut con, "ether:bus:none", "0-0").unwrap(), "no stream, nothing lost");
        let ids: Vec<String> =
            (0..3).map(|i| redis::cmd("XADD").arg("s").arg("*").arg("e").arg(i).query(&mut con).unwrap()).collect();
        assert!(!trimmed_past(&mut con, "s", &ids[0]).unwrap(), "nothing trimmed yet");
        assert!(!trimmed_past(&mut con, "s", "0-0").unwrap(), "read from empty, nothing trimmed yet");
        redis::cmd("XTRIM").arg("s").arg("MAXLEN").arg(1).query::<u64>(&mut con).unwrap();
        assert!(trimmed_past(&mut con, "s", &ids[0]).unwrap(), "the second entry is gone unread");
        assert!(trimmed_past(&mut con, "s", "0-0").unwrap(), "read from empty: two are gone");
        assert!(!trimmed_past(&mut con, "s", &ids[2]).unwrap(), "read up to the end: nothing lost");
    }

    #[test]
    fn leases_are_renewed_only_where_absent_or_still_this_nodes_and_released_likewise() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        // Slot 0 lapsed (nobody took it), 1 still this node's, 2 taken by another node.
        redis::cmd("SET").arg(generator_key(1)).arg("me").query::<()>(&mut con).unwrap();
        redis::cmd("SET").arg(generator_key(2)).arg("other").query::<()>(&mut con).unwrap();
        let keys: Vec<String> = (0..3).map(generator_key).collect();
        let holders: Vec<String> = redis::cmd("EVAL")
            .arg(RENEW_LEASES_SCRIPT)
            .arg(3)
            .arg(&keys)
            .arg("me")
            .arg(15_000)
            .query(&mut con)
            .unwrap();
        assert_eq!(holders, ["", "", "other"]);
        for (key, holder, ttl) in [(&keys[0], "me", true), (&keys[1], "me", true), (&keys[2], "other", false)] {
            let got: String = redis::cmd("GET").arg(key).query(&mut con).unwrap();
            let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut con).unwrap();
            assert_eq!((got.as_str(), pttl > 0), (holder, ttl), "{key}");
        }
        // The first free slot, as at start.
        assert_eq!(claim_slot(&mut con, "me").unwrap(), Some(3));
        let released: i64 =
            redis::cmd("EVAL").arg(RELEASE_LEASES_SCRIPT).arg(3).arg(&keys).arg("me").query(&mut con).unwrap();
        assert_eq!(released, 2);
        let left: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con).unwrap();
        assert_eq!(left, [None, None, Some("other".to_string())], "another node's lease is not released");
    }

    /// A node that comes back under its id finds its earlier run's slot leases still there,
    /// about to lapse: taking them back gives them a whole TTL, as the shards assume (they make
    /// ids until `lease_deadline` of the claim). Before, they kept the earlier run's remaining
    /// TTL, lapsed, and another node could claim the same slot while this one still used it.
    #[test]
    fn slots_taken_back_from_an_earlier_run_get_a_whole_ttl() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        for slot in 0..2 {
            redis::cmd("SET").arg(generator_key(slot)).arg("me").arg("PX").arg(300).query::<()>(&mut con).unwrap();
        }
        // Slot 2 belongs to another live node: the claim moves past it.
        redis::cmd("SET").arg(generator_key(2)).arg("other").query::<()>(&mut con).unwrap();
        assert_eq!(claim_generators(&mut con, "me", 2).unwrap(), 0);
        for slot in 0..2 {
            let pttl: i64 = redis::cmd("PTTL").arg(generator_key(slot)).query(&mut con).unwrap();
            assert!(pttl > 10_000, "slot {slot} lapses in {pttl} ms, before the shards stop using it");
        }
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(claim_slot(&mut con, "other").unwrap(), Some(3), "slots 0 and 1 are still this node's");
        assert_eq!(claim_generators(&mut con, "third", 2).unwrap(), 4, "past every held slot");
        let holders: Vec<Option<String>> =
            redis::cmd("MGET").arg((0..6).map(generator_key).collect::<Vec<_>>()).query(&mut con).unwrap();
        let me = Some("me".to_string());
        let (other, third) = (Some("other".to_string()), Some("third".to_string()));
        assert_eq!(holders, [me.clone(), me, other.clone(), other, third.clone(), third]);
    }

    #[test]
    fn ids_come_from_the_leased_slot_only_while_the_lease_holds() {
        use crate::message::IdGen;
        let now = unix_now_ms();
        let lease = Arc::new(IdLease::new(Some(5), now + 60_000));
        assert_eq!(lease.slot_at(now), Some(5));
        assert_eq!(lease.slot_at(now + 60_000), None, "past its deadline the lease may have lapsed");
        let ids = IdGen::leased(lease.clone());
        let slot = |id: u64| (id >> 14) & 63;
        let (first, _) = ids.next().unwrap();
        assert_eq!(slot(first), 5);
        // Lost to another node: no ids at all (0, which every store refuses), not slot 5's.
        lease.set(None, 0);
        assert!(!ids.usable());
        assert_eq!(ids.next(), None);
        // Moved to a free slot: ids from it, still increasing.
        lease.set(Some(2), now + 60_000);
        assert!(ids.usable());
        let (moved, _) = ids.next().unwrap();
        assert_eq!(slot(moved), 2);
        assert!(moved > first);
        // A lease not renewed in time stops the ids just the same.
        lease.set(Some(2), now.saturating_sub(1));
        assert!(!ids.usable());
        assert_eq!(ids.next(), None);
        assert_eq!(
            lease_deadline(1_000_000),
            1_000_000 + NODE_TTL.as_millis() as u64 - LEASE_MARGIN.as_millis() as u64
        );
    }

    /// An out thread of node `me` (two shards, holding slots 0 and 1) and its queue.
    fn out_worker(redis: &ether_store::redis::TestRedis, me: &str) -> (OutWorker, Sender<Out>) {
        let (tx, rx) = channel::bounded(OUT_QUEUE_MAX);
        let entry = NodeEntry {
            client: String::new(),
            api: String::new(),
            admin: String::new(),
            started_ms: unix_now_ms(),
            terminals: 0,
        };
        let w = OutWorker {
            node_id: me.to_owned(),
            held: vec![Some(0), Some(1)],
            leases: (0..2).map(|slot| Arc::new(IdLease::new(Some(slot), unix_now_ms() + 60_000))).collect(),
            client: redis::Client::open(redis.url()).unwrap(),
            con: None,
            route_sha: None,
            counters: Arc::default(),
            commits: CommitQueues::new(2),
            shards: 2,
            presence_lost: false,
            lost_removals: LostRemovals::default(),
            registry_lapsed: false,
            rx,
            entry,
            terminals: Arc::new(|| 0),
            stop: Arc::new(AtomicBool::new(false)),
            ok_ms: Arc::default(),
        };
        (w, tx)
    }

    #[test]
    fn a_heartbeat_moves_a_shard_off_a_slot_another_node_holds() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        let (mut w, _tx) = out_worker(&redis, "me");
        redis::cmd("SET").arg(generator_key(0)).arg("other").query::<()>(&mut con).unwrap();
        w.write(&mut Vec::new(), true).unwrap();
        // Slot 1 still this node's: renewed. Slot 0 left to its holder; shard 0 took slot 2.
        assert_eq!(w.held, [Some(2), Some(1)]);
        let now = unix_now_ms();
        assert_eq!((w.leases[0].slot_at(now), w.leases[1].slot_at(now)), (Some(2), Some(1)));
        let holders: Vec<Option<String>> =
            redis::cmd("MGET").arg((0..3).map(generator_key).collect::<Vec<_>>()).query(&mut con).unwrap();
        assert_eq!(holders, [Some("other".into()), Some("me".into()), Some("me".into())]);
        assert_eq!(w.counters.idgen_slots_lost.load(Ordering::Relaxed), 1);
        // Nothing free: the shard has no slot (and makes no ids) until one frees.
        for slot in 0..SHARDS_MAX {
            redis::cmd("SET").arg(generator_key(slot)).arg("other").query::<()>(&mut con).unwrap();
        }
        w.write(&mut Vec::new(), true).unwrap();
        assert_eq!(w.held, [None, None]);
        assert_eq!(w.leases[0].slot_at(unix_now_ms()), None);
        redis::cmd("DEL").arg(generator_key(9)).query::<()>(&mut con).unwrap();
        w.write(&mut Vec::new(), true).unwrap();
        assert_eq!(w.held, [Some(9), None]);
    }

    #[test]
    fn what_is_queued_when_the_out_thread_stops_is_written_once() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        redis::cmd("HSET").arg(presence_key("u")).arg("me/phone").arg("{}").query::<()>(&mut con).unwrap();
        redis::cmd("SET").arg(generator_key(0)).arg("me").query::<()>(&mut con).unwrap();
        redis::cmd("SET").arg(generator_key(1)).arg("other").query::<()>(&mut con).unwrap();
        let (w, tx) = out_worker(&redis, "me");
        // A terminal closed while the node stops: its removal queued after the stop was asked.
        w.stop.store(true, Ordering::Release);
        tx.send(Out::Offline { user: "u".into(), device: "phone".into() }).unwrap();
        w.run();
        let left: Vec<String> = redis::cmd("HKEYS").arg(presence_key("u")).query(&mut con).unwrap();
        assert!(left.is_empty(), "{left:?}");
        // Its leases released, never another node's.
        let holders: Vec<Option<String>> =
            redis::cmd("MGET").arg(generator_key(0)).arg(generator_key(1)).query(&mut con).unwrap();
        assert_eq!(holders, [None, Some("other".into())]);
    }

    #[test]
    fn bus_messages_round_trip_with_their_body_as_is() {
        let msg = BusMessage {
            id: u64::MAX >> 1,
            ts: 7,
            from: "ann".into(),
            kind: Kind::Text,
            body: RawValue::from_string(r#"{"text":"hi \"you\""}"#.into()).unwrap(),
            cid: Some("c1".into()),
        };
        let env = Envelope {
            node: "n1".into(),
            event: BusEvent::Inbox { owner: "bob".into(), chat: "u:ann".into(), seq: 9, msg },
        };
        let text = serde_json::to_string(&env).unwrap();
        let back: Envelope = serde_json::from_str(&text).unwrap();
        match back.event {
            BusEvent::Inbox { owner, seq, msg, .. } => {
                assert_eq!((owner.as_str(), seq, msg.id), ("bob", 9, u64::MAX >> 1));
                assert_eq!(msg.body.get(), r#"{"text":"hi \"you\""}"#);
            }
            other => panic!("{other:?}"),
        }
    }
}
