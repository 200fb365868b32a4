//! The storage layer's one error type, mapped once to public API codes.
use ether_proto::ErrorCode;

/// Why a store operation failed. `code()` maps it to the public error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The storage queue is full: shed load (`unavailable`, retry later).
    #[error("storage queue full")]
    Overloaded,
    /// The storage thread has stopped.
    #[error("storage closed")]
    Closed,
    #[error("not found")]
    NotFound,
    /// The user may not do this (e.g. send to a group they are not a member of).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Already exists (e.g. a group id).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A limit passed in the operation (members per group, …) would be exceeded.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The database cannot serve: disk full, I/O error, corrupt file, …
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The operation itself is malformed (bad id, too long, …).
    #[error("invalid: {0}")]
    Invalid(String),
    /// A fault of this program, not of the request: e.g. a reply of another kind than its
    /// operation's (`internal`, 500).
    #[error("internal: {0}")]
    Internal(String),
}

impl StoreError {
    /// The public error code (API.md section 3).
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Overloaded | StoreError::Closed | StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::NotFound => ErrorCode::NotFound,
            StoreError::Forbidden(_) => ErrorCode::Forbidden,
            StoreError::Conflict(_) => ErrorCode::Conflict,
            StoreError::LimitExceeded(_) | StoreError::Invalid(_) => ErrorCode::InvalidBody,
            StoreError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Whether the failure is the database's (the batch must be rolled back), not the op's.
    pub fn is_backend_failure(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(StoreError::Overloaded.code().http_status(), 503);
        assert_eq!(StoreError::Unavailable("disk full".into()).code().http_status(), 503);
        assert_eq!(StoreError::Forbidden("x".into()).code().http_status(), 403);
        assert_eq!(StoreError::NotFound.code().http_status(), 404);
        assert_eq!(StoreError::Conflict("g".into()).code().http_status(), 409);
        assert_eq!(StoreError::Internal("x".into()).code().http_status(), 500);
    }

    /// A reply of another kind than asked is this program's fault: `internal` (500), not the
    /// caller's `invalid_body` (400) it once was.
    #[test]
    fn a_reply_of_another_kind_is_internal() {
        let e = crate::op::Reply::Done.page().unwrap_err();
        assert!(matches!(e, StoreError::Internal(_)), "{e:?}");
        assert_eq!(e.code().http_status(), 500);
    }
}
