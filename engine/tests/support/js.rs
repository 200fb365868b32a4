//! Running the JS SDK's scripted-node checks (`sdk/js/test/*.mjs`) with Node.js: finding a
//! `node` with the WebSocket API, and reading the one JSON verdict line a script prints.
use std::path::Path;
use std::process::Command;

/// `node` when it is installed and has the WebSocket API (20 with `--experimental-websocket`,
/// or newer).
pub fn node_with_websocket() -> Option<&'static str> {
    let out = Command::new("node")
        .args(["--experimental-websocket", "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"])
        .output()
        .ok()?;
    out.status.success().then_some("node")
}

/// Runs `sdk/js/test/<script>` with `args` and asserts its verdict is `{"ok": true, ...}` and it
/// exited cleanly; without `node` it prints "skipped" and returns.
pub fn assert_script_passes(script: &str, args: &[&str]) {
    let Some(node_bin) = node_with_websocket() else {
        println!("skipped: node not installed (or without WebSocket)");
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/js/test").join(script);
    let out = Command::new(node_bin)
        .arg("--experimental-websocket")
        .arg("--no-warnings")
        .arg(&path)
        .args(args)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict = stdout.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| {
        panic!(
            "no verdict from {script} {args:?} ({:?}); stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: serde_json::Value = serde_json::from_str(verdict).expect("JSON verdict");
    assert_eq!(v["ok"], true, "JS SDK script {script} {args:?} failed: {v:#}");
    assert!(out.status.success(), "{:?}", out.status);
}
