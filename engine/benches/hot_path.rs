//! Criterion benchmarks of the engine's per-message user-space work, each step as the node runs
//! it for one chat message or one API request: reading masked client frames out of a socket
//! read, parsing terminal frames, encoding the `msg` frame (JSON and protobuf), parsing an API
//! request and its body.
//!
//! ```sh
//! cargo bench -p ether-engine --bench hot_path
//! ```
//! What the node does around these steps (syscalls, storage, queues) is measured end to end by
//! `ether-loadtest`; these figures say what one step costs and catch a step that got slower.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ether_engine::message::{Message, Wire};
use ether_engine::ws::{FrameReader, WsEvent};
use ether_proto::api::{parse_batch, SendMessageRef};
use ether_proto::frame::ClientFrameRef;
use ether_proto::Kind;

const SEND: &[u8] =
    br#"{"type":"send","cid":"c-7f3a-000123","to":"user-48121","kind":"text","body":{"text":"see you at 8, table by the window"}}"#;
const ACK: &[u8] = br#"{"type":"ack","seq":120931}"#;
const READ: &[u8] = br#"{"type":"read","chat":"u:user-48121","seq":120931}"#;
const API_BODY: &[u8] =
    br#"{"from":"user-1","to":"user-48121","kind":"text","body":{"text":"your order 48121 has shipped"},"cid":"order-48121"}"#;
/// Frame-size limit the benchmarks read with (the engine's default is larger).
const FRAME_MAX: usize = 64 * 1024;

/// One masked client text frame, as a terminal writes it.
fn masked_text_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn message() -> Message {
    Message {
        id: 7_391_827_331_112_960,
        ts: 1_795_000_000_000,
        from: "user-48121".into(),
        kind: Kind::Text,
        body: serde_json::value::RawValue::from_string(r#"{"text":"see you at 8, table by the window"}"#.into())
            .expect("valid JSON"),
        cid: Some("c-7f3a-000123".into()),
    }
}

fn ws_read(c: &mut Criterion) {
    // What one socket read of a busy chat terminal holds: sends, acks and a read.
    let mut chunk = Vec::new();
    for i in 0..8u8 {
        let payload = match i % 4 {
            0 | 2 => SEND,
            1 => ACK,
            _ => READ,
        };
        chunk.extend(masked_text_frame(payload, [0x1b, 0x2c, 0x3d, i]));
    }
    let mut g = c.benchmark_group("ws_read");
    g.throughput(Throughput::Elements(8));
    g.bench_function("feed_8_frames", |b| {
        let mut reader = FrameReader::default();
        b.iter_batched_ref(
            || chunk.clone(),
            |input| {
                let mut n = 0usize;
                let r = reader.feed(input, FRAME_MAX, |ev| {
                    if let WsEvent::Text(t) = ev {
                        n += t.len();
                    }
                    true
                });
                black_box((r.is_ok(), n))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn client_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_frame_parse");
    g.throughput(Throughput::Elements(1));
    for (name, bytes) in [("send", SEND), ("ack", ACK), ("read", READ)] {
        g.bench_function(name, |b| b.iter(|| black_box(ClientFrameRef::parse(black_box(bytes)).is_ok())));
    }
    g.finish();
}

fn msg_encode(c: &mut Criterion) {
    let m = message();
    let mut g = c.benchmark_group("msg_encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json", |b| {
        b.iter(|| black_box(m.encode_frame_for(Wire::Json, black_box("u:user-1"), black_box(120_931))))
    });
    g.bench_function("proto", |b| {
        b.iter(|| black_box(m.encode_frame_for(Wire::Proto, black_box("u:user-1"), black_box(120_931))))
    });
    g.finish();
}

fn api_request(c: &mut Criterion) {
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer 3b9f0c2d7e5a41f8\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        API_BODY.len()
    )
    .into_bytes()
    .into_iter()
    .chain(API_BODY.iter().copied())
    .collect::<Vec<u8>>();
    let limits = ether_http::request::Limits::default();
    let batch = {
        let entries: Vec<String> = (0..100)
            .map(|i| {
                format!(r#"{{"from":"shop","to":"user-{i}","kind":"text","body":{{"text":"order {i} shipped"}}}}"#)
            })
            .collect();
        format!(r#"{{"messages":[{}]}}"#, entries.join(",")).into_bytes()
    };

    let mut g = c.benchmark_group("api_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("http_request", |b| {
        b.iter(|| black_box(ether_http::request::parse(black_box(&request), &limits).map(|r| r.is_some())))
    });
    g.bench_function("send_message_body", |b| b.iter(|| black_box(SendMessageRef::parse(black_box(API_BODY)).is_ok())));
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch_body_100", |b| {
        b.iter(|| {
            let entries = parse_batch(black_box(&batch)).expect("valid batch");
            let ok = entries
                .iter()
                .enumerate()
                .filter(|(i, raw)| SendMessageRef::parse_batch_entry(*i, raw).is_ok())
                .count();
            black_box(ok)
        })
    });
    g.finish();
}

criterion_group!(benches, ws_read, client_frames, msg_encode, api_request);
criterion_main!(benches);
