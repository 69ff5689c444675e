//! Plain data the other modules share, at the bottom of the crate: it imports nothing
//! else of the crate, so the modules that decide and apply (`state`, `game`, the combat
//! modules) and the ones that describe (`command`, `event`) all build on it without
//! importing each other in a circle. Each type is re-exported where it was first
//! defined (`state::Status`, `command::ActionType`, `character::Ability`, ...).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Lifecycle: created → active ⇄ paused → ended (ended is final).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Created,
    Active,
    Paused,
    Ended,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Active => "active",
            Status::Paused => "paused",
            Status::Ended => "ended",
        }
    }
}

/// A member's role inside one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionRole {
    Dm,
    Player,
    Observer,
}

impl SessionRole {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionRole::Dm => "dm",
            SessionRole::Player => "player",
            SessionRole::Observer => "observer",
        }
    }
}

/// An ability (the six of 5e).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ability {
    Str,
    Dex,
    Con,
    Int,
    Wis,
    Cha,
}

impl Ability {
    pub fn as_str(self) -> &'static str {
        match self {
            Ability::Str => "str",
            Ability::Dex => "dex",
            Ability::Con => "con",
            Ability::Int => "int",
            Ability::Wis => "wis",
            Ability::Cha => "cha",
        }
    }
}

/// `op` of one change in a `state_update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    #[default]
    Set,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionType {
    /// An attack roll against each target's armour class.
    Attack,
    /// Each target makes a saving throw against a DC.
    Save,
    /// Healing (or temporary hit points).
    Heal,
    Dash,
    Disengage,
    Dodge,
    /// Help an ally: advantage on its next attack against a creature near the helper,
    /// or on its next ability check.
    Help,
    /// A Dexterity (Stealth) check to become hidden.
    Hide,
    /// Ready an action to release with the reaction when a trigger occurs.
    Ready,
    /// Anything else: spends the action, no mechanics.
    Other,
}

impl ActionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::Attack => "attack",
            ActionType::Save => "save",
            ActionType::Heal => "heal",
            ActionType::Dash => "dash",
            ActionType::Disengage => "disengage",
            ActionType::Dodge => "dodge",
            ActionType::Help => "help",
            ActionType::Hide => "hide",
            ActionType::Ready => "ready",
            ActionType::Other => "other",
        }
    }
}

/// What an action spends from the action economy (`details.cost`; default `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Cost {
    #[default]
    Action,
    BonusAction,
    /// The only cost usable outside the character's own turn.
    Reaction,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(Null)`).
pub(crate) fn present<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}
