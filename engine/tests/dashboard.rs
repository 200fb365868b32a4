//! The dashboard served by a real node, in headless Chromium: it logs in with the node's admin
//! token, goes live and shows the node's actual connection count. A screenshot is kept at
//! `engine/tests/artifacts/dashboard-live.png`. Without Chromium installed the test says it
//! was skipped (`.ci/run` installs it).
mod support;

use std::path::Path;

use ether_admin::browser::{chromium, run_chromium};
use support::*;

#[test]
fn dashboard_shows_the_live_node() {
    let Some(bin) = chromium() else {
        println!("skipped: chromium not installed (apt-get install -y chromium)");
        return;
    };
    let hook = support::webhook::receiver(0);
    // The terminals send nothing while Chromium starts and polls (7 s and more on a slow
    // machine): a long idle timeout keeps them connected (the test config's is 3 s).
    let node = TestNode::with(|c| {
        c.events.webhook = Some(support::webhook::webhook(&hook));
        c.limits.idle_timeout = std::time::Duration::from_secs(60);
    });
    let terminals: Vec<_> = (0..3).map(|i| node.terminal(&format!("viewer{i}"), "phone")).collect();
    for i in 0..4 {
        node.gateway().send_message(&text("ops", "viewer0", &format!("hello {i}"))).unwrap();
    }
    let token = node.config.auth.admin_token.expose().to_owned();
    let url = format!("http://{}/#token={token}", node.ports.admin);
    let out = run_chromium(&bin, &url, &["--dump-dom".to_owned()], "engine-dom");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-state=\"live\""), "the page never went live:\n{dom}");
    assert!(dom.contains("id=\"kpi-connections\" class=\"value\">3</div>"), "live connection count missing:\n{dom}");
    assert!(dom.contains("viewer0"), "live connections table missing:\n{dom}");
    assert!(dom.contains(&format!("Webhook {}: delivering", hook.url)), "the webhook's state is missing:\n{dom}");
    assert!(!dom.contains(&token), "the token must not end up in the DOM");
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts/dashboard-live.png");
    run_chromium(&bin, &url, &[format!("--screenshot={}", shot.display())], "engine-shot");
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot");
    drop(terminals);
}
