//! Events to the business webhook from a real node: `user.online`, `message.unreached`,
//! `message.delivered`, `message.read`, `user.offline`, in signed batches, retried when the
//! receiver fails at first, never lost.
mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ether_engine::config::Webhook;
use ether_engine::secrets::Secret;
use ether_proto::ClientFrame;
use serde_json::Value;
use support::*;

const SECRET: &str = "webhook-secret-0123456789";

/// A webhook receiver that answers 500 to the first `fail_first` requests, then 200; keeps
/// every verified event by id.
struct Receiver {
    url: String,
    events: Arc<Mutex<BTreeMap<String, Value>>>,
    posts: Arc<Mutex<usize>>,
    bad_signatures: Arc<Mutex<usize>>,
}

fn receiver(fail_first: usize) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/ether", listener.local_addr().unwrap());
    let events = Arc::new(Mutex::new(BTreeMap::new()));
    let posts = Arc::new(Mutex::new(0));
    let bad = Arc::new(Mutex::new(0));
    let (ev, ps, bd) = (events.clone(), posts.clone(), bad.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let mut len = 0;
                let mut signature = String::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end().to_owned();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "x-ether-signature" => signature = v.trim().to_owned(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let n = {
                    let mut p = ps.lock().unwrap();
                    *p += 1;
                    *p
                };
                let status = if n <= fail_first { "500 Internal Server Error" } else { "200 OK" };
                if n > fail_first {
                    if ether_engine::events::verify(SECRET.as_bytes(), &body, &signature) {
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        for e in v["events"].as_array().unwrap() {
                            ev.lock().unwrap().insert(e["event_id"].as_str().unwrap().to_owned(), e.clone());
                        }
                    } else {
                        *bd.lock().unwrap() += 1;
                    }
                }
                let stream = reader.get_mut();
                let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            }
        }
    });
    Receiver { url, events, posts, bad_signatures: bad }
}

impl Receiver {
    fn wait_for(&self, what: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let all: Vec<Value> = self.events.lock().unwrap().values().cloned().collect();
            if what(&all) {
                return all;
            }
            assert!(Instant::now() < deadline, "events never arrived; got {all:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn has(events: &[Value], kind: &str, user: &str) -> bool {
    events.iter().any(|e| e["type"] == kind && e["user"] == user)
}

#[test]
fn events_reach_the_webhook_signed_and_retried() {
    let hook = receiver(2);
    let node = TestNode::with(|c| {
        c.events.webhook = Some(Webhook { url: hook.url.clone(), secret: Secret::new(SECRET) });
    });
    let gw = node.gateway();
    // Offline receiver: unreached.
    let unreached = gw.send_message(&text("oli", "pat", "you are away")).unwrap();
    let mut pat = node.terminal("pat", "phone");
    let m = gw.send_message(&text("oli", "pat", "now you are here")).unwrap();
    let got = next_msg(&mut pat);
    assert_eq!(got.id, m.id);
    pat.ack(got.seq).unwrap();
    pat.send_frame(&ClientFrame::Read { chat: "u:oli".into(), seq: got.seq }).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    pat.close().unwrap();
    let all = hook.wait_for(|e| {
        has(e, "user.online", "pat")
            && has(e, "message.unreached", "pat")
            && has(e, "message.delivered", "pat")
            && has(e, "message.read", "pat")
            && has(e, "user.offline", "pat")
    });
    let unreached_ev = all.iter().find(|e| e["type"] == "message.unreached").unwrap();
    assert_eq!(unreached_ev["id"], unreached.id);
    let delivered = all.iter().find(|e| e["type"] == "message.delivered").unwrap();
    assert_eq!((delivered["id"].as_str(), delivered["device"].as_str()), (Some(m.id.as_str()), Some("phone")));
    assert!(all.iter().all(|e| e["ts"].as_u64().is_some() && e["event_id"].as_str().is_some()));
    assert!(*hook.posts.lock().unwrap() >= 3, "the first two posts failed and were retried");
    assert_eq!(*hook.bad_signatures.lock().unwrap(), 0, "every batch is signed with the webhook secret");
}
