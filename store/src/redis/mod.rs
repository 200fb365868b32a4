//! `RedisBackend`: the cluster store. Several engine nodes share one Redis, each through its
//! own backend on its own storage thread. Owns one blocking `redis::Connection` (reopened after
//! a connection failure) and every key under its prefix ([`RedisOptions::prefix`]); must not
//! touch keys outside the prefix, and must only be used from the storage thread.
//!
//! # How ops run
//!
//! Every [`Op`] is one Lua function of `store.lua`, atomic in Redis. On Redis 7 the library is
//! loaded once as a function library (`FUNCTION LOAD`, called with `FCALL`); before 7, each op
//! is a script (the library followed by `return OPS.<op>()`) run with `EVALSHA`, which defines
//! the whole library again on every call (measured: ~45 µs a call). Either way:
//! sequence counters (`INCR`), the message hash, inbox and group-log positions, the cid map,
//! read and delivery positions, groups, the outbox and purge all change inside the one script.
//! A script checks everything before its first write and answers a refusal as a tagged reply
//! (`{'not_found', msg}`, …) that maps to the matching [`StoreError`]; nothing of a refused op
//! is written and the rest of its batch is unaffected. Input the SQLite backend refuses as
//! `Invalid` is refused here in Rust, before Redis is asked.
//!
//! A batch is one pipeline of calls, applied by Redis in submission order; a run of
//! consecutive `SetDelivered` ops (a shard saves its terminals' ack positions together every
//! tick) is one `set_delivered_many` call of at most `POSITIONS_PER_CALL_MAX` positions, and a
//! run of consecutive `Append` (or `AppendGroup`) ops one `append_many` (`append_group_many`)
//! call of at most `MESSAGES_PER_CALL_MAX` messages, each answered on its own (a refused one
//! writes nothing; the others are applied). Scripts are loaded (`SCRIPT LOAD`) on every (re)connect; an op
//! answered `NOSCRIPT` (the script cache was flushed) did not run and is run again once the
//! scripts are loaded (only a flush in the middle of a pipeline, with another client loading
//! the scripts at once, could let a later op of the batch run before it). A batch is not one
//! transaction:
//! ops are atomic one by one, which is what the [`StoreBackend`] contract needs (each op's
//! failure isolated, results in order). A connection failure answers
//! [`StoreError::Unavailable`] for every op of the pipeline it hit (some may have been
//! applied: Redis does not say) and the next batch reconnects. So does a `READONLY` answer
//! (the server was made a replica by a failover; no op runs there, reads included): the op
//! is `Unavailable` and the next batch connects again, to the new primary when the address
//! follows it.
//!
//! Message ids travel and are stored as 20-digit zero-padded decimal strings (so lexical
//! order is id order and no id is ever a Lua double); seqs and counters are integers, clamped
//! below 2^52 on the way in. Keys are computed inside the scripts from the prefix, so the
//! server must be a single Redis (or a primary with replicas), not a Redis Cluster.
//!
//! Semantics are the SQLite backend's ([`crate::sqlite`]), checked by the same
//! [`crate::conformance`] suite: paging, history order, `scanned_to`, scan bounds
//! ([`crate::sqlite::SCAN_ITEMS_MAX`] positions for filtered history, `unread` and `up_to`),
//! clamped positions that never move backwards, the `message.read` event's JSON.
//!
//! # Durability
//!
//! Durability is Redis's: a reply means the write is in Redis's memory. Run Redis with
//! `appendonly yes` and `appendfsync always` (every write on disk before the reply is sent)
//! or `everysec` (up to a second lost on a power failure), and with replicas for failover.
//! Its `maxmemory-policy` must not evict the store's keys (`noeviction`, or a `volatile-*`
//! policy: the store sets no TTL): with a `maxmemory` and an `allkeys-*` policy the backend
//! refuses to connect (`Unavailable`, checked at every connect), since a dropped seq counter
//! or cid map would give seqs again and store retries twice.
//! `maintain` has nothing to do; retention is the `Purge` op as with SQLite.
#[cfg(feature = "conformance")]
mod testing;

#[cfg(feature = "conformance")]
pub use testing::{Paused, TestRedis};

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ::redis::{Client, Connection, ConnectionLike, Pipeline, Script, Value};
use ether_proto::ids::{is_valid_id, Chat};
use ether_proto::Kind;

use crate::backend::StoreBackend;
use crate::op::*;
use crate::StoreError;

/// The Lua library every op's script is made from.
const LIB: &str = include_str!("store.lua");

/// Connecting gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A pipeline's replies must arrive within this long (a purge or a long unread scan included).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest seq, counter or limit handed to a script (exact in a Lua double).
const NUM_MAX: u64 = 1 << 52;
/// Most delivery positions in one `set_delivered_many` call (a run of consecutive
/// `SetDelivered` ops of a batch; a longer run takes several calls).
const POSITIONS_PER_CALL_MAX: usize = 256;
/// Most messages in one `append_many` or `append_group_many` call (a run of consecutive
/// `Append` or `AppendGroup` ops of a batch). Redis runs nothing else during a call: 128
/// appends hold it about 3 ms.
const MESSAGES_PER_CALL_MAX: usize = 128;

