//! Events: what happened to a session. Each event is one session version.
//!
//! Events are the only thing stored (`session_events.event_type` is the tag,
//! `event_data` the content) and the only thing clients are sent (rendered as
//! `{"type": tag, "version": N, "data": content}`). [`crate::SessionState::apply`]
//! applies an event without any choice left to make: every dice roll and every
//! computed value is inside the event, so replaying the log reproduces the state
//! exactly.

use crate::state::{SessionRole, Status};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// One applied change, with the value it replaced (`previous`, absent if none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedChange {
    pub path: String,
    /// The new value; absent for a removal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Value>,
    #[serde(default, skip_serializing_if = "is_set")]
    pub op: crate::command::ChangeOp,
}

fn is_set(op: &crate::command::ChangeOp) -> bool {
    *op == crate::command::ChangeOp::Set
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// Version 1 of every session.
    SessionCreated {
        session_id: Uuid,
        campaign_id: Uuid,
        name: String,
        settings: Value,
        created_by: Uuid,
        timestamp: String,
    },
    /// The ICD's `state_update`: changes to the state document.
    StateUpdate {
        update_id: Uuid,
        user_id: Uuid,
        changes: Vec<AppliedChange>,
        /// Set by `POST /state` (which replaces the whole document).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Value>,
        timestamp: String,
    },
    PlayerJoined {
        user_id: Uuid,
        role: SessionRole,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        character_id: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        character: Option<Value>,
        timestamp: String,
    },
    PlayerLeft {
        user_id: Uuid,
        timestamp: String,
    },
    SessionStatusChanged {
        status: Status,
        previous: Status,
        by: Uuid,
        timestamp: String,
    },
}

impl Event {
    /// The stored `event_type` / wire `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::SessionCreated { .. } => "session_created",
            Event::StateUpdate { .. } => "state_update",
            Event::PlayerJoined { .. } => "player_joined",
            Event::PlayerLeft { .. } => "player_left",
            Event::SessionStatusChanged { .. } => "session_status_changed",
        }
    }

    /// `(event_type, event_data)` as stored.
    pub fn to_parts(&self) -> (String, Value) {
        match serde_json::to_value(self).expect("events serialise") {
            Value::Object(mut m) => {
                let data = m.remove("data").unwrap_or(Value::Null);
                (self.kind().to_string(), data)
            }
            _ => unreachable!("adjacently tagged enums serialise as objects"),
        }
    }

    /// Rebuilds an event from its stored parts.
    pub fn from_parts(kind: &str, data: Value) -> Result<Event, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "type": kind, "data": data }))
    }

    /// Whether this event ends the session (routers close connections after it).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::SessionStatusChanged {
                status: Status::Ended,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let e = Event::PlayerLeft {
            user_id: Uuid::nil(),
            timestamp: "t".into(),
        };
        let (k, d) = e.to_parts();
        assert_eq!(k, "player_left");
        assert_eq!(Event::from_parts(&k, d).unwrap(), e);
    }
}
