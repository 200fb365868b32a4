//! The server over real sockets: a glommio executor in a thread runs `accept_loop` on
//! 127.0.0.1:0, and plain `std::net::TcpStream` clients speak raw HTTP bytes to it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ether_http::{accept_loop, Limits, Method, Request, Response, Stop};

/// Generous for CI; every read in these tests is bounded by it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// `/big`'s body: far more than loopback socket buffers hold, so the server is still writing
/// it when a client's extra bytes arrive, and its last part is still queued when it closes.
const BIG_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A server on an ephemeral port; stopped and joined on drop.
struct TestServer {
    addr: SocketAddr,
    stop_tx: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(limits: Limits, idle_timeout: Duration, max_connections: usize) -> TestServer {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let ex = glommio::LocalExecutorBuilder::default()
                .spawn(move || async move {
                    let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
                    addr_tx.send(listener.local_addr().expect("local addr")).expect("send addr");
                    let stop = Stop::new();
                    // The std channel cannot wake a glommio task: poll it on a short timer.
                    let watcher = stop.clone();
                    glommio::spawn_local(async move {
                        while stop_rx.try_recv() == Err(mpsc::TryRecvError::Empty) {
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                        }
                        watcher.stop();
                    })
                    .detach();
                    accept_loop(listener, limits, idle_timeout, max_connections, Rc::new(handle), None, stop).await;
                })
                .expect("spawn executor");
            ex.join().expect("executor thread");
        });
        let addr = addr_rx.recv_timeout(IO_TIMEOUT).expect("server address");
        TestServer { addr, stop_tx: Some(stop_tx), thread: Some(thread) }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        drop(self.stop_tx.take());
        if let Some(thread) = self.thread.take() {
            let joined = thread.join();
            if !std::thread::panicking() {
                joined.expect("server thread exits cleanly after stop");
            }
        }
    }
}

