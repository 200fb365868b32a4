//! Ether-IM durable storage: every message is stored before it is pushed or acknowledged.
//!
//! # Layout
//!
//! ```text
//!  shard 0 ─┐  StoreHandle::submit(StoreCmd{op, done})       (never blocks: try_send on a
//!  shard 1 ─┼──────────► bounded crossbeam queue ─────────┐   queue bounded in commands and
//!  api    ──┘                                             │   bytes; full = Overloaded)
//!                                                         ▼
//!                          storage thread (std::thread "ether-store", owns the backend)
//!                          collect ≤ batch_ops_max cmds / ≤ batch_wait (only after a big batch) → backend.apply_batch
//!                          → one transaction → COMMIT → run every `done` in submission order
//!                          → between batches: retention purge step (≤ purge_rows)
//! ```
//!
//! - [`op`]: [`Op`] / [`Reply`], the vocabulary every backend speaks (plain data).
//! - [`backend`]: the [`StoreBackend`] trait (alias [`Store`]): batches of ops applied in one
//!   transaction, each op's failure isolated, plus bounded background work (`maintain`).
//! - [`thread`]: [`StoreThread`], [`StoreHandle`], [`StoreCmd`], [`StoreOptions`]: group
//!   commit on a plain OS thread; completions run after commit, in submission order, each
//!   exactly once (`Closed` when the thread ends first, also by a backend panic), so the
//!   engine can push committed messages to its shards in commit order (per-inbox order kept)
//!   and complete `futures_channel::oneshot`s ([`StoreHandle::call`] does exactly that).
//! - [`sqlite`]: [`SqliteBackend`], the standalone store (WAL, `prepare_cached` statements,
//!   [`Durability`] → `PRAGMA synchronous`, a background PASSIVE checkpointer thread).
//! - [`redis`]: [`RedisBackend`], the cluster store shared by several engine nodes: one Lua
//!   script per op (atomic in Redis), a batch pipelined in order, keys under a per-store prefix
//!   ([`RedisOptions`]); durability is Redis's (`appendonly`, `appendfsync`).
//! - [`conformance`]: properties every backend must have, written against the trait; run
//!   against SQLite by `tests/sqlite_conformance.rs`, later against the Redis backend.
//! - [`error`]: [`StoreError`], mapped once to [`ether_proto::ErrorCode`] by `code()`.
//!
//! # Schema (SQLite) and why
//!
//! A single-chat message must land in two inboxes with gap-free per-inbox seqs. Writing two
//! index rows keyed by `(owner, seq)` per message touches two random B-tree pages per message;
//! measured here that caps batched appends at ~40–100k msgs/s (the WAL carries a 4 KiB page per
//! touched page). So the hot path writes **one row per message** and defers the per-owner
//! index, LSM-style:
//!
//! - `messages(id PK, ts, frm, chat, seq, frm_seq, kind, cid, body)`: the body stored once;
//!   `chat` is the receiver's inbox stream (`2*uid`) or the group stream (`2*gid+1`), `seq`
//!   its position there, `frm_seq` the sender's inbox position. Keyed by the engine's message
//!   id, which grows with time: appends go to the right edge of the B-tree.
//! - `users(uid PK, name UNIQUE)`: user ids mapped to small integers once.
//! - `entries(stream, first_seq, data) WITHOUT ROWID`: a stream's positions in blocks of up
//!   to 48 `(message id, aux)` pairs; `aux` is `peer*2 + outgoing` in inboxes, `sender*2` in
//!   group logs. Written a stream at a time by the flush step, so one page write carries many
//!   positions of one owner.
//! - `cids(frm, h, id) WITHOUT ROWID`: `(sender, FNV-1a of cid)` → message id (idempotency;
//!   a group message's hash also takes its group: single chats share one cid space per
//!   sender, each group has its own);
//!   clustered by sender and flushed with the sender's inbox stream.
//! - `read_pos(owner, chat, seq)`, `delivery(owner, device, chat, seq)`: chat key `2*peer` or
//!   `2*gid+1` (0 = inbox for delivery). Never move backwards.
//! - `groups(gid PK AUTOINCREMENT, name UNIQUE, title, owner, created, members)`,
//!   `members(gid, uid, joined)`, `member_of(uid, gid)`; the group log is stream `2*gid+1`;
//!   `joined` is the group's head when the member was added (what came before is history to
//!   it: not unread, not in read counts; schema version 2, migrated in place from 1).
//! - `revoked(name, device, before_ms) WITHOUT ROWID`: terminal tokens issued before
//!   `before_ms` are refused (`device` '' = every device).
//! - `outbox(seq PK AUTOINCREMENT, ts, kind, data)`: the durable event outbox, capped at
//!   `SqliteOptions::outbox_max` events (a write past it deletes the oldest, counted in
//!   `meta('outbox_dropped')`; see [`OutboxStats`]).
//! - `meta(k, v)`: schema version and the **watermark**.
//!
//! Seqs are assigned in memory at the durable write (the storage thread is the only writer)
//! and stored in the message row in the same transaction. Positions not yet in `entries` live
//! in memory (`sqlite::index`) and are written once a stream's oldest pending position is
//! `flush_age` old (or memory passes `pending_entries_max`). The watermark in `meta` is at or
//! below the id of every message whose positions are not all in tables; on open, the
//! messages from the watermark on are rescanned and the in-memory tail rebuilt, so a crash
//! loses nothing that committed. A message stored with an id below the watermark (a late
//! shard) lowers it in the same transaction. Reads merge table blocks and the memory tail.
//!
//! # Orders and bounds
//!
//! Pages hold at most [`op::PAGE_LIMIT_MAX`] entries. `ReadInbox`/`ReadGroup`/`Sync` are
//! oldest-first after a position. `History`/`GroupHistory` are newest-first from
//! `before_seq` (exclusive; default: the head) down to `after_seq` (exclusive), except that
//! with only `after_seq` given they are oldest-first after it. Filtered history, `unread` and
//! the `up_to` search scan at most [`sqlite::SCAN_ITEMS_MAX`] positions.
//!
//! # Retention
//!
//! `Purge{older_than_ms, max_rows}` deletes the oldest messages (by id, which the engine makes
//! time-ordered) while their `ts` is older than the cutoff, never a message whose positions are
//! still in memory, at most `max_rows` per step; it also sweeps a bounded number of `entries`
//! rows whose messages are gone (keeping an empty marker row as each stream's head). The
//! storage thread runs a step every `purge_every`, and again after the next batch while more
//! is left: writes never wait behind a long delete.
//!
//! # Failure
//!
//! SQLite errors (SQLITE_FULL, I/O, corrupt, …) become [`StoreError::Unavailable`] (`503`),
//! never a panic. A batch that fails as a whole is rolled back (in-memory state undone from
//! an undo log) and its ops retried one transaction each, so one bad op fails alone and reads
//! keep being served when writes cannot be.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod backend;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod op;
pub mod redis;
pub mod sqlite;
pub mod thread;

pub use crate::redis::{RedisBackend, RedisOptions};
pub use backend::{clock_ms, BackendStats, StoreBackend, StoreBackend as Store};
pub use error::StoreError;
pub use op::*;
pub use sqlite::{Durability, SqliteBackend, SqliteOptions};
pub use thread::{
    AtomicHistogram, Completion, HistogramReading, StoreCmd, StoreHandle, StoreOptions, StoreThread, ThreadStats,
    QUEUE_BYTES_MAX_DEFAULT,
};
