//! The live dashboard: `index.html`, `app.js` and `style.css`, embedded at compile time so
//! the node serves everything itself (no CDN, works offline). Owns the bytes and their
//! content types only; routing and auth are in `routes`, data comes from `/admin/v1/*`.
//!
//! The page asks for the admin token (or takes it from `/#token=...`), keeps it in
//! `sessionStorage`, and sends it as `Authorization: Bearer` on every fetch. It polls
//! `/admin/v1/stats` and `/admin/v1/connections?limit=20&closed=20` every second and draws
//! its charts with hand-written canvas code: connections over time, message and delivery
//! rates (from counter deltas), latency percentiles, load per shard, recent closes.

/// One embedded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Served at this path.
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// The page at `GET /`.
pub const INDEX: Asset =
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_str!("index.html") };

/// Everything under `/assets/`.
pub const ASSETS: [Asset; 2] = [
    Asset { path: "/assets/app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("app.js") },
    Asset { path: "/assets/style.css", content_type: "text/css; charset=utf-8", body: include_str!("style.css") },
];

/// The `Content-Security-Policy` of the page: only this origin, no inline script or style,
/// no framing. Holds because every asset is served by the node itself.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The embedded asset served at `path`, if any.
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_embedded_and_self_contained() {
        assert!(INDEX.body.contains("/assets/app.js"));
        assert!(INDEX.body.contains("/assets/style.css"));
        for a in ASSETS.iter().chain([&INDEX]) {
            assert!(!a.body.is_empty(), "{}", a.path);
            // Works offline: nothing is fetched from another origin.
            for external in ["http://", "https://", "//cdn", "@import"] {
                assert!(!a.body.contains(external), "{} references {external}", a.path);
            }
        }
        // No inline script or style (the CSP forbids them).
        assert!(!INDEX.body.contains("<script>"));
        assert!(!INDEX.body.contains("style="));
        assert!(!INDEX.body.contains("<style"));
        assert_eq!(asset("/assets/app.js").map(|a| a.path), Some("/assets/app.js"));
        assert!(asset("/assets/nope.js").is_none());
    }
}