/// How the Redis store is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Every key starts with this (default `ether:`): several stores can share one server.
    pub prefix: String,
    /// Also append every outbox event, in the same script as the outbox write, to this Redis
    /// stream (the one key outside the prefix), entries `event_id`, `type`, `ts`, `data` (the
    /// event's fields as JSON), trimmed to about [`EVENTS_STREAM_LEN`] entries. `None`: no
    /// stream.
    pub events_stream: Option<String>,
    /// Keep outbox events for `OutboxFetch`/`OutboxAck` (true; a node that only feeds the
    /// events stream, with no webhook to deliver to, sets false so nothing piles up).
    pub outbox: bool,
}

/// Entries the events stream keeps (approximately: `XADD MAXLEN ~`).
pub const EVENTS_STREAM_LEN: u64 = 1_000_000;

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions { prefix: "ether:".into(), events_stream: None, outbox: true }
    }
}

/// The scripts, one per op, in the order of [`S::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum S {
    Append,
    AppendGroup,
    ReadInbox,
    ReadGroup,
    Sync,
    Heads,
    History,
    GroupHistory,
    SetDelivered,
    GetDelivered,
    SetRead,
    Unread,
    OutboxAppend,
    OutboxFetch,
    OutboxAck,
    OutboxStats,
    CreateGroup,
    GetGroup,
    DissolveGroup,
    AddMembers,
    RemoveMember,
    ListMembers,
    GroupsOf,
    GroupReads,
    Purge,
    /// Several `SetDelivered` ops of a batch in one call (see [`RedisBackend::apply_batch`]).
    SetDeliveredMany,
    /// Several `Append` ops of a batch in one call.
    AppendMany,
    /// Several `AppendGroup` ops of a batch in one call.
    AppendGroupMany,
    RevokeTokens,
    Revocations,
}

impl S {
    const ALL: [S; 30] = [
        S::Append,
        S::AppendGroup,
        S::ReadInbox,
        S::ReadGroup,
        S::Sync,
        S::Heads,
        S::History,
        S::GroupHistory,
        S::SetDelivered,
        S::GetDelivered,
        S::SetRead,
        S::Unread,
        S::OutboxAppend,
        S::OutboxFetch,
        S::OutboxAck,
        S::OutboxStats,
        S::CreateGroup,
        S::GetGroup,
        S::DissolveGroup,
        S::AddMembers,
        S::RemoveMember,
        S::ListMembers,
        S::GroupsOf,
        S::GroupReads,
        S::Purge,
        S::SetDeliveredMany,
        S::AppendMany,
        S::AppendGroupMany,
        S::RevokeTokens,
        S::Revocations,
    ];

    /// The function in `store.lua`.
    fn function(self) -> &'static str {
        match self {
            S::Append => "append",
            S::AppendGroup => "append_group",
            S::ReadInbox => "read_inbox",
            S::ReadGroup => "read_group",
            S::Sync => "sync",
            S::Heads => "heads",
            S::History => "history",
            S::GroupHistory => "group_history",
            S::SetDelivered => "set_delivered",
            S::GetDelivered => "get_delivered",
            S::SetRead => "set_read",
            S::Unread => "unread",
            S::OutboxAppend => "outbox_append",
            S::OutboxFetch => "outbox_fetch",
            S::OutboxAck => "outbox_ack",
            S::OutboxStats => "outbox_stats",
            S::CreateGroup => "create_group",
            S::GetGroup => "get_group",
            S::DissolveGroup => "dissolve_group",
            S::AddMembers => "add_members",
            S::RemoveMember => "remove_member",
            S::ListMembers => "list_members",
            S::GroupsOf => "groups_of",
            S::GroupReads => "group_reads",
            S::Purge => "purge",
            S::SetDeliveredMany => "set_delivered_many",
            S::AppendMany => "append_many",
            S::AppendGroupMany => "append_group_many",
            S::RevokeTokens => "revoke_tokens",
            S::Revocations => "revocations",
        }
    }

    /// The script that takes a run of consecutive calls of this one (their arguments after
    /// the prefix, one after the other; each answered on its own), and how many at most.
    fn many(self) -> Option<(S, usize)> {
        match self {
            S::SetDelivered => Some((S::SetDeliveredMany, POSITIONS_PER_CALL_MAX)),
            S::Append => Some((S::AppendMany, MESSAGES_PER_CALL_MAX)),
            S::AppendGroup => Some((S::AppendGroupMany, MESSAGES_PER_CALL_MAX)),
            _ => None,
        }
    }
}

/// One op ready to send: its script and its `ARGV` (the prefix first).
struct Call {
    script: S,
    args: Vec<Vec<u8>>,
}

impl Call {
    fn new(script: S, prefix: &str) -> Self {
        Call { script, args: vec![prefix.as_bytes().to_vec()] }
    }

    fn s(mut self, v: &str) -> Self {
        self.args.push(v.as_bytes().to_vec());
        self
    }

    fn n(mut self, v: u64) -> Self {
        self.args.push(v.min(NUM_MAX).to_string().into_bytes());
        self
    }

    fn flag(self, v: bool) -> Self {
        self.s(if v { "1" } else { "0" })
    }
}

