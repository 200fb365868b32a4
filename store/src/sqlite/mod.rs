//! `SqliteBackend`: the standalone store. Owns one rusqlite connection (and a checkpointer
//! thread with its own); must only be used from the storage thread.
mod checkpoint;
pub mod index;
mod schema;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ether_proto::ids::Chat;
use ether_proto::Kind;
use rusqlite::{params, Connection, OptionalExtension};

use crate::backend::{BackendStats, StoreBackend};
use crate::op::*;
use crate::StoreError;
use checkpoint::Checkpointer;
use index::{
    decode_items, encode_items, group_stream, inbox_stream, IdMap, Index, Item, NameMap, Undo, BLOCK_ENTRIES,
    ENTRY_BYTES,
};

/// How hard a commit waits for the disk (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL`: a commit is atomic and survives a process crash; a power loss may
    /// lose the last commits (WAL is synced at checkpoints).
    #[default]
    Normal,
    /// `synchronous=FULL`: the WAL is synced at every commit; survives power loss.
    Full,
}

/// How the SQLite store is opened and tuned.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub durability: Durability,
    /// Page cache of the writer connection.
    pub cache_bytes: u64,
    /// A stream's pending positions are written to `entries` once the oldest is this old.
    /// Longer: fewer page writes per message, more memory and a longer recovery scan.
    pub flush_age: Duration,
    /// Most streams written per flush step (each batch runs at most one step; four times as
    /// many while memory is over `pending_entries_max`). Bounds the time a flush adds to a
    /// commit.
    pub flush_streams_max: usize,
    /// Positions held in memory above which streams are flushed regardless of age.
    pub pending_entries_max: usize,
    /// Clean (nothing pending) cached streams/users beyond which caches are trimmed.
    pub cache_entries_max: usize,
    /// The WAL is checkpointed (PASSIVE) by a background thread every 20 ms, but a WAL starts
    /// over only when a write begins with every frame copied, which a steady stream of commits
    /// never allows. So once the WAL passes this many bytes, the writer checkpoints after its
    /// commit (SQLite's autocheckpoint): only the frames the background thread has not copied
    /// yet, and the next commit starts the WAL over, truncating the file back to this size.
    /// At 8× this (as before 2026-11-28) the WAL grew to 512 MiB under load and the truncation
    /// stalled the storage thread for up to ~100 ms (paced p99 at 20,000 msgs/s 63–112 ms in
    /// about one run of three, 7–12 ms otherwise; throughput unchanged either way).
    pub checkpoint_wal_bytes: u64,
    /// Test hook: `PRAGMA max_page_count` (a tiny value makes writes fail with SQLITE_FULL).
    pub max_page_count: Option<u64>,
    /// Events the outbox keeps at most (`events.outbox_max`); a write that goes past it deletes
    /// the oldest first and counts them (see [`OutboxStats`]).
    pub outbox_max: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::Normal,
            cache_bytes: 128 << 20,
            flush_age: Duration::from_secs(20),
            flush_streams_max: 512,
            pending_entries_max: 4_000_000,
            cache_entries_max: 1_000_000,
            checkpoint_wal_bytes: 64 << 20,
            max_page_count: None,
            outbox_max: OUTBOX_MAX_DEFAULT,
        }
    }
}

impl SqliteOptions {
    /// Small limits so that every path (flush, trims, checkpoints) runs in tests.
    pub fn test_min() -> Self {
        SqliteOptions {
            cache_bytes: 4 << 20,
            flush_age: Duration::ZERO,
            flush_streams_max: 3,
            pending_entries_max: 16,
            cache_entries_max: 8,
            checkpoint_wal_bytes: 64 << 10,
            ..SqliteOptions::default()
        }
    }
}

/// Rows scanned at most by a filtered history page, `unread`, or an `up_to` search.
pub const SCAN_ITEMS_MAX: usize = 20_000;
/// Positions a reader asks for are clamped to this (far past any stored seq), so the scans'
/// `+ 1` never overflows whatever the API or a terminal sends.
const SEQ_MAX: u64 = i64::MAX as u64;
/// Rows examined per purge step of the `entries` table.
const BLOCK_SWEEP_ROWS: usize = 512;

fn kind_code(k: Kind) -> i64 {
    match k {
        Kind::Text => 0,
        Kind::Image => 1,
        Kind::File => 2,
        Kind::Voice => 3,
        Kind::Custom => 4,
    }
}

fn kind_of(c: i64) -> Kind {
    match c {
        1 => Kind::Image,
        2 => Kind::File,
        3 => Kind::Voice,
        4 => Kind::Custom,
        _ => Kind::Text,
    }
}

/// Where a cid names one message (API.md: a repeated `cid` from the same sender is the
/// first message again): a sender's single chats share one cid space; each group the sender
/// posts to has its own, so the same cid in a single chat, in another group, or from the
/// business (as the system) to another group is another message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CidScope {
    Single,
    /// The group's internal number (never reused, so a group recreated under the same name
    /// is another scope).
    Group(i64),
}

impl CidScope {
    /// The scope of a stored message, by its `messages.chat` stream.
    fn of_chat(chat: i64) -> CidScope {
        if chat % 2 == 0 {
            CidScope::Single
        } else {
            CidScope::Group(chat >> 1)
        }
    }

    /// Whether a stored message (its `messages.chat`) is in this scope.
    fn holds(self, chat: i64) -> bool {
        match self {
            CidScope::Single => chat % 2 == 0,
            CidScope::Group(gid) => chat == group_stream(gid),
        }
    }
}

/// FNV-1a, 64 bits: a stable hash of a cid in its scope (stored in `cids.h`, so it must never
/// change). A single chat's is the hash of the cid alone, as it always was; a group's also
/// takes a 0xFF byte (never in UTF-8 text) and the group's number, so it keys the same
/// `cids(frm, h)` table without a schema change. Group cids stored before they were scoped
/// (hash of the cid alone) no longer answer a group retry: a retry that straddles the upgrade
/// is stored again (accepted); a single-chat lookup that meets such a row drops it
/// ([`SqliteBackend::find_cid`]), and the purge of its message too.
fn cid_hash(cid: &str, scope: CidScope) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    cid.bytes().for_each(&mut eat);
    if let CidScope::Group(gid) = scope {
        eat(0xFF);
        gid.to_le_bytes().into_iter().for_each(&mut eat);
    }
    h as i64
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn sq(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn page_limit(limit: usize) -> usize {
    limit.clamp(1, PAGE_LIMIT_MAX)
}

/// Rows per multi-row `INSERT` into `cids`.
const CID_ROWS_PER_INSERT: usize = 128;

fn cid_insert_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT OR IGNORE INTO cids(frm, h, id) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?)");
    }
    sql
}

/// A stored message row.
struct MsgRow {
    id: i64,
    ts: i64,
    frm: i64,
    chat: i64,
    seq: i64,
    frm_seq: Option<i64>,
    kind: i64,
    cid: Option<String>,
    body: String,
}

/// Streams chosen by a flush step, written inside a transaction and applied to memory only
/// after it commits.
struct FlushPlan {
    /// `(stream, items written, cids written)`, in queue order.
    streams: Vec<(i64, usize, usize)>,
    new_watermark: i64,
}

