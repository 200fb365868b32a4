//! WebSocket wire format for the client port: the upgrade answer, a sans-IO reader of client
//! frames, and the encoding of server frames.
//!
//! Owns bytes only: frame headers are parsed and written by tungstenite's frame codec, masks
//! removed in place. It knows nothing of sessions, users or JSON.
use std::io::Cursor;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Close codes the engine uses (RFC 6455 and the application range).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message (or a close reason) that is not UTF-8 (RFC 6455 §8.1).
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
    /// `kicked`: replaced by a newer connection of the same device, or kicked by the business.
    pub const KICKED: u16 = 4001;
    /// The terminal could not keep up with its messages; it should reconnect and `sync`.
    pub const SLOW_CONSUMER: u16 = 4002;
    /// Closed for silence longer than the idle timeout.
    pub const IDLE: u16 = 4003;
}

/// Why client bytes are not acceptable WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooBig { len: u64, max: usize },
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or a close reason that is not UTF-8.
    #[error("invalid payload: {0} is not UTF-8")]
    NotUtf8(&'static str),
}

impl WsError {
    /// The close code that answers this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TooBig { .. } => close_code::TOO_BIG,
            WsError::Protocol(_) => close_code::PROTOCOL_ERROR,
            WsError::NotUtf8(_) => close_code::INVALID_PAYLOAD,
        }
    }
}

/// Whether a peer may send close code `code` (RFC 6455 §7.4): 1000-1003 and 1007-1014
/// (1012-1014 as registered with IANA), and the registered and private ranges 3000-4999.
/// 0-999 are not used, 1004-1006 and 1015 must never be sent, 1016-2999 are reserved for
/// the protocol's future and codes from 5000 are undefined.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The status code of a peer's close frame payload (RFC 6455 §5.5.1): none when empty, else a
/// valid code (see [`is_valid_close_code`]) followed by a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol("close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::NotUtf8("the close reason"));
            }
            Ok(Some(code))
        }
    }
}

/// A whole text message for `on_event`, once its bytes are known to be UTF-8.
fn text_event(payload: &[u8]) -> Result<WsEvent<'_>, WsError> {
    match std::str::from_utf8(payload) {
        Ok(_) => Ok(WsEvent::Text(payload)),
        Err(_) => Err(WsError::NotUtf8("a text message")),
    }
}

/// One complete client message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent<'a> {
    /// A whole text message (fragments joined), valid UTF-8.
    Text(&'a [u8]),
    /// A whole binary message.
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The peer's close, with its code if any (a valid one: see [`is_valid_close_code`]).
    Close(Option<u16>),
}

/// Reads client frames out of byte chunks. Holds no memory while the connection is idle: only
/// an incomplete frame or an unfinished fragmented message is kept between reads.
#[derive(Debug, Default)]
pub struct FrameReader {
    partial: Vec<u8>,
    fragments: Option<(bool, Vec<u8>)>,
}

impl FrameReader {
    /// No frame or fragmented message is half read.
    pub fn is_between_frames(&self) -> bool {
        self.partial.is_empty() && self.fragments.is_none()
    }

    /// Bytes held for an incomplete frame or message.
    pub fn buffered_bytes(&self) -> usize {
        self.partial.capacity() + self.fragments.as_ref().map_or(0, |(_, v)| v.capacity())
    }