/// A message id as scripts store it: 20 digits, zero-padded (lexical order = id order).
fn pid(id: u64) -> String {
    format!("{id:020}")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn page_limit(limit: usize) -> u64 {
    limit.clamp(1, PAGE_LIMIT_MAX) as u64
}

fn kind_of(s: &str) -> Kind {
    match s {
        "image" => Kind::Image,
        "file" => Kind::File,
        "voice" => Kind::Voice,
        "custom" => Kind::Custom,
        _ => Kind::Text,
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// The Redis store. See the module docs for the layout and the guarantees.
pub struct RedisBackend {
    client: Client,
    conn: Option<Connection>,
    prefix: String,
    events_stream: Option<String>,
    outbox: bool,
    /// Events the outbox keeps at most ([`RedisBackend::with_outbox_max`]).
    outbox_max: u64,
    /// The library as functions (used when the server has them: `functions`).
    library: FunctionLibrary,
    functions: bool,
    /// The library as one script per op (servers before Redis 7).
    scripts: Vec<OpScript>,
}

/// The whole library as one Redis 7 function library: loaded once per server, so a call runs
/// only its op (a script must first define every function of the library again, which was
/// most of a call's time). Names carry a hash of the code, so nodes of two versions in one
/// cluster each call their own.
struct FunctionLibrary {
    code: String,
    /// `e<hash>_`, the prefix of every function name.
    prefix: String,
}

impl FunctionLibrary {
    fn new() -> FunctionLibrary {
        // FNV-1a of the library text: stable across processes and builds of the same code.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in LIB.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let prefix = format!("e{h:016x}_");
        // The library reads its arguments from ARGV (as a script would) and its key prefix
        // from P: here both are the library's own locals, set by each function before its op
        // runs (Redis runs one call at a time). Functions may not set globals.
        // `redis.call` does not exist while a library loads: look it up at call time.
        let lib = LIB.replacen("local P = ARGV[1]", "local P = ''", 1).replacen(
            "local call = redis.call",
            "local function call(...)\n  return redis.call(...)\nend",
            1,
        );
        let mut code = format!("#!lua name=ether_store_{h:016x}\nlocal ARGV = {{}}\n{lib}\n");
        code.push_str("local function op(f)\n  return function(_, args)\n    ARGV = args\n    P = args[1]\n    return f()\n  end\nend\n");
        for s in S::ALL {
            code.push_str(&format!("redis.register_function('{prefix}{0}', op(OPS.{0}))\n", s.function()));
        }
        FunctionLibrary { code, prefix }
    }

    fn name(&self, s: S) -> String {
        format!("{}{}", self.prefix, s.function())
    }
}

/// One op's script and its source (for `SCRIPT LOAD`).
struct OpScript {
    code: String,
    script: Script,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").field("prefix", &self.prefix).field("connected", &self.conn.is_some()).finish()
    }
}

impl RedisBackend {
    /// Connects to `url` (`redis://host:port/db`) and loads the scripts. A malformed URL is
    /// `Invalid`; a server that cannot be reached is `Unavailable`.
    pub fn open(url: &str, opts: RedisOptions) -> Result<RedisBackend, StoreError> {
        let client = Client::open(url).map_err(|e| StoreError::Invalid(format!("redis url: {e}")))?;
        let scripts = S::ALL
            .iter()
            .map(|s| {
                let code = format!("{LIB}\nreturn OPS.{}()\n", s.function());
                OpScript { script: Script::new(&code), code }
            })
            .collect();
        let mut b = RedisBackend {
            client,
            conn: None,
            prefix: opts.prefix,
            events_stream: opts.events_stream,
            outbox: opts.outbox,
            outbox_max: OUTBOX_MAX_DEFAULT,
            library: FunctionLibrary::new(),
            functions: false,
            scripts,
        };
        b.connection()?;
        Ok(b)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Keeps at most `max` events in the outbox (`events.outbox_max`; default
    /// [`OUTBOX_MAX_DEFAULT`]): a write that goes past it deletes the oldest first and counts
    /// them (see [`OutboxStats`]). The outbox lives in the Redis that holds the messages, so
    /// an outbox nobody acks (the webhook down for days) must not fill its memory. Nodes
    /// sharing one Redis should agree on it; each enforces its own on its own writes.
    /// (Not a field of [`RedisOptions`], which callers build field by field.)
    pub fn with_outbox_max(mut self, max: u64) -> Self {
        self.outbox_max = max.clamp(1, NUM_MAX);
        self
    }

    fn script(&self, s: S) -> &Script {
        &self.scripts[s as usize].script
    }

    /// The open connection, or a new one with the library loaded: as a Redis 7 function
    /// library when the server has functions, else as one script per op.
    fn connection(&mut self) -> Result<&mut Connection, StoreError> {
        if self.conn.is_none() {
            let mut c = self.client.get_connection_with_timeout(CONNECT_TIMEOUT).map_err(unavailable)?;
            c.set_read_timeout(Some(IO_TIMEOUT)).map_err(unavailable)?;
            c.set_write_timeout(Some(IO_TIMEOUT)).map_err(unavailable)?;
            Self::check_eviction(&mut c)?;
            let loaded = Self::load_functions(&mut c, &self.library);
            if let Err(e) = &loaded {
                tracing::info!(error = %e, "redis: no function library (Redis before 7?): one script per op");
            }
            self.functions = loaded.is_ok();
            if !self.functions {
                Self::load_scripts(&mut c, &self.scripts)?;
            }
            self.conn = Some(c);
        }
        self.conn.as_mut().ok_or_else(|| unavailable("not connected"))
    }

    /// Refuses a server that may evict the store's keys: a `maxmemory` with an `allkeys-*`
    /// policy drops any key once memory is full, a seq counter or a cid map included (seqs
    /// given again, retries stored twice). The store's keys have no TTL, so `noeviction` and
    /// the `volatile-*` policies never drop them. A server that does not say (`CONFIG`
    /// renamed or refused, as some managed services do) is used as it is.
    fn check_eviction(c: &mut Connection) -> Result<(), StoreError> {
        let get = |c: &mut Connection, name: &str| -> Option<String> {
            let kv: Vec<String> = ::redis::cmd("CONFIG").arg("GET").arg(name).query(c).ok()?;
            kv.into_iter().nth(1)
        };
        let Some(policy) = get(c, "maxmemory-policy") else { return Ok(()) };
        if !policy.starts_with("allkeys-") {
            return Ok(());
        }
        if get(c, "maxmemory").is_some_and(|m| m != "0") {
            return Err(unavailable(format!(
                "maxmemory-policy {policy} would evict the store's keys: use noeviction (or a volatile-* policy)"
            )));
        }
        tracing::warn!(policy, "redis: no maxmemory now, but this policy would evict the store's keys once one is set");
        Ok(())
    }

    /// `FUNCTION LOAD REPLACE` of the library (fails on a server without functions).
    fn load_functions(c: &mut Connection, library: &FunctionLibrary) -> Result<(), StoreError> {
        let _: String = ::redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(library.code.as_str())
            .query(c)
            .map_err(unavailable)?;
        Ok(())
    }

    fn load_scripts(c: &mut Connection, scripts: &[OpScript]) -> Result<(), StoreError> {
        let mut p = Pipeline::with_capacity(scripts.len());
        for s in scripts {
            p.cmd("SCRIPT").arg("LOAD").arg(s.code.as_str());
        }
        let r: Vec<String> = p.query(c).map_err(unavailable)?;
        if r.iter().zip(scripts).any(|(h, s)| h != s.script.get_hash()) || r.len() != scripts.len() {
            return Err(unavailable("SCRIPT LOAD answered other hashes"));
        }
        Ok(())
    }

    /// Loads the library again (after `NOSCRIPT` or a flushed function), connecting first if
    /// needed.
    fn reload(&mut self) -> Result<(), StoreError> {
        match self.conn.as_mut() {
            Some(c) if self.functions => Self::load_functions(c, &self.library),
            Some(c) => Self::load_scripts(c, &self.scripts),
            None => self.connection().map(|_| ()),
        }
    }

    /// Sends the calls as one pipeline; one raw reply (or error) per call, in order.
    fn run(&mut self, calls: &[&Call]) -> Vec<Result<Value, StoreError>> {
        if calls.is_empty() {
            return Vec::new();
        }
        let mut out = self.send(calls);
        let retry: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                matches!(r, Ok(Value::ServerError(e)) if e.code() == "NOSCRIPT"
                || e.details().is_some_and(|d| d.starts_with("Function not found")))
            })
            .map(|(i, _)| i)
            .collect();
        if !retry.is_empty() {
            // The script cache was flushed: load the scripts and run those ops again, in order
            // (a NOSCRIPT op did not run).
            let loaded = self.reload();
            match loaded {
                Ok(()) => {
                    let again: Vec<&Call> = retry.iter().map(|&i| calls[i]).collect();
                    for (i, r) in retry.iter().zip(self.send(&again)) {
                        out[*i] = r;
                    }
                }
                Err(e) => {
                    for &i in &retry {
                        out[i] = Err(e.clone());
                    }
                }
            }
        }
        if out.iter().any(|r| matches!(r, Ok(Value::ServerError(e)) if e.code() == "READONLY")) {
            // A replica now (a failover demoted the server this connection reached): no op
            // can run here any more. The next batch connects again, and reaches the new
            // primary when the address follows it (DNS, a proxy, a managed endpoint).
            self.conn = None;
        }
        out.into_iter()
            .map(|r| match r {
                Ok(Value::ServerError(e)) => {
                    Err(unavailable(format!("{} {}", e.code(), e.details().unwrap_or_default())))
                }
                other => other,
            })
            .collect()
    }

    fn send(&mut self, calls: &[&Call]) -> Vec<Result<Value, StoreError>> {
        let mut p = Pipeline::with_capacity(calls.len());
        for c in calls {
            let mut cmd = if self.functions {
                let mut cmd = ::redis::cmd("FCALL");
                cmd.arg(self.library.name(c.script)).arg(0);
                cmd
            } else {
                let mut cmd = ::redis::cmd("EVALSHA");
                cmd.arg(self.script(c.script).get_hash()).arg(0);
                cmd
            };
            for a in &c.args {
                cmd.arg(a.as_slice());
            }
            p.add_command(cmd);
        }
        let packed = p.get_packed_pipeline();
        let conn = match self.connection() {
            Ok(c) => c,
            Err(e) => return calls.iter().map(|_| Err(e.clone())).collect(),
        };
        match conn.req_packed_commands(&packed, 0, calls.len()) {
            Ok(vals) if vals.len() == calls.len() => vals.into_iter().map(Ok).collect(),
            Ok(_) => {
                self.conn = None;
                calls.iter().map(|_| Err(unavailable("pipeline answered short"))).collect()
            }
            Err(e) => {
                self.conn = None;
                let e = unavailable(e);
                calls.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    // ---- ops to calls ---------------------------------------------------------------------

    fn prepare(&self, op: &Op, now_ms: u64) -> Result<Call, StoreError> {
        let p = self.prefix.as_str();
        Ok(match op {
            Op::Append(m) => {
                check_user("from", &m.from)?;
                check_user("to", &m.to)?;
                check_body(m.id, &m.body, &m.cid)?;
                Call::new(S::Append, p)
                    .s(&pid(m.id))
                    .s(&m.ts.to_string())
                    .s(&m.from)
                    .s(&m.to)
                    .s(m.kind.as_str())
                    .s(&m.body)
                    .s(m.cid.as_deref().unwrap_or(""))
            }
            Op::AppendGroup(m) => {
                check_user("from", &m.from)?;
                check_user("group", &m.group)?;
                check_body(m.id, &m.body, &m.cid)?;
                Call::new(S::AppendGroup, p)
                    .s(&pid(m.id))
                    .s(&m.ts.to_string())
                    .s(&m.from)
                    .s(&m.group)
                    .flag(m.system)
                    .s(m.kind.as_str())
                    .s(&m.body)
                    .s(m.cid.as_deref().unwrap_or(""))
            }
            Op::ReadInbox { user, after_seq, limit } => {
                Call::new(S::ReadInbox, p).s(user).n(*after_seq).n(page_limit(*limit))
            }
            Op::ReadGroup { group, after_seq, limit } => {
                Call::new(S::ReadGroup, p).s(group).n(*after_seq).n(page_limit(*limit))
            }
            Op::Sync { user, inbox_after, groups, limit } => {
                let mut c = Call::new(S::Sync, p).s(user).n(*inbox_after).n(page_limit(*limit));
                for (g, after) in groups {
                    c = c.s(g).n(*after);
                }
                c
            }
            Op::Heads { user } => Call::new(S::Heads, p).s(user),
            Op::History(q) => {
                let (kind, id) = match q.chat.as_deref().map(Chat::parse) {
                    None => ("", String::new()),
                    Some(None) => ("bad", String::new()),
                    Some(Some(Chat::User(u))) => ("u", u),
                    Some(Some(Chat::Group(g))) => ("g", g),
                };
                let asc = q.after_seq.is_some() && q.before_seq.is_none();
                Call::new(S::History, p)
                    .s(&q.user)
                    .s(kind)
                    .s(&id)
                    .n(q.after_seq.unwrap_or(0))
                    .n(q.before_seq.unwrap_or(u64::MAX))
                    .flag(asc)
                    .n(page_limit(q.limit))
            }
            Op::GroupHistory { group, before_seq, after_seq, limit } => {
                let asc = after_seq.is_some() && before_seq.is_none();
                Call::new(S::GroupHistory, p)
                    .s(group)
                    .n(after_seq.unwrap_or(0))
                    .n(before_seq.unwrap_or(u64::MAX))
                    .flag(asc)
                    .n(page_limit(*limit))
            }
            Op::SetDelivered { user, device, group, seq } => {
                check_user("user", user)?;
                check_user("device", device)?;
                if group.as_deref() == Some("") {
                    return Err(StoreError::NotFound);
                }
                Call::new(S::SetDelivered, p).s(user).s(device).s(group.as_deref().unwrap_or("")).n(*seq)
            }
            Op::GetDelivered { user, device } => Call::new(S::GetDelivered, p).s(user).s(device),
            Op::SetRead { user, chat, seq, emit_event } => {
                check_user("user", user)?;
                let (kind, id) = match Chat::parse(chat) {
                    Some(Chat::User(u)) => ("u", u),
                    Some(Chat::Group(g)) => ("g", g),
                    None => return Err(StoreError::Invalid("chat: expected u:<user> or g:<group>".into())),
                };
                Call::new(S::SetRead, p)
                    .s(user)
                    .s(kind)
                    .s(&id)
                    .n(*seq)
                    .flag(*emit_event)
                    .s(&now_ms.to_string())
                    .s(self.events_stream.as_deref().unwrap_or(""))
                    .n(EVENTS_STREAM_LEN)
                    .flag(self.outbox)
                    .n(self.outbox_max)
            }
            Op::Unread { user } => Call::new(S::Unread, p).s(user),
            Op::OutboxAppend { events } => {
                if events.is_empty() {
                    return Err(StoreError::Invalid("events: empty".into()));
                }
                let mut c = Call::new(S::OutboxAppend, p)
                    .s(self.events_stream.as_deref().unwrap_or(""))
                    .n(EVENTS_STREAM_LEN)
                    .flag(self.outbox)
                    .n(self.outbox_max);
                for e in events.iter() {
                    c = c.s(&e.ts.to_string()).s(&e.kind).s(&e.data);
                }
                c
            }
            Op::OutboxFetch { after, limit } => Call::new(S::OutboxFetch, p).n(*after).n(page_limit(*limit)),
            Op::OutboxAck { through } => Call::new(S::OutboxAck, p).n(*through),
            Op::OutboxStats => Call::new(S::OutboxStats, p),
            Op::CreateGroup { id, name, owner, members, created_ms, members_max, groups_per_user_max } => {
                check_user("owner", owner)?;
                for (i, m) in members.iter().enumerate() {
                    check_user(&format!("members[{i}]"), m)?;
                }
                let mut all: Vec<&str> = vec![owner];
                let mut seen: HashSet<&str> = HashSet::from([owner.as_str()]);
                for m in members {
                    if seen.insert(m) {
                        all.push(m);
                    }
                }
                if all.len() > *members_max {
                    return Err(StoreError::LimitExceeded(format!("members: at most {members_max}")));
                }
                if let Some(g) = id {
                    check_user("id", g)?;
                }
                let mut c = Call::new(S::CreateGroup, p).s(id.as_deref().unwrap_or(""));
                for _ in 0..4 {
                    c = c.s(&format!("g{:016x}", rand::random::<u64>()));
                }
                c = c.s(name).s(owner).s(&created_ms.to_string()).n(*groups_per_user_max as u64);
                for m in all {
                    c = c.s(m);
                }
                c
            }
            Op::GetGroup { group } => Call::new(S::GetGroup, p).s(group),
            Op::DissolveGroup { group } => Call::new(S::DissolveGroup, p).s(group),
            Op::AddMembers { group, users, members_max, groups_per_user_max } => {
                for (i, m) in users.iter().enumerate() {
                    check_user(&format!("members[{i}]"), m)?;
                }
                let mut c = Call::new(S::AddMembers, p).s(group).n(*members_max as u64).n(*groups_per_user_max as u64);
                let mut seen = HashSet::new();
                for u in users {
                    if seen.insert(u.as_str()) {
                        c = c.s(u);
                    }
                }
                c
            }
            Op::RemoveMember { group, user } => Call::new(S::RemoveMember, p).s(group).s(user),
            Op::ListMembers { group, cursor, limit } => {
                let cursor = cursor.as_deref().unwrap_or("");
                if !cursor.is_empty() && !is_valid_id(cursor) {
                    return Err(StoreError::Invalid("cursor: not a cursor from this store".into()));
                }
                Call::new(S::ListMembers, p).s(group).s(cursor).n(page_limit(*limit))
            }
            Op::GroupsOf { user } => Call::new(S::GroupsOf, p).s(user),
            Op::GroupReads { group, msg_id } => Call::new(S::GroupReads, p).s(group).s(&pid(*msg_id)),
            Op::Purge { older_than_ms, max_rows } => {
                Call::new(S::Purge, p).n(*older_than_ms).n((*max_rows).max(1) as u64)
            }
            Op::RevokeTokens { user, device, before_ms } => {
                check_user("user", user)?;
                if let Some(d) = device {
                    check_user("device", d)?;
                }
                // As text (a Lua number is a double), clamped as SQLite stores it.
                let before_ms = (*before_ms).min(i64::MAX as u64).to_string();
                Call::new(S::RevokeTokens, p).s(user).s(device.as_deref().unwrap_or("")).s(&before_ms)
            }
            Op::Revocations => Call::new(S::Revocations, p),
        })
    }
}

// ---- replies --------------------------------------------------------------------------------

fn bad(what: &str) -> StoreError {
    unavailable(format!("unexpected script reply: {what}"))
}

fn items(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(bad(&format!("{other:?} is not an array"))),
    }
}

fn text(v: Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).map_err(|_| bad("not UTF-8")),
        Value::SimpleString(s) => Ok(s),
        Value::Int(i) => Ok(i.to_string()),
        Value::Okay => Ok("OK".into()),
        other => Err(bad(&format!("{other:?} is not a string"))),
    }
}

/// A non-negative integer, sent as a Lua number or as a decimal string (ids, ts).
fn int(v: &Value) -> Result<u64, StoreError> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| bad("negative number")),
        Value::BulkString(b) => {
            std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("not a number"))
        }
        other => Err(bad(&format!("{other:?} is not a number"))),
    }
}

