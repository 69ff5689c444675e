//! Audit-log entries (`GET /sessions/{id}/history`): who did what, when, with which
//! rolls, from the stored events.

use crate::store::StoredEvent;
use serde_json::{json, Value};

pub fn entry(e: &StoredEvent) -> Value {
    json!({
        "version": e.seq,
        "type": e.kind,
        "user_id": e.user_id,
        "command_id": e.command_id,
        "recorded_at": e.created_at.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": e.data,
    })
}