    /// Feeds freshly read bytes (unmasked in place) and calls `on_event` for every complete
    /// message and control frame, in order. `max` bounds a frame and a reassembled message.
    /// Stops at the first error, and when `on_event` returns `false` (the connection is
    /// closing). Returns how many whole frames the bytes completed (control frames and each
    /// fragment of a message included): what counts as the terminal's activity, where bytes of
    /// a frame not complete yet do not.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        max: usize,
        mut on_event: impl FnMut(WsEvent<'_>) -> bool,
    ) -> Result<usize, WsError> {
        let mut frames = 0;
        if self.partial.is_empty() {
            let used = self.parse_frames(input, max, &mut on_event, &mut frames)?;
            if used < input.len() {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(input);
            let used = self.parse_frames(&mut buf, max, &mut on_event, &mut frames)?;
            if used < buf.len() {
                buf.drain(..used);
                self.partial = buf;
            }
        }
        Ok(frames)
    }

    /// Parses the whole frames at the start of `buf`, counting them in `frames`; returns how
    /// many bytes they took.
    fn parse_frames(
        &mut self,
        buf: &mut [u8],
        max: usize,
        on_event: &mut impl FnMut(WsEvent<'_>) -> bool,
        frames: &mut usize,
    ) -> Result<usize, WsError> {
        let mut pos = 0;
        while pos < buf.len() {
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => return Err(WsError::Protocol("invalid frame header")),
            };
            if len > max as u64 {
                return Err(WsError::TooBig { len, max });
            }
            let header_len = cursor.position() as usize;
            let len = len as usize;
            if buf.len() - pos - header_len < len {
                break;
            }
            let start = pos + header_len;
            let payload = &mut buf[start..start + len];
            pos = start + len;
            *frames += 1;
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(WsError::Protocol("reserved bits set"));
            }
            let Some(mask) = header.mask else {
                return Err(WsError::Protocol("client frames must be masked"));
            };
            unmask(payload, mask);
            let keep_going = match header.opcode {
                OpCode::Control(c) => {
                    if !header.is_final || len > 125 {
                        return Err(WsError::Protocol("invalid control frame"));
                    }
                    match c {
                        Control::Ping => on_event(WsEvent::Ping(payload)),
                        Control::Pong => on_event(WsEvent::Pong),
                        Control::Close => on_event(WsEvent::Close(parse_close(payload)?)),
                        Control::Reserved(_) => return Err(WsError::Protocol("reserved opcode")),
                    }
                }
                OpCode::Data(Data::Text | Data::Binary) if self.fragments.is_some() => {
                    return Err(WsError::Protocol("new message inside a fragmented one"));
                }
                OpCode::Data(d @ (Data::Text | Data::Binary)) => {
                    let text = d == Data::Text;
                    if header.is_final {
                        on_event(if text { text_event(payload)? } else { WsEvent::Binary(payload) })
                    } else {
                        self.fragments = Some((text, payload.to_vec()));
                        true
                    }
                }
                OpCode::Data(Data::Continue) => {
                    let Some((_, acc)) = self.fragments.as_mut() else {
                        return Err(WsError::Protocol("continuation without a message"));
                    };
                    if acc.len() + payload.len() > max {
                        return Err(WsError::TooBig { len: (acc.len() + payload.len()) as u64, max });
                    }
                    acc.extend_from_slice(payload);
                    if header.is_final {
                        let (text, whole) = self.fragments.take().unwrap_or_default();
                        on_event(if text { text_event(&whole)? } else { WsEvent::Binary(&whole) })
                    } else {
                        true
                    }
                }
                OpCode::Data(Data::Reserved(_)) => return Err(WsError::Protocol("reserved opcode")),
            };
            if !keep_going {
                return Ok(buf.len());
            }
        }
        Ok(pos)
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let header = FrameHeader { opcode, ..FrameHeader::default() };
    let mut out = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A server text frame (unmasked), ready to be written to any number of terminals.
pub fn text_frame(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Text), payload)
}

/// A server binary frame (unmasked): an `ether.v1.proto` frame.
pub fn binary_frame(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Binary), payload)
}

/// A pong answering a ping with `payload`.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Pong), payload)
}

/// A close frame with a code and a short reason (cut to fit a control frame).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len().min(123));
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Control(Control::Close), &payload)
}

