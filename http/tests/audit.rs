//! Audit regressions over real sockets (as `tests/server.rs`: a glommio executor in a thread
//! runs `accept_loop` on 127.0.0.1:0, `std::net::TcpStream` clients speak raw bytes).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use ether_http::{accept_loop, Limits, Request, Response, Stop};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Far more than loopback socket buffers hold: the server is still writing it when the
/// client's extra bytes arrive, and its last part is still queued when the server closes.
const BIG_BODY_BYTES: usize = 32 * 1024 * 1024;

struct TestServer {
    addr: SocketAddr,
    stop_tx: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start() -> TestServer {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let ex = glommio::LocalExecutorBuilder::default()
                .spawn(move || async move {
                    let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
                    addr_tx.send(listener.local_addr().expect("local addr")).expect("send addr");
                    let stop = Stop::new();
                    let watcher = stop.clone();
                    glommio::spawn_local(async move {
                        while stop_rx.try_recv() == Err(mpsc::TryRecvError::Empty) {
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                        }
                        watcher.stop();
                    })
                    .detach();
                    let limits = Limits::default();
                    accept_loop(listener, limits, Duration::from_secs(5), 16, Rc::new(handle), None, stop).await;
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

async fn handle(req: Request) -> Response {
    if req.path == "/big" {
        return Response::text(200, &"x".repeat(BIG_BODY_BYTES));
    }
    Response::text(200, &format!("{} {}", req.method, req.path))
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
    let srv = TestServer::start();
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
    let srv = TestServer::start();
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
