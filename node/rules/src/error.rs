//! Rule violations: every refused command becomes one [`RuleError`] with a specific,
//! stable code, and changes nothing.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Stable error codes of the rules. Part of the wire contract (`docs/protocol.md`).
pub mod codes {
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    pub const INVALID_PAYLOAD: &str = "invalid_payload";
    pub const INVALID_PATH: &str = "invalid_path";
    pub const CONFLICT: &str = "conflict";
    pub const NOT_MEMBER: &str = "not_member";
    pub const FORBIDDEN_FOR_ROLE: &str = "forbidden_for_role";
    pub const SESSION_NOT_ACTIVE: &str = "session_not_active";
    pub const SESSION_ENDED: &str = "session_ended";
    pub const INVALID_TRANSITION: &str = "invalid_transition";
    pub const CHARACTER_TAKEN: &str = "character_taken";
    pub const TOO_MANY_CHANGES: &str = "too_many_changes";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl RuleError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RuleError {}

pub type Result<T, E = RuleError> = std::result::Result<T, E>;
