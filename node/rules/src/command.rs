//! Commands: what a client (or the node on a client's behalf) asks a session to do.
//!
//! A command is *decided* against the current state ([`crate::SessionState::decide`]):
//! either refused with a [`crate::RuleError`], or turned into events. Commands are never
//! stored; the events they produce are.

use crate::character::{CharacterChanges, Pos};
use crate::conditions::{Boundary, Condition};
use crate::error::{codes, Result, RuleError};
use crate::terrain::TerrainSquare;
use crate::types::{present, Ability, SessionRole};
pub use crate::types::{ActionType, ChangeOp, Cost};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
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

/// One change of a `state_update`: set `path` to `value` (or remove it), only if the
/// current value equals `previous` when `previous` is given (compare-and-set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub path: String,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<Value>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub previous: Option<Value>,
    #[serde(default)]
    pub op: ChangeOp,
}

/// The ICD's `state_update` payload. Besides `changes`: `update_id`, the command id
/// of a message sent without an envelope `id` (an ICD client's), and `timestamp`, the
/// client's clock (informational: never used for ordering). Other fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateUpdate {
    pub changes: Vec<Change>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// The body of `POST /sessions/{id}/join`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JoinRequest {
    #[serde(default)]
    pub character_id: Option<Uuid>,
    /// `player` (default) or `observer`; `dm` only for the session's creator.
    #[serde(default)]
    pub role: Option<SessionRole>,
    /// An optional character sheet for the rules (hit points, armour class, ...).
    #[serde(default)]
    pub character: Option<Value>,
    /// What the Character Service said about `character_id` (asked by the node
    /// before the join reaches the session; never read from the client's body).
    #[serde(skip)]
    pub lookup: Option<CharacterLookup>,
}

/// The Character Service's answer to `character.get`, as the node hands it to the
/// rules with a join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CharacterLookup {
    /// The sheet and the user who owns the character.
    Found { owner_id: Uuid, sheet: Value },
    /// The service does not know the id.
    NotFound,
    /// No answer in time (or the service is down): the character enters play
    /// `pending`, filled in when the sheet arrives.
    Unavailable { reason: String },
}

/// Largest prompt or scene description sent to the LLM or Image services (characters).
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Largest narration kept from the LLM Service (characters; longer text is cut).
pub const MAX_NARRATION_CHARS: usize = 8000;
/// Largest side of a requested map grid (squares).
pub const MAX_GRID: u32 = 200;

/// A battle map's grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grid {
    pub width: u32,
    pub height: u32,
}

