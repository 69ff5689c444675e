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
    /// A bound on the state document (`details.limit` names it; `rules::limits`).
    pub const LIMIT_EXCEEDED: &str = "limit_exceeded";

    // Play (docs/protocol.md, "Game messages").
    /// A character sheet or character change is invalid.
    pub const INVALID_CHARACTER: &str = "invalid_character";
    /// The character id is not in play in this session.
    pub const UNKNOWN_CHARACTER: &str = "unknown_character";
    /// The sender does not control that character (the DM controls all).
    pub const NOT_YOUR_CHARACTER: &str = "not_your_character";
    pub const COMBAT_NOT_ACTIVE: &str = "combat_not_active";
    pub const COMBAT_ALREADY_ACTIVE: &str = "combat_already_active";
    /// Acting before every participant has rolled initiative.
    pub const INITIATIVE_PENDING: &str = "initiative_pending";
    pub const ALREADY_ROLLED: &str = "already_rolled";
    /// A client reported a roll but `settings.allow_client_rolls` is off.
    pub const CLIENT_ROLLS_DISABLED: &str = "client_rolls_disabled";
    pub const NOT_A_PARTICIPANT: &str = "not_a_participant";
    pub const NOT_YOUR_TURN: &str = "not_your_turn";
    pub const NO_ACTION_LEFT: &str = "no_action_left";
    pub const NO_BONUS_ACTION_LEFT: &str = "no_bonus_action_left";
    pub const NO_REACTION_LEFT: &str = "no_reaction_left";
    /// The creature is incapacitated (or dead): no actions or reactions.
    pub const INCAPACITATED: &str = "incapacitated";
    pub const INVALID_TARGET: &str = "invalid_target";
    pub const OUT_OF_RANGE: &str = "out_of_range";
    pub const INVALID_DICE: &str = "invalid_dice";
    pub const CONDITION_IMMUNE: &str = "condition_immune";
    pub const NOT_CONCENTRATING: &str = "not_concentrating";
    /// Not enough movement left, or speed 0.
    pub const MOVEMENT_EXCEEDED: &str = "movement_exceeded";
    /// A frightened creature moving closer to the source of its fear.
    pub const MOVEMENT_BLOCKED: &str = "movement_blocked";
    pub const SQUARE_OCCUPIED: &str = "square_occupied";
    /// A move is paused for opportunity attacks: the mover waits until the creatures
    /// it provoked have reacted or declined (`details.waiting`).
    pub const REACTION_PENDING: &str = "reaction_pending";
    /// A surprised creature takes no action or reaction until its first turn ends.
    pub const SURPRISED: &str = "surprised";
    pub const NOT_ON_MAP: &str = "not_on_map";
    /// A rollback's `to_version` is not an earlier version of the session.
    pub const INVALID_VERSION: &str = "invalid_version";
    /// `decide` was handed a `rollback`; the node must call `decide_rollback` with the
    /// past state instead (a node bug, never a client's mistake).
    pub const ROLLBACK_NEEDS_HISTORY: &str = "rollback_needs_history";
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
