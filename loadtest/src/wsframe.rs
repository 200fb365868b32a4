//! The WebSocket frame codec (RFC 6455) and the HTTP upgrade, for both sides: terminals
//! mask what they send, the wire-limit server does not. Frames are parsed in place from the
//! caller's buffer (masked payloads are unmasked there), so nothing is allocated per frame.
use std::ops::Range;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest frame accepted (a message body is at most 32 KiB; this leaves room).
pub const MAX_FRAME: usize = 4 << 20;

/// One parsed frame: its payload is `buf[payload]`, the frame used `len` bytes of `buf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Range<usize>,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    TooLarge(u64),
    Reserved,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes"),
            FrameError::Reserved => f.write_str("reserved bits or opcode"),
        }
    }
}

/// Parses the frame at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse(buf: &mut [u8]) -> Result<Option<Parsed>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let opcode = b0 & 0x0F;
    if !matches!(opcode, OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(FrameError::Reserved);
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if len > MAX_FRAME as u64 {
        return Err(FrameError::TooLarge(len));
    }
    let len = len as usize;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    if let Some(m) = mask {
        apply_mask(&mut buf[at..at + len], m);
    }
    Ok(Some(Parsed { fin: b0 & 0x80 != 0, opcode, payload: at..at + len, len: at + len }))
}

fn apply_mask(data: &mut [u8], m: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Appends one final frame to `out`; masked with `mask` when given (terminals must mask).
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if n < 126 {
        out.push(mbit | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(mbit | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], m);
        }
        None => out.extend_from_slice(payload),
    }
}

/// The upgrade request a terminal sends.
pub fn client_request(host: &str, path_and_query: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A random `Sec-WebSocket-Key`.
pub fn random_key() -> String {
    use base64::Engine;
    let k: [u8; 16] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Outcome of reading an upgrade response.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// Need more bytes.
    Partial,
    /// 101 with the right accept key; the headers used `len` bytes.
    Accepted { len: usize },
    /// Anything else: a short reason for the failure tally.
    Refused(String),
}

/// Checks the server's answer to an upgrade request sent with `key`.
pub fn check_response(buf: &[u8], key: &str) -> Upgrade {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Partial) => Upgrade::Partial,
        Err(e) => Upgrade::Refused(format!("handshake: bad http ({e})")),
        Ok(httparse::Status::Complete(len)) => {
            let code = resp.code.unwrap_or(0);
            if code != 101 {
                return Upgrade::Refused(format!("handshake: http {code}"));
            }
            let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
            let ok = resp
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == want.as_bytes());
            if ok {
                Upgrade::Accepted { len }
            } else {
                Upgrade::Refused("handshake: bad Sec-WebSocket-Accept".into())
            }
        }
    }
}

/// A parsed upgrade request (server side).
#[derive(Debug, PartialEq, Eq)]
pub struct ClientUpgrade {
    pub path: String,
    pub key: String,
    pub len: usize,
}

/// Parses a terminal's upgrade request; `Ok(None)` when more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<ClientUpgrade>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("bad http: {e}")),
        Ok(httparse::Status::Complete(len)) => {
            let key = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .ok_or("no Sec-WebSocket-Key")?;
            Ok(Some(ClientUpgrade { path: req.path.unwrap_or("/").to_owned(), key, len }))
        }
    }
}

/// The server's 101 answer for `key`.
pub fn server_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// The value of query parameter `name` in `path` (no percent-decoding: tokens and ids are
/// URL-safe).
pub fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let q = path.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_masked_and_not() {
        for size in [0usize, 5, 125, 126, 1000, 70_000] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut buf = Vec::new();
                encode(&mut buf, OP_TEXT, &payload, mask);
                buf.extend_from_slice(b"next");
                let short = buf.len() - 5;
                assert_eq!(parse(&mut buf[..short]).unwrap(), None);
                let p = parse(&mut buf).unwrap().unwrap();
                assert!(p.fin);
                assert_eq!(p.opcode, OP_TEXT);
                assert_eq!(&buf[p.payload.clone()], &payload[..]);
                assert_eq!(&buf[p.len..], b"next");
            }
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut b = vec![0x80 | 0x3, 0];
        assert_eq!(parse(&mut b), Err(FrameError::Reserved));
        let mut b = vec![0x81, 127, 0, 0, 0, 0, 0xFF, 0, 0, 0];
        assert!(matches!(parse(&mut b), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn handshake_both_sides() {
        let key = random_key();
        let req = client_request("h:1", "/ws?token=abc&device=d1", &key);
        let up = parse_request(&req).unwrap().unwrap();
        assert_eq!(up.key, key);
        assert_eq!(up.len, req.len());
        assert_eq!(query_param(&up.path, "token"), Some("abc"));
        assert_eq!(query_param(&up.path, "device"), Some("d1"));
        assert_eq!(query_param(&up.path, "x"), None);
        let resp = server_response(&key);
        assert_eq!(check_response(&resp[..10], &key), Upgrade::Partial);
        assert_eq!(check_response(&resp, &key), Upgrade::Accepted { len: resp.len() });
        assert!(matches!(check_response(&resp, "other"), Upgrade::Refused(_)));
        assert_eq!(
            check_response(b"HTTP/1.1 401 Unauthorized\r\n\r\n", &key),
            Upgrade::Refused("handshake: http 401".into())
        );
    }
}