/// `-1` (or nothing) is `None`.
fn opt_int(v: &Value) -> Result<Option<u64>, StoreError> {
    match v {
        Value::Int(i) if *i < 0 => Ok(None),
        Value::Nil => Ok(None),
        Value::BulkString(b) if b.is_empty() => Ok(None),
        v => int(v).map(Some),
    }
}

/// A script's reply: its fields after `ok`, or the refusal it names.
fn outcome(v: Value) -> Result<std::vec::IntoIter<Value>, StoreError> {
    let mut it = items(v)?.into_iter();
    let tag = text(it.next().ok_or_else(|| bad("empty"))?)?;
    if tag == "ok" {
        return Ok(it);
    }
    let msg = it.next().map(text).transpose()?.unwrap_or_default();
    Err(match tag.as_str() {
        "not_found" => StoreError::NotFound,
        "forbidden" => StoreError::Forbidden(msg),
        "conflict" => StoreError::Conflict(msg),
        "limit" => StoreError::LimitExceeded(msg),
        "invalid" => StoreError::Invalid(msg),
        other => bad(&format!("tag {other}")),
    })
}

/// The next field of a reply.
fn next(it: &mut std::vec::IntoIter<Value>) -> Result<Value, StoreError> {
    it.next().ok_or_else(|| bad("too few fields"))
}

