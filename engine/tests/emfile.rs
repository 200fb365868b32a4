//! Accept errors do not spin: the real binary runs with a tiny descriptor limit, a flood of
//! connections exhausts it (EMFILE), the node backs off instead of burning a core, and once
//! the flood is gone it accepts and serves terminals again.
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ether_sdk::TerminalClient;

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf is always safe to call.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn descriptor_exhaustion_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_ether");
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--shards", "1", "--listen-client", "127.0.0.1:0", "--listen-api", "127.0.0.1:0"])
        .args(["--listen-admin", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit between fork and exec touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 96, rlim_max: 96 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let node = Node(cmd.spawn().unwrap());
    let started = Instant::now();
    while !data.join("ports.json").exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "node never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("ports.json")).unwrap()).unwrap();
    let client: std::net::SocketAddr = ports["client"].as_str().unwrap().parse().unwrap();

    // Flood: more connections than the node has descriptors (each waits in its handshake).
    let flood: Vec<TcpStream> = (0..200).filter_map(|_| TcpStream::connect(client).ok()).collect();
    assert!(flood.len() > 96, "the flood must exceed the node's descriptor limit");
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(node.0.id());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(node.0.id()) - before;
    assert!(used < 0.5, "the node burned {used:.2} CPU-seconds in one second of EMFILE: it spins");

    // The flood goes away (closed, or dropped by the handshake timeout): terminals connect.
    drop(flood);
    let out = Command::new(bin).args(["token", "--user", "after", "--data"]).arg(&data).output().unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match TerminalClient::connect(&format!("ws://{client}"), &token, "phone", "web") {
            Ok((_, welcome)) => {
                assert_eq!(welcome.user, "after");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "the node never recovered: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