/// The `101 Switching Protocols` answer to an upgrade with `Sec-WebSocket-Key: key`.
pub fn upgrade_response(key: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = subprotocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client_frame(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let header = FrameHeader { opcode, is_final: fin, mask: Some(mask), ..FrameHeader::default() };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        let mut p = payload.to_vec();
        unmask(&mut p, mask);
        out.extend_from_slice(&p);
        out
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn collect(reader: &mut FrameReader, chunks: &[&[u8]], max: usize) -> Result<Vec<Owned>, WsError> {
        let mut out = Vec::new();
        for c in chunks {
            let mut c = c.to_vec();
            reader.feed(&mut c, max, |e| {
                out.push(match e {
                    WsEvent::Text(t) => Owned::Text(t.to_vec()),
                    WsEvent::Binary(t) => Owned::Binary(t.to_vec()),
                    WsEvent::Ping(t) => Owned::Ping(t.to_vec()),
                    WsEvent::Pong => Owned::Pong,
                    WsEvent::Close(c) => Owned::Close(c),
                });
                true
            })?;
        }
        Ok(out)
    }

    const M: [u8; 4] = [1, 2, 3, 4];

    #[test]
    fn reads_frames_split_anywhere() {
        let mut bytes = client_frame(OpCode::Data(Data::Text), true, b"{\"type\":\"ping\"}", M);
        bytes.extend(client_frame(OpCode::Control(Control::Ping), true, b"hb", M));
        bytes.extend(client_frame(OpCode::Data(Data::Binary), true, &[0u8; 300], M));
        for split in 0..bytes.len() {
            let mut r = FrameReader::default();
            let got = collect(&mut r, &[&bytes[..split], &bytes[split..]], 1024).unwrap();
            assert_eq!(
                got,
                vec![
                    Owned::Text(b"{\"type\":\"ping\"}".to_vec()),
                    Owned::Ping(b"hb".to_vec()),
                    Owned::Binary(vec![0u8; 300])
                ]
            );
            assert_eq!(r.buffered_bytes(), 0, "nothing held once every frame is complete");
        }
    }

    /// `feed` counts whole frames (control frames and each fragment of a message too), not
    /// bytes: the bytes of a frame not complete yet are no activity.
    #[test]
    fn counts_whole_frames_only() {
        let mut bytes = client_frame(OpCode::Data(Data::Text), false, b"hel", M);
        bytes.extend(client_frame(OpCode::Control(Control::Ping), true, b"", M));
        bytes.extend(client_frame(OpCode::Data(Data::Continue), true, b"lo", M));
        let mut r = FrameReader::default();
        let mut feed = |chunk: &[u8]| r.feed(&mut chunk.to_vec(), 1024, |_| true).unwrap();
        assert_eq!(feed(&bytes[..1]), 0);
        assert_eq!(feed(&bytes[1..8]), 0, "a fragment's header and part of it");
        assert_eq!(feed(&bytes[8..10]), 1, "the fragment is complete, the ping's header not");
        assert_eq!(feed(&bytes[10..]), 2);
    }

    #[test]
    fn joins_fragments() {
        let mut bytes = client_frame(OpCode::Data(Data::Text), false, b"hel", M);
        bytes.extend(client_frame(OpCode::Control(Control::Ping), true, b"", M));
        bytes.extend(client_frame(OpCode::Data(Data::Continue), true, b"lo", M));
        let got = collect(&mut FrameReader::default(), &[&bytes], 1024).unwrap();
        assert_eq!(got, vec![Owned::Ping(vec![]), Owned::Text(b"hello".to_vec())]);
    }

    #[test]
    fn rejects_bad_input() {
        let big = client_frame(OpCode::Data(Data::Text), true, &[b'a'; 2000], M);
        // The header alone is enough to refuse: no need to buffer the payload.
        let err = collect(&mut FrameReader::default(), &[&big[..8]], 1024).unwrap_err();
        assert_eq!(err.close_code(), close_code::TOO_BIG);

        let mut unmasked = Vec::new();
        FrameHeader { opcode: OpCode::Data(Data::Text), ..FrameHeader::default() }.format(2, &mut unmasked).unwrap();
        unmasked.extend_from_slice(b"hi");
        assert!(matches!(collect(&mut FrameReader::default(), &[&unmasked], 1024), Err(WsError::Protocol(_))));

        let cont = client_frame(OpCode::Data(Data::Continue), true, b"x", M);
        assert!(collect(&mut FrameReader::default(), &[&cont], 1024).is_err());

        let mut frag = client_frame(OpCode::Data(Data::Text), false, &[b'a'; 600], M);
        frag.extend(client_frame(OpCode::Data(Data::Continue), true, &[b'a'; 600], M));
        assert!(matches!(collect(&mut FrameReader::default(), &[&frag], 1024), Err(WsError::TooBig { .. })));
    }

    #[test]
    fn close_with_code() {
        let bytes = client_frame(OpCode::Control(Control::Close), true, &1000u16.to_be_bytes(), M);
        assert_eq!(collect(&mut FrameReader::default(), &[&bytes], 64).unwrap(), vec![Owned::Close(Some(1000))]);
    }

    #[test]
    fn close_frames_are_checked() {
        let close = |payload: &[u8]| {
            let bytes = client_frame(OpCode::Control(Control::Close), true, payload, M);
            collect(&mut FrameReader::default(), &[&bytes], 64)
        };
        assert_eq!(close(b"").unwrap(), vec![Owned::Close(None)], "no code at all is fine");
        // RFC 6455 §5.5.1: a body is a 2-byte code first; one byte is no close, but broken.
        assert_eq!(close(&[0x03]).unwrap_err(), WsError::Protocol("close frame with a 1-byte payload"));
        for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
        {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice("bye ✓".as_bytes());
            assert_eq!(close(&payload).unwrap(), vec![Owned::Close(Some(code))], "{code}");
        }
        // RFC 6455 §7.4: never sent on the wire, reserved or undefined.
        for code in [0u16, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            let err = close(&code.to_be_bytes()).unwrap_err();
            assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR, "{code}");
        }
        // §8.1: a close reason that is not UTF-8 fails the connection like a text frame would.
        let err = close(&[0x03, 0xe8, 0xff, 0xfe]).unwrap_err();
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn text_must_be_utf8() {
        let bad = client_frame(OpCode::Data(Data::Text), true, b"{\"type\":\"p\xffing\"}", M);
        let err = collect(&mut FrameReader::default(), &[&bad], 1024).unwrap_err();
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
        // Checked on the whole message: a character split across fragments is fine...
        let euro = "€".as_bytes();
        let mut split = client_frame(OpCode::Data(Data::Text), false, &euro[..1], M);
        split.extend(client_frame(OpCode::Data(Data::Continue), true, &euro[1..], M));
        assert_eq!(collect(&mut FrameReader::default(), &[&split], 1024).unwrap(), vec![Owned::Text(euro.to_vec())]);
        // ...one that never completes is not.
        let mut cut = client_frame(OpCode::Data(Data::Text), false, b"ok", M);
        cut.extend(client_frame(OpCode::Data(Data::Continue), true, &euro[..2], M));
        let err = collect(&mut FrameReader::default(), &[&cut], 1024).unwrap_err();
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
        // Binary messages carry any bytes.
        let bin = client_frame(OpCode::Data(Data::Binary), true, &[0xff, 0xfe], M);
        assert_eq!(collect(&mut FrameReader::default(), &[&bin], 1024).unwrap(), vec![Owned::Binary(vec![0xff, 0xfe])]);
    }

    #[test]
    fn server_frames_parse_back() {
        let f = text_frame(b"hello");
        let (h, len) = FrameHeader::parse(&mut Cursor::new(&f[..])).unwrap().unwrap();
        assert_eq!((h.opcode, h.mask, len), (OpCode::Data(Data::Text), None, 5));
        let c = close_frame(4001, &"é".repeat(100));
        assert!(c.len() <= 2 + 125);
        assert!(std::str::from_utf8(&c[4..]).is_ok());
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let r = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512), split in 0usize..512) {
            let split = split.min(bytes.len());
            let mut r = FrameReader::default();
            let _ = collect(&mut r, &[&bytes[..split], &bytes[split..]], 256);
        }

        #[test]
        fn roundtrip_any_text(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5), chunk in 1usize..64) {
            let mut bytes = Vec::new();
            for p in &payloads {
                bytes.extend(client_frame(OpCode::Data(Data::Binary), true, p, [9, 8, 7, 6]));
            }
            let chunks: Vec<&[u8]> = bytes.chunks(chunk).collect();
            let got = collect(&mut FrameReader::default(), &chunks, 4096).unwrap();
            let want: Vec<Owned> = payloads.into_iter().map(Owned::Binary).collect();
            prop_assert_eq!(got, want);
        }
    }
}
