//! Rules-managed play state: characters, combat and dice.
//!
//! The foundation keeps this minimal; the D&D 5e rules (characters in play, combat,
//! conditions, dice) grow here behind the same three entry points, which
//! [`crate::SessionState`] calls.

use crate::command::{Ctx, JoinRequest};
use crate::error::Result;
use crate::event::Event;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Game {}

impl Game {
    /// The play state of a new session.
    pub fn new(_session_id: Uuid, _settings: &Value) -> Self {
        Game {}
    }

    /// Validates the rules' part of a join (e.g. a character sheet).
    pub fn check_join(&self, _ctx: &Ctx, _join: &JoinRequest) -> Result<()> {
        Ok(())
    }

    /// Follows every applied event.
    pub fn apply(&mut self, _event: &Event) {}

    /// What clients see.
    pub fn view(&self) -> Value {
        json!({})
    }
}
