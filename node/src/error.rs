//! The node's error type. Errors are classified so that callers decide without
//! matching strings: [`NodeError::is_retryable`] says whether a router may try again
//! (same command id), and [`NodeError::to_wire`] (or `WireError::from`) gives the
//! client-facing code, whose status and retryability come from the one code table.

use gs_shared::protocol::{codes, WireError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// PostgreSQL refused a write: another node holds a newer epoch for the session.
    #[error("fenced: a newer owner holds session {0}")]
    Fenced(uuid::Uuid),
    /// The ownership lock is gone (expired, taken over, or Redis unreachable).
    #[error("lost the ownership lock of session {0}")]
    LeaseLost(uuid::Uuid),
    #[error("session {0} does not exist")]
    SessionNotFound(uuid::Uuid),
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool: {0}")]
    Pool(String),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Other(String),
}

impl From<deadpool_postgres::PoolError> for NodeError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        NodeError::Pool(e.to_string())
    }
}

impl From<redis::RedisError> for NodeError {
    fn from(e: redis::RedisError) -> Self {
        NodeError::Redis(e.to_string())
    }
}

impl NodeError {
    /// Classifies a PostgreSQL error: the fencing trigger's SQLSTATE becomes `Fenced`.
    pub fn from_pg(session: uuid::Uuid, e: tokio_postgres::Error) -> Self {
        if gs_shared::db::is_fenced(&e) {
            NodeError::Fenced(session)
        } else {
            NodeError::Db(e)
        }
    }

    /// Whether retrying (elsewhere or later) can succeed: its wire code's row in the
    /// code table says.
    pub fn is_retryable(&self) -> bool {
        self.to_wire().is_retryable()
    }

    /// What a client (through its router) is told.
    pub fn to_wire(&self) -> WireError {
        match self {
            NodeError::Fenced(_) | NodeError::LeaseLost(_) => {
                WireError::new(codes::NOT_OWNER, "this node no longer owns the session")
            }
            NodeError::SessionNotFound(_) => {
                WireError::new(codes::SESSION_NOT_FOUND, "no such session")
            }
            NodeError::Corrupt(_) => WireError::new(
                codes::SESSION_QUARANTINED,
                "the session's stored data cannot be loaded; it is set aside for an operator",
            ),
            other => WireError::new(
                codes::SERVICE_UNAVAILABLE,
                format!("a dependency is unavailable: {other}"),
            ),
        }
    }
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// The one way a node error becomes a wire error (`?` into `Result<_, WireError>`).
impl From<NodeError> for WireError {
    fn from(e: NodeError) -> WireError {
        e.to_wire()
    }
}
