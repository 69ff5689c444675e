//! Commands: what a client (or the node on a client's behalf) asks a session to do.
//!
//! A command is *decided* against the current state ([`crate::SessionState::decide`]):
//! either refused with a [`crate::RuleError`], or turned into events. Commands are never
//! stored; the events they produce are.

use crate::error::{codes, Result, RuleError};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Who issues a command, and when (the node's clock, so rules never read one).
#[derive(Debug, Clone, PartialEq)]
pub struct Ctx {
    pub user_id: Uuid,
    /// The access token's role is `admin` (may act as the session's DM).
    pub admin: bool,
    /// The client's message id; becomes the event's `update_id`/`action_id` where the
    /// protocol has one.
    pub command_id: Uuid,
    /// RFC 3339 time stamped into the events.
    pub timestamp: String,
}

/// Largest number of changes in one `state_update`.
pub const MAX_CHANGES: usize = 100;

/// `op` of one change in a `state_update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    #[default]
    Set,
    Remove,
}

/// One change of a `state_update`: set `path` to `value` (or remove it), only if the
/// current value equals `previous` when `previous` is given (compare-and-set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub path: String,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub previous: Option<Value>,
    #[serde(default)]
    pub op: ChangeOp,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(Null)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateUpdate {
    pub changes: Vec<Change>,
}

/// The body of `POST /sessions/{id}/join`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JoinRequest {
    #[serde(default)]
    pub character_id: Option<Uuid>,
    /// `player` (default) or `observer`; `dm` only for the session's creator.
    #[serde(default)]
    pub role: Option<crate::state::SessionRole>,
    /// An optional character sheet for the rules (hit points, armour class, ...).
    #[serde(default)]
    pub character: Option<Value>,
}

/// Every command the rules know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Command {
    /// WebSocket `state_update`: JSON Pointer changes to the state document.
    StateUpdate(StateUpdate),
    /// REST `POST /state`: replace the document (and its metadata).
    SaveState { state: Value, metadata: Value },
    /// REST `POST /join`.
    Join(JoinRequest),
    /// WebSocket `leave`.
    Leave {},
    /// Lifecycle, DM only: created → active ⇄ paused → ended.
    SessionStart {},
    SessionPause {},
    SessionResume {},
    SessionEnd {},
}

/// Message types a WebSocket client may send (others are REST-only or internal).
pub const CLIENT_TYPES: &[&str] = &[
    "state_update",
    "leave",
    "session_start",
    "session_pause",
    "session_resume",
    "session_end",
];

impl Command {
    /// Parses a WebSocket message's `type` and `data`. Unknown types are
    /// `unknown_type`; a known type with a bad payload is `invalid_payload`.
    pub fn from_client(kind: &str, data: Value) -> Result<Command> {
        if !CLIENT_TYPES.contains(&kind) {
            return Err(RuleError::new(
                codes::UNKNOWN_TYPE,
                format!("unknown message type {kind:?}"),
            )
            .with_details(serde_json::json!({ "known": CLIENT_TYPES })));
        }
        let tagged = serde_json::json!({ "type": kind, "data": data });
        serde_json::from_value(tagged).map_err(|e| {
            RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("invalid `data` for {kind:?}: {e}"),
            )
        })
    }

    /// The wire name of the command.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::StateUpdate(_) => "state_update",
            Command::SaveState { .. } => "save_state",
            Command::Join(_) => "join",
            Command::Leave {} => "leave",
            Command::SessionStart {} => "session_start",
            Command::SessionPause {} => "session_pause",
            Command::SessionResume {} => "session_resume",
            Command::SessionEnd {} => "session_end",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn previous_null_is_a_guard_but_absent_is_not() {
        let c = Command::from_client(
            "state_update",
            json!({"changes": [{"path": "/a", "value": 1, "previous": null}, {"path": "/b", "value": 2}]}),
        )
        .unwrap();
        let Command::StateUpdate(u) = c else { panic!() };
        assert_eq!(u.changes[0].previous, Some(Value::Null));
        assert_eq!(u.changes[1].previous, None);
    }

    #[test]
    fn unknown_and_invalid() {
        assert_eq!(
            Command::from_client("fly", json!({})).unwrap_err().code,
            codes::UNKNOWN_TYPE
        );
        // REST-only commands are not accepted from a WebSocket.
        assert_eq!(
            Command::from_client("save_state", json!({})).unwrap_err().code,
            codes::UNKNOWN_TYPE
        );
        assert_eq!(
            Command::from_client("state_update", json!({"changes": 5}))
                .unwrap_err()
                .code,
            codes::INVALID_PAYLOAD
        );
    }
}