fn entry(v: Value) -> Result<Entry, StoreError> {
    let mut f = items(v)?.into_iter();
    let seq = int(&next(&mut f)?)?;
    let chat = text(next(&mut f)?)?;
    let id = int(&next(&mut f)?)?;
    let ts = int(&next(&mut f)?)?;
    let from = text(next(&mut f)?)?;
    let kind = kind_of(&text(next(&mut f)?)?);
    let body = text(next(&mut f)?)?;
    let cid = text(next(&mut f)?)?;
    Ok(Entry { seq, chat, id, ts, from, kind, body, cid: (!cid.is_empty()).then_some(cid) })
}

fn entries(v: Value) -> Result<Vec<Entry>, StoreError> {
    items(v)?.into_iter().map(entry).collect()
}

/// `{head, more, scanned_to, entries}`.
fn page(v: Value) -> Result<Page, StoreError> {
    let mut f = items(v)?.into_iter();
    let head = int(&next(&mut f)?)?;
    let more = int(&next(&mut f)?)? != 0;
    let scanned_to = int(&next(&mut f)?)?;
    let entries = entries(next(&mut f)?)?;
    Ok(Page { entries, head, more, scanned_to })
}

/// A page read after a position past [`NUM_MAX`] (anything up to `u64::MAX` comes from the API
/// and terminals), which the script saw clamped to it: its `scanned_to` is put back in terms
/// of the position asked, clamped as the SQLite backend clamps (`i64::MAX`, past every seq),
/// so a reader is never sent back below where it asked to start. Nothing is stored past
/// `NUM_MAX`: a `scanned_to` there came from the clamped position (`lo`, or `lo + 1` when
/// reading newest first).
fn unclamped(mut p: Page, after: Option<u64>) -> Page {
    let Some(after) = after.filter(|&a| a > NUM_MAX) else { return p };
    let asked = after.min(i64::MAX as u64);
    if p.scanned_to == NUM_MAX {
        p.scanned_to = asked;
    } else if p.scanned_to == NUM_MAX + 1 {
        p.scanned_to = asked + 1;
    }
    p
}

