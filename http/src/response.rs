//! Response side: the [`Response`] a handler returns, its HTTP/1.1 encoding into a buffer the
//! caller owns, and the one mapping of [`HttpError`] to an error response. No I/O here.

use crate::request::HttpError;

/// `Content-Type` of [`Response::json`].
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Type` of [`Response::text`].
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";
/// `Content-Type` of [`Response::html`].
pub const CONTENT_TYPE_HTML: &str = "text/html; charset=utf-8";

/// One response. `Content-Length` and `Connection` are written by the encoder; do not put
/// them in `headers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Empty for no `Content-Type` header.
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra headers, written as given after the framing headers. CR and LF in values are
    /// replaced by spaces when encoding (no header injection from data).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    /// A JSON response; `body` must already be serialized JSON.
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response { status, content_type: CONTENT_TYPE_JSON, body, headers: Vec::new() }
    }

    /// A UTF-8 plain-text response.
    pub fn text(status: u16, body: &str) -> Response {
        Response { status, content_type: CONTENT_TYPE_TEXT, body: body.as_bytes().to_vec(), headers: Vec::new() }
    }

    /// A UTF-8 HTML response.
    pub fn html(status: u16, body: &str) -> Response {
        Response { status, content_type: CONTENT_TYPE_HTML, body: body.as_bytes().to_vec(), headers: Vec::new() }
    }

    /// A response with no body and no `Content-Type`.
    pub fn empty(status: u16) -> Response {
        Response { status, content_type: "", body: Vec::new(), headers: Vec::new() }
    }

    /// Adds a header, builder style.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Appends the whole response (head and body) to `out`. `keep_alive: false` adds
    /// `Connection: close`.
    pub fn encode_into(&self, keep_alive: bool, out: &mut Vec<u8>) {
        self.encode(Framing::from_keep_alive(keep_alive), false, out);
    }

    /// Appends only the head (as for a `HEAD` request: same `Content-Length`, no body).
    pub fn encode_head_into(&self, keep_alive: bool, out: &mut Vec<u8>) {
        self.encode(Framing::from_keep_alive(keep_alive), true, out);
    }

    /// The encoder behind both public forms; `Framing::KeepAliveAnnounced` writes
    /// `Connection: keep-alive` for HTTP/1.0 peers.
    pub(crate) fn encode(&self, framing: Framing, head_only: bool, out: &mut Vec<u8>) {
        // 1xx, 204 and 304 carry no body (RFC 9110 §6.4.1); 1xx and 204 no Content-Length.
        let bodiless = self.status < 200 || self.status == 204 || self.status == 304;
        let reason = reason_phrase(self.status);
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(self.status));
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !self.content_type.is_empty() {
            push_header(out, "Content-Type", self.content_type);
        }
        if !(self.status < 200 || self.status == 204) {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, self.body.len() as u64);
            out.extend_from_slice(b"\r\n");
        }
        match framing {
            Framing::Close => out.extend_from_slice(b"Connection: close\r\n"),
            Framing::KeepAliveAnnounced => out.extend_from_slice(b"Connection: keep-alive\r\n"),
            Framing::KeepAlive => {}
        }
        for (name, value) in &self.headers {
            push_header(out, name, value);
        }
        out.extend_from_slice(b"\r\n");
        if !head_only && !bodiless {
            out.extend_from_slice(&self.body);
        }
    }
}

/// What the encoder says about the connection after this response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Another request may follow (HTTP/1.1 default): no `Connection` header.
    KeepAlive,
    /// Another request may follow, said explicitly for an HTTP/1.0 peer.
    KeepAliveAnnounced,
    /// `Connection: close`; the server closes after writing.
    Close,
}

impl Framing {
    fn from_keep_alive(keep_alive: bool) -> Framing {
        if keep_alive {
            Framing::KeepAlive
        } else {
            Framing::Close
        }
    }
}

/// The error response for a refused request:
/// `{"error":{"code":"<HttpError::code>","message":"<Display>"}}` with the error's status.
pub fn error_response(err: &HttpError) -> Response {
    let body = serde_json::json!({
        "error": { "code": err.code(), "message": err.to_string() }
    });
    Response::json(err.status(), body.to_string().into_bytes())
}

/// The standard reason phrase for `status` ("Unknown" for unregistered codes).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(value.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(resp: &Response, keep_alive: bool) -> String {
        let mut out = Vec::new();
        resp.encode_into(keep_alive, &mut out);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn json_keep_alive() {
        let resp = Response::json(200, br#"{"id":1}"#.to_vec());
        assert_eq!(
            encoded(&resp, true),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"id\":1}"
        );
    }

    #[test]
    fn close_and_extra_headers() {
        let resp =
            Response::text(503, "busy").with_header("Retry-After", "1").with_header("X-Evil", "a\r\nSet-Cookie: x");
        assert_eq!(
            encoded(&resp, false),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 4\r\nConnection: close\r\nRetry-After: 1\r\nX-Evil: a  Set-Cookie: x\r\n\r\nbusy"
        );
    }

    #[test]
    fn empty_and_bodiless_statuses() {
        assert_eq!(encoded(&Response::empty(200), true), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(encoded(&Response::empty(204), true), "HTTP/1.1 204 No Content\r\n\r\n");
        let mut not_modified = Response::text(304, "ignored");
        not_modified.content_type = "";
        assert_eq!(encoded(&not_modified, true), "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(encoded(&Response::empty(799), true), "HTTP/1.1 799 Unknown\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn head_keeps_length_drops_body() {
        let mut out = Vec::new();
        Response::html(200, "<p>hi</p>").encode_head_into(true, &mut out);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 9\r\n\r\n");
        let mut out = Vec::new();
        Response::empty(200).encode(Framing::KeepAliveAnnounced, false, &mut out);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n");
    }

    #[test]
    fn error_responses() {
        let cases = [
            (HttpError::Malformed("x".into()), 400, "bad_request"),
            (HttpError::HeaderTooLarge, 431, "header_too_large"),
            (HttpError::UriTooLong { limit: 8 }, 414, "uri_too_long"),
            (HttpError::BodyTooLarge { limit: 5 }, 413, "payload_too_large"),
            (HttpError::LengthRequired, 411, "length_required"),
            (HttpError::VersionNotSupported, 505, "http_version_not_supported"),
            (HttpError::RequestTimeout, 408, "request_timeout"),
        ];
        for (err, status, code) in cases {
            let resp = error_response(&err);
            assert_eq!(resp.status, status);
            assert_eq!(resp.content_type, CONTENT_TYPE_JSON);
            let v: serde_json::Value = serde_json::from_slice(&resp.body).expect("json");
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["message"], err.to_string());
            assert_ne!(reason_phrase(status), "Unknown");
        }
    }

    #[test]
    fn decimal() {
        for n in [0u64, 7, 10, 99, 1_048_576, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