thread_local! {
    /// Set by `/signal`, awaited by `/wait`: proves pipelined handlers run concurrently.
    static SIGNALLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Echoes what it saw: `<METHOD> <path> q=<query param> body=<len>`; `/slow` takes 50 ms
/// (so pipelined answers must wait for each other to stay in order).
async fn handle(req: Request) -> Response {
    if req.path == "/big" {
        return Response::text(200, &"x".repeat(BIG_BODY_BYTES));
    }
    if req.path == "/slow" {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    if req.path == "/signal" {
        SIGNALLED.with(|s| s.set(true));
    }
    if req.path == "/wait" {
        for _ in 0..2000 {
            if SIGNALLED.with(|s| s.get()) {
                return Response::text(200, "released");
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        return Response::text(504, "never released");
    }
    let line =
        format!("{} {} q={} body={}", req.method, req.path, req.query_param("q").unwrap_or_default(), req.body.len());
    match req.method {
        Method::Post => Response::json(201, format!("{{\"echo\":{:?}}}", line).into_bytes()),
        _ => Response::text(200, &line),
    }
}

/// One parsed response off the client socket.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads exactly one response (Content-Length framed) from `s`, keeping any extra bytes in
/// `pending` for the next call.
fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> Got {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) = resp.parse(pending).expect("valid response") {
            let status = resp.code.expect("status");
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().expect("numeric content-length"))
                .unwrap_or(0);
            if pending.len() >= head_len + len {
                let body = String::from_utf8_lossy(&pending[head_len..head_len + len]).into_owned();
                pending.drain(..head_len + len);
                return Got { status, headers, body };
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read response");
        assert!(n > 0, "connection closed before a whole response; got {pending:?}");
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// Asserts the server closed the connection: EOF (or a reset) with no further bytes.
fn assert_closed(s: &mut TcpStream, pending: &[u8]) {
    assert!(pending.is_empty(), "unexpected extra bytes {pending:?}");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected close, got {:?}", &buf[..n]),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected close, got error {e}"),
    }
}

/// Asserts nothing arrives within `wait` and the connection stays open.
fn assert_silent(s: &mut TcpStream, wait: Duration) {
    s.set_read_timeout(Some(wait)).expect("set timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("set timeout");
}

fn server() -> TestServer {
    TestServer::start(Limits::default(), Duration::from_secs(5), 64)
}

/// Sends `raw` on a new connection and reads the one response, after which the server must
/// have closed the connection.
fn answered_then_closed(srv: &TestServer, raw: &[u8]) -> Got {
    let mut s = srv.connect();
    s.write_all(raw).expect("write");
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending);
    assert_closed(&mut s, &pending);
    r
}

/// The `error.code` of a JSON error body.
fn error_code(r: &Got) -> String {
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json body");
    v["error"]["code"].as_str().expect("error.code").to_owned()
}

#[test]
fn keep_alive_two_requests_on_one_connection() {
    let srv = server();
    let mut s = srv.connect();
    let mut pending = Vec::new();

    s.write_all(b"GET /v1/users/u1/presence?q=a%20b HTTP/1.1\r\nHost: t\r\n\r\n").expect("write");
    let r = read_response(&mut s, &mut pending);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "GET /v1/users/u1/presence q=a b body=0");
    assert_eq!(r.header("connection"), None, "keep-alive is the 1.1 default");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_silent(&mut s, Duration::from_millis(100));

    s.write_all(b"POST /v1/messages HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").expect("write");
    let r = read_response(&mut s, &mut pending);
    assert_eq!(r.status, 201);
    assert_eq!(r.body, r#"{"echo":"POST /v1/messages q= body=5"}"#);

    s.write_all(b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\n").expect("write");
    let r = read_response(&mut s, &mut pending);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed(&mut s, &pending);
}

#[test]
fn pipelined_requests_answered_in_order_in_one_batch() {
    let srv = server();
    let mut s = srv.connect();
    // the first is slow: a server answering out of order would put /b or /c first
    s.write_all(
        b"GET /slow HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyzGET /c?q=3 HTTP/1.1\r\n\r\n",
    )
    .expect("write");
    let mut pending = Vec::new();
    let bodies: Vec<String> = (0..3).map(|_| read_response(&mut s, &mut pending).body).collect();
    assert_eq!(bodies, ["GET /slow q= body=0", r#"{"echo":"POST /b q= body=3"}"#, "GET /c q=3 body=0",]);
    assert!(pending.is_empty());
    assert_silent(&mut s, Duration::from_millis(100));
}

#[test]
fn pipelined_handlers_run_concurrently_and_answer_in_order() {
    let srv = server();
    let mut s = srv.connect();
    // `/wait` finishes only once `/signal`, pipelined behind it, has run: a server that ran
    // one handler at a time would answer 504 after two seconds.
    s.write_all(b"GET /wait HTTP/1.1\r\n\r\nGET /signal HTTP/1.1\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    let first = read_response(&mut s, &mut pending);
    assert_eq!((first.status, first.body.as_str()), (200, "released"));
    let second = read_response(&mut s, &mut pending);
    assert_eq!((second.status, second.body.as_str()), (200, "GET /signal q= body=0"));
}

#[test]
fn request_split_across_many_writes() {
    let srv = server();
    let mut s = srv.connect();
    let raw = b"POST /split HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789";
    for chunk in raw.chunks(7) {
        s.write_all(chunk).expect("write");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = read_response(&mut s, &mut Vec::new());
    assert_eq!(r.body, r#"{"echo":"POST /split q= body=10"}"#);
}

#[test]
fn malformed_request_gets_400_and_close() {
    let srv = server();
    let mut s = srv.connect();
    s.write_all(b"GET / HTTP/1.1\r\nBad Header\r\n\r\nGET / HTTP/1.1\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json body");
    assert_eq!(v["error"]["code"], "bad_request");
    assert!(v["error"]["message"].is_string());
    assert_closed(&mut s, &pending);
}

#[test]
fn oversized_header_gets_431() {
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(Limits::default().header_bytes_max));
    let r = answered_then_closed(&server(), big.as_bytes());
    assert_eq!((r.status, error_code(&r).as_str()), (431, "header_too_large"));
}

#[test]
fn endless_header_gets_431_without_waiting_for_its_end() {
    // no terminating blank line: the server must not wait for one
    let open = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(9 * 1024));
    assert_eq!(answered_then_closed(&server(), open.as_bytes()).status, 431);
}

/// RFC 9110 §15.5.15: a request line (method + target) longer than the limit is 414 URI Too
/// Long, not 431; answered without waiting for the line to end, and the connection closed.
#[test]
fn overlong_request_line_gets_414_not_431() {
    let srv = server();
    let limit = Limits::default().header_bytes_max;
    for raw in [
        format!("GET /v1/users/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(limit)),
        // no end of line yet: the server must not wait for one
        format!("GET /v1/users/u1/messages?chat={}", "a".repeat(limit + 1024)),
    ] {
        let r = answered_then_closed(&srv, raw.as_bytes());
        assert_eq!(r.status, 414, "{}", r.body);
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(error_code(&r), "uri_too_long");
    }
    // a request line that ends in time, then too many header bytes: still 431
    let raw = format!("GET /{} HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(100), "b".repeat(limit));
    assert_eq!(answered_then_closed(&srv, raw.as_bytes()).status, 431);
}

/// RFC 9112 §3.2: a request with more than one Host field (or an invalid one) MUST be answered
/// 400; the request never reaches the handler, and the connection closes.
#[test]
fn two_host_headers_or_a_bad_host_get_400() {
    let srv = server();
    for raw in [
        &b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nHOST: b\r\n\r\nabc",
        b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: evil@a.example\r\n\r\n",
    ] {
        let r = answered_then_closed(&srv, raw);
        assert_eq!(r.status, 400, "{:?} got {}", String::from_utf8_lossy(raw), r.body);
        assert_eq!(error_code(&r), "bad_request");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json body");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("Host")), "{}", r.body);
        assert_eq!(r.header("connection"), Some("close"));
    }
    // one valid Host (or none: see http/src/request.rs) is served as before
    let mut s = srv.connect();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: [::1]:9001\r\n\r\nGET /y HTTP/1.1\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut s, &mut pending).body, "GET /x q= body=0");
    assert_eq!(read_response(&mut s, &mut pending).body, "GET /y q= body=0");
}

#[test]
fn oversized_body_gets_413_before_the_body_is_sent() {
    let srv = server();
    let mut s = srv.connect();
    let limit = Limits::default().body_bytes_max;
    let head = format!("POST /v1/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n", limit + 1);
    s.write_all(head.as_bytes()).expect("write");
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending);
    assert_eq!(r.status, 413);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json body");
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert_closed(&mut s, &pending);
}

#[test]
fn chunked_body_gets_411() {
    let srv = server();
    let mut s = srv.connect();
    s.write_all(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut s, &mut pending).status, 411);
    assert_closed(&mut s, &pending);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let srv = server();
    let mut s = srv.connect();
    s.write_all(b"POST /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut s, &mut pending).status, 100);
    s.write_all(b"data").expect("write");
    let r = read_response(&mut s, &mut pending);
    assert_eq!(r.status, 201);
    assert_eq!(r.body, r#"{"echo":"POST /up q= body=4"}"#);
}

#[test]
fn http_1_0_closes_unless_keep_alive_and_head_has_no_body() {
    let srv = server();
    let mut s = srv.connect();
    s.write_all(b"HEAD /h HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("write");
    let mut head = Vec::new();
    // HEAD: the same Content-Length as GET, no body bytes after the head
    let expected_len = "HEAD /h q= body=0".len().to_string();
    let deadline = Instant::now() + IO_TIMEOUT;
    while !head.ends_with(b"\r\n\r\n") && Instant::now() < deadline {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).expect("read"), 1);
        head.extend_from_slice(&byte);
    }
    let head = String::from_utf8(head).expect("utf-8");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains(&format!("Content-Length: {expected_len}\r\n")), "{head}");
    assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
    assert_silent(&mut s, Duration::from_millis(100));

    s.write_all(b"GET /old HTTP/1.0\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending);
    assert_eq!(r.body, "GET /old q= body=0");
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed(&mut s, &pending);
}

#[test]
fn idle_connection_is_closed_silently() {
    let srv = TestServer::start(Limits::default(), Duration::from_millis(200), 64);
    let mut s = srv.connect();
    let started = Instant::now();
    assert_closed(&mut s, &[]);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[test]
fn stalled_request_gets_408() {
    let srv = TestServer::start(Limits::default(), Duration::from_millis(200), 64);
    let r = answered_then_closed(&srv, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!(r.status, 408);
}

#[test]
fn connections_beyond_the_cap_are_closed() {
    let srv = TestServer::start(Limits::default(), Duration::from_secs(5), 2);
    let mut a = srv.connect();
    let mut b = srv.connect();
    // make sure both are being served before the third arrives
    for s in [&mut a, &mut b] {
        s.write_all(b"GET /x HTTP/1.1\r\n\r\n").expect("write");
        assert_eq!(read_response(s, &mut Vec::new()).status, 200);
    }
    let mut c = srv.connect();
    let _ = c.write_all(b"GET /x HTTP/1.1\r\n\r\n");
    assert_closed(&mut c, &[]);
    // the first two are unaffected; once one leaves, a new connection is served
    a.write_all(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut a, &mut pending).status, 200);
    assert_closed(&mut a, &pending);
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let mut d = srv.connect();
        let _ = d.write_all(b"GET /x HTTP/1.1\r\n\r\n");
        let mut buf = [0u8; 12];
        if let Ok(n) = d.read(&mut buf) {
            if n > 0 {
                assert!(buf[..n].starts_with(b"HTTP/1.1"));
                break;
            }
        }
        assert!(Instant::now() < deadline, "a slot never freed up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stop_closes_idle_connections_and_ends_the_loop() {
    let srv = server();
    let mut s = srv.connect();
    s.write_all(b"GET /x HTTP/1.1\r\n\r\n").expect("write");
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut s, &mut pending).status, 200);
    let started = Instant::now();
    drop(srv); // stops and joins: returns only once the idle connection is gone
    assert!(started.elapsed() < Duration::from_secs(4), "stop waited for the idle timeout");
    assert_closed(&mut s, &pending);
}

/// Reads until EOF; an error (a reset) ends it too, with what arrived so far.
fn read_to_end_or_reset(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut all = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (all, None),
            Ok(n) => all.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (all, Some(e)),
        }
    }
}

/// A business system that forgot to percent-encode an id (`/v1/users/John Doe/presence`)
/// gets a 400 that names the request line, not "505 HTTP version not supported".
#[test]
fn space_in_the_target_is_a_400_not_a_505() {
    let srv = TestServer::start(Limits::default(), Duration::from_secs(5), 16);
    let mut s = srv.connect();
    s.write_all(b"GET /v1/users/John Doe/presence HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let (got, err) = read_to_end_or_reset(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(err.is_none(), "{err:?}");
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("request line"), "{text}");
}

/// A request with `Connection: close` followed by more bytes (a pipelining client, or the
/// stray CRLF some clients send after a body): closing with those bytes unread makes the
/// kernel reset the connection, and a reset throws away the part of the response still
/// queued. The whole response must arrive, then a clean EOF.
#[test]
fn connection_close_with_more_input_pending_delivers_the_whole_response() {
    let srv = TestServer::start(Limits::default(), Duration::from_secs(5), 16);
    let mut s = srv.connect();
    s.write_all(b"GET /big HTTP/1.1\r\nConnection: close\r\n\r\n").expect("write");
    // The server is busy writing 32 MiB to a client that does not read yet: these bytes stay
    // unread in its socket.
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"GET /next HTTP/1.1\r\n\r\n").expect("write");
    let (got, err) = read_to_end_or_reset(&mut s);
    assert!(err.is_none(), "connection reset after {} bytes: {err:?}", got.len());
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&got[..head_end]);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("Connection: close\r\n"), "{head}");
    assert_eq!(got.len() - head_end, BIG_BODY_BYTES, "the whole body, and nothing after it");
}
