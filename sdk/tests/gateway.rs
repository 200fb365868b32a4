//! `GatewayClient` against a tiny fake api port (std `TcpListener` in a thread): keep-alive
//! reuse, error envelopes, transparent reconnect, raw requests, the paths and bodies of the
//! typed calls.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ether_sdk::proto::api::{BatchResult, Broadcast, Kick, SendMessage, SentMessage, TokenRequest};
use ether_sdk::proto::{ErrorCode, Kind};
use ether_sdk::{GatewayClient, HistoryQuery, SdkError};
use serde_json::{json, Value};

/// A request as the fake server saw it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Which accepted connection (0-based) carried it.
    conn: usize,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// What the fake answers.
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// Send `Connection: close` and close.
    close_header: bool,
    /// Close the socket after answering, without saying so (an idle-timeout race).
    close_silently: bool,
    /// Use chunked transfer encoding.
    chunked: bool,
}

impl Answer {
    fn json(status: u16, v: Value) -> Answer {
        Answer {
            status,
            body: serde_json::to_vec(&v).unwrap(),
            close_header: false,
            close_silently: false,
            chunked: false,
        }
    }
}

struct Fake {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    requests: Receiver<Req>,
}

impl Fake {
    fn next(&self) -> Req {
        self.requests.recv_timeout(Duration::from_secs(5)).expect("a request reached the fake server")
    }
}

fn read_request(r: &mut BufReader<TcpStream>, conn: usize) -> Option<Req> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Req { method, target, headers, body, conn })
}

fn write_answer(s: &mut TcpStream, a: &Answer) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} X\r\nContent-Type: application/json\r\n", a.status);
    if a.close_header {
        head.push_str("Connection: close\r\n");
    }
    let mut out;
    if a.chunked {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        out = head.into_bytes();
        for chunk in a.body.chunks(7) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        head.push_str(&format!("Content-Length: {}\r\n\r\n", a.body.len()));
        out = head.into_bytes();
        out.extend_from_slice(&a.body);
    }
    s.write_all(&out)
}

fn serve(handler: impl Fn(&Req) -> Answer + Send + Sync + 'static) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let (tx, rx): (Sender<Req>, Receiver<Req>) = mpsc::channel();
    let handler = Arc::new(handler);
    let counter = accepts.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let conn = counter.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            let handler = handler.clone();
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                while let Some(req) = read_request(&mut reader, conn) {
                    let answer = handler(&req);
                    let _ = tx.send(req);
                    if write_answer(&mut writer, &answer).is_err() {
                        break;
                    }
                    if answer.close_header || answer.close_silently {
                        let _ = writer.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                }
            });
        }
    });
    Fake { addr, accepts, requests: rx }
}

fn text_message(from: &str, to: &str, text: &str) -> SendMessage {
    SendMessage { from: from.into(), to: to.into(), kind: Kind::Text, body: json!({ "text": text }), cid: None }
}

