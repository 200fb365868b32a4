//! The Ether-IM engine: one node of the push platform.
//!
//! Layout (how data moves: terminal → `conn` → `shard` → `mesh` → other shards → `session`
//! queues → sockets; business system → `api` → `shard`):
//! - [`config`], [`secrets`], [`cli`]: raw configuration (file, env, flags) validated once into
//!   a [`config::Config`]; generated secrets and `ports.json` in the data dir.
//! - [`node`]: starts a node: listeners (SO_REUSEPORT per shard), the mesh, one pinned glommio
//!   executor per shard; stops it.
//! - [`shard`]: one core's state: sessions, the per-user index, inbox sequences, the timer
//!   wheel; delivery, presence, kick, broadcast; terminal frames.
//! - [`delivery`]: messages made durable, then pushed in commit order; acks, resends, `sync`,
//!   reads and receipts.
//! - [`groups`]: the per-shard group index, encode-once fan-out, group sends;
//!   [`group_shards`]: which shards a committed group message is queued to.
//! - [`mesh`]: `FanoutMesh`, bounded lock-free queues between shards, and `ShardMsg`.
//! - [`conn`]: client-port sockets: accept, WebSocket upgrade and token check, hand-over to
//!   the home shard, the connection task (reads frames, writes the session queue).
//! - [`session`]: a live terminal: identity, bounded outbound queue, close reason.
//! - [`parking`]: idle connections parked out of their tasks in one epoll set per shard.
//! - [`cluster`]: cluster mode: the bus between nodes, the node registry and presence in Redis.
//! - [`ratelimit`]: rate limits (terminal sends, syncs and reads; the API) as one timestamp each.
//! - [`ws`]: WebSocket frame reader and frame encoding (tungstenite's codec).
//! - [`wheel`]: the per-shard timer wheel.
//! - [`message`]: messages, ids, and their encoding into frame bytes (once per inbox).
//! - [`api`], [`api_groups`]: the business REST API routes; [`admin_view`]: what the admin port sees.
//! - [`storage`]: the link to the storage thread: per-shard queues of committed deliveries.
//! - [`stats`]: counters, gauges and connection snapshots any thread may read.
//! - [`allocator`]: mimalloc (default) tuning and returning freed memory after churn.
//! - [`auth`]: terminal JWTs. [`error`]: the engine error, mapped once to API codes.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod admin_view;
pub mod allocator;
pub mod api;
pub mod api_groups;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod error;
pub mod event_batch;
pub mod events;
pub mod group_shards;
pub mod groups;
pub mod mesh;
pub mod message;
pub mod node;
pub mod outbox_lease;
pub mod parking;
pub mod ratelimit;
pub mod revocations;
pub mod sched;
pub mod secrets;
pub mod session;
pub mod shard;
pub mod stats;
pub mod storage;
pub mod tls;
pub mod wheel;
pub mod ws;
