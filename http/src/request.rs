//! Request side: limits, the sans-IO check-then-parse of one HTTP/1.1 request, and the
//! parsed [`Request`]. Owns no sockets and no clock: bytes in, a request (or "need more") out.
//!
//! The parser follows tokio-rs/mini-redis's check-then-parse: [`check`] walks the bytes
//! without allocating and says how far the buffer is from a whole request; only when the
//! whole request (header section and body) is in does [`parse`] allocate the owned
//! [`Request`]. "Incomplete" is a state (`Ok(None)`, [`Progress::NeedHead`],
//! [`Progress::NeedBody`]), never an error.
//!
//! Bodies are framed by `Content-Length` only. Any `Transfer-Encoding` (chunked or other) is
//! refused with [`HttpError::LengthRequired`] (411): the client can retry with a
//! `Content-Length`, and refusing is safer than guessing the framing (request smuggling).
//! A request with neither header has an empty body (RFC 9112 §6.3).
//!
//! `Host` (RFC 9112 §3.2): a request with more than one `Host` field, or one whose value is
//! not `host[:port]`, is refused with [`HttpError::Malformed`] (400), since the fields may be
//! read differently by a proxy in front. Not enforced, on purpose: the presence of `Host`
//! (raw-socket tests, probes and HTTP/1.0 clients omit it; nothing here routes by it).

use std::borrow::Cow;
use std::fmt;

/// Header slots kept on the stack while checking; `Limits::headers_max` above this uses a
/// heap buffer instead (only configurations that raise the limit pay for it).
const STACK_HEADERS: usize = 128;

/// Size limits for one request. Every byte a peer can make us hold is bounded by these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest header section (request line + headers + blank line), in bytes. Default 8 KiB.
    pub header_bytes_max: usize,
    /// Most header fields in one request. Default 64.
    pub headers_max: usize,
    /// Largest body (`Content-Length`), in bytes. Default 1 MiB.
    pub body_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { header_bytes_max: 8 * 1024, headers_max: 64, body_bytes_max: 1024 * 1024 }
    }
}

impl Limits {
    /// Tiny limits so tests reach every overflow path with a few bytes.
    pub fn test_min() -> Self {
        Limits { header_bytes_max: 256, headers_max: 4, body_bytes_max: 64 }
    }

    /// The largest whole request these limits admit, in bytes.
    pub fn request_bytes_max(&self) -> usize {
        self.header_bytes_max.saturating_add(self.body_bytes_max)
    }
}

/// Why a request was refused. Each variant maps to exactly one HTTP status ([`status`]) and
/// one API error code ([`code`]); `response::error_response` renders it.
///
/// [`status`]: HttpError::status
/// [`code`]: HttpError::code
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The bytes are not an HTTP/1.x request (bad request line, header, target, escape,
    /// Content-Length). 400.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The header section is longer than `header_bytes_max` or has more than `headers_max`
    /// fields. 431.
    #[error("request header section too large")]
    HeaderTooLarge,
    /// The request line (method and target) alone does not end within `header_bytes_max`.
    /// 414 (RFC 9110 §15.5.15).
    #[error("request line (method and target) longer than {limit} bytes")]
    UriTooLong {
        /// The configured `header_bytes_max`.
        limit: usize,
    },
    /// `Content-Length` is above `body_bytes_max`; detected before the body arrives. 413.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured `body_bytes_max`.
        limit: usize,
    },
    /// The request uses `Transfer-Encoding`; only `Content-Length` bodies are accepted. 411.
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    LengthRequired,
    /// The request line names an HTTP version other than 1.0 or 1.1. 505.
    #[error("HTTP version not supported")]
    VersionNotSupported,
    /// A request was started but not completed in time (raised by the server loop, never
    /// by [`parse`]). 408.
    #[error("request not completed in time")]
    RequestTimeout,
}

impl HttpError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeaderTooLarge => 431,
            HttpError::UriTooLong { .. } => 414,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::LengthRequired => 411,
            HttpError::VersionNotSupported => 505,
            HttpError::RequestTimeout => 408,
        }
    }

    /// The API error code (`{"error":{"code":…}}`) for this error.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::Malformed(_) => "bad_request",
            HttpError::HeaderTooLarge => "header_too_large",
            HttpError::UriTooLong { .. } => "uri_too_long",
            HttpError::BodyTooLarge { .. } => "payload_too_large",
            HttpError::LengthRequired => "length_required",
            HttpError::VersionNotSupported => "http_version_not_supported",
            HttpError::RequestTimeout => "request_timeout",
        }
    }
}

/// Request method. Names are case-sensitive (RFC 9110 §9.1): `get` is `Other("get")`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Patch,
    Head,
    Options,
    /// Any other token, as sent.
    Other(String),
}

impl Method {
    /// The method for a request-line token.
    pub fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        }
    }

    /// The token as it appears on the request line.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed request, owning its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Percent-decoded path, without the query (`/v1/users/a b` for `/v1/users/a%20b?x=1`).
    /// `%2F` decodes to `/` like any other escape. `*` for `OPTIONS *`; for an absolute-form
    /// target (`http://host/p`) only the path is kept.
    pub path: String,
    /// Raw query (after `?`, before any `#`), not decoded; empty when absent.
    pub query: String,
    /// `(lowercased name, value)` in arrival order; repeated names are kept.
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the connection may carry another request after this one (HTTP/1.1 default
    /// true, HTTP/1.0 default false, `Connection: close` / `keep-alive` honoured).
    pub keep_alive: bool,
    /// HTTP minor version (0 or 1); the server uses it to announce keep-alive to 1.0 peers.
    version_minor: u8,
}

