//! A runnable Ether-IM terminal for the command line.
//!
//! ```text
//! cargo run -p ether-sdk --example terminal -- --url ws://127.0.0.1:9000 --token <JWT> \
//!     [--device laptop] [--platform desktop] [--header-token] [--proto] [--ping-s 20]
//! # over TLS (a node with listen.client_tls); --ca for a private CA or a self-signed node
//! cargo run -p ether-sdk --example terminal -- --url wss://localhost:9443 --ca node.pem --token <JWT>
//! ```
//!
//! Get a token with `ether token --user alice` (or `POST /v1/tokens` on the api port); the
//! token can also come from the `ETHER_TOKEN` environment variable.
//!
//! What it does:
//! - connects to `<url>/ws?token=..&device=..&platform=..` and prints the `welcome`; with
//!   `--proto` it speaks the binary subprotocol `ether.v1.proto` (Protocol Buffers frames,
//!   `proto/ether.v1.proto`) instead of JSON, and prints exactly the same;
//! - prints every message on one line, `[u:alice #12] alice: hello` (chat, seq, sender, text;
//!   other kinds as `[image <url>]`, `[file <name> <url>]`, ...), and the other frames
//!   (`sent`, `error`, `receipt`, `kicked`, ...) in a readable form; a message received again
//!   (delivery is at-least-once) is not printed twice;
//! - acks every message cumulatively, on its own stream (the inbox, or its group);
//! - sends a `ping` frame every 20 s (`--ping-s`);
//! - reads stdin: `@bob hello there` sends "hello there" to user bob, `#team hi all` to group
//!   team, each with a random `cid` (the answer is a `sent` line);
//! - exits cleanly, closing the WebSocket, on Ctrl-C or end of input (Ctrl-D); exits with
//!   status 1 when the connection fails or the server closes it (e.g. `kicked`, close 4001).
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use ether_sdk::proto::frame::Msg;
use ether_sdk::proto::{Kind, ServerFrame};
use ether_sdk::terminal::DEFAULT_WS_URL;
use ether_sdk::{ConnectOptions, SdkError, TerminalClient};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "An Ether-IM terminal: prints messages, sends `@user text` lines")]
struct Args {
    /// WebSocket base URL of the node's client port.
    #[arg(long, default_value = DEFAULT_WS_URL)]
    url: String,
    /// Terminal JWT (`ether token --user U`).
    #[arg(long, env = "ETHER_TOKEN", hide_env_values = true)]
    token: String,
    /// Device id of this terminal.
    #[arg(long, default_value = "cli")]
    device: String,
    /// Platform: web, ios, android, desktop or other.
    #[arg(long, default_value = "desktop")]
    platform: String,
    /// Send the token as `Authorization: Bearer` instead of in the URL.
    #[arg(long)]
    header_token: bool,
    /// Speak `ether.v1.proto` (binary Protocol Buffers frames) instead of `ether.v1.json`.
    #[arg(long)]
    proto: bool,
    /// Seconds between `ping` frames.
    #[arg(long, default_value_t = 20)]
    ping_s: u64,
    /// With a `wss://` URL: PEM certificate(s) to trust instead of the Mozilla roots (a
    /// private CA, or the node's own self-signed certificate).
    #[arg(long, value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
}

/// A line typed by the user, or the end of input.
enum Input {
    Line(String),
    Eof,
}

/// Remembers the last ids seen, to skip redelivered messages.
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    const MAX: usize = 10_000;

    fn new() -> Seen {
        Seen { set: HashSet::new(), order: VecDeque::new() }
    }

    /// Whether `id` is new (and remember it).
    fn insert(&mut self, id: &str) -> bool {
        if !self.set.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > Self::MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

fn body_str<'a>(body: &'a Value, key: &str) -> &'a str {
    body.get(key).and_then(Value::as_str).unwrap_or("?")
}

/// `[u:alice #12] alice: hello`
fn format_msg(m: &Msg) -> String {
    let b = &m.body;
    let content = match m.kind {
        Kind::Text => body_str(b, "text").to_owned(),
        Kind::Image => format!("[image {}]", body_str(b, "url")),
        Kind::File => format!("[file {} {}]", body_str(b, "name"), body_str(b, "url")),
        Kind::Voice => {
            let ms = b.get("duration_ms").and_then(Value::as_u64).unwrap_or(0);
            format!("[voice {:.1}s {}]", ms as f64 / 1000.0, body_str(b, "url"))
        }
        Kind::Custom => format!("[custom {}]", b.get("data").unwrap_or(&Value::Null)),
    };
    format!("[{} #{}] {}: {}", m.chat, m.seq, m.from, content)
}

/// What a typed line asks for: `(to_user, to_group, text)`.
fn parse_line(line: &str) -> Option<(Option<&str>, Option<&str>, &str)> {
    let line = line.trim();
    let (target, text) = line.split_once(char::is_whitespace)?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Some(user) = target.strip_prefix('@').filter(|u| !u.is_empty()) {
        return Some((Some(user), None, text));
    }
    if let Some(group) = target.strip_prefix('#').filter(|g| !g.is_empty()) {
        return Some((None, Some(group), text));
    }
    None
}

fn new_cid() -> String {
    format!("cli-{:016x}", rand::random::<u64>())
}

struct Session {
    client: TerminalClient,
    seen: Seen,
    /// Highest seq acked per stream: `None` is the inbox, `Some(gid)` a group.
    acked: HashMap<Option<String>, u64>,
}

