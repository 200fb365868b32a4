//! Audit of the REST gateway and terminal authentication against the contract (API.md): each
//! test pins a defect found by the audit and fails without its fix.
mod support;

use ether_sdk::{SdkError, TerminalClient};
use serde_json::json;
use support::*;

/// An HS256 token with `claims`, signed with the node's secret.
fn signed(node: &TestNode, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(node.jwt_secret.as_bytes()),
    )
    .expect("sign")
}

/// A token whose `nbf` ("not before", RFC 7519 §4.1.5) is still ahead is refused at the
/// upgrade with 401, like an expired one: a token the business's identity service issued
/// for later must not open a terminal now. Once its `nbf` is past it is good.
#[test]
fn tokens_are_refused_before_their_nbf() {
    let node = TestNode::start();
    let now = ether_engine::auth::unix_now_s();
    let early = signed(&node, &json!({ "sub": "alice", "exp": now + 7200, "nbf": now + 3600 }));
    match TerminalClient::connect(&node.ws_url(), &early, "phone", "web") {
        Err(SdkError::Rejected { status: 401, message }) => {
            assert!(message.contains("not valid yet"), "{message}");
        }
        Err(e) => panic!("refused, but not with 401: {e}"),
        Ok(_) => panic!("a token is accepted an hour before its nbf"),
    }
    let started = signed(&node, &json!({ "sub": "alice", "exp": now + 7200, "nbf": now - 60 }));
    let (_t, welcome) = TerminalClient::connect(&node.ws_url(), &started, "phone", "web").expect("nbf past: accepted");
    assert_eq!(welcome.user, "alice");
}

/// `limits.api_requests_per_s` is the node's, whichever shards the API connections land on:
/// a limit below the shard count is not rounded up to one per shard (16 connections over two
/// shards with a limit of 1/s and a burst of 1 got two requests through).
#[test]
fn the_api_rate_is_the_nodes_across_shards() {
    use std::io::{Read, Write};
    let node = TestNode::with(|c| {
        c.node.shards = 2;
        c.limits.api_requests_per_s = 1;
        c.limits.api_requests_burst = 1;
    });
    // Connected first, then one request on each at once: all within the same second.
    let mut conns: Vec<std::net::TcpStream> =
        (0..16).map(|_| std::net::TcpStream::connect(node.ports.api).unwrap()).collect();
    let req = format!(
        "GET /v1/users/sam/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        node.api_key
    );
    for c in &mut conns {
        c.write_all(req.as_bytes()).unwrap();
    }
    let mut statuses = Vec::new();
    for c in &mut conns {
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        statuses.push(answer.split(' ').nth(1).unwrap_or("?").to_owned());
    }
    let ok = statuses.iter().filter(|s| *s == "200").count();
    assert_eq!(ok, 1, "one request of the node's burst of 1: {statuses:?}");
    assert!(statuses.iter().all(|s| s == "200" || s == "429"), "{statuses:?}");
}
