//! The engine's side of the admin port: implements `ether_admin::NodeView` over a shard.
//! Reads only; never changes shard state except through the shard's own methods.
use std::rc::Rc;

use crate::shard::Shard;

/// A view of the node for the admin crate, served from the shard that owns the admin port.
pub struct AdminView {
    shard: Rc<Shard>,
}

impl AdminView {
    pub fn new(shard: Rc<Shard>) -> Self {
        AdminView { shard }
    }
}

impl ether_admin::NodeView for AdminView {
    fn admin_token(&self) -> &str {
        &self.shard.config.auth.admin_token
    }

    fn readiness(&self) -> Result<(), String> {
        if self.shard.node.stopping() {
            return Err("node is stopping".into());
        }
        if self.shard.node.draining() {
            return Err("node is draining".into());
        }
        Ok(())
    }
}
