//! Rule violations: every refused command becomes one [`RuleError`] with a specific,
//! stable code, and changes nothing.
//!
//! A [`RuleError`] is the service's one wire error type ([`gs_wire::WireError`]), and
//! [`codes`] its one code table (`gs_wire::CODES`: each code's HTTP status,
//! retryability and meaning), shared with the edge's codes: the node sends a rule's
//! refusal as it is.

pub use gs_wire::codes;

/// A refused command: the wire error as the node sends it.
pub type RuleError = gs_wire::WireError;

pub type Result<T, E = RuleError> = std::result::Result<T, E>;
