//! The data of a running combat: participants, initiative, the turn order, the active
//! creature's action economy, a move paused for opportunity attacks. Plain data with
//! its queries; the rules that change it are in [`crate::combat`] (and `actions`,
//! `movement`, `tactics`), above [`crate::game`], which holds a combat.

use crate::character::Pos;
use crate::types::ActionType;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Most creatures in one combat.
pub const MAX_PARTICIPANTS: usize = 100;
/// Most client-reported initiative modifiers, and their bound.
pub const MAX_CLIENT_MODIFIERS: usize = 5;
pub const MAX_CLIENT_MODIFIER: i32 = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Combat {
    /// The id of the `combat_start` command.
    pub id: Uuid,
    /// 0 while initiative is being rolled, then 1, 2, ...
    pub round: u32,
    /// 1-based position of the active creature in `order`; 0 before the first turn.
    pub turn_number: u32,
    pub participants: BTreeMap<Uuid, Participant>,
    /// The initiative order; empty until everyone has rolled.
    pub order: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<Turn>,
    /// A move paused before leaving hostile creatures' reach (see
    /// [`crate::movement`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opportunity: Option<Opportunity>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Participant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiative: Option<Initiative>,
    /// Spent its reaction since the start of its last turn.
    pub reaction_used: bool,
    /// Surprised, until its first turn ends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub surprised: bool,
    /// An action readied until the start of its next turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readied: Option<Readied>,
    /// Help given until the start of its next turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<HelpGiven>,
}

/// A readied action (SRD 5.1, "Actions in Combat: Ready"), released with the reaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readied {
    /// The Ready action's id (a readied spell's concentration is on it).
    pub action_id: Uuid,
    /// What will be done: `attack`, `save`, `heal` or `other`.
    pub action_type: ActionType,
    /// The perceivable circumstance that releases it (free text).
    pub trigger: String,
    /// A spell held with concentration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spell: bool,
}

/// The Help action (SRD 5.1, "Actions in Combat: Help"): `ally`'s next attack roll
/// against `against` (or, without one, its next ability check) has advantage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelpGiven {
    pub ally: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub against: Option<Uuid>,
}

/// A move paused on `at`, before the step that leaves the reach of `waiting`; it goes
/// on along `remaining` once each of them has answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opportunity {
    pub mover: Uuid,
    pub at: Pos,
    /// The squares still to walk (the step out of reach first).
    pub remaining: Vec<Pos>,
    /// Reactors that have not answered yet.
    pub waiting: Vec<Uuid>,
    /// Every reactor offered the attack at `at` (none is offered it again when the
    /// move goes on from there).
    pub offered: Vec<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Initiative {
    pub total: i32,
    pub d20: u32,
    /// Everything added to the d20 (the tie-breaker).
    pub modifier: i32,
}

/// The action economy of the active creature's turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub character_id: Uuid,
    pub action_used: bool,
    pub bonus_action_used: bool,
    /// Attacks left from an Attack action already taken (Extra Attack).
    pub attacks_left: u32,
    /// Feet moved (or spent standing up) this turn.
    pub movement_used: u32,
    /// Extra feet from Dash.
    pub movement_bonus: u32,
    /// Took the Disengage action: its moves provoke no opportunity attacks.
    pub disengaged: bool,
}

impl Turn {
    pub(crate) fn new(character_id: Uuid) -> Self {
        Turn {
            character_id,
            action_used: false,
            bonus_action_used: false,
            attacks_left: 0,
            movement_used: 0,
            movement_bonus: 0,
            disengaged: false,
        }
    }

    /// Feet of movement left for a creature of `speed`.
    pub fn movement_left(&self, speed: u32) -> u32 {
        (speed + self.movement_bonus).saturating_sub(self.movement_used)
    }
}

impl Combat {
    /// Participants by initiative: the fixed order, or while rolling, those who
    /// rolled (best first) followed by those who have not.
    pub fn initiative_order(&self) -> Vec<Uuid> {
        if !self.order.is_empty() {
            return self.order.clone();
        }
        self.sorted()
    }

    /// Every participant, best initiative first (unrolled last).
    pub(crate) fn sorted(&self) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self.participants.keys().copied().collect();
        ids.sort_by_key(|id| sort_key(*id, &self.participants[id]));
        ids
    }

    /// The participants that have rolled, best first: the turn order.
    pub(crate) fn rolled_order(&self) -> Vec<Uuid> {
        let mut ids = self.sorted();
        ids.retain(|id| self.participants[id].initiative.is_some());
        ids
    }

    pub(crate) fn everyone_rolled(&self) -> bool {
        self.participants.values().all(|p| p.initiative.is_some())
    }

    /// The index of the active creature in `order`.
    pub(crate) fn active_index(&self) -> Option<usize> {
        let t = self.turn.as_ref()?;
        self.order.iter().position(|id| *id == t.character_id)
    }

    /// Whether `id` is a participant still surprised (its first turn has not ended).
    pub fn surprised(&self, id: Uuid) -> bool {
        self.participants.get(&id).is_some_and(|p| p.surprised)
    }
}

/// Higher total first, then higher modifier, then lower id; unrolled last.
fn sort_key(id: Uuid, p: &Participant) -> (bool, Reverse<i32>, Reverse<i32>, Uuid) {
    match &p.initiative {
        Some(i) => (false, Reverse(i.total), Reverse(i.modifier), id),
        None => (true, Reverse(0), Reverse(0), id),
    }
}
