//! What committed session events mean for the Message Hub: the messages they are
//! published as (the event rows are the outbox: see `crate::hub::publish`), the
//! characters that entered the session (the hub's character index), and the combat
//! summary kept in Redis.
//!
//! Routing keys (ICD "Published Events"): combat events go out as
//! `session.combat.changed`, every other event as `session.state.changed`. One event's
//! payload keeps the ICD's fields (`session_id`, `change_type`, `details`, `timestamp`,
//! and `combat_id` for combat) and adds `event_id` (the stored event's id; consumers
//! dedupe on it), `version` (the session version) and `correlation_id` (the client
//! command or hub event that caused it). `details` is the event's data without the
//! play-state patch and without the dice seed.
//!
//! Consecutive events of one session with the same routing key, published together,
//! go out as one message (see `docs/message-hub.md`): a single event as above, several
//! as a batch `{"change_type": "batch", "details": {"events": [...]}, ...}` whose
//! events are in version order, each in the single-event form.

use crate::store::{EventRow, HubRow};
use gs_rules::SessionState;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

pub const STATE_CHANGED: &str = "session.state.changed";
pub const COMBAT_CHANGED: &str = "session.combat.changed";
/// A character's hit points or conditions changed in play: for the Character Service
/// to persist (one message per character and event, beside the event's own message).
pub const CHARACTER_CHANGED: &str = "session.character.changed";
/// Fields of a character in play the Character Service is told about.
const CHARACTER_FIELDS: &[&str] = &[
    "hp",
    "temp_hp",
    "max_hp",
    "conditions",
    "death_saves",
    "stable",
    "exhaustion",
];
/// `change_type` of a message carrying several events.
pub const BATCH: &str = "batch";

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

/// The fields of an event's data this module reads (the rest is skipped unparsed).
#[derive(Deserialize, Default)]
struct Probe {
    #[serde(default)]
    combat_id: Option<Uuid>,
    #[serde(default)]
    character_id: Option<Uuid>,
}

fn probe(data_json: &str) -> Probe {
    serde_json::from_str(data_json).unwrap_or_default()
}

/// The combat a combat event belongs to: its own `combat_id`, else the session's
/// current combat. `None` for other events.
pub fn combat_of(kind: &str, data_json: &str, current: Option<Uuid>) -> Option<Uuid> {
    if routing_key(kind) != COMBAT_CHANGED {
        return None;
    }
    probe(data_json).combat_id.or(current)
}

/// The current combat of a session, for [`combat_of`].
pub fn current_combat(state: &SessionState) -> Option<Uuid> {
    state.game.combat.as_ref().map(|c| c.id)
}

/// One event's hub payload (JSON text) and its `timestamp` (JSON text).
struct Payload {
    text: String,
    timestamp: String,
}

/// The event's data for the hub (`details`): without the play-state patch and without
/// the dice seed. Only the top level is parsed (values stay text).
fn details(kind: &str, data_json: &str) -> (String, String) {
    let timestamp_of = |m: &BTreeMap<&str, &RawValue>| {
        m.get("timestamp")
            .map(|t| t.get().to_string())
            .unwrap_or_default()
    };
    if kind != "session_created" {
        if let Ok(mut m) = serde_json::from_str::<BTreeMap<&str, &RawValue>>(data_json) {
            let ts = timestamp_of(&m);
            let text = match m.remove("patch") {
                Some(_) => serde_json::to_string(&m).expect("a map of JSON serialises"),
                None => data_json.to_string(),
            };
            return (text, ts);
        }
    }
    // The seed sits one level down (and any key with an escape needs the full parse).
    let mut v: Value = serde_json::from_str(data_json).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("patch");
        if let Some(Value::Object(s)) = m.get_mut("settings") {
            s.remove("dice_seed");
        }
    }
    let ts = v.get("timestamp").map(Value::to_string).unwrap_or_default();
    (v.to_string(), ts)
}