#[test]
fn keep_alive_reuses_one_connection() {
    let fake = serve(|_| Answer::json(200, json!({"id": "m1", "ts": 7})));
    let api = GatewayClient::new(fake.addr, "secret-key");
    for i in 0..5 {
        let sent = api.send_message(&text_message("alice", "bob", &format!("hi {i}"))).unwrap();
        assert_eq!(sent, SentMessage { id: "m1".into(), ts: 7 });
    }
    assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(api.connections_opened(), 1);
    let req = fake.next();
    assert_eq!(req.method, "POST");
    assert_eq!(req.target, "/v1/messages");
    assert_eq!(req.header("authorization"), Some("Bearer secret-key"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.json(), json!({"from": "alice", "to": "bob", "kind": "text", "body": {"text": "hi 0"}}));
    for _ in 1..5 {
        assert_eq!(fake.next().conn, 0);
    }
}

#[test]
fn error_envelope_becomes_api_error() {
    let fake = serve(|req| match req.target.as_str() {
        "/v1/messages" => {
            Answer::json(400, json!({"error": {"code": "invalid_body", "message": "body.text: must not be empty"}}))
        }
        "/v1/users/bob/presence" => {
            Answer::json(401, json!({"error": {"code": "unauthorized", "message": "bad api key"}}))
        }
        "/v1/users/bob/unread" => {
            Answer { status: 500, body: b"oops".to_vec(), close_header: false, close_silently: false, chunked: false }
        }
        _ => Answer::json(404, json!({"error": {"code": "not_found", "message": "no route"}})),
    });
    let api = GatewayClient::new(format!("http://{}", fake.addr), "k");

    match api.send_message(&text_message("alice", "bob", "")) {
        Err(SdkError::Api { status, error }) => {
            assert_eq!(status, 400);
            assert_eq!(error.code, ErrorCode::InvalidBody);
            assert_eq!(error.message, "body.text: must not be empty");
        }
        other => panic!("expected an api error, got {other:?}"),
    }
    let e = api.presence("bob").unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    match api.unread("bob") {
        Err(SdkError::Http(500, body)) => assert_eq!(body, "oops"),
        other => panic!("expected Http(500), got {other:?}"),
    }
    let e = api.get_group("nope").unwrap_err();
    assert!(matches!(e, SdkError::Api { status: 404, .. }), "{e:?}");
    // Errors do not cost the connection.
    assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
}

#[test]
fn reconnects_after_the_server_closes_silently() {
    // The server closes every connection right after its answer without telling: the next
    // call finds a dead connection and must go through on a fresh one.
    let fake = serve(|_| Answer { close_silently: true, ..Answer::json(200, json!({"terminals": 3})) });
    let api = GatewayClient::new(fake.addr, "k");
    let b = Broadcast { kind: Kind::Text, body: json!({"text": "maintenance at noon"}) };
    for _ in 0..3 {
        assert_eq!(api.broadcast(&b).unwrap().terminals, 3);
        // Let the close reach us, so the next call really meets a dead connection.
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fake.accepts.load(Ordering::SeqCst), 3);
    assert_eq!(api.connections_opened(), 3);
    // Each request reached the server exactly once.
    let conns: Vec<usize> = (0..3).map(|_| fake.next().conn).collect();
    assert_eq!(conns, vec![0, 1, 2]);
    assert!(fake.requests.try_recv().is_err());
}

#[test]
fn connection_close_header_is_honoured() {
    let fake = serve(|_| Answer { close_header: true, ..Answer::json(200, json!({"online": false, "terminals": []})) });
    let api = GatewayClient::new(fake.addr, "k");
    assert!(!api.presence("a").unwrap().online);
    assert!(!api.presence("a").unwrap().online);
    assert_eq!(fake.accepts.load(Ordering::SeqCst), 2);
}

#[test]
fn raw_requests_send_the_exact_bytes() {
    let fake = serve(|req| {
        if req.body == b"{nope" {
            Answer::json(400, json!({"error": {"code": "invalid_json", "message": "bad"}}))
        } else {
            Answer::json(200, json!({}))
        }
    });
    let api = GatewayClient::new(fake.addr, "k");
    let resp = api.request("POST", "/v1/messages", Some(b"{nope")).unwrap();
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert!(!resp.is_success());
    assert_eq!(resp.json::<Value>().unwrap()["error"]["code"], "invalid_json");
    let req = fake.next();
    assert_eq!(req.body, b"{nope");
    assert_eq!(req.header("content-length"), Some("5"));

    // Extra headers replace the defaults; an empty key sends no Authorization at all.
    let resp = api
        .request_with_headers(
            "POST",
            "v1/messages",
            &[("Authorization", "Bearer other"), ("Content-Type", "text/plain")],
            Some(b"x"),
        )
        .unwrap();
    assert_eq!(resp.status, 200);
    let req = fake.next();
    assert_eq!(req.target, "/v1/messages");
    assert_eq!(req.header("authorization"), Some("Bearer other"));
    assert_eq!(req.header("content-type"), Some("text/plain"));
    assert_eq!(req.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("authorization")).count(), 1);

    let anon = GatewayClient::new(fake.addr, "");
    anon.request("GET", "/v1/users/a/unread", None).unwrap();
    let req = fake.next();
    assert_eq!(req.header("authorization"), None);
    assert_eq!(req.header("content-length"), None);
}

