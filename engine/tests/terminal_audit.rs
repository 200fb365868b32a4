//! An audit of the terminal-facing side of the node, over real sockets: WebSocket framing
//! rules (RFC 6455) the node must enforce, the idle timeout, error frames, and delivery to
//! terminals (acks, resends, several terminals of a user, reads, sync pages, reconnects).
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ether_proto::frame::{FrameType, ServerFrame};
use ether_proto::{ClientFrame, ErrorCode};
use ether_sdk::tungstenite::Message;
use ether_sdk::{ConnectOptions, TerminalClient};
use support::*;

/// A terminal speaking raw WebSocket frames, for what a well-behaved client library will not
/// send (a 1-byte close, reserved close codes, text that is not UTF-8).
struct RawTerminal {
    s: TcpStream,
    buf: Vec<u8>,
    /// The node closed the connection (or it broke): nothing more will come.
    ended: bool,
}

impl RawTerminal {
    /// Connects `user` on `device` and reads up to its `welcome`.
    fn connect(node: &TestNode, user: &str, device: &str) -> RawTerminal {
        let mut s = TcpStream::connect(node.ports.client).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let upgrade = format!(
            "GET /ws?token={}&device={device} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            node.token(user)
        );
        s.write_all(upgrade.as_bytes()).unwrap();
        let mut t = RawTerminal { s, buf: Vec::new(), ended: false };
        let end = loop {
            if let Some(i) = t.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(t.fill(), "closed during the upgrade");
        };
        assert!(t.buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&t.buf));
        t.buf.drain(..end);
        let (op, welcome) = t.next_frame().expect("welcome");
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&welcome).contains("\"type\":\"welcome\""));
        t
    }

    /// Reads more bytes; false on EOF (or an error, a timeout; `ended` tells them apart).
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.s.read(&mut chunk) {
            Ok(0) => {
                self.ended = true;
                false
            }
            Err(e) => {
                self.ended |= !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// One masked client frame's bytes.
    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    }

    /// Writes one masked client frame.
    fn send(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        // The node may have closed already (a frame after its close is lost, as it should be).
        let _ = self.s.write_all(&Self::frame(opcode, fin, payload));
    }

    /// The next server frame: (opcode, payload); None once the connection ends.
    fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, head) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= head + len {
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Some((op, payload));
                }
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Reads until the node's close frame; its code (None: no close frame came).
    fn close_code(&mut self) -> Option<u16> {
        while let Some((op, payload)) = self.next_frame() {
            if op == 8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }
}

/// RFC 6455 §5.5.1: a close frame's body, if any, starts with a 2-byte status code, so a
/// 1-byte body is broken framing (1002), not a close without a code. §7.4: codes 0-999,
/// 1004-1006, 1015 and 1016-2999 are never valid on the wire (nor are codes from 5000): a
/// close with one is a protocol error too. Valid codes are answered with a normal close.
#[test]
fn close_frames_with_a_broken_body_or_an_invalid_code_are_protocol_errors() {
    let node = TestNode::start();
    let mut t = RawTerminal::connect(&node, "cal", "a");
    t.send(8, true, &[0x03]);
    assert_eq!(t.close_code(), Some(1002), "a 1-byte close body");
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535] {
        let mut t = RawTerminal::connect(&node, "cal", "a");
        t.send(8, true, &code.to_be_bytes());
        assert_eq!(t.close_code(), Some(1002), "close code {code}");
    }
    for code in [1000u16, 1001, 1003, 1011, 3000, 4000, 4999] {
        let mut t = RawTerminal::connect(&node, "cal", "a");
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(b"bye");
        t.send(8, true, &body);
        assert_eq!(t.close_code(), Some(1000), "close code {code}");
    }
    let mut t = RawTerminal::connect(&node, "cal", "a");
    t.send(8, true, &[]);
    assert_eq!(t.close_code(), Some(1000), "a close without a body");
}