/// One event's hub payload.
fn payload(session: Uuid, e: &HubRow) -> Payload {
    let (details, mut timestamp) = details(&e.kind, &e.data_json);
    if timestamp.is_empty() || timestamp == "null" {
        timestamp = Value::from(
            e.created_at
                .and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
        .to_string();
    }
    let uuid_or_null = |u: Option<Uuid>| u.map_or("null".to_string(), |u| format!("\"{u}\""));
    let mut text = format!(
        r#"{{"event_id":"{}","session_id":"{session}","version":{},"change_type":{},"details":{details},"timestamp":{timestamp},"correlation_id":{}"#,
        e.id,
        e.seq,
        Value::from(e.kind.as_str()),
        uuid_or_null(e.correlation),
    );
    if routing_key(&e.kind) == COMBAT_CHANGED {
        text.push_str(r#","combat_id":"#);
        text.push_str(&uuid_or_null(e.combat_id));
    }
    text.push('}');
    Payload { text, timestamp }
}

/// One message for the broker.
#[derive(Debug, Clone)]
pub struct HubMessage {
    pub routing_key: &'static str,
    /// The single event's id, or for a batch an id derived from the session and its
    /// version range.
    pub message_id: Uuid,
    pub body: Vec<u8>,
    /// The newest version the message carries.
    pub last_seq: u64,
}

/// The messages that publish `rows` (one session's events, in version order): runs
/// of the same routing key, at most `max_events` events a message.
pub fn messages(session: Uuid, rows: &[HubRow], max_events: usize) -> Vec<HubMessage> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let key = routing_key(&rows[start].kind);
        let mut end = start + 1;
        while end < rows.len()
            && end - start < max_events.max(1)
            && routing_key(&rows[end].kind) == key
        {
            end += 1;
        }
        let main = message(session, key, &rows[start..end]);
        let last_seq = main.last_seq;
        out.push(main);
        for row in &rows[start..end] {
            // Carried with the message's last version, so the cursor moves as before.
            out.extend(
                character_messages(session, row)
                    .into_iter()
                    .map(|m| HubMessage { last_seq, ..m }),
            );
        }
        start = end;
    }
    out
}

fn message(session: Uuid, key: &'static str, run: &[HubRow]) -> HubMessage {
    let last = &run[run.len() - 1];
    if run.len() == 1 {
        return HubMessage {
            routing_key: key,
            message_id: last.id,
            body: payload(session, last).text.into_bytes(),
            last_seq: last.seq,
        };
    }
    let first = run[0].seq;
    let id = Uuid::new_v5(&session, format!("{first}-{}", last.seq).as_bytes());
    let payloads: Vec<Payload> = run.iter().map(|e| payload(session, e)).collect();
    let events: Vec<&str> = payloads.iter().map(|p| p.text.as_str()).collect();
    let body = format!(
        r#"{{"event_id":"{id}","session_id":"{session}","change_type":"{BATCH}","from_version":{first},"version":{},"details":{{"events":[{}]}},"timestamp":{}}}"#,
        last.seq,
        events.join(","),
        payloads[payloads.len() - 1].timestamp,
    );
    HubMessage {
        routing_key: key,
        message_id: id,
        body: body.into_bytes(),
        last_seq: last.seq,
    }
}

/// `session.character.changed` messages of one event: for each character whose hit
/// points or conditions the event changed (read from its play-state patch), `{event_id,
/// session_id, character_id, version, change_type, details: {hp, conditions, …},
/// timestamp, correlation_id}`. Not for characters entering play, nor for changes that
/// came from the Character Service itself.
fn character_messages(session: Uuid, row: &HubRow) -> Vec<HubMessage> {
    if matches!(
        row.kind.as_str(),
        "player_joined" | "character_spawned" | "session_created"
    ) || !row.data_json.contains("\"characters\"")
    {
        return vec![];
    }
    let Ok(data) = serde_json::from_str::<Value>(&row.data_json) else {
        return vec![];
    };
    if matches!(data["source"].as_str(), Some("hub" | "character_service")) {
        return vec![];
    }
    let Some(Value::Object(chars)) = data.get("patch").and_then(|p| p.get("characters")) else {
        return vec![];
    };
    chars
        .iter()
        .filter_map(|(id, c)| {
            let c = c.as_object()?;
            let details: serde_json::Map<String, Value> = CHARACTER_FIELDS
                .iter()
                .filter_map(|f| c.get(*f).map(|v| (f.to_string(), v.clone())))
                .collect();
            if details.is_empty() {
                return None;
            }
            let character_id = Uuid::parse_str(id).ok()?;
            let event_id = Uuid::new_v5(&row.id, id.as_bytes());
            let body = serde_json::json!({
                "event_id": event_id, "session_id": session, "character_id": character_id,
                "version": row.seq, "change_type": row.kind, "details": details,
                "timestamp": data.get("timestamp"), "correlation_id": row.correlation,
            });
            Some(HubMessage {
                routing_key: CHARACTER_CHANGED,
                message_id: event_id,
                body: body.to_string().into_bytes(),
                last_seq: row.seq,
            })
        })
        .collect()
}