impl Request {
    /// A request built in code (for handler tests): HTTP/1.1, keep-alive, no headers, empty
    /// body. `target` is parsed like a request line's (`/path?query`).
    pub fn new(method: Method, target: &str) -> Result<Request, HttpError> {
        let (path, query) = split_target(target)?;
        Ok(Request { method, path, query, headers: Vec::new(), body: Vec::new(), keep_alive: true, version_minor: 1 })
    }

    /// Adds a header (name lowercased), builder style.
    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Replaces the body, builder style.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in arrival order.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// All headers as `(lowercased name, value)`, in arrival order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?.trim();
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim();
        (!token.is_empty()).then_some(token)
    }

    /// The first value of query parameter `name`, decoded (`%XX`, `+` as space). A name
    /// without `=` has the value `""`. Lenient: a bad escape stays literal, invalid UTF-8
    /// becomes U+FFFD.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').filter(|pair| !pair.is_empty()).find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_query_component(key) == name).then(|| decode_query_component(value).into_owned())
        })
    }

    /// Every `key=value` pair of the query in order, both decoded as in
    /// [`Request::query_param`] (empty pairs skipped; a key without `=` has the value `""`).
    pub fn query_pairs(&self) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
        self.query.split('&').filter(|pair| !pair.is_empty()).map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_query_component(key), decode_query_component(value))
        })
    }

    /// The non-empty segments of the decoded path: `/v1//users/u1/` gives `v1`, `users`, `u1`.
    pub fn path_segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').filter(|s| !s.is_empty())
    }

    /// Whether this is a WebSocket opening handshake (RFC 6455 §4.2.1): `GET`, `Upgrade`
    /// naming `websocket`, `Connection` naming `upgrade`, and a `Sec-WebSocket-Key`.
    /// `Sec-WebSocket-Version` is left to the caller (answer 426 unless it is 13).
    pub fn is_websocket_upgrade(&self) -> bool {
        self.method == Method::Get
            && self.has_token("upgrade", "websocket")
            && self.has_token("connection", "upgrade")
            && self.header("sec-websocket-key").is_some()
    }

    /// HTTP minor version of the request line (0 or 1).
    pub fn version_minor(&self) -> u8 {
        self.version_minor
    }

    /// Whether any comma-separated element of header `name` equals `token`
    /// (case-insensitive).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_all(name).flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// How far a buffer is from one whole request; the "check" half of check-then-parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The header section is not complete yet.
    NeedHead,
    /// The header section is in; the whole request is `total` bytes. `expect_continue`
    /// when an HTTP/1.1 client sent `Expect: 100-continue` (it may wait for `100 Continue`).
    NeedBody { total: usize, expect_continue: bool },
    /// A whole request of `total` bytes is at the front of the buffer.
    Complete { total: usize },
}

/// Checks, without allocating, how much of one request is at the front of `buf`. Every
/// error [`parse`] can raise from the header section is raised here too, except bad target
/// escapes (those need the decoding buffer), so a refused request is refused before its body
/// is read.
pub fn check(buf: &[u8], limits: &Limits) -> Result<Progress, HttpError> {
    scan(buf, limits, false).map(|(progress, _)| progress)
}

/// Parses one request from the front of `buf`.
///
/// `Ok(None)`: incomplete, call again with more bytes (the same prefix plus what arrived).
/// `Ok(Some((request, consumed)))`: the first `consumed` bytes were this request; for
/// pipelining, call again on `&buf[consumed..]`. Nothing is allocated until the whole
/// request is in. A header section already longer than `header_bytes_max` is refused even
/// while incomplete, so a peer cannot make us wait for an endless header.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize)>, HttpError> {
    match scan(buf, limits, true)? {
        (Progress::Complete { total }, Some(request)) => Ok(Some((request, total))),
        _ => Ok(None),
    }
}

/// The head of the request at the front of `buf` (its body empty, whether or not it has
/// arrived), once the header section is complete: `Ok(None)` before that. For looking at
/// a request (its credentials, say) before its body is read.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Request>, HttpError> {
    let window = &buf[..buf.len().min(limits.header_bytes_max)];
    with_header_slots(limits.headers_max, |slots| {
        let mut raw = httparse::Request::new(slots);
        match raw.parse(window) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(HttpError::Malformed(e.to_string())),
        }
        let head = inspect(&raw, limits)?;
        build_request(&raw, &head, &[]).map(Some)
    })
}

