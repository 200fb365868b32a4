//! The SQLite schema (version 2) and the connection settings. No state.

/// Schema version kept in `meta('schema')`.
pub const SCHEMA_VERSION: i64 = 2;

/// What takes a database of the version before to this one, in one transaction. Version 1 had
/// no `members.joined` (its members count as joined at 0, as version 1 counted them).
pub const MIGRATE_FROM_1: &str = "
BEGIN IMMEDIATE;
ALTER TABLE members ADD COLUMN joined INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET v = 2 WHERE k = 'schema';
COMMIT;
";

/// Tables. Hot path per single-chat message: one `messages` row appended at the right edge
/// of its B-tree (ids grow with time). The per-owner index (`entries`, `cids`) is written
/// later, a stream at a time, many positions per row (see `index.rs` and the crate docs).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(
  k TEXT PRIMARY KEY,
  v INTEGER NOT NULL
) WITHOUT ROWID;
-- user ids mapped to small integers once
CREATE TABLE IF NOT EXISTS users(
  uid INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE
);
-- every message once: body stored once, both positions inline
CREATE TABLE IF NOT EXISTS messages(
  id INTEGER PRIMARY KEY,   -- engine message id (time-ordered)
  ts INTEGER NOT NULL,      -- unix ms
  frm INTEGER NOT NULL,     -- sender uid
  chat INTEGER NOT NULL,    -- receiver inbox stream (2*uid) or group stream (2*gid+1)
  seq INTEGER NOT NULL,     -- position in that stream
  frm_seq INTEGER,          -- position in the sender's inbox (single chats, not to self)
  kind INTEGER NOT NULL,
  cid TEXT,
  body TEXT NOT NULL
);
-- stream index: positions first_seq.. of a stream, up to 48 (message id, aux) pairs per row
CREATE TABLE IF NOT EXISTS entries(
  stream INTEGER NOT NULL,
  first_seq INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY(stream, first_seq)
) WITHOUT ROWID;
-- idempotency: (sender, hash of cid) -> message id
CREATE TABLE IF NOT EXISTS cids(
  frm INTEGER NOT NULL,
  h INTEGER NOT NULL,
  id INTEGER NOT NULL,
  PRIMARY KEY(frm, h)
) WITHOUT ROWID;
-- read position per (user, chat key: 2*peer uid | 2*gid+1)
CREATE TABLE IF NOT EXISTS read_pos(
  owner INTEGER NOT NULL,
  chat INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  PRIMARY KEY(owner, chat)
) WITHOUT ROWID;
-- delivery (ack) position per terminal; chat 0 = inbox, 2*gid+1 = group
CREATE TABLE IF NOT EXISTS delivery(
  owner INTEGER NOT NULL,
  device TEXT NOT NULL,
  chat INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  PRIMARY KEY(owner, device, chat)
) WITHOUT ROWID;
-- AUTOINCREMENT: a dissolved group's gid (and so its log stream) is never reused
CREATE TABLE IF NOT EXISTS groups(
  gid INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE, -- the public group id
  title TEXT NOT NULL,
  owner INTEGER NOT NULL,
  created INTEGER NOT NULL,
  members INTEGER NOT NULL
);
-- joined: the group's head when the member was added (its messages up to it are history to
-- the member: not unread, not counted in read counts); 0 for members of schema version 1
CREATE TABLE IF NOT EXISTS members(
  gid INTEGER NOT NULL,
  uid INTEGER NOT NULL,
  joined INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(gid, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS member_of(
  uid INTEGER NOT NULL,
  gid INTEGER NOT NULL,
  PRIMARY KEY(uid, gid)
) WITHOUT ROWID;
-- terminal tokens issued before before_ms no longer accepted; device '' = every device
CREATE TABLE IF NOT EXISTS revoked(
  name TEXT NOT NULL,
  device TEXT NOT NULL,
  before_ms INTEGER NOT NULL,
  PRIMARY KEY(name, device)
) WITHOUT ROWID;
-- durable event outbox; AUTOINCREMENT: event ids are never reused after acks delete rows
CREATE TABLE IF NOT EXISTS outbox(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  ts INTEGER NOT NULL,
  kind TEXT NOT NULL,
  data TEXT NOT NULL
);
";
