//! Terminal tokens: HS256 JWTs with `sub` (user id) and `exp`, minted and verified with the
//! node's `auth.jwt_secret`. Owns the keys; knows nothing of connections.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::api_groups::SYSTEM_SENDER;

/// Longest token lifetime `mint` accepts.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// The claims of a terminal token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default)]
    pub iat: u64,
    /// Issued at, Unix ms (tokens this node mints; compared with revocations, see
    /// `revocations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_ms: Option<u64>,
    /// When set, the token is only good for this device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl Claims {
    /// When the token was issued, Unix ms: `iat_ms`, else the start of the `iat` second, else
    /// 0 (see `revocations`).
    pub fn issued_ms(&self) -> u64 {
        self.iat_ms.unwrap_or(self.iat.saturating_mul(1000))
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass ?token= or Authorization: Bearer")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (its nbf is in the future)")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject is not a valid user id")]
    BadSubject,
    #[error("user id {0:?} is reserved for the business's system messages")]
    ReservedSubject(&'static str),
    #[error("ttl must be 1 s to {} s", TOKEN_TTL_MAX.as_secs())]
    BadTtl,
}

/// Signs and checks terminal tokens.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(***)")
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TokenKeys {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        // A token is not good before its `nbf` (RFC 7519 §4.1.5) when it has one: tokens the
        // business's identity service issues ahead of time (jsonwebtoken skips the check
        // unless asked).
        validation.validate_nbf = true;
        // Tokens minted by the business's own identity service often carry an `aud` (string
        // or list): the node has no audience of its own, so it neither requires nor checks
        // one (jsonwebtoken would refuse every token with an `aud` otherwise).
        validation.validate_aud = false;
        TokenKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// A token for `user`, good for `ttl`; returns it with its expiry (Unix seconds).
    pub fn mint(&self, user: &str, ttl: Duration, device: Option<&str>) -> Result<(String, u64), AuthError> {
        if !ether_proto::ids::is_valid_id(user) {
            return Err(AuthError::BadSubject);
        }
        if user == SYSTEM_SENDER {
            return Err(AuthError::ReservedSubject(SYSTEM_SENDER));
        }
        if ttl.is_zero() || ttl > TOKEN_TTL_MAX {
            return Err(AuthError::BadTtl);
        }
        let now_ms = crate::message::unix_now_ms();
        let now = now_ms / 1000;
        let claims = Claims {
            sub: user.to_owned(),
            // The first whole second at or after now + ttl: a token is good for at least its
            // ttl (`ttl.as_secs()` made a sub-second ttl expire as it was made).
            exp: (u128::from(now_ms) + ttl.as_millis()).div_ceil(1000).try_into().unwrap_or(u64::MAX),
            iat: now,
            iat_ms: Some(now_ms),
            device: device.map(str::to_owned),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok((token, claims.exp))
    }

    /// Checks signature, algorithm, expiry and subject.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        if !ether_proto::ids::is_valid_id(&data.claims.sub) {
            return Err(AuthError::BadSubject);
        }
        // The sender of group posts and broadcasts the business makes without a `from`: no
        // terminal may speak as it.
        if data.claims.sub == SYSTEM_SENDER {
            return Err(AuthError::ReservedSubject(SYSTEM_SENDER));
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_and_verify() {
        let keys = TokenKeys::new("0123456789abcdef0123456789abcdef");
        let (t, exp) = keys.mint("alice", Duration::from_secs(60), Some("phone")).unwrap();
        let c = keys.verify(&t).unwrap();
        assert_eq!((c.sub.as_str(), c.exp, c.device.as_deref()), ("alice", exp, Some("phone")));
        // A sub-second ttl still lasts at least that long: exp is rounded up, never down.
        let before_ms = crate::message::unix_now_ms();
        let (_, exp) = keys.mint("alice", Duration::from_millis(500), None).unwrap();
        assert!(exp * 1000 >= before_ms + 500, "exp {exp} s is before now + 500 ms ({before_ms} ms)");
    }

    #[test]
    fn refuses_bad_tokens() {
        let keys = TokenKeys::new("0123456789abcdef0123456789abcdef");
        let other = TokenKeys::new("another-secret-another-secret-xx");
        let (t, _) = other.mint("alice", Duration::from_secs(60), None).unwrap();
        assert!(matches!(keys.verify(&t), Err(AuthError::Invalid(_))));
        assert!(matches!(keys.verify("garbage"), Err(AuthError::Invalid(_))));
        let expired = Claims { sub: "a".into(), exp: unix_now_s() - 3600, iat: 0, iat_ms: None, device: None };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&t), Err(AuthError::Expired));
        let bad_sub = Claims { sub: "a b".into(), exp: unix_now_s() + 60, iat: 0, iat_ms: None, device: None };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &bad_sub, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&t), Err(AuthError::BadSubject));
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &bad_sub, &keys.encoding).unwrap();
        assert!(matches!(keys.verify(&hs512), Err(AuthError::Invalid(_))));
        assert_eq!(keys.mint("x", Duration::ZERO, None), Err(AuthError::BadTtl));
    }

    /// Claims the node does not use (`aud` as a string or a list, `iss`, `jti`, custom ones)
    /// do not make a token invalid.
    #[test]
    fn accepts_claims_it_does_not_use() {
        let keys = TokenKeys::new("0123456789abcdef0123456789abcdef");
        for aud in [serde_json::json!("my-app"), serde_json::json!(["my-app", "admin"])] {
            let claims = serde_json::json!({
                "sub": "alice", "exp": unix_now_s() + 60, "aud": aud, "iss": "https://id.example.com",
                "jti": "x1", "roles": ["user"],
            });
            let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding).unwrap();
            assert_eq!(keys.verify(&t).map(|c| c.sub), Ok("alice".to_owned()), "aud {aud}");
        }
        let system = serde_json::json!({ "sub": "system", "exp": unix_now_s() + 60 });
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &system, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&t), Err(AuthError::ReservedSubject("system")), "no terminal speaks as the system");
        assert_eq!(keys.mint("system", Duration::from_secs(60), None), Err(AuthError::ReservedSubject("system")));
        let no_exp = serde_json::json!({ "sub": "alice", "aud": "my-app" });
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_exp, &keys.encoding).unwrap();
        assert!(matches!(keys.verify(&t), Err(AuthError::Invalid(_))), "exp is still required");
    }

    /// A token with an `nbf` (not before) is refused until then (RFC 7519 §4.1.5), beyond the
    /// leeway; one whose `nbf` is past is good.
    #[test]
    fn refuses_tokens_before_their_nbf() {
        let keys = TokenKeys::new("0123456789abcdef0123456789abcdef");
        let (now, exp) = (unix_now_s(), unix_now_s() + 7200);
        let early = serde_json::json!({ "sub": "alice", "exp": exp, "nbf": now + 3600 });
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &early, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&t), Err(AuthError::NotYetValid), "not good before its nbf");
        let started = serde_json::json!({ "sub": "alice", "exp": exp, "nbf": now - 60 });
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &started, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&t).map(|c| c.sub), Ok("alice".to_owned()), "good once its nbf is past");
    }
}