impl Session {
    fn on_frame(&mut self, frame: ServerFrame) -> Result<(), SdkError> {
        match frame {
            ServerFrame::Msg(m) => {
                if self.seen.insert(&m.id) {
                    println!("{}", format_msg(&m));
                }
                let stream = m.chat.strip_prefix("g:").map(str::to_owned);
                let acked = self.acked.entry(stream).or_insert(0);
                if m.seq > *acked {
                    *acked = m.seq;
                    self.client.ack_msg(&m)?;
                }
            }
            ServerFrame::Sent { cid, id, seq, .. } => {
                println!("  (sent {cid}: id {id}, #{seq})")
            }
            ServerFrame::Error { code, message, reference } => match reference {
                Some(r) => println!("! error {code} ({r}): {message}"),
                None => println!("! error {code}: {message}"),
            },
            ServerFrame::Receipt { chat, by, up_to } => {
                println!("[{chat}] {by} read up to {up_to}")
            }
            ServerFrame::ReadSync { chat, seq } => {
                println!("[{chat}] read up to #{seq} on another device")
            }
            ServerFrame::Synced { inbox_seq, more, .. } => {
                println!("  (synced to inbox #{inbox_seq}{})", if more { ", more" } else { "" })
            }
            ServerFrame::Kicked { reason } => println!("kicked: {reason}"),
            ServerFrame::Reconnect { after_ms } => {
                println!("the node is draining: reconnect after {after_ms} ms")
            }
            ServerFrame::Welcome { user, session, .. } => {
                println!("welcome again: {user} (session {session})")
            }
            ServerFrame::Pong => {}
        }
        Ok(())
    }

    fn on_line(&mut self, line: &str) -> Result<(), SdkError> {
        if line.trim().is_empty() {
            return Ok(());
        }
        match parse_line(line) {
            Some((Some(user), _, text)) => self.client.send_text(&new_cid(), user, text),
            Some((None, Some(group), text)) => self.client.send_group_text(&new_cid(), group, text),
            _ => {
                eprintln!("type `@user message` or `#group message`");
                Ok(())
            }
        }
    }
}

fn run(args: Args) -> Result<(), SdkError> {
    let mut opts = ConnectOptions::new(&args.token, &args.device, &args.platform);
    opts.token_in_header = args.header_token;
    if args.proto {
        opts = opts.subprotocol(ether_sdk::proto::pb::SUBPROTOCOL_PROTO);
    }
    if let Some(ca) = &args.ca {
        let pem = std::fs::read(ca).map_err(|e| SdkError::Tls(format!("--ca {}: {e}", ca.display())))?;
        opts = opts.tls(ether_sdk::tls_config_with_roots(&pem)?);
    }
    let (client, w) = TerminalClient::connect_with(&args.url, &opts)?;
    let groups: Vec<String> = w.groups.iter().map(|(g, s)| format!("{g}#{s}")).collect();
    println!(
        "welcome {} on {} (session {}, inbox #{}, groups [{}])",
        w.user,
        w.device,
        w.session,
        w.inbox_seq,
        groups.join(", ")
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        if let Err(e) = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)) {
            eprintln!("(no Ctrl-C handler: {e})");
        }
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Input::Line(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(Input::Eof);
    });

    let mut s = Session { client, seen: Seen::new(), acked: HashMap::new() };
    let ping_every = Duration::from_secs(args.ping_s.max(1));
    let mut next_ping = Instant::now() + ping_every;
    while !stop.load(Ordering::SeqCst) {
        if let Some(frame) = s.client.recv(Duration::from_millis(100))? {
            s.on_frame(frame)?;
        }
        loop {
            match rx.try_recv() {
                Ok(Input::Line(l)) => s.on_line(&l)?,
                Ok(Input::Eof) | Err(TryRecvError::Disconnected) => {
                    stop.store(true, Ordering::SeqCst);
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if Instant::now() >= next_ping {
            s.client.ping()?;
            next_ping = Instant::now() + ping_every;
        }
    }
    s.client.close()?;
    println!("bye");
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(SdkError::Rejected { status, message }) => {
            eprintln!("the node refused the connection: HTTP {status}: {message}");
            ExitCode::FAILURE
        }
        Err(SdkError::Closed { code, reason }) => {
            let code = code.map_or_else(|| "no code".to_owned(), |c| c.to_string());
            eprintln!("connection closed by the server ({code}): {reason}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(parse_line("@bob hello there"), Some((Some("bob"), None, "hello there")));
        assert_eq!(parse_line("  #team  hi "), Some((None, Some("team"), "hi")));
        assert_eq!(parse_line("@bob"), None);
        assert_eq!(parse_line("@ hi"), None);
        assert_eq!(parse_line("hello"), None);
    }

    #[test]
    fn messages() {
        let m = Msg {
            id: "1".into(),
            cid: None,
            chat: "u:alice".into(),
            from: "alice".into(),
            seq: 12,
            kind: Kind::Text,
            body: serde_json::json!({"text": "hello"}),
            ts: 0,
        };
        assert_eq!(format_msg(&m), "[u:alice #12] alice: hello");
        let v = Msg { kind: Kind::Voice, body: serde_json::json!({"url": "https://x/v", "duration_ms": 1500}), ..m };
        assert_eq!(format_msg(&v), "[u:alice #12] alice: [voice 1.5s https://x/v]");
        let mut seen = Seen::new();
        assert!(seen.insert("a"));
        assert!(!seen.insert("a"));
    }
}
