//! The `ether.v1.proto` subprotocol on a real node: terminals that ask for it get every frame
//! as a Protocol Buffers binary frame, speak to the node the same way, and mean exactly what a
//! JSON terminal means: the same messages in the same order, acks, sends, reads, syncs, group
//! fan-out, pings, errors; JSON and binary terminals of one user side by side.
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use ether_proto::frame::ServerFrame;
use ether_proto::pb::SUBPROTOCOL_PROTO;
use ether_proto::{ClientFrame, ErrorCode, Kind};
use ether_sdk::tungstenite::Message;
use ether_sdk::{ConnectOptions, TerminalClient};
use support::*;

fn proto_terminal(node: &TestNode, user: &str, device: &str) -> TerminalClient {
    let opts = ConnectOptions::new(&node.token(user), device, "ios").subprotocol(SUBPROTOCOL_PROTO);
    let (t, w) = TerminalClient::connect_with(&node.ws_url(), &opts).expect("proto terminal connects");
    assert_eq!(t.subprotocol(), Some(SUBPROTOCOL_PROTO), "the node names the subprotocol it chose");
    assert!(t.is_proto());
    assert_eq!((w.user.as_str(), w.device.as_str()), (user, device));
    t
}

/// The next raw WebSocket message: frames on a proto connection are binary.
fn next_raw(t: &mut TerminalClient) -> Message {
    t.recv_message(WAIT).expect("recv").expect("a frame")
}

#[test]
fn binary_and_json_terminals_of_one_user_get_the_same_messages() {
    let node = TestNode::start();
    let mut phone = proto_terminal(&node, "pat", "phone");
    let mut web = node.terminal("pat", "web");
    let gw = node.gateway();
    let mut ids = Vec::new();
    for i in 0..10 {
        let sent = gw.send_message(&text("max", "pat", &format!("m{i}"))).unwrap();
        ids.push(sent.id);
    }
    let mut got = [Vec::new(), Vec::new()];
    for (t, got) in [&mut phone, &mut web].into_iter().zip(&mut got) {
        for _ in 0..10 {
            let m = next_msg(t);
            t.ack(m.seq).unwrap();
            got.push(m);
        }
    }
    assert_eq!(got[0], got[1], "the same messages, fields and order on both subprotocols");
    assert_eq!(got[0].iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids);
    assert!(got[0].windows(2).all(|w| w[0].seq + 1 == w[1].seq), "in seq order, no gaps");
    assert_eq!(got[0][3].body["text"], "m3");
    assert_eq!(got[0][3].chat, "u:max");

    // On the wire they are binary frames for the phone, text for the web terminal.
    node.gateway().send_message(&text("max", "pat", "raw")).unwrap();
    assert!(matches!(next_raw(&mut phone), Message::Binary(_)));
    assert!(matches!(next_raw(&mut web), Message::Text(_)));
}