/// `{inbox_seq, name, head, name, head, …}`.
fn heads(v: Value) -> Result<Heads, StoreError> {
    let mut f = items(v)?.into_iter();
    let inbox_seq = int(&next(&mut f)?)?;
    let mut groups = BTreeMap::new();
    while let Some(name) = f.next() {
        groups.insert(text(name)?, int(&next(&mut f)?)?);
    }
    Ok(Heads { inbox_seq, groups })
}

fn decode(op: &Op, v: Value) -> Result<Reply, StoreError> {
    let mut f = outcome(v)?;
    let f = &mut f;
    Ok(match op {
        Op::Append(_) => {
            let id = int(&next(f)?)?;
            let ts = int(&next(f)?)?;
            let receiver_seq = int(&next(f)?)?;
            let sender_seq = opt_int(&next(f)?)?;
            let duplicate = int(&next(f)?)? != 0;
            Reply::Appended(Appended { id, ts, receiver_seq, sender_seq, duplicate })
        }
        Op::AppendGroup(_) => {
            let id = int(&next(f)?)?;
            let ts = int(&next(f)?)?;
            let seq = int(&next(f)?)?;
            let duplicate = int(&next(f)?)? != 0;
            Reply::GroupAppended(GroupAppended { id, ts, seq, duplicate })
        }
        Op::ReadInbox { after_seq, .. } | Op::ReadGroup { after_seq, .. } => {
            Reply::Page(unclamped(page(next(f)?)?, Some(*after_seq)))
        }
        Op::History(HistoryQuery { after_seq, .. }) | Op::GroupHistory { after_seq, .. } => {
            Reply::Page(unclamped(page(next(f)?)?, *after_seq))
        }
        Op::Sync { .. } => {
            let heads = heads(next(f)?)?;
            let more = int(&next(f)?)? != 0;
            let entries = entries(next(f)?)?;
            Reply::Synced(Synced { entries, heads, more })
        }
        Op::Heads { .. } => Reply::Heads(heads(next(f)?)?),
        Op::SetDelivered { .. } => {
            let prev = int(&next(f)?)?;
            let seq = int(&next(f)?)?;
            Reply::Position { prev, seq }
        }
        Op::GetDelivered { .. } => Reply::Delivered(heads(next(f)?)?),
        Op::SetRead { chat, .. } => {
            let prev = int(&next(f)?)?;
            let seq = int(&next(f)?)?;
            let up_to = opt_int(&next(f)?)?;
            let moved = int(&next(f)?)? != 0;
            Reply::Read(ReadMoved { chat: chat.clone(), prev, seq, up_to, moved })
        }
        Op::Unread { .. } => {
            let mut out = BTreeMap::new();
            let mut kv = items(next(f)?)?.into_iter();
            while let Some(chat) = kv.next() {
                out.insert(text(chat)?, int(&next(&mut kv)?)?);
            }
            Reply::Unread(out)
        }
        Op::OutboxAppend { .. } => {
            let first = int(&next(f)?)?;
            let last = int(&next(f)?)?;
            Reply::OutboxAppended { first, last }
        }
        Op::OutboxFetch { .. } => {
            let mut out = Vec::new();
            for e in items(next(f)?)? {
                let mut e = items(e)?.into_iter();
                let seq = int(&next(&mut e)?)?;
                let ts = int(&next(&mut e)?)?;
                let kind = text(next(&mut e)?)?;
                let data = text(next(&mut e)?)?;
                out.push(Event { seq, ts, kind, data });
            }
            Reply::Events(out)
        }
        Op::OutboxAck { .. } | Op::AddMembers { .. } | Op::RemoveMember { .. } => Reply::Count(int(&next(f)?)?),
        Op::OutboxStats => {
            let events = int(&next(f)?)?;
            let dropped = int(&next(f)?)?;
            Reply::OutboxStats(OutboxStats { events, dropped })
        }
        Op::CreateGroup { .. } => Reply::GroupCreated { id: text(next(f)?)? },
        Op::GetGroup { group } => {
            let name = text(next(f)?)?;
            let owner = text(next(f)?)?;
            let created_ms = int(&next(f)?)?;
            let member_count = int(&next(f)?)?;
            let seq = int(&next(f)?)?;
            Reply::Group(GroupInfo { id: group.clone(), name, owner, created_ms, member_count, seq })
        }
        Op::DissolveGroup { .. } => Reply::Done,
        Op::ListMembers { .. } => {
            let members = items(next(f)?)?.into_iter().map(text).collect::<Result<Vec<_>, _>>()?;
            let cursor = text(next(f)?)?;
            Reply::Members { members, next_cursor: (!cursor.is_empty()).then_some(cursor) }
        }
        Op::GroupsOf { .. } => Reply::Groups(items(next(f)?)?.into_iter().map(text).collect::<Result<_, _>>()?),
        Op::GroupReads { .. } => {
            let read = int(&next(f)?)?;
            let members = int(&next(f)?)?;
            Reply::Reads { read, members }
        }
        Op::Purge { .. } => {
            let messages = int(&next(f)?)?;
            let more = int(&next(f)?)? != 0;
            Reply::Purged { messages, more }
        }
        Op::RevokeTokens { .. } => Reply::Count(int(&next(f)?)?),
        Op::Revocations => {
            let mut out = Vec::new();
            let mut kv = items(next(f)?)?.into_iter();
            while let Some(field) = kv.next() {
                let field = text(field)?;
                let before_ms = text(next(&mut kv)?)?.parse().map_err(|_| bad("revocation time"))?;
                let (user, device) = field.split_once('|').ok_or_else(|| bad("revocation field"))?;
                out.push(Revocation {
                    user: user.to_owned(),
                    device: (!device.is_empty()).then(|| device.to_owned()),
                    before_ms,
                });
            }
            Reply::Revocations(out)
        }
    })
}

