//! One node per data directory and per port: a second node on the same directory, or on a
//! port a node listens on, is refused at start with an error saying so (SO_REUSEPORT would
//! otherwise let it join the first node's ports and split its connections).
mod support;

use ether_engine::config::Config;
use ether_engine::node::{self, NodeError};
use support::*;

#[test]
fn a_second_node_on_the_same_data_directory_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestNode::in_dir(dir.path(), |_| {});
    match node::start(Config::test_min(dir.path().to_path_buf())) {
        Err(e @ NodeError::DataDirInUse { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
        }
        Err(e) => panic!("refused, but not for the data directory: {e}"),
        Ok(_) => panic!("a second node started on the first one's data directory"),
    }
    first.stop();
    let again = TestNode::in_dir(dir.path(), |_| {});
    again.gateway().request("GET", "/v1/users/x/presence", None).unwrap();
}

#[test]
fn a_node_on_a_port_another_node_listens_on_is_refused() {
    let first = TestNode::start();
    for (what, edit) in [
        ("client", Box::new(|c: &mut Config, p| c.listen.client = p) as Box<dyn Fn(&mut Config, _)>),
        ("api", Box::new(|c: &mut Config, p| c.listen.api = p)),
        ("admin", Box::new(|c: &mut Config, p| c.listen.admin = p)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::test_min(dir.path().to_path_buf());
        let taken = match what {
            "client" => first.ports.client,
            "api" => first.ports.api,
            _ => first.ports.admin,
        };
        edit(&mut config, taken);
        match node::start(config) {
            Err(NodeError::PortTaken { what: w, addr }) => assert_eq!((w, addr), (what, taken)),
            Err(e) => panic!("{what}: refused, but not for the port: {e}"),
            Ok(_) => panic!("{what}: a second node started on {taken}, taken by the first"),
        }
    }
    // The first node is untouched.
    first.gateway().request("GET", "/v1/users/x/presence", None).unwrap();
}
