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
//! - catches up: when the `welcome` shows messages stored while this device was away (its
//!   heads past `delivered`, what the device last acknowledged), it `sync`s them page by page
//!   and prints them like live ones;
//! - acks cumulatively, on each stream (the inbox, or a group), only up to the seq it has
//!   everything of: a live message that arrives past a gap is printed, but acked once the gap
//!   is filled (by a `sync`; see `Positions`); a `sync` the node refuses (`rate_limited`,
//!   `unavailable`) goes again a second later;
//! - sends a `ping` frame every 20 s (`--ping-s`), or every `heartbeat_s / 2` when the node's
//!   `welcome` asks for more often (a node closes a terminal silent for its idle timeout);
//! - reads stdin: `@bob hello there` sends "hello there" to user bob, `#team hi all` to group
//!   team, each with a random `cid` (the answer is a `sent` line);
//! - exits cleanly, closing the WebSocket, on Ctrl-C or end of input (Ctrl-D); exits with
//!   status 1 when the connection fails or the server closes it (e.g. `kicked`, close 4001).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use ether_sdk::proto::frame::{FrameType, Msg};
use ether_sdk::proto::{ErrorCode, Kind, ServerFrame};
use ether_sdk::terminal::DEFAULT_WS_URL;
use ether_sdk::{ConnectOptions, SdkError, TerminalClient, Welcome};
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
    /// Seconds between `ping` frames (at most: more often if the node's `heartbeat_s` asks).
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

/// How often to `ping`: every `ping_s` seconds, or every `heartbeat_s / 2` (what the node's
/// `welcome` asks for) if that is more often; at least every 500 ms apart.
fn ping_interval(ping_s: u64, heartbeat_s: u64) -> Duration {
    let asked = Duration::from_millis(heartbeat_s.saturating_mul(500));
    Duration::from_secs(ping_s).min(asked).max(Duration::from_millis(500))
}

fn new_cid() -> String {
    format!("cli-{:016x}", rand::random::<u64>())
}

/// A stream of messages: `None` is the user's inbox, `Some(gid)` group `gid`.
type StreamId = Option<String>;

/// What this terminal has of one stream.
#[derive(Debug, Default)]
struct Stream {
    /// Every seq up to this one is here (printed now, or acked by this device before). An
    /// `ack` is cumulative ("I have everything up to seq"), so this is the only seq it may
    /// name: acking a seq past a missing one would tell the node the missing one arrived, and
    /// it would never come.
    have: u64,
    /// Seqs received past a gap (e.g. a live message that overtook the `sync` of what came
    /// before it): printed already, acked once the gap below them is filled.
    ahead: BTreeSet<u64>,
}

impl Stream {
    /// Moves `have` up to `seq`, then over the seqs held past it.
    fn advance(&mut self, seq: u64) {
        self.have = self.have.max(seq);
        self.ahead = self.ahead.split_off(&(self.have + 1));
        while self.ahead.remove(&(self.have + 1)) {
            self.have += 1;
        }
    }
}

/// The `sync` being answered: where it started, and the lowest seq received since, per stream.
#[derive(Debug)]
struct Syncing {
    from: BTreeMap<StreamId, u64>,
    low: HashMap<StreamId, u64>,
}

/// The delivery rules of a terminal (docs/PROTOCOL.md, "Delivery"), without the I/O: what to
/// print, what to ack, when to `sync`.
#[derive(Debug)]
struct Positions {
    /// The inbox first, then the groups by id: the order of the messages of a `sync` page.
    streams: BTreeMap<StreamId, Stream>,
    syncing: Option<Syncing>,
    /// How many `sync`s were started: tells whether the one being answered is still the same.
    syncs: u64,
}

impl Positions {
    /// Starts from what the node says this device acknowledged (`welcome.delivered`; nothing
    /// for a new device, which then gets the stored history); whether it is behind the heads.
    fn from_welcome(w: &Welcome) -> (Positions, bool) {
        let delivered = w.delivered.clone().unwrap_or_default();
        let mut streams = BTreeMap::new();
        streams.insert(None, Stream { have: delivered.inbox_seq, ahead: BTreeSet::new() });
        let mut behind = w.inbox_seq > delivered.inbox_seq;
        for (gid, &head) in &w.groups {
            let mut have = delivered.groups.get(gid).copied().unwrap_or(0);
            if have > head {
                have = 0; // a group created again with this id: a new stream, from seq 1
            }
            behind |= head > have;
            streams.insert(Some(gid.clone()), Stream { have, ahead: BTreeSet::new() });
        }
        (Positions { streams, syncing: None, syncs: 0 }, behind)
    }