/// Every command the rules know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Command {
    /// WebSocket `state_update`: JSON Pointer changes to the state document.
    StateUpdate(StateUpdate),
    /// REST `POST /state`: replace the document (and its metadata).
    SaveState {
        state: Value,
        metadata: Value,
    },
    /// REST `POST /join`.
    Join(JoinRequest),
    /// WebSocket `leave`.
    Leave {},
    /// Lifecycle, DM only: created → active ⇄ paused → ended.
    SessionStart {},
    SessionPause {},
    SessionResume {},
    SessionEnd {},

    // ---- Play (see `docs/protocol.md`, "Game messages") ----
    /// DM: put a monster or NPC in play from a sheet (or a bound player's character).
    SpawnCharacter {
        /// Defaults to the command id.
        #[serde(default)]
        character_id: Option<Uuid>,
        sheet: Value,
    },
    /// DM: change a character's numbers or conditions.
    CharacterUpdate {
        character_id: Uuid,
        changes: CharacterChanges,
    },
    /// Internal, not a client type: the node applies a Message Hub
    /// `character.state.changed` (needs `ctx.admin`). Same effect as `CharacterUpdate`.
    CharacterSync {
        character_id: Uuid,
        changes: CharacterChanges,
    },
    /// DM: put a character on a square of the grid (no movement cost, no reactions).
    PlaceCharacter {
        character_id: Uuid,
        position: Pos,
    },
    /// DM: start combat with these characters; initiative is rolled. `surprised`
    /// participants lose their first turn.
    CombatStart {
        participants: Vec<Uuid>,
        #[serde(default)]
        surprised: Vec<Uuid>,
    },
    /// DM: bring more characters into the running combat.
    CombatAdd {
        participants: Vec<Uuid>,
    },
    /// DM: end combat.
    CombatEnd {},
    /// A character's controller asks the server to roll its initiative, or reports a
    /// d20 (`roll`) when `settings.allow_client_rolls` is true.
    InitiativeRoll {
        character_id: Uuid,
        #[serde(default)]
        roll: Option<u32>,
        #[serde(default)]
        modifiers: BTreeMap<String, i32>,
    },
    /// The active character's controller (or the DM) ends its turn.
    EndTurn {},
    /// Declare (and resolve) an action: attack, save, heal, dash, disengage, dodge, other.
    ActionDeclare(ActionDeclare),
    /// Move a character on the grid, step by step: along `path` (the squares between
    /// its square and `to`, each next to the one before) or, without one, the
    /// straight line.
    Move {
        character_id: Uuid,
        to: Pos,
        #[serde(default)]
        path: Vec<Pos>,
    },
    /// Stand up from prone (costs half the speed).
    StandUp {
        character_id: Uuid,
    },
    /// DM: impose a condition, optionally timed and with a source.
    ApplyCondition {
        character_id: Uuid,
        condition: Condition,
        #[serde(default)]
        duration: Option<DurationSpec>,
        #[serde(default)]
        source: Option<Uuid>,
        /// The target repeats this save at the end of each of its turns; a success
        /// ends the condition.
        #[serde(default)]
        save_ends: Option<SaveEndsSpec>,
    },
    /// DM: remove a condition (and every effect imposing it).
    RemoveCondition {
        character_id: Uuid,
        condition: Condition,
    },
    /// Drop concentration (the controller or the DM; no action needed).
    EndConcentration {
        character_id: Uuid,
    },
    /// DM: mark squares of the battle map as difficult terrain or cover (or clear them).
    TerrainSet {
        #[serde(default)]
        squares: Vec<TerrainSquare>,
        /// Remove every mark first.
        #[serde(default)]
        clear: bool,
    },
    /// A creature a paused move waits for lets the opportunity attack pass (its
    /// controller or the DM).
    ReactionDecline {
        character_id: Uuid,
    },
    // ---- Content from other services (docs/protocol.md, "Narration and maps") ----
    /// DM: ask the LLM Service for a narration.
    Narrate {
        prompt: String,
        #[serde(default)]
        context: Option<Value>,
    },
    /// DM: ask the LLM Service what a monster or NPC does; its answer is declared as
    /// the creature's action through the rules.
    MonsterDecide {
        character_id: Uuid,
        #[serde(default)]
        prompt: Option<String>,
    },
    /// DM: ask the Image Service for a battle map.
    MapRequest {
        description: String,
        grid: Grid,
    },
    /// Internal, not a client type (needs `ctx.admin`): the LLM Service answered.
    NarrationDone {
        request_id: Uuid,
        text: String,
        #[serde(default)]
        character_id: Option<Uuid>,
        #[serde(default)]
        action: Option<Value>,
    },
    /// Internal: the Image Service answered with a map.
    MapDone {
        request_id: Uuid,
        url: String,
        #[serde(default)]
        asset_id: Option<String>,
        grid: Grid,
    },
    /// Internal: a request to the LLM (`narration`) or Image (`map`) Service failed.
    ServiceFailed {
        request_id: Uuid,
        /// `narration`, `map`, or `monster_action` (the LLM's action for a monster
        /// was refused by the rules).
        what: String,
        reason: String,
    },
    /// Internal: the Character Service's sheet of a `pending` character arrived.
    CharacterFill {
        character_id: Uuid,
        owner_id: Uuid,
        sheet: Value,
    },
    /// DM: restore the session to an earlier version. The node decides it with
    /// [`crate::SessionState::decide_rollback`], which needs the past state.
    Rollback {
        to_version: u64,
    },
}

/// `action_declare`: the ICD's fields; `details` is parsed by the action's type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionDeclare {
    /// Defaults to the command id.
    #[serde(default)]
    pub action_id: Option<Uuid>,
    pub character_id: Uuid,
    pub action_type: ActionType,
    #[serde(default)]
    pub targets: Vec<Uuid>,
    #[serde(default)]
    pub details: Value,
}

/// A duration as clients write it: `{rounds, ends: "start"|"end", of}` or
/// `{minutes, ends, of}`, where `of` is `"target"` (default), `"actor"` (the creature
/// imposing it) or a character id, and `ends` defaults to `"end"`. A minute is 10
/// rounds; a duration in minutes outlasts the combat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationSpec {
    #[serde(default)]
    pub rounds: u32,
    #[serde(default)]
    pub minutes: Option<u32>,
    #[serde(default = "end_boundary")]
    pub ends: Boundary,
    #[serde(default)]
    pub of: TurnOf,
}

fn end_boundary() -> Boundary {
    Boundary::End
}

