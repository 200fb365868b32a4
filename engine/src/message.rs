//! A message as the engine carries it between shards, its ids, and its encoding into the exact
//! WebSocket frame bytes terminals receive (once per inbox and subprotocol, shared by every
//! terminal of it): JSON text frames (`ether.v1.json`) or Protocol Buffers binary frames
//! (`ether.v1.proto`), see [`Wire`].
use std::cell::Cell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ether_proto::frame::{ServerFrame, SUBPROTOCOL_JSON};
use ether_proto::pb::SUBPROTOCOL_PROTO;
use ether_proto::Kind;
use serde::Serialize;
use serde_json::value::RawValue;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A message accepted for delivery. Shared (`Arc`) by every shard that delivers it.
#[derive(Debug)]
pub struct Message {
    pub id: u64,
    /// Unix milliseconds.
    pub ts: u64,
    pub from: Box<str>,
    pub kind: Kind,
    /// The validated body, kept as JSON text so it is never re-serialized.
    pub body: Box<RawValue>,
    pub cid: Option<Box<str>>,
}

/// A single-chat message as accepted from the API or a terminal, before it gets its id.
#[derive(Debug)]
pub struct NewMessage {
    pub from: Box<str>,
    pub to: Box<str>,
    pub kind: Kind,
    pub body: Box<RawValue>,
    pub cid: Option<Box<str>>,
}

impl From<ether_proto::api::SendMessageRef<'_>> for NewMessage {
    fn from(m: ether_proto::api::SendMessageRef<'_>) -> NewMessage {
        NewMessage {
            from: m.from.into(),
            to: m.to.into(),
            kind: m.kind,
            body: stored_body(m.body.into_owned()),
            cid: m.cid.map(Into::into),
        }
    }
}

/// A validated body as it is stored and pushed: the JSON text as it came (never serialized
/// again), unless that text is longer than the store takes (`BODY_BYTES_MAX`) while the body
/// itself is within its kind's limit (validated on its compact form): pretty-printed, or with
/// every non-ASCII character escaped as `\uXXXX` (a 32 KiB `custom` body can take 96 KiB so).
/// Such a body is written compactly instead of being refused.
pub fn stored_body(raw: Box<RawValue>) -> Box<RawValue> {
    if raw.get().len() <= ether_store::op::BODY_BYTES_MAX {
        return raw;
    }
    match serde_json::from_str::<serde_json::Value>(raw.get()).and_then(|v| serde_json::value::to_raw_value(&v)) {
        Ok(compact) => compact,
        Err(_) => raw, // valid JSON by now; refused by the store if it cannot be compacted
    }
}

/// A message shared across shards.
pub type SharedMessage = Arc<Message>;

/// A message as JSON, borrowed: the `msg` frame (with `type`) and the history API's items
/// (without) share this one shape.
#[derive(Serialize)]
pub struct MessageView<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub ty: Option<&'static str>,
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<&'a str>,
    pub chat: &'a str,
    pub from: &'a str,
    pub seq: u64,
    pub kind: Kind,
    pub body: &'a RawValue,
    pub ts: u64,
}

/// Room kept in front of a frame's JSON for its WebSocket header (at most 10 bytes unmasked).
const HEADER_ROOM: usize = 10;

/// Serializes `value` as JSON straight after room for a WebSocket text header, then writes the
/// header in place: one allocation, no copy.
pub fn encode_text_frame<T: Serialize>(value: &T, size_hint: usize) -> Bytes {
    let mut buf = text_frame_buf(size_hint);
    if serde_json::to_writer(&mut buf, value).is_err() {
        debug_assert!(false, "frame shapes always serialize");
        return crate::ws::text_frame(b"{\"type\":\"error\",\"code\":\"internal\",\"message\":\"encode\"}");
    }
    finish_text_frame(buf)
}

/// A buffer for one text frame: room for its header, then `size_hint` bytes of payload.
fn text_frame_buf(size_hint: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_ROOM + size_hint);
    buf.resize(HEADER_ROOM, 0);
    buf
}

