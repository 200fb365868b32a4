//! Audit of the events sent to the business webhook (API.md section 4) against receivers that
//! misbehave in the ways real ones do: closing after each answer, answering slowly, refusing
//! until the node restarts, answering 2xx with a large body.
mod support;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::webhook::SECRET;
use support::*;

/// What the probe receiver does with the n-th POST (0-based).
#[derive(Clone)]
enum Answer {
    /// Writes these bytes, keeps the connection.
    Bytes(Vec<u8>),
    /// Writes these bytes, then closes the connection.
    BytesThenClose(Vec<u8>),
}

/// A webhook receiver answering each POST as `answer(n)` says; records every POST's events.
struct Probe {
    url: String,
    /// Every event of every POST received (verified or not), in arrival order.
    posts: Arc<Mutex<Vec<Vec<Value>>>>,
}

fn probe(answer: fn(usize) -> Answer) -> Probe {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let posts = Arc::new(Mutex::new(Vec::new()));
    let p = posts.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let p = p.clone();
            std::thread::spawn(move || serve(stream, answer, &p));
        }
    });
    Probe { url, posts }
}

fn serve(stream: TcpStream, answer: fn(usize) -> Answer, posts: &Mutex<Vec<Vec<Value>>>) {
    let mut reader = BufReader::new(stream);
    while let Some((body, signature)) = support::webhook::read_post(&mut reader) {
        assert!(ether_engine::events::verify(SECRET.as_bytes(), &body, &signature), "bad signature");
        let v: Value = serde_json::from_slice(&body).unwrap();
        let n = {
            let mut g = posts.lock().unwrap();
            g.push(v["events"].as_array().unwrap().clone());
            g.len() - 1
        };
        let stream = reader.get_mut();
        match answer(n) {
            Answer::Bytes(b) => {
                if stream.write_all(&b).is_err() {
                    return;
                }
            }
            Answer::BytesThenClose(b) => {
                let _ = stream.write_all(&b);
                return;
            }
        }
    }
}

fn webhook(url: &str) -> ether_engine::config::Webhook {
    ether_engine::config::Webhook {
        url: url.to_owned(),
        secret: ether_engine::secrets::Secret::new(SECRET),
        ca_path: None,
    }
}

impl Probe {
    /// Times each event id arrived, once `what` holds (panics after `within`).
    fn wait(&self, within: Duration, what: impl Fn(&BTreeMap<String, usize>) -> bool) -> BTreeMap<String, usize> {
        let deadline = Instant::now() + within;
        loop {
            let counts = self.counts();
            if what(&counts) {
                return counts;
            }
            assert!(Instant::now() < deadline, "events never arrived as expected; got {counts:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for post in self.posts.lock().unwrap().iter() {
            for e in post {
                *counts.entry(e["event_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
            }
        }
        counts
    }

    fn post_count(&self) -> usize {
        self.posts.lock().unwrap().len()
    }
}

fn ok(body: &[u8]) -> Vec<u8> {
    let mut r =
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

/// API.md: a 2xx answer acknowledges the batch. A receiver that answers 200 with a large body
/// (an echo of the batch, an HTML page) has taken the events: they are not sent again. (The
/// dispatcher's client reads at most 64 KiB of an answer; a bigger body used to fail the
/// attempt before its status was looked at, so the batch went out again forever and the
/// outbox behind it never moved.)
#[test]
fn a_2xx_with_a_large_body_acknowledges_the_batch() {
    let hook = probe(|_| Answer::Bytes(ok(&vec![b'x'; 200 * 1024])));
    let node = TestNode::with(|c| c.events.webhook = Some(webhook(&hook.url)));
    let gw = node.gateway();
    for i in 0..3 {
        gw.send_message(&text("oli", &format!("away{i}"), "hi")).unwrap();
    }
    hook.wait(Duration::from_secs(10), |c| c.len() >= 3);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(hook.post_count(), 1, "the batch was answered 200 once: {:?}", hook.counts());
}

/// A receiver that closes each connection after its answer (without saying
/// `Connection: close`): every event arrives, once.
#[test]
fn a_receiver_closing_after_each_answer_gets_every_event_once() {
    let hook = probe(|_| Answer::BytesThenClose(ok(b"")));
    let node = TestNode::with(|c| c.events.webhook = Some(webhook(&hook.url)));
    let gw = node.gateway();
    for i in 0..6 {
        gw.send_message(&text("oli", &format!("away{i}"), "hi")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let counts = hook.wait(Duration::from_secs(10), |c| c.len() >= 6);
    std::thread::sleep(Duration::from_millis(500));
    assert!(hook.counts().values().all(|n| *n == 1), "{counts:?}");
}

/// A receiver that takes seconds to answer holds up nothing but the events: messages keep
/// reaching terminals at once.
#[test]
fn a_slow_receiver_does_not_slow_terminals() {
    let hook = probe(|_| {
        std::thread::sleep(Duration::from_millis(4000));
        Answer::Bytes(ok(b""))
    });
    let node = TestNode::with(|c| c.events.webhook = Some(webhook(&hook.url)));
    let gw = node.gateway();
    let mut pat = node.terminal("pat", "phone");
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        let t0 = Instant::now();
        let m = gw.send_message(&text("oli", "pat", &format!("m{i}"))).unwrap();
        let got = next_msg(&mut pat);
        assert_eq!(got.id, m.id);
        pat.ack(got.seq).unwrap();
        // Far below the receiver's 4 s per answer: the push did not wait for it.
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
    hook.wait(Duration::from_secs(30), |c| c.len() >= 6);
}

/// Events still in the outbox when a node stops reach the webhook after its restart, and the
/// new node's events get new ids.
#[test]
fn a_restart_delivers_what_the_outbox_kept_with_new_ids_after() {
    let refuse = probe(|_| Answer::Bytes(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".to_vec()));
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::in_dir(dir.path(), |c| c.events.webhook = Some(webhook(&refuse.url)));
    let gw = node.gateway();
    for i in 0..3 {
        gw.send_message(&text("oli", &format!("away{i}"), "hi")).unwrap();
    }
    refuse.wait(Duration::from_secs(10), |c| c.len() >= 3);
    node.stop();
    let hook = probe(|_| Answer::Bytes(ok(b"")));
    let node = TestNode::in_dir(dir.path(), |c| c.events.webhook = Some(webhook(&hook.url)));
    node.gateway().send_message(&text("oli", "later", "hi")).unwrap();
    let counts = hook.wait(Duration::from_secs(10), |c| c.len() >= 4);
    let ids: Vec<u64> = counts.keys().map(|k| k.parse().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4], "{counts:?}");
}