/// `save_ends` as clients write it: `{ability, dc}`, or (in an action's condition spec)
/// `true` for the action's own saving throw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SaveEndsSpec {
    Same(bool),
    Save { ability: Ability, dc: i32 },
}

/// Whose turn a duration counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TurnOf {
    Named(Named),
    Character(Uuid),
}

impl Default for TurnOf {
    fn default() -> Self {
        TurnOf::Named(Named::Target)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Named {
    Target,
    Actor,
}

impl TurnOf {
    /// The creature whose turns count, given the effect's target and actor.
    pub fn resolve(self, target: Uuid, actor: Option<Uuid>) -> Uuid {
        match self {
            TurnOf::Character(c) => c,
            TurnOf::Named(Named::Actor) => actor.unwrap_or(target),
            TurnOf::Named(Named::Target) => target,
        }
    }
}

/// Message types a WebSocket client may send (others are REST-only or internal).
pub const CLIENT_TYPES: &[&str] = &[
    "state_update",
    "leave",
    "session_start",
    "session_pause",
    "session_resume",
    "session_end",
    "spawn_character",
    "character_update",
    "place_character",
    "combat_start",
    "combat_add",
    "combat_end",
    "initiative_roll",
    "end_turn",
    "action_declare",
    "move",
    "stand_up",
    "apply_condition",
    "remove_condition",
    "end_concentration",
    "terrain_set",
    "reaction_decline",
    "rollback",
    "narrate",
    "monster_decide",
    "map_request",
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
        // The tag first, then the payload: serde reads the payload straight into the
        // variant (a JSON object would put `data` first and make serde buffer it).
        let entries = [
            (Value::String("type".into()), Value::String(kind.into())),
            (Value::String("data".into()), data),
        ];
        let tagged =
            serde::de::value::MapDeserializer::<_, serde_json::Error>::new(entries.into_iter());
        Command::deserialize(tagged).map_err(|e| {
            RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("invalid `data` for {kind:?}: {e}"),
            )
        })
    }

    /// [`Command::from_client`] from the payload's JSON text, read straight into the
    /// command (no intermediate JSON value).
    pub fn from_client_json(kind: &str, data: &str) -> Result<Command> {
        if !CLIENT_TYPES.contains(&kind) {
            return Command::from_client(kind, Value::Null);
        }
        // The tag first: serde then reads the payload straight into the variant.
        let tagged = format!(r#"{{"type":{},"data":{data}}}"#, Value::from(kind));
        serde_json::from_str(&tagged).map_err(|e| {
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
            Command::SpawnCharacter { .. } => "spawn_character",
            Command::CharacterUpdate { .. } => "character_update",
            Command::CharacterSync { .. } => "character_sync",
            Command::PlaceCharacter { .. } => "place_character",
            Command::CombatStart { .. } => "combat_start",
            Command::CombatAdd { .. } => "combat_add",
            Command::CombatEnd {} => "combat_end",
            Command::InitiativeRoll { .. } => "initiative_roll",
            Command::EndTurn {} => "end_turn",
            Command::ActionDeclare(_) => "action_declare",
            Command::Move { .. } => "move",
            Command::StandUp { .. } => "stand_up",
            Command::ApplyCondition { .. } => "apply_condition",
            Command::RemoveCondition { .. } => "remove_condition",
            Command::EndConcentration { .. } => "end_concentration",
            Command::TerrainSet { .. } => "terrain_set",
            Command::ReactionDecline { .. } => "reaction_decline",
            Command::Rollback { .. } => "rollback",
            Command::Narrate { .. } => "narrate",
            Command::MonsterDecide { .. } => "monster_decide",
            Command::MapRequest { .. } => "map_request",
            Command::NarrationDone { .. } => "narration_done",
            Command::MapDone { .. } => "map_done",
            Command::ServiceFailed { .. } => "service_failed",
            Command::CharacterFill { .. } => "character_fill",
        }
    }

    /// Combat commands, for the ICD's "combat actions per minute per player" limit.
    pub fn is_combat(&self) -> bool {
        matches!(
            self,
            Command::CombatStart { .. }
                | Command::CombatAdd { .. }
                | Command::CombatEnd {}
                | Command::InitiativeRoll { .. }
                | Command::EndTurn {}
                | Command::ActionDeclare(_)
                | Command::Move { .. }
                | Command::StandUp { .. }
                | Command::ReactionDecline { .. }
        )
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
            Command::from_client("save_state", json!({}))
                .unwrap_err()
                .code,
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