/// RFC 6455 §8.1: a text message that is not UTF-8 fails the connection with 1007, whole or
/// fragmented (it used to be answered `invalid_json`, as if the bytes were only bad JSON),
/// and so does a close reason that is not UTF-8. Binary frames carry any bytes.
#[test]
fn text_that_is_not_utf8_closes_with_1007() {
    let node = TestNode::start();
    let mut t = RawTerminal::connect(&node, "dot", "a");
    t.send(1, true, b"{\"type\":\"ping\",\"x\":\"\xff\"}");
    assert_eq!(t.close_code(), Some(1007), "invalid UTF-8 in a text frame");

    let mut t = RawTerminal::connect(&node, "dot", "a");
    t.send(1, false, b"{\"type\":\"ping\",\"x\":\"\xe2\x82");
    t.send(0, true, b"\"}");
    assert_eq!(t.close_code(), Some(1007), "a character cut short across fragments");

    let mut t = RawTerminal::connect(&node, "dot", "a");
    t.send(8, true, b"\x03\xe8\xc3\x28");
    assert_eq!(t.close_code(), Some(1007), "a close reason that is not UTF-8");

    // A character split across fragments is fine: the message is read (and refused only for
    // its extra field, with an error frame, not a close).
    let mut t = RawTerminal::connect(&node, "dot", "a");
    let whole = "{\"type\":\"ping\",\"x\":\"\u{20ac}\"}".as_bytes();
    t.send(1, false, &whole[..21]);
    t.send(0, true, &whole[21..]);
    let (op, answer) = t.next_frame().expect("an answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert_eq!(op, 1);
    assert!(answer.contains("\"type\":\"error\"") && answer.contains("invalid_frame"), "{answer}");
}

/// A read on one device: the user's other device gets `read_sync`, the peer (only) gets
/// `receipt` naming the reader, and the unread count drops for the user.
#[test]
fn a_read_on_one_device_syncs_the_others_and_tells_only_the_peer() {
    let node = TestNode::start();
    let gw = node.gateway();
    let mut phone = node.terminal("ada", "phone");
    let mut web = node.terminal("ada", "web");
    let mut bob = node.terminal("bob", "phone");
    let mut carl = node.terminal("carl", "phone");
    let m1 = gw.send_message(&text("bob", "ada", "one")).unwrap();
    let m2 = gw.send_message(&text("bob", "ada", "two")).unwrap();
    for t in [&mut phone, &mut web] {
        assert_eq!(next_msg(t).id, m1.id);
        assert_eq!(next_msg(t).id, m2.id);
    }
    bob.drain(Duration::from_millis(200)).unwrap();
    assert_eq!(gw.unread("ada").unwrap()["chats"]["u:bob"], 2);
    phone.read("u:bob", 1).unwrap();
    match web.recv(WAIT).unwrap() {
        Some(ServerFrame::ReadSync { chat, seq }) => assert_eq!((chat.as_str(), seq), ("u:bob", 1)),
        other => panic!("{other:?}"),
    }
    match bob.recv(WAIT).unwrap() {
        Some(ServerFrame::Receipt { chat, by, up_to }) => {
            assert_eq!((chat.as_str(), by.as_str(), up_to.as_str()), ("u:ada", "ada", m1.id.as_str()))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(gw.unread("ada").unwrap()["chats"]["u:bob"], 1);
    web.read("u:bob", 2).unwrap();
    match phone.recv(WAIT).unwrap() {
        Some(ServerFrame::ReadSync { chat, seq }) => assert_eq!((chat.as_str(), seq), ("u:bob", 2)),
        other => panic!("{other:?}"),
    }
    assert!(gw.unread("ada").unwrap()["chats"].get("u:bob").is_none());
    assert_silent(&mut carl, Duration::from_millis(300));
    assert_silent(&mut web, Duration::from_millis(100));
}

/// `sync` pages of 3 over the inbox and two groups, each page asked from where the terminal
/// is: every message comes exactly once.
#[test]
fn sync_pages_over_the_inbox_and_groups_neither_skip_nor_repeat() {
    let node = TestNode::start();
    let gw = node.gateway();
    gw.create_group(Some("ga"), "A", "eli", &["eli", "fin"]).unwrap();
    gw.create_group(Some("gb"), "B", "eli", &["eli", "fin"]).unwrap();
    for i in 0..7 {
        gw.send_message(&text("fin", "eli", &format!("i{i}"))).unwrap();
    }
    for g in ["ga", "gb"] {
        for i in 0..5 {
            gw.send_group_message(
                g,
                "fin",
                ether_proto::Kind::Text,
                &serde_json::json!({"text": format!("{g}{i}")}),
                None,
            )
            .unwrap();
        }
    }
    let mut t = node.terminal("eli", "phone");
    let mut pos: std::collections::BTreeMap<String, u64> = [("ga".to_string(), 0), ("gb".to_string(), 0)].into();
    let mut inbox = 0;
    let mut got = Vec::new();
    for _ in 0..50 {
        t.sync(inbox, pos.clone(), Some(3)).unwrap();
        let more = loop {
            match t.recv(WAIT).unwrap() {
                Some(ServerFrame::Msg(m)) => {
                    if let Some(g) = m.chat.strip_prefix("g:") {
                        let p = pos.get_mut(g).unwrap();
                        *p = (*p).max(m.seq);
                    } else {
                        inbox = inbox.max(m.seq);
                    }
                    got.push((m.chat.clone(), m.seq));
                }
                Some(ServerFrame::Synced { more, .. }) => break more,
                other => panic!("{other:?}"),
            }
        };
        if !more {
            break;
        }
    }
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "repeated: {got:?}");
    assert_eq!(got.len(), 17, "{got:?}");
}

/// A message pushed while an older unacknowledged one waits out its backoff is pushed again
/// a resend timeout after its own push, not when the older one's next (much later) attempt
/// comes due. Its first resend used to wait for that: the shard looked at a terminal's
/// unacknowledged messages only when the check scheduled for the oldest came due (with the
/// defaults, a message lost after a 20 s-old one waited about 20 s instead of 3 s).
#[test]
fn a_new_message_is_resent_on_its_own_timeout_while_an_older_one_backs_off() {
    let node = TestNode::with(|c| {
        c.limits.resend_timeout = Duration::from_millis(250);
        c.limits.resend_attempts_max = 6;
        c.limits.idle_timeout = Duration::from_secs(60);
    });
    let gw = node.gateway();
    let mut t = node.terminal("gil", "phone");
    let old = gw.send_message(&text("hal", "gil", "old")).unwrap();
    // The push and five resends (after 0.25, 0.75, 1.75, 3.75 and 7.75 s): its last
    // attempt is due 8 s after the fifth.
    for copy in 0..6 {
        let m = t.recv_msg(Duration::from_secs(15)).unwrap();
        assert_eq!(m.id, old.id, "copy {copy}");
    }
    let new = gw.send_message(&text("hal", "gil", "new")).unwrap();
    let pushed = Instant::now();
    assert_eq!(next_msg(&mut t).id, new.id);
    let again = t.recv_msg(Duration::from_secs(10)).unwrap();
    assert_eq!(again.id, new.id, "the new message comes again before the old one");
    let waited = pushed.elapsed();
    assert!(waited < Duration::from_secs(4), "resent {waited:?} after its push (timeout 250 ms)");
}

/// Messages sent while a device reconnects again and again (closing, or replaced by its own
/// next connection) all reach it: each connection syncs from what the device has, then takes
/// live messages; at the end every message was seen.
#[test]
fn nothing_is_lost_across_reconnects_and_replacements() {
    let node = TestNode::start();
    const N: usize = 150;
    let sender = {
        let gw = node.gateway();
        std::thread::spawn(move || {
            for i in 0..N {
                gw.send_message(&text("ivo", "jan", &format!("m{i}"))).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut have = 0u64;
    let mut old: Option<ether_sdk::TerminalClient> = None;
    for round in 0..12 {
        let mut t = node.terminal("jan", "phone");
        if let Some(mut o) = old.take() {
            if round % 2 == 0 {
                o.close().ok();
            }
        }
        let (page, _) = sync_all(&mut t, have);
        for m in page {
            have = have.max(m.seq);
            seen.insert(m.seq);
        }
        let until = Instant::now() + Duration::from_millis(60);
        while Instant::now() < until {
            if let Some(ServerFrame::Msg(m)) = t.recv(Duration::from_millis(10)).unwrap() {
                seen.insert(m.seq);
                if m.seq == have + 1 {
                    have = m.seq;
                }
            }
        }
        t.ack(have).unwrap();
        old = Some(t);
    }
    sender.join().unwrap();
    let mut t = node.terminal("jan", "phone");
    drop(old);
    let (page, head) = sync_all(&mut t, have);
    seen.extend(page.iter().map(|m| m.seq));
    assert_eq!(head, N as u64);
    assert_eq!(seen.len(), N, "missing: {:?}", (1..=N as u64).filter(|s| !seen.contains(s)).collect::<Vec<_>>());
}

/// Group messages: each terminal of a member is pushed again what it did not ack, whatever
/// its other terminal acked; a member added while online gets the next messages and their
/// resends.
#[test]
fn group_resends_follow_each_terminals_own_acks() {
    let node = TestNode::with(|c| {
        c.limits.resend_timeout = Duration::from_millis(400);
        c.limits.resend_attempts_max = 2;
        c.limits.idle_timeout = Duration::from_secs(30);
    });
    let gw = node.gateway();
    gw.create_group(Some("gx"), "X", "kai", &["kai", "lou"]).unwrap();
    let mut phone = node.terminal("kai", "phone");
    let mut web = node.terminal("kai", "web");
    let mut mo = node.terminal("mo", "phone");
    gw.add_members("gx", &["mo"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let body = serde_json::json!({"text": "hey"});
    let sent = gw.send_group_message("gx", "lou", ether_proto::Kind::Text, &body, None).unwrap();
    let seq = sent["seq"].as_u64().unwrap();
    let m = next_msg(&mut web);
    assert_eq!(m.seq, seq);
    web.ack_group("gx", seq).unwrap();
    assert_eq!(next_msg(&mut phone).seq, seq);
    assert_eq!(next_msg(&mut mo).seq, seq);
    // The phone and mo did not ack: pushed again; the web terminal is not.
    assert_eq!(next_msg(&mut phone).seq, seq);
    assert_eq!(next_msg(&mut mo).seq, seq);
    phone.ack_group("gx", seq).unwrap();
    mo.ack_group("gx", seq).unwrap();
    assert_silent(&mut web, Duration::from_millis(1500));
    for t in [&mut phone, &mut mo] {
        let after = t.drain(Duration::from_millis(100)).unwrap();
        assert!(after.is_empty(), "after the ack: {after:?}");
    }
}

/// Only whole frames keep a terminal from its idle timeout (4003, `limits.idle_timeout_s`):
/// one that dribbles the bytes of a frame it never finishes is closed, where one whose frames
/// (pings) arrive each in two pieces is served on. Any bytes used to count: a terminal sending
/// a byte of a frame it never completed every few seconds was never closed.
#[test]
fn bytes_of_a_frame_never_finished_do_not_keep_a_terminal_from_its_idle_timeout() {
    let node = TestNode::with(|c| {
        c.limits.idle_timeout = Duration::from_millis(1500);
        c.limits.heartbeat_s = 1;
    });
    let mut dribbler = RawTerminal::connect(&node, "dee", "a");
    let mut splitter = RawTerminal::connect(&node, "ely", "a");
    for t in [&dribbler, &splitter] {
        t.s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    }
    // A text frame of 125 bytes: its header now, then one byte of it at a time.
    let unfinished = RawTerminal::frame(1, true, &[b' '; 125]);
    dribbler.s.write_all(&unfinished[..6]).unwrap();
    let ping = RawTerminal::frame(9, true, b"hb");
    let started = Instant::now();
    let mut next = 6;
    let code = 'closed: loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a terminal that sent no whole frame for 10 idle timeouts is still open"
        );
        assert!(next < unfinished.len(), "the dribbled frame must never be complete");
        let _ = dribbler.s.write_all(&unfinished[next..next + 1]);
        next += 1;
        // A whole ping, in two pieces: activity, however it arrives.
        splitter.s.write_all(&ping[..3]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        splitter.s.write_all(&ping[3..]).unwrap();
        loop {
            match splitter.next_frame() {
                Some((0xa, payload)) => {
                    assert_eq!(payload, b"hb");
                    break;
                }
                Some((op, payload)) => panic!("the splitter got {op}: {}", String::from_utf8_lossy(&payload)),
                None => assert!(!splitter.ended, "the terminal sending whole frames was closed"),
            }
        }
        while let Some((op, payload)) = dribbler.next_frame() {
            if op == 8 {
                break 'closed (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        assert!(!dribbler.ended, "closed without a close frame");
    };
    assert_eq!(code, Some(4003), "closed as idle");
    // The terminal whose frames came in pieces is still served.
    splitter.s.write_all(&ping).unwrap();
    splitter.s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(splitter.next_frame(), Some((0xa, b"hb".to_vec())));
}

/// The `of`s and `ref`s of the next `n` error frames (other frames skipped).
fn refusals(t: &mut TerminalClient, n: usize) -> Vec<(ErrorCode, Option<FrameType>, Option<String>)> {
    let mut got = Vec::new();
    while got.len() < n {
        match t.recv(WAIT).unwrap() {
            Some(ServerFrame::Error { code, of, reference, .. }) => got.push((code, of, reference)),
            Some(_) => {}
            None => panic!("no error frame within {WAIT:?}; so far {got:?}"),
        }
    }
    got
}

/// Every `error` frame that answers a terminal frame names its type (`of`), on both
/// subprotocols: a terminal that sent a `sync` and a `read` and got `rate_limited` for one of
/// them can tell which to send again (neither is a `send`, so there is no `ref`). Before, only
/// a `send`'s error said which frame it answered. A frame whose type could not be read gets
/// no `of`.
#[test]
fn error_frames_name_the_frame_they_refuse() {
    let node = TestNode::with(|c| {
        c.limits.terminal_requests_per_s = 1;
        c.limits.terminal_requests_burst = 1;
        c.limits.protocol_violations_max = 20;
    });
    for (user, proto) in [("ona", false), ("oto", true)] {
        let mut opts = ConnectOptions::new(&node.token(user), "phone", "web");
        if proto {
            opts = opts.subprotocol(ether_proto::pb::SUBPROTOCOL_PROTO);
        }
        let (mut t, _) = TerminalClient::connect_with(&node.ws_url(), &opts).unwrap();
        assert_eq!(t.is_proto(), proto);
        let sync = ClientFrame::Sync { inbox_seq: 0, groups: Default::default(), limit: None };
        // The burst takes the first sync; the read and the second sync are over the rate.
        t.send_frame(&sync).unwrap();
        t.read("u:sam", 1).unwrap();
        t.send_frame(&sync).unwrap();
        assert_eq!(
            refusals(&mut t, 2),
            [
                (ErrorCode::RateLimited, Some(FrameType::Read), None),
                (ErrorCode::RateLimited, Some(FrameType::Sync), None)
            ],
            "proto: {proto}"
        );
        // Refused for what they ask, or malformed with a type that can be read.
        t.ack_group("not-mine", 1).unwrap();
        t.send("c-1", "sam", ether_proto::Kind::Text, serde_json::json!({"text": 5})).unwrap();
        t.send_frame(&ClientFrame::Ack { seq: 1, group: Some("bad group!".into()) }).unwrap();
        assert_eq!(
            refusals(&mut t, 3),
            [
                (ErrorCode::Forbidden, Some(FrameType::Ack), None),
                (ErrorCode::InvalidBody, Some(FrameType::Send), Some("c-1".into())),
                (ErrorCode::InvalidBody, Some(FrameType::Ack), None),
            ],
            "proto: {proto}"
        );
        // Frames whose type cannot be read: no `of`.
        if proto {
            t.raw_send(Message::binary(vec![0xff, 0xff])).unwrap();
            t.raw_send(Message::text(r#"{"type":"sync"}"#)).unwrap();
            let got = refusals(&mut t, 2);
            assert!(got.iter().all(|(code, of, _)| *code == ErrorCode::InvalidFrame && of.is_none()), "{got:?}");
        } else {
            t.raw_send(Message::text("{not json")).unwrap();
            t.raw_send(Message::text(r#"{"type":"dance"}"#)).unwrap();
            t.raw_send(Message::text(r#"{"type":"ping","x":1}"#)).unwrap();
            assert_eq!(
                refusals(&mut t, 3),
                [
                    (ErrorCode::InvalidJson, None, None),
                    (ErrorCode::InvalidFrame, None, None),
                    (ErrorCode::InvalidFrame, Some(FrameType::Ping), None),
                ]
            );
            // On the wire: the key is `of`, its value the frame's `type`.
            t.raw_send(Message::text(r#"{"type":"ack","group":"not-mine","seq":1}"#)).unwrap();
            let v = t.recv_value(WAIT).unwrap().unwrap();
            assert_eq!((v["type"].as_str(), v["of"].as_str()), (Some("error"), Some("ack")), "{v}");
        }
    }
}
