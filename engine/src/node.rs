//! `Node`: starts and stops a whole node. Binds the listeners (one SO_REUSEPORT socket per
//! shard on the client and api ports), builds the mesh, starts one pinned glommio executor
//! per shard, writes `<data>/ports.json`. Owns threads and sockets until they are handed to
//! the shards; holds no shard state.
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ether_http::request::Limits;
use ether_http::server::Stop;
use glommio::net::TcpListener;
use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{error, info, warn};

use crate::auth::TokenKeys;
use crate::config::Config;
use crate::events::{DispatchGate, DispatchOptions, EventDispatcher};
use crate::mesh::{MeshEnds, MeshPlan};
use crate::outbox_lease::OutboxLease;
use crate::secrets::PortsFile;
use crate::shard::Shard;
use crate::stats::NodeShared;
use crate::storage::CommitQueues;
use ether_store::{Op, Reply, StoreHandle};

/// Listen backlog of every listener (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: i32 = 4096;
/// How long past `limits.drain_window_ms` a signalled node waits for its drain before
/// stopping anyway (the last closes written, reconnects jittered up to the window's end).
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long a signalled node waits for its drain: the configured window and a grace.
pub fn drain_timeout(config: &Config) -> Duration {
    config.limits.drain_window + DRAIN_GRACE
}
/// How long a stopping shard waits for its terminals to get their close frames.
const STOP_GOODBYE_MAX: Duration = Duration::from_secs(3);
/// Idle keep-alive connections on the api port are closed after this long.
const API_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a shard's task queue runs before the scheduler looks at the others while no
/// latency-sensitive queue has work (glommio's preemption timer; its default). 10 ms made the
/// group-publish answers no faster than the API queue alone did (see `API_QUEUE_LATENCY`) and
/// `chat` looked ~5% slower (2 A/B pairs, within noise). `ETHER_TIME_SLICE_MS` overrides it.
const TIME_SLICE: Duration = Duration::from_millis(100);
/// The API's task queue is latency-sensitive: while it has work, no other queue of the shard
/// runs longer than this before the API's tasks get the core. In the default queue, with the
/// commit loop, an API answer woken by the storage thread waited behind a whole group fan-out
/// (5,000 socket writes per shard, up to the 100 ms slice and over): group publish to a
/// 10,000-member group every 200 ms, answer p90 61-98 ms -> 14-18 ms, mean 19-26 -> 9 ms;
/// answers over 25 ms in the node 22 of 75 -> 1-2 of 75 (the first message's). The latency
/// requirement is what does it: a queue of its own without one left p90 at 80-114 ms, 20 ms
/// gave 27-28 ms. Its cost: while API work is pending every queue's slice is this short; hot
/// group fan-out (API always busy), 3 interleaved pairs: 581k/899k/758k deliveries/s with
/// 5 ms, 721k/807k/718k without, server CPU per delivery alike (0.80-1.17 vs 0.82-0.96 µs):
/// no cost above the noise, and publish answers p50 34-53 ms vs 355-363 ms without.
/// `ETHER_API_QUEUE_LATENCY_MS` overrides it.
const API_QUEUE_LATENCY: Duration = Duration::from_millis(5);
/// Scheduler shares of the API queue: the default queue's (1000), as the terminal queue's.
const API_QUEUE_SHARES: usize = 1000;
/// Connections the admin port (and its TLS twin) serves at once.
const ADMIN_CONNECTIONS_MAX: usize = 256;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(
        "cannot listen on {addr} ({what}): the port is taken (another ether node, or another listener of this one)"
    )]
    PortTaken { what: &'static str, addr: SocketAddr },
    #[error("data directory {path} is in use by another ether node{holder}: one node per data directory")]
    DataDirInUse { path: String, holder: String },
    #[error("cannot lock data directory {path}: {source}")]
    DataDirLock { path: String, source: std::io::Error },
    #[error("cannot start shard {shard}: {source}")]
    Executor { shard: usize, source: glommio::GlommioError<()> },
    #[error("cannot open the store in {path}: {source}")]
    Store { path: String, source: ether_store::StoreError },
    #[error("cannot deliver events to {url}: {source}")]
    Events { url: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Ports { path: String, source: std::io::Error },
    #[error("cannot join the cluster at {url}: {source}")]
    Cluster { url: String, source: crate::cluster::ClusterError },
    #[error("cannot serve TLS on listen.client_tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The addresses a node actually listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundPorts {
    pub client: SocketAddr,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// The `wss://` listener, when `listen.client_tls` is set.
    pub client_tls: Option<SocketAddr>,
    /// The `https://` API listener, when `listen.api_tls` is set.
    pub api_tls: Option<SocketAddr>,
    /// The `https://` admin listener, when `listen.admin_tls` is set.
    pub admin_tls: Option<SocketAddr>,
}

/// A running node. Dropping it stops the node.
pub struct NodeHandle {
    pub ports: BoundPorts,
    pub shared: Arc<NodeShared>,
    /// The storage thread, stopped after the shards.
    pub store: StoreHandle,
    /// Delivers the event outbox to the webhook, when one is configured.
    pub events: Option<EventDispatcher>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    /// Dropping it stops the TLS certificate reloader.
    _tls_reload_stop: Option<std::sync::mpsc::Sender<()>>,
    /// Held while the node runs (released when the handle, or the process, goes).
    _data_dir_lock: DataDirLock,
}

/// `<data dir>/ether.lock`, locked (`flock`, exclusive) for as long as a node uses the
/// directory: a second node on the same directory (an overlapping restart, a typo) would share
/// the SQLite file with its own in-memory sequence heads and id generator and deliver the same
/// outbox, so it is refused at start. The lock holds the holder's pid, for the message.
struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    fn take(dir: &std::path::Path) -> Result<DataDirLock, NodeError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = dir.join("ether.lock");
        let shown = path.display().to_string();
        let err = |source| NodeError::DataDirLock { path: shown.clone(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err(e));
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let holder = if pid.is_empty() { String::new() } else { format!(" (pid {pid})") };
            return Err(NodeError::DataDirInUse { path: dir.display().to_string(), holder });
        }
        file.set_len(0).map_err(err)?;
        file.rewind().map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        Ok(DataDirLock { _file: file })
    }
}

