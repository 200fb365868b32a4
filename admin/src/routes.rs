//! The admin port's routes ([`handle`]): auth, routing, method checks, and the encoding of
//! view data into JSON, Prometheus text or embedded assets. Thin on purpose: every number
//! comes from the [`NodeView`]; no state is kept here and no engine type is touched.
//!
//! | method | path | auth | answer |
//! |---|---|---|---|
//! | GET | `/healthz` | open | `{"status":"ok"}` |
//! | GET | `/readyz` | open | `{"status":"ready"}`, or 503 `{"status":"not_ready","reason"}` |
//! | GET | `/metrics` | open | Prometheus text 0.0.4 |
//! | GET | `/`, `/assets/*` | open | the dashboard (the page itself asks for the token) |
//! | GET | `/admin/v1/stats` | bearer | [`StatsReport`] |
//! | GET | `/admin/v1/connections` | bearer | [`ConnectionsReport`] ([`ConnQuery`] parameters) |
//! | GET | `/admin/v1/users/{uid}` | bearer | [`UserReport`] |
//! | POST | `/admin/v1/users/{uid}/kick` | bearer | body `{device?, reason?, revoke?}` → [`KickReport`] |
//! | POST | `/admin/v1/drain` | bearer | [`DrainReport`] |
//! | GET | `/admin/v1/config` | bearer | effective config, secrets redacted |
//!
//! `HEAD` is accepted wherever `GET` is. Errors use the public envelope
//! `{"error":{"code","message"}}`: 401 `unauthorized` (checked before routing, so unknown
//! `/admin/` paths do not leak), 404 `not_found`, 405 `method_not_allowed` (with `Allow`),
//! 400 `invalid_body`/`invalid_json` for bad queries and bodies.

use std::rc::Rc;

use ether_http::request::{Method, Request};
use ether_http::response::Response;
use ether_proto::api::Kick;
use ether_proto::ids::is_valid_id;
use ether_proto::{ApiError, ErrorCode};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::dashboard::{self, Asset};
use crate::view::{redact_secrets, ConnQuery, ConnectionsReport, KickReport, StatsReport, UserReport};
use crate::{prometheus, NodeView};

/// Longest kick reason accepted, in bytes.
const KICK_REASON_BYTES_MAX: usize = 256;
/// The reason sent to kicked terminals when the request names none.
pub const KICK_REASON_DEFAULT: &str = "kicked by an operator";

/// Every route of the admin port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Dashboard,
    Asset(&'static Asset),
    Favicon,
    Stats,
    Connections,
    Config,
    User(String),
    Kick(String),
    Drain,
}

impl Route {
    /// The route at `path`; `None` for 404.
    fn resolve(path: &str) -> Option<Route> {
        Some(match path {
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            "/" | "/index.html" => Route::Dashboard,
            "/favicon.ico" => Route::Favicon,
            "/admin/v1/stats" => Route::Stats,
            "/admin/v1/connections" => Route::Connections,
            "/admin/v1/config" => Route::Config,
            "/admin/v1/drain" => Route::Drain,
            p if p.starts_with("/assets/") => Route::Asset(dashboard::asset(p)?),
            p => {
                let rest = p.strip_prefix("/admin/v1/users/")?;
                match rest.split('/').collect::<Vec<_>>().as_slice() {
                    [uid] if !uid.is_empty() => Route::User((*uid).to_owned()),
                    [uid, "kick"] if !uid.is_empty() => Route::Kick((*uid).to_owned()),
                    _ => return None,
                }
            }
        })
    }

    /// Whether the route reads (`GET`/`HEAD`) rather than acts (`POST`).
    fn is_read(&self) -> bool {
        !matches!(self, Route::Kick(_) | Route::Drain)
    }
}

/// Answers one admin-port request.
pub async fn handle<V: NodeView>(view: Rc<V>, req: Request) -> Response {
    match route(&*view, &req).await {
        Ok(resp) => resp,
        Err(e) => error(&e),
    }
}

