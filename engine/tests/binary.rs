//! The real `ether` binary: starts with no configuration but a data dir, generates its secrets
//! (mode 0600), writes ports.json, mints tokens, serves a terminal and the API, and exits 0 on
//! SIGTERM.
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ether_proto::frame::ServerFrame;
use ether_sdk::{GatewayClient, TerminalClient};

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &std::path::Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_binary_serves_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_ether");
    let child = Command::new(bin)
        .args(["serve", "--shards", "2", "--listen-client", "127.0.0.1:0", "--listen-api", "127.0.0.1:0"])
        .args(["--listen-admin", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env_remove("ETHER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut node = Node(child);
    wait_for(&data.join("ports.json"));
    let ports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("ports.json")).unwrap()).unwrap();
    let secrets_path = data.join("secrets.toml");
    let mode = std::fs::metadata(&secrets_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secrets are private");
    let secrets: toml::Table = std::fs::read_to_string(&secrets_path).unwrap().parse().unwrap();
    let api_key = secrets["api_key"].as_str().unwrap();

    let out = Command::new(bin).args(["token", "--user", "zoe", "--data"]).arg(&data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let ws = format!("ws://{}", ports["client"].as_str().unwrap());
    let (mut zoe, welcome) = TerminalClient::connect(&ws, &token, "phone", "android").unwrap();
    assert_eq!(welcome.user, "zoe");
    let gw = GatewayClient::new(format!("http://{}", ports["api"].as_str().unwrap()), api_key);
    let msg = ether_proto::api::SendMessage {
        from: "amy".into(),
        to: "zoe".into(),
        kind: ether_proto::Kind::Text,
        body: serde_json::json!({"text": "from the binary"}),
        cid: None,
    };
    let sent = gw.send_message(&msg).unwrap();
    match zoe.recv(Duration::from_secs(5)).unwrap() {
        Some(ServerFrame::Msg(m)) => {
            assert_eq!((m.id, m.body["text"].as_str()), (sent.id.clone(), Some("from the binary")))
        }
        other => panic!("{other:?}"),
    }
    let health = GatewayClient::new(format!("http://{}", ports["admin"].as_str().unwrap()), "");
    assert_eq!(health.request("GET", "/healthz", None).unwrap().status, 200);

    // SIGTERM: the terminal is told, the process exits 0 in bounded time.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(node.0.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(s) = node.0.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // The first start printed the secrets it generated, once, with a ready-to-copy example.
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut node.0.stdout.take().unwrap(), &mut printed).unwrap();
    assert!(printed.contains(&format!("auth.api_key = {api_key}")), "{printed}");
    let admin_token = secrets["admin_token"].as_str().unwrap();
    assert!(printed.contains(&format!("auth.admin_token = {admin_token}")), "{printed}");
    assert!(printed.contains("ether token --user bob --data") && printed.contains("/v1/messages"), "{printed}");
    // The message was never acked: it may be pushed again (same id) until the terminal is
    // closed, at its own `after_ms` (a drain closes each terminal when it was told to go).
    let mut told = false;
    loop {
        match zoe.recv(Duration::from_secs(6)) {
            Ok(Some(ServerFrame::Reconnect { after_ms })) if !told => {
                assert!(after_ms < 5000, "{after_ms}");
                told = true;
            }
            Ok(Some(ServerFrame::Msg(m))) if m.id == sent.id => {}
            Err(ether_sdk::SdkError::Closed { code, .. }) if told => {
                assert_eq!(code, Some(1012));
                break;
            }
            other => panic!("expected reconnect then close 1012 on drain (resends allowed), got {other:?}"),
        }
    }
}

#[test]
fn the_binary_names_configuration_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_ether"))
        .args(["serve", "--shards", "0", "--data", "/nonexistent-ether-test"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shards"), "{err}");
    // A token for a data dir that holds no node: a clear error, and nothing created.
    let missing = std::env::temp_dir().join(format!("ether-no-node-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ether"))
        .args(["token", "--user", "u", "--data"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("jwt_secret"));
    assert!(!missing.exists(), "ether token must not create a data dir");
    // Cluster mode with a Redis that does not answer: a clear error, not a standalone node.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ether"))
        .args(["serve", "--redis", "redis://:hunter2hunter2@127.0.0.1:1/0", "--data"])
        .arg(dir.path())
        .args(["--listen-client", "127.0.0.1:0", "--listen-api", "127.0.0.1:0", "--listen-admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("redis://***@127.0.0.1:1/0"), "names the (redacted) URL: {err}");
    assert!(!err.contains("hunter2"), "the password stays out of the message: {err}");
}