#[test]
fn a_binary_terminal_sends_reads_syncs_and_pings() {
    let node = TestNode::start();
    let mut ann = proto_terminal(&node, "ann", "phone");
    let mut bob = node.terminal("bob", "web");

    // send → `sent` (after it is durable), the peer gets it, the sender's own copy too.
    ann.send("c-1", "bob", Kind::Image, serde_json::json!({"url": "https://x.example/a.png", "width": 3, "height": 4}))
        .unwrap();
    let mut sent = None;
    let mut own = None;
    while sent.is_none() || own.is_none() {
        match ann.recv(WAIT).unwrap() {
            Some(ServerFrame::Sent { cid, id, seq, .. }) => sent = Some((cid, id, seq)),
            Some(ServerFrame::Msg(m)) => own = Some(m),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (cid, id, seq) = sent.unwrap();
    assert_eq!(cid, "c-1");
    let own = own.unwrap();
    assert_eq!((own.id.as_str(), own.seq, own.chat.as_str()), (id.as_str(), seq, "u:bob"));
    let m = next_msg(&mut bob);
    assert_eq!((m.id.as_str(), m.kind, m.chat.as_str()), (id.as_str(), Kind::Image, "u:ann"));
    assert_eq!(m.body["width"], 3);

    // The JSON peer reads it: the binary sender gets the receipt.
    bob.read("u:ann", m.seq).unwrap();
    match ann.recv_until(|f| matches!(f, ServerFrame::Receipt { .. }), WAIT).unwrap() {
        ServerFrame::Receipt { chat, by, up_to } => assert_eq!((chat, by, up_to), ("u:bob".into(), "bob".into(), id)),
        other => panic!("{other:?}"),
    }

    // A repeated cid answers with the first message.
    ann.send_text("c-1", "bob", "again").unwrap();
    match ann.recv_until(|f| matches!(f, ServerFrame::Sent { .. }), WAIT).unwrap() {
        ServerFrame::Sent { id: again, .. } => assert_eq!(again, own.id),
        other => panic!("{other:?}"),
    }

    // sync from 0 replays the inbox in binary frames; ping → pong.
    let (replayed, head) = sync_all(&mut ann, 0);
    assert_eq!(replayed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [own.id.as_str()]);
    assert_eq!(head, own.seq);
    ann.ping().unwrap();
    assert_eq!(ann.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
}

#[test]
fn group_fan_out_reaches_binary_and_json_members_alike() {
    let node = TestNode::start();
    let gw = node.gateway();
    gw.create_group(Some("crew"), "Crew", "ann", &["bob", "cat"]).unwrap();
    let mut bob = proto_terminal(&node, "bob", "phone");
    let mut cat = node.terminal("cat", "web");
    for i in 0..5 {
        gw.send_group_message("crew", "ann", Kind::Text, &serde_json::json!({ "text": format!("g{i}") }), None)
            .unwrap();
    }
    let mut got = [Vec::new(), Vec::new()];
    for (t, got) in [&mut bob, &mut cat].into_iter().zip(&mut got) {
        for _ in 0..5 {
            let m = next_msg(t);
            t.ack_group("crew", m.seq).unwrap();
            got.push(m);
        }
    }
    assert_eq!(got[0], got[1]);
    assert_eq!(
        got[0].iter().map(|m| m.body["text"].as_str().unwrap().to_owned()).collect::<Vec<_>>(),
        ["g0", "g1", "g2", "g3", "g4"]
    );
    assert!(got[0].iter().all(|m| m.chat == "g:crew"));

    // A member on proto sends to the group from its terminal.
    bob.send_group_text("c-g", "crew", "from bob").unwrap();
    let m = cat.recv_msg(WAIT).unwrap();
    assert_eq!((m.from.as_str(), m.body["text"].as_str()), ("bob", Some("from bob")));
    // Bob gets `sent` and, as a member, the message itself (in either order).
    let (mut sent, mut echo) = (false, false);
    while !(sent && echo) {
        match bob.recv(WAIT).unwrap() {
            Some(ServerFrame::Sent { cid, seq, .. }) => sent = cid == "c-g" && seq == 6,
            Some(ServerFrame::Msg(m)) => echo = m.seq == 6 && m.from == "bob",
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut groups = BTreeMap::new();
    groups.insert("crew".to_owned(), 0);
    bob.sync(0, groups, None).unwrap();
    let mut replayed = 0;
    loop {
        match bob.recv(WAIT).unwrap() {
            Some(ServerFrame::Msg(m)) if m.chat == "g:crew" => replayed += 1,
            Some(ServerFrame::Synced { groups, more: false, .. }) => {
                assert_eq!(groups.get("crew"), Some(&6));
                break;
            }
            Some(_) => {}
            None => panic!("no synced"),
        }
    }
    assert_eq!(replayed, 6, "the group's whole log, in binary frames");
}

#[test]
fn bad_binary_input_gets_the_documented_errors_and_the_connection_goes_on() {
    // More invalid frames than the test configuration's default before it closes (1008).
    let node = TestNode::with(|c| c.limits.protocol_violations_max = 16);
    let mut t = proto_terminal(&node, "eve", "phone");
    let error = |t: &mut TerminalClient| match t.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, message, reference, .. }) => (code, message, reference),
        other => panic!("expected an error frame, got {other:?}"),
    };
    // Not Protocol Buffers.
    t.raw_send(Message::binary(vec![0xff, 0xff, 0xff])).unwrap();
    let (code, message, _) = error(&mut t);
    assert_eq!(code, ErrorCode::InvalidFrame, "{message}");
    // A text frame on a binary connection.
    t.raw_send(Message::text(r#"{"type":"ping"}"#)).unwrap();
    let (code, message, _) = error(&mut t);
    assert_eq!(code, ErrorCode::InvalidFrame);
    assert!(message.contains("binary"), "{message}");
    // A body that is not JSON text.
    let send = ether_proto::pb::v1::ClientFrame {
        frame: Some(ether_proto::pb::v1::client_frame::Frame::Send(ether_proto::pb::v1::Send {
            cid: "c".into(),
            to: Some("bob".into()),
            group: None,
            kind: ether_proto::pb::v1::Kind::Text.into(),
            body_json: "{nope".into(),
        })),
    };
    t.raw_send(Message::binary(prost::Message::encode_to_vec(&send))).unwrap();
    let (code, message, _) = error(&mut t);
    assert_eq!(code, ErrorCode::InvalidJson);
    assert!(message.contains("body_json"), "{message}");
    // A body that fails its kind's validation: the field path, and the cid as `ref`.
    t.send_frame(&ClientFrame::Send {
        cid: "c-bad".into(),
        to: Some("bob".into()),
        group: None,
        kind: Kind::Text,
        body: serde_json::json!({"txt": "typo"}),
    })
    .unwrap();
    let (code, message, reference) = error(&mut t);
    assert_eq!((code, reference.as_deref()), (ErrorCode::InvalidBody, Some("c-bad")));
    assert!(message.contains("text"), "{message}");
    // Still served: a good frame after the bad ones.
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
    assert_silent(&mut t, Duration::from_millis(200));
}

#[test]
fn the_upgrade_picks_the_first_offered_subprotocol_it_speaks() {
    let node = TestNode::start();
    let connect = |offer: &str| {
        let opts = ConnectOptions::new(&node.token("fay"), "d", "web").subprotocol(offer);
        TerminalClient::connect_raw(&node.ws_url(), &opts)
    };
    let t = connect("x.v9, ether.v1.proto, ether.v1.json").unwrap();
    assert_eq!(t.subprotocol(), Some(SUBPROTOCOL_PROTO));
    drop(t);
    let t = connect("ether.v1.json, ether.v1.proto").unwrap();
    assert_eq!(t.subprotocol(), Some("ether.v1.json"));
    drop(t);
    let e = connect("ether.v2.json").map(|_| ()).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("400"), "refused before the upgrade: {text}");
}
