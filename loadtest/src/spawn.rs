//! The node under test: `ether serve` started from the same build (`--spawn`), an existing
//! node given by addresses and secrets, or the in-tool wire-limit server.
use std::any::Any;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::tls::{TlsSpec, SPAWN_CERT_PEM, SPAWN_KEY_PEM};
use crate::wire_limit::{WireServer, WIRE_SECRET};

/// Where the scenario sends its traffic.
pub struct Target {
    /// `engine`, `external` or `wire-limit`.
    pub kind: &'static str,
    pub client: SocketAddr,
    pub api: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The other nodes of a spawned cluster: terminals and API connections go round them.
    pub more_clients: Vec<SocketAddr>,
    pub more_apis: Vec<SocketAddr>,
    pub jwt_secret: String,
    pub api_key: String,
    /// The admin token, when known (a spawned node or a data dir): the run then reads the
    /// node's own counters (frames per socket write).
    pub admin_token: Option<String>,
    /// Server processes to sample for RSS and CPU (may be empty for a remote node).
    pub server_pids: Vec<u32>,
    /// Where the spawned node's output goes.
    pub log: Option<PathBuf>,
    /// Terminals connect over TLS (`client` is then the node's `wss://` listener).
    pub tls: Option<TlsSpec>,
    _guard: Option<Box<dyn Any>>,
}

impl Target {
    pub fn external(
        client: SocketAddr,
        api: Option<SocketAddr>,
        jwt_secret: String,
        api_key: String,
        server_pid: Option<u32>,
    ) -> Target {
        Target {
            kind: "external",
            client,
            api,
            admin: None,
            more_clients: Vec::new(),
            more_apis: Vec::new(),
            jwt_secret,
            api_key,
            admin_token: None,
            server_pids: server_pid.into_iter().collect(),
            log: None,
            tls: None,
            _guard: None,
        }
    }

    /// A node's own data dir: addresses from `ports.json`, secrets from `secrets.toml`; with
    /// `tls`, its `client_tls` listener.
    pub fn from_data_dir(dir: &Path, server_pid: Option<u32>, tls: Option<TlsSpec>) -> Result<Target, String> {
        let ports = read_ports(dir)?;
        let secrets = read_secrets(dir)?;
        let client = match (&tls, ports.client_tls) {
            (None, _) => ports.client,
            (Some(_), Some(addr)) => addr,
            (Some(_), None) => return Err(format!("{}: the node has no TLS listener (client_tls)", dir.display())),
        };
        Ok(Target {
            kind: "external",
            client,
            api: Some(ports.api),
            admin: Some(ports.admin),
            more_clients: Vec::new(),
            more_apis: Vec::new(),
            jwt_secret: secrets.jwt_secret,
            api_key: secrets.api_key,
            admin_token: secrets.admin_token,
            server_pids: server_pid.into_iter().collect(),
            log: None,
            tls,
            _guard: None,
        })
    }

    /// The in-tool wire-limit server, `processes` processes on the same ports.
    pub fn wire_limit(processes: usize, pin: Option<usize>) -> Result<Target, String> {
        let w = WireServer::spawn(processes, pin).map_err(|e| format!("cannot start the wire-limit server: {e}"))?;
        Ok(Target {
            kind: "wire-limit",
            client: w.addrs.client,
            api: Some(w.addrs.api),
            admin: None,
            more_clients: Vec::new(),
            more_apis: Vec::new(),
            jwt_secret: WIRE_SECRET.into(),
            api_key: WIRE_SECRET.into(),
            admin_token: None,
            server_pids: w.pids(),
            log: None,
            tls: None,
            _guard: Some(Box::new(w)),
        })
    }

    /// Starts `ether serve` on free loopback ports with a fresh data dir; with
    /// `opts.cluster` ≥ 2, a private `redis-server` and that many nodes joined through it
    /// (terminals and API connections are then spread over the nodes).
    pub fn spawn_engine(opts: &SpawnOptions) -> Result<Target, String> {
        let bin = match &opts.ether_bin {
            Some(b) => b.clone(),
            None => find_ether_bin()?,
        };
        if opts.cluster >= 2 {
            return Self::spawn_cluster(&bin, opts);
        }
        let (node, ports, secrets, log_path) = spawn_node(&bin, opts, &[], &[])?;
        let secrets = secrets.ok_or("ether serve wrote no secrets.toml")?;
        let client = client_of(opts, &ports)?;
        Ok(Target {
            kind: "engine",
            client,
            api: Some(ports.api),
            admin: Some(ports.admin),
            more_clients: Vec::new(),
            more_apis: Vec::new(),
            jwt_secret: secrets.jwt_secret,
            api_key: secrets.api_key,
            admin_token: secrets.admin_token,
            server_pids: vec![node.child.id()],
            log: Some(log_path),
            tls: opts.tls.then(spawn_tls),
            _guard: Some(Box::new(node)),
        })
    }

