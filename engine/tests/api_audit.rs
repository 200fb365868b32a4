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
