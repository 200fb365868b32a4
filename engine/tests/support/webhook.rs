//! A business webhook receiver on a loopback port: answers 500 to the first `fail_first`
//! POSTs, then 200; keeps every verified event by `event_id` and counts how often each id came.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The webhook secret the receiver checks signatures with.
pub const SECRET: &str = "webhook-secret-0123456789";

pub struct Receiver {
    pub url: String,
    pub events: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Times each `event_id` arrived in a 2xx-answered, verified POST.
    pub arrivals: Arc<Mutex<BTreeMap<String, usize>>>,
    pub posts: Arc<Mutex<usize>>,
    pub bad_signatures: Arc<Mutex<usize>>,
}

/// The webhook config of a node that posts to `r`.
pub fn webhook(r: &Receiver) -> ether_engine::config::Webhook {
    ether_engine::config::Webhook {
        url: r.url.clone(),
        secret: ether_engine::secrets::Secret::new(SECRET),
        ca_path: None,
    }
}

pub fn receiver(fail_first: usize) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/ether", listener.local_addr().unwrap());
    let events = Arc::new(Mutex::new(BTreeMap::new()));
    let arrivals = Arc::new(Mutex::new(BTreeMap::new()));
    let posts = Arc::new(Mutex::new(0));
    let bad = Arc::new(Mutex::new(0));
    let (ev, ar, ps, bd) = (events.clone(), arrivals.clone(), posts.clone(), bad.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (ev, ar, ps, bd) = (ev.clone(), ar.clone(), ps.clone(), bd.clone());
            // One thread per connection: each node keeps its own keep-alive connection.
            std::thread::spawn(move || serve(stream, fail_first, &ev, &ar, &ps, &bd));
        }
    });
    Receiver { url, events, arrivals, posts, bad_signatures: bad }
}

type Events = Mutex<BTreeMap<String, Value>>;
type Arrivals = Mutex<BTreeMap<String, usize>>;

fn serve(
    stream: std::net::TcpStream,
    fail_first: usize,
    ev: &Events,
    ar: &Arrivals,
    ps: &Mutex<usize>,
    bd: &Mutex<usize>,
) {
    let mut reader = BufReader::new(stream);
    while let Some((body, signature)) = read_post(&mut reader) {
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
                    let id = e["event_id"].as_str().unwrap().to_owned();
                    *ar.lock().unwrap().entry(id.clone()).or_insert(0) += 1;
                    ev.lock().unwrap().insert(id, e.clone());
                }
            } else {
                *bd.lock().unwrap() += 1;
            }
        }
        let stream = reader.get_mut();
        let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
    }
}

/// Reads one POST from a webhook connection: its body and its `X-Ether-Signature`; `None`
/// once the connection ends.
pub fn read_post(reader: &mut BufReader<std::net::TcpStream>) -> Option<(Vec<u8>, String)> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut len = 0;
    let mut signature = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
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
    reader.read_exact(&mut body).ok()?;
    Some((body, signature))
}

impl Receiver {
    /// Every event so far once `what` holds for them (panics after 15 s).
    pub fn wait_for(&self, what: impl Fn(&[Value]) -> bool) -> Vec<Value> {
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

    /// Event ids that arrived more than once.
    pub fn repeated(&self) -> Vec<(String, usize)> {
        self.arrivals.lock().unwrap().iter().filter(|(_, n)| **n > 1).map(|(id, n)| (id.clone(), *n)).collect()
    }
}

/// Whether `events` hold one of `kind` for `user`.
pub fn has(events: &[Value], kind: &str, user: &str) -> bool {
    events.iter().any(|e| e["type"] == kind && e["user"] == user)
}
