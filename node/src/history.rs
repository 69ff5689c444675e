//! Audit-log entries (`GET /sessions/{id}/history`): who did what, when, with which
//! rolls, from the stored events. The rules render the entry (`gs_rules::audit_entry`:
//! summary, actor, rolls, data without the play-state patch or the dice seed); the
//! node adds what only the log knows.

use crate::store::StoredEvent;
use serde_json::{json, Value};

pub fn entry(e: &StoredEvent) -> Value {
    let mut entry = match gs_rules::Event::from_parts(&e.kind, e.data.clone()) {
        Ok(ev) => gs_rules::audit_entry(e.seq, &ev),
        // Every stored event parses (recovery depends on it); this keeps the history
        // readable even if one did not.
        Err(_) => json!({"version": e.seq, "type": e.kind}),
    };
    if let Value::Object(m) = &mut entry {
        m.insert("user_id".into(), json!(e.user_id));
        m.insert("command_id".into(), json!(e.command_id));
        m.insert(
            "recorded_at".into(),
            json!(e
                .created_at
                .and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
    }
    entry
}
