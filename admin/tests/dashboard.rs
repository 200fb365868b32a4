//! The dashboard in a real browser: headless Chromium loads `/#token=...` from the admin
//! routes served over the fake view, logs in from the fragment, polls for a few (virtual)
//! seconds, and we check the DOM holds the fake view's numbers; a screenshot is kept at
//! `admin/tests/artifacts/dashboard.png`. A wrong token must land on the login form.
//!
//! Needs Debian's `chromium` package (`apt-get install -y chromium`). Without it the test
//! prints "skipped: chromium not installed" and passes. `CHROMIUM=/path/to/chrome` picks
//! another binary.

mod common;

use common::{serve, FakeView, TOKEN};
use ether_admin::browser::{chromium, run_chromium};
use std::path::Path;

#[test]
fn dashboard_renders_live_numbers_in_headless_chromium() {
    let Some(bin) = chromium() else {
        println!("skipped: chromium not installed (apt-get install -y chromium)");
        return;
    };
    let view = FakeView::new();
    let addr = serve(view.clone());
    let url = format!("http://{addr}/#token={TOKEN}");

    // 1. The DOM after ~5 s of (virtual) time: logged in from the fragment, polled, rendered.
    let out = run_chromium(&bin, &url, &["--dump-dom".to_owned()], "dom");
    let dom = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(dom.contains("data-state=\"live\""), "the page never went live.\nDOM:\n{dom}\nstderr:\n{stderr}");
    assert!(
        dom.contains("id=\"kpi-connections\" class=\"value\">1,234</div>"),
        "connection count missing from the KPIs:\n{dom}"
    );
    // Half of each shard's connections are parked in the fake: 150 + 155 + 160 + 152.
    assert!(dom.contains("id=\"kpi-parked\" class=\"sub\">617 parked (idle)</div>"), "parked count missing:\n{dom}");
    for needle in [
        "node-test-1", // node id in the header
        ">alice<",     // live connections table
        ">phone<",
        ">carol<",                                                                // recent closes
        "slow_consumer",                                                          // close reasons
        ">300<",                                                                  // per-shard table
        "bus read 5,150 own + 12 shared, published 4,040 routed (2,020 appends)", // cluster line
        "id=\"login\" class=\"login\" hidden",
    ] {
        assert!(dom.contains(needle), "{needle} missing from the DOM:\n{dom}");
    }
    let polls: u32 =
        dom.split("data-polls=\"").nth(1).and_then(|s| s.split('"').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(polls >= 3, "the page should poll by itself every second; polled {polls} times");
    // Rates come from counter deltas between polls: with growing counters, not zero.
    let accepted =
        dom.split("id=\"kpi-accepted\" class=\"value\">").nth(1).and_then(|s| s.split('<').next()).unwrap_or("");
    assert!(accepted.parse::<f64>().is_ok_and(|r| r > 0.0), "accepted/s should be a positive rate, got {accepted:?}");
    // The fragment was taken out of the address bar (and the token with it).
    assert!(!dom.contains(TOKEN), "the token must not end up in the DOM");

    // 2. A screenshot, kept as a test artifact.
    let shot_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&shot_dir).expect("artifacts dir");
    let shot = shot_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = run_chromium(&bin, &url, &[format!("--screenshot={}", shot.display())], "shot");
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!("no screenshot at {} ({e}); stderr: {}", shot.display(), String::from_utf8_lossy(&out.stderr))
    });
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 20_000, "screenshot suspiciously small: {} bytes", png.len());
    println!("screenshot: {} ({} bytes)", shot.display(), png.len());
}

#[test]
fn wrong_token_lands_on_the_login_form() {
    let Some(bin) = chromium() else {
        println!("skipped: chromium not installed (apt-get install -y chromium)");
        return;
    };
    let addr = serve(FakeView::new());
    let url = format!("http://{addr}/#token=not-the-token");
    let out = run_chromium(&bin, &url, &["--dump-dom".to_owned()], "login");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-state=\"login\""), "{dom}");
    assert!(dom.contains("Wrong or expired token"), "{dom}");
    assert!(dom.contains("id=\"dash\" hidden"), "the dashboard stays hidden: {dom}");
}
