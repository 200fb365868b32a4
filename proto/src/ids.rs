//! Identifiers: users, devices, groups, and chat names as seen from the reader's side.
use crate::error::{ApiError, ErrorCode};

/// Longest user, device or group id, in bytes.
pub const ID_LEN_MAX: usize = 128;

fn id_char_ok(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'@' | b':' | b'-')
}

/// Whether `s` is a valid user, device or group id: 1-128 chars of `[A-Za-z0-9_.@:-]`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= ID_LEN_MAX && s.bytes().all(id_char_ok)
}

/// Checks an id found at `path` of a request, with a clear error.
pub fn check_id(path: &str, s: &str) -> Result<(), ApiError> {
    if is_valid_id(s) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidBody,
            format!("{path}: must be 1-{ID_LEN_MAX} characters of [A-Za-z0-9_.@:-]"),
        ))
    }
}

/// A chat named from the reader's side.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Chat {
    /// `u:<user>`: the single chat with that user.
    User(String),
    /// `g:<group>`: the group.
    Group(String),
}

impl Chat {
    /// Parses `u:<id>` or `g:<id>`.
    pub fn parse(s: &str) -> Option<Chat> {
        let (prefix, id) = s.split_at_checked(2)?;
        if !is_valid_id(id) {
            return None;
        }
        match prefix {
            "u:" => Some(Chat::User(id.to_owned())),
            "g:" => Some(Chat::Group(id.to_owned())),
            _ => None,
        }
    }
}

impl std::fmt::Display for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chat::User(u) => write!(f, "u:{u}"),
            Chat::Group(g) => write!(f, "g:{g}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("alice"));
        assert!(is_valid_id("a.b@c:d-e_f9"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("é"));
        assert!(!is_valid_id(&"x".repeat(129)));
        assert!(is_valid_id(&"x".repeat(128)));
    }

    #[test]
    fn chats() {
        assert_eq!(Chat::parse("u:bob"), Some(Chat::User("bob".into())));
        assert_eq!(Chat::parse("g:team"), Some(Chat::Group("team".into())));
        assert_eq!(Chat::parse("x:bob"), None);
        assert_eq!(Chat::parse("u:"), None);
        assert_eq!(Chat::parse("u"), None);
    }

    proptest! {
        #[test]
        fn chat_roundtrip(id in "[A-Za-z0-9_.@:-]{1,128}", group in any::<bool>()) {
            let c = if group { Chat::Group(id) } else { Chat::User(id) };
            prop_assert_eq!(Chat::parse(&c.to_string()), Some(c));
        }

        #[test]
        fn chat_parse_never_panics(s in ".*") {
            let _ = Chat::parse(&s);
        }
    }
}
