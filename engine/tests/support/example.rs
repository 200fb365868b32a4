//! The runnable example terminal (`sdk/examples/terminal.rs`) as a child process against a
//! `TestNode`: built by the test (Cargo gives tests the path of the workspace's binaries
//! only), run as bob's device, its printed lines collected, its input ended to stop it.
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::TestNode;

/// Builds the example (a no-op when it is up to date) and returns the path of its binary.
pub fn build_example() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "ether-sdk", "--example", "terminal", "--message-format=json"])
        .arg("--manifest-path")
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo build of the example failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "terminal")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("the example's executable in cargo's output")
}

/// The example running as bob's `device`.
pub struct ExampleTerminal {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Every line it printed so far.
    pub printed: Vec<String>,
}

impl ExampleTerminal {
    /// Builds the example and starts it as bob's `device` against `node`.
    pub fn start(node: &TestNode, device: &str) -> ExampleTerminal {
        let mut child = Command::new(build_example())
            .args(["--url", &node.ws_url(), "--device", device])
            .env("ETHER_TOKEN", node.token("bob"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example runs");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        ExampleTerminal { child, stdin, lines, printed: Vec::new() }
    }

    /// Collects printed lines until `done(&printed)` (true) or `within` passes (false);
    /// `on_line` sees each line as it comes.
    pub fn read_until(
        &mut self,
        within: Duration,
        mut on_line: impl FnMut(&str),
        done: impl Fn(&[String]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        while !done(&self.printed) {
            if Instant::now() >= deadline {
                return false;
            }
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                on_line(&l);
                self.printed.push(l);
            }
        }
        true
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Ends its input (it closes its connection and says bye), waits up to 10 s (then kills
    /// it): its exit status (`None` if killed), every line it printed, and its stderr.
    pub fn finish(mut self) -> (Option<ExitStatus>, Vec<String>, String) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin);
        }
        let exit_by = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break Some(s);
            }
            if Instant::now() > exit_by {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.printed.extend(self.lines.try_iter());
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        (status, self.printed, stderr)
    }
}
