//! Audit of the REST gateway and terminal authentication against the contract (API.md): each
//! test pins a defect found by the audit and fails without its fix.
mod support;

use std::io::{Read, Write};

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

/// Reads one response on a keep-alive connection: its head and the `Content-Length` body
/// (`head_only`: the answer to a HEAD, which has none).
fn read_response(conn: &mut std::io::BufReader<std::net::TcpStream>, head_only: bool) -> (String, Vec<u8>) {
    use std::io::BufRead;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(conn.read_line(&mut line).unwrap() > 0, "closed after {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; if head_only { 0 } else { length }];
    conn.read_exact(&mut body).unwrap();
    (head, body)
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// HEAD on a GET route answers like GET without the body (RFC 9110 §9.3.2): same status and
/// Content-Length, and the keep-alive connection goes on with the next request. A method a
/// route does not take is 405 with `Allow` naming those it does.
#[test]
fn head_is_answered_as_get_and_405_says_what_is_allowed() {
    let node = TestNode::start();
    node.gateway().create_group(Some("g1"), "team", "ann", &["ann", "bob"]).unwrap();
    let stream = std::net::TcpStream::connect(node.ports.api).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut conn = std::io::BufReader::new(stream);
    let key = node.api_key.clone();
    let mut ask = |method: &str, path: &str| {
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\n\r\n");
        conn.get_mut().write_all(req.as_bytes()).unwrap();
        read_response(&mut conn, method == "HEAD")
    };
    for path in [
        "/v1/users/ann/unread",
        "/v1/users/ann/presence",
        "/v1/groups/g1",
        "/v1/groups/g1/members",
        "/v1/users/ann/groups",
    ] {
        let (get_head, get_body) = ask("GET", path);
        assert!(get_head.starts_with("HTTP/1.1 200"), "GET {path}: {get_head}");
        let (head_head, _) = ask("HEAD", path);
        assert!(head_head.starts_with("HTTP/1.1 200"), "HEAD {path}: {head_head}");
        assert_eq!(header(&head_head, "content-length"), Some(get_body.len().to_string().as_str()), "HEAD {path}");
        assert_eq!(header(&head_head, "content-type"), header(&get_head, "content-type"), "HEAD {path}");
    }
    // Nothing of a HEAD's body was written: the next answer on the connection parses whole.
    let (after, body) = ask("GET", "/v1/users/ann/unread");
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    serde_json::from_slice::<serde_json::Value>(&body).unwrap();

    for (method, path, allow) in [
        ("PUT", "/v1/messages", "POST"),
        ("GET", "/v1/messages/batch", "POST"),
        ("DELETE", "/v1/users/ann/unread", "GET, HEAD"),
        ("HEAD", "/v1/users/ann/kick", "POST"),
        ("PATCH", "/v1/groups/g1", "GET, HEAD, DELETE"),
        ("PUT", "/v1/groups/g1/messages", "GET, HEAD, POST"),
        ("GET", "/v1/groups/g1/members/ann", "DELETE"),
    ] {
        let (head, _) = ask(method, path);
        assert!(head.starts_with("HTTP/1.1 405"), "{method} {path}: {head}");
        assert_eq!(header(&head, "allow"), Some(allow), "{method} {path}: {head}");
    }
    let (missing, _) = ask("GET", "/v1/nothing");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert_eq!(header(&missing, "allow"), None);
}

/// A history or member-list query naming a parameter the route does not take, or one twice,
/// is refused naming it: a misspelt cursor (`befor_seq`) answered the newest page again, so a
/// client paging back through history looped on it forever.
#[test]
fn history_queries_refuse_unknown_and_repeated_parameters() {
    let node = TestNode::start();
    let gw = node.gateway();
    gw.create_group(Some("g1"), "team", "ann", &["ann", "bob"]).unwrap();
    for path in [
        "/v1/users/ann/messages?befor_seq=10",
        "/v1/users/ann/messages?limit=5&limit=6",
        "/v1/users/ann/messages?chat=u:bob&chat=u:eve",
        "/v1/groups/g1/messages?chat=u:bob",
        "/v1/groups/g1/messages?after_seq=1&after_seq=2",
        "/v1/groups/g1/members?curser=x",
    ] {
        match gw.get_json::<serde_json::Value>(path) {
            Err(SdkError::Api { status: 400, error }) => {
                assert_eq!(error.code, ether_proto::ErrorCode::InvalidBody, "{path}");
                assert!(error.message.starts_with("query."), "{path}: {}", error.message);
                assert!(
                    error.message.contains("unknown parameter") || error.message.contains("more than once"),
                    "{path}: {}",
                    error.message
                );
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    for path in [
        "/v1/users/ann/messages?chat=u:bob&before_seq=10&after_seq=0&limit=5",
        "/v1/groups/g1/messages?before_seq=10&limit=5",
        "/v1/groups/g1/members?limit=1",
    ] {
        gw.get_json::<serde_json::Value>(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

/// POSTs `body` (JSON) to `path` on the api port: the status and the JSON answer.
fn post_json(node: &TestNode, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = node.gateway().request("POST", path, Some(body.to_string().as_bytes())).unwrap();
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

/// A group over a membership limit is refused naming the configuration key to raise, whether
/// the API or the store finds it: eight members and an owner (nine, over the bound of 8) were
/// refused with the store's bare "limit exceeded: members: at most 8", while nine listed
/// members got "(limits.group_members_max)"; an addition over the bound and a user over
/// `limits.groups_per_user_max` likewise said only a number.
#[test]
fn membership_limits_are_named_by_their_keys() {
    let node = TestNode::start(); // test_min: 8 members per group, 4 groups per user
    let limit_error = |(status, v): (u16, serde_json::Value), key: &str| -> String {
        assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_body")), "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(key), "names {key}: {message}");
        message
    };
    // Eight listed members and the owner: nine in all.
    let eight: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    let create = json!({"id": "nine", "name": "Nine", "owner": "own", "members": eight});
    let m = limit_error(post_json(&node, "/v1/groups", &create), "limits.group_members_max");
    assert!(m.contains("owner"), "{m}");
    assert_eq!(node.gateway().request("GET", "/v1/groups/nine", None).unwrap().status, 404, "nothing made");
    // The owner listed among the members counts once: eight in all is within the bound.
    let mut with_owner = eight[..7].to_vec();
    with_owner.push("own".into());
    let create = json!({"id": "eight", "name": "Eight", "owner": "own", "members": with_owner});
    assert_eq!(post_json(&node, "/v1/groups", &create).0, 201);
    // Full: one more is refused by the store, named all the same, and nobody is added.
    let add = json!({"members": ["late"]});
    limit_error(post_json(&node, "/v1/groups/eight/members", &add), "limits.group_members_max = 8");
    let (_, g) = post_json(&node, "/v1/groups/eight/members", &json!({"members": []}));
    assert_eq!(g["added"], 0);
    let r = node.gateway().request("GET", "/v1/groups/eight", None).unwrap();
    let g: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(g["member_count"], 8, "{g}");
    // `busy` in 4 groups: a fifth, by creation or by addition, names the user and the key.
    for i in 0..4 {
        let create = json!({"id": format!("b{i}"), "name": "B", "owner": "busy"});
        assert_eq!(post_json(&node, "/v1/groups", &create).0, 201);
    }
    let create = json!({"id": "b4", "name": "B", "owner": "pam", "members": ["busy"]});
    let m = limit_error(post_json(&node, "/v1/groups", &create), "limits.groups_per_user_max = 4");
    assert!(m.contains("busy"), "{m}");
    let create = json!({"id": "b5", "name": "B", "owner": "pam"});
    assert_eq!(post_json(&node, "/v1/groups", &create).0, 201);
    let m = limit_error(
        post_json(&node, "/v1/groups/b5/members", &json!({"members": ["busy"]})),
        "limits.groups_per_user_max = 4",
    );
    assert!(m.contains("busy"), "{m}");
}

/// A retry of a group post with the same `cid` is answered with the first `{id, seq, ts}`
/// even when the sender left the group in between: it was refused with 403 "a1 is not a
/// member", so an integrator whose first attempt timed out took the message as never sent.
/// A new `cid` from the former member is still refused, and nothing is stored twice.
#[test]
fn a_group_retry_after_leaving_is_the_first_post() {
    let node = TestNode::start();
    let create = json!({"id": "g", "name": "G", "owner": "own", "members": ["a1"]});
    assert_eq!(post_json(&node, "/v1/groups", &create).0, 201);
    let post = |cid: &str, text: &str| {
        post_json(
            &node,
            "/v1/groups/g/messages",
            &json!({"from": "a1", "kind": "text", "body": {"text": text}, "cid": cid}),
        )
    };
    let (status, first) = post("c1", "once");
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["seq"], 1, "{first}");
    let gone = node.gateway().request("DELETE", "/v1/groups/g/members/a1", None).unwrap();
    assert!((200..300).contains(&gone.status), "removed: {}", gone.status);
    let (status, again) = post("c1", "retry");
    assert_eq!(status, 200, "the retry is the first post: {again}");
    for field in ["id", "seq", "ts"] {
        assert_eq!(again[field], first[field], "{field}: {again} vs {first}");
    }
    let (status, refused) = post("c2", "new");
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("forbidden")), "{refused}");
    let r = node.gateway().request("GET", "/v1/groups/g/messages", None).unwrap();
    let log: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let texts: Vec<&str> =
        log["messages"].as_array().unwrap().iter().filter_map(|m| m["body"]["text"].as_str()).collect();
    assert_eq!(texts, ["once"], "{log}");
}