/// Shared walk behind [`check`] and [`parse`]: builds the owned request only when `build`
/// and the request is complete.
fn scan(buf: &[u8], limits: &Limits, build: bool) -> Result<(Progress, Option<Request>), HttpError> {
    // Never look past header_bytes_max for the header section: the scan costs at most that
    // much, and a longer head is refused whatever follows.
    let window = &buf[..buf.len().min(limits.header_bytes_max)];
    with_header_slots(limits.headers_max, |slots| {
        let mut raw = httparse::Request::new(slots);
        let head_len = match raw.parse(window) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                // The window is full and the head is still open: it is longer than allowed,
                // and if its first line is still open, that line is what overflowed.
                return if buf.len() >= limits.header_bytes_max {
                    Err(overflow_error(window, limits))
                } else {
                    Ok((Progress::NeedHead, None))
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeaderTooLarge),
            Err(httparse::Error::Version) => return Err(version_error(window)),
            Err(e) => return Err(HttpError::Malformed(e.to_string())),
        };
        let head = inspect(&raw, limits)?;
        let total = head_len + head.content_length; // both bounded by limits: no overflow
        if buf.len() < total {
            let progress = Progress::NeedBody { total, expect_continue: head.expect_continue };
            return Ok((progress, None));
        }
        let progress = Progress::Complete { total };
        if !build {
            return Ok((progress, None));
        }
        let request = build_request(&raw, &head, &buf[head_len..total])?;
        Ok((progress, Some(request)))
    })
}

/// Runs `f` with `n` empty header slots, on the stack when `n <= STACK_HEADERS`.
fn with_header_slots<'b, R>(n: usize, f: impl FnOnce(&mut [httparse::Header<'b>]) -> R) -> R {
    if n <= STACK_HEADERS {
        let mut slots = [httparse::EMPTY_HEADER; STACK_HEADERS];
        f(&mut slots[..n])
    } else {
        let mut slots = vec![httparse::EMPTY_HEADER; n];
        f(&mut slots)
    }
}

/// The error for a header section that does not end within `window` (a full
/// `header_bytes_max`): 414 when the request line itself has not ended (a target too long,
/// RFC 9110 §15.5.15), else 431. Empty lines before the request line (which httparse skips)
/// are not a request line: a window of only those is 431.
fn overflow_error(window: &[u8], limits: &Limits) -> HttpError {
    let start = window.iter().position(|&b| b != b'\r' && b != b'\n');
    match start {
        Some(start) if !window[start..].contains(&b'\n') => HttpError::UriTooLong { limit: limits.header_bytes_max },
        _ => HttpError::HeaderTooLarge,
    }
}

/// The error for a request line httparse refused where the version belongs. It says so for
/// any unexpected byte there, so a space in the target (`GET /a b HTTP/1.1`: the version
/// would be `b`) looks like a version error: only a real `HTTP/<digit>.<digit>` token (other
/// than 1.0 and 1.1) after exactly a method and a target is 505; anything else is a malformed
/// request line (400).
fn version_error(buf: &[u8]) -> HttpError {
    // httparse skips empty lines before the request line; it may still be incomplete.
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let rest = &buf[start..];
    let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let version = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(version), None) => version,
        _ => b"",
    };
    // `HTTP/d.d`, possibly cut short by the end of what has arrived.
    let looks_like_version = !version.is_empty()
        && version.len() <= 8
        && version.iter().zip(b"HTTP/0.0").all(|(&b, &p)| if p == b'0' { b.is_ascii_digit() } else { b == p });
    if looks_like_version {
        HttpError::VersionNotSupported
    } else {
        HttpError::Malformed(
            "invalid request line: expected `METHOD TARGET HTTP/1.1` (spaces in the target must be sent as %20)"
                .to_owned(),
        )
    }
}

/// What the framing headers say, read from a complete header section.
struct Head {
    version_minor: u8,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

fn inspect(raw: &httparse::Request<'_, '_>, limits: &Limits) -> Result<Head, HttpError> {
    let version_minor = raw.version.unwrap_or(1);
    let mut content_length: Option<usize> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    let mut host_seen = false;
    for h in raw.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", h.name)))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value, limits)?;
            match content_length {
                Some(prev) if prev != n => {
                    return Err(HttpError::Malformed("conflicting Content-Length headers".to_owned()))
                }
                _ => content_length = Some(n),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = version_minor >= 1 && value.eq_ignore_ascii_case("100-continue");
        } else if h.name.eq_ignore_ascii_case("host") {
            // RFC 9112 §3.2: more than one Host, or an invalid one, MUST be answered 400.
            if std::mem::replace(&mut host_seen, true) {
                return Err(HttpError::Malformed("more than one Host header".to_owned()));
            }
            if !valid_host(value) {
                return Err(HttpError::Malformed(format!("invalid Host header {value:?}")));
            }
        }
    }
    let keep_alive = !close && (version_minor >= 1 || keep_alive_token);
    Ok(Head { version_minor, content_length: content_length.unwrap_or(0), keep_alive, expect_continue })
}

