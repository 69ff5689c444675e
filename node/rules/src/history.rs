//! Audit-log entries: who did what, when, with which rolls.
//!
//! The session history is the event log itself (nothing is ever erased; a rollback
//! is a new event). [`audit_entry`] renders one stored event for people: a one-line
//! `summary`, the actor, the time, the dice, and the event's data without its
//! play-state `patch` (machine detail) and without the dice seed (which would let a
//! reader predict future rolls).

use crate::event::Event;
use serde_json::{json, Value};

/// One audit-log entry for the event stored at `version`:
///
/// ```json
/// {"version": 12, "type": "action_resolve", "at": "2026-01-01T20:00:00Z",
///  "by": "<user id>", "summary": "attack by <id>: <target> hit (critical), 14 damage",
///  "rolls": [{"purpose": "attack", "dice": "1d20", "faces": [20], "modifier": 5, "total": 25}],
///  "data": { ...the event's data without `patch`... }}
/// ```
pub fn audit_entry(version: u64, event: &Event) -> Value {
    let (kind, mut data) = event.to_parts();
    if let Value::Object(m) = &mut data {
        m.remove("patch");
        if let Some(Value::Object(settings)) = m.get_mut("settings") {
            settings.remove("dice_seed");
        }
    }
    json!({
        "version": version,
        "type": kind,
        "at": event.timestamp(),
        "by": event.by(),
        "summary": summary(event),
        "rolls": event.rolls(),
        "data": data,
    })
}

/// A one-line description of an event.
pub fn summary(event: &Event) -> String {
    match event {
        Event::SessionCreated { name, .. } => format!("session {name:?} created"),
        Event::StateUpdate {
            changes, metadata, ..
        } => match metadata {
            Some(_) => "state document replaced".into(),
            None => format!(
                "state document: {} change(s) at {}",
                changes.len(),
                changes
                    .iter()
                    .map(|c| c.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        Event::PlayerJoined {
            role, character_id, ..
        } => match character_id {
            Some(c) => format!("joined as {} with character {c}", role.as_str()),
            None => format!("joined as {}", role.as_str()),
        },
        Event::PlayerLeft { .. } => "left the session".into(),
        Event::SessionStatusChanged {
            status, previous, ..
        } => format!("session {} → {}", previous.as_str(), status.as_str()),
        Event::CharacterSpawned(e) => format!("{} ({}) entered play", e.name, e.character_id),
        Event::CharacterUpdated(e) => {
            format!("character {} updated ({})", e.character_id, e.source)
        }
        Event::CharacterPlaced(e) => format!(
            "character {} placed at ({}, {})",
            e.character_id, e.position.x, e.position.y
        ),
        Event::CombatStarted(e) => {
            format!("combat started with {} participants", e.participants.len())
        }
        Event::CombatJoined(e) => format!("{} joined the combat", e.participants.len()),
        Event::InitiativeRoll(e) => format!(
            "initiative {} for {} (d20 {})",
            e.roll, e.character_id, e.d20
        ),
        Event::TurnChange(e) => format!(
            "round {}, turn {}: {}",
            e.round, e.turn_number, e.active_character
        ),
        Event::DeathSave(e) => format!(
            "death save {} for {}: {} ({} successes, {} failures) → {}",
            e.roll, e.character_id, e.result, e.successes, e.failures, e.outcome
        ),
        Event::ActionDeclare(e) => format!(
            "{} declares {} on {} target(s)",
            e.character_id,
            e.action_type.as_str(),
            e.targets.len()
        ),
        Event::ActionResolve(e) => {
            let parts: Vec<String> = e
                .outcomes
                .iter()
                .map(|o| {
                    let mut s = format!("{} {}", o.target_id, o.effects.join("/"));
                    if o.damage.total > 0 {
                        s.push_str(&format!(", {} damage", o.damage.total));
                    }
                    if let Some(h) = o.healed {
                        s.push_str(&format!(", {h} healing"));
                    }
                    s
                })
                .collect();
            if parts.is_empty() {
                format!("{} by {}", e.action_type.as_str(), e.character_id)
            } else {
                format!(
                    "{} by {}: {}",
                    e.action_type.as_str(),
                    e.character_id,
                    parts.join("; ")
                )
            }
        }
        Event::CharacterMoved(e) => format!(
            "{} moved ({}, {}) → ({}, {}), {} ft",
            e.character_id, e.from.x, e.from.y, e.to.x, e.to.y, e.distance
        ),
        Event::StoodUp(e) => format!("{} stood up", e.character_id),
        Event::OpportunityAttack(e) => format!(
            "{} provoked opportunity attacks from {} creature(s) at ({}, {}); the move waits",
            e.character_id,
            e.reactors.len(),
            e.from.x,
            e.from.y
        ),
        Event::ConditionApplied(e) => {
            format!("{} is {}", e.character_id, e.condition.as_str())
        }
        Event::ConditionRemoved(e) => {
            format!("{} is no longer {}", e.character_id, e.condition.as_str())
        }
        Event::ConcentrationEnded(e) => {
            format!("{} stopped concentrating ({})", e.character_id, e.reason)
        }
        Event::CombatEnded(e) => format!("combat ended after {} round(s)", e.rounds),
        Event::TerrainChanged(e) => format!(
            "terrain: {} square(s) marked{}",
            e.squares.len(),
            if e.cleared {
                " (map cleared first)"
            } else {
                ""
            }
        ),
        Event::ReactionDeclined(e) => {
            format!("{} lets {} leave its reach", e.character_id, e.mover)
        }
        Event::RepeatSave(e) => format!(
            "{} repeats its save against {}: {}",
            e.character_id,
            e.conditions
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if e.ended {
                "success, it ends"
            } else {
                "failure"
            }
        ),
        Event::StateRestored(e) => format!("rolled back to version {}", e.to_version),
        other => crate::services::summary(other),
    }
}
