//! The engine's error type, mapped once to the public error codes of API.md.
use ether_proto::{ApiError, ErrorCode};

/// What can go wrong inside the engine while serving a request or a frame.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request itself is wrong (validation, unknown route…): already a public error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Another shard could not be reached: the node is stopping.
    #[error("shard {0} is not reachable (node stopping)")]
    ShardGone(usize),
    /// The node is draining or stopping and takes no new work.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The store refused or failed (overloaded, unavailable, not found, forbidden…).
    #[error(transparent)]
    Store(#[from] ether_store::StoreError),
    /// A feature this node does not provide yet.
    #[error("{0}")]
    NotAvailable(&'static str),
}

impl EngineError {
    /// The error as the outside sees it.
    pub fn to_api(&self) -> ApiError {
        match self {
            EngineError::Api(e) => e.clone(),
            EngineError::ShardGone(_) | EngineError::ShuttingDown => {
                ApiError::new(ErrorCode::Unavailable, self.to_string())
            }
            EngineError::NotAvailable(what) => ApiError::new(ErrorCode::Unavailable, *what),
            EngineError::Store(e) => ApiError::new(e.code(), e.to_string()),
        }
    }
}