    /// A `msg` with `seq` on `stream`: whether it is new (to print), and the ack to send.
    fn on_msg(&mut self, stream: &StreamId, seq: u64) -> (bool, Option<u64>) {
        if let Some(sync) = &mut self.syncing {
            if sync.from.get(stream).is_some_and(|&from| seq > from) {
                let low = sync.low.entry(stream.clone()).or_insert(seq);
                *low = (*low).min(seq);
            }
        }
        let s = self.streams.entry(stream.clone()).or_default();
        if seq <= s.have {
            // Here already (pushed again, or by both a page and live): ack again, which is how
            // the node stops pushing it again.
            return (false, Some(s.have));
        }
        if seq > s.have + 1 {
            // Past a gap: print, do not ack (`needs_sync` fetches the gap).
            return (s.ahead.insert(seq), None);
        }
        s.advance(seq);
        (true, Some(s.have))
    }

    /// Starts a `sync` from the positions: `(inbox_seq, groups)` to send.
    fn start_sync(&mut self) -> (u64, BTreeMap<String, u64>) {
        let from: BTreeMap<StreamId, u64> = self.streams.iter().map(|(id, s)| (id.clone(), s.have)).collect();
        let inbox = from.get(&None).copied().unwrap_or(0);
        let groups = from.iter().filter_map(|(id, &seq)| Some((id.clone()?, seq))).collect();
        self.syncing = Some(Syncing { from, low: HashMap::new() });
        self.syncs += 1;
        (inbox, groups)
    }

    /// A `synced` (the end of a page): the acks to send for the positions it moved.
    ///
    /// Pages skip messages no longer stored (purged by retention), which must not stay gaps.
    /// After the last page (`more: false`) everything up to each head was sent, so each stream
    /// has everything up to its head. After another page, only the first stream that was
    /// behind surely had room in the page: the first seq it got since the `sync` (a live one
    /// is never below it) is the first stored one.
    fn on_synced(&mut self, inbox_seq: u64, groups: &BTreeMap<String, u64>, more: bool) -> Vec<(StreamId, u64)> {
        // Groups the user is not in any more (removed, or dissolved) are not synced: forget them.
        self.streams.retain(|id, _| id.as_ref().is_none_or(|gid| groups.contains_key(gid)));
        let Some(sync) = self.syncing.take() else { return Vec::new() };
        let mut acks = Vec::new();
        for (id, from) in sync.from {
            let head = match &id {
                None => Some(inbox_seq),
                Some(gid) => groups.get(gid).copied(),
            };
            let Some(head) = head.filter(|&head| head > from) else {
                continue; // nothing was due (or not a member any more)
            };
            let to = match (more, sync.low.get(&id)) {
                (false, _) | (true, None) => head,
                (true, Some(&low)) => (low - 1).min(head), // low > from >= 0
            };
            let Some(s) = self.streams.get_mut(&id) else { continue };
            let before = s.have;
            s.advance(to);
            if s.have > before {
                acks.push((id, s.have));
            }
            if more {
                break;
            }
        }
        acks
    }

    /// Whether a gap waits for a `sync` that is not being answered: after `welcome`, a live
    /// message past a missing seq, or a page that left one.
    fn needs_sync(&self) -> bool {
        self.syncing.is_none() && self.streams.values().any(|s| !s.ahead.is_empty())
    }
}

/// How long after a refused `sync` it is sent again.
const SYNC_RETRY: Duration = Duration::from_secs(1);

struct Session {
    client: TerminalClient,
    /// A `sync` that may have been refused: when to send it again, if the same one (by
    /// [`Positions::syncs`]) is still unanswered then.
    sync_retry: Option<(Instant, u64)>,
    /// Ids of broadcasts (`chat: "broadcast"`, no seq) seen, to print each once.
    seen: Seen,
    positions: Positions,
}

impl Session {
    /// Sends the next `sync`, from the positions.
    fn sync(&mut self) -> Result<(), SdkError> {
        let (inbox_seq, groups) = self.positions.start_sync();
        self.client.sync(inbox_seq, groups, None)
    }

    fn ack(&mut self, stream: &StreamId, seq: u64) -> Result<(), SdkError> {
        match stream {
            None => self.client.ack(seq),
            Some(gid) => self.client.ack_group(gid, seq),
        }
    }

