//! Terminal tokens: JWT HS256 with `sub` and `exp`, keyed by the raw UTF-8 bytes of the node's
//! `jwt_secret`.
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// A minter that keeps the key prepared.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    ttl_s: u64,
}

impl Minter {
    pub fn new(secret: &str, ttl_s: u64) -> Minter {
        Minter { key: EncodingKey::from_secret(secret.as_bytes()), header: Header::default(), ttl_s }
    }

    /// A token for `user`, valid for the minter's ttl from now.
    pub fn mint(&self, user: &str) -> String {
        let exp = crate::unix_nanos() / 1_000_000_000 + self.ttl_s;
        // HS256 over plain data cannot fail.
        encode(&self.header, &Claims { sub: user, exp }, &self.key).unwrap_or_default()
    }
}

/// The `sub` of a token, without checking the signature (the wire-limit server's routing).
pub fn unverified_sub(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    #[derive(Deserialize)]
    struct Sub {
        sub: String,
    }
    serde_json::from_slice::<Sub>(&bytes).ok().map(|s| s.sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    #[test]
    fn minted_tokens_verify_with_the_secret() {
        let t = Minter::new("s3cret", 60).mint("u1");
        #[derive(Deserialize)]
        struct C {
            sub: String,
            exp: u64,
        }
        let c = decode::<C>(&t, &DecodingKey::from_secret(b"s3cret"), &Validation::default()).unwrap().claims;
        assert_eq!(c.sub, "u1");
        assert!(c.exp > crate::unix_nanos() / 1_000_000_000);
        assert_eq!(unverified_sub(&t).as_deref(), Some("u1"));
        assert!(decode::<C>(&t, &DecodingKey::from_secret(b"x"), &Validation::default()).is_err());
    }
}