async fn route<V: NodeView>(view: &V, req: &Request) -> Result<Response, ApiError> {
    let protected = req.path == "/admin" || req.path.starts_with("/admin/");
    if protected && !authorized(view, req) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong admin token: send Authorization: Bearer <admin_token>",
        ));
    }
    let Some(route) = Route::resolve(&req.path) else {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no route {} {}", req.method, req.path)));
    };
    let method_ok = match req.method {
        Method::Get | Method::Head => route.is_read(),
        Method::Post => !route.is_read(),
        _ => false,
    };
    if !method_ok {
        let allow = if route.is_read() { "GET, HEAD" } else { "POST" };
        let e = ApiError::new(ErrorCode::MethodNotAllowed, format!("{} {}: use {allow}", req.method, req.path));
        return Ok(error(&e).with_header("Allow", allow));
    }
    match route {
        Route::Healthz => Ok(Response::json(200, br#"{"status":"ok"}"#.to_vec())),
        Route::Readyz => Ok(match view.readiness() {
            Ok(()) => Response::json(200, br#"{"status":"ready"}"#.to_vec()),
            Err(why) => json(503, &serde_json::json!({"status": "not_ready", "reason": why})),
        }),
        Route::Metrics => {
            let stats = view.stats().await?;
            let mut resp = Response::text(200, &prometheus::render(&stats));
            resp.content_type = prometheus::CONTENT_TYPE;
            Ok(resp)
        }
        Route::Dashboard => Ok(serve_asset(&dashboard::INDEX)
            .with_header("Content-Security-Policy", dashboard::CSP)
            .with_header("X-Frame-Options", "DENY")
            .with_header("Referrer-Policy", "no-referrer")),
        Route::Asset(asset) => Ok(serve_asset(asset)),
        Route::Favicon => Ok(Response::empty(204)),
        Route::Stats => {
            let stats = view.stats().await?;
            Ok(private(json(200, &StatsReport::from(stats))))
        }
        Route::Connections => {
            let query = ConnQuery::from_request(req)?;
            let page = view.connections(&query).await?;
            let recent_closes = if query.closed == 0 {
                Vec::new()
            } else if query.user.is_some() || query.shard.is_some() || query.platform.is_some() {
                // With filters, the matches anywhere in the ring (not only among its newest).
                view.recent_closes_matching(&query, query.closed).await?
            } else {
                view.recent_closes(query.closed).await?
            };
            let report = ConnectionsReport {
                total: page.total,
                offset: query.offset,
                limit: query.limit,
                sort: query.sort,
                order: query.order,
                connections: page.items,
                recent_closes,
            };
            Ok(private(json(200, &report)))
        }
        Route::User(uid) => {
            check_uid(&uid)?;
            let connections = view.user(&uid).await?;
            let report = UserReport { online: !connections.is_empty(), user: uid, connections };
            Ok(private(json(200, &report)))
        }
        Route::Kick(uid) => {
            check_uid(&uid)?;
            let kick = parse_kick(&req.body)?;
            let reason = kick.reason.as_deref().unwrap_or(KICK_REASON_DEFAULT);
            // Revoked first: a kicked terminal coming straight back finds its token refused.
            let revoked_before_ms = match kick.revoke {
                true => Some(view.revoke_tokens(&uid, kick.device.as_deref()).await?),
                false => None,
            };
            let kicked = view.kick(&uid, kick.device.as_deref(), reason).await?;
            Ok(private(json(200, &KickReport { kicked, revoked_before_ms })))
        }
        Route::Drain => {
            let report = view.drain().await?;
            Ok(private(json(200, &report)))
        }
        Route::Config => {
            let mut config = view.config_redacted()?;
            redact_secrets(&mut config);
            Ok(private(json(200, &config)))
        }
    }
}

/// Constant-time comparison of the bearer token with the admin token. An empty admin token
/// locks `/admin/` entirely rather than opening it.
fn authorized<V: NodeView>(view: &V, req: &Request) -> bool {
    let expected = view.admin_token().as_bytes();
    match req.bearer_token() {
        Some(token) if !expected.is_empty() => bool::from(token.as_bytes().ct_eq(expected)),
        _ => false,
    }
}

fn check_uid(uid: &str) -> Result<(), ApiError> {
    if is_valid_id(uid) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::InvalidBody, "path.uid: must be 1-128 characters of [A-Za-z0-9_.@:-]"))
    }
}

