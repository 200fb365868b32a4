//! An audit of the client SDKs against docs/PROTOCOL.md: each test is something a node does
//! (or may do, being of a later version) that an SDK once handled wrong.
//!
//! - The Rust [`TerminalClient`] against a tiny tungstenite server in a thread: a frame of a
//!   type this version does not know (the contract welcomes new frame types) is skipped, not
//!   an error that ends `recv_msg`.
//! - The example terminal (`sdk/examples/terminal.rs`) against a real node: it heartbeats at
//!   the pace the node's `welcome` asks for, so a node with a short idle timeout keeps it.
//! - The JS SDK against a scripted node (`sdk/js/test/audit.mjs`, a fake WebSocket): a refused
//!   `sync` is sent again, a `read` made offline goes once back, a group joined while away is
//!   synced, sends pending at a final close are rejected, broadcasts are deduplicated, a kick
//!   is final whatever the close code, a connection without `welcome` is given up, a refused
//!   URL is reported, the backoff grows against a node closing right after `welcome`. Those
//!   need `node` (20 with `--experimental-websocket`, or newer); without it they print
//!   "skipped: node not installed" and pass.
mod support;

use std::net::TcpListener;
use std::time::Duration;

use ether_sdk::tungstenite::{self, Message};
use ether_sdk::{SdkError, TerminalClient};
use support::example::ExampleTerminal;
use support::*;

// ---- the Rust TerminalClient -------------------------------------------------------------

/// A node of a later version may send frame types this SDK does not know ("extensions are
/// welcome: new frame types"): `recv` skips them, so `recv_msg` still gets the message after
/// one, and a known frame that does not decode is still an error.
#[test]
fn the_rust_client_skips_frames_of_unknown_types() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut ws = tungstenite::accept(stream).expect("upgrade");
        let welcome =
            r#"{"type":"welcome","user":"bob","device":"d","session":"s","heartbeat_s":30,"inbox_seq":0,"groups":{}}"#;
        let msg =
            r#"{"type":"msg","id":"1","chat":"u:ann","from":"ann","seq":1,"kind":"text","body":{"text":"hi"},"ts":1}"#;
        for frame in [
            welcome,
            r#"{"type":"typing","chat":"u:ann","from":"ann"}"#,
            r#"{"type":"presence","user":"ann","online":true}"#,
            msg,
            r#"{"type":"sent","cid":"c-1"}"#,
        ] {
            ws.send(Message::text(frame)).expect("send");
        }
        // Wait for the client's close.
        while ws.read().is_ok() {}
    });
    let (mut t, _) = TerminalClient::connect(&format!("ws://{addr}"), "token", "d", "web").expect("connects");
    let m = t.recv_msg(Duration::from_secs(5)).expect("the message after the unknown frames");
    assert_eq!((m.id.as_str(), m.seq), ("1", 1));
    // A `sent` without its id is broken, not new: still an error.
    match t.recv(Duration::from_secs(5)) {
        Err(SdkError::Decode(e)) => assert!(e.contains("sent"), "{e}"),
        other => panic!("a broken known frame: {other:?}"),
    }
    let _ = t.close();
    server.join().expect("server thread");
}

// ---- the example terminal ----------------------------------------------------------------

/// "Send a heartbeat every `heartbeat_s / 2` seconds": a node whose idle timeout (here 3 s) is
/// shorter than the example's default `--ping-s` (20 s) must not close it with 4003 while it
/// sits idle; a message sent after that still reaches it.
#[test]
fn the_example_terminal_heartbeats_as_the_welcome_asks() {
    let node = TestNode::with(|c| {
        c.limits.idle_timeout = Duration::from_secs(3);
        c.limits.heartbeat_s = 1;
    });
    let mut example = ExampleTerminal::start(&node, "cli");
    let welcomed = example.read_until(Duration::from_secs(20), |_| {}, |p| p.iter().any(|l| l.starts_with("welcome ")));
    assert!(welcomed, "no welcome: {:?}", example.printed);
    // Idle for well over the idle timeout.
    std::thread::sleep(Duration::from_secs(7));
    let alive = example.is_running();
    if alive {
        node.gateway().send_message(&text("ann", "bob", "still there?")).expect("API send");
        example.read_until(Duration::from_secs(10), |_| {}, |p| p.iter().any(|l| l.ends_with("ann: still there?")));
    }
    let (_, printed, stderr) = example.finish();
    let all = printed.join("\n");
    assert!(alive, "the example ended while idle; output:\n{all}\nstderr:\n{stderr}");
    assert!(printed.iter().any(|l| l.ends_with("ann: still there?")), "output:\n{all}\nstderr:\n{stderr}");
}

