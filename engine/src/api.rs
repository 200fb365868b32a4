//! The business REST API on the api port (API.md section 3): routing, bearer auth, request
//! validation and answers. Thin: the work is done by the `Shard`; this module only turns
//! requests into shard calls and results into JSON.
use std::rc::Rc;
use std::time::Duration;

use ether_http::request::{Method, Request};
use ether_http::response::Response;
use ether_proto::api::{
    self, BatchResult, BatchResults, Broadcast, BroadcastResult, Kick, Kicked, Presence, SendMessageRef, SentMessage,
    TokenRequest, TokenResponse,
};
use ether_proto::error::ErrorDetail;
use ether_proto::frame::{Msg, ServerFrame};
use ether_proto::ids::check_id;
use ether_proto::{ApiError, ErrorCode};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::error::EngineError;
use crate::message::NewMessage;
use crate::shard::Shard;

/// Token lifetime when a request names none.
pub const TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(3600);

pub(crate) fn json<T: Serialize>(status: u16, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::json(status, body),
        Err(e) => error(&ApiError::new(ErrorCode::Internal, e.to_string())),
    }
}

fn error(e: &ApiError) -> Response {
    Response::json(e.code.http_status(), e.to_json())
}

fn fail(code: ErrorCode, message: impl Into<String>) -> Response {
    error(&ApiError::new(code, message))
}

/// The method a request is routed by: `HEAD` is answered as `GET` (the HTTP server writes the
/// head only, with the `Content-Length` the body would have).
pub(crate) fn routed_method(method: &Method) -> &Method {
    match method {
        Method::Head => &Method::Get,
        m => m,
    }
}

/// The methods a path takes, for the `Allow` header of a 405; `None` when the path is no route.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    Some(match segments {
        ["v1", "messages"] | ["v1", "messages", "batch"] | ["v1", "broadcast"] | ["v1", "tokens"] => "POST",
        ["v1", "users", _, "kick"] | ["v1", "groups"] => "POST",
        ["v1", "users", _, "presence" | "messages" | "unread" | "groups"] => "GET, HEAD",
        ["v1", "groups", _, "messages", _, "reads"] => "GET, HEAD",
        ["v1", "groups", _] => "GET, HEAD, DELETE",
        ["v1", "groups", _, "members" | "messages"] => "GET, HEAD, POST",
        ["v1", "groups", _, "members", _] => "DELETE",
        _ => return None,
    })
}

/// Answers one API request.
pub async fn handle(shard: Rc<Shard>, req: Request) -> Response {
    let segments: Vec<&str> = req.path_segments().collect();
    let route = route_of(routed_method(&req.method), &segments);
    let started = std::time::Instant::now();
    let response = answer(&shard, &req, &segments).await;
    shard.count_api(route, response.status, started.elapsed());
    response
}

/// The route a request names, as a label for metrics (ids replaced by their placeholder).
fn route_of(method: &Method, segments: &[&str]) -> &'static str {
    match (method, segments) {
        (Method::Post, ["v1", "messages"]) => "POST /v1/messages",
        (Method::Post, ["v1", "messages", "batch"]) => "POST /v1/messages/batch",
        (Method::Post, ["v1", "broadcast"]) => "POST /v1/broadcast",
        (Method::Post, ["v1", "tokens"]) => "POST /v1/tokens",
        (Method::Get, ["v1", "users", _, "presence"]) => "GET /v1/users/{uid}/presence",
        (Method::Post, ["v1", "users", _, "kick"]) => "POST /v1/users/{uid}/kick",
        (Method::Get, ["v1", "users", _, "messages"]) => "GET /v1/users/{uid}/messages",
        (Method::Get, ["v1", "users", _, "unread"]) => "GET /v1/users/{uid}/unread",
        (Method::Post, ["v1", "groups"]) => "POST /v1/groups",
        (_, ["v1", "groups", _]) => "/v1/groups/{gid}",
        (_, ["v1", "groups", _, "members", ..]) => "/v1/groups/{gid}/members",
        (Method::Post, ["v1", "groups", _, "messages"]) => "POST /v1/groups/{gid}/messages",
        (_, ["v1", "groups", ..]) => "/v1/groups/{gid}/messages",
        (_, ["v1", "users", _, "groups"]) => "GET /v1/users/{uid}/groups",
        _ => "other",
    }
}

