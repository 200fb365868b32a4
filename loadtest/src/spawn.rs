//! The node under test: `ether serve` started from the same build (`--spawn`), an existing
//! node given by addresses and secrets, or the in-tool wire-limit server.
use std::any::Any;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::wire_limit::{WireServer, WIRE_SECRET};

/// Where the scenario sends its traffic.
pub struct Target {
    /// `engine`, `external` or `wire-limit`.
    pub kind: &'static str,
    pub client: SocketAddr,
    pub api: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub jwt_secret: String,
    pub api_key: String,
    /// The admin token, when known (a spawned node or a data dir): the run then reads the
    /// node's own counters (frames per socket write).
    pub admin_token: Option<String>,
    /// Server processes to sample for RSS and CPU (may be empty for a remote node).
    pub server_pids: Vec<u32>,
    /// Where the spawned node's output goes.
    pub log: Option<PathBuf>,
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
            jwt_secret,
            api_key,
            admin_token: None,
            server_pids: server_pid.into_iter().collect(),
            log: None,
            _guard: None,
        }
    }

    /// A node's own data dir: addresses from `ports.json`, secrets from `secrets.toml`.
    pub fn from_data_dir(dir: &Path, server_pid: Option<u32>) -> Result<Target, String> {
        let ports = read_ports(dir)?;
        let secrets = read_secrets(dir)?;
        Ok(Target {
            kind: "external",
            client: ports.client,
            api: Some(ports.api),
            admin: Some(ports.admin),
            jwt_secret: secrets.jwt_secret,
            api_key: secrets.api_key,
            admin_token: secrets.admin_token,
            server_pids: server_pid.into_iter().collect(),
            log: None,
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
            jwt_secret: WIRE_SECRET.into(),
            api_key: WIRE_SECRET.into(),
            admin_token: None,
            server_pids: w.pids(),
            log: None,
            _guard: Some(Box::new(w)),
        })
    }

    /// Starts `ether serve` on free loopback ports with a fresh data dir.
    pub fn spawn_engine(opts: &SpawnOptions) -> Result<Target, String> {
        let bin = match &opts.ether_bin {
            Some(b) => b.clone(),
            None => find_ether_bin()?,
        };
        let dir = std::env::temp_dir().join(format!(
            "ether-loadtest-{}-{}",
            std::process::id(),
            crate::unix_nanos() % 1_000_000_000
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log_path = dir.join("serve.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--data")
            .arg(&dir)
            .args(["--listen-client", "127.0.0.1:0"])
            .args(["--listen-api", "127.0.0.1:0"])
            .args(["--listen-admin", "127.0.0.1:0"]);
        if let Some(s) = opts.shards {
            cmd.args(["--shards", &s.to_string()]);
        }
        cmd.args(&opts.extra_args);
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
            if let (Ok(p), Ok(s)) = (read_ports(&dir), read_secrets(&dir)) {
                break (p, s);
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
        let pid = node.child.id();
        // The node is ready once it accepts on its client port.
        let _ = wait_listening(ports.client, deadline);
        Ok(Target {
            kind: "engine",
            client: ports.client,
            api: Some(ports.api),
            admin: Some(ports.admin),
            jwt_secret: secrets.jwt_secret,
            api_key: secrets.api_key,
            admin_token: secrets.admin_token,
            server_pids: vec![pid],
            log: Some(log_path),
            _guard: Some(Box::new(node)),
        })
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
}

#[derive(Deserialize)]
struct Ports {
    client: SocketAddr,
    api: SocketAddr,
    admin: SocketAddr,
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
