//! Headless Chromium for the dashboard's browser tests (this crate's and the engine's): finds
//! the binary and runs it on a URL with a throwaway profile, bounded in time. Test support
//! only; the node never starts a browser.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The browser must finish within this (virtual time makes the page itself take ~5 s).
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A fresh profile directory, removed on drop.
struct Profile(PathBuf);

impl Profile {
    fn new(tag: &str) -> Profile {
        let dir = std::env::temp_dir().join(format!(
            "ether-admin-chromium-{}-{tag}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("profile dir");
        Profile(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs headless Chromium on `url` with `extra` flags; kills it past the timeout.
pub fn run_chromium(bin: &Path, url: &str, extra: &[String], tag: &str) -> Output {
    let profile = Profile::new(tag);
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=5000",
    ])
    // `ETHER_DASHBOARD_WINDOW=1280,2000` shows more of the page when looking at it by hand.
    .arg(format!("--window-size={}", std::env::var("ETHER_DASHBOARD_WINDOW").unwrap_or_else(|_| "1280,900".to_owned())))
    .arg(format!("--user-data-dir={}", profile.0.display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start chromium");
    let started = Instant::now();
    loop {
        match child.try_wait().expect("wait chromium") {
            Some(_) => break,
            None if started.elapsed() > BROWSER_TIMEOUT => {
                let _ = child.kill();
                break;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let out = child.wait_with_output().expect("chromium output");
    assert!(
        started.elapsed() <= BROWSER_TIMEOUT,
        "chromium did not finish within {BROWSER_TIMEOUT:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