/// Whether the request carries the API key (compared in constant time).
fn authorized(shard: &Shard, req: &Request) -> bool {
    let expected = shard.config.auth.api_key.as_bytes();
    req.bearer_token().is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected)))
}

fn unauthorized() -> Response {
    fail(ErrorCode::Unauthorized, "missing or wrong API key: send Authorization: Bearer <api_key>")
}

/// Refuses a request without the API key from its head, before its body is buffered (see
/// `ether_http::server::HeadGate`); counted like any other answer.
pub fn gate(shard: Rc<Shard>) -> ether_http::server::HeadGate {
    Rc::new(move |head: &Request| {
        if authorized(&shard, head) {
            return None;
        }
        let segments: Vec<&str> = head.path_segments().collect();
        shard.count_api(route_of(routed_method(&head.method), &segments), 401, std::time::Duration::ZERO);
        Some(unauthorized())
    })
}

async fn answer(shard: &Rc<Shard>, req: &Request, segments: &[&str]) -> Response {
    if !authorized(shard, req) {
        return unauthorized();
    }
    if let Some(rate) = shard.api_rate {
        if let Err(wait_us) = shard.node.api_gate.allow(&rate) {
            let secs = wait_us.div_ceil(1_000_000).max(1);
            let limit = shard.config.limits.api_requests_per_s;
            return fail(
                ErrorCode::RateLimited,
                format!("over limits.api_requests_per_s = {limit}: retry after {secs} s"),
            )
            .with_header("Retry-After", secs.to_string());
        }
    }
    // Cluster mode: no message ids while the shard holds no id-generator lease (lost to another
    // node, none free yet): refused, never ids another node may make too.
    let mints_ids = matches!(
        (&req.method, segments),
        (
            Method::Post,
            ["v1", "messages" | "broadcast"] | ["v1", "messages", "batch"] | ["v1", "groups", _, "messages"]
        )
    );
    if mints_ids && !shard.ids.usable() {
        return fail(ErrorCode::Unavailable, crate::cluster::NO_ID_LEASE);
    }
    let response = match dispatch(shard, req, segments).await {
        Ok(r) => r,
        Err(e) => error(&e.to_api()),
    };
    match allowed_methods(segments) {
        Some(allow) if response.status == 405 => response.with_header("Allow", allow),
        _ => response,
    }
}

/// The answer of the route a request names (errors for the caller to encode).
async fn dispatch(shard: &Rc<Shard>, req: &Request, segments: &[&str]) -> Result<Response, EngineError> {
    match (routed_method(&req.method), segments) {
        (Method::Post, ["v1", "messages"]) => send_message(shard, req).await,
        (Method::Post, ["v1", "messages", "batch"]) => send_batch(shard, req).await,
        (Method::Post, ["v1", "broadcast"]) => broadcast(shard, req).await,
        (Method::Post, ["v1", "tokens"]) => token(shard, req),
        (Method::Get, ["v1", "users", uid, "presence"]) => presence(shard, uid).await,
        (Method::Post, ["v1", "users", uid, "kick"]) => kick(shard, uid, req).await,
        (Method::Get, ["v1", "users", uid, "messages"]) => history(shard, uid, req).await,
        (Method::Get, ["v1", "users", uid, "unread"]) => unread(shard, uid).await,
        (_, ["v1", "groups", ..]) | (_, ["v1", "users", _, "groups"]) => {
            match crate::api_groups::route(shard, req, segments).await {
                Some(r) => r,
                None => Err(ApiError::new(ErrorCode::NotFound, format!("no route {} {}", req.method, req.path)).into()),
            }
        }
        _ if allowed_methods(segments).is_some() => {
            Err(ApiError::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed on {}", req.method, req.path))
                .into())
        }
        _ => Err(ApiError::new(ErrorCode::NotFound, format!("no route {} {}", req.method, req.path)).into()),
    }
}

