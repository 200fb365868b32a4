//! A stopped node leaves no parking watcher thread behind (alone in its test binary, so no
//! other node's threads are counted).
mod support;

use std::time::{Duration, Instant};

use support::*;

/// This process's threads whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[test]
fn a_stopped_node_leaves_no_watcher_thread() {
    let node = TestNode::start();
    let mut t = node.terminal("tao", "phone");
    t.ping().unwrap();
    assert!(t.recv(WAIT).unwrap().is_some());
    assert_eq!(threads_named("ether-park-"), 2, "one watcher per shard");
    node.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads_named("ether-park-") > 0 {
        assert!(Instant::now() < deadline, "watcher threads still running after the node stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
}
