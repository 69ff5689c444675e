//! What a batch of committed session events means for the Message Hub: one outbox row
//! per event (written in the events' transaction, see `crate::committer`), the
//! characters that entered the session (the hub's character index), and the combat
//! summary kept in Redis.
//!
//! Routing keys (ICD "Published Events"): combat events go out as
//! `session.combat.changed`, every other event as `session.state.changed`. Payloads
//! keep the ICD's fields (`session_id`, `change_type`, `details`, `timestamp`, and
//! `combat_id` for combat) and add `event_id` (the stored event's id; consumers dedupe
//! on it), `version` (the session version) and `correlation_id` (the client command or
//! hub event that caused it). `details` is the event's data without the play-state
//! patch and without the dice seed.

use crate::committer::{EventRow, OutboxRow};
use gs_rules::SessionState;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

pub const STATE_CHANGED: &str = "session.state.changed";
pub const COMBAT_CHANGED: &str = "session.combat.changed";

/// Event types published as `session.combat.changed`.
const COMBAT_EVENTS: &[&str] = &[
    "combat_started",
    "combat_joined",
    "initiative_roll",
    "turn_change",
    "death_save",
    "action_declare",
    "action_resolve",
    "character_moved",
    "stood_up",
    "opportunity_attack",
    "condition_applied",
    "condition_removed",
    "concentration_ended",
    "combat_ended",
    "reaction_declined",
    "repeat_save",
];

pub fn routing_key(kind: &str) -> &'static str {
    if COMBAT_EVENTS.contains(&kind) {
        COMBAT_CHANGED
    } else {
        STATE_CHANGED
    }
}

/// One outbox row per committed event.
pub fn rows(state: &SessionState, events: &[EventRow]) -> Vec<OutboxRow> {
    let current_combat = state.game.combat.as_ref().map(|c| c.id);
    events
        .iter()
        .map(|e| {
            let key = routing_key(&e.kind);
            let mut details = e.data.clone();
            if let Value::Object(m) = &mut details {
                m.remove("patch");
                if let Some(Value::Object(s)) = m.get_mut("settings") {
                    s.remove("dice_seed");
                }
            }
            let timestamp = e.data["timestamp"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| {
                    e.created_at
                        .and_utc()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                });
            let mut payload = json!({
                "event_id": e.id,
                "session_id": state.id,
                "version": e.seq,
                "change_type": e.kind,
                "details": details,
                "timestamp": timestamp,
                "correlation_id": e.correlation,
            });
            if key == COMBAT_CHANGED {
                let combat = e.data["combat_id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .or(current_combat);
                payload["combat_id"] = json!(combat);
            }
            OutboxRow {
                event_id: e.id,
                seq: e.seq,
                routing_key: key.to_string(),
                payload,
            }
        })
        .collect()
}

/// Characters a batch brings into the session (joins with a character, spawns).
pub fn characters(events: &[EventRow]) -> Vec<Uuid> {
    let mut out: Vec<Uuid> = events
        .iter()
        .filter(|e| e.kind == "player_joined" || e.kind == "character_spawned")
        .filter_map(|e| e.data["character_id"].as_str())
        .filter_map(|s| Uuid::parse_str(s).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The ICD's `session:{id}:combat` hash (round, turn, initiative order, active
/// effects), when combat is running.
pub fn combat_summary(state: &SessionState) -> Option<BTreeMap<String, String>> {
    state.game.combat_summary()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, data: Value) -> EventRow {
        EventRow {
            id: Uuid::new_v4(),
            seq: 7,
            kind: kind.into(),
            data,
            command_id: None,
            user_id: None,
            created_at: chrono::Utc::now().naive_utc(),
            correlation: Some(Uuid::nil()),
        }
    }

    #[test]
    fn one_row_per_event_routed_by_kind() {
        let state = SessionState::empty(Uuid::new_v4());
        let c = Uuid::new_v4();
        let events = vec![
            row("state_update", json!({"changes": [], "timestamp": "t1"})),
            row(
                "turn_change",
                json!({"combat_id": c, "patch": {"x": 1}, "timestamp": "t2"}),
            ),
            row(
                "session_created",
                json!({"settings": {"dice_seed": 5, "a": 1}, "timestamp": "t3"}),
            ),
        ];
        let out = rows(&state, &events);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].routing_key, STATE_CHANGED);
        assert_eq!(out[1].routing_key, COMBAT_CHANGED);
        assert_eq!(out[1].payload["combat_id"], json!(c));
        assert!(out[1].payload["details"].get("patch").is_none());
        assert_eq!(out[2].payload["details"]["settings"], json!({"a": 1}));
        for (o, e) in out.iter().zip(&events) {
            assert_eq!(o.event_id, e.id);
            assert_eq!(o.payload["event_id"], json!(e.id));
            assert_eq!(o.payload["version"], json!(7));
            assert_eq!(o.payload["session_id"], json!(state.id));
        }
    }

    #[test]
    fn characters_entering_the_session() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let events = vec![
            row("player_joined", json!({"character_id": a})),
            row("player_joined", json!({})),
            row("character_spawned", json!({"character_id": b})),
            row("state_update", json!({"character_id": Uuid::new_v4()})),
        ];
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(characters(&events), want);
    }
}
