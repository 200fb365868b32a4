//! The admin port of a real node: auth, stats and metrics that move with traffic, live
//! connections and recent closes, user view, kick, drain, redacted config, and the
//! `ether admin` command line against it.
mod support;

use std::process::Command;
use std::time::Duration;

use ether_proto::frame::ServerFrame;
use ether_sdk::TerminalClient;
use serde_json::Value;
use support::*;

fn get_json(c: &ether_sdk::GatewayClient, path: &str) -> Value {
    let r = c.request("GET", path, None).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn admin_routes_need_the_token() {
    let node = TestNode::start();
    let anonymous = ether_sdk::GatewayClient::new(format!("http://{}", node.ports.admin), "");
    for path in ["/admin/v1/stats", "/admin/v1/connections", "/admin/v1/users/x", "/admin/v1/config"] {
        assert_eq!(anonymous.request("GET", path, None).unwrap().status, 401, "{path}");
    }
    assert_eq!(anonymous.request("POST", "/admin/v1/drain", None).unwrap().status, 401);
    let wrong = ether_sdk::GatewayClient::new(format!("http://{}", node.ports.admin), "not-the-token");
    assert_eq!(wrong.request("GET", "/admin/v1/stats", None).unwrap().status, 401);
    assert_eq!(anonymous.request("GET", "/healthz", None).unwrap().status, 200);
    assert_eq!(anonymous.request("GET", "/metrics", None).unwrap().status, 200);
    assert!(!node.shared().draining(), "a refused drain changed nothing");
}

#[test]
fn stats_and_metrics_move_with_traffic() {
    let node = TestNode::start();
    let admin = node.admin();
    let before = admin.request("GET", "/metrics", None).unwrap().text();
    let mut t = node.terminal("mia", "phone");
    for i in 0..5 {
        node.gateway().send_message(&text("leo", "mia", &format!("m{i}"))).unwrap();
        let m = next_msg(&mut t);
        t.ack(m.seq).unwrap();
    }
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
    std::thread::sleep(Duration::from_millis(600)); // one publish tick
    let after = admin.request("GET", "/metrics", None).unwrap().text();
    for line in after.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.starts_with("ether_"), "{line}");
    }
    assert!(after.contains("# TYPE ether_connections gauge"));
    assert_eq!(metric(&after, "ether_connections{"), 1.0);
    assert_eq!(metric(&after, "ether_messages_accepted_total") - metric(&before, "ether_messages_accepted_total"), 5.0);
    assert!(metric(&after, "ether_deliveries_total") >= 5.0);
    assert!(metric(&after, "ether_acks_total") >= 5.0);
    // Socket writes are counted: at least one, and no more than one per thing written (the
    // counted frames plus the 101 answer and `welcome`, which `frames_out` leaves out).
    let (writes, frames) = (metric(&after, "ether_socket_writes_total"), metric(&after, "ether_frames_out_total"));
    assert!(writes >= 1.0 && writes <= frames + 2.0, "{writes} writes for {frames} frames");
    assert!(metric(&after, "ether_push_latency_seconds_count") >= 5.0);
    assert!(metric(&after, "ether_ack_latency_seconds_count") >= 5.0);
    assert!(after.contains("route=\"POST /v1/messages\""), "API requests by route");
    // Each send's answer time, by route (the gateway's token request has its own).
    let sends = "ether_api_latency_seconds_count{route=\"POST /v1/messages\"}";
    assert_eq!(metric(&after, sends) - metric(&before, sends), 5.0, "{after}");
    assert!(metric(&after, "ether_api_latency_seconds_sum{route=\"POST /v1/messages\"}") > 0.0);

    assert!(metric(&after, "ether_storage_batches_total") >= 1.0, "storage batches counted");
    assert!(metric(&after, "ether_storage_commit_latency_seconds_count") >= 1.0);
    let stats = get_json(&admin, "/admin/v1/stats");
    assert!(stats["storage"]["ops"].as_u64().unwrap() >= 5, "{}", stats["storage"]);
    assert_eq!(stats["shards"].as_array().unwrap().len(), 2);
    assert_eq!(stats["totals"]["connections"], 1);
    assert_eq!(stats["totals"]["messages_accepted"], 5);
    let sends = stats["api_latency"].as_array().unwrap().iter().find(|r| r["route"] == "POST /v1/messages");
    assert_eq!(sends.expect("answer times of sends")["latency"]["count"], 5, "{}", stats["api_latency"]);
}

