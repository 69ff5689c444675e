//! Events: what happened to a session. Each event is one session version.
//!
//! Events are the only thing stored (`session_events.event_type` is the tag,
//! `event_data` the content) and the only thing clients are sent (rendered as
//! `{"type": tag, "version": N, "data": content}`). [`crate::SessionState::apply`]
//! applies an event without any choice left to make: every dice roll and every
//! computed value is inside the event, so replaying the log reproduces the state
//! exactly.

use crate::character::{CharacterChanges, DamageReport, Pos};
use crate::conditions::{Condition, Duration, SaveEnds};
use crate::dice::{Mode, Roll};
use crate::terrain::{Cover, TerrainSquare};
use crate::types::{Ability, ActionType, ChangeOp, Cost, SessionRole, Status};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

/// One applied change, with the value it replaced (`previous`, absent if none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedChange {
    pub path: String,
    /// The new value; absent for a removal. An explicit `null` is a value: it must
    /// read back as `Some(Null)`, or replaying the stored event would skip the change
    /// (found by fuzzing: `"value": null` was read back as absent).
    #[serde(
        default,
        deserialize_with = "crate::types::present",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<Value>,
    #[serde(
        default,
        deserialize_with = "crate::types::present",
        skip_serializing_if = "Option::is_none"
    )]
    pub previous: Option<Value>,
    #[serde(default, skip_serializing_if = "is_set")]
    pub op: ChangeOp,
}

fn is_set(op: &ChangeOp) -> bool {
    *op == ChangeOp::Set
}

