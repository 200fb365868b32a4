//! Crash test: the real `ether` binary, under concurrent `POST /v1/messages` from several
//! business-system threads, is killed with SIGKILL and restarted on the same data dir. Every
//! message that had been answered 200 must then be delivered by `sync` exactly once, in seq
//! order, with no gap in any inbox; a message whose answer was lost with the process may or may
//! not be stored, but at most once; and `cid` idempotency survives the crash.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ether_proto::api::SendMessage;
use ether_proto::frame::{Msg, ServerFrame};
use ether_proto::ClientFrame;
use ether_sdk::{GatewayClient, SdkError, TerminalClient};

const SENDERS: usize = 4;
const RECEIVERS: usize = 8;
/// Sending lasts at least this long before the kill...
const SEND_FOR: Duration = Duration::from_millis(1500);
/// ...and until this many messages were answered 200...
const MIN_ACKED: u64 = 300;
/// ...but never longer than this.
const SEND_AT_MOST: Duration = Duration::from_secs(8);
/// The whole test, start to finish.
const TEST_BUDGET: Duration = Duration::from_secs(30);
/// Messages per `sync` page asked for (small, so that every inbox takes several pages).
const PAGE: u32 = 64;
/// Longest wait for one frame.
const WAIT: Duration = Duration::from_secs(5);

/// The child process, killed and reaped on drop.
struct Node {
    child: Child,
    log: PathBuf,
}

impl Node {
    /// Starts `ether serve` on `data` (2 shards, ephemeral loopback ports) and waits for the
    /// `ports.json` it writes; any old `ports.json` is removed first so the new one is read.
    fn start(bin: &str, data: &Path, log: PathBuf, deadline: Instant) -> (Node, Ports) {
        let ports_file = data.join("ports.json");
        match std::fs::remove_file(&ports_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removing {}: {e}", ports_file.display()),
        }
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(bin)
            .args(["serve", "--shards", "2", "--listen-client", "127.0.0.1:0", "--listen-api", "127.0.0.1:0"])
            .args(["--listen-admin", "127.0.0.1:0", "--data"])
            .arg(data)
            .env_remove("ETHER_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn ether");
        let mut node = Node { child, log };
        let ports = loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file) {
                // Written atomically (temp file + rename): once it exists it is complete.
                let v: serde_json::Value = serde_json::from_str(&text).expect("ports.json is JSON");
                let addr =
                    |k: &str| v[k].as_str().unwrap_or_else(|| panic!("ports.json has no {k}: {text}")).to_owned();
                break Ports { client: addr("client"), api: addr("api") };
            }
            if let Some(status) = node.child.try_wait().expect("try_wait") {
                panic!("ether exited ({status}) before writing ports.json:\n{}", node.log_tail());
            }
            assert!(Instant::now() < deadline, "ports.json never appeared:\n{}", node.log_tail());
            thread::sleep(Duration::from_millis(10));
        };
        (node, ports)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The end of the node's stdout/stderr, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Ports {
    client: String,
    api: String,
}

/// One message a sender thread submitted.
#[derive(Debug, Clone)]
struct Submitted {
    from: String,
    to: String,
    cid: String,
    text: String,
}

impl Submitted {
    fn request(&self) -> SendMessage {
        SendMessage {
            from: self.from.clone(),
            to: self.to.clone(),
            kind: ether_proto::Kind::Text,
            body: serde_json::json!({ "text": self.text }),
            cid: Some(self.cid.clone()),
        }
    }
}

/// What one sender thread saw.
#[derive(Debug, Default)]
struct SenderLog {
    /// Answered 200, in the order sent (each send waits for the previous answer), with the id.
    acked: Vec<(Submitted, String)>,
    /// The send that failed and ended the thread (normally: the process was killed under it).
    failed: Option<Submitted>,
    /// Errors (connection or non-200) seen after the kill began: allowed, not counted as sent.
    errors_after_kill: Vec<String>,
    /// Errors seen while the node was supposed to be healthy: a failure.
    errors_before_kill: Vec<String>,
}