/// Whether `value` is a `Host` field value (RFC 9110 §7.2): `uri-host [ ":" port ]`, where
/// `uri-host` is a bracketed IP literal or a reg-name (unreserved, sub-delims, `%XX`). An empty
/// value is valid (a target without an authority).
fn valid_host(value: &str) -> bool {
    fn unreserved_or_sub_delim(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
    }
    let (host_ok, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else { return false };
        // IPv6address or IPvFuture: hex digits, dots, colons, `v`, and for IPvFuture
        // unreserved / sub-delims; checked for characters only.
        let literal_ok = !literal.is_empty() && literal.bytes().all(|b| b == b':' || unreserved_or_sub_delim(b));
        match after.strip_prefix(':') {
            Some(port) => (literal_ok, port),
            None => (literal_ok && after.is_empty(), ""),
        }
    } else {
        let (host, port) = value.split_once(':').unwrap_or((value, ""));
        let bytes = host.as_bytes();
        let mut i = 0;
        let mut ok = true;
        while ok && i < bytes.len() {
            if bytes[i] == b'%' {
                ok = bytes.get(i + 1..i + 3).and_then(hex_pair).is_some();
                i += 3;
            } else {
                ok = unreserved_or_sub_delim(bytes[i]);
                i += 1;
            }
        }
        (ok, port)
    };
    host_ok && port.bytes().all(|b| b.is_ascii_digit())
}

/// `1*DIGIT`, refused as too large (not malformed) when it exceeds the limit or `usize`.
fn parse_content_length(value: &str, limits: &Limits) -> Result<usize, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed(format!("invalid Content-Length {value:?}")));
    }
    let too_large = HttpError::BodyTooLarge { limit: limits.body_bytes_max };
    let mut n: usize = 0;
    for b in value.bytes() {
        n = n.checked_mul(10).and_then(|n| n.checked_add(usize::from(b - b'0'))).ok_or_else(|| too_large.clone())?;
    }
    if n > limits.body_bytes_max {
        return Err(too_large);
    }
    Ok(n)
}

fn build_request(raw: &httparse::Request<'_, '_>, head: &Head, body: &[u8]) -> Result<Request, HttpError> {
    // httparse only returns Complete once method and path are set.
    let method = Method::from_token(raw.method.unwrap_or_default());
    let (path, query) = split_target(raw.path.unwrap_or_default())?;
    let mut headers = Vec::with_capacity(raw.headers.len());
    for h in raw.headers.iter() {
        // UTF-8 already checked by `inspect`.
        let value = String::from_utf8_lossy(h.value).trim().to_owned();
        headers.push((h.name.to_ascii_lowercase(), value));
    }
    Ok(Request {
        method,
        path,
        query,
        headers,
        body: body.to_vec(),
        keep_alive: head.keep_alive,
        version_minor: head.version_minor,
    })
}

/// Splits a request target into (decoded path, raw query).
fn split_target(target: &str) -> Result<(String, String), HttpError> {
    let target = target.split('#').next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = if path.starts_with('/') || path == "*" {
        path
    } else if let Some(rest) = strip_scheme(path) {
        // absolute-form: drop the authority
        rest.find('/').map_or("/", |i| &rest[i..])
    } else {
        return Err(HttpError::Malformed(format!("unsupported request target {target:?}")));
    };
    Ok((decode_path(path)?, query.to_owned()))
}

fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].iter().find_map(|scheme| {
        let head = target.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme).then(|| &target[scheme.len()..])
    })
}

/// Strict percent-decoding for the path: every `%` must start a `%XX` escape and the result
/// must be UTF-8.
fn decode_path(path: &str) -> Result<String, HttpError> {
    if !path.contains('%') {
        return Ok(path.to_owned());
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = bytes
                .get(i + 1..i + 3)
                .and_then(hex_pair)
                .ok_or_else(|| HttpError::Malformed(format!("bad escape in path {path:?}")))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| HttpError::Malformed(format!("path {path:?} is not UTF-8 once decoded")))
}