/// The SQLite store. See the crate docs for the layout and why it is shaped so.
pub struct SqliteBackend {
    conn: Connection,
    opts: SqliteOptions,
    ix: Index,
    undo: Vec<Undo>,
    users: NameMap<i64>,
    names: IdMap<i64, Arc<str>>,
    groups: NameMap<i64>,
    group_names: IdMap<i64, Arc<str>>,
    /// The watermark stored in `meta`: every message with a smaller id is fully indexed in
    /// tables. Recovery rescans messages from here.
    w_durable: i64,
    /// Purge sweep position over `entries`.
    sweep: Option<(i64, i64)>,
    /// Unix ms of the batch being applied (stored timestamps).
    now_ms: u64,
    /// [`crate::backend::clock_ms`] of the batch or maintenance step being applied: when
    /// positions were queued for the index flush, and their age.
    clock_ms: u64,
    _checkpointer: Option<Checkpointer>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend").field("path", &self.path).field("pending", &self.ix.pending_total).finish()
    }
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path`, then rebuilds the in-memory index
    /// tail from the messages after the durable watermark.
    pub fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        let sync = match opts.durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        };
        let wal_pages = (opts.checkpoint_wal_bytes / 4096).max(16);
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous={sync};
             PRAGMA cache_size=-{};
             PRAGMA temp_store=MEMORY;
             PRAGMA wal_autocheckpoint={wal_pages};
             PRAGMA journal_size_limit={};",
            (opts.cache_bytes / 1024).max(256),
            opts.checkpoint_wal_bytes
        ))?;
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!("journal_mode is {mode}, WAL required")));
        }
        conn.execute_batch(schema::SCHEMA)?;
        let version: Option<i64> =
            conn.query_row("SELECT v FROM meta WHERE k='schema'", [], |r| r.get(0)).optional()?;
        match version {
            None => {
                conn.execute("INSERT INTO meta(k, v) VALUES('schema', ?1)", [schema::SCHEMA_VERSION])?;
            }
            Some(v) if v == schema::SCHEMA_VERSION => {}
            Some(1) => conn.execute_batch(schema::MIGRATE_FROM_1)?,
            Some(v) => {
                return Err(StoreError::Unavailable(format!(
                    "schema version {v}, this build knows {}",
                    schema::SCHEMA_VERSION
                )))
            }
        }
        if let Some(n) = opts.max_page_count {
            conn.query_row(&format!("PRAGMA max_page_count={n}"), [], |_| Ok(()))?;
        }
        let w_durable: i64 =
            conn.query_row("SELECT v FROM meta WHERE k='watermark'", [], |r| r.get(0)).optional()?.unwrap_or(i64::MAX);
        let checkpointer = Checkpointer::start(&path);
        let mut b = SqliteBackend {
            conn,
            opts,
            ix: Index::default(),
            undo: Vec::new(),
            users: NameMap::default(),
            names: IdMap::default(),
            groups: NameMap::default(),
            group_names: IdMap::default(),
            w_durable,
            sweep: None,
            now_ms: unix_ms(),
            clock_ms: crate::backend::clock_ms(),
            _checkpointer: checkpointer,
            path,
        };
        b.recover()?;
        Ok(b)
    }

    /// Opens `<dir>/ether.db`.
    pub fn open_dir(dir: impl AsRef<Path>, opts: SqliteOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir.as_ref()).map_err(|e| StoreError::Unavailable(format!("create data dir: {e}")))?;
        Self::open(dir.as_ref().join("ether.db"), opts)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    // ---- recovery -------------------------------------------------------------------------

    /// Rebuilds the pending index from messages at or after the durable watermark.
    fn recover(&mut self) -> Result<(), StoreError> {
        if self.w_durable == i64::MAX {
            return Ok(());
        }
        let mut per_stream: HashMap<i64, Vec<(u64, Item)>> = HashMap::new();
        let mut cids: Vec<(i64, i64, i64)> = Vec::new();
        {
            let mut st = self
                .conn
                .prepare("SELECT id, frm, chat, seq, frm_seq, cid FROM messages WHERE id >= ?1 ORDER BY id")?;
            let mut rows = st.query([self.w_durable])?;
            while let Some(r) = rows.next()? {
                let id: i64 = r.get(0)?;
                let frm: i64 = r.get(1)?;
                let chat: i64 = r.get(2)?;
                let seq: i64 = r.get(3)?;
                let frm_seq: Option<i64> = r.get(4)?;
                let cid: Option<String> = r.get(5)?;
                if chat % 2 == 0 {
                    let to = chat / 2;
                    let out = i64::from(to == frm);
                    per_stream.entry(chat).or_default().push((seq as u64, Item { id, aux: frm * 2 + out }));
                    if let Some(fs) = frm_seq {
                        per_stream
                            .entry(inbox_stream(frm))
                            .or_default()
                            .push((fs as u64, Item { id, aux: to * 2 + 1 }));
                    }
                } else {
                    per_stream.entry(chat).or_default().push((seq as u64, Item { id, aux: frm * 2 }));
                }
                if let Some(c) = cid {
                    cids.push((frm, cid_hash(&c, CidScope::of_chat(chat)), id));
                }
            }
        }
        let mut undo = Vec::new();
        let now = self.clock_ms;
        let mut streams: Vec<i64> = per_stream.keys().copied().collect();
        streams.sort_unstable();
        for s in streams {
            let mut items = per_stream.remove(&s).unwrap_or_default();
            self.ensure_stream(s)?;
            let flushed = self.ix.streams.get(&s).map_or(0, |st| st.flushed);
            items.retain(|(seq, _)| *seq > flushed);
            items.sort_unstable_by_key(|(seq, _)| *seq);
            for (want, (seq, item)) in (flushed + 1..).zip(items) {
                if seq != want {
                    tracing::error!(stream = s, seq, want, "stream index has a gap; truncated");
                    break;
                }
                self.ix.push_item(s, item, now, &mut undo);
            }
        }
        for (frm, h, id) in cids {
            let known: Option<i64> = self
                .conn
                .prepare_cached("SELECT id FROM cids WHERE frm=?1 AND h=?2")?
                .query_row([frm, h], |r| r.get(0))
                .optional()?;
            if known.is_none() && !self.ix.pending_cids.contains_key(&(frm, h)) {
                // A group message's cid: its sender's inbox may not be loaded yet.
                self.ensure_stream(inbox_stream(frm))?;
                self.ix.push_cid(frm, h, id, now, &mut undo);
            }
        }
        tracing::info!(pending = self.ix.pending_total, streams = self.ix.queue.len(), "store index tail recovered");
        Ok(())
    }

    // ---- caches ---------------------------------------------------------------------------

    fn uid_of(&mut self, name: &str) -> Result<Option<i64>, StoreError> {
        if let Some(&u) = self.users.get(name) {
            return Ok(Some(u));
        }
        let u: Option<i64> = self
            .conn
            .prepare_cached("SELECT uid FROM users WHERE name=?1")?
            .query_row([name], |r| r.get(0))
            .optional()?;
        if let Some(u) = u {
            self.users.insert(name.into(), u);
        }
        Ok(u)
    }

    fn uid_or_create(&mut self, name: &str) -> Result<i64, StoreError> {
        if let Some(u) = self.uid_of(name)? {
            return Ok(u);
        }
        self.conn.prepare_cached("INSERT INTO users(name) VALUES(?1)")?.execute([name])?;
        let u = self.conn.last_insert_rowid();
        self.users.insert(name.into(), u);
        self.undo.push(Undo::User { name: name.into(), uid: u });
        Ok(u)
    }

    fn name_of(&mut self, uid: i64) -> Result<Arc<str>, StoreError> {
        if let Some(n) = self.names.get(&uid) {
            return Ok(n.clone());
        }
        let n: Option<String> = self
            .conn
            .prepare_cached("SELECT name FROM users WHERE uid=?1")?
            .query_row([uid], |r| r.get(0))
            .optional()?;
        let n: Arc<str> = n.unwrap_or_else(|| format!("#{uid}")).into();
        self.names.insert(uid, n.clone());
        Ok(n)
    }

    fn gid_of(&mut self, name: &str) -> Result<Option<i64>, StoreError> {
        if let Some(&g) = self.groups.get(name) {
            return Ok(Some(g));
        }
        let g: Option<i64> = self
            .conn
            .prepare_cached("SELECT gid FROM groups WHERE name=?1")?
            .query_row([name], |r| r.get(0))
            .optional()?;
        if let Some(g) = g {
            self.groups.insert(name.into(), g);
            self.group_names.insert(g, name.into());
        }
        Ok(g)
    }

    fn need_gid(&mut self, name: &str) -> Result<i64, StoreError> {
        self.gid_of(name)?.ok_or(StoreError::NotFound)
    }

    fn group_name_of(&mut self, gid: i64) -> Result<Arc<str>, StoreError> {
        if let Some(n) = self.group_names.get(&gid) {
            return Ok(n.clone());
        }
        // A dissolved group keeps no name: its log is only reachable until retention.
        let n: Option<String> = self
            .conn
            .prepare_cached("SELECT name FROM groups WHERE gid=?1")?
            .query_row([gid], |r| r.get(0))
            .optional()?;
        let n: Arc<str> = n.unwrap_or_else(|| format!("#{gid}")).into();
        self.group_names.insert(gid, n.clone());
        Ok(n)
    }

    fn is_member(&mut self, gid: i64, uid: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM members WHERE gid=?1 AND uid=?2")?
            .query_row([gid, uid], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Loads a stream's written head into the cache.
    fn ensure_stream(&mut self, stream: i64) -> Result<(), StoreError> {
        if self.ix.streams.contains_key(&stream) {
            return Ok(());
        }
        let last: Option<(i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT first_seq, length(data) FROM entries WHERE stream=?1
                 ORDER BY first_seq DESC LIMIT 1",
            )?
            .query_row([stream], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let flushed = last.map_or(0, |(f, len)| (f + len / ENTRY_BYTES as i64 - 1).max(0) as u64);
        self.ix.streams.insert(stream, index::StreamState { flushed, ..Default::default() });
        Ok(())
    }

    fn head(&mut self, stream: i64) -> Result<u64, StoreError> {
        self.ensure_stream(stream)?;
        Ok(self.ix.streams.get(&stream).map_or(0, |s| s.head()))
    }

    fn message(&mut self, id: i64) -> Result<Option<MsgRow>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT ts, frm, chat, seq, frm_seq, kind, cid, body FROM messages WHERE id=?1")?
            .query_row([id], |r| {
                Ok(MsgRow {
                    id,
                    ts: r.get(0)?,
                    frm: r.get(1)?,
                    chat: r.get(2)?,
                    seq: r.get(3)?,
                    frm_seq: r.get(4)?,
                    kind: r.get(5)?,
                    cid: r.get(6)?,
                    body: r.get(7)?,
                })
            })
            .optional()?)
    }

    /// The first message a sender sent with this cid in this scope, if any.
    fn find_cid(&mut self, frm: i64, cid: &str, scope: CidScope) -> Result<Option<MsgRow>, StoreError> {
        let h = cid_hash(cid, scope);
        let id = match self.ix.pending_cids.get(&(frm, h)) {
            Some(&id) => Some(id),
            None => self
                .conn
                .prepare_cached("SELECT id FROM cids WHERE frm=?1 AND h=?2")?
                .query_row([frm, h], |r| r.get(0))
                .optional()?,
        };
        let Some(id) = id else { return Ok(None) };
        // A hash collision or a purged first message: not a duplicate.
        let Some(m) = self.message(id)?.filter(|m| m.frm == frm && m.cid.as_deref() == Some(cid)) else {
            return Ok(None);
        };
        if scope.holds(m.chat) {
            return Ok(Some(m));
        }
        if scope == CidScope::Single {
            // A group message's row from before group cids were scoped (see `cid_hash`): no
            // group lookup reads it any more, and left in place it would keep this sender's
            // single-chat cid from being recorded (`INSERT OR IGNORE`).
            self.conn.prepare_cached("DELETE FROM cids WHERE frm=?1 AND h=?2 AND id=?3")?.execute([frm, h, id])?;
        }
        Ok(None)
    }

    /// Keeps the durable watermark at or below a newly stored message's id.
    fn lower_watermark(&mut self, id: i64) -> Result<(), StoreError> {
        if id < self.w_durable {
            self.conn.prepare_cached("INSERT OR REPLACE INTO meta(k, v) VALUES('watermark', ?1)")?.execute([id])?;
            self.undo.push(Undo::Watermark(self.w_durable));
            self.w_durable = id;
        }
        Ok(())
    }

    // ---- stream reads ---------------------------------------------------------------------

    /// Items of `stream` with `lo < seq < hi`, ascending or descending, until `visit` says
    /// stop or `max` items were visited. Returns whether it stopped early.
    fn scan(
        &mut self,
        stream: i64,
        lo: u64,
        hi: u64,
        ascending: bool,
        max: usize,
        mut visit: impl FnMut(u64, Item) -> bool,
    ) -> Result<bool, StoreError> {
        // Positions from the API or a terminal may be anything up to u64::MAX: past `SEQ_MAX`
        // nothing is stored, and `+ 1` below cannot overflow.
        let (lo, hi) = (lo.min(SEQ_MAX), hi.min(SEQ_MAX));
        self.ensure_stream(stream)?;
        let (flushed, pend): (u64, Vec<Item>) = {
            let st = &self.ix.streams[&stream];
            let head = st.head();
            let from = lo.max(st.flushed);
            let to = hi.min(head + 1);
            let p = if to > from + 1 {
                st.pending[(from - st.flushed) as usize..(to - 1 - st.flushed) as usize].to_vec()
            } else {
                Vec::new()
            };
            (st.flushed, p)
        };
        let mut seen = 0usize;
        let pend_first = lo.max(flushed) + 1;
        let mut step = |seq: u64, it: Item| -> bool {
            if seen >= max {
                return false;
            }
            seen += 1;
            visit(seq, it)
        };
        if ascending {
            if lo < flushed {
                let mut st = self.conn.prepare_cached(
                    "SELECT first_seq, data FROM entries WHERE stream=?1 AND first_seq > ?2
                     AND first_seq < ?3 ORDER BY first_seq",
                )?;
                let start = sq(lo) - BLOCK_ENTRIES as i64;
                let mut rows = st.query(params![stream, start, sq(hi.min(flushed + 1))])?;
                while let Some(r) = rows.next()? {
                    let first: i64 = r.get(0)?;
                    let data = r.get_ref(1)?.as_blob().unwrap_or(&[]);
                    for (i, it) in decode_items(data).enumerate() {
                        let seq = first as u64 + i as u64;
                        if seq <= lo || seq >= hi || seq > flushed {
                            continue;
                        }
                        if !step(seq, it) {
                            return Ok(true);
                        }
                    }
                }
            }
            for (i, it) in pend.into_iter().enumerate() {
                if !step(pend_first + i as u64, it) {
                    return Ok(true);
                }
            }
        } else {
            for (i, it) in pend.into_iter().enumerate().rev() {
                if !step(pend_first + i as u64, it) {
                    return Ok(true);
                }
            }
            if lo < flushed && hi > 1 {
                let mut st = self.conn.prepare_cached(
                    "SELECT first_seq, data FROM entries WHERE stream=?1 AND first_seq < ?2
                     ORDER BY first_seq DESC",
                )?;
                let mut rows = st.query(params![stream, sq(hi.min(flushed + 1))])?;
                while let Some(r) = rows.next()? {
                    let first: i64 = r.get(0)?;
                    let data = r.get_ref(1)?.as_blob().unwrap_or(&[]);
                    for (i, it) in decode_items(data).enumerate().rev() {
                        let seq = first as u64 + i as u64;
                        if seq <= lo || seq >= hi || seq > flushed {
                            continue;
                        }
                        if !step(seq, it) {
                            return Ok(true);
                        }
                    }
                    if first as u64 <= lo + 1 {
                        break;
                    }
                }
            }
        }
        Ok(false)
    }

    /// A stream position as the reader sees it; `None` if the message was purged.
    fn entry(&mut self, stream: i64, seq: u64, it: Item) -> Result<Option<Entry>, StoreError> {
        let Some(m) = self.message(it.id)? else {
            return Ok(None);
        };
        let chat = if stream % 2 == 0 {
            format!("u:{}", self.name_of(it.aux >> 1)?)
        } else {
            format!("g:{}", self.group_name_of(stream >> 1)?)
        };
        Ok(Some(Entry {
            seq,
            chat,
            id: m.id as u64,
            ts: m.ts as u64,
            from: self.name_of(m.frm)?.to_string(),
            kind: kind_of(m.kind),
            body: m.body,
            cid: m.cid,
        }))
    }

    /// A page of `stream` in `(lo, hi)`, filtered by `keep`; purged messages are skipped.
    fn page(
        &mut self,
        stream: i64,
        mut lo: u64,
        mut hi: u64,
        ascending: bool,
        limit: usize,
        keep: impl Fn(Item) -> bool,
    ) -> Result<Page, StoreError> {
        let limit = page_limit(limit);
        let head = self.head(stream)?;
        (lo, hi) = (lo.min(SEQ_MAX), hi.min(SEQ_MAX));
        let mut entries = Vec::new();
        let mut budget = SCAN_ITEMS_MAX;
        let mut scanned_to = if ascending { lo } else { hi.min(head + 1) };
        let more = loop {
            let want = limit - entries.len();
            let mut items = Vec::with_capacity(want + 1);
            let mut seen = 0usize;
            let mut last_seen = None;
            let stopped = self.scan(stream, lo, hi, ascending, budget, |seq, it| {
                if keep(it) {
                    if items.len() > want {
                        return false;
                    }
                    items.push((seq, it));
                }
                seen += 1;
                last_seen = Some(seq);
                true
            })?;
            budget = budget.saturating_sub(seen);
            let extra = items.len() > want;
            for &(seq, it) in items.iter().take(want) {
                scanned_to = seq;
                if let Some(e) = self.entry(stream, seq, it)? {
                    entries.push(e);
                }
            }
            if !extra {
                if stopped {
                    // Scan budget spent: `scanned_to` says where to go on, past every
                    // position looked at (kept or not), so a filter that matched nothing in
                    // a whole budget still moves the reader on.
                    scanned_to = last_seen.unwrap_or(scanned_to);
                    break true;
                }
                scanned_to = if ascending { hi.saturating_sub(1).min(head).max(lo) } else { lo + 1 };
                break false;
            }
            if entries.len() == limit {
                break true;
            }
            // Some were purged: go on from the last one looked at.
            if ascending {
                lo = scanned_to;
            } else {
                hi = scanned_to;
            }
        };
        Ok(Page { entries, head, more, scanned_to })
    }

    // ---- ops ------------------------------------------------------------------------------

    fn append(&mut self, m: &NewMessage) -> Result<Reply, StoreError> {
        check_user("from", &m.from)?;
        check_user("to", &m.to)?;
        check_body(m.id, &m.body, &m.cid)?;
        let id = m.id as i64;
        let from = self.uid_or_create(&m.from)?;
        let to = if m.to == m.from { from } else { self.uid_or_create(&m.to)? };
        if let Some(cid) = &m.cid {
            if let Some(first) = self.find_cid(from, cid, CidScope::Single)? {
                return Ok(Reply::Appended(Appended {
                    id: first.id as u64,
                    ts: first.ts as u64,
                    receiver_seq: first.seq as u64,
                    sender_seq: first.frm_seq.map(|s| s as u64),
                    duplicate: true,
                }));
            }
        }
        let rs = inbox_stream(to);
        let ss = inbox_stream(from);
        let receiver_seq = self.head(rs)? + 1;
        let sender_seq = if to == from { None } else { Some(self.head(ss)? + 1) };
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO messages(id, ts, frm, chat, seq, frm_seq, kind, cid, body)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                id,
                sq(m.ts),
                from,
                rs,
                sq(receiver_seq),
                sender_seq.map(sq),
                kind_code(m.kind),
                m.cid,
                m.body
            ]);
        map_insert(inserted)?;
        self.lower_watermark(id)?;
        let now = self.clock_ms;
        let out = i64::from(to == from);
        let seq = self.ix.push_item(rs, Item { id, aux: from * 2 + out }, now, &mut self.undo);
        debug_assert_eq!(seq, receiver_seq);
        if sender_seq.is_some() {
            let s = self.ix.push_item(ss, Item { id, aux: to * 2 + 1 }, now, &mut self.undo);
            debug_assert_eq!(Some(s), sender_seq);
        }
        if let Some(cid) = &m.cid {
            self.ix.push_cid(from, cid_hash(cid, CidScope::Single), id, now, &mut self.undo);
        }
        Ok(Reply::Appended(Appended { id: m.id, ts: m.ts, receiver_seq, sender_seq, duplicate: false }))
    }

    fn append_group(&mut self, m: &NewGroupMessage) -> Result<Reply, StoreError> {
        check_user("from", &m.from)?;
        check_user("group", &m.group)?;
        check_body(m.id, &m.body, &m.cid)?;
        let id = m.id as i64;
        let gid = self.need_gid(&m.group)?;
        let known = self.uid_of(&m.from)?;
        // A retry answers the first result even if the sender has left the group since:
        // the cid is looked up before membership, in this group's scope (a group recreated
        // under the same name has a new number, so an old cid makes a new message there).
        if let (Some(u), Some(cid)) = (known, &m.cid) {
            if let Some(first) = self.find_cid(u, cid, CidScope::Group(gid))? {
                return Ok(Reply::GroupAppended(GroupAppended {
                    id: first.id as u64,
                    ts: first.ts as u64,
                    seq: first.seq as u64,
                    duplicate: true,
                }));
            }
        }
        let from = match known {
            Some(u) if m.system || self.is_member(gid, u)? => u,
            None if m.system => self.uid_or_create(&m.from)?,
            _ => return Err(StoreError::Forbidden(format!("{} is not a member", m.from))),
        };
        let gs = group_stream(gid);
        let seq = self.head(gs)? + 1;
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO messages(id, ts, frm, chat, seq, frm_seq, kind, cid, body)
                 VALUES(?1, ?2, ?3, ?4, ?5, NULL, ?6, ?7, ?8)",
            )?
            .execute(params![id, sq(m.ts), from, gs, sq(seq), kind_code(m.kind), m.cid, m.body]);
        map_insert(inserted)?;
        self.lower_watermark(id)?;
        let now = self.clock_ms;
        let s = self.ix.push_item(gs, Item { id, aux: from * 2 }, now, &mut self.undo);
        debug_assert_eq!(s, seq);
        if let Some(cid) = &m.cid {
            // The cid is held with the sender's inbox stream: load its state first, or a
            // fresh one (head 0) would stand in for it and the sender's next inbox seq would
            // be given again.
            self.ensure_stream(index::inbox_stream(from))?;
            self.ix.push_cid(from, cid_hash(cid, CidScope::Group(gid)), id, now, &mut self.undo);
        }
        Ok(Reply::GroupAppended(GroupAppended { id: m.id, ts: m.ts, seq, duplicate: false }))
    }

    fn read_inbox(&mut self, user: &str, after: u64, limit: usize) -> Result<Page, StoreError> {
        let Some(uid) = self.uid_of(user)? else {
            return Ok(Page::default());
        };
        self.page(inbox_stream(uid), after, u64::MAX, true, limit, |_| true)
    }

    fn read_group(&mut self, group: &str, after: u64, limit: usize) -> Result<Page, StoreError> {
        let gid = self.need_gid(group)?;
        self.page(group_stream(gid), after, u64::MAX, true, limit, |_| true)
    }

    fn groups_of_uid(&mut self, uid: i64) -> Result<Vec<i64>, StoreError> {
        let mut st = self.conn.prepare_cached("SELECT gid FROM member_of WHERE uid=?1 ORDER BY gid")?;
        let gids = st.query_map([uid], |r| r.get(0))?.collect::<Result<Vec<i64>, _>>()?;
        Ok(gids)
    }

    fn heads(&mut self, user: &str) -> Result<Heads, StoreError> {
        let Some(uid) = self.uid_of(user)? else {
            return Ok(Heads::default());
        };
        let inbox_seq = self.head(inbox_stream(uid))?;
        let mut groups = BTreeMap::new();
        for gid in self.groups_of_uid(uid)? {
            let name = self.group_name_of(gid)?;
            groups.insert(name.to_string(), self.head(group_stream(gid))?);
        }
        Ok(Heads { inbox_seq, groups })
    }

    fn sync(
        &mut self,
        user: &str,
        inbox_after: u64,
        groups: &BTreeMap<String, u64>,
        limit: usize,
    ) -> Result<Synced, StoreError> {
        let limit = page_limit(limit);
        let heads = self.heads(user)?;
        let mut out = Synced { heads, ..Default::default() };
        let Some(uid) = self.uid_of(user)? else {
            return Ok(out);
        };
        let p = self.page(inbox_stream(uid), inbox_after, u64::MAX, true, limit, |_| true)?;
        out.more = p.more;
        out.entries = p.entries;
        for (g, after) in groups {
            if out.entries.len() >= limit {
                out.more = out.more || out.heads.groups.get(g).is_some_and(|h| h > after);
                continue;
            }
            if !out.heads.groups.contains_key(g) {
                continue; // not a member (or no such group): nothing to send
            }
            let gid = self.need_gid(g)?;
            let room = limit - out.entries.len();
            let p = self.page(group_stream(gid), *after, u64::MAX, true, room, |_| true)?;
            out.more |= p.more;
            out.entries.extend(p.entries);
        }
        Ok(out)
    }

    fn history(&mut self, q: &HistoryQuery) -> Result<Page, StoreError> {
        let ascending = q.after_seq.is_some() && q.before_seq.is_none();
        let lo = q.after_seq.unwrap_or(0);
        let hi = q.before_seq.unwrap_or(u64::MAX);
        let Some(uid) = self.uid_of(&q.user)? else {
            return Ok(Page::default());
        };
        match q.chat.as_deref().map(Chat::parse) {
            None => self.page(inbox_stream(uid), lo, hi, ascending, q.limit, |_| true),
            Some(None) => Err(StoreError::Invalid("chat: expected u:<user> or g:<group>".into())),
            Some(Some(Chat::User(peer))) => {
                let Some(p) = self.uid_of(&peer)? else {
                    return Ok(Page { head: self.head(inbox_stream(uid))?, ..Default::default() });
                };
                self.page(inbox_stream(uid), lo, hi, ascending, q.limit, move |it| it.aux >> 1 == p)
            }
            Some(Some(Chat::Group(g))) => {
                let gid = self.need_gid(&g)?;
                if !self.is_member(gid, uid)? {
                    return Err(StoreError::Forbidden(format!("{} is not a member", q.user)));
                }
                self.page(group_stream(gid), lo, hi, ascending, q.limit, |_| true)
            }
        }
    }

    fn group_history(
        &mut self,
        group: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let gid = self.need_gid(group)?;
        let ascending = after.is_some() && before.is_none();
        self.page(group_stream(gid), after.unwrap_or(0), before.unwrap_or(u64::MAX), ascending, limit, |_| true)
    }

    fn set_delivered(&mut self, user: &str, device: &str, group: Option<&str>, seq: u64) -> Result<Reply, StoreError> {
        check_user("user", user)?;
        check_user("device", device)?;
        let uid = self.uid_or_create(user)?;
        let (chat, head) = match group {
            None => (0, self.head(inbox_stream(uid))?),
            Some(g) => {
                let gid = self.need_gid(g)?;
                // Acks of a member removed meanwhile (saved a tick later): its positions went
                // with it and must not come back.
                if !self.is_member(gid, uid)? {
                    return Err(StoreError::Forbidden(format!("{user} is not a member of {g}")));
                }
                (group_stream(gid), self.head(group_stream(gid))?)
            }
        };
        let prev: u64 = self
            .conn
            .prepare_cached("SELECT seq FROM delivery WHERE owner=?1 AND device=?2 AND chat=?3")?
            .query_row(params![uid, device, chat], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64;
        let new = seq.min(head).max(prev);
        if new > prev {
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO delivery(owner, device, chat, seq) VALUES(?1, ?2, ?3, ?4)")?
                .execute(params![uid, device, chat, sq(new)])?;
        }
        Ok(Reply::Position { prev, seq: new })
    }

    fn get_delivered(&mut self, user: &str, device: &str) -> Result<Heads, StoreError> {
        let Some(uid) = self.uid_of(user)? else {
            return Ok(Heads::default());
        };
        let rows: Vec<(i64, i64)> = {
            let mut st = self.conn.prepare_cached("SELECT chat, seq FROM delivery WHERE owner=?1 AND device=?2")?;
            let r = st.query_map(params![uid, device], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            r
        };
        let mut h = Heads::default();
        for (chat, seq) in rows {
            if chat == 0 {
                h.inbox_seq = seq as u64;
            } else if let Some(name) = self.live_group_name(chat >> 1)? {
                h.groups.insert(name, seq as u64);
            }
        }
        Ok(h)
    }

    fn live_group_name(&mut self, gid: i64) -> Result<Option<String>, StoreError> {
        let n: Option<String> = self
            .conn
            .prepare_cached("SELECT name FROM groups WHERE gid=?1")?
            .query_row([gid], |r| r.get(0))
            .optional()?;
        Ok(n)
    }

    fn read_pos(&mut self, owner: i64, chat: i64) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT seq FROM read_pos WHERE owner=?1 AND chat=?2")?
            .query_row([owner, chat], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64)
    }

    fn set_read(&mut self, user: &str, chat: &str, seq: u64, emit_event: bool) -> Result<Reply, StoreError> {
        check_user("user", user)?;
        let parsed =
            Chat::parse(chat).ok_or_else(|| StoreError::Invalid("chat: expected u:<user> or g:<group>".into()))?;
        let uid = self.uid_or_create(user)?;
        let (key, stream, head, peer) = match &parsed {
            Chat::User(p) => {
                let p = self.uid_of(p)?.ok_or(StoreError::NotFound)?;
                let s = inbox_stream(uid);
                (p * 2, s, self.head(s)?, Some(p))
            }
            Chat::Group(g) => {
                let gid = self.need_gid(g)?;
                if !self.is_member(gid, uid)? {
                    return Err(StoreError::Forbidden(format!("{user} is not a member")));
                }
                let s = group_stream(gid);
                (s, s, self.head(s)?, None)
            }
        };
        let prev = self.read_pos(uid, key)?;
        let new = seq.min(head).max(prev);
        let moved = new > prev;
        let mut up_to = None;
        if new > 0 {
            self.scan(stream, 0, new + 1, false, SCAN_ITEMS_MAX, |_, it| {
                if peer.is_none_or(|p| it.aux >> 1 == p) {
                    up_to = Some(it.id as u64);
                    return false;
                }
                true
            })?;
        }
        if moved {
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO read_pos(owner, chat, seq) VALUES(?1, ?2, ?3)")?
                .execute(params![uid, key, sq(new)])?;
            if emit_event {
                let data = serde_json::json!({
                    "chat": chat,
                    "user": user,
                    "up_to": up_to.map(|i| i.to_string()),
                    "seq": new,
                })
                .to_string();
                self.conn.prepare_cached("INSERT INTO outbox(ts, kind, data) VALUES(?1, ?2, ?3)")?.execute(params![
                    sq(self.now_ms),
                    "message.read",
                    data
                ])?;
                let last = self.conn.last_insert_rowid();
                self.outbox_trim(last, 1)?;
            }
        }
        Ok(Reply::Read(ReadMoved { chat: chat.to_owned(), prev, seq: new, up_to, moved }))
    }

    fn unread(&mut self, user: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut out = BTreeMap::new();
        let Some(uid) = self.uid_of(user)? else {
            return Ok(out);
        };
        let reads: HashMap<i64, u64> = {
            let mut st = self.conn.prepare_cached("SELECT chat, seq FROM read_pos WHERE owner=?1")?;
            let r = st
                .query_map([uid], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect::<Result<_, _>>()?;
            r
        };
        // Retention purges messages oldest id first; an index block keeps the positions of the
        // purged ones until all of its messages are gone: those are not unread, they are gone.
        let first_live: i64 =
            self.conn.query_row("SELECT coalesce(min(id), ?1) FROM messages", [i64::MAX], |r| r.get(0))?;
        let mut counts: HashMap<i64, u64> = HashMap::new();
        // Newest first; a chat stops counting at its read position.
        self.scan(inbox_stream(uid), 0, u64::MAX, false, SCAN_ITEMS_MAX, |seq, it| {
            let peer = it.aux >> 1;
            let incoming = it.aux & 1 == 0;
            if incoming && it.id >= first_live && seq > reads.get(&(peer * 2)).copied().unwrap_or(0) {
                *counts.entry(peer).or_default() += 1;
            }
            true
        })?;
        for (peer, n) in counts {
            out.insert(format!("u:{}", self.name_of(peer)?), n);
        }
        for gid in self.groups_of_uid(uid)? {
            let gs = group_stream(gid);
            // What came before the member joined is history, not unread.
            let joined: i64 = self
                .conn
                .prepare_cached("SELECT joined FROM members WHERE gid=?1 AND uid=?2")?
                .query_row([gid, uid], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            let read = reads.get(&gs).copied().unwrap_or(0).max(joined.max(0) as u64);
            let mut n = 0u64;
            self.scan(gs, read, u64::MAX, false, SCAN_ITEMS_MAX, |_, it| {
                if it.aux >> 1 != uid && it.id >= first_live {
                    n += 1;
                }
                true
            })?;
            if n > 0 {
                out.insert(format!("g:{}", self.group_name_of(gid)?), n);
            }
        }
        Ok(out)
    }

    fn outbox_append(&mut self, events: &[NewEvent]) -> Result<Reply, StoreError> {
        if events.is_empty() {
            return Err(StoreError::Invalid("events: empty".into()));
        }
        let mut first = 0;
        let mut last = 0;
        {
            let mut st = self.conn.prepare_cached("INSERT INTO outbox(ts, kind, data) VALUES(?1, ?2, ?3)")?;
            for (i, e) in events.iter().enumerate() {
                st.execute(params![sq(e.ts), e.kind, e.data])?;
                last = self.conn.last_insert_rowid() as u64;
                if i == 0 {
                    first = last;
                }
            }
        }
        self.outbox_trim(sq(last), events.len() as u64)?;
        Ok(Reply::OutboxAppended { first, last })
    }

    /// After a write that added `added` events, the last with seq `last`: deletes the oldest
    /// events past `outbox_max` (at most `added + OUTBOX_TRIM_STEP`) and counts them in
    /// `meta('outbox_dropped')`, in the write's transaction.
    ///
    /// The outbox's seqs have no holes: AUTOINCREMENT gives each insert the next one (a
    /// rolled-back insert gives it back) and rows only ever leave from the oldest end (acks and
    /// this), so the newest `outbox_max` are exactly those with `seq > last - outbox_max`.
    fn outbox_trim(&mut self, last: i64, added: u64) -> Result<(), StoreError> {
        let keep = sq(self.opts.outbox_max.max(1));
        if last <= keep {
            return Ok(());
        }
        let oldest: Option<i64> =
            self.conn.prepare_cached("SELECT min(seq) FROM outbox")?.query_row([], |r| r.get(0))?;
        let Some(oldest) = oldest else {
            return Ok(());
        };
        let through = (last - keep).min(oldest.saturating_add(sq(added.saturating_add(OUTBOX_TRIM_STEP))) - 1);
        if through < oldest {
            return Ok(());
        }
        let dropped = self.conn.prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?.execute([through])?;
        if dropped > 0 {
            self.conn
                .prepare_cached(
                    "INSERT INTO meta(k, v) VALUES('outbox_dropped', ?1)
                     ON CONFLICT(k) DO UPDATE SET v = v + excluded.v",
                )?
                .execute([dropped as i64])?;
        }
        Ok(())
    }

    fn outbox_stats(&mut self) -> Result<OutboxStats, StoreError> {
        // Two rowid lookups, not a count of every row (see `outbox_trim` on why it is exact).
        let (newest, oldest): (Option<i64>, Option<i64>) = self
            .conn
            .prepare_cached("SELECT (SELECT max(seq) FROM outbox), (SELECT min(seq) FROM outbox)")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let events = match (newest, oldest) {
            (Some(n), Some(o)) => (n - o + 1).max(0) as u64,
            _ => 0,
        };
        let dropped: i64 = self
            .conn
            .prepare_cached("SELECT v FROM meta WHERE k='outbox_dropped'")?
            .query_row([], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        Ok(OutboxStats { events, dropped: dropped.max(0) as u64 })
    }

    fn outbox_fetch(&mut self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut st =
            self.conn.prepare_cached("SELECT seq, ts, kind, data FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let r = st
            .query_map(params![sq(after), page_limit(limit) as i64], |r| {
                Ok(Event {
                    seq: r.get::<_, i64>(0)? as u64,
                    ts: r.get::<_, i64>(1)? as u64,
                    kind: r.get(2)?,
                    data: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(r)
    }

    fn create_group(
        &mut self,
        id: Option<&str>,
        name: &str,
        owner: &str,
        members: &[String],
        created_ms: u64,
        (members_max, groups_per_user_max): (usize, usize),
    ) -> Result<Reply, StoreError> {
        check_user("owner", owner)?;
        for (i, m) in members.iter().enumerate() {
            check_user(&format!("members[{i}]"), m)?;
        }
        let mut all: Vec<&str> = vec![owner];
        let mut seen: HashSet<&str> = HashSet::from([owner]);
        for m in members {
            if seen.insert(m) {
                all.push(m);
            }
        }
        if all.len() > members_max {
            return Err(StoreError::LimitExceeded(format!("members: at most {members_max}")));
        }
        self.check_groups_per_user(&all, groups_per_user_max)?;
        let gname = match id {
            Some(g) => {
                check_user("id", g)?;
                if self.gid_of(g)?.is_some() {
                    return Err(StoreError::Conflict(format!("group {g} exists")));
                }
                g.to_owned()
            }
            None => loop {
                let g = format!("g{:016x}", rand::random::<u64>());
                if self.gid_of(&g)?.is_none() {
                    break g;
                }
            },
        };
        let owner_uid = self.uid_or_create(owner)?;
        self.conn
            .prepare_cached("INSERT INTO groups(name, title, owner, created, members) VALUES(?1, ?2, ?3, ?4, ?5)")?
            .execute(params![gname, name, owner_uid, sq(created_ms), all.len() as i64])?;
        let gid = self.conn.last_insert_rowid();
        self.groups.insert(gname.as_str().into(), gid);
        self.group_names.insert(gid, gname.as_str().into());
        self.undo.push(Undo::Group { name: gname.as_str().into() });
        for m in all {
            let u = self.uid_or_create(m)?;
            self.insert_member(gid, u)?;
        }
        Ok(Reply::GroupCreated { id: gname })
    }

    /// Fails when one of `users` is already in `max` groups (checked before anything changes).
    fn check_groups_per_user(&mut self, users: &[&str], max: usize) -> Result<(), StoreError> {
        for u in users {
            let Some(uid) = self.uid_of(u)? else { continue };
            let n: i64 = self
                .conn
                .prepare_cached("SELECT count(*) FROM member_of WHERE uid=?1")?
                .query_row([uid], |r| r.get(0))?;
            if n as usize >= max {
                return Err(StoreError::LimitExceeded(format!("groups per user: {u} is already in {n} groups")));
            }
        }
        Ok(())
    }

    /// Adds a member, joined at the group's head now (see the schema's `members.joined`).
    fn insert_member(&mut self, gid: i64, uid: i64) -> Result<(), StoreError> {
        let joined = sq(self.head(group_stream(gid))?);
        self.conn
            .prepare_cached("INSERT INTO members(gid, uid, joined) VALUES(?1, ?2, ?3)")?
            .execute([gid, uid, joined])?;
        self.conn.prepare_cached("INSERT INTO member_of(uid, gid) VALUES(?1, ?2)")?.execute([uid, gid])?;
        Ok(())
    }

    fn get_group(&mut self, group: &str) -> Result<GroupInfo, StoreError> {
        let gid = self.need_gid(group)?;
        let (title, owner, created, count): (String, i64, i64, i64) = self
            .conn
            .prepare_cached("SELECT title, owner, created, members FROM groups WHERE gid=?1")?
            .query_row([gid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?
            .ok_or(StoreError::NotFound)?;
        Ok(GroupInfo {
            id: group.to_owned(),
            name: title,
            owner: self.name_of(owner)?.to_string(),
            created_ms: created as u64,
            member_count: count as u64,
            seq: self.head(group_stream(gid))?,
        })
    }

    fn member_uids(&mut self, gid: i64) -> Result<Vec<i64>, StoreError> {
        let mut st = self.conn.prepare_cached("SELECT uid FROM members WHERE gid=?1 ORDER BY uid")?;
        let r = st.query_map([gid], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(r)
    }

    fn dissolve_group(&mut self, group: &str) -> Result<Reply, StoreError> {
        let gid = self.need_gid(group)?;
        let gs = group_stream(gid);
        for u in self.member_uids(gid)? {
            self.conn.prepare_cached("DELETE FROM member_of WHERE uid=?1 AND gid=?2")?.execute([u, gid])?;
            self.conn.prepare_cached("DELETE FROM read_pos WHERE owner=?1 AND chat=?2")?.execute([u, gs])?;
            self.conn.prepare_cached("DELETE FROM delivery WHERE owner=?1 AND chat=?2")?.execute([u, gs])?;
        }
        self.conn.prepare_cached("DELETE FROM members WHERE gid=?1")?.execute([gid])?;
        self.conn.prepare_cached("DELETE FROM groups WHERE gid=?1")?.execute([gid])?;
        self.groups.remove(group);
        Ok(Reply::Done)
    }

    fn add_members(
        &mut self,
        group: &str,
        users: &[String],
        members_max: usize,
        groups_per_user_max: usize,
    ) -> Result<Reply, StoreError> {
        for (i, m) in users.iter().enumerate() {
            check_user(&format!("members[{i}]"), m)?;
        }
        let gid = self.need_gid(group)?;
        let count: i64 =
            self.conn.prepare_cached("SELECT members FROM groups WHERE gid=?1")?.query_row([gid], |r| r.get(0))?;
        let mut new: Vec<&str> = Vec::new();
        let mut seen = HashSet::new();
        for u in users {
            if !seen.insert(u.as_str()) {
                continue;
            }
            let already = match self.uid_of(u)? {
                Some(uid) => self.is_member(gid, uid)?,
                None => false,
            };
            if !already {
                new.push(u);
            }
        }
        if count as usize + new.len() > members_max {
            return Err(StoreError::LimitExceeded(format!("members: at most {members_max}")));
        }
        self.check_groups_per_user(&new, groups_per_user_max)?;
        for u in &new {
            let uid = self.uid_or_create(u)?;
            self.insert_member(gid, uid)?;
        }
        self.conn
            .prepare_cached("UPDATE groups SET members = members + ?1 WHERE gid=?2")?
            .execute([new.len() as i64, gid])?;
        Ok(Reply::Count(new.len() as u64))
    }

    fn remove_member(&mut self, group: &str, user: &str) -> Result<Reply, StoreError> {
        let gid = self.need_gid(group)?;
        let Some(uid) = self.uid_of(user)? else {
            return Ok(Reply::Count(0));
        };
        let n = self.conn.prepare_cached("DELETE FROM members WHERE gid=?1 AND uid=?2")?.execute([gid, uid])?;
        if n == 0 {
            return Ok(Reply::Count(0));
        }
        let gs = group_stream(gid);
        self.conn.prepare_cached("DELETE FROM member_of WHERE uid=?1 AND gid=?2")?.execute([uid, gid])?;
        self.conn.prepare_cached("DELETE FROM read_pos WHERE owner=?1 AND chat=?2")?.execute([uid, gs])?;
        self.conn.prepare_cached("DELETE FROM delivery WHERE owner=?1 AND chat=?2")?.execute([uid, gs])?;
        self.conn.prepare_cached("UPDATE groups SET members = members - 1 WHERE gid=?1")?.execute([gid])?;
        Ok(Reply::Count(1))
    }

    fn list_members(&mut self, group: &str, cursor: Option<&str>, limit: usize) -> Result<Reply, StoreError> {
        let gid = self.need_gid(group)?;
        let after: i64 = match cursor {
            None | Some("") => 0,
            Some(c) => c.parse().map_err(|_| StoreError::Invalid("cursor: not a cursor from this store".into()))?,
        };
        let limit = page_limit(limit);
        let uids: Vec<i64> = {
            let mut st =
                self.conn.prepare_cached("SELECT uid FROM members WHERE gid=?1 AND uid > ?2 ORDER BY uid LIMIT ?3")?;
            let r = st.query_map(params![gid, after, limit as i64 + 1], |r| r.get(0))?.collect::<Result<_, _>>()?;
            r
        };
        let more = uids.len() > limit;
        let mut members = Vec::with_capacity(limit);
        for &u in uids.iter().take(limit) {
            members.push(self.name_of(u)?.to_string());
        }
        let next_cursor = more.then(|| uids[limit - 1].to_string());
        Ok(Reply::Members { members, next_cursor })
    }

    fn group_reads(&mut self, group: &str, msg_id: u64) -> Result<Reply, StoreError> {
        let gid = self.need_gid(group)?;
        let gs = group_stream(gid);
        let m = self.message(sq(msg_id))?.filter(|m| m.chat == gs).ok_or(StoreError::NotFound)?;
        let (members, read): (i64, i64) = self
            .conn
            .prepare_cached(
                "SELECT count(*), count(r.seq) FROM members m
                 LEFT JOIN read_pos r ON r.owner = m.uid AND r.chat = ?2 AND r.seq >= ?3
                 WHERE m.gid = ?1 AND m.uid != ?4 AND m.joined < ?3",
            )?
            .query_row(params![gid, gs, m.seq, m.frm], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Reply::Reads { read: read as u64, members: members as u64 })
    }

    /// Deletes old messages (only those fully indexed) and sweeps index rows that point only
    /// at deleted messages.
    fn purge(&mut self, older_than_ms: u64, max_rows: usize) -> Result<Reply, StoreError> {
        // Only messages below every pending index position: their positions are in tables.
        let limit_id = self.ix.min_pending_id();
        let max_rows = max_rows.max(1);
        let old: Vec<(i64, i64, i64, i64, Option<String>)> = {
            let mut st = self
                .conn
                .prepare_cached("SELECT id, ts, frm, chat, cid FROM messages WHERE id < ?1 ORDER BY id LIMIT ?2")?;
            let r = st
                .query_map(params![limit_id, max_rows as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<_, _>>()?;
            r
        };
        let mut deleted = 0u64;
        let mut stopped = false;
        for (id, ts, frm, chat, cid) in &old {
            if *ts as u64 >= older_than_ms {
                stopped = true;
                break;
            }
            self.conn.prepare_cached("DELETE FROM messages WHERE id=?1")?.execute([id])?;
            if let Some(c) = cid {
                let scope = CidScope::of_chat(*chat);
                let mut del = self.conn.prepare_cached("DELETE FROM cids WHERE frm=?1 AND h=?2 AND id=?3")?;
                del.execute([*frm, cid_hash(c, scope), *id])?;
                if scope != CidScope::Single {
                    // Its row from before group cids were scoped, if it has one.
                    del.execute([*frm, cid_hash(c, CidScope::Single), *id])?;
                }
            }
            deleted += 1;
        }
        let more = !stopped && old.len() == max_rows;
        self.sweep_blocks()?;
        Ok(Reply::Purged { messages: deleted, more })
    }

    /// One bounded step over `entries`: rows whose messages are all gone are deleted; the last
    /// row of a stream is kept as an empty marker of its head instead.
    fn sweep_blocks(&mut self) -> Result<(), StoreError> {
        let first_live: i64 =
            self.conn.query_row("SELECT coalesce(min(id), ?1) FROM messages", [i64::MAX], |r| r.get(0))?;
        let (cs, cf) = self.sweep.unwrap_or((i64::MIN, i64::MIN));
        let rows: Vec<(i64, i64, Vec<u8>)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT stream, first_seq, data FROM entries WHERE (stream, first_seq) > (?1, ?2)
                 ORDER BY stream, first_seq LIMIT ?3",
            )?;
            let r = st
                .query_map(params![cs, cf, BLOCK_SWEEP_ROWS as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            r
        };
        self.sweep = if rows.len() < BLOCK_SWEEP_ROWS { None } else { rows.last().map(|(s, f, _)| (*s, *f)) };
        for (i, (stream, first, data)) in rows.iter().enumerate() {
            if data.is_empty() || decode_items(data).any(|it| it.id >= first_live) {
                continue;
            }
            let last_of_stream = match rows.get(i + 1) {
                Some((s, _, _)) => s != stream,
                None => self
                    .conn
                    .prepare_cached("SELECT 1 FROM entries WHERE stream=?1 AND first_seq>?2 LIMIT 1")?
                    .query_row([stream, first], |_| Ok(()))
                    .optional()?
                    .is_none(),
            };
            self.conn
                .prepare_cached("DELETE FROM entries WHERE stream=?1 AND first_seq=?2")?
                .execute([stream, first])?;
            if last_of_stream {
                let next = first + (data.len() / ENTRY_BYTES) as i64;
                self.conn
                    .prepare_cached("INSERT INTO entries(stream, first_seq, data) VALUES(?1, ?2, x'')")?
                    .execute([stream, &next])?;
            }
        }
        Ok(())
    }

    fn apply_op(&mut self, op: &Op) -> Result<Reply, StoreError> {
        match op {
            Op::Append(m) => self.append(m),
            Op::AppendGroup(m) => self.append_group(m),
            Op::ReadInbox { user, after_seq, limit } => self.read_inbox(user, *after_seq, *limit).map(Reply::Page),
            Op::ReadGroup { group, after_seq, limit } => self.read_group(group, *after_seq, *limit).map(Reply::Page),
            Op::Sync { user, inbox_after, groups, limit } => {
                self.sync(user, *inbox_after, groups, *limit).map(Reply::Synced)
            }
            Op::Heads { user } => self.heads(user).map(Reply::Heads),
            Op::History(q) => self.history(q).map(Reply::Page),
            Op::GroupHistory { group, before_seq, after_seq, limit } => {
                self.group_history(group, *before_seq, *after_seq, *limit).map(Reply::Page)
            }
            Op::SetDelivered { user, device, group, seq } => self.set_delivered(user, device, group.as_deref(), *seq),
            Op::GetDelivered { user, device } => self.get_delivered(user, device).map(Reply::Delivered),
            Op::SetRead { user, chat, seq, emit_event } => self.set_read(user, chat, *seq, *emit_event),
            Op::Unread { user } => self.unread(user).map(Reply::Unread),
            Op::OutboxAppend { events } => self.outbox_append(events),
            Op::OutboxFetch { after, limit } => self.outbox_fetch(*after, *limit).map(Reply::Events),
            Op::OutboxAck { through } => {
                let n = self.conn.prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?.execute([sq(*through)])?;
                Ok(Reply::Count(n as u64))
            }
            Op::OutboxStats => self.outbox_stats().map(Reply::OutboxStats),
            Op::CreateGroup { id, name, owner, members, created_ms, members_max, groups_per_user_max } => self
                .create_group(id.as_deref(), name, owner, members, *created_ms, (*members_max, *groups_per_user_max)),
            Op::GetGroup { group } => self.get_group(group).map(Reply::Group),
            Op::DissolveGroup { group } => self.dissolve_group(group),
            Op::AddMembers { group, users, members_max, groups_per_user_max } => {
                self.add_members(group, users, *members_max, *groups_per_user_max)
            }
            Op::RemoveMember { group, user } => self.remove_member(group, user),
            Op::ListMembers { group, cursor, limit } => self.list_members(group, cursor.as_deref(), *limit),
            Op::GroupsOf { user } => {
                let Some(uid) = self.uid_of(user)? else {
                    return Ok(Reply::Groups(Vec::new()));
                };
                let mut out = Vec::new();
                for gid in self.groups_of_uid(uid)? {
                    out.push(self.group_name_of(gid)?.to_string());
                }
                Ok(Reply::Groups(out))
            }
            Op::GroupReads { group, msg_id } => self.group_reads(group, *msg_id),
            Op::Purge { older_than_ms, max_rows } => self.purge(*older_than_ms, *max_rows),
            Op::RevokeTokens { user, device, before_ms } => self.revoke_tokens(user, device.as_deref(), *before_ms),
            Op::Revocations => self.revocations().map(Reply::Revocations),
        }
    }

    fn revoke_tokens(&mut self, user: &str, device: Option<&str>, before_ms: u64) -> Result<Reply, StoreError> {
        check_user("user", user)?;
        if let Some(d) = device {
            check_user("device", d)?;
        }
        let in_force: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO revoked(name, device, before_ms) VALUES(?1, ?2, ?3) \
                 ON CONFLICT(name, device) DO UPDATE SET before_ms = max(before_ms, excluded.before_ms) \
                 RETURNING before_ms",
            )?
            .query_row(rusqlite::params![user, device.unwrap_or(""), sq(before_ms)], |r| r.get(0))?;
        Ok(Reply::Count(in_force.max(0) as u64))
    }

    fn revocations(&mut self) -> Result<Vec<Revocation>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT name, device, before_ms FROM revoked")?;
        let rows = stmt.query_map([], |r| {
            let device: String = r.get(1)?;
            let before_ms: i64 = r.get(2)?;
            Ok(Revocation {
                user: r.get(0)?,
                device: (!device.is_empty()).then_some(device),
                before_ms: before_ms.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- transactions ---------------------------------------------------------------------

    fn undo_to(&mut self, mark: usize) {
        while self.undo.len() > mark {
            let Some(u) = self.undo.pop() else { break };
            match &u {
                Undo::User { name, uid } => {
                    self.users.remove(name);
                    self.names.remove(uid);
                    self.forget_stream(inbox_stream(*uid));
                }
                Undo::Group { name } => {
                    if let Some(g) = self.groups.remove(name) {
                        self.group_names.remove(&g);
                        self.forget_stream(group_stream(g));
                    }
                }
                Undo::Watermark(w) => self.w_durable = *w,
                _ => self.ix.undo_one(&u),
            }
        }
    }

    /// Drops the state of a stream whose owner was made in a rolled-back transaction (its
    /// pending lists were already cut back by the undo entries after it), with its place in the
    /// flush queue: the ops applied again make it and queue it anew, and a second queue entry
    /// would have one flush step write its positions twice (refused), failing every flush after.
    fn forget_stream(&mut self, stream: i64) {
        if let Some(st) = self.ix.streams.remove(&stream) {
            debug_assert!(st.pending.is_empty() && st.cids.is_empty(), "a new stream keeps positions after undo");
            if st.queued {
                self.ix.queue.retain(|&(s, _)| s != stream);
            }
        }
    }

    fn rollback(&mut self) {
        if let Err(e) = self.conn.execute_batch("ROLLBACK") {
            tracing::debug!(error = %e, "rollback");
        }
        self.undo_to(0);
    }

    /// Writes the streams that are due (oldest first) inside the open transaction; memory is
    /// updated by [`Self::apply_flush`] once the transaction commits.
    fn flush_step(&mut self, force: bool) -> Result<Option<FlushPlan>, StoreError> {
        let now = self.clock_ms;
        let age = self.opts.flush_age.as_millis() as u64;
        let over = self.ix.pending_total > self.opts.pending_entries_max;
        let mut plan = FlushPlan { streams: Vec::new(), new_watermark: self.ix.min_pending_id() };
        let step = if over { self.opts.flush_streams_max * 4 } else { self.opts.flush_streams_max };
        let mut taken: HashSet<i64, foldhash::fast::FixedState> = HashSet::default();
        for &(stream, since) in self.ix.queue.iter().take(step) {
            if !force && !over && now.saturating_sub(since) < age {
                break;
            }
            // A stream queued twice (never expected) is written once: its second entry only
            // leaves the queue, or its positions would be written twice and refused.
            let (n, c) = if taken.insert(stream) {
                self.ix.streams.get(&stream).map_or((0, 0), |s| (s.pending.len(), s.cids.len()))
            } else {
                (0, 0)
            };
            plan.streams.push((stream, n, c));
        }
        if plan.streams.is_empty() {
            return Ok(None);
        }
        if plan.new_watermark != self.w_durable {
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO meta(k, v) VALUES('watermark', ?1)")?
                .execute([plan.new_watermark])?;
        }
        let mut order: Vec<usize> = (0..plan.streams.len()).collect();
        order.sort_unstable_by_key(|&i| plan.streams[i].0);
        // One INSERT per ≤48 positions of a stream (a flush never rewrites an older row, so no
        // read-modify-write); cids of all streams go in multi-row INSERTs, sorted by sender.
        let mut buf = Vec::with_capacity(BLOCK_ENTRIES * ENTRY_BYTES);
        let mut cids: Vec<i64> = Vec::new();
        for i in order {
            let (stream, n, c) = plan.streams[i];
            let Some(st) = self.ix.streams.get(&stream) else {
                continue;
            };
            let mut next = st.flushed + 1;
            for chunk in st.pending[..n].chunks(BLOCK_ENTRIES) {
                buf.clear();
                encode_items(&mut buf, chunk);
                // The one row a flush may meet at its key is the empty marker a purge sweep
                // left at the head of a stream it emptied (`sweep_blocks`): it is replaced.
                // Any other row there would be a bug: refused, never overwritten.
                let written = self
                    .conn
                    .prepare_cached(
                        "INSERT INTO entries(stream, first_seq, data) VALUES(?1, ?2, ?3)
                         ON CONFLICT(stream, first_seq) DO UPDATE SET data = excluded.data
                         WHERE length(entries.data) = 0",
                    )?
                    .execute(params![stream, sq(next), buf])?;
                if written != 1 {
                    return Err(StoreError::Unavailable(format!(
                        "index: positions {next}.. of stream {stream} are already written"
                    )));
                }
                next += chunk.len() as u64;
            }
            let uid = stream / 2;
            for &(h, id) in &st.cids[..c] {
                cids.extend_from_slice(&[uid, h, id]);
            }
        }
        let rows = cids.len() / 3;
        let full = rows / CID_ROWS_PER_INSERT;
        if full > 0 {
            let sql = cid_insert_sql(CID_ROWS_PER_INSERT);
            let mut st = self.conn.prepare_cached(&sql)?;
            for chunk in cids.chunks_exact(CID_ROWS_PER_INSERT * 3) {
                st.execute(rusqlite::params_from_iter(chunk))?;
            }
        }
        let rest = &cids[full * CID_ROWS_PER_INSERT * 3..];
        if !rest.is_empty() {
            let mut st = self.conn.prepare_cached("INSERT OR IGNORE INTO cids(frm, h, id) VALUES(?1, ?2, ?3)")?;
            for r in rest.chunks_exact(3) {
                st.execute(rusqlite::params_from_iter(r))?;
            }
        }
        Ok(Some(plan))
    }

    fn apply_flush(&mut self, plan: FlushPlan) {
        self.w_durable = plan.new_watermark;
        for &(stream, n, c) in &plan.streams {
            let front = self.ix.queue.pop_front();
            debug_assert_eq!(front.map(|f| f.0), Some(stream));
            self.ix.mark_flushed(stream, n, c);
            if let Some(st) = self.ix.streams.get_mut(&stream) {
                st.queued = false;
                if !st.pending.is_empty() || !st.cids.is_empty() {
                    st.queued = true;
                    self.ix.queue.push_back((stream, self.clock_ms));
                }
            }
        }
        self.trim_caches();
    }

    fn trim_caches(&mut self) {
        let max = self.opts.cache_entries_max;
        if self.ix.streams.len() > max {
            self.ix.streams.retain(|_, s| !s.is_clean());
        }
        if self.users.len() > max {
            self.users.clear();
        }
        if self.names.len() > max {
            self.names.clear();
        }
        if self.groups.len() > max {
            self.groups.clear();
            self.group_names.clear();
        }
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    /// Runs the ops one transaction each (after a batch failed as a whole).
    fn apply_one_by_one(&mut self, ops: &[Op]) -> Vec<Result<Reply, StoreError>> {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                out.push(Err(e.into()));
                continue;
            }
            let r = self.apply_op(op);
            let r = match r {
                Ok(reply) => match self.commit() {
                    Ok(()) => {
                        self.undo.clear();
                        Ok(reply)
                    }
                    Err(e) => {
                        self.rollback();
                        Err(e)
                    }
                },
                Err(e) => {
                    self.rollback();
                    Err(e)
                }
            };
            out.push(r);
        }
        out
    }
}

/// A failed insert of a message row: an existing id is the caller's conflict, the rest is
/// the database's.
fn map_insert(r: rusqlite::Result<usize>) -> Result<(), StoreError> {
    match r {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
            Err(StoreError::Conflict("message id exists".into()))
        }
        Err(e) => Err(e.into()),
    }
}

impl StoreBackend for SqliteBackend {
    fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Reply, StoreError>> {
        self.now_ms = unix_ms();
        self.clock_ms = crate::backend::clock_ms();
        self.undo.clear();
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let e: StoreError = e.into();
            return ops.iter().map(|_| Err(e.clone())).collect();
        }
        let mut out = Vec::with_capacity(ops.len());
        let mut failed = false;
        for op in ops {
            let mark = self.undo.len();
            let r = self.apply_op(op);
            match &r {
                Err(e) if e.is_backend_failure() => {
                    failed = true;
                    break;
                }
                Err(_) => self.undo_to(mark),
                Ok(_) => {}
            }
            out.push(r);
        }
        let mut plan = None;
        if !failed {
            match self.flush_step(false) {
                Ok(p) => plan = p,
                Err(_) => failed = true,
            }
        }
        if !failed && self.commit().is_err() {
            failed = true;
        }
        if failed {
            self.rollback();
            return self.apply_one_by_one(ops);
        }
        self.undo.clear();
        if let Some(p) = plan {
            self.apply_flush(p);
        }
        out
    }

    fn maintain(&mut self, now_ms: u64) -> Result<bool, StoreError> {
        self.clock_ms = now_ms;
        let age = self.opts.flush_age.as_millis() as u64;
        let due = |ix: &Index, over: bool| {
            ix.queue.front().is_some_and(|&(_, since)| over || now_ms.saturating_sub(since) >= age)
        };
        if !due(&self.ix, self.ix.pending_total > self.opts.pending_entries_max) {
            return Ok(false);
        }
        self.undo.clear();
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let plan = match self.flush_step(false) {
            Ok(p) => p,
            Err(e) => {
                self.rollback();
                return Err(e);
            }
        };
        if let Err(e) = self.commit() {
            self.rollback();
            return Err(e);
        }
        if let Some(p) = plan {
            self.apply_flush(p);
        }
        Ok(due(&self.ix, self.ix.pending_total > self.opts.pending_entries_max))
    }

    fn stats(&self) -> BackendStats {
        BackendStats { pending_entries: self.ix.pending_total as u64, pending_streams: self.ix.queue.len() as u64 }
    }
}

impl SqliteBackend {
    /// Writes every pending stream now (tests, clean shutdown).
    pub fn flush_all(&mut self) -> Result<(), StoreError> {
        while !self.ix.queue.is_empty() {
            self.undo.clear();
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let plan = match self.flush_step(true) {
                Ok(p) => p,
                Err(e) => {
                    self.rollback();
                    return Err(e);
                }
            };
            if let Err(e) = self.commit() {
                self.rollback();
                return Err(e);
            }
            match plan {
                Some(p) => self.apply_flush(p),
                None => break,
            }
        }
        Ok(())
    }
}