    fn on_frame(&mut self, frame: ServerFrame) -> Result<(), SdkError> {
        match frame {
            ServerFrame::Msg(m) if m.chat == "broadcast" => {
                // Not stored, no seq, no ack.
                if self.seen.insert(&m.id) {
                    println!("{}", format_msg(&m));
                }
            }
            ServerFrame::Msg(m) => {
                let stream = m.chat.strip_prefix("g:").map(str::to_owned);
                let (new, ack) = self.positions.on_msg(&stream, m.seq);
                if new {
                    println!("{}", format_msg(&m));
                }
                if let Some(seq) = ack {
                    self.ack(&stream, seq)?;
                }
                if self.positions.needs_sync() {
                    self.sync()?;
                }
            }
            ServerFrame::Synced { inbox_seq, groups, more } => {
                println!("  (synced to inbox #{inbox_seq}{})", if more { ", more" } else { "" });
                for (stream, seq) in self.positions.on_synced(inbox_seq, &groups, more) {
                    self.ack(&stream, seq)?;
                }
                // Page by page until `more: false`; again if live messages left a gap meanwhile.
                if more || self.positions.needs_sync() {
                    self.sync()?;
                }
            }
            ServerFrame::Sent { cid, id, seq, .. } => {
                println!("  (sent {cid}: id {id}, #{seq})")
            }
            ServerFrame::Error { code, message, reference, of } => match reference {
                Some(r) => println!("! error {code} ({r}): {message}"),
                None => {
                    println!("! error {code}: {message}");
                    // Without a `ref`: a refused `sync`, `read` or `ack` (`of` says which; a
                    // node of an earlier version does not). A refused `sync` goes again in a
                    // moment (without `of` the one being answered may be it: if it was not, the
                    // node answers that one is being answered, and it goes again).
                    if self.positions.syncing.is_some()
                        && matches!(of, None | Some(FrameType::Sync))
                        && matches!(code, ErrorCode::RateLimited | ErrorCode::Unavailable)
                    {
                        self.sync_retry = Some((Instant::now() + SYNC_RETRY, self.positions.syncs));
                    }
                }
            },
            ServerFrame::Receipt { chat, by, up_to } => {
                println!("[{chat}] {by} read up to {up_to}")
            }
            ServerFrame::ReadSync { chat, seq } => {
                println!("[{chat}] read up to #{seq} on another device")
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

    /// Sends the refused `sync` again once it is time, unless it was answered meanwhile.
    fn retry_sync(&mut self) -> Result<(), SdkError> {
        match self.sync_retry {
            Some((at, syncs)) if Instant::now() >= at => {
                self.sync_retry = None;
                if self.positions.syncing.is_some() && self.positions.syncs == syncs {
                    self.sync()?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
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

    // Behind (messages were stored while this device was away): fetch them first. Live
    // messages arriving meanwhile are printed at once, and acked once the pages got to them.
    let (positions, behind) = Positions::from_welcome(&w);
    let mut s = Session { client, sync_retry: None, seen: Seen::new(), positions };
    if behind {
        s.sync()?;
    }
    let ping_every = ping_interval(args.ping_s, w.heartbeat_s);
    let mut next_ping = Instant::now() + ping_every;
    while !stop.load(Ordering::SeqCst) {
        if let Some(frame) = s.client.recv(Duration::from_millis(100))? {
            s.on_frame(frame)?;
        }
        s.retry_sync()?;
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

    #[test]
    fn pings_as_often_as_the_node_asks() {
        assert_eq!(ping_interval(20, 30), Duration::from_secs(15));
        assert_eq!(ping_interval(10, 30), Duration::from_secs(10));
        assert_eq!(ping_interval(20, 1), Duration::from_millis(500));
        assert_eq!(ping_interval(0, 0), Duration::from_millis(500));
    }

    fn welcome(inbox_seq: u64, groups: &[(&str, u64)], delivered: Option<(u64, &[(&str, u64)])>) -> Welcome {
        let map = |g: &[(&str, u64)]| g.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
        Welcome {
            user: "bob".into(),
            device: "cli".into(),
            session: "s".into(),
            heartbeat_s: 30,
            inbox_seq,
            groups: map(groups),
            delivered: delivered.map(|(inbox_seq, g)| ether_sdk::proto::frame::Positions { inbox_seq, groups: map(g) }),
        }
    }

    const INBOX: StreamId = None;

    fn team() -> StreamId {
        Some("team".into())
    }

    #[test]
    fn a_device_behind_syncs_from_what_it_acked_and_acks_only_what_it_has() {
        let (mut p, behind) = Positions::from_welcome(&welcome(5, &[("team", 3)], Some((2, &[("team", 1)]))));
        assert!(behind);
        assert_eq!(p.start_sync(), (2, [("team".to_owned(), 1)].into_iter().collect()));
        // A live message overtakes the pages: printed, not acked (3..5 are missing).
        assert_eq!(p.on_msg(&INBOX, 6), (true, None));
        assert!(!p.needs_sync(), "the sync under way fills the gap");
        assert_eq!(p.on_msg(&INBOX, 3), (true, Some(3)));
        assert_eq!(p.on_msg(&INBOX, 4), (true, Some(4)));
        assert_eq!(p.on_msg(&INBOX, 5), (true, Some(6)), "the gap is filled: acked up to the live one");
        assert_eq!(p.on_msg(&team(), 2), (true, Some(2)));
        assert_eq!(p.on_msg(&team(), 3), (true, Some(3)));
        // Again (a page and live, or a resend): not printed twice, acked again.
        assert_eq!(p.on_msg(&INBOX, 6), (false, Some(6)));
        assert_eq!(p.on_msg(&team(), 2), (false, Some(3)));
        let heads = [("team".to_owned(), 3)].into_iter().collect();
        assert_eq!(p.on_synced(6, &heads, false), vec![]);
        assert!(!p.needs_sync());
    }

    #[test]
    fn up_to_date_devices_do_not_sync_and_new_ones_get_the_history() {
        let (_, behind) = Positions::from_welcome(&welcome(5, &[("team", 3)], Some((5, &[("team", 3)]))));
        assert!(!behind);
        let (mut p, behind) = Positions::from_welcome(&welcome(5, &[("team", 3)], None));
        assert!(behind);
        assert_eq!(p.start_sync(), (0, [("team".to_owned(), 0)].into_iter().collect()));
        // A group created again (its position is past its head) starts over.
        let (mut p, behind) = Positions::from_welcome(&welcome(5, &[("team", 3)], Some((5, &[("team", 9)]))));
        assert!(behind);
        assert_eq!(p.start_sync().1["team"], 0);
    }

    #[test]
    fn a_live_gap_is_not_acked_over_but_synced() {
        let (mut p, behind) = Positions::from_welcome(&welcome(2, &[], Some((2, &[]))));
        assert!(!behind);
        assert_eq!(p.on_msg(&INBOX, 4), (true, None), "3 is missing");
        assert!(p.needs_sync());
        assert_eq!(p.start_sync().0, 2);
        assert!(!p.needs_sync(), "one sync at a time");
        assert_eq!(p.on_msg(&INBOX, 3), (true, Some(4)));
        assert_eq!(p.on_msg(&INBOX, 4), (false, Some(4)));
        assert_eq!(p.on_synced(4, &BTreeMap::new(), false), vec![]);
        assert!(!p.needs_sync());
    }

    #[test]
    fn seqs_purged_from_the_store_do_not_stay_gaps() {
        let (mut p, _) = Positions::from_welcome(&welcome(20, &[("team", 9)], Some((0, &[("team", 0)]))));
        let heads: BTreeMap<String, u64> = [("team".to_owned(), 9)].into_iter().collect();
        p.start_sync();
        // 1..10 were purged: the first page starts at 11.
        for seq in 11..=14 {
            assert_eq!(p.on_msg(&INBOX, seq), (true, None));
        }
        assert_eq!(p.on_synced(20, &heads, true), vec![(INBOX, 14)]);
        assert!(!p.needs_sync());
        assert_eq!(p.start_sync().0, 14);
        for seq in 15..=20 {
            assert_eq!(p.on_msg(&INBOX, seq), (true, Some(seq)));
        }
        // Of the group, only 8 and 9 are stored; the last page says everything was sent.
        assert_eq!(p.on_msg(&team(), 8), (true, None));
        assert_eq!(p.on_msg(&team(), 9), (true, None));
        assert_eq!(p.on_synced(20, &heads, false), vec![(team(), 9)]);
        assert!(!p.needs_sync());
    }

    #[test]
    fn a_group_left_is_forgotten() {
        let (mut p, _) = Positions::from_welcome(&welcome(0, &[("team", 3)], Some((0, &[("team", 1)]))));
        p.start_sync();
        assert_eq!(p.on_msg(&team(), 3), (true, None));
        assert_eq!(p.on_synced(0, &BTreeMap::new(), false), vec![]);
        assert!(!p.needs_sync(), "no sync loop for a group the user is not in");
    }
}