async fn send_message(shard: &Rc<Shard>, req: &Request) -> Result<Response, EngineError> {
    let m = SendMessageRef::parse(&req.body)?;
    m.validate("")?;
    let new = NewMessage::from(m);
    let sent = shard.send_single(new).await?;
    Ok(json(200, &SentMessage { id: sent.id.to_string(), ts: sent.ts }))
}

async fn send_batch(shard: &Rc<Shard>, req: &Request) -> Result<Response, EngineError> {
    let entries = api::parse_batch(&req.body)?;
    if entries.len() > api::BATCH_MESSAGES_MAX {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            format!("messages: at most {} per batch, got {}", api::BATCH_MESSAGES_MAX, entries.len()),
        )
        .into());
    }
    let mut results: Vec<Option<BatchResult>> = Vec::with_capacity(entries.len());
    let mut accepted = Vec::with_capacity(entries.len());
    for (i, raw) in entries.iter().enumerate() {
        let checked =
            SendMessageRef::parse_batch_entry(i, raw).and_then(|m| m.validate(&format!("messages[{i}].")).map(|()| m));
        match checked {
            Ok(m) => {
                accepted.push((i, NewMessage::from(m)));
                results.push(None);
            }
            Err(e) => {
                results.push(Some(BatchResult::Failed { error: ErrorDetail { code: e.code, message: e.message } }))
            }
        }
    }
    let (positions, msgs): (Vec<usize>, Vec<_>) = accepted.into_iter().unzip();
    let sent = shard.send_many(msgs).await;
    for (pos, result) in positions.into_iter().zip(sent) {
        results[pos] = Some(match result {
            Ok(s) => BatchResult::Sent(SentMessage { id: s.id.to_string(), ts: s.ts }),
            Err(e) => {
                let e = e.to_api();
                BatchResult::Failed { error: ErrorDetail { code: e.code, message: e.message } }
            }
        });
    }
    let results = results.into_iter().flatten().collect();
    Ok(json(200, &BatchResults { results }))
}

async fn broadcast(shard: &Rc<Shard>, req: &Request) -> Result<Response, EngineError> {
    let b: Broadcast = api::parse_request(&req.body)?;
    ether_proto::body::validate("body", b.kind, &b.body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidBody, e.to_string()))?;
    // A fresh id from the shard's generator, as a message's: terminals dedupe by id, so every
    // broadcast needs its own. Not stored: no seq, nothing to ack.
    let (id, ts) =
        shard.ids.next().ok_or_else(|| Shard::api_error(ErrorCode::Unavailable, crate::cluster::NO_ID_LEASE))?;
    let frame = std::sync::Arc::new(ServerFrame::Msg(Msg {
        id: id.to_string(),
        cid: None,
        chat: "broadcast".into(),
        from: crate::api_groups::SYSTEM_SENDER.into(),
        seq: 0,
        kind: b.kind,
        body: b.body,
        ts,
    }));
    let terminals = shard.broadcast(frame).await?;
    Ok(json(200, &BroadcastResult { id: id.to_string(), terminals }))
}

fn token(shard: &Rc<Shard>, req: &Request) -> Result<Response, EngineError> {
    let t: TokenRequest = api::parse_request(&req.body)?;
    check_id("user", &t.user)?;
    if let Some(d) = &t.device {
        check_id("device", d)?;
    }
    let ttl = t.ttl_s.map_or(TOKEN_TTL_DEFAULT, Duration::from_secs);
    let (token, expires_at) = shard.keys.mint(&t.user, ttl, t.device.as_deref()).map_err(|e| match e {
        crate::auth::AuthError::BadTtl => ApiError::new(ErrorCode::InvalidBody, format!("ttl_s: {e}")),
        other => ApiError::new(ErrorCode::InvalidBody, format!("user: {other}")),
    })?;
    Ok(json(200, &TokenResponse { token, expires_at }))
}

async fn presence(shard: &Rc<Shard>, uid: &str) -> Result<Response, EngineError> {
    check_id("uid", uid)?;
    let terminals = shard.presence(uid).await?;
    Ok(json(200, &Presence { online: !terminals.is_empty(), terminals }))
}