#[test]
fn connections_users_kick_and_recent_closes() {
    let node = TestNode::start();
    let admin = node.admin();
    let _a = node.terminal("nia", "phone");
    let mut b = node.terminal("nia", "web");
    let _c = node.terminal("oz", "desk");
    let page = get_json(&admin, "/admin/v1/connections?sort=user&order=asc&limit=2");
    assert_eq!(page["total"], 3);
    assert_eq!(page["connections"].as_array().unwrap().len(), 2);
    assert_eq!(page["connections"][0]["user"], "nia");
    let bad = admin.request("GET", "/admin/v1/connections?limit=nope", None).unwrap();
    assert_eq!(bad.status, 400);
    let user = get_json(&admin, "/admin/v1/users/nia");
    let devices: Vec<&str> =
        user["connections"].as_array().unwrap().iter().map(|c| c["device"].as_str().unwrap()).collect();
    assert_eq!(devices.len(), 2);
    assert!(devices.contains(&"phone") && devices.contains(&"web"));
    let r = admin.request("POST", "/admin/v1/users/nia/kick", Some(br#"{"device":"web"}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(matches!(b.recv(WAIT).unwrap(), Some(ServerFrame::Kicked { .. })));
    std::thread::sleep(Duration::from_millis(300));
    let page = get_json(&admin, "/admin/v1/connections");
    assert_eq!(page["total"], 2);
    let closes = page["recent_closes"].as_array().unwrap();
    assert!(closes.iter().any(|c| c["reason"] == "kicked" && c["device"] == "web"), "{closes:?}");
}

#[test]
fn config_is_redacted() {
    let node = TestNode::start();
    let cfg = get_json(&node.admin(), "/admin/v1/config");
    let text = cfg.to_string();
    assert!(!text.contains(&node.api_key), "api key leaked");
    assert!(!text.contains(&node.jwt_secret), "jwt secret leaked");
    let shown = cfg["auth"]["api_key"].as_str().unwrap();
    assert!(shown == "***" || shown == "<redacted>", "{shown}");
    assert_eq!(cfg["node"]["shards"], 2);
}

#[test]
fn drain_through_the_admin_port() {
    let node = TestNode::start();
    let mut t = node.terminal("pam", "phone");
    let r = node.admin().request("POST", "/admin/v1/drain", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(matches!(t.recv(WAIT).unwrap(), Some(ServerFrame::Reconnect { .. })));
    assert_eq!(node.admin().request("GET", "/readyz", None).unwrap().status, 503);
}

#[test]
fn the_admin_command_line_against_a_live_node() {
    let node = TestNode::start();
    let _t = node.terminal("quin", "phone");
    let mut web = node.terminal("quin", "web");
    let mut desk = node.terminal("quin", "desk");
    let addr = node.ports.admin.to_string();
    let token = node.config.auth.admin_token.expose().to_owned();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ether"))
            .args(["admin", "--addr", &addr, "--token", &token])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&["stats"]);
    assert!(table.to_lowercase().contains("shard"), "{table}");
    let json: Value = serde_json::from_str(&run(&["stats", "--json"])).unwrap();
    assert_eq!(json["totals"]["connections"], 3);
    assert!(run(&["connections"]).contains("quin"));
    assert!(run(&["user", "quin"]).contains("phone"));
    // One device: only that terminal goes.
    let kicked: Value = serde_json::from_str(&run(&["kick", "quin", "--device", "web", "--json"])).unwrap();
    assert_eq!(kicked["kicked"], 1, "{kicked}");
    assert!(matches!(web.recv(WAIT).unwrap(), Some(ServerFrame::Kicked { .. })));
    let kicked = run(&["kick", "quin"]);
    assert!(kicked.contains('2'), "the phone and the desk: {kicked}");
    assert!(matches!(desk.recv(WAIT).unwrap(), Some(ServerFrame::Kicked { .. })));
    // With --revoke the token the terminal holds is refused from then on.
    let held = node.token("quin");
    let (mut back, _) = TerminalClient::connect(&node.ws_url(), &held, "desk", "desktop").unwrap();
    let kicked = run(&["kick", "quin", "--revoke"]);
    assert!(kicked.contains("refused"), "says the tokens are refused: {kicked}");
    assert!(matches!(back.recv(WAIT).unwrap(), Some(ServerFrame::Kicked { .. })));
    let err = TerminalClient::connect(&node.ws_url(), &held, "desk", "desktop").unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    // Drain: the node stops being ready and tells its terminals to come back elsewhere.
    let mut late = node.terminal("rue", "phone");
    let drained = run(&["drain"]);
    assert!(!drained.trim().is_empty(), "says what it did");
    assert_eq!(node.admin().request("GET", "/readyz", None).unwrap().status, 503);
    assert!(matches!(late.recv(WAIT).unwrap(), Some(ServerFrame::Reconnect { .. })));
    let out = Command::new(env!("CARGO_BIN_EXE_ether"))
        .args(["admin", "--addr", &addr, "--token", "wrong-token", "stats"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401") || String::from_utf8_lossy(&out.stderr).contains("token")
    );
}
