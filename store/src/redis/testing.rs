//! `TestRedis`: a private `redis-server` for tests (this crate's and the engine's). Owns the
//! child process and its temporary directory; must never touch any other Redis (the system
//! one on 6379 included). Compiled only with the `conformance` feature.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server binary: `$ETHER_REDIS_SERVER`, else `redis-server` on the `PATH`.
fn server_binary() -> PathBuf {
    std::env::var_os("ETHER_REDIS_SERVER").map_or_else(|| PathBuf::from("redis-server"), PathBuf::from)
}

/// How long `start` waits for the server to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A throwaway `redis-server` on a free loopback port, no persistence, its own directory.
/// Killed and reaped on drop.
#[derive(Debug)]
pub struct TestRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TestRedis {
    /// Whether a `redis-server` binary can be run here (tests skip when not).
    pub fn available() -> bool {
        Command::new(server_binary())
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A started server, or `None` after printing that the test is skipped when no
    /// `redis-server` can be run here.
    pub fn start_or_skip() -> Option<TestRedis> {
        if !Self::available() {
            println!("skipped: redis-server not installed");
            return None;
        }
        Some(Self::start())
    }

    /// Starts a server and waits until it answers `PING`. Panics with the reason if it cannot
    /// (no binary, no free port, the server exited or did not answer in time).
    pub fn start() -> TestRedis {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(r) => return r,
                Err(e) => last = e,
            }
        }
        panic!("TestRedis: {last}");
    }

    fn try_start() -> Result<TestRedis, String> {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind a loopback port: {e}"))?;
            l.local_addr().map_err(|e| format!("local addr: {e}"))?.port()
        };
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let log = dir.path().join("redis.log");
        let bin = server_binary();
        let child = Command::new(&bin)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot run {} ({e}): is redis-server installed? (TestRedis::available)", bin.display())
            })?;
        let mut r = TestRedis { child, port, _dir: dir };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = r.child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("redis-server on port {port} exited ({status}): {log}"));
            }
            if r.ping() {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server on port {port} did not answer PING within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(client) = ::redis::Client::open(self.url()) else { return false };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) else { return false };
        ::redis::cmd("PING").query::<String>(&mut c).is_ok_and(|s| s == "PONG")
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (`SIGSTOP`) until the guard is dropped (`SIGCONT`): its connections
    /// stay open and nothing is answered, as with a Redis that hangs or a link that drops
    /// packets without a reset.
    pub fn pause(&self) -> Paused {
        let pid = self.child.id();
        assert!(signal(pid, "-STOP"), "kill -STOP {pid} failed");
        Paused { pid }
    }
}

/// A paused [`TestRedis`] (see [`TestRedis::pause`]); resumed on drop.
#[derive(Debug)]
pub struct Paused {
    pid: u32,
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = signal(self.pid, "-CONT");
    }
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill").arg(sig).arg(pid.to_string()).status().is_ok_and(|s| s.success())
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
