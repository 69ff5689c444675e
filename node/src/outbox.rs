//! Message Hub events derived from session events, written to `hub_outbox` in the same
//! transaction (see `crate::committer`), and the combat summary kept in Redis.

use crate::committer::{EventRow, OutboxRow};
use gs_rules::SessionState;
use std::collections::BTreeMap;

/// Outbox rows for a batch of committed events.
pub fn rows(_state: &SessionState, _events: &[EventRow]) -> Vec<OutboxRow> {
    Vec::new()
}

/// The ICD's `session:{id}:combat` hash (round, turn, initiative order, active
/// effects), when combat is running.
pub fn combat_summary(state: &SessionState) -> Option<BTreeMap<String, String>> {
    state.game.combat_summary()
}