// Variants differ in size; events are built once and moved a few times, so boxing
// them would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
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
        /// The play-state merge patch when the join puts a character in play (like
        /// every play event), so clients that follow patches see it. Absent in events
        /// stored before it existed; `apply` then builds the character from the sheet.
        #[serde(default, skip_serializing_if = "Value::is_null")]
        patch: Value,
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

    // ---- Play events: each carries `patch`, the merge patch of the play state ----
    CharacterSpawned(CharacterSpawned),
    CharacterUpdated(CharacterUpdated),
    CharacterPlaced(CharacterPlaced),
    CombatStarted(CombatStarted),
    CombatJoined(CombatJoined),
    /// ICD `initiative_roll`.
    InitiativeRoll(InitiativeRolled),
    /// ICD `turn_change`.
    TurnChange(TurnChanged),
    DeathSave(DeathSaveRolled),
    /// ICD `action_declare`.
    ActionDeclare(ActionDeclared),
    /// ICD `action_resolve`.
    ActionResolve(ActionResolved),
    CharacterMoved(CharacterMoved),
    StoodUp(StoodUp),
    OpportunityAttack(OpportunityAttack),
    ConditionApplied(ConditionApplied),
    ConditionRemoved(ConditionRemoved),
    ConcentrationEnded(ConcentrationEnded),
    CombatEnded(CombatEnded),
    /// The DM marked squares of the battle map (difficult terrain, cover).
    TerrainChanged(TerrainChanged),
    /// A creature waiting to make an opportunity attack let it pass.
    ReactionDeclined(ReactionDeclined),
    /// The repeat saving throw that may end a "save ends" effect.
    RepeatSave(RepeatSave),
    /// A DM's rollback: the document and play state of an earlier version.
    StateRestored(StateRestored),

    // ---- Content from other services (`crate::services`) ----
    /// A `narrate` or `monster_decide` went to the LLM Service.
    NarrationRequested(NarrationRequested),
    /// The LLM Service's answer.
    Narration(Narration),
    /// The LLM Service did not answer in time (or refused): play goes on.
    NarrationFailed(ServiceFailed),
    /// A `map_request` went to the Image Service.
    MapRequested(MapRequested),
    /// The Image Service's map (a URL, never the image).
    MapUpdated(MapUpdated),
    /// The Image Service did not answer in time (or refused).
    MapFailed(ServiceFailed),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NarrationRequested {
    /// The command id of the request; the answer's `request_id`.
    pub request_id: Uuid,
    /// `narrate` or `monster_decide`.
    pub request_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub character_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    pub by: Uuid,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Narration {
    pub request_id: Uuid,
    pub text: String,
    /// `monster_decide`: the creature and the action the LLM chose (declared next,
    /// through the rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub character_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Value>,
    pub by: Uuid,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceFailed {
    pub request_id: Uuid,
    pub reason: String,
    pub by: Uuid,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapRequested {
    pub request_id: Uuid,
    pub description: String,
    pub grid: crate::command::Grid,
    pub by: Uuid,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapUpdated {
    pub request_id: Uuid,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_id: Option<String>,
    pub grid: crate::command::Grid,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// Serde helpers for the `patch` field every play event has.
mod patch_field {
    pub fn skip(p: &serde_json::Value) -> bool {
        crate::patch::is_empty(p)
    }
}

/// A monster, NPC or character entered play (`spawn_character`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterSpawned {
    pub character_id: Uuid,
    pub name: String,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// `character_update` (source `dm`) or a hub `character.state.changed` (source `hub`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterUpdated {
    pub character_id: Uuid,
    pub changes: CharacterChanges,
    pub source: String,
    /// Effects that ended because a condition was removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effects_ended: Vec<u64>,
    /// The Constitution save of a concentrating creature that lost hit points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concentration_check: Option<ConcentrationCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolls: Vec<Roll>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterPlaced {
    pub character_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Pos>,
    pub position: Pos,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CombatStarted {
    pub combat_id: Uuid,
    pub participants: Vec<Uuid>,
    /// Participants surprised: each loses its first turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub surprised: Vec<Uuid>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// `combat_add`: more participants in a running combat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CombatJoined {
    pub combat_id: Uuid,
    pub participants: Vec<Uuid>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// ICD `initiative_roll`: `roll` is the total; `modifiers` what was added to the d20.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitiativeRolled {
    pub combat_id: Uuid,
    pub character_id: Uuid,
    pub roll: i32,
    pub modifiers: BTreeMap<String, i32>,
    pub d20: u32,
    pub rolls: Vec<Roll>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// ICD `turn_change`: whose turn it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnChanged {
    pub combat_id: Uuid,
    pub active_character: Uuid,
    pub round: u32,
    /// 1-based position of the active character in the initiative order.
    pub turn_number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_character: Option<Uuid>,
    /// Timed effects that expired at the end of the previous turn or the start of
    /// this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effects_ended: Vec<u64>,
    /// The active creature is surprised: it loses this turn, which ends at once (the
    /// next `turn_change` follows in the same command).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub surprised: bool,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// A dying player character's death saving throw at the start of its turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeathSaveRolled {
    pub character_id: Uuid,
    pub roll: u32,
    /// `success`, `failure`, `two_failures` (a 1) or `regain_hp` (a 20).
    pub result: String,
    pub successes: u8,
    pub failures: u8,
    /// `dying`, `stable`, `dead` or `conscious`.
    pub outcome: String,
    pub rolls: Vec<Roll>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// ICD `action_declare`, echoed with what it costs; the patch spends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionDeclared {
    pub action_id: Uuid,
    pub character_id: Uuid,
    pub action_type: ActionType,
    pub targets: Vec<Uuid>,
    pub details: Value,
    pub cost: Cost,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// ICD `action_resolve`: one outcome per target, every roll, and the patch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionResolved {
    pub action_id: Uuid,
    pub character_id: Uuid,
    pub action_type: ActionType,
    pub outcomes: Vec<Outcome>,
    pub rolls: Vec<Roll>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// What an action did to one target (ICD fields first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub target_id: Uuid,
    /// What happened, in words: `hit`, `miss`, `critical`, `save_succeeded`,
    /// `save_failed`, `healed`, `unconscious`, `dead`, `instant_death`,
    /// `death_save_failure`, `conscious`, `temp_hp_absorbed`, `temp_hp_gained`,
    /// `concentration_kept`, `concentration_broken`, `immune:<condition>`, ...
    pub effects: Vec<String>,
    pub damage: DamageReport,
    /// Conditions this action imposed on the target.
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackRoll>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save: Option<SaveRoll>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concentration_check: Option<ConcentrationCheck>,
    /// An ability check (the Hide action's Dexterity (Stealth) check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckRoll>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healed: Option<u32>,
    /// The target's hit points after the action.
    pub hp: u32,
    pub temp_hp: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackRoll {
    /// The kept d20.
    pub d20: u32,
    pub bonus: i32,
    /// Extra dice added to the roll (`details.attack_dice`, e.g. *bless* `1d4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bonus_dice: Option<i32>,
    pub total: i32,
    /// The armour class to meet: the target's AC plus its cover.
    pub ac: u32,
    #[serde(default, skip_serializing_if = "Cover::is_none")]
    pub cover: Cover,
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advantage: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disadvantage: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance: Option<u32>,
    pub hit: bool,
    pub critical: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveRoll {
    pub ability: Ability,
    pub dc: i32,
    /// The kept d20; absent when the save failed automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d20: Option<u32>,
    pub bonus: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i32>,
    pub mode: Mode,
    /// Sources of advantage and disadvantage (conditions, traits, exhaustion).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advantage: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disadvantage: Vec<String>,
    /// Cover added to a Dexterity save (included in `bonus`).
    #[serde(default, skip_serializing_if = "Cover::is_none")]
    pub cover: Cover,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_fail: Option<Condition>,
    pub success: bool,
}

/// An ability check against a DC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRoll {
    pub ability: Ability,
    /// The skill, e.g. `stealth`.
    pub skill: String,
    pub dc: i32,
    pub d20: u32,
    pub bonus: i32,
    pub total: i32,
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advantage: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disadvantage: Vec<String>,
    pub success: bool,
}

/// The Constitution save a concentrating creature makes when damaged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcentrationCheck {
    pub dc: i32,
    pub d20: u32,
    pub total: i32,
    pub success: bool,
    #[serde(default, skip_serializing_if = "is_normal")]
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advantage: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disadvantage: Vec<String>,
}

fn is_normal(m: &Mode) -> bool {
    *m == Mode::Normal
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterMoved {
    pub character_id: Uuid,
    pub from: Pos,
    pub to: Pos,
    /// The squares entered between `from` and `to` when they are not the straight
    /// line (a move with a `path`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<Pos>,
    /// Feet walked: 5 per square entered.
    pub distance: u32,
    /// Feet of movement spent (a step costs 5 ft, +5 into difficult terrain, +5 while
    /// crawling prone); 0 out of combat.
    pub cost: u32,
    /// Movement left this turn, in combat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub movement_left: Option<u32>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoodUp {
    pub character_id: Uuid,
    pub cost: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub movement_left: Option<u32>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// A move is about to leave hostile creatures' reach: it pauses on `from`, before the
/// step to `to`, until each reactor has answered (an `action_declare` with
/// `details.cost = "reaction"`, or `reaction_decline`); then the rest of the move
/// (`remaining`) is walked. The patch records the pause (`combat.opportunity`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpportunityAttack {
    pub character_id: Uuid,
    /// The square the mover stands on (still within the reactors' reach).
    pub from: Pos,
    /// The square it steps to next (out of their reach).
    pub to: Pos,
    pub reactors: Vec<Uuid>,
    /// Where the move ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Pos>,
    /// The squares still to walk, `to` first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remaining: Vec<Pos>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionApplied {
    pub character_id: Uuid,
    pub condition: Condition,
    /// The effect recording source and duration, if the condition has either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_ends: Option<SaveEnds>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionRemoved {
    pub character_id: Uuid,
    pub condition: Condition,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effects_ended: Vec<u64>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcentrationEnded {
    pub character_id: Uuid,
    pub action_id: Uuid,
    /// `voluntary` (the only reason with its own event; damage and incapacitation
    /// show in the outcome or patch of the event that caused them).
    pub reason: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effects_ended: Vec<u64>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CombatEnded {
    pub combat_id: Uuid,
    pub rounds: u32,
    /// Timed effects end with the combat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effects_ended: Vec<u64>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// `terrain_set`: squares marked (or cleared) on the battle map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerrainChanged {
    pub squares: Vec<TerrainSquare>,
    /// Every mark was removed first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cleared: bool,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// `reaction_decline`: `character_id` lets `mover` leave its reach unpunished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReactionDeclined {
    pub character_id: Uuid,
    pub mover: Uuid,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// At the end of its turn, a creature repeats the saving throw of a "save ends"
/// effect; a success ends it (and every effect of the same action and save).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepeatSave {
    pub character_id: Uuid,
    pub effect_ids: Vec<u64>,
    pub conditions: Vec<Condition>,
    pub save: SaveRoll,
    /// The effects ended (the save succeeded).
    pub ended: bool,
    pub rolls: Vec<Roll>,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
}

/// The state document, metadata and play state of version `to_version`; members and
/// lifecycle status stay as they are, and the dice stream continues (no roll repeats).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRestored {
    pub to_version: u64,
    pub doc: Value,
    pub metadata: Value,
    pub by: Uuid,
    #[serde(default, skip_serializing_if = "patch_field::skip")]
    pub patch: Value,
    pub timestamp: String,
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
            Event::CharacterSpawned(_) => "character_spawned",
            Event::CharacterUpdated(_) => "character_updated",
            Event::CharacterPlaced(_) => "character_placed",
            Event::CombatStarted(_) => "combat_started",
            Event::CombatJoined(_) => "combat_joined",
            Event::InitiativeRoll(_) => "initiative_roll",
            Event::TurnChange(_) => "turn_change",
            Event::DeathSave(_) => "death_save",
            Event::ActionDeclare(_) => "action_declare",
            Event::ActionResolve(_) => "action_resolve",
            Event::CharacterMoved(_) => "character_moved",
            Event::StoodUp(_) => "stood_up",
            Event::OpportunityAttack(_) => "opportunity_attack",
            Event::ConditionApplied(_) => "condition_applied",
            Event::ConditionRemoved(_) => "condition_removed",
            Event::ConcentrationEnded(_) => "concentration_ended",
            Event::CombatEnded(_) => "combat_ended",
            Event::TerrainChanged(_) => "terrain_changed",
            Event::ReactionDeclined(_) => "reaction_declined",
            Event::RepeatSave(_) => "repeat_save",
            Event::StateRestored(_) => "state_restored",
            Event::NarrationRequested(_) => "narration_requested",
            Event::Narration(_) => "narration",
            Event::NarrationFailed(_) => "narration_failed",
            Event::MapRequested(_) => "map_requested",
            Event::MapUpdated(_) => "map_updated",
            Event::MapFailed(_) => "map_failed",
        }
    }

    /// When it happened (the node's clock at decide time).
    pub fn timestamp(&self) -> &str {
        match self {
            Event::SessionCreated { timestamp, .. }
            | Event::StateUpdate { timestamp, .. }
            | Event::PlayerJoined { timestamp, .. }
            | Event::PlayerLeft { timestamp, .. }
            | Event::SessionStatusChanged { timestamp, .. } => timestamp,
            Event::CharacterSpawned(e) => &e.timestamp,
            Event::CharacterUpdated(e) => &e.timestamp,
            Event::CharacterPlaced(e) => &e.timestamp,
            Event::CombatStarted(e) => &e.timestamp,
            Event::CombatJoined(e) => &e.timestamp,
            Event::InitiativeRoll(e) => &e.timestamp,
            Event::TurnChange(e) => &e.timestamp,
            Event::DeathSave(e) => &e.timestamp,
            Event::ActionDeclare(e) => &e.timestamp,
            Event::ActionResolve(e) => &e.timestamp,
            Event::CharacterMoved(e) => &e.timestamp,
            Event::StoodUp(e) => &e.timestamp,
            Event::OpportunityAttack(e) => &e.timestamp,
            Event::ConditionApplied(e) => &e.timestamp,
            Event::ConditionRemoved(e) => &e.timestamp,
            Event::ConcentrationEnded(e) => &e.timestamp,
            Event::CombatEnded(e) => &e.timestamp,
            Event::TerrainChanged(e) => &e.timestamp,
            Event::ReactionDeclined(e) => &e.timestamp,
            Event::RepeatSave(e) => &e.timestamp,
            Event::StateRestored(e) => &e.timestamp,
            Event::NarrationRequested(e) => &e.timestamp,
            Event::Narration(e) => &e.timestamp,
            Event::NarrationFailed(e) | Event::MapFailed(e) => &e.timestamp,
            Event::MapRequested(e) => &e.timestamp,
            Event::MapUpdated(e) => &e.timestamp,
        }
    }

    /// The user whose command produced the event.
    pub fn by(&self) -> Uuid {
        match self {
            Event::SessionCreated { created_by, .. } => *created_by,
            Event::StateUpdate { user_id, .. }
            | Event::PlayerJoined { user_id, .. }
            | Event::PlayerLeft { user_id, .. } => *user_id,
            Event::SessionStatusChanged { by, .. } => *by,
            Event::CharacterSpawned(e) => e.by,
            Event::CharacterUpdated(e) => e.by,
            Event::CharacterPlaced(e) => e.by,
            Event::CombatStarted(e) => e.by,
            Event::CombatJoined(e) => e.by,
            Event::InitiativeRoll(e) => e.by,
            Event::TurnChange(e) => e.by,
            Event::DeathSave(e) => e.by,
            Event::ActionDeclare(e) => e.by,
            Event::ActionResolve(e) => e.by,
            Event::CharacterMoved(e) => e.by,
            Event::StoodUp(e) => e.by,
            Event::OpportunityAttack(e) => e.by,
            Event::ConditionApplied(e) => e.by,
            Event::ConditionRemoved(e) => e.by,
            Event::ConcentrationEnded(e) => e.by,
            Event::CombatEnded(e) => e.by,
            Event::TerrainChanged(e) => e.by,
            Event::ReactionDeclined(e) => e.by,
            Event::RepeatSave(e) => e.by,
            Event::StateRestored(e) => e.by,
            Event::NarrationRequested(e) => e.by,
            Event::Narration(e) => e.by,
            Event::NarrationFailed(e) | Event::MapFailed(e) => e.by,
            Event::MapRequested(e) => e.by,
            Event::MapUpdated(e) => e.by,
        }
    }

    /// The play-state merge patch of a play event.
    pub fn patch(&self) -> Option<&Value> {
        Some(match self {
            Event::PlayerJoined { patch, .. } if !patch.is_null() => patch,
            Event::SessionCreated { .. }
            | Event::StateUpdate { .. }
            | Event::PlayerJoined { .. }
            | Event::PlayerLeft { .. }
            | Event::SessionStatusChanged { .. }
            | Event::NarrationRequested(_)
            | Event::Narration(_)
            | Event::NarrationFailed(_)
            | Event::MapRequested(_)
            | Event::MapFailed(_) => return None,
            Event::CharacterSpawned(e) => &e.patch,
            Event::CharacterUpdated(e) => &e.patch,
            Event::CharacterPlaced(e) => &e.patch,
            Event::CombatStarted(e) => &e.patch,
            Event::CombatJoined(e) => &e.patch,
            Event::InitiativeRoll(e) => &e.patch,
            Event::TurnChange(e) => &e.patch,
            Event::DeathSave(e) => &e.patch,
            Event::ActionDeclare(e) => &e.patch,
            Event::ActionResolve(e) => &e.patch,
            Event::CharacterMoved(e) => &e.patch,
            Event::StoodUp(e) => &e.patch,
            Event::OpportunityAttack(e) => &e.patch,
            Event::ConditionApplied(e) => &e.patch,
            Event::ConditionRemoved(e) => &e.patch,
            Event::ConcentrationEnded(e) => &e.patch,
            Event::CombatEnded(e) => &e.patch,
            Event::TerrainChanged(e) => &e.patch,
            Event::ReactionDeclined(e) => &e.patch,
            Event::RepeatSave(e) => &e.patch,
            Event::StateRestored(e) => &e.patch,
            Event::MapUpdated(e) => &e.patch,
        })
    }

    /// The dice rolled for this event.
    pub fn rolls(&self) -> &[Roll] {
        match self {
            Event::InitiativeRoll(e) => &e.rolls,
            Event::DeathSave(e) => &e.rolls,
            Event::ActionResolve(e) => &e.rolls,
            Event::CharacterUpdated(e) => &e.rolls,
            Event::RepeatSave(e) => &e.rolls,
            _ => &[],
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

    /// The event's data as JSON text (the `data` of [`Event::to_parts`]), written
    /// straight from the event without building a JSON value first. Key order follows
    /// the fields' declaration (`to_parts` sorts keys); the JSON is the same.
    pub fn data_json(&self) -> String {
        // Adjacently tagged: serde writes `{"type":<kind>,"data":<data>}`.
        let full = serde_json::to_string(self).expect("events serialise");
        let head = format!(
            r#"{{"type":{},"data":"#,
            serde_json::to_string(self.kind()).expect("a string serialises")
        );
        match full.strip_prefix(&head).and_then(|d| d.strip_suffix('}')) {
            Some(data) => data.to_string(),
            None => self.to_parts().1.to_string(),
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