fn sender(
    name: String,
    index: usize,
    api: String,
    key: String,
    killed: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> SenderLog {
    let gw = GatewayClient::new(format!("http://{api}"), key)
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    let started = Instant::now();
    let mut log = SenderLog::default();
    for k in 0.. {
        let to = format!("r{}", (k * 3 + index) % RECEIVERS);
        let cid = format!("{name}-{k}");
        let text = format!("crash test message {cid} from {name} to {to}");
        let m = Submitted { from: name.clone(), to, cid, text };
        let result = gw.send_message(&m.request());
        match result {
            Ok(sent) => {
                log.acked.push((m, sent.id));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let e = describe(&e);
                if killed.load(Ordering::SeqCst) {
                    log.errors_after_kill.push(e);
                } else {
                    log.errors_before_kill.push(e);
                }
                log.failed = Some(m);
                break;
            }
        }
        if started.elapsed() > SEND_AT_MOST + Duration::from_secs(5) {
            log.errors_before_kill.push("still sending long after the kill should have happened".into());
            break;
        }
    }
    log
}

fn describe(e: &SdkError) -> String {
    match e.status() {
        Some(s) => format!("HTTP {s}: {e}"),
        None => format!("connection: {e}"),
    }
}

fn token(bin: &str, data: &Path, user: &str) -> String {
    let out = Command::new(bin).args(["token", "--user", user, "--data"]).arg(data).output().expect("ether token");
    assert!(out.status.success(), "ether token: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 token").trim().to_owned()
}

/// `sync` from `after` through every page (until `synced.more == false`): the messages in
/// arrival order and the last `synced` frame's inbox head.
fn sync_all(t: &mut TerminalClient, mut after: u64, deadline: Instant) -> (Vec<Msg>, u64) {
    let mut got = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "sync did not finish in time ({} messages so far)", got.len());
        t.send_frame(&ClientFrame::Sync { inbox_seq: after, groups: BTreeMap::new(), limit: Some(PAGE) })
            .expect("send sync");
        let mut page = 0;
        loop {
            match t.recv(WAIT).expect("recv during sync") {
                Some(ServerFrame::Msg(m)) => {
                    after = after.max(m.seq);
                    page += 1;
                    got.push(m);
                }
                Some(ServerFrame::Synced { inbox_seq, more, .. }) => {
                    assert!(page <= PAGE as usize, "a sync page of {page} messages, limit {PAGE}");
                    if !more {
                        return (got, inbox_seq);
                    }
                    assert!(page > 0, "an empty sync page that says more = true");
                    break;
                }
                Some(ServerFrame::Pong) => {}
                other => panic!("unexpected frame during sync: {other:?}"),
            }
        }
    }
}

/// Connects `user` and syncs its whole inbox; checks the welcome head, the final head and the
/// seqs: exactly `from+1 ..= head`, strictly increasing, no gap, no duplicate id.
fn inbox(ws: &str, token: &str, user: &str, device: &str, from: u64, deadline: Instant) -> (Vec<Msg>, u64) {
    let (mut t, welcome) = TerminalClient::connect(ws, token, device, "other").expect("terminal connects");
    assert_eq!(welcome.user, user);
    let (msgs, head) = sync_all(&mut t, from, deadline);
    let _ = t.close();
    assert_eq!(head, welcome.inbox_seq, "{user}: synced head vs welcome head");
    let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (from + 1..=head).collect();
    if seqs != expected {
        let gaps: Vec<u64> = expected.iter().copied().filter(|s| !seqs.contains(s)).collect();
        let mut seen = HashSet::new();
        let repeated: Vec<u64> = seqs.iter().copied().filter(|s| !seen.insert(*s)).collect();
        panic!(
            "{user}: sync after {from} returned {} messages, head {head}; missing seqs {gaps:?}, repeated seqs \
             {repeated:?}, out of order: {}",
            seqs.len(),
            seqs.windows(2).any(|w| w[0] >= w[1])
        );
    }
    let mut ids = HashSet::new();
    for m in &msgs {
        assert!(ids.insert(m.id.clone()), "{user}: id {} appears twice (second at seq {})", m.id, m.seq);
    }
    (msgs, head)
}