    fn spawn_cluster(bin: &Path, opts: &SpawnOptions) -> Result<Target, String> {
        let redis = RedisServer::start()?;
        let url = format!("redis://127.0.0.1:{}/", redis.port);
        let mut nodes = Vec::new();
        let mut all_ports = Vec::new();
        let mut first: Option<(Secrets, PathBuf)> = None;
        for i in 0..opts.cluster {
            let args = vec!["--redis".to_owned(), url.clone(), "--node-id".to_owned(), format!("lt-node-{i}")];
            // Every node of a cluster shares the first one's secrets.
            let env: Vec<(&str, String)> = match &first {
                None => Vec::new(),
                Some((s, _)) => vec![
                    ("ETHER_AUTH_JWT_SECRET", s.jwt_secret.clone()),
                    ("ETHER_AUTH_API_KEY", s.api_key.clone()),
                    ("ETHER_AUTH_ADMIN_TOKEN", s.admin_token.clone().unwrap_or_default()),
                ],
            };
            let (node, ports, secrets, log) = spawn_node(bin, opts, &args, &env)?;
            if first.is_none() {
                first = Some((secrets.ok_or("the first node wrote no secrets.toml")?, log));
            }
            nodes.push(node);
            all_ports.push(ports);
        }
        let (secrets, log) = first.ok_or("a cluster of no node")?;
        let clients = all_ports.iter().map(|p| client_of(opts, p)).collect::<Result<Vec<_>, String>>()?;
        let mut pids: Vec<u32> = nodes.iter().map(|n| n.child.id()).collect();
        pids.push(redis.child.id());
        Ok(Target {
            kind: "engine",
            client: clients[0],
            api: Some(all_ports[0].api),
            admin: Some(all_ports[0].admin),
            more_clients: clients[1..].to_vec(),
            more_apis: all_ports[1..].iter().map(|p| p.api).collect(),
            jwt_secret: secrets.jwt_secret,
            api_key: secrets.api_key,
            admin_token: secrets.admin_token,
            server_pids: pids,
            log: Some(log),
            tls: opts.tls.then(spawn_tls),
            // Nodes first, then Redis (dropped in this order).
            _guard: Some(Box::new((nodes, redis))),
        })
    }
}

/// The terminal address of a spawned node: its `wss://` listener with `--tls`.
fn client_of(opts: &SpawnOptions, ports: &Ports) -> Result<SocketAddr, String> {
    match (opts.tls, ports.client_tls) {
        (false, _) => Ok(ports.client),
        (true, Some(tls)) => Ok(tls),
        (true, None) => Err("the spawned node wrote no client_tls address".into()),
    }
}

/// What the terminals trust when they drive spawned nodes over TLS.
fn spawn_tls() -> TlsSpec {
    TlsSpec { ca_pem: SPAWN_CERT_PEM.into(), server_name: "localhost".into() }
}