/// The kick body: empty, or `{device?, reason?}`.
fn parse_kick(body: &[u8]) -> Result<Kick, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Kick::default());
    }
    let kick: Kick = serde_json::from_slice(body).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidBody,
            _ => ErrorCode::InvalidJson,
        };
        ApiError::new(code, format!("body: {e}"))
    })?;
    if let Some(device) = &kick.device {
        if !is_valid_id(device) {
            return Err(ApiError::new(
                ErrorCode::InvalidBody,
                "body.device: must be 1-128 characters of [A-Za-z0-9_.@:-]",
            ));
        }
    }
    if let Some(reason) = &kick.reason {
        if reason.len() > KICK_REASON_BYTES_MAX {
            return Err(ApiError::new(
                ErrorCode::InvalidBody,
                format!("body.reason: longer than {KICK_REASON_BYTES_MAX} bytes"),
            ));
        }
    }
    Ok(kick)
}

fn serve_asset(asset: &Asset) -> Response {
    let mut resp = Response::text(200, asset.body);
    resp.content_type = asset.content_type;
    resp.with_header("Cache-Control", "no-cache").with_header("X-Content-Type-Options", "nosniff")
}

fn json(status: u16, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::json(status, body),
        Err(e) => error(&ApiError::new(ErrorCode::Internal, format!("encoding the answer: {e}"))),
    }
}

/// Admin answers carry user data: never cached.
fn private(resp: Response) -> Response {
    resp.with_header("Cache-Control", "no-store")
}

fn error(e: &ApiError) -> Response {
    let resp = Response::json(e.code.http_status(), e.to_json());
    if e.code == ErrorCode::Unauthorized {
        resp.with_header("WWW-Authenticate", "Bearer realm=\"ether-admin\"")
    } else {
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve() {
        assert_eq!(Route::resolve("/"), Some(Route::Dashboard));
        assert_eq!(Route::resolve("/admin/v1/users/bob"), Some(Route::User("bob".into())));
        assert_eq!(Route::resolve("/admin/v1/users/bob/kick"), Some(Route::Kick("bob".into())));
        for p in [
            "/admin/v1/users/",
            "/admin/v1/users//kick",
            "/admin/v1/users/bob/kick/x",
            "/admin/v1/users/bob/nope",
            "/assets/missing.js",
            "/admin/v2/stats",
        ] {
            assert_eq!(Route::resolve(p), None, "{p}");
        }
        assert!(matches!(Route::resolve("/assets/app.js"), Some(Route::Asset(_))));
    }

    #[test]
    fn kick_bodies() {
        assert_eq!(parse_kick(b"").unwrap(), Kick::default());
        assert_eq!(parse_kick(b" \n").unwrap(), Kick::default());
        let k = parse_kick(br#"{"device":"web-1","reason":"bye"}"#).unwrap();
        assert_eq!(k.device.as_deref(), Some("web-1"));
        assert_eq!(parse_kick(b"{").unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(parse_kick(br#"{"devise":"x"}"#).unwrap_err().code, ErrorCode::InvalidBody);
        assert_eq!(parse_kick(br#"{"device":"a b"}"#).unwrap_err().code, ErrorCode::InvalidBody);
        let long = format!(r#"{{"reason":"{}"}}"#, "x".repeat(300));
        assert_eq!(parse_kick(long.as_bytes()).unwrap_err().code, ErrorCode::InvalidBody);
    }
}