impl StoreBackend for RedisBackend {
    /// One pipeline for the batch, one call per op, except that a run of consecutive
    /// `SetDelivered` ops (a shard's ack positions, saved together every tick), `Append` ops
    /// or `AppendGroup` ops goes as one call of its `*_many` script ([`S::many`]): order is
    /// kept, each op is answered on its own.
    fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Reply, StoreError>> {
        let now = unix_ms();
        let mut out: Vec<Option<Result<Reply, StoreError>>> = Vec::with_capacity(ops.len());
        // Each call with the ops it answers, in op order.
        let mut calls: Vec<(Vec<usize>, Call)> = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match self.prepare(op, now) {
                Ok(c) => {
                    out.push(None);
                    if let (Some((answers, last)), Some((many, max))) = (calls.last_mut(), c.script.many()) {
                        let run = (last.script == c.script || last.script == many)
                            && answers.last() == Some(&(i - 1))
                            && answers.len() < max;
                        if run {
                            // The prefix is the first argument of both.
                            last.script = many;
                            last.args.extend(c.args.into_iter().skip(1));
                            answers.push(i);
                            continue;
                        }
                    }
                    calls.push((vec![i], c));
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let refs: Vec<&Call> = calls.iter().map(|(_, c)| c).collect();
        let replies = self.run(&refs);
        for ((answers, call), r) in calls.iter().zip(replies) {
            if !matches!(call.script, S::SetDeliveredMany | S::AppendMany | S::AppendGroupMany) {
                let i = answers[0];
                out[i] = Some(r.and_then(|v| decode(&ops[i], v)));
                continue;
            }
            match r.and_then(outcome) {
                Ok(mut each) => {
                    for &i in answers {
                        out[i] = Some(next(&mut each).and_then(|v| decode(&ops[i], v)));
                    }
                }
                Err(e) => {
                    for &i in answers {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter().map(|r| r.unwrap_or_else(|| Err(unavailable("no reply")))).collect()
    }

    fn maintain(&mut self, _now_ms: u64) -> Result<bool, StoreError> {
        Ok(false)
    }
}