/// Characters a batch brings into the session (joins with a character, spawns).
pub fn characters(events: &[EventRow]) -> Vec<Uuid> {
    let mut out: Vec<Uuid> = events
        .iter()
        .filter(|e| e.kind == "player_joined" || e.kind == "character_spawned")
        .filter_map(|e| probe(&e.data_json).character_id)
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
    use serde_json::json;

    fn row(seq: u64, kind: &str, data: Value) -> HubRow {
        HubRow {
            id: Uuid::new_v4(),
            seq,
            kind: kind.into(),
            data_json: data.to_string(),
            created_at: chrono::Utc::now().naive_utc(),
            correlation: Some(Uuid::nil()),
            combat_id: None,
        }
    }

    #[test]
    fn one_payload_per_event_routed_by_kind() {
        let session = Uuid::new_v4();
        let c = Uuid::new_v4();
        let mut turn = row(
            8,
            "turn_change",
            json!({"combat_id": c, "patch": {"x": 1}, "timestamp": "t2"}),
        );
        turn.combat_id = combat_of("turn_change", &turn.data_json, None);
        let created = row(
            9,
            "session_created",
            json!({"settings": {"dice_seed": 5, "a": 1}, "timestamp": "t3"}),
        );
        let p: Value = serde_json::from_str(&payload(session, &turn).text).unwrap();
        assert_eq!(routing_key("turn_change"), COMBAT_CHANGED);
        assert_eq!(p["combat_id"], json!(c));
        assert_eq!(p["details"], json!({"combat_id": c, "timestamp": "t2"}));
        assert_eq!(p["timestamp"], "t2");
        assert_eq!(p["correlation_id"], json!(Uuid::nil()));
        assert_eq!(p["event_id"], json!(turn.id));
        assert_eq!(p["version"], json!(8));
        assert_eq!(p["session_id"], json!(session));
        let p: Value = serde_json::from_str(&payload(session, &created).text).unwrap();
        assert_eq!(routing_key("session_created"), STATE_CHANGED);
        assert_eq!(p["details"]["settings"], json!({"a": 1}));
        assert!(p.get("combat_id").is_none());
    }

    #[test]
    fn combat_events_without_their_own_id_take_the_current_combat() {
        let c = Uuid::new_v4();
        assert_eq!(combat_of("death_save", "{}", Some(c)), Some(c));
        assert_eq!(combat_of("state_update", "{}", Some(c)), None);
    }

    #[test]
    fn runs_of_one_key_become_one_message_in_order() {
        let session = Uuid::new_v4();
        let rows = vec![
            row(1, "state_update", json!({"timestamp": "a"})),
            row(2, "state_update", json!({"timestamp": "b"})),
            row(3, "turn_change", json!({"timestamp": "c"})),
            row(4, "state_update", json!({"timestamp": "d"})),
            row(5, "state_update", json!({"timestamp": "e"})),
            row(6, "state_update", json!({"timestamp": "f"})),
        ];
        let msgs = messages(session, &rows, 2);
        let shape: Vec<(&str, u64)> = msgs.iter().map(|m| (m.routing_key, m.last_seq)).collect();
        assert_eq!(
            shape,
            vec![
                (STATE_CHANGED, 2),
                (COMBAT_CHANGED, 3),
                (STATE_CHANGED, 5),
                (STATE_CHANGED, 6)
            ]
        );
        let batch: Value = serde_json::from_slice(&msgs[0].body).unwrap();
        assert_eq!(batch["change_type"], BATCH);
        assert_eq!(batch["from_version"], 1);
        assert_eq!(batch["version"], 2);
        let inner: Vec<u64> = batch["details"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert_eq!(inner, vec![1, 2]);
        assert_eq!(batch["details"]["events"][0]["event_id"], json!(rows[0].id));
        let single: Value = serde_json::from_slice(&msgs[1].body).unwrap();
        assert_eq!(single["change_type"], "turn_change");
        assert_eq!(msgs[1].message_id, rows[2].id);
        // The same range always gets the same batch id (redeliveries dedupe).
        assert_eq!(
            messages(session, &rows, 2)[0].message_id,
            msgs[0].message_id
        );
    }

    #[test]
    fn characters_entering_the_session() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let ev = |kind: &str, data: Value| EventRow {
            id: Uuid::new_v4(),
            seq: 7,
            kind: kind.into(),
            data_json: data.to_string(),
            command_id: None,
            user_id: None,
            created_at: chrono::Utc::now().naive_utc(),
            correlation: None,
            combat_id: None,
        };
        let events = vec![
            ev("player_joined", json!({"character_id": a})),
            ev("player_joined", json!({})),
            ev("character_spawned", json!({"character_id": b})),
            ev("state_update", json!({"character_id": Uuid::new_v4()})),
        ];
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(characters(&events), want);
    }
}
