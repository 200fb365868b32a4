//! Failure is honest: when the disk fills up, sends answer `unavailable` (503) or an `error`
//! frame, never 200 for a message that was not stored; the node keeps serving and everything
//! answered 200 is still there. Needs root to mount a tiny tmpfs; says "skipped" otherwise.
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ether_proto::frame::ServerFrame;
use ether_proto::{ClientFrame, ErrorCode, Kind};
use support::*;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(format!("ether-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_is_unavailable_not_a_lie() {
    let Some(fs) = Tmpfs::mount("3m") else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let node = TestNode::in_dir(fs.path(), |c| {
        c.limits.frame_bytes_max = 64 * 1024;
        c.limits.outbound_queue_bytes_max = 1024 * 1024;
    });
    let gw = node.gateway();
    let big = "x".repeat(15 * 1024);
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..2000 {
        match gw.send_message(&text("fil", "dora", &format!("{i}:{big}"))) {
            Ok(sent) => stored.push(sent.id),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("the disk never filled up");
    assert_eq!((refused.status(), refused.code()), (Some(503), Some(ErrorCode::Unavailable)), "{refused}");
    assert!(!stored.is_empty());
    // Still serving: health, presence, tokens; not ready while writes fail (a load balancer
    // sends new traffic elsewhere), and saying why.
    assert_eq!(node.admin().request("GET", "/healthz", None).unwrap().status, 200);
    let ready = node.admin().request("GET", "/readyz", None).unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("store failed a command"), "{}", ready.text());
    assert!(!gw.presence("dora").unwrap().online);
    // A terminal's send gets an error frame, not `sent`.
    let mut t = node.terminal("fil", "phone");
    t.send_frame(&ClientFrame::Send {
        cid: "c".into(),
        to: Some("dora".into()),
        group: None,
        kind: Kind::Text,
        body: serde_json::json!({"text": big}),
    })
    .unwrap();
    loop {
        match t.recv(WAIT).unwrap() {
            Some(ServerFrame::Error { code, reference, .. }) => {
                assert_eq!((code, reference.as_deref()), (ErrorCode::Unavailable, Some("c")));
                break;
            }
            Some(ServerFrame::Msg(_)) => continue, // own copies of earlier messages are not pushed here
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
    // Everything answered 200 is stored, in order.
    let mut dora = node.terminal("dora", "phone");
    let (msgs, _) = sync_all(&mut dora, 0);
    let ids: Vec<String> = msgs.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, stored);
    drop(t);
    drop(dora);
    node.stop();
    std::thread::sleep(Duration::from_millis(50));
}