impl NodeHandle {
    /// Asks every shard to stop (terminals get a close frame) and waits for them.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    /// Waits until the node stops (its stop flag set elsewhere, e.g. through `shared`).
    pub fn join(mut self) {
        self.wind_down();
    }

    fn stop_inner(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wind_down();
    }

    /// Joins the shards, then stops the event dispatcher and the storage thread, in that
    /// order: everything the shards submitted is committed before the store ends.
    fn wind_down(&mut self) {
        for t in self.threads.drain(..) {
            if let Err(e) = t.join() {
                error!(error = %e, "shard thread ended badly");
            }
        }
        if let Some(events) = self.events.take() {
            events.stop();
        }
        if let Some(cluster) = self.shared.cluster() {
            cluster.stop();
        }
        self.store.shutdown();
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn bind_one(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// Whether another socket listens on `addr` already: SO_REUSEPORT would let this node's
/// listeners join it (any process of the same user may), and the kernel would split the
/// connections between the two, so the port is tried without it first (with SO_REUSEADDR, so a
/// restart's TIME_WAIT connections do not count).
fn port_taken(addr: SocketAddr) -> bool {
    let Ok(probe) = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) else { return false };
    if probe.set_reuse_address(true).is_err() {
        return false;
    }
    matches!(probe.bind(&addr.into()), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

/// `count` listeners sharing one port through SO_REUSEPORT (port 0 picks one free port for all).
/// A port some other socket listens on already is refused ([`NodeError::PortTaken`]).
fn bind_group(what: &'static str, addr: SocketAddr, count: usize) -> Result<(SocketAddr, Vec<OwnedFd>), NodeError> {
    let err = |source| NodeError::Bind { what, addr, source };
    if addr.port() != 0 && port_taken(addr) {
        return Err(NodeError::PortTaken { what, addr });
    }
    let first = bind_one(addr).map_err(err)?;
    let bound =
        first.local_addr().map_err(err)?.as_socket().ok_or_else(|| err(std::io::Error::other("not an inet socket")))?;
    let mut fds = vec![OwnedFd::from(first)];
    for _ in 1..count {
        fds.push(OwnedFd::from(bind_one(bound).map_err(err)?));
    }
    Ok((bound, fds))
}

/// Everything one shard's thread starts with.
struct ShardStart {
    id: usize,
    config: Arc<Config>,
    keys: Arc<TokenKeys>,
    shared: Arc<NodeShared>,
    ends: MeshEnds,
    store: StoreHandle,
    commits: Arc<CommitQueues>,
    client: OwnedFd,
    api: OwnedFd,
    admin: Option<OwnedFd>,
    /// This shard's `wss://` listener and the TLS configuration, when there is one.
    client_tls: Option<(OwnedFd, Arc<rustls::ServerConfig>)>,
    /// This shard's `https://` API listener and the TLS configuration, when there is one.
    api_tls: Option<(OwnedFd, Arc<rustls::ServerConfig>)>,
    /// The `https://` admin listener (shard 0 only) and the TLS configuration.
    admin_tls: Option<(OwnedFd, Arc<rustls::ServerConfig>)>,
}

/// Starts a node: listeners, mesh, shards. Returns once every listener is bound and
/// `ports.json` is written.
pub fn start(config: Config) -> Result<NodeHandle, NodeError> {
    let config = Arc::new(config);
    // Before any thread of the node exists: they inherit it.
    if let Err(e) = crate::sched::request_slice(config.node.sched_slice) {
        tracing::debug!(error = %e, "node.sched_slice_us not applied (kernel default slice)");
    }
    let shards = config.node.shards;
    let data_dir_lock = DataDirLock::take(&config.node.data_dir)?;
    let (client, mut client_fds) = bind_group("client", config.listen.client, shards)?;
    let (api, mut api_fds) = bind_group("api", config.listen.api, shards)?;
    let (admin, mut admin_fds) = bind_group("admin", config.listen.admin, 1)?;
    // The TLS listener: its certificate is read before anything binds it.
    let mut tls_reload_stop = None;
    let tls_config = match &config.tls {
        Some(tls) => {
            let certs = crate::tls::CertStore::load(tls)?;
            let server_config = crate::tls::server_config(certs.clone())?;
            if !tls.reload_check.is_zero() {
                let (stop, stopped) = std::sync::mpsc::channel();
                certs.spawn_reloader(tls.reload_check, stopped)?;
                tls_reload_stop = Some(stop);
            }
            Some(server_config)
        }
        None => None,
    };
    let tls_group = |what, addr: Option<SocketAddr>, n| match addr {
        Some(addr) if tls_config.is_some() => bind_group(what, addr, n).map(|(bound, fds)| (Some(bound), fds)),
        _ => Ok((None, Vec::new())),
    };
    let (client_tls, mut client_tls_fds) = tls_group("client_tls", config.listen.client_tls, shards)?;
    let (api_tls, mut api_tls_fds) = tls_group("api_tls", config.listen.api_tls, shards)?;
    let (admin_tls, mut admin_tls_fds) = tls_group("admin_tls", config.listen.admin_tls, 1)?;
    let ports = BoundPorts { client, api, admin, client_tls, api_tls, admin_tls };
    PortsFile { client, api, admin, client_tls, api_tls, admin_tls }.write(&config.node.data_dir).map_err(|e| {
        NodeError::Ports {
            path: config.node.data_dir.join("ports.json").display().to_string(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    info!(client = %client, api = %api, admin = %admin, client_tls = ?client_tls, api_tls = ?api_tls, admin_tls = ?admin_tls, shards, "listening");

    let store_path = match &config.cluster.redis_url {
        Some(url) => crate::config::redact_userinfo(url),
        None => config.node.data_dir.display().to_string(),
    };
    let store_error = |source| NodeError::Store { path: store_path.clone(), source };
    let store = crate::storage::open(&config).map_err(store_error)?;
    let commits = CommitQueues::new(shards);
    // Cluster: set once this node joined (its id checked as its own), the outbox lease is
    // asked for only then (`OutboxLease::joined`).
    let mut lease_joined = None;
    let events = match &config.events.webhook {
        Some(webhook) => {
            let events_error = |source| NodeError::Events { url: webhook.url.clone(), source };
            // Cluster: the outbox is shared; one node at a time delivers it.
            let gate = match &config.cluster.redis_url {
                Some(url) => {
                    let lease = OutboxLease::new(url, &config.node.id)
                        .map_err(|e| events_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
                    lease_joined = Some(lease.joined());
                    Some(Box::new(lease) as Box<dyn DispatchGate>)
                }
                None => None,
            };
            Some(
                EventDispatcher::spawn(store.clone(), webhook, DispatchOptions::default(), gate)
                    .map_err(events_error)?,
            )
        }
        None => None,
    };
    let keys = Arc::new(TokenKeys::new(&config.auth.jwt_secret));
    let mut shared = NodeShared::new(config.node.id.clone(), shards);
    shared.events = events.as_ref().map(|e| (e.url().to_owned(), e.stats()));
    let shared = Arc::new(shared);
    if let Some(url) = &config.cluster.redis_url {
        let addrs = crate::cluster::Addresses { client, api, admin };
        let a = &config.auth;
        let digest = crate::cluster::secrets_digest(a.jwt_secret.expose(), a.api_key.expose(), a.admin_token.expose());
        let weak = Arc::downgrade(&shared);
        let terminals: crate::cluster::TerminalCount = Arc::new(move || {
            weak.upgrade().map_or(0, |s| s.shards.iter().map(|c| c.connections.load(Ordering::Relaxed)).sum())
        });
        let joining = crate::cluster::Joining {
            node_id: &config.node.id,
            addrs: &addrs,
            secrets_digest: &digest,
            webhook_url: config.events.webhook.as_ref().map(|w| w.url.as_str()),
            terminals,
            revocations: shared.revocations.clone(),
        };
        let cluster = crate::cluster::Cluster::start(url, joining, commits.clone(), shards)
            .map_err(|source| NodeError::Cluster { url: crate::config::redact_userinfo(url), source })?;
        let _ = shared.cluster.set(cluster);
    }
    // Revoked tokens are known before the first upgrade (the shards start below): a node that
    // could not read them would take back terminals the business shut out. In cluster mode
    // they are read only once the bus reader's start is taken (`Cluster::start`): a revocation
    // stored after this read is announced on the bus after that start, so the reader notes
    // it; one stored before is in the read. Read before the start, one stored and announced
    // in between was in neither until a resync.
    match store.call_blocking(Op::Revocations).and_then(Reply::revocations) {
        Ok(revoked) => shared.revocations.merge(revoked),
        Err(e) => {
            if let Some(cluster) = shared.cluster() {
                cluster.stop(); // leaves the cluster: registry entry and id generators released
            }
            return Err(store_error(e));
        }
    }
    if let Some(joined) = &lease_joined {
        joined.store(true, Ordering::Release);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::with_capacity(shards);
    let mut ends = MeshPlan::new(shards).into_ends().into_iter();
    for id in 0..shards {
        let start = ShardStart {
            id,
            config: config.clone(),
            keys: keys.clone(),
            shared: shared.clone(),
            ends: ends.next().expect("one set of mesh ends per shard"),
            store: store.clone(),
            commits: commits.clone(),
            client: client_fds.remove(0),
            api: api_fds.remove(0),
            admin: if id == 0 { admin_fds.pop() } else { None },
            client_tls: (!client_tls_fds.is_empty()).then(|| client_tls_fds.remove(0)).zip(tls_config.clone()),
            api_tls: (!api_tls_fds.is_empty()).then(|| api_tls_fds.remove(0)).zip(tls_config.clone()),
            admin_tls: if id == 0 { admin_tls_fds.pop() } else { None }.zip(tls_config.clone()),
        };
        let handle = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("ether-shard-{id}"))
            .spin_before_park(spin_before_park())
            .preempt_timer(time_slice())
            .ring_depth(ring_depth())
            .spawn(move || run_shard(start))
            .map_err(|source| NodeError::Executor { shard: id, source })?;
        threads.push(handle);
    }
    Ok(NodeHandle {
        ports,
        shared,
        store,
        events,
        threads,
        _tls_reload_stop: tls_reload_stop,
        _data_dir_lock: data_dir_lock,
    })
}

/// Entries of each io_uring ring of a shard. The kernel sizes its table of armed polls from
/// it: with thousands of idle connections each holding a poll, glommio's default of 128 makes
/// every poll cancel walk long chains (`io_poll_find`). `ETHER_RING_DEPTH` overrides it.
fn ring_depth() -> usize {
    tuning_env("ETHER_RING_DEPTH", 16..=32_768).unwrap_or(RING_DEPTH)
}

/// An experiment knob from the environment (not configuration: see `config::OTHER_ENV_VARS`):
/// its value if set, a number and within `range`; otherwise `None`, with a warning naming the
/// variable and the range when it is set but refused (the default then holds).
fn tuning_env<T>(name: &str, range: std::ops::RangeInclusive<T>) -> Option<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let raw = std::env::var(name).ok()?;
    match raw.trim().parse::<T>() {
        Ok(v) if range.contains(&v) => Some(v),
        _ => {
            warn!(
                variable = name,
                value = %raw,
                "ignored: expected an integer in {}..={}; the default holds",
                range.start(),
                range.end()
            );
            None
        }
    }
}

/// Spawns `task` into `queue`, a task queue of this shard's executor.
fn spawn_into<T: 'static>(
    queue: glommio::TaskQueueHandle,
    task: impl std::future::Future<Output = T> + 'static,
) -> glommio::Task<T> {
    glommio::spawn_local_into(task, queue).expect("the queue was made on this executor, which it outlives")
}

/// The API queue's latency requirement (see `API_QUEUE_LATENCY`); `ETHER_API_QUEUE_LATENCY_MS`
/// overrides it for experiments (0: not latency-sensitive, a queue of its own only).
fn api_queue_latency() -> Latency {
    match tuning_env::<u64>("ETHER_API_QUEUE_LATENCY_MS", 0..=10_000) {
        Some(0) => Latency::NotImportant,
        Some(ms) => Latency::Matters(Duration::from_millis(ms)),
        None => Latency::Matters(API_QUEUE_LATENCY),
    }
}

/// The shards' time slice (see `TIME_SLICE`).
fn time_slice() -> Duration {
    tuning_env("ETHER_TIME_SLICE_MS", 1..=10_000).map_or(TIME_SLICE, Duration::from_millis)
}

/// Default ring depth (see `ring_depth`).
const RING_DEPTH: usize = 4096;

/// How long an idle shard spins before it parks (saves the wake-up of a parked thread when
/// work arrives within it). `ETHER_SPIN_US` overrides it for experiments. With the vendored
/// glommio's `IORING_SETUP_COOP_TASKRUN` (see `vendor/README.md`) a spin sees only what was
/// completed before it began (completions wait for a system call, and the spin makes none):
/// set `GLOMMIO_COOP_TASKRUN=0` too when trying it.
fn spin_before_park() -> Duration {
    let us = tuning_env("ETHER_SPIN_US", 0..=100_000).unwrap_or(0);
    Duration::from_micros(us)
}

/// What serves the plaintext end of an HTTP listener over TLS (`tls::Behind::Http`): the same
/// keep-alive loop as the plain listener, with `handler`, until `stop`.
fn serve_over_tls<H, F>(
    limits: Limits,
    handler: Rc<H>,
    gate: Option<ether_http::server::HeadGate>,
    stop: Stop,
) -> Rc<dyn Fn(glommio::net::TcpStream)>
where
    H: Fn(ether_http::request::Request) -> F + 'static,
    F: std::future::Future<Output = ether_http::response::Response> + 'static,
{
    Rc::new(move |stream| {
        let (handler, gate, stop) = (handler.clone(), gate.clone(), stop.clone());
        glommio::spawn_local(async move {
            let served = ether_http::server::serve_connection_until(
                stream,
                limits,
                API_IDLE_TIMEOUT,
                |req| handler(req),
                gate.as_ref(),
                &stop,
            );
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "HTTP connection over TLS closed");
            }
        })
        .detach();
    })
}

async fn run_shard(start: ShardStart) {
    let ShardStart {
        id,
        config,
        keys,
        shared,
        ends,
        store,
        commits,
        client,
        api,
        admin,
        client_tls,
        api_tls,
        admin_tls,
    } = start;
    let (mesh, receivers) = ends.connect(id).await;
    let shard = Rc::new(Shard::new(id, config.clone(), keys, shared, mesh, store, commits));
    glommio::spawn_local(shard.clone().commit_loop()).detach();
    glommio::spawn_local(shard.clone().event_flush_loop()).detach();
    // Serving parked terminals is terminal work: it shares the terminal queue, not the API's.
    shard.spawn_terminal_task(crate::conn::unpark_loop(shard.clone()));
    for (_, rx) in receivers {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                shard.node.mesh_depth[shard.id].fetch_sub(1, Ordering::Relaxed);
                shard.handle(msg);
            }
        })
        .detach();
    }
    let stop = Stop::new();
    // SAFETY: each fd is a bound, listening TCP socket made by `bind_group`, owned from here on.
    let client = unsafe { TcpListener::from_raw_fd(client.into_raw_fd()) };
    glommio::spawn_local(crate::conn::accept_loop(shard.clone(), client, stop.clone())).detach();
    if let Some((fd, tls)) = client_tls {
        // SAFETY: as above.
        let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
        let acceptor = futures_rustls::TlsAcceptor::from(tls);
        let behind = crate::tls::Behind::Terminals;
        glommio::spawn_local(crate::tls::accept_loop(shard.clone(), listener, acceptor, behind, stop.clone())).detach();
    }

    let api_limits = Limits {
        header_bytes_max: config.limits.http_header_bytes_max,
        headers_max: 64,
        body_bytes_max: config.limits.http_body_bytes_max,
    };
    // SAFETY: as above.
    let api = unsafe { TcpListener::from_raw_fd(api.into_raw_fd()) };
    let api_shard = shard.clone();
    let api_handler = Rc::new(move |req| crate::api::handle(api_shard.clone(), req));
    let api_gate = crate::api::gate(shard.clone());
    // The API's own task queue (see `API_QUEUE_LATENCY`); the accept loops' connection tasks
    // are spawned into the queue they run in, so every API request is served there.
    let api_queue = glommio::executor().create_task_queue(Shares::Static(API_QUEUE_SHARES), api_queue_latency(), "api");
    if let Some((fd, tls)) = api_tls {
        // SAFETY: as above.
        let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
        let acceptor = futures_rustls::TlsAcceptor::from(tls);
        let behind = crate::tls::Behind::Http {
            what: "api_tls",
            max: config.limits.api_connections_max,
            serve: serve_over_tls(api_limits, api_handler.clone(), Some(api_gate.clone()), stop.clone()),
        };
        spawn_into(api_queue, crate::tls::accept_loop(shard.clone(), listener, acceptor, behind, stop.clone()))
            .detach();
    }
    let api_task = spawn_into(
        api_queue,
        ether_http::server::accept_loop(
            api,
            api_limits,
            API_IDLE_TIMEOUT,
            config.limits.api_connections_max,
            api_handler,
            Some(api_gate),
            stop.clone(),
        ),
    );
    let admin_task = admin.map(|fd| {
        // SAFETY: as above.
        let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
        let view = Rc::new(crate::admin_view::AdminView::new(shard.clone()));
        let handler = Rc::new(move |req| ether_admin::handle(view.clone(), req));
        if let Some((fd, tls)) = admin_tls {
            // SAFETY: as above.
            let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
            let behind = crate::tls::Behind::Http {
                what: "admin_tls",
                max: ADMIN_CONNECTIONS_MAX,
                serve: serve_over_tls(Limits::default(), handler.clone(), None, stop.clone()),
            };
            let acceptor = futures_rustls::TlsAcceptor::from(tls);
            glommio::spawn_local(crate::tls::accept_loop(shard.clone(), listener, acceptor, behind, stop.clone()))
                .detach();
        }
        glommio::spawn_local(ether_http::server::accept_loop(
            listener,
            Limits::default(),
            API_IDLE_TIMEOUT,
            ADMIN_CONNECTIONS_MAX,
            handler,
            None,
            stop.clone(),
        ))
    });

    shard.clone().tick_loop().await;
    stop.stop();
    let deadline = Instant::now() + STOP_GOODBYE_MAX;
    while shard.live_sessions() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    // Events still gathering (`user.offline` of the terminals just closed, among others),
    // also those held after a failed write: this is their last chance.
    shard.events_out.release();
    shard.write_events_at_stop().await;
    if let Some(parking) = &shard.parking {
        parking.stop();
    }
    api_task.await;
    if let Some(t) = admin_task {
        t.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An experiment knob that is not a number, or out of its range, is refused (the default
    /// holds), said in a warning: before, any value that parsed was used as is (a ring depth of
    /// 0 went to glommio) and one that did not was dropped in silence.
    #[test]
    fn tuning_knobs_outside_their_range_are_refused() {
        // Names of this test's own: the environment is the process's.
        let knob = "ETHER_TEST_TUNING_KNOB";
        std::env::set_var(knob, "64");
        assert_eq!(tuning_env::<usize>(knob, 16..=32_768), Some(64));
        for bad in ["0", "8", "40000", "-1", "lots", ""] {
            std::env::set_var(knob, bad);
            assert_eq!(tuning_env::<usize>(knob, 16..=32_768), None, "{bad:?}");
        }
        std::env::remove_var(knob);
        assert_eq!(tuning_env::<usize>(knob, 16..=32_768), None);
    }

    /// A kick with `revoke` made on another node while this one joins the cluster: stored and
    /// announced on the bus after the joining node read the store's revocations but before
    /// it took its bus reader's start (the hook puts it exactly there). The node must refuse
    /// the revoked token from its first upgrade on. Before, it read the revocations before
    /// `Cluster::start` took the bus position, missed this one in both, and took the revoked
    /// token back until some resync read the store again.
    #[test]
    fn a_revocation_made_while_the_node_joins_the_cluster_is_refused_from_the_start() {
        let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::test_min(dir.path().to_path_buf());
        config.cluster.redis_url = Some(redis.url());
        config.node.id = "joining".into();
        let url = redis.url();
        let revoked_at = crate::message::unix_now_ms();
        crate::cluster::tests::at_bus_position("joining", move || {
            // Node `other` revokes ann's tokens: in the shared store first, then on the bus.
            let prefix = format!("{}store:", crate::cluster::KEY_PREFIX);
            let options = ether_store::RedisOptions { prefix, events_stream: None, outbox: false };
            let mut store = ether_store::RedisBackend::open(&url, options).unwrap();
            let op = Op::RevokeTokens { user: "ann".into(), device: None, before_ms: revoked_at };
            ether_store::StoreBackend::apply(&mut store, op).unwrap();
            let mut con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
            let event = crate::cluster::BusEvent::Revoke { user: "ann".into(), device: None, before_ms: revoked_at };
            crate::cluster::tests::publish_shared_as(&mut con, "other", event);
        });
        let node = start(config).unwrap();
        let revocations = node.shared.revocations.clone();
        node.stop();
        assert!(revocations.refuses("ann", "phone", revoked_at - 1), "ann's earlier token is refused");
        assert!(!revocations.refuses("bob", "phone", 0), "only ann's");
    }
}