#[test]
fn acknowledged_messages_survive_sigkill_exactly_once_in_order() {
    let started = Instant::now();
    let deadline = started + TEST_BUDGET;
    let bin = env!("CARGO_BIN_EXE_ether");
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");

    // ---- run 1: concurrent sends, then SIGKILL ----------------------------------------------
    let (mut node, ports) = Node::start(bin, &data, dir.path().join("node-1.log"), deadline);
    let secrets: toml::Table =
        std::fs::read_to_string(data.join("secrets.toml")).expect("secrets.toml").parse().expect("secrets TOML");
    let api_key = secrets["api_key"].as_str().expect("api_key").to_owned();

    let killed = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicU64::new(0));
    let senders: Vec<String> = (0..SENDERS).map(|i| format!("s{i}")).collect();
    let receivers: Vec<String> = (0..RECEIVERS).map(|i| format!("r{i}")).collect();
    let threads: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (name, api, key) = (name.clone(), ports.api.clone(), api_key.clone());
            let (killed, acked) = (killed.clone(), acked_count.clone());
            thread::Builder::new()
                .name(format!("sender-{name}"))
                .spawn(move || sender(name, i, api, key, killed, acked))
                .expect("spawn sender")
        })
        .collect();
    let sending = Instant::now();
    while (sending.elapsed() < SEND_FOR || acked_count.load(Ordering::Relaxed) < MIN_ACKED)
        && sending.elapsed() < SEND_AT_MOST
        && !threads.iter().any(|t| t.is_finished())
    {
        thread::sleep(Duration::from_millis(5));
    }
    let acked_before_kill = acked_count.load(Ordering::Relaxed);
    let sent_for = sending.elapsed();
    killed.store(true, Ordering::SeqCst);
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    let rc = unsafe { libc::kill(node.pid(), libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9: {}", std::io::Error::last_os_error());
    let status = node.child.wait().expect("wait for the killed node");
    let log1 = node.log_tail();
    drop(node);
    let logs: Vec<SenderLog> = threads.into_iter().map(|t| t.join().expect("sender thread panicked")).collect();

    let acked_total: usize = logs.iter().map(|l| l.acked.len()).sum();
    let errors_after: usize = logs.iter().map(|l| l.errors_after_kill.len()).sum();
    println!(
        "crash: {acked_total} messages answered 200 in {sent_for:?} from {SENDERS} senders ({acked_before_kill} \
         counted when the kill was decided); node killed: {status}; {errors_after} sends failed after the kill: {:?}",
        logs.iter().flat_map(|l| l.errors_after_kill.iter()).collect::<Vec<_>>()
    );
    for (name, l) in senders.iter().zip(&logs) {
        assert!(l.errors_before_kill.is_empty(), "{name} failed before the kill: {:?}\n{log1}", l.errors_before_kill);
    }
    assert!(
        acked_total as u64 >= MIN_ACKED,
        "only {acked_total} messages answered 200 in {sent_for:?}; the kill would prove little"
    );

    // Everything submitted, by (sender, cid); per receiver, what must be there and what may be.
    let mut submitted: HashMap<(String, String), Submitted> = HashMap::new();
    let mut acked_id: HashMap<(String, String), String> = HashMap::new();
    for l in &logs {
        for (m, id) in &l.acked {
            submitted.insert((m.from.clone(), m.cid.clone()), m.clone());
            acked_id.insert((m.from.clone(), m.cid.clone()), id.clone());
        }
        if let Some(m) = &l.failed {
            submitted.insert((m.from.clone(), m.cid.clone()), m.clone());
        }
    }
    let distinct_ids: HashSet<&String> = acked_id.values().collect();
    assert_eq!(distinct_ids.len(), acked_id.len(), "two acknowledged messages got the same id");

    // ---- run 2: restart on the same data dir ------------------------------------------------
    let (node, ports) = Node::start(bin, &data, dir.path().join("node-2.log"), deadline);
    let ws = format!("ws://{}", ports.client);
    let gw = GatewayClient::new(format!("http://{}", ports.api), api_key.clone()).with_timeout(WAIT);
    let tokens: HashMap<String, String> =
        senders.iter().chain(&receivers).map(|u| (u.clone(), token(bin, &data, u))).collect();

    // Receivers: every acknowledged message exactly once with its id, nothing unknown, at most
    // once per cid, each sender's messages in the order they were answered.
    let mut heads: HashMap<String, u64> = HashMap::new();
    let mut stored_by_sender: HashMap<String, HashSet<String>> = HashMap::new();
    let mut unacked_stored: HashMap<(String, String), String> = HashMap::new();
    for r in &receivers {
        let (msgs, head) = inbox(&ws, &tokens[r], r, "phone", 0, deadline);
        heads.insert(r.clone(), head);
        let mut by_key: HashMap<(String, String), &Msg> = HashMap::new();
        for m in &msgs {
            assert_eq!(m.chat, format!("u:{}", m.from), "{r}: chat of seq {}", m.seq);
            let cid = m.cid.clone().unwrap_or_else(|| panic!("{r}: seq {} has no cid: {m:?}", m.seq));
            let key = (m.from.clone(), cid);
            let sub = submitted.get(&key).unwrap_or_else(|| panic!("{r}: seq {} was never submitted: {m:?}", m.seq));
            assert_eq!(&sub.to, r, "{r}: seq {} was sent to {}", m.seq, sub.to);
            assert_eq!(m.body["text"].as_str(), Some(sub.text.as_str()), "{r}: body of seq {}", m.seq);
            if let Some(prev) = by_key.insert(key.clone(), m) {
                panic!("{r}: cid {:?} stored twice: seq {} ({}) and seq {} ({})", key, prev.seq, prev.id, m.seq, m.id);
            }
            match acked_id.get(&key) {
                Some(id) => assert_eq!(&m.id, id, "{r}: seq {} {:?} has another id than its 200 answer", m.seq, key),
                None => {
                    unacked_stored.insert(key.clone(), m.id.clone());
                }
            }
            stored_by_sender.entry(m.from.clone()).or_default().insert(m.id.clone());
        }
        for (s, l) in senders.iter().zip(&logs) {
            let mut last_seq = 0;
            for (m, id) in l.acked.iter().filter(|(m, _)| &m.to == r) {
                let got = by_key.get(&(s.clone(), m.cid.clone())).unwrap_or_else(|| {
                    panic!(
                        "{r}: acknowledged message {} (cid {}, from {s}) is missing after the crash; inbox has {} \
                         messages, head {head}",
                        id,
                        m.cid,
                        msgs.len()
                    )
                });
                assert!(got.seq > last_seq, "{r}: {s}'s {} (seq {}) came before seq {last_seq}", m.cid, got.seq);
                last_seq = got.seq;
            }
        }
    }

    // Senders: their own copies, gap-free, the same ids as the receivers' copies.
    for (s, l) in senders.iter().zip(&logs) {
        let (msgs, head) = inbox(&ws, &tokens[s], s, "phone", 0, deadline);
        heads.insert(s.clone(), head);
        let mut last_seq = 0;
        let mine: HashMap<&str, &Msg> = msgs.iter().map(|m| (m.id.as_str(), m)).collect();
        for m in &msgs {
            assert_eq!(&m.from, s, "{s}: seq {} is from {}", m.seq, m.from);
            let cid = m.cid.clone().unwrap_or_else(|| panic!("{s}: seq {} has no cid: {m:?}", m.seq));
            let sub = submitted
                .get(&(s.clone(), cid))
                .unwrap_or_else(|| panic!("{s}: seq {} was never submitted: {m:?}", m.seq));
            assert_eq!(m.chat, format!("u:{}", sub.to), "{s}: chat of seq {}", m.seq);
            assert_eq!(m.body["text"].as_str(), Some(sub.text.as_str()), "{s}: body of seq {}", m.seq);
        }
        for (m, id) in &l.acked {
            let got = mine.get(id.as_str()).unwrap_or_else(|| {
                panic!("{s}: the sender's copy of acknowledged {id} (cid {}) is missing after the crash", m.cid)
            });
            assert!(got.seq > last_seq, "{s}: copy of {} (seq {}) came before seq {last_seq}", m.cid, got.seq);
            last_seq = got.seq;
        }
        let copies: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
        let delivered = stored_by_sender.remove(s).unwrap_or_default();
        assert_eq!(
            copies,
            delivered,
            "{s}: ids in the sender's inbox vs ids from {s} in the receivers' inboxes (only in sender: {:?}, only in \
             receivers: {:?})",
            copies.difference(&delivered).collect::<Vec<_>>(),
            delivered.difference(&copies).collect::<Vec<_>>()
        );
    }
    println!(
        "crash: after restart all {acked_total} acknowledged messages synced exactly once; {} of {} unanswered sends \
         had been stored",
        unacked_stored.len(),
        logs.iter().filter(|l| l.failed.is_some()).count()
    );

    // ---- idempotency across the crash --------------------------------------------------------
    // Each sender's last acknowledged message (the one closest to the kill) comes back with its
    // original id; each unanswered one comes back with the stored id if it was stored, or is
    // stored now, once.
    let mut expect_new: HashMap<String, Vec<(Submitted, String)>> = HashMap::new();
    for l in &logs {
        if let Some((m, id)) = l.acked.last() {
            let again = gw.send_message(&m.request()).expect("resend of an acknowledged cid");
            assert_eq!(&again.id, id, "{} cid {} sent again after the restart: a new id", m.from, m.cid);
        }
        if let Some((m, id)) = l.acked.first() {
            let again = gw.send_message(&m.request()).expect("resend of an acknowledged cid");
            assert_eq!(&again.id, id, "{} cid {} sent again after the restart: a new id", m.from, m.cid);
        }
        if let Some(m) = &l.failed {
            let again = gw.send_message(&m.request()).expect("resend of an unanswered cid");
            match unacked_stored.get(&(m.from.clone(), m.cid.clone())) {
                Some(id) => assert_eq!(&again.id, id, "{} cid {}: stored before the crash as {id}", m.from, m.cid),
                None => {
                    expect_new.entry(m.to.clone()).or_default().push((m.clone(), again.id.clone()));
                    expect_new.entry(m.from.clone()).or_default().push((m.clone(), again.id));
                }
            }
        }
    }
    // Only the unanswered messages that had not been stored appear, once each, right after the
    // old heads.
    for u in receivers.iter().chain(&senders) {
        let (msgs, _) = inbox(&ws, &tokens[u], u, "tablet", heads[u], deadline);
        let mut got: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
        let mut want: Vec<&str> =
            expect_new.get(u).map(|v| v.iter().map(|(_, id)| id.as_str()).collect()).unwrap_or_default();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "{u}: messages stored after the restart");
    }

    drop(node);
    assert!(started.elapsed() < TEST_BUDGET, "the crash test took {:?}", started.elapsed());
}