/// Starts one `ether serve` with `args` and `env` added, and waits until it listens.
fn spawn_node(
    bin: &Path,
    opts: &SpawnOptions,
    args: &[String],
    env: &[(&str, String)],
) -> Result<(SpawnedNode, Ports, Option<Secrets>, PathBuf), String> {
    let dir = std::env::temp_dir().join(format!(
        "ether-loadtest-{}-{}",
        std::process::id(),
        crate::unix_nanos() % 1_000_000_000
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log_path = dir.join("serve.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--data")
        .arg(&dir)
        .args(["--listen-client", "127.0.0.1:0"])
        .args(["--listen-api", "127.0.0.1:0"])
        .args(["--listen-admin", "127.0.0.1:0"]);
    if let Some(s) = opts.shards {
        cmd.args(["--shards", &s.to_string()]);
    }
    if opts.tls {
        let (cert, key) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
        std::fs::write(&cert, SPAWN_CERT_PEM).map_err(|e| format!("{}: {e}", cert.display()))?;
        std::fs::write(&key, SPAWN_KEY_PEM).map_err(|e| format!("{}: {e}", key.display()))?;
        cmd.args(["--listen-client-tls", "127.0.0.1:0"]).arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key);
    }
    cmd.args(args).args(&opts.extra_args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let mut node = SpawnedNode { child, dir: dir.clone(), keep: opts.keep_data };
    let deadline = Instant::now() + opts.start_timeout;
    let (ports, secrets) = loop {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(format!(
                "ether serve exited ({status}) before listening; log {}:\n{}",
                log_path.display(),
                tail(&log_path)
            ));
        }
        // A node given its secrets (a cluster's later nodes) writes no secrets.toml.
        match (read_ports(&dir), read_secrets(&dir)) {
            (Ok(p), Ok(s)) => break (p, Some(s)),
            (Ok(p), Err(_)) if !env.is_empty() => break (p, None),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!(
                "ether serve did not write ports.json and secrets.toml within {:?}; log {}:\n{}",
                opts.start_timeout,
                log_path.display(),
                tail(&log_path)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The node is ready once it accepts on its client port.
    let _ = wait_listening(ports.client, deadline);
    Ok((node, ports, secrets, log_path))
}

/// A private `redis-server` for a spawned cluster: a free loopback port, its own data dir
/// (append-only file, fsync every second, as a production cluster would run), stopped and
/// removed on drop. Never the machine's own Redis.
struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    fn start() -> Result<RedisServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for redis-server: {e}"))?
            .port();
        let dir = std::env::temp_dir().join(format!("ether-loadtest-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server (needed for --cluster): {e}"))?;
        let server = RedisServer { child, port, dir };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if !wait_listening(addr, Instant::now() + Duration::from_secs(10)) {
            return Err(format!("redis-server did not listen on {addr}"));
        }
        Ok(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node's totals of frames sent to terminals and socket writes (`GET /admin/v1/stats`).
#[derive(Debug, Clone, Copy)]
pub struct WriteCounters {
    pub frames_out: u64,
    pub socket_writes: u64,
}

impl WriteCounters {
    /// Frames per socket write between `self` and a later reading.
    pub fn frames_per_write_until(self, later: WriteCounters) -> Option<f64> {
        let writes = later.socket_writes.checked_sub(self.socket_writes)?;
        let frames = later.frames_out.checked_sub(self.frames_out)?;
        (writes > 0).then(|| frames as f64 / writes as f64)
    }
}

impl Target {
    /// The node's write counters, if its admin port and token are known and it reports them.
    pub fn write_counters(&self) -> Option<WriteCounters> {
        let (admin, token) = (self.admin?, self.admin_token.as_ref()?);
        let client = ether_sdk::GatewayClient::new(format!("http://{admin}"), token.clone());
        let r = client.request("GET", "/admin/v1/stats", None).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let totals = &v["totals"];
        Some(WriteCounters {
            frames_out: totals["frames_out"].as_u64()?,
            socket_writes: totals["socket_writes"].as_u64()?,
        })
    }
}

/// How to start a node.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    pub ether_bin: Option<PathBuf>,
    pub shards: Option<usize>,
    pub extra_args: Vec<String>,
    pub keep_data: bool,
    pub start_timeout: Duration,
    /// Nodes of a cluster to spawn (joined through a private redis-server); 0 or 1: one node.
    pub cluster: usize,
    /// Give the node a TLS listener (with [`SPAWN_CERT_PEM`]) and drive that one.
    pub tls: bool,
}

#[derive(Deserialize)]
struct Ports {
    client: SocketAddr,
    api: SocketAddr,
    admin: SocketAddr,
    #[serde(default)]
    client_tls: Option<SocketAddr>,
}

#[derive(Deserialize)]
struct Secrets {
    jwt_secret: String,
    api_key: String,
    #[serde(default)]
    admin_token: Option<String>,
}

fn read_ports(dir: &Path) -> Result<Ports, String> {
    let p = dir.join("ports.json");
    let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&s).map_err(|e| format!("{}: {e}", p.display()))
}

fn read_secrets(dir: &Path) -> Result<Secrets, String> {
    let p = dir.join("secrets.toml");
    let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    toml::from_str(&s).map_err(|e| format!("{}: {e}", p.display()))
}

fn wait_listening(addr: SocketAddr, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `ether` from the same build: next to this executable, or one level up (tests run from
/// `target/<profile>/deps`). `ETHER_BIN` overrides.
pub fn find_ether_bin() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("ETHER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut tried = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let cand = d.join("ether");
        if cand.is_file() {
            return Ok(cand);
        }
        tried.push(cand.display().to_string());
        dir = d.parent();
    }
    Err(format!(
        "no `ether` binary found (tried {}); build it with `cargo build --release -p ether-engine` or pass --ether-bin",
        tried.join(", ")
    ))
}

/// A node started by the tool: SIGTERM, then SIGKILL, on drop; its data dir removed.
struct SpawnedNode {
    child: Child,
    dir: PathBuf,
    keep: bool,
}

impl Drop for SpawnedNode {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if !self.keep && !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