/// Runs the example as bob's `device` against `node` until every line of `want` is printed
/// (at most `within`), then ends its input; what it printed, and its stderr.
fn run_example_until(node: &TestNode, device: &str, want: &[String], within: Duration) -> (Vec<String>, String) {
    let mut example = ExampleTerminal::start(node, device);
    example.read_until(within, |_| {}, |p| want.iter().all(|w| p.contains(w)));
    let (_, printed, stderr) = example.finish();
    (printed, stderr)
}

/// A `sync` refused with `rate_limited` (here the node allows one `sync` or `read` a second,
/// and the example asks for the next page as soon as a `synced` says `more`) is sent again:
/// the example once waited for its `synced` forever, printing the first page only.
#[test]
fn the_example_terminal_sends_a_refused_sync_again() {
    let node = TestNode::with(|c| {
        c.limits.terminal_requests_per_s = 1;
        c.limits.terminal_requests_burst = 1;
    });
    let gw = node.gateway();
    // 20 messages: pages of 8 (`Config::test_min`), so three syncs.
    for i in 1..=20 {
        gw.send_message(&text("dan", "bob", &format!("m{i}"))).expect("API send");
    }
    let want: Vec<String> = (1..=20).map(|i| format!("[u:dan #{i}] dan: m{i}")).collect();
    let (printed, stderr) = run_example_until(&node, "cli", &want, Duration::from_secs(30));
    let all = printed.join("\n");
    for w in &want {
        let n = printed.iter().filter(|l| *l == w).count();
        assert_eq!(n, 1, "{w:?} printed {n} times; output:\n{all}\nstderr:\n{stderr}");
    }
}

// ---- the JS SDK --------------------------------------------------------------------------

/// Runs one case of `sdk/js/test/audit.mjs` and checks its verdict.
fn js_case(case: &str) {
    support::js::assert_script_passes("audit.mjs", &[case]);
}

/// A `sync` answered `rate_limited` (or `unavailable`) instead of `synced` is sent again: the
/// SDK once waited forever for its `synced`, never catching up (a `read` per message of a
/// catch-up uses the same `limits.terminal_requests_per_s`).
#[test]
fn the_js_sdk_sends_a_refused_sync_again() {
    js_case("sync_refused_is_retried");
}

/// `read()` while the connection is down (reconnecting) once vanished: no receipt for the
/// peer, the chat stayed unread. It goes once the terminal is back.
#[test]
fn the_js_sdk_sends_again_only_a_sync_the_node_refused() {
    js_case("only_a_refused_sync_is_sent_again");
}

#[test]
fn the_js_sdk_sends_a_read_made_offline_after_reconnecting() {
    js_case("read_while_offline_is_sent_after_reconnecting");
}

/// A group the user was added to while the device was away: the SDK once put it at its head,
/// skipping (for good) what was posted in it meanwhile.
#[test]
fn the_js_sdk_syncs_a_group_joined_while_away() {
    js_case("group_joined_while_away_is_synced");
}

/// A send waiting for `sent` when the terminal is kicked (4001) is rejected at once, not only
/// after its timeout.
#[test]
fn the_js_sdk_rejects_pending_sends_when_closed_for_good() {
    js_case("pending_sends_fail_on_a_final_close");
}

/// "Dedupe it by `id` like any message": a broadcast that comes twice is handed over once.
#[test]
fn the_js_sdk_deduplicates_broadcasts() {
    js_case("broadcasts_are_deduplicated_by_id");
}

/// A `kicked` frame followed by an abnormal close (1006) is final like a 4001: the SDK once
/// reconnected, kicking the device's newer connection in turn.
#[test]
fn the_js_sdk_stays_closed_after_kicked_whatever_the_close_code() {
    js_case("kicked_then_abnormal_close_stays_closed");
}

/// A connection that gets no `welcome` is given up after `welcomeTimeoutMs` and tried again
/// (it stayed `connecting` for good).
#[test]
fn the_js_sdk_gives_up_a_connection_without_welcome() {
    js_case("no_welcome_is_given_up_and_retried");
}

/// A URL the WebSocket API refuses closes the terminal with an `error` event (it was an
/// unhandled rejection with the terminal left connecting).
#[test]
fn the_js_sdk_reports_a_refused_url() {
    js_case("a_refused_url_closes_with_an_error");
}

/// Connections closed right after their `welcome` are retried with a growing backoff (reset
/// only by a connection that stayed up `stableAfterMs`): it was reset at every `welcome`.
#[test]
fn the_js_sdk_backs_off_from_a_node_closing_right_after_welcome() {
    js_case("the_backoff_grows_when_connections_close_right_after_welcome");
}