/// Writes the header of the payload after [`HEADER_ROOM`] in place, just before it.
fn finish_text_frame(mut buf: Vec<u8>) -> Bytes {
    let len = (buf.len() - HEADER_ROOM) as u64;
    let header = FrameHeader { opcode: OpCode::Data(Data::Text), ..FrameHeader::default() };
    let header_len = header.len(len);
    let start = HEADER_ROOM - header_len;
    let _ = header.format(len, &mut &mut buf[start..HEADER_ROOM]);
    Bytes::from(buf).slice(start..)
}

/// Appends `s` as a JSON string: copied as it is when nothing in it needs escaping (ids,
/// chats, most cids), otherwise escaped by serde_json, byte for byte what it writes.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else if serde_json::to_writer(&mut *buf, s).is_err() {
        debug_assert!(false, "a str always serializes");
    }
}

/// How a terminal's connection carries frames: the subprotocol it chose at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    /// `ether.v1.json` (the default): one JSON object per text frame.
    #[default]
    Json,
    /// `ether.v1.proto`: one Protocol Buffers frame per binary frame.
    Proto,
}

impl Wire {
    /// The subprotocol a terminal offered, `None` if it is not one this node speaks.
    pub fn of_subprotocol(name: &str) -> Option<Wire> {
        match name {
            SUBPROTOCOL_JSON => Some(Wire::Json),
            SUBPROTOCOL_PROTO => Some(Wire::Proto),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Wire::Json => SUBPROTOCOL_JSON,
            Wire::Proto => SUBPROTOCOL_PROTO,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The bytes of a server frame for a terminal on `wire`.
pub fn encode_for(frame: &ServerFrame, wire: Wire) -> Bytes {
    match wire {
        Wire::Json => encode_text_frame(frame, 128),
        Wire::Proto => crate::ws::binary_frame(&ether_proto::pb::encode_server(frame)),
    }
}

/// One frame for many terminals: encoded at most once per subprotocol, the first time a
/// terminal on it needs it, then shared.
pub struct FrameSet<F: Fn(Wire) -> Bytes> {
    encode: F,
    made: [Option<Bytes>; 2],
}

impl<F: Fn(Wire) -> Bytes> FrameSet<F> {
    pub fn new(encode: F) -> Self {
        FrameSet { encode, made: [None, None] }
    }

    pub fn get(&mut self, wire: Wire) -> Bytes {
        let encode = &self.encode;
        self.made[wire.index()].get_or_insert_with(|| encode(wire)).clone()
    }
}

/// [`FrameSet`] of a `ServerFrame`.
pub fn frame_set(frame: &ServerFrame) -> FrameSet<impl Fn(Wire) -> Bytes + '_> {
    FrameSet::new(move |wire| encode_for(frame, wire))
}

impl Message {
    /// The `msg` frame for one inbox on `wire`.
    pub fn encode_frame_for(&self, wire: Wire, chat: &str, seq: u64) -> Bytes {
        match wire {
            Wire::Json => self.encode_frame(chat, seq),
            Wire::Proto => crate::ws::binary_frame(&ether_proto::pb::encode_msg(
                self.id,
                self.cid.as_deref(),
                chat,
                &self.from,
                seq,
                self.kind,
                self.body.get(),
                self.ts,
            )),
        }
    }

    /// The `msg` frame for one inbox: `chat` as that inbox's reader names it, `seq` its position.
    /// Written field by field (the frame of every delivery): the same bytes as serializing a
    /// [`MessageView`] with serde_json, which the tests check, in about half the time.
    pub fn encode_frame(&self, chat: &str, seq: u64) -> Bytes {
        let body = self.body.get();
        let cid_len = self.cid.as_ref().map_or(0, |c| c.len() + 9);
        let mut buf = text_frame_buf(96 + body.len() + self.from.len() + chat.len() + cid_len);
        let mut n = itoa::Buffer::new();
        buf.extend_from_slice(b"{\"type\":\"msg\",\"id\":\"");
        buf.extend_from_slice(n.format(self.id).as_bytes());
        buf.push(b'"');
        if let Some(cid) = &self.cid {
            buf.extend_from_slice(b",\"cid\":");
            push_json_str(&mut buf, cid);
        }
        buf.extend_from_slice(b",\"chat\":");
        push_json_str(&mut buf, chat);
        buf.extend_from_slice(b",\"from\":");
        push_json_str(&mut buf, &self.from);
        buf.extend_from_slice(b",\"seq\":");
        buf.extend_from_slice(n.format(seq).as_bytes());
        buf.extend_from_slice(b",\"kind\":\"");
        buf.extend_from_slice(self.kind.as_str().as_bytes());
        buf.extend_from_slice(b"\",\"body\":");
        buf.extend_from_slice(body.as_bytes());
        buf.extend_from_slice(b",\"ts\":");
        buf.extend_from_slice(n.format(self.ts).as_bytes());
        buf.push(b'}');
        finish_text_frame(buf)
    }

    /// The `msg` frame through serde_json: what [`Message::encode_frame`] must equal.
    #[cfg(test)]
    fn encode_frame_serde(&self, chat: &str, seq: u64) -> Bytes {
        let id = self.id.to_string();
        let out = MessageView {
            ty: Some("msg"),
            id: &id,
            cid: self.cid.as_deref(),
            chat,
            from: &self.from,
            seq,
            kind: self.kind,
            body: &self.body,
            ts: self.ts,
        };
        encode_text_frame(&out, 96)
    }
}

/// Unix milliseconds now.
pub fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

const SHARD_BITS: u32 = 6;
const COUNTER_BITS: u32 = 14;
/// Most shards message ids can tell apart.
pub const SHARDS_MAX: usize = 1 << SHARD_BITS;

/// Makes node-unique, time-ordered message ids on one shard:
/// `milliseconds << 20 | shard << 14 | counter`.
#[derive(Debug)]
pub struct IdGen {
    shard: Cell<u64>,
    /// Cluster mode: the generator slot this shard leases in Redis, kept by the cluster's out
    /// thread (it may move to another slot, or have none for a while).
    lease: Option<Arc<crate::cluster::IdLease>>,
    last_ms: Cell<u64>,
    counter: Cell<u64>,
}

impl IdGen {
    pub fn new(shard: usize) -> Self {
        assert!(shard < SHARDS_MAX, "shard index {shard} does not fit in a message id");
        IdGen { shard: Cell::new(shard as u64), lease: None, last_ms: Cell::new(0), counter: Cell::new(0) }
    }

    /// A generator making ids with the slot `lease` holds (cluster mode).
    pub fn leased(lease: Arc<crate::cluster::IdLease>) -> Self {
        let slot = lease.slot_at(unix_now_ms()).unwrap_or(0);
        IdGen { lease: Some(lease), ..IdGen::new(slot) }
    }

    /// Whether ids can be made now (false in cluster mode while the shard holds no valid lease).
    pub fn usable(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| l.slot_at(unix_now_ms()).is_some())
    }

    /// A fresh id and the timestamp (Unix ms) that goes with the message; none while the
    /// shard holds no valid lease (never an id of another node's slot).
    pub fn next(&self) -> Option<(u64, u64)> {
        let now = unix_now_ms();
        let mut ms = self.last_ms.get().max(now);
        let mut counter = if ms == self.last_ms.get() { self.counter.get() + 1 } else { 0 };
        if let Some(lease) = &self.lease {
            let slot = lease.slot_at(now)?;
            if slot as u64 != self.shard.get() {
                // Another slot: from the next millisecond, so ids keep increasing.
                ms = (self.last_ms.get() + 1).max(now);
                counter = 0;
                self.shard.set(slot as u64);
            }
        }
        if counter >= 1 << COUNTER_BITS {
            // More than 16384 ids in one millisecond: borrow the next millisecond.
            ms += 1;
            counter = 0;
        }
        self.last_ms.set(ms);
        self.counter.set(counter);
        Some(((ms << (SHARD_BITS + COUNTER_BITS)) | (self.shard.get() << COUNTER_BITS) | counter, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_increasing() {
        let g = IdGen::new(3);
        let mut last = 0;
        for _ in 0..100_000 {
            let (id, _) = g.next().unwrap();
            assert!(id > last);
            assert_eq!((id >> COUNTER_BITS) & ((1 << SHARD_BITS) - 1), 3);
            last = id;
        }
    }

    #[test]
    fn frame_is_a_text_frame_with_the_contract_fields() {
        let m = Message {
            id: 42,
            ts: 7,
            from: "alice".into(),
            kind: Kind::Text,
            body: RawValue::from_string("{\"text\":\"hi\"}".into()).unwrap(),
            cid: Some("c1".into()),
        };
        for body_len in [0usize, 200, 70_000] {
            let m = Message {
                body: RawValue::from_string(format!("{{\"text\":\"{}\"}}", "x".repeat(body_len))).unwrap(),
                ..Message { body: m.body.clone(), from: m.from.clone(), cid: m.cid.clone(), ..m }
            };
            let f = m.encode_frame("u:alice", 9);
            let mut cur = std::io::Cursor::new(&f[..]);
            let (h, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
            assert_eq!(h.opcode, OpCode::Data(Data::Text));
            assert_eq!(len as usize, f.len() - cur.position() as usize);
            let v: serde_json::Value = serde_json::from_slice(&f[cur.position() as usize..]).unwrap();
            assert_eq!(v["type"], "msg");
            assert_eq!(v["id"], "42");
            assert_eq!(v["seq"], 9);
            assert_eq!(v["chat"], "u:alice");
            assert_eq!(v["cid"], "c1");
            assert_eq!(v["body"]["text"].as_str().unwrap().len(), body_len);
        }
    }

    fn kind_of(i: u8) -> Kind {
        [Kind::Text, Kind::Image, Kind::File, Kind::Voice, Kind::Custom][usize::from(i % 5)]
    }

    proptest::proptest! {
        /// The hand-written `msg` frame is byte for byte serde_json's, whatever the strings hold
        /// (quotes, backslashes, control characters, non-ASCII) and however long the body is.
        #[test]
        fn the_msg_frame_is_serde_jsons_bytes(
            id: u64,
            ts: u64,
            seq: u64,
            kind in 0u8..5,
            from in "\\PC{0,12}|[a-z0-9_.@-]{1,64}",
            chat in "u:\\PC{0,12}|[ug]:[a-z0-9_-]{1,64}|\\\\\"\\u{1}\\u{1f}\\u{7f}\\u{e9}",
            cid in proptest::option::of("\\PC{0,16}|[ -~]{0,32}"),
            text in "[ -~]{0,300}",
        ) {
            let body = serde_json::to_string(&serde_json::json!({ "text": text })).unwrap();
            let m = Message {
                id,
                ts,
                from: from.into(),
                kind: kind_of(kind),
                body: RawValue::from_string(body).unwrap(),
                cid: cid.map(Into::into),
            };
            proptest::prop_assert_eq!(&m.encode_frame(&chat, seq)[..], &m.encode_frame_serde(&chat, seq)[..]);
        }
    }

    #[test]
    fn binary_frame_holds_the_same_message() {
        let m = Message {
            id: 42,
            ts: 7,
            from: "alice".into(),
            kind: Kind::Voice,
            body: RawValue::from_string(r#"{"url":"https://x/v.ogg","duration_ms":900}"#.into()).unwrap(),
            cid: None,
        };
        let f = m.encode_frame_for(Wire::Proto, "u:alice", 9);
        let mut cur = std::io::Cursor::new(&f[..]);
        let (h, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
        assert_eq!(h.opcode, OpCode::Data(Data::Binary));
        assert_eq!(len as usize, f.len() - cur.position() as usize);
        let frame = ether_proto::pb::decode_server(&f[cur.position() as usize..]).unwrap();
        let json: serde_json::Value = {
            let t = m.encode_frame("u:alice", 9);
            let mut cur = std::io::Cursor::new(&t[..]);
            FrameHeader::parse(&mut cur).unwrap().unwrap();
            serde_json::from_slice(&t[cur.position() as usize..]).unwrap()
        };
        assert_eq!(serde_json::to_value(&frame).unwrap(), json, "the same frame on both wires");
    }

    #[test]
    fn a_frame_set_encodes_once_per_wire_and_only_when_asked() {
        let made = Cell::new(0);
        let mut set = FrameSet::new(|wire| {
            made.set(made.get() + 1);
            Bytes::from(wire.subprotocol())
        });
        for _ in 0..3 {
            assert_eq!(&set.get(Wire::Json)[..], SUBPROTOCOL_JSON.as_bytes());
        }
        assert_eq!(made.get(), 1, "JSON only: the binary frame never made");
        assert_eq!(&set.get(Wire::Proto)[..], SUBPROTOCOL_PROTO.as_bytes());
        assert_eq!(&set.get(Wire::Proto)[..], SUBPROTOCOL_PROTO.as_bytes());
        assert_eq!(made.get(), 2);
    }
}