/// Lenient decoding for query keys and values (`+` is a space, bad escapes stay literal).
fn decode_query_component(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match bytes.get(i + 1..i + 3).and_then(hex_pair) {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_pair(pair: &[u8]) -> Option<u8> {
    let hi = (pair[0] as char).to_digit(16)?;
    let lo = (pair[1] as char).to_digit(16)?;
    u8::try_from(hi * 16 + lo).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_is_read_before_the_body_arrives() {
        let head = b"POST /v1/x?a=1 HTTP/1.1\r\nAuthorization: Bearer k\r\nContent-Length: 50\r\n\r\n";
        assert_eq!(parse_head(&head[..20], &lim()).unwrap(), None, "header section not complete");
        let mut buf = head.to_vec();
        buf.extend_from_slice(b"partial body");
        let r = parse_head(&buf, &lim()).unwrap().expect("the head");
        assert_eq!((&r.method, r.path.as_str(), r.bearer_token()), (&Method::Post, "/v1/x", Some("k")));
        assert!(r.body.is_empty());
        assert!(parse_head(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", &lim()).is_err());
    }

    fn lim() -> Limits {
        Limits::default()
    }

    fn parse_all(bytes: &[u8]) -> (Request, usize) {
        match parse(bytes, &lim()) {
            Ok(Some(x)) => x,
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let raw = b"GET /v1/users/u1/presence HTTP/1.1\r\nHost: x\r\nX-Thing: A b \r\n\r\n";
        let (req, used) = parse_all(raw);
        assert_eq!(used, raw.len());
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/v1/users/u1/presence");
        assert_eq!(req.query, "");
        assert_eq!(req.header("x-thing"), Some("A b"));
        assert_eq!(req.header("X-THING"), Some("A b"));
        assert_eq!(req.header("missing"), None);
        assert!(req.body.is_empty());
        assert!(req.keep_alive);
        assert_eq!(req.path_segments().collect::<Vec<_>>(), ["v1", "users", "u1", "presence"]);
        assert!(!req.is_websocket_upgrade());
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for end in 0..raw.len() {
            assert_eq!(parse(&raw[..end], &lim()), Ok(None), "prefix {end}");
            assert_eq!(check(&raw[..end], &lim()), Ok(Progress::NeedHead));
        }
        assert_eq!(check(raw, &lim()), Ok(Progress::Complete { total: raw.len() }));
    }

    #[test]
    fn post_body_fed_byte_by_byte() {
        let body = br#"{"from":"a","to":"b","kind":"text","body":{"text":"hi"}}"#;
        let mut raw = format!(
            "POST /v1/messages HTTP/1.1\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n",
            body.len()
        )
        .into_bytes();
        let head_len = raw.len();
        raw.extend_from_slice(body);
        let mut buf = Vec::new();
        for (i, &b) in raw.iter().enumerate() {
            assert_eq!(parse(&buf, &lim()), Ok(None), "after {i} bytes");
            if i > head_len {
                assert_eq!(check(&buf, &lim()), Ok(Progress::NeedBody { total: raw.len(), expect_continue: false }));
            }
            buf.push(b);
        }
        let (req, used) = parse_all(&buf);
        assert_eq!(used, raw.len());
        assert_eq!(req.method, Method::Post);
        assert_eq!(req.body, body);
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let raw = b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyzGET /c HTTP/1.1\r\nConnection: close\r\n\r\nGET /d";
        let mut rest: &[u8] = raw;
        let mut seen = Vec::new();
        while let Some((req, used)) = parse(rest, &lim()).expect("valid") {
            seen.push((req.path.clone(), req.body.clone(), req.keep_alive));
            rest = &rest[used..];
        }
        assert_eq!(
            seen,
            [
                ("/a".to_owned(), vec![], true),
                ("/b".to_owned(), b"xyz".to_vec(), true),
                ("/c".to_owned(), vec![], false),
            ]
        );
        assert_eq!(rest, b"GET /d", "the partial fourth request is left for later");
    }

    #[test]
    fn query_and_path_decoding() {
        let raw = b"GET /v1/users/a%20b/messages?chat=u%3Abob&limit=10&q=hello+world&flag&bad=%zz%4 HTTP/1.1\r\n\r\n";
        let (req, _) = parse_all(raw);
        assert_eq!(req.path, "/v1/users/a b/messages");
        assert_eq!(req.query, "chat=u%3Abob&limit=10&q=hello+world&flag&bad=%zz%4");
        assert_eq!(req.query_param("chat").as_deref(), Some("u:bob"));
        assert_eq!(req.query_param("limit").as_deref(), Some("10"));
        assert_eq!(req.query_param("q").as_deref(), Some("hello world"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("bad").as_deref(), Some("%zz%4"));
        assert_eq!(req.query_param("nope"), None);
        // a percent-encoded key matches its decoded name
        let (req, _) = parse_all(b"GET /?before%5Fseq=5 HTTP/1.1\r\n\r\n");
        assert_eq!(req.query_param("before_seq").as_deref(), Some("5"));
    }

    #[test]
    fn path_escapes_are_strict() {
        for target in ["/a%2", "/a%zz", "/%ff%fe"] {
            let raw = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert!(matches!(parse(raw.as_bytes(), &lim()), Err(HttpError::Malformed(_))), "{target}");
        }
        let (req, _) = parse_all("GET /caf%C3%A9#frag HTTP/1.1\r\n\r\n".as_bytes());
        assert_eq!(req.path, "/café");
    }

    #[test]
    fn request_target_forms() {
        let (req, _) = parse_all(b"GET http://example.com:9001/v1/x?y=1 HTTP/1.1\r\n\r\n");
        assert_eq!((req.path.as_str(), req.query.as_str()), ("/v1/x", "y=1"));
        let (req, _) = parse_all(b"GET HTTP://example.com HTTP/1.1\r\n\r\n");
        assert_eq!(req.path, "/");
        let (req, _) = parse_all(b"OPTIONS * HTTP/1.1\r\n\r\n");
        assert_eq!((req.method, req.path.as_str()), (Method::Options, "*"));
        assert!(matches!(parse(b"GET example.com HTTP/1.1\r\n\r\n", &lim()), Err(HttpError::Malformed(_))));
    }

    #[test]
    fn header_section_limit() {
        let limits = Limits { header_bytes_max: 64, ..Limits::default() };
        let exact = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(64 - 23));
        assert_eq!(exact.len(), 64);
        assert!(matches!(parse(exact.as_bytes(), &limits), Ok(Some(_))));
        let over = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(64 - 22));
        assert_eq!(parse(over.as_bytes(), &limits), Err(HttpError::HeaderTooLarge));
        // incomplete but already past the limit: refused now, not after more bytes
        let open = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(100));
        assert_eq!(parse(open.as_bytes(), &limits), Err(HttpError::HeaderTooLarge));
        assert_eq!(check(open.as_bytes(), &limits), Err(HttpError::HeaderTooLarge));
        // an endless run of blank lines counts toward the head too
        assert_eq!(parse(&[b'\n'; 64], &limits), Err(HttpError::HeaderTooLarge));
        assert_eq!(HttpError::HeaderTooLarge.status(), 431);
    }

    /// RFC 9110 §15.5.15: a request line that alone overflows the header section is 414 URI
    /// Too Long, not 431; a request line that ends in time followed by too many header bytes
    /// stays 431.
    #[test]
    fn request_line_too_long_is_414_not_431() {
        let limits = Limits { header_bytes_max: 64, ..Limits::default() };
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64));
        let too_long = HttpError::UriTooLong { limit: 64 };
        assert_eq!(parse(long_target.as_bytes(), &limits), Err(too_long.clone()));
        assert_eq!(check(long_target.as_bytes(), &limits), Err(too_long.clone()));
        // still arriving, already past the limit, after blank lines httparse skips
        let open = format!("\r\nGET /?q={}", "a".repeat(80));
        assert_eq!(parse(open.as_bytes(), &limits), Err(too_long));
        assert_eq!(HttpError::UriTooLong { limit: 64 }.status(), 414);
        assert_eq!(HttpError::UriTooLong { limit: 64 }.code(), "uri_too_long");
        // the request line ended within the limit: the header fields overflowed
        let long_header = format!("GET /{} HTTP/1.1\r\nX: {}", "a".repeat(30), "b".repeat(40));
        assert_eq!(parse(long_header.as_bytes(), &limits), Err(HttpError::HeaderTooLarge));
    }

    /// RFC 9112 §3.2: more than one Host field, or an invalid one, is a 400.
    #[test]
    fn host_must_be_single_and_valid() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.0\r\nHOST: a\r\nHost: \r\n\r\n",
        ] {
            let got = parse(raw, &lim());
            assert_eq!(got, Err(HttpError::Malformed("more than one Host header".to_owned())), "{raw:?}");
            assert_eq!(check(raw, &lim()), got.map(|_| Progress::NeedHead), "refused before any body");
        }
        // refused from the head, before the body arrives
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 5\r\n\r\n";
        assert!(matches!(check(raw, &lim()), Err(HttpError::Malformed(_))));
        assert!(matches!(parse_head(raw, &lim()), Err(HttpError::Malformed(_))));
        for bad in ["a b", "a/b", "user@a", "a:80x", "a:1:2", "[::1", "[::1]x", "[]", "a%zz", "a\\b", "[::1]/p"] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert!(
                matches!(parse(raw.as_bytes(), &lim()), Err(HttpError::Malformed(m)) if m.contains("invalid Host")),
                "{bad:?}"
            );
        }
        for good in ["", "x", "127.0.0.1:9000", "[::1]:9000", "[::1]", "chat.example.com", "a-b_c~d", "caf%C3%A9", "h:"]
        {
            let raw = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            let (req, _) = parse_all(raw.as_bytes());
            assert_eq!(req.header("host"), Some(good));
        }
        // no Host at all stays accepted (see the module doc)
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n", &lim()), Ok(Some(_))));
    }

    #[test]
    fn header_count_limit() {
        let limits = Limits { headers_max: 3, ..Limits::default() };
        let three = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n";
        assert!(matches!(parse(three, &limits), Ok(Some(_))));
        let four = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\n\r\n";
        assert_eq!(parse(four, &limits), Err(HttpError::HeaderTooLarge));
        // detected while the head is still arriving (once the extra field line is in)
        assert_eq!(parse(&four[..four.len() - 2], &limits), Err(HttpError::HeaderTooLarge));
        // above the stack slots, the heap path behaves the same
        let many = Limits { headers_max: 200, ..Limits::default() };
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        for i in 0..200 {
            raw.push_str(&format!("h{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        let (req, _) = parse(raw.as_bytes(), &many).expect("valid").expect("complete");
        assert_eq!(req.headers().count(), 200);
        let fewer = Limits { headers_max: 199, ..many };
        assert_eq!(parse(raw.as_bytes(), &fewer), Err(HttpError::HeaderTooLarge));
    }

    #[test]
    fn body_limit_from_content_length_before_the_body() {
        let limits = Limits { body_bytes_max: 10, ..Limits::default() };
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(parse(raw, &limits), Err(HttpError::BodyTooLarge { limit: 10 }));
        let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge, &limits), Err(HttpError::BodyTooLarge { limit: 10 }));
        let ok = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789";
        assert!(matches!(parse(ok, &limits), Ok(Some(_))));
        assert_eq!(HttpError::BodyTooLarge { limit: 10 }.status(), 413);
    }

    #[test]
    fn bad_content_length_is_malformed() {
        for value in ["", "-1", "1e3", "0x10", "5, 5", "+5"] {
            let raw = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert!(matches!(parse(raw.as_bytes(), &lim()), Err(HttpError::Malformed(_))), "{value:?}");
        }
        let conflicting = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(parse(conflicting, &lim()), Err(HttpError::Malformed(_))));
        let repeated = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(parse(repeated, &lim()), Ok(Some(_))));
    }

    #[test]
    fn transfer_encoding_is_refused() {
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(parse(chunked, &lim()), Err(HttpError::LengthRequired));
        // refused as soon as the head is in, and even with a Content-Length beside it
        let smuggle = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(smuggle, &lim()), Err(HttpError::LengthRequired));
        assert_eq!(HttpError::LengthRequired.status(), 411);
    }

    #[test]
    fn http_1_0_and_connection_header() {
        let cases: [(&[u8], bool); 6] = [
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive, close\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nconnection: TE, Close\r\n\r\n", false),
        ];
        for (raw, keep_alive) in cases {
            let (req, _) = parse_all(raw);
            assert_eq!(req.keep_alive, keep_alive, "{}", String::from_utf8_lossy(raw));
        }
        let (req, _) = parse_all(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(req.version_minor(), 0);
    }

    #[test]
    fn expect_continue_is_reported_while_the_body_is_missing() {
        let raw = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(check(raw, &lim()), Ok(Progress::NeedBody { total: raw.len() + 3, expect_continue: true }));
        let old = b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(check(old, &lim()), Ok(Progress::NeedBody { total: old.len() + 3, expect_continue: false }));
    }

    #[test]
    fn garbage_is_malformed() {
        let cases: [&[u8]; 7] = [
            b"\x00\x01\x02\x03\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello
        ];
        for raw in cases {
            assert!(
                matches!(parse(raw, &lim()), Err(HttpError::Malformed(_))),
                "{raw:?} gave {:?}",
                parse(raw, &lim())
            );
        }
        assert_eq!(parse(b"GET / HTTP/2.0\r\n\r\n", &lim()), Err(HttpError::VersionNotSupported));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n", &lim()),
            Err(HttpError::Malformed("header X is not UTF-8".to_owned()))
        );
    }

    /// httparse reports any bad byte where the version belongs as a version error: a space
    /// in the target (a business system that forgot to percent-encode an id) must be a 400
    /// naming the request line, not "505 HTTP version not supported".
    #[test]
    fn space_in_target_is_malformed_not_an_unsupported_version() {
        for raw in [
            &b"GET /v1/users/John Doe/presence HTTP/1.1\r\n\r\n"[..],
            b"GET /v1/users/u1/messages?chat=u:a b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a b",
            b"\r\nGET /a b HTTP/1.1\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
            b"GET / FTP/1.1\r\n\r\n",
        ] {
            let got = parse(raw, &lim());
            assert!(
                matches!(&got, Err(HttpError::Malformed(m)) if m.contains("request line")),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(check(raw, &lim()), got.map(|_| Progress::NeedHead));
        }
        for raw in
            [&b"GET / HTTP/2.0\r\n\r\n"[..], b"GET / HTTP/1.2\r\n\r\n", b"GET / HTTP/3", b"GET /a?b HTTP/0.9\r\n"]
        {
            assert_eq!(parse(raw, &lim()), Err(HttpError::VersionNotSupported), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn methods() {
        for (token, method) in [
            ("GET", Method::Get),
            ("POST", Method::Post),
            ("PUT", Method::Put),
            ("DELETE", Method::Delete),
            ("PATCH", Method::Patch),
            ("HEAD", Method::Head),
            ("OPTIONS", Method::Options),
            ("PURGE", Method::Other("PURGE".to_owned())),
            ("get", Method::Other("get".to_owned())),
        ] {
            let raw = format!("{token} / HTTP/1.1\r\n\r\n");
            let (req, _) = parse_all(raw.as_bytes());
            assert_eq!(req.method, method);
            assert_eq!(req.method.as_str(), token);
        }
    }

    #[test]
    fn bearer_token() {
        let req = |auth: &str| Request::new(Method::Get, "/").expect("valid target").with_header("Authorization", auth);
        assert_eq!(req("Bearer abc.def").bearer_token(), Some("abc.def"));
        assert_eq!(req("bearer   abc ").bearer_token(), Some("abc"));
        assert_eq!(req("Basic abc").bearer_token(), None);
        assert_eq!(req("Bearer").bearer_token(), None);
        assert_eq!(req("Bearer   ").bearer_token(), None);
        let none = Request::new(Method::Get, "/").expect("valid target");
        assert_eq!(none.bearer_token(), None);
    }

    #[test]
    fn websocket_upgrade() {
        let raw = b"GET /ws?token=t&device=d HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x80";
        let (req, used) = parse_all(raw);
        assert!(req.is_websocket_upgrade());
        assert_eq!(req.query_param("device").as_deref(), Some("d"));
        assert_eq!(&raw[used..], b"\x81\x80", "frame bytes after the head are left");
        let no_key = Request::new(Method::Get, "/ws")
            .expect("valid target")
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade");
        assert!(!no_key.is_websocket_upgrade());
        let post = Request::new(Method::Post, "/ws")
            .expect("valid target")
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade")
            .with_header("Sec-WebSocket-Key", "x");
        assert!(!post.is_websocket_upgrade());
    }

    #[test]
    fn test_min_limits_are_reachable() {
        let limits = Limits::test_min();
        let body = vec![b'x'; limits.body_bytes_max + 1];
        let raw = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        assert!(matches!(parse(raw.as_bytes(), &limits), Err(HttpError::BodyTooLarge { .. })));
        assert_eq!(limits.request_bytes_max(), limits.header_bytes_max + limits.body_bytes_max);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn method() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::Get),
            Just(Method::Post),
            Just(Method::Put),
            Just(Method::Delete),
            Just(Method::Patch),
            Just(Method::Head),
            Just(Method::Options),
            "[A-Z]{1,10}".prop_map(|t| Method::from_token(&t)),
        ]
    }

    /// Decoded path segments: any chars except `/` (they are percent-encoded when rendered).
    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec("[^/]{0,8}", 0..5).prop_map(|segs| format!("/{}", segs.join("/")))
    }

    fn encode_path(path: &str) -> String {
        let mut out = String::new();
        for b in path.bytes() {
            if b == b'/' || b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
        let name = "[a-zA-Z][a-zA-Z0-9-]{0,12}".prop_filter("framing headers are set apart", |n| {
            !["content-length", "transfer-encoding", "connection", "expect", "host"]
                .contains(&n.to_ascii_lowercase().as_str())
        });
        // visible ASCII, inner spaces allowed, no leading/trailing whitespace
        let value = "([!-~]([ !-~]{0,20}[!-~])?)?";
        proptest::collection::vec((name, value), 0..8)
    }

    fn render(method: &Method, target: &str, headers: &[(String, String)], body: &[u8], close: bool) -> Vec<u8> {
        let mut out = format!("{method} {target} HTTP/1.1\r\n");
        for (n, v) in headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(body);
        out
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&bytes, &Limits::default());
            let _ = parse(&bytes, &Limits::test_min());
            let _ = check(&bytes, &Limits::test_min());
        }

        /// The fuzz target's invariants (`http/fuzz`), on near-valid input: `check` and
        /// `parse` agree, a request re-parses identically from exactly its own bytes, and
        /// pipelined parsing always makes progress.
        #[test]
        fn check_and_parse_agree(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("GET / HTTP/1.1\r\n".to_owned()),
                    Just("POST /a%20b?x=1 HTTP/1.0\r\n".to_owned()),
                    Just("Content-Length: 3\r\n".to_owned()),
                    Just("Content-Length: 99\r\n".to_owned()),
                    Just("Connection: close\r\n".to_owned()),
                    Just("Transfer-Encoding: chunked\r\n".to_owned()),
                    Just("\r\n".to_owned()),
                    "[ -~]{0,12}",
                    "[ -~]{0,8}\r\n",
                ],
                0..16,
            ),
        ) {
            let data = parts.concat().into_bytes();
            for limits in [Limits::default(), Limits::test_min()] {
                let mut rest: &[u8] = &data;
                while !rest.is_empty() {
                    let checked = check(rest, &limits);
                    match parse(rest, &limits) {
                        Ok(Some((req, used))) => {
                            prop_assert!(used > 0 && used <= rest.len());
                            prop_assert_eq!(&checked, &Ok(Progress::Complete { total: used }));
                            prop_assert_eq!(
                                parse(&rest[..used], &limits),
                                Ok(Some((req.clone(), used)))
                            );
                            prop_assert!(req.body.len() <= limits.body_bytes_max);
                            rest = &rest[used..];
                        }
                        Ok(None) => {
                            let incomplete = matches!(
                                checked,
                                Ok(Progress::NeedHead | Progress::NeedBody { .. })
                            );
                            prop_assert!(incomplete, "check said {:?}", checked);
                            break;
                        }
                        Err(e) => {
                            prop_assert!(checked.is_err() || matches!(e, HttpError::Malformed(_)));
                            break;
                        }
                    }
                }
            }
        }

        #[test]
        fn parse_never_panics_on_near_requests(
            prefix in "(GET|POST) /[a-z%0-9?=&+]{0,20} HTTP/1\\.[01]\r\n",
            noise in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = prefix.into_bytes();
            bytes.extend_from_slice(&noise);
            let _ = parse(&bytes, &Limits::default());
        }

        #[test]
        fn rendered_requests_round_trip_in_any_split(
            method in method(),
            path in path(),
            query in "[a-z0-9=&%+]{0,16}",
            headers in headers(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            close in any::<bool>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let target = if query.is_empty() {
                encode_path(&path)
            } else {
                format!("{}?{query}", encode_path(&path))
            };
            let raw = render(&method, &target, &headers, &body, close);
            // a second request behind it must not disturb the first
            let mut stream = raw.clone();
            stream.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");

            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(raw.len())).collect();
            cuts.sort_unstable();
            cuts.push(raw.len());
            let limits = Limits::default();
            for &cut in &cuts[..cuts.len() - 1] {
                prop_assert_eq!(parse(&stream[..cut], &limits), Ok(None));
            }
            let (req, used) = parse(&stream, &limits)
                .expect("valid")
                .expect("complete");
            prop_assert_eq!(used, raw.len());
            prop_assert_eq!(&req.method, &method);
            prop_assert_eq!(&req.path, &path);
            prop_assert_eq!(&req.query, &query);
            prop_assert_eq!(&req.body, &body);
            prop_assert_eq!(req.keep_alive, !close);
            let got: Vec<(String, String)> = req
                .headers()
                .filter(|(n, _)| *n != "content-length" && *n != "connection")
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            let want: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect();
            prop_assert_eq!(got, want);
            for (n, _) in &headers {
                // case-insensitive lookup finds the first value under that name
                let first = headers.iter().find(|(m, _)| m.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str());
                prop_assert_eq!(req.header(&n.to_ascii_uppercase()), first);
            }
            let (next, _) = parse(&stream[used..], &limits).expect("valid").expect("complete");
            prop_assert_eq!(next.path, "/next");
        }
    }
}
