//! The admin port of an Ether-IM node (API.md section 5), sans-IO: requests in, responses out.
//!
//! Layout:
//! - [`NodeView`]: the narrow interface the engine implements for this crate (health, readiness,
//!   the admin token). The admin side never reaches into engine internals, and the engine
//!   depends on this crate, not the other way round.
//! - [`handle`]: routing and bearer auth for everything under `/admin/`.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::rc::Rc;

use ether_http::request::{Method, Request};
use ether_http::response::Response;
use ether_proto::{ApiError, ErrorCode};
use subtle::ConstantTimeEq;

/// What the admin port may ask of the engine.
pub trait NodeView {
    /// The bearer token that guards `/admin/`.
    fn admin_token(&self) -> &str;
    /// `Ok` when the node takes traffic; otherwise why not (store down, draining…).
    fn readiness(&self) -> Result<(), String>;
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    let e = ApiError::new(code, message);
    Response::json(e.code.http_status(), e.to_json())
}

/// Answers one admin-port request.
pub async fn handle<V: NodeView>(view: Rc<V>, req: Request) -> Response {
    match (&req.method, req.path.as_str()) {
        (Method::Get | Method::Head, "/healthz") => {
            Response::json(200, br#"{"status":"ok"}"#.to_vec())
        }
        (Method::Get | Method::Head, "/readyz") => match view.readiness() {
            Ok(()) => Response::json(200, br#"{"status":"ready"}"#.to_vec()),
            Err(why) => Response::json(
                503,
                serde_json::json!({"status": "not_ready", "reason": why})
                    .to_string()
                    .into_bytes(),
            ),
        },
        (_, p) if p.starts_with("/admin/") => {
            let ok = req
                .bearer_token()
                .is_some_and(|t| bool::from(t.as_bytes().ct_eq(view.admin_token().as_bytes())));
            if !ok {
                return error(
                    ErrorCode::Unauthorized,
                    "missing or wrong admin token: send Authorization: Bearer <admin_token>",
                );
            }
            error(
                ErrorCode::NotFound,
                format!("no admin route {} {}", req.method, req.path),
            )
        }
        (_, "/healthz" | "/readyz") => error(ErrorCode::MethodNotAllowed, "use GET"),
        _ => error(
            ErrorCode::NotFound,
            format!("no route {} {}", req.method, req.path),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct View(Result<(), String>);
    impl NodeView for View {
        fn admin_token(&self) -> &str {
            "secret-token"
        }
        fn readiness(&self) -> Result<(), String> {
            self.0.clone()
        }
    }

    fn run(view: View, req: Request) -> Response {
        futures_lite::future::block_on(handle(Rc::new(view), req))
    }

    #[test]
    fn health_and_readiness() {
        let r = run(View(Ok(())), Request::new(Method::Get, "/healthz").unwrap());
        assert_eq!(r.status, 200);
        let r = run(
            View(Err("draining".into())),
            Request::new(Method::Get, "/readyz").unwrap(),
        );
        assert_eq!(r.status, 503);
        assert!(String::from_utf8_lossy(&r.body).contains("draining"));
    }

    #[test]
    fn admin_routes_need_the_token() {
        let r = run(
            View(Ok(())),
            Request::new(Method::Get, "/admin/v1/stats").unwrap(),
        );
        assert_eq!(r.status, 401);
        let req = Request::new(Method::Get, "/admin/v1/stats")
            .unwrap()
            .with_header("authorization", "Bearer wrong");
        assert_eq!(run(View(Ok(())), req).status, 401);
        let req = Request::new(Method::Get, "/admin/v1/nope")
            .unwrap()
            .with_header("authorization", "Bearer secret-token");
        assert_eq!(run(View(Ok(())), req).status, 404);
    }
}
