//! The admin routes over a fake view, without sockets: auth on every `/admin/` route, 404 and
//! 405, each endpoint's JSON shape, readiness, the actions reaching the view, redaction, the
//! dashboard and its assets.

mod common;

use std::sync::atomic::Ordering;

use common::{authed, call, FakeView, TOKEN};
use ether_admin::{ConnectionsReport, StatsReport, UserReport};
use ether_http::{Method, Request, Response};
use serde_json::Value;

fn body_json(resp: &Response) -> Value {
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&resp.body)))
}

fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn assert_error(resp: &Response, status: u16, code: &str) {
    assert_eq!(resp.status, status, "{}", String::from_utf8_lossy(&resp.body));
    let v = body_json(resp);
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// Every route under /admin/, with its method.
const ADMIN_ROUTES: [(Method, &str); 7] = [
    (Method::Get, "/admin/v1/stats"),
    (Method::Get, "/admin/v1/connections"),
    (Method::Get, "/admin/v1/users/alice"),
    (Method::Post, "/admin/v1/users/alice/kick"),
    (Method::Post, "/admin/v1/drain"),
    (Method::Get, "/admin/v1/config"),
    (Method::Get, "/admin/v1/nope"),
];

#[test]
fn every_admin_route_needs_the_token() {
    let view = FakeView::new();
    for (method, path) in ADMIN_ROUTES {
        let bad_auth = [
            None,
            Some("Bearer wrong".to_owned()),
            Some(format!("Bearer {TOKEN}x")),
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
            Some(format!("Basic {TOKEN}")),
            Some(TOKEN.to_owned()),
            Some("Bearer ".to_owned()),
        ];
        for auth in bad_auth {
            let mut req = Request::new(method.clone(), path).unwrap();
            if let Some(a) = &auth {
                req = req.with_header("authorization", a);
            }
            let resp = call(&view, req);
            assert_error(&resp, 401, "unauthorized");
            assert!(header(&resp, "www-authenticate").is_some_and(|v| v.starts_with("Bearer")));
        }
    }
    // Nothing reached the view.
    assert_eq!(view.shared.drains.load(Ordering::SeqCst), 0);
    assert!(view.shared.kicks.lock().unwrap().is_empty());
    assert_eq!(view.shared.stats_calls.load(Ordering::SeqCst), 0);
    // The scheme is case-insensitive.
    let req =
        Request::new(Method::Get, "/admin/v1/stats").unwrap().with_header("Authorization", &format!("bearer {TOKEN}"));
    assert_eq!(call(&view, req).status, 200);
}

#[test]
fn open_routes_need_no_token() {
    let view = FakeView::new();
    for path in ["/healthz", "/readyz", "/metrics", "/", "/assets/app.js", "/assets/style.css"] {
        let resp = call(&view, Request::new(Method::Get, path).unwrap());
        assert_eq!(resp.status, 200, "{path}");
    }
    assert_eq!(call(&view, Request::new(Method::Get, "/favicon.ico").unwrap()).status, 204);
}

#[test]
fn unknown_paths_404_and_wrong_methods_405() {
    let view = FakeView::new();
    assert_error(&call(&view, authed(Method::Get, "/admin/v1/nope")), 404, "not_found");
    assert_error(&call(&view, authed(Method::Get, "/admin/v1/users/a/x")), 404, "not_found");
    assert_error(&call(&view, Request::new(Method::Get, "/nope").unwrap()), 404, "not_found");
    assert_error(&call(&view, Request::new(Method::Get, "/assets/evil.js").unwrap()), 404, "not_found");

    let cases = [
        (Method::Post, "/admin/v1/stats", "GET, HEAD"),
        (Method::Delete, "/admin/v1/connections", "GET, HEAD"),
        (Method::Post, "/admin/v1/users/alice", "GET, HEAD"),
        (Method::Get, "/admin/v1/users/alice/kick", "POST"),
        (Method::Get, "/admin/v1/drain", "POST"),
        (Method::Put, "/admin/v1/config", "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let resp = call(&view, authed(method.clone(), path));
        assert_error(&resp, 405, "method_not_allowed");
        assert_eq!(header(&resp, "allow"), Some(allow), "{method} {path}");
    }
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let resp = call(&view, Request::new(Method::Post, path).unwrap());
        assert_error(&resp, 405, "method_not_allowed");
    }
    // A GET-only drain must not have drained.
    assert_eq!(view.shared.drains.load(Ordering::SeqCst), 0);
    // HEAD works wherever GET does.
    assert_eq!(call(&view, authed(Method::Head, "/admin/v1/stats")).status, 200);
    assert_eq!(call(&view, Request::new(Method::Head, "/healthz").unwrap()).status, 200);
}

#[test]
fn health_and_readiness() {
    let view = FakeView::new();
    let resp = call(&view, Request::new(Method::Get, "/healthz").unwrap());
    assert_eq!(body_json(&resp)["status"], "ok");
    let resp = call(&view, Request::new(Method::Get, "/readyz").unwrap());
    assert_eq!((resp.status, body_json(&resp)["status"].clone()), (200, "ready".into()));

    *view.shared.not_ready.lock().unwrap() = Some("store unreachable".into());
    let resp = call(&view, Request::new(Method::Get, "/readyz").unwrap());
    assert_eq!(resp.status, 503);
    let v = body_json(&resp);
    assert_eq!(v["status"], "not_ready");
    assert_eq!(v["reason"], "store unreachable");
    // Health stays OK: the process is alive, it just should not get traffic.
    assert_eq!(call(&view, Request::new(Method::Get, "/healthz").unwrap()).status, 200);
}

#[test]
fn stats_shape() {
    let view = FakeView::new();
    let resp = call(&view, authed(Method::Get, "/admin/v1/stats"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.content_type, "application/json");
    assert_eq!(header(&resp, "cache-control"), Some("no-store"));
    let v = body_json(&resp);
    for key in ["id", "version", "started_ms", "uptime_s", "draining"] {
        assert!(!v["node"][key].is_null(), "node.{key}");
    }
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4);
    for key in [
        "shard",
        "connections",
        "handshakes",
        "handshake_failures",
        "auth_failures",
        "frames_in",
        "frames_out",
        "socket_writes",
        "messages_accepted",
        "deliveries",
        "acks",
        "resends",
        "mesh_queue_depth",
        "outbound_bytes_queued",
        "parked_connections",
        "parks",
        "rate_limited",
        "closes",
        "ack_latency",
        "push_latency",
    ] {
        assert!(!shards[0][key].is_null(), "shards[0].{key}");
    }
    for key in ["bounds", "counts", "sum", "count", "p50", "p90", "p99"] {
        assert!(!shards[0]["ack_latency"][key].is_null(), "ack_latency.{key}");
    }
    for key in ["batches", "ops", "batch_size", "commit_latency", "queue_depth"] {
        assert!(!v["storage"][key].is_null(), "storage.{key}");
    }
    assert_eq!(v["totals"]["connections"], 1234);
    assert_eq!(v["totals"]["shard"], 4, "totals.shard is the shard count");
    assert_eq!(v["api"][0]["route"], "POST /v1/messages");
    let typed: StatsReport = serde_json::from_value(v).unwrap();
    assert_eq!(typed.totals.closes["idle"], 40 + 41 + 42 + 43);
}

#[test]
fn metrics_are_prometheus_text() {
    let view = FakeView::new();
    let resp = call(&view, Request::new(Method::Get, "/metrics").unwrap());
    assert_eq!(resp.status, 200);
    assert_eq!(resp.content_type, "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8(resp.body).unwrap();
    assert!(text.contains("# TYPE ether_connections gauge\n"));
    assert!(text.contains("ether_connections{shard=\"3\"} 304\n"));
    assert!(text.contains("ether_connections_closed_total{shard=\"1\",reason=\"slow_consumer\"} 2\n"));
    assert!(text.contains("ether_ack_latency_seconds_bucket{shard=\"0\",le=\"+Inf\"} 200\n"));
    assert!(text.contains("ether_api_requests_total{route=\"POST /v1/messages\",status=\"200\"} 4242\n"));
}

#[test]
fn connections_query_page_and_closes() {
    let view = FakeView::new();
    let resp = call(&view, authed(Method::Get, "/admin/v1/connections"));
    assert_eq!(resp.status, 200);
    let v = body_json(&resp);
    assert_eq!(v["total"], 40);
    assert_eq!(v["limit"], 100);
    assert_eq!(v["sort"], "since");
    assert_eq!(v["order"], "asc");
    assert_eq!(v["connections"].as_array().unwrap().len(), 40);
    for key in [
        "session",
        "user",
        "device",
        "platform",
        "shard",
        "remote",
        "since_ms",
        "last_activity_ms",
        "unacked",
        "queued_bytes",
    ] {
        assert!(!v["connections"][0][key].is_null(), "connections[0].{key}");
    }
    let closes = v["recent_closes"].as_array().unwrap();
    assert_eq!(closes.len(), 20, "default: 20 recent closes");
    assert!(closes[0]["reason"].is_string() && closes[0]["closed_ms"].is_u64());
    assert_eq!(*view.shared.closes_limits.lock().unwrap(), vec![20]);

    let r = call(&view, authed(Method::Get, "/admin/v1/connections?sort=queued_bytes&limit=5&offset=2&closed=3"));
    let report: ConnectionsReport = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((report.total, report.connections.len(), report.recent_closes.len()), (40, 5, 3));
    assert!(report.connections.windows(2).all(|w| w[0].queued_bytes >= w[1].queued_bytes));
    let q = view.shared.queries.lock().unwrap().last().cloned().unwrap();
    assert_eq!((q.limit, q.offset), (5, 2), "the query reached the view");

    // Filters apply to the closes too (looked up through the whole ring).
    let r = call(&view, authed(Method::Get, "/admin/v1/connections?user=carol"));
    let report: ConnectionsReport = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(report.total, 0);
    assert_eq!(report.recent_closes.len(), 1);
    assert_eq!(report.recent_closes[0].conn.user, "carol");
    assert_eq!(*view.shared.closes_limits.lock().unwrap().last().unwrap(), 1000);

    let r = call(&view, authed(Method::Get, "/admin/v1/connections?platform=ios&closed=0"));
    let report: ConnectionsReport = serde_json::from_slice(&r.body).unwrap();
    assert!(report.connections.iter().all(|c| c.platform == "ios"));
    assert!(report.recent_closes.is_empty());

    for bad in ["limit=0", "limit=5000", "sort=nope", "order=sideways", "shard=-1", "bogus=1"] {
        let r = call(&view, authed(Method::Get, &format!("/admin/v1/connections?{bad}")));
        assert_error(&r, 400, "invalid_body");
        let msg = body_json(&r)["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.starts_with("query."), "{bad}: {msg}");
    }
}

#[test]
fn user_lookup() {
    let view = FakeView::new();
    let r = call(&view, authed(Method::Get, "/admin/v1/users/alice"));
    assert_eq!(r.status, 200);
    let report: UserReport = serde_json::from_slice(&r.body).unwrap();
    assert!(report.online);
    assert_eq!(report.user, "alice");
    let devices: Vec<&str> = report.connections.iter().map(|c| c.device.as_str()).collect();
    assert_eq!(devices, ["phone", "laptop"]);
    let c = &report.connections[0];
    assert!(!c.remote.is_empty() && c.since_ms > 0 && c.last_activity_ms > 0);

    let r = call(&view, authed(Method::Get, "/admin/v1/users/nobody"));
    let v = body_json(&r);
    assert_eq!((r.status, v["online"].clone()), (200, false.into()));
    assert_eq!(v["connections"], serde_json::json!([]));

    let r = call(&view, authed(Method::Get, "/admin/v1/users/bad%20id"));
    assert_error(&r, 400, "invalid_body");
}

#[test]
fn kick_reaches_the_view() {
    let view = FakeView::new();
    let r = call(&view, authed(Method::Post, "/admin/v1/users/alice/kick"));
    assert_eq!((r.status, body_json(&r)["kicked"].clone()), (200, 2.into()));
    let req =
        authed(Method::Post, "/admin/v1/users/alice/kick").with_body(r#"{"device":"phone","reason":"maintenance"}"#);
    let r = call(&view, req);
    assert_eq!(body_json(&r)["kicked"], 1);
    let kicks = view.shared.kicks.lock().unwrap().clone();
    assert_eq!(
        kicks,
        vec![
            ("alice".to_owned(), None, "kicked by an operator".to_owned()),
            ("alice".to_owned(), Some("phone".to_owned()), "maintenance".to_owned()),
        ]
    );
    let r = call(&view, authed(Method::Post, "/admin/v1/users/alice/kick").with_body("{nope"));
    assert_error(&r, 400, "invalid_json");
    let r = call(&view, authed(Method::Post, "/admin/v1/users/alice/kick").with_body(r#"{"everyone":true}"#));
    assert_error(&r, 400, "invalid_body");
    assert_eq!(view.shared.kicks.lock().unwrap().len(), 2, "bad bodies kick nobody");
}

#[test]
fn drain_reaches_the_view_and_readiness_follows() {
    let view = FakeView::new();
    let r = call(&view, authed(Method::Post, "/admin/v1/drain"));
    assert_eq!(r.status, 200);
    let v = body_json(&r);
    assert_eq!((v["started"].clone(), v["connections"].clone()), (true.into(), 1234.into()));
    assert_eq!(view.shared.drains.load(Ordering::SeqCst), 1);
    let r = call(&view, authed(Method::Post, "/admin/v1/drain"));
    assert_eq!(body_json(&r)["started"], false, "idempotent");
    let r = call(&view, authed(Method::Get, "/admin/v1/stats"));
    assert_eq!(body_json(&r)["node"]["draining"], true);
}

#[test]
fn config_never_shows_secrets() {
    let view = FakeView::new();
    let r = call(&view, authed(Method::Get, "/admin/v1/config"));
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.clone()).unwrap();
    for secret in ["jwt-SECRET-value", "api-KEY-value", TOKEN, "redis-PASSWORD", "hook-SECRET"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let v = body_json(&r);
    assert_eq!(v["auth"]["admin_token"], "<redacted>");
    assert_eq!(v["cluster"]["redis_url"], "redis://ether:<redacted>@redis:6379");
    assert_eq!(v["listen"]["admin"], "127.0.0.1:9002");
    assert_eq!(v["node"]["shards"], 4);
}

#[test]
fn a_view_without_the_data_methods_answers_unavailable() {
    struct Minimal;
    impl ether_admin::NodeView for Minimal {
        fn admin_token(&self) -> &str {
            "t"
        }
        fn readiness(&self) -> Result<(), String> {
            Ok(())
        }
    }
    let run = |req: Request| futures_lite::future::block_on(ether_admin::handle(std::rc::Rc::new(Minimal), req));
    let auth = |m: Method, p: &str| Request::new(m, p).unwrap().with_header("authorization", "Bearer t");
    for (m, p) in [
        (Method::Get, "/admin/v1/stats"),
        (Method::Get, "/admin/v1/connections"),
        (Method::Get, "/admin/v1/users/u"),
        (Method::Post, "/admin/v1/users/u/kick"),
        (Method::Post, "/admin/v1/drain"),
        (Method::Get, "/admin/v1/config"),
    ] {
        assert_error(&run(auth(m, p)), 503, "unavailable");
    }
    assert_error(&run(Request::new(Method::Get, "/metrics").unwrap()), 503, "unavailable");
    assert_eq!(run(Request::new(Method::Get, "/healthz").unwrap()).status, 200);
}

#[test]
fn an_empty_admin_token_locks_the_admin_routes() {
    struct NoToken;
    impl ether_admin::NodeView for NoToken {
        fn admin_token(&self) -> &str {
            ""
        }
        fn readiness(&self) -> Result<(), String> {
            Ok(())
        }
    }
    let req = Request::new(Method::Get, "/admin/v1/stats").unwrap().with_header("authorization", "Bearer ");
    let resp = futures_lite::future::block_on(ether_admin::handle(std::rc::Rc::new(NoToken), req));
    assert_eq!(resp.status, 401);
}

#[test]
fn dashboard_and_assets() {
    let view = FakeView::new();
    let r = call(&view, Request::new(Method::Get, "/").unwrap());
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "text/html; charset=utf-8");
    let csp = header(&r, "content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"));
    let html = String::from_utf8(r.body).unwrap();
    assert!(html.contains("id=\"login-form\""));
    let js = call(&view, Request::new(Method::Get, "/assets/app.js").unwrap());
    assert_eq!(js.content_type, "text/javascript; charset=utf-8");
    let js = String::from_utf8(js.body).unwrap();
    assert!(js.contains("/admin/v1/stats") && js.contains("sessionStorage"));
    assert!(js.contains("'Bearer '"));
    let css = call(&view, Request::new(Method::Get, "/assets/style.css").unwrap());
    assert_eq!(css.content_type, "text/css; charset=utf-8");
    assert_eq!(header(&css, "x-content-type-options"), Some("nosniff"));
}