#[test]
fn typed_calls_use_the_contract_paths() {
    let fake = serve(|req| {
        let t = req.target.as_str();
        let m = req.method.as_str();
        match (m, t) {
            ("POST", "/v1/messages/batch") => Answer::json(
                200,
                json!({"results": [{"id": "1", "ts": 2}, {"error": {"code": "invalid_body", "message": "to"}}]}),
            ),
            ("POST", "/v1/tokens") => Answer::json(200, json!({"token": "jwt", "expires_at": 99})),
            ("POST", "/v1/users/bob/kick") => Answer::json(200, json!({"kicked": 2})),
            ("POST", "/v1/groups") => Answer::json(201, json!({"id": "team"})),
            ("DELETE", "/v1/groups/team/members/bob") => {
                Answer { status: 204, body: Vec::new(), close_header: false, close_silently: false, chunked: false }
            }
            ("GET", "/v1/groups/team/messages?after_seq=4&limit=2") => {
                Answer { chunked: true, ..Answer::json(200, json!({"messages": [{"seq": 5}, {"seq": 6}]})) }
            }
            _ => Answer::json(200, json!({"method": m, "target": t})),
        }
    });
    let api = GatewayClient::new(fake.addr, "k");

    let r = api.send_batch(&[text_message("a", "b", "one"), text_message("a", "", "two")]).unwrap();
    assert!(matches!(r.results[0], BatchResult::Sent(_)));
    assert!(matches!(r.results[1], BatchResult::Failed { .. }));
    let body = fake.next().json();
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);
    assert_eq!(body["messages"][1]["body"]["text"], "two");

    let t = api.token(TokenRequest { user: "bob".into(), ttl_s: Some(60), device: None }).unwrap();
    assert_eq!((t.token.as_str(), t.expires_at), ("jwt", 99));
    assert_eq!(fake.next().json()["user"], "bob");

    let k = api.kick("bob", Kick { device: Some("phone".into()), reason: None, revoke: false }).unwrap();
    assert_eq!(k.kicked, 2);
    assert_eq!(fake.next().json()["device"], "phone");

    let g = api.create_group(Some("team"), "Team", "alice", &["alice", "bob"]).unwrap();
    assert_eq!(g["id"], "team");
    assert_eq!(
        fake.next().json(),
        json!({"id": "team", "name": "Team", "owner": "alice", "members": ["alice", "bob"]})
    );

    assert_eq!(api.remove_member("team", "bob").unwrap(), Value::Null);
    fake.next();

    let h = api.group_history("team", &HistoryQuery::default().after_seq(4).limit(2)).unwrap();
    assert_eq!(h["messages"][1]["seq"], 6);
    fake.next();

    // The rest are answered with the method and target they arrived with.
    let echo = |v: Value| (v["method"].as_str().unwrap().to_owned(), v["target"].as_str().unwrap().to_owned());
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            api.history("bob", &HistoryQuery::default().chat("u:alice").before_seq(10)).unwrap(),
            "GET",
            "/v1/users/bob/messages?chat=u:alice&before_seq=10",
        ),
        (api.unread("bob").unwrap(), "GET", "/v1/users/bob/unread"),
        (api.get_group("team").unwrap(), "GET", "/v1/groups/team"),
        (api.dissolve_group("team").unwrap(), "DELETE", "/v1/groups/team"),
        (api.add_members("team", &["carol".to_owned()]).unwrap(), "POST", "/v1/groups/team/members"),
        (
            api.list_members("team", Some("c 1"), Some(50)).unwrap(),
            "GET",
            "/v1/groups/team/members?cursor=c%201&limit=50",
        ),
        (
            api.send_group_message("team", "alice", Kind::Text, &json!({"text": "yo"}), Some("c9")).unwrap(),
            "POST",
            "/v1/groups/team/messages",
        ),
        (api.group_reads("team", "m 1").unwrap(), "GET", "/v1/groups/team/messages/m%201/reads"),
    ];
    for (got, method, target) in cases {
        assert_eq!(echo(got), (method.to_owned(), target.to_owned()));
    }
    let mut reqs: Vec<Req> = (0..8).map(|_| fake.next()).collect();
    assert_eq!(reqs[4].json(), json!({"members": ["carol"]}));
    assert_eq!(reqs.remove(6).json(), json!({"from": "alice", "kind": "text", "body": {"text": "yo"}, "cid": "c9"}));
    assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
}

#[test]
fn unusable_addresses_fail_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let api = GatewayClient::new(addr, "k").with_connect_timeout(Duration::from_secs(2));
    assert!(matches!(api.unread("a"), Err(SdkError::Io(_))));
    let api = GatewayClient::new("ftp://127.0.0.1:9001", "k");
    assert!(matches!(api.unread("a"), Err(SdkError::InvalidUrl(_))));
    // https:// is usable; nothing listening there is an I/O error like for http://.
    let api = GatewayClient::new(format!("https://{addr}"), "k").with_connect_timeout(Duration::from_secs(2));
    assert!(matches!(api.unread("a"), Err(SdkError::Io(_))));
}

#[test]
fn a_client_is_shared_across_threads() {
    let fake = serve(|_| Answer::json(200, json!({"chats": {}})));
    let api = Arc::new(GatewayClient::new(fake.addr, "k"));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let api = api.clone();
            thread::spawn(move || {
                for _ in 0..10 {
                    api.unread("a").unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
}

/// A server answering `raw` bytes to every request on one connection (then closing).
fn raw_server(raw: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                if read_request(&mut reader, 0).is_some() {
                    let _ = writer.write_all(raw);
                    // Endless input for the bodies that have no end of their own.
                    let filler = [b'x'; 65536];
                    while writer.write_all(&filler).is_ok() {}
                }
            });
        }
    });
    addr
}

/// Answers bigger than the client's bound are refused, not buffered: a huge Content-Length,
/// a chunked body past the bound, an endless body without length, an endless header line.
#[test]
fn oversized_answers_fail_without_exhausting_memory() {
    let cases: [&'static [u8]; 4] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: ",
    ];
    for raw in cases {
        let addr = raw_server(raw);
        let client = GatewayClient::new(addr.to_string(), "k").with_max_body_bytes(1 << 20);
        let err = client.request("GET", "/x", None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("larger than") || text.contains("longer than"),
            "{:?}: {text}",
            String::from_utf8_lossy(raw)
        );
    }
}
