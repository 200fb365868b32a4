//! Revoked terminal tokens: the node's copy of which users' (or users' devices') tokens issued
//! before a time are refused at the upgrade. Owns that in-memory copy only: it is loaded from
//! the store when the node starts (in cluster mode once the bus reader's start is taken, so
//! a revocation made meanwhile is in the load or on the bus after that start), raised by the
//! API's `kick` with `revoke` (after the store has it) and, in cluster mode, by other nodes'
//! revocations arriving on the bus (and reloaded from the store after bus entries may have
//! been lost). Never touches the store, connections or shard state itself.
//!
//! A token's issue time is its `iat_ms` claim (tokens this node mints carry it), else its
//! `iat` in seconds taken as the start of that second, else 0: a token without `iat` is
//! refused once its user has any revocation. A revocation made at time `t` refuses tokens
//! issued at or before `t` (so a seconds-only token minted in the same second as the
//! revocation is refused too: mint the new one a second later, or through `POST /v1/tokens`).
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use ether_store::Revocation;

/// The revocations of one user.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct UserRevocations {
    /// Tokens issued before this (Unix ms) are refused on every device (0: none).
    all_before_ms: u64,
    /// Per device: tokens issued before the time are refused on that device.
    devices: Vec<(Box<str>, u64)>,
}

impl UserRevocations {
    fn before_ms(&self, device: &str) -> u64 {
        let on_device = self.devices.iter().find(|(d, _)| &**d == device).map_or(0, |(_, t)| *t);
        self.all_before_ms.max(on_device)
    }

    fn raise(&mut self, device: Option<&str>, before_ms: u64) {
        match device {
            None => self.all_before_ms = self.all_before_ms.max(before_ms),
            Some(d) => match self.devices.iter_mut().find(|(have, _)| &**have == d) {
                Some((_, t)) => *t = (*t).max(before_ms),
                None => self.devices.push((d.into(), before_ms)),
            },
        }
    }
}

/// The node's revoked tokens, shared by every shard (read at each upgrade, written rarely).
#[derive(Debug, Default)]
pub struct TokenRevocations {
    /// Whether any revocation is known: upgrades skip the lock while there is none.
    any: AtomicBool,
    by_user: RwLock<HashMap<Box<str>, UserRevocations>>,
}

impl TokenRevocations {
    /// The node's copy, starting from what the store lists.
    pub fn new(list: Vec<Revocation>) -> Self {
        let r = TokenRevocations::default();
        r.merge(list);
        r
    }

    /// Raises one revocation (never lowers it: a late or repeated notice changes nothing).
    pub fn note(&self, user: &str, device: Option<&str>, before_ms: u64) {
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(user) {
            Some(u) => u.raise(device, before_ms),
            None => {
                let mut u = UserRevocations::default();
                u.raise(device, before_ms);
                map.insert(user.into(), u);
            }
        }
        self.any.store(true, Ordering::Release);
    }

    /// Raises every revocation of `list` (the store's, read again after bus entries may have
    /// been lost).
    pub fn merge(&self, list: Vec<Revocation>) {
        for r in list {
            self.note(&r.user, r.device.as_deref(), r.before_ms);
        }
    }

    /// Whether a token of `user` issued at `issued_ms` is refused on `device`.
    pub fn refuses(&self, user: &str, device: &str, issued_ms: u64) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let map = self.by_user.read().unwrap_or_else(|e| e.into_inner());
        map.get(user).is_some_and(|u| issued_ms < u.before_ms(device))
    }

    /// How many users have a revocation (the admin's stats).
    pub fn users(&self) -> usize {
        self.by_user.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(user: &str, device: Option<&str>, before_ms: u64) -> Revocation {
        Revocation { user: user.into(), device: device.map(str::to_owned), before_ms }
    }

    #[test]
    fn refuses_tokens_issued_before_only() {
        let r = TokenRevocations::new(vec![rev("alice", None, 1_000)]);
        assert!(r.refuses("alice", "phone", 999));
        assert!(!r.refuses("alice", "phone", 1_000));
        assert!(!r.refuses("bob", "phone", 0), "other users untouched");
        assert!(!TokenRevocations::default().refuses("alice", "phone", 0));
    }

    #[test]
    fn per_device_and_every_device_combine() {
        let r = TokenRevocations::default();
        r.note("alice", Some("phone"), 5_000);
        assert!(r.refuses("alice", "phone", 4_999));
        assert!(!r.refuses("alice", "web", 0), "only the phone's tokens");
        r.note("alice", None, 2_000);
        assert!(r.refuses("alice", "web", 1_999));
        assert!(!r.refuses("alice", "web", 2_000));
        assert!(r.refuses("alice", "phone", 4_999), "the later of the two applies");
    }

    #[test]
    fn never_lowered() {
        let r = TokenRevocations::default();
        r.note("alice", None, 2_000);
        r.merge(vec![rev("alice", None, 1_000), rev("alice", Some("phone"), 10)]);
        assert!(r.refuses("alice", "web", 1_500));
        assert!(r.refuses("alice", "phone", 1_500));
        assert_eq!(r.users(), 1);
    }
}