async fn kick(shard: &Rc<Shard>, uid: &str, req: &Request) -> Result<Response, EngineError> {
    check_id("uid", uid)?;
    let k: Kick =
        if req.body.iter().all(u8::is_ascii_whitespace) { Kick::default() } else { api::parse_request(&req.body)? };
    if let Some(d) = &k.device {
        check_id("device", d)?;
    }
    let reason = k.reason.as_deref().unwrap_or("kicked");
    if reason.len() > 256 {
        return Err(ApiError::new(ErrorCode::InvalidBody, "reason: at most 256 bytes").into());
    }
    // Revoked first: a kicked terminal coming straight back finds its token refused.
    let revoked_before_ms = match k.revoke {
        true => Some(shard.revoke_tokens(uid, k.device.as_deref()).await?),
        false => None,
    };
    let kicked = shard.kick(uid, k.device.as_deref(), reason).await?;
    Ok(json(200, &Kicked { kicked, revoked_before_ms }))
}

/// Largest `limit` of a history page.
pub const HISTORY_LIMIT_MAX: usize = 1000;
/// `limit` of a history page when none is given.
pub const HISTORY_LIMIT_DEFAULT: usize = 50;

/// Refuses a query naming a parameter the route does not take, or one parameter twice: a
/// typo (`befor_seq`) would otherwise answer the first page again, forever, to a client paging
/// through history, and a repeated cursor would be resolved by picking one.
pub(crate) fn check_query(req: &Request, known: &[&str]) -> Result<(), EngineError> {
    let mut seen: Vec<std::borrow::Cow<'_, str>> = Vec::new();
    for (name, _) in req.query_pairs() {
        if !known.contains(&name.as_ref()) {
            return Err(ApiError::new(
                ErrorCode::InvalidBody,
                format!("query.{name}: unknown parameter; expected one of {}", known.join(", ")),
            )
            .into());
        }
        if seen.contains(&name) {
            return Err(ApiError::new(ErrorCode::InvalidBody, format!("query.{name}: given more than once")).into());
        }
        seen.push(name);
    }
    Ok(())
}

pub(crate) fn query_u64(req: &Request, name: &str) -> Result<Option<u64>, EngineError> {
    match req.query_param(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::new(ErrorCode::InvalidBody, format!("query.{name}: expected a non-negative integer, got {v:?}"))
                .into()
        }),
    }
}

/// `GET /v1/users/{uid}/messages?chat=&before_seq=&after_seq=&limit=`
async fn history(shard: &Rc<Shard>, uid: &str, req: &Request) -> Result<Response, EngineError> {
    check_id("uid", uid)?;
    check_query(req, &["chat", "before_seq", "after_seq", "limit"])?;
    let chat = req.query_param("chat");
    if let Some(c) = &chat {
        if ether_proto::ids::Chat::parse(c).is_none() {
            return Err(ApiError::new(
                ErrorCode::InvalidBody,
                format!("query.chat: {c:?} is not u:<user> or g:<group>"),
            )
            .into());
        }
    }
    let limit = history_limit(req)?;
    let q = ether_store::op::HistoryQuery {
        user: uid.to_owned(),
        chat,
        before_seq: query_u64(req, "before_seq")?,
        after_seq: query_u64(req, "after_seq")?,
        limit,
    };
    let page = shard.store.call(ether_store::op::Op::History(q)).await?.page()?;
    Ok(crate::api_groups::page_json(&page))
}

/// `limit` of a history query: 1 to `HISTORY_LIMIT_MAX`, `HISTORY_LIMIT_DEFAULT` when absent.
pub(crate) fn history_limit(req: &Request) -> Result<usize, EngineError> {
    let limit = query_u64(req, "limit")?.map_or(HISTORY_LIMIT_DEFAULT, |l| l as usize);
    if limit == 0 || limit > HISTORY_LIMIT_MAX {
        return Err(ApiError::new(ErrorCode::InvalidBody, format!("query.limit: 1-{HISTORY_LIMIT_MAX}")).into());
    }
    Ok(limit)
}

/// `GET /v1/users/{uid}/unread`
async fn unread(shard: &Rc<Shard>, uid: &str) -> Result<Response, EngineError> {
    check_id("uid", uid)?;
    let chats = shard.store.call(ether_store::op::Op::Unread { user: uid.to_owned() }).await?.unread()?;
    Ok(json(200, &serde_json::json!({ "chats": chats })))
}
