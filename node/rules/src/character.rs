//! Characters in play: the numbers the rules need, and how hit points move.
//!
//! A character enters play from a *sheet* (JSON): a player's join body
//! (`character_id` + `character`) or the DM's `spawn_character`. The sheet is
//! validated here ([`Character::from_sheet`], error `invalid_character`); unknown
//! fields are ignored, because sheets come from the character service and carry far
//! more than combat needs.
//!
//! # Hit points (SRD 5.1, "Damage and Healing")
//!
//! * Temporary hit points absorb damage first; gaining them replaces the current
//!   temporary hit points only if higher (they do not stack).
//! * Damage is adjusted per type: immunity → 0, resistance → half (rounded down),
//!   vulnerability → double. A petrified creature resists all damage.
//! * At 0 hit points a monster dies (condition `dead`); a player character falls
//!   `unconscious` (and `prone`) and starts making death saving throws, unless the
//!   damage left after reaching 0 is at least its hit point maximum (instant death).
//! * Damage at 0 hit points is one failed death save (two on a critical hit); damage
//!   of at least the hit point maximum kills outright.
//! * Healing never exceeds the maximum; it wakes an unconscious player character and
//!   resets its death saves. The dead cannot be healed.
//!
//! # Exhaustion (SRD 5.1, appendix A, "Exhaustion")
//!
//! `exhaustion` is a level 0–6 whose effects add up: 1 disadvantage on ability checks
//! (the Hide check is the only one the rules roll); 2 speed halved; 3 disadvantage on
//! attack rolls and saving throws; 4 hit point maximum halved; 5 speed 0; 6 death.
//!
//! # Advantage on saving throws from traits
//!
//! `save_advantages` / `save_disadvantages` list what a creature's traits give it
//! advantage or disadvantage on: an ability (`"dex"`: every Dexterity save), `"magic"`
//! (saves against spells and magical effects, e.g. Magic Resistance), or
//! `"concentration"` (the Constitution saves that keep concentration, e.g. War Caster).

use crate::conditions::{Condition, Conditions};
use crate::error::{codes, Result, RuleError};
pub use crate::types::Ability;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// Bounds of sheet values (a sheet outside them is `invalid_character`).
pub const MAX_HP: i64 = 10_000;
pub const MAX_AC: i64 = 50;
pub const MAX_SPEED: i64 = 1_000;
pub const MAX_COORD: i32 = 10_000;
pub const MAX_NAME: usize = 100;
pub const MAX_SIDE: usize = 50;

/// What a trait gives advantage or disadvantage on (`save_advantages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveTag {
    Str,
    Dex,
    Con,
    Int,
    Wis,
    Cha,
    /// Saves against spells and other magical effects (Magic Resistance).
    Magic,
    /// Constitution saves to keep concentration (War Caster).
    Concentration,
}

impl SaveTag {
    pub fn as_str(self) -> &'static str {
        match self {
            SaveTag::Str => "str",
            SaveTag::Dex => "dex",
            SaveTag::Con => "con",
            SaveTag::Int => "int",
            SaveTag::Wis => "wis",
            SaveTag::Cha => "cha",
            SaveTag::Magic => "magic",
            SaveTag::Concentration => "concentration",
        }
    }

    /// Whether the tag applies to a save of `ability`, `magical` or not, made to keep
    /// `concentration` or not.
    pub fn applies(self, ability: Ability, magical: bool, concentration: bool) -> bool {
        match self {
            SaveTag::Magic => magical,
            SaveTag::Concentration => concentration,
            other => other.as_str() == ability.as_str(),
        }
    }
}

/// Ability modifiers (not scores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Abilities {
    pub str: i32,
    pub dex: i32,
    pub con: i32,
    pub int: i32,
    pub wis: i32,
    pub cha: i32,
}

impl Abilities {
    pub fn get(&self, a: Ability) -> i32 {
        match a {
            Ability::Str => self.str,
            Ability::Dex => self.dex,
            Ability::Con => self.con,
            Ability::Int => self.int,
            Ability::Wis => self.wis,
            Ability::Cha => self.cha,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DamageType {
    Acid,
    Bludgeoning,
    Cold,
    Fire,
    Force,
    Lightning,
    Necrotic,
    Piercing,
    Poison,
    Psychic,
    Radiant,
    Slashing,
    Thunder,
}

/// A square of the battle grid (one square is 5 ft).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pos {
    pub x: i32,
    pub y: i32,
}

impl Pos {
    /// Feet between two squares, by the 5e simple diagonal rule: every step, straight
    /// or diagonal, is 5 ft, so the distance is max(|dx|, |dy|) × 5.
    pub fn distance(self, other: Pos) -> u32 {
        let dx = (i64::from(self.x) - i64::from(other.x)).unsigned_abs();
        let dy = (i64::from(self.y) - i64::from(other.y)).unsigned_abs();
        (dx.max(dy) * 5).min(u64::from(u32::MAX)) as u32
    }

    pub fn in_bounds(self) -> bool {
        // `unsigned_abs`: `i32::MIN.abs()` overflows (found by fuzzing: a move to
        // y = -2147483648 passed the check and planned a 2^31-square walk).
        self.x.unsigned_abs() <= MAX_COORD as u32 && self.y.unsigned_abs() <= MAX_COORD as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeathSaves {
    pub successes: u8,
    pub failures: u8,
}

/// What a creature is concentrating on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Concentration {
    pub action_id: Uuid,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Character {
    pub id: Uuid,
    pub name: String,
    /// Player characters make death saves at 0 hit points; monsters and NPCs die.
    pub player_character: bool,
    /// Creatures on different sides are hostile (opportunity attacks, ranged
    /// attacks in melee). Player characters default to `party`, spawns to `monsters`.
    pub side: String,
    pub max_hp: u32,
    pub hp: u32,
    pub temp_hp: u32,
    pub ac: u32,
    pub abilities: Abilities,
    pub proficiency_bonus: i32,
    pub save_proficiencies: BTreeSet<Ability>,
    /// Walking speed in feet.
    pub speed: u32,
    /// Melee reach in feet.
    pub reach: u32,
    /// Added to initiative on top of the Dexterity modifier.
    pub initiative_bonus: i32,
    /// Attacks per Attack action (Extra Attack).
    pub attacks_per_action: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Pos>,
    pub conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concentration: Option<Concentration>,
    pub resistances: BTreeSet<DamageType>,
    pub vulnerabilities: BTreeSet<DamageType>,
    pub immunities: BTreeSet<DamageType>,
    pub condition_immunities: BTreeSet<Condition>,
    pub death_saves: DeathSaves,
    /// A player character at 0 hit points with three successful death saves.
    pub stable: bool,
    /// Exhaustion level, 0–6 (see the module docs).
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub exhaustion: u8,
    /// Traits giving advantage on some saving throws (see the module docs).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub save_advantages: BTreeSet<SaveTag>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub save_disadvantages: BTreeSet<SaveTag>,
    /// In play before its sheet: the Character Service did not answer the join in
    /// time. Its stand-in numbers are replaced when the sheet arrives (a
    /// `character_updated` from the service's answer or a hub event).
    #[serde(default, skip_serializing_if = "is_false")]
    pub pending: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero_u8(n: &u8) -> bool {
    *n == 0
}

/// Highest exhaustion level; it kills.
pub const MAX_EXHAUSTION: i64 = 6;

/// Ability values of a sheet: modifiers (`abilities`) or scores (`ability_scores`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AbilityValues {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub str: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dex: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub con: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wis: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cha: Option<i64>,
}

impl AbilityValues {
    fn fields(&self) -> [(Ability, Option<i64>); 6] {
        [
            (Ability::Str, self.str),
            (Ability::Dex, self.dex),
            (Ability::Con, self.con),
            (Ability::Int, self.int),
            (Ability::Wis, self.wis),
            (Ability::Cha, self.cha),
        ]
    }

    /// Overwrites the given modifiers in `into`, checking −5..=10.
    fn apply_modifiers(&self, into: &mut Abilities) -> Result<()> {
        for (a, v) in self.fields() {
            if let Some(v) = v {
                let m = in_range(&format!("abilities.{}", a.as_str()), v, -5, 10)?;
                set_ability(into, a, m);
            }
        }
        Ok(())
    }

    /// Overwrites modifiers from scores (1..=30): modifier = ⌊(score − 10) / 2⌋.
    fn apply_scores(&self, into: &mut Abilities) -> Result<()> {
        for (a, v) in self.fields() {
            if let Some(v) = v {
                let s = in_range(&format!("ability_scores.{}", a.as_str()), v, 1, 30)?;
                set_ability(into, a, (s - 10).div_euclid(2));
            }
        }
        Ok(())
    }
}

fn set_ability(into: &mut Abilities, a: Ability, v: i32) {
    match a {
        Ability::Str => into.str = v,
        Ability::Dex => into.dex = v,
        Ability::Con => into.con = v,
        Ability::Int => into.int = v,
        Ability::Wis => into.wis = v,
        Ability::Cha => into.cha = v,
    }
}

/// A character sheet as clients send it. Only `max_hp` and `ac` are required.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sheet {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub player_character: Option<bool>,
    #[serde(default)]
    pub side: Option<String>,
    pub max_hp: i64,
    /// Current hit points; defaults to `max_hp`.
    #[serde(default)]
    pub hp: Option<i64>,
    #[serde(default)]
    pub temp_hp: Option<i64>,
    pub ac: i64,
    #[serde(default)]
    pub abilities: Option<AbilityValues>,
    #[serde(default)]
    pub ability_scores: Option<AbilityValues>,
    #[serde(default)]
    pub proficiency_bonus: Option<i64>,
    #[serde(default)]
    pub save_proficiencies: BTreeSet<Ability>,
    #[serde(default)]
    pub speed: Option<i64>,
    #[serde(default)]
    pub reach: Option<i64>,
    #[serde(default)]
    pub initiative_bonus: Option<i64>,
    #[serde(default)]
    pub attacks_per_action: Option<i64>,
    #[serde(default)]
    pub position: Option<Pos>,
    #[serde(default)]
    pub conditions: BTreeSet<Condition>,
    #[serde(default)]
    pub resistances: BTreeSet<DamageType>,
    #[serde(default)]
    pub vulnerabilities: BTreeSet<DamageType>,
    #[serde(default)]
    pub immunities: BTreeSet<DamageType>,
    #[serde(default)]
    pub condition_immunities: BTreeSet<Condition>,
    /// 0–5 (a character enters play alive).
    #[serde(default)]
    pub exhaustion: Option<i64>,
    #[serde(default)]
    pub save_advantages: BTreeSet<SaveTag>,
    #[serde(default)]
    pub save_disadvantages: BTreeSet<SaveTag>,
    /// A stand-in until the Character Service's sheet arrives (set by the rules).
    #[serde(default)]
    pub pending: bool,
}

/// `invalid_character` unless `lo <= v <= hi`.
fn in_range(field: &str, v: i64, lo: i64, hi: i64) -> Result<i32> {
    if v < lo || v > hi {
        return Err(invalid(format!("{field} must be between {lo} and {hi}"))
            .with_details(json!({ "field": field, "value": v })));
    }
    Ok(v as i32)
}

/// Speeds are whole 5-ft squares. (`u32::is_multiple_of` needs Rust 1.87; the
/// workspace supports 1.85.)
#[allow(clippy::manual_is_multiple_of)]
fn whole_squares(feet: u32) -> bool {
    feet % 5 == 0
}

fn invalid(message: impl Into<String>) -> RuleError {
    RuleError::new(codes::INVALID_CHARACTER, message)
}

fn check_name(field: &str, s: &str, max: usize) -> Result<()> {
    if s.trim().is_empty() || s.chars().count() > max {
        return Err(invalid(format!("{field} must be 1 to {max} characters")));
    }
    Ok(())
}

impl Character {
    /// Validates a sheet and builds the character in play. `player_character` is the
    /// default kind (true for a player's join, false for a DM's spawn).
    pub fn from_sheet(id: Uuid, sheet: &Value, player_character: bool) -> Result<Character> {
        if !sheet.is_object() {
            return Err(invalid("a character sheet is a JSON object"));
        }
        let s: Sheet = serde_json::from_value(sheet.clone())
            .map_err(|e| invalid(format!("invalid character sheet: {e}")))?;
        let pc = s.player_character.unwrap_or(player_character);
        let name = s.name.clone().unwrap_or_else(|| "character".into());
        check_name("name", &name, MAX_NAME)?;
        let side = s
            .side
            .clone()
            .unwrap_or_else(|| if pc { "party" } else { "monsters" }.into());
        check_name("side", &side, MAX_SIDE)?;
        let max_hp = in_range("max_hp", s.max_hp, 1, MAX_HP)? as u32;
        let hp = in_range("hp", s.hp.unwrap_or(s.max_hp), 0, s.max_hp)? as u32;
        let temp_hp = in_range("temp_hp", s.temp_hp.unwrap_or(0), 0, MAX_HP)? as u32;
        let mut abilities = Abilities::default();
        if let Some(scores) = &s.ability_scores {
            scores.apply_scores(&mut abilities)?;
        }
        if let Some(mods) = &s.abilities {
            mods.apply_modifiers(&mut abilities)?;
        }
        let speed = in_range("speed", s.speed.unwrap_or(30), 0, MAX_SPEED)? as u32;
        if !whole_squares(speed) {
            return Err(invalid("speed must be a multiple of 5 ft"));
        }
        if let Some(p) = s.position {
            if !p.in_bounds() {
                return Err(invalid(format!(
                    "position coordinates are within ±{MAX_COORD}"
                )));
            }
        }
        if s.conditions.contains(&Condition::Dead) {
            return Err(invalid("a character enters play alive"));
        }
        let mut c = Character {
            id,
            name,
            player_character: pc,
            side,
            max_hp,
            hp,
            temp_hp,
            ac: in_range("ac", s.ac, 0, MAX_AC)? as u32,
            abilities,
            proficiency_bonus: in_range(
                "proficiency_bonus",
                s.proficiency_bonus.unwrap_or(2),
                0,
                10,
            )?,
            save_proficiencies: s.save_proficiencies.clone(),
            speed,
            reach: in_range("reach", s.reach.unwrap_or(5), 5, 100)? as u32,
            initiative_bonus: in_range(
                "initiative_bonus",
                s.initiative_bonus.unwrap_or(0),
                -10,
                20,
            )?,
            attacks_per_action: in_range(
                "attacks_per_action",
                s.attacks_per_action.unwrap_or(1),
                1,
                8,
            )? as u32,
            position: s.position,
            conditions: s.conditions.clone(),
            concentration: None,
            resistances: s.resistances.clone(),
            vulnerabilities: s.vulnerabilities.clone(),
            immunities: s.immunities.clone(),
            condition_immunities: s.condition_immunities.clone(),
            death_saves: DeathSaves::default(),
            stable: false,
            exhaustion: in_range(
                "exhaustion",
                s.exhaustion.unwrap_or(0),
                0,
                MAX_EXHAUSTION - 1,
            )? as u8,
            save_advantages: s.save_advantages.clone(),
            save_disadvantages: s.save_disadvantages.clone(),
            pending: s.pending,
        };
        c.hp = c.hp.min(c.hp_max());
        if c.conditions.contains(&Condition::Unconscious) {
            c.conditions.insert(Condition::Prone);
        }
        if c.hp == 0 {
            // A sheet at 0 hit points: a player character is dying but stable, a
            // monster is dead on arrival, which makes no sense to spawn.
            if !c.player_character {
                return Err(invalid("a monster enters play with at least 1 hit point"));
            }
            c.conditions.insert(Condition::Unconscious);
            c.conditions.insert(Condition::Prone);
            c.stable = true;
        }
        Ok(c)
    }

    pub fn is_dead(&self) -> bool {
        self.conditions.contains(&Condition::Dead)
    }

    pub fn has(&self, c: Condition) -> bool {
        self.conditions.contains(&c)
    }

    pub fn incapacitated(&self) -> bool {
        crate::conditions::incapacitated(&self.conditions)
    }

    /// The hit point maximum now: halved from exhaustion level 4 (SRD 5.1, appendix A).
    pub fn hp_max(&self) -> u32 {
        if self.exhaustion >= 4 {
            (self.max_hp / 2).max(1)
        } else {
            self.max_hp
        }
    }

    /// The walking speed now: halved from exhaustion level 2, 0 from level 5, 0 under
    /// a condition that stops movement.
    pub fn speed_now(&self) -> u32 {
        if self.exhaustion >= 5 || crate::conditions::movement_stopper(&self.conditions).is_some() {
            0
        } else if self.exhaustion >= 2 {
            self.speed / 2
        } else {
            self.speed
        }
    }

    /// Sets the exhaustion level (0–6): level 6 is death; from level 4 the hit points
    /// are capped at the halved maximum.
    pub fn set_exhaustion(&mut self, level: u8) {
        self.exhaustion = level;
        if level as i64 >= MAX_EXHAUSTION {
            self.die();
            return;
        }
        if self.hp > self.hp_max() {
            self.hp = self.hp_max();
        }
    }

    /// Saving throw bonus: ability modifier, plus proficiency if proficient.
    pub fn save_bonus(&self, a: Ability) -> i32 {
        self.abilities.get(a)
            + if self.save_proficiencies.contains(&a) {
                self.proficiency_bonus
            } else {
                0
            }
    }

    /// Whether the creature can gain `c` (condition immunities; petrified creatures
    /// are immune to poison).
    pub fn immune_to(&self, c: Condition) -> bool {
        self.condition_immunities.contains(&c)
            || (c == Condition::Poisoned && self.has(Condition::Petrified))
    }

    /// Damage of one type after immunity, resistance and vulnerability, with the
    /// adjustment applied (if any).
    pub fn adjust_damage(&self, t: DamageType, amount: u32) -> (u32, Option<&'static str>) {
        if self.immunities.contains(&t) {
            return (0, Some("immune"));
        }
        let resistant = self.resistances.contains(&t) || self.has(Condition::Petrified);
        let vulnerable = self.vulnerabilities.contains(&t);
        match (resistant, vulnerable) {
            // Both apply: halve, then double (PHB order: resistance first).
            (true, true) => ((amount / 2) * 2, Some("resistant_and_vulnerable")),
            (true, false) => (amount / 2, Some("resistant")),
            (false, true) => (amount * 2, Some("vulnerable")),
            (false, false) => (amount, None),
        }
    }

    /// Adds a condition with what it implies (unconscious creatures fall prone).
    pub fn add_condition(&mut self, c: Condition) {
        self.conditions.insert(c);
        if c == Condition::Unconscious {
            self.conditions.insert(Condition::Prone);
        }
    }

    /// Takes `amount` damage (already adjusted for type). Returns what happened, as
    /// the words used in an outcome's `effects`.
    pub fn take_damage(&mut self, amount: u32, critical: bool) -> Vec<&'static str> {
        let mut what = vec![];
        if amount == 0 || self.is_dead() {
            return what;
        }
        let absorbed = amount.min(self.temp_hp);
        self.temp_hp -= absorbed;
        if absorbed > 0 {
            what.push("temp_hp_absorbed");
        }
        let rest = amount - absorbed;
        if rest == 0 {
            return what;
        }
        if self.hp == 0 {
            // Already dying: damage is a failed death save (two on a critical hit),
            // or death when it reaches the hit point maximum.
            self.stable = false;
            if rest >= self.hp_max() {
                self.die();
                what.extend(["instant_death", "dead"]);
            } else {
                let f = if critical { 2 } else { 1 };
                self.death_saves.failures = (self.death_saves.failures + f).min(3);
                what.push("death_save_failure");
                if self.death_saves.failures >= 3 {
                    self.die();
                    what.push("dead");
                }
            }
            return what;
        }
        if rest < self.hp {
            self.hp -= rest;
            return what;
        }
        let overflow = rest - self.hp;
        self.hp = 0;
        if !self.player_character {
            self.die();
            what.push("dead");
        } else if overflow >= self.hp_max() {
            self.die();
            what.extend(["instant_death", "dead"]);
        } else {
            self.add_condition(Condition::Unconscious);
            self.death_saves = DeathSaves::default();
            self.stable = false;
            what.push("unconscious");
        }
        what
    }

    /// Heals up to the maximum; wakes a dying player character.
    pub fn heal(&mut self, amount: u32) -> Vec<&'static str> {
        let mut what = vec!["healed"];
        let was_down = self.hp == 0;
        self.hp = (self.hp + amount).min(self.hp_max());
        if was_down && self.hp > 0 {
            self.regain_consciousness();
            what.push("conscious");
        }
        what
    }

    /// Temporary hit points do not stack: keep the higher.
    pub fn gain_temp_hp(&mut self, amount: u32) {
        self.temp_hp = self.temp_hp.max(amount);
    }

    /// Back above 0 hit points: awake, death saves reset (still prone).
    pub fn regain_consciousness(&mut self) {
        self.conditions.remove(&Condition::Unconscious);
        self.death_saves = DeathSaves::default();
        self.stable = false;
    }

    /// A death saving throw with the kept d20 `face` (SRD: 10 or higher succeeds, a 1
    /// counts twice, a 20 regains 1 hit point; three successes stabilise, three
    /// failures kill). Returns `(result, outcome)`: result is `success`, `failure`,
    /// `two_failures` or `regain_hp`; outcome is `dying`, `stable`, `dead` or `conscious`.
    pub fn death_save(&mut self, face: u32) -> (&'static str, &'static str) {
        let result = match face {
            20 => {
                self.hp = 1;
                self.regain_consciousness();
                return ("regain_hp", "conscious");
            }
            1 => {
                self.death_saves.failures = (self.death_saves.failures + 2).min(3);
                "two_failures"
            }
            f if f >= 10 => {
                self.death_saves.successes += 1;
                "success"
            }
            _ => {
                self.death_saves.failures += 1;
                "failure"
            }
        };
        if self.death_saves.failures >= 3 {
            self.die();
            (result, "dead")
        } else if self.death_saves.successes >= 3 {
            self.death_saves = DeathSaves::default();
            self.stable = true;
            (result, "stable")
        } else {
            (result, "dying")
        }
    }

    /// Whether the creature rolls a death save at the start of its turn.
    pub fn dying(&self) -> bool {
        self.player_character && self.hp == 0 && !self.stable && !self.is_dead()
    }

    pub fn die(&mut self) {
        self.hp = 0;
        self.temp_hp = 0;
        self.stable = false;
        self.conditions.insert(Condition::Dead);
        self.conditions.remove(&Condition::Dodging);
    }

    /// Sets hit points directly (DM or hub), with the consequences of crossing 0.
    pub fn set_hp(&mut self, hp: u32) {
        let before = self.hp;
        self.hp = hp.min(self.hp_max());
        if self.hp == 0 && before > 0 {
            if self.player_character {
                self.add_condition(Condition::Unconscious);
                self.death_saves = DeathSaves::default();
                self.stable = false;
            } else {
                self.die();
            }
        } else if self.hp > 0 && before == 0 {
            // An authoritative source says the creature has hit points again
            // (healing, or being raised from the dead).
            self.conditions.remove(&Condition::Dead);
            self.regain_consciousness();
        }
    }
}

/// Changes to a character in play: the DM's `character_update`, or the Message Hub's
/// `character.state.changed` (`Command::CharacterSync`). Absent fields are unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CharacterChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "max_hit_points",
        alias = "hit_points_max"
    )]
    pub max_hp: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "current_hp",
        alias = "hit_points"
    )]
    pub hp: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "temporary_hp",
        alias = "temp_hit_points"
    )]
    pub temp_hp: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "armor_class",
        alias = "armour_class"
    )]
    pub ac: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abilities: Option<AbilityValues>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proficiency_bonus: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_proficiencies: Option<BTreeSet<Ability>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resistances: Option<BTreeSet<DamageType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vulnerabilities: Option<BTreeSet<DamageType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immunities: Option<BTreeSet<DamageType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_immunities: Option<BTreeSet<Condition>>,
    /// Exhaustion level 0–6 (6 kills).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "exhaustion_level"
    )]
    pub exhaustion: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_advantages: Option<BTreeSet<SaveTag>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_disadvantages: Option<BTreeSet<SaveTag>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions_add: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions_remove: Vec<Condition>,
}

impl CharacterChanges {
    /// Leniently reads the `details` of a hub `character.state.changed` event: known
    /// fields (and a few common aliases) are taken, anything else is ignored.
    pub fn from_hub(details: &Value) -> Result<CharacterChanges> {
        serde_json::from_value(details.clone()).map_err(|e| {
            RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("unreadable character change: {e}"),
            )
        })
    }

    /// Applies the changes to `c` (validated like a sheet). Conditions are handled
    /// by the caller, which also keeps effects consistent.
    pub fn apply_stats(&self, c: &mut Character) -> Result<()> {
        if let Some(n) = &self.name {
            check_name("name", n, MAX_NAME)?;
            c.name = n.clone();
        }
        if let Some(m) = self.max_hp {
            c.max_hp = in_range("max_hp", m, 1, MAX_HP)? as u32;
            c.hp = c.hp.min(c.hp_max());
        }
        if let Some(e) = self.exhaustion {
            let level = in_range("exhaustion", e, 0, MAX_EXHAUSTION)? as u8;
            if level != c.exhaustion {
                c.set_exhaustion(level);
            }
        }
        if let Some(s) = &self.save_advantages {
            c.save_advantages = s.clone();
        }
        if let Some(s) = &self.save_disadvantages {
            c.save_disadvantages = s.clone();
        }
        if let Some(t) = self.temp_hp {
            c.temp_hp = in_range("temp_hp", t, 0, MAX_HP)? as u32;
        }
        if let Some(a) = self.ac {
            c.ac = in_range("ac", a, 0, MAX_AC)? as u32;
        }
        if let Some(s) = self.speed {
            let s = in_range("speed", s, 0, MAX_SPEED)? as u32;
            if !whole_squares(s) {
                return Err(invalid("speed must be a multiple of 5 ft"));
            }
            c.speed = s;
        }
        if let Some(a) = &self.abilities {
            a.apply_modifiers(&mut c.abilities)?;
        }
        if let Some(p) = self.proficiency_bonus {
            c.proficiency_bonus = in_range("proficiency_bonus", p, 0, 10)?;
        }
        if let Some(s) = &self.save_proficiencies {
            c.save_proficiencies = s.clone();
        }
        if let Some(s) = &self.resistances {
            c.resistances = s.clone();
        }
        if let Some(s) = &self.vulnerabilities {
            c.vulnerabilities = s.clone();
        }
        if let Some(s) = &self.immunities {
            c.immunities = s.clone();
        }
        if let Some(s) = &self.condition_immunities {
            c.condition_immunities = s.clone();
        }
        if let Some(h) = self.hp {
            let hp = in_range("hp", h, 0, i64::from(c.hp_max()))? as u32;
            c.set_hp(hp);
        }
        Ok(())
    }
}

/// Damage dealt to one target, by type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DamageReport {
    /// Rolled, before the target's resistances (halved on a successful save when the
    /// action says so).
    pub rolled: BTreeMap<DamageType, u32>,
    /// What the target took of each type.
    pub dealt: BTreeMap<DamageType, u32>,
    /// `immune`, `resistant`, `vulnerable` or `resistant_and_vulnerable` per type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adjustments: BTreeMap<DamageType, String>,
    pub total: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub temp_hp_absorbed: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub halved_by_save: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(hp: u32) -> Character {
        Character::from_sheet(
            Uuid::from_u128(1),
            &json!({"name": "Aria", "max_hp": 20, "hp": hp, "ac": 15}),
            true,
        )
        .unwrap()
    }

    fn monster(hp: u32) -> Character {
        Character::from_sheet(
            Uuid::from_u128(2),
            &json!({"max_hp": 20, "hp": hp, "ac": 12}),
            false,
        )
        .unwrap()
    }

    #[test]
    fn sheet_validation_table() {
        let ok = json!({"name": "Aria", "max_hp": 24, "ac": 15,
            "abilities": {"dex": 3, "con": 2}, "save_proficiencies": ["dex", "int"],
            "speed": 30, "position": {"x": 1, "y": 2}, "resistances": ["fire"],
            "class": "rogue", "inventory": ["rope"]});
        let c = Character::from_sheet(Uuid::nil(), &ok, true).unwrap();
        assert_eq!(
            (c.hp, c.ac, c.abilities.dex, c.side.as_str()),
            (24, 15, 3, "party")
        );
        assert_eq!(c.save_bonus(Ability::Dex), 5);
        assert_eq!(c.save_bonus(Ability::Str), 0);
        let scores = json!({"max_hp": 5, "ac": 10, "ability_scores": {"str": 17, "dex": 8}});
        let c = Character::from_sheet(Uuid::nil(), &scores, false).unwrap();
        assert_eq!(
            (c.abilities.str, c.abilities.dex, c.side.as_str()),
            (3, -1, "monsters")
        );
        let bad = [
            json!(5),
            json!({"ac": 10}),
            json!({"max_hp": 0, "ac": 10}),
            json!({"max_hp": 10, "hp": 11, "ac": 10}),
            json!({"max_hp": 10, "ac": 99}),
            json!({"max_hp": 10, "ac": 10, "speed": 33}),
            json!({"max_hp": 10, "ac": 10, "abilities": {"str": 40}}),
            json!({"max_hp": 10, "ac": 10, "conditions": ["sleepy"]}),
            json!({"max_hp": 10, "ac": 10, "resistances": ["cheese"]}),
            json!({"max_hp": 10, "ac": 10, "name": ""}),
            json!({"max_hp": 10, "ac": 10, "position": {"x": 999999, "y": 0}}),
            json!({"max_hp": 10, "ac": 10, "conditions": ["dead"]}),
            json!({"max_hp": "ten", "ac": 10}),
        ];
        for b in bad {
            assert_eq!(
                Character::from_sheet(Uuid::nil(), &b, true)
                    .unwrap_err()
                    .code,
                codes::INVALID_CHARACTER,
                "{b}"
            );
        }
        // A monster at 0 HP is refused; a PC at 0 HP is unconscious but stable.
        assert!(
            Character::from_sheet(Uuid::nil(), &json!({"max_hp": 5, "hp": 0, "ac": 1}), false)
                .is_err()
        );
        let down = pc(0);
        assert!(down.has(Condition::Unconscious) && down.has(Condition::Prone) && down.stable);
    }

    #[test]
    fn damage_adjustment_table() {
        let mut c = pc(20);
        c.resistances.insert(DamageType::Fire);
        c.vulnerabilities.insert(DamageType::Cold);
        c.immunities.insert(DamageType::Poison);
        c.resistances.insert(DamageType::Thunder);
        c.vulnerabilities.insert(DamageType::Thunder);
        assert_eq!(c.adjust_damage(DamageType::Fire, 7), (3, Some("resistant")));
        assert_eq!(
            c.adjust_damage(DamageType::Cold, 7),
            (14, Some("vulnerable"))
        );
        assert_eq!(c.adjust_damage(DamageType::Poison, 7), (0, Some("immune")));
        assert_eq!(c.adjust_damage(DamageType::Slashing, 7), (7, None));
        assert_eq!(
            c.adjust_damage(DamageType::Thunder, 7),
            (6, Some("resistant_and_vulnerable"))
        );
        c.add_condition(Condition::Petrified);
        assert_eq!(
            c.adjust_damage(DamageType::Slashing, 7),
            (3, Some("resistant"))
        );
        assert!(c.immune_to(Condition::Poisoned));
    }

    #[test]
    fn temp_hp_absorb_first_and_do_not_stack() {
        let mut c = pc(20);
        c.gain_temp_hp(5);
        c.gain_temp_hp(3);
        assert_eq!(c.temp_hp, 5);
        assert_eq!(c.take_damage(4, false), vec!["temp_hp_absorbed"]);
        assert_eq!((c.temp_hp, c.hp), (1, 20));
        c.take_damage(6, false);
        assert_eq!((c.temp_hp, c.hp), (0, 15));
    }

    #[test]
    fn zero_hp_monster_dies_pc_falls_unconscious() {
        let mut m = monster(5);
        assert_eq!(m.take_damage(9, false), vec!["dead"]);
        assert!(m.is_dead());
        let mut p = pc(5);
        assert_eq!(p.take_damage(9, false), vec!["unconscious"]);
        assert!(p.has(Condition::Unconscious) && p.has(Condition::Prone) && !p.is_dead());
        // Damage at 0 HP: one failure, two on a critical, three is death.
        p.take_damage(1, false);
        assert_eq!(p.death_saves.failures, 1);
        assert_eq!(p.take_damage(1, true), vec!["death_save_failure", "dead"]);
        assert!(p.is_dead());
        // The dead take no further damage and cannot be healed by these functions' callers.
        assert!(p.take_damage(5, false).is_empty());
    }

    #[test]
    fn massive_damage_kills_outright() {
        let mut p = pc(5);
        // 5 to reach 0, 20 left over = max HP: instant death.
        assert_eq!(p.take_damage(25, false), vec!["instant_death", "dead"]);
        let mut p = pc(5);
        p.take_damage(24, false);
        assert!(!p.is_dead());
        assert_eq!(p.take_damage(20, false), vec!["instant_death", "dead"]);
    }

    #[test]
    fn healing_caps_and_wakes() {
        let mut p = pc(5);
        p.heal(100);
        assert_eq!(p.hp, 20);
        p.take_damage(20, false);
        p.take_damage(1, false);
        assert_eq!(p.death_saves.failures, 1);
        assert_eq!(p.heal(3), vec!["healed", "conscious"]);
        assert_eq!((p.hp, p.death_saves), (3, DeathSaves::default()));
        assert!(!p.has(Condition::Unconscious) && p.has(Condition::Prone));
    }

    #[test]
    fn death_save_table() {
        // (faces in order, expected outcome of the last, successes, failures)
        let rows: &[(&[u32], &str, u8, u8)] = &[
            (&[10], "dying", 1, 0),
            (&[9], "dying", 0, 1),
            (&[1], "dying", 0, 2),
            (&[10, 15, 19], "stable", 0, 0),
            (&[2, 3, 4], "dead", 0, 3),
            (&[1, 5], "dead", 0, 3),
            (&[12, 1, 11], "dying", 2, 2),
            (&[5, 5, 20], "conscious", 0, 0),
        ];
        for (faces, outcome, s, f) in rows {
            let mut p = pc(5);
            p.take_damage(5, false);
            let mut last = "";
            for &face in *faces {
                last = p.death_save(face).1;
            }
            assert_eq!(
                (last, p.death_saves.successes, p.death_saves.failures),
                (*outcome, *s, *f),
                "{faces:?}"
            );
        }
        let mut p = pc(5);
        p.take_damage(5, false);
        assert_eq!(p.death_save(20), ("regain_hp", "conscious"));
        assert_eq!(p.hp, 1);
        assert!(!p.has(Condition::Unconscious));
    }

    #[test]
    fn distance_uses_the_simple_diagonal_rule() {
        let o = Pos { x: 0, y: 0 };
        assert_eq!(o.distance(Pos { x: 1, y: 0 }), 5);
        assert_eq!(o.distance(Pos { x: 1, y: 1 }), 5);
        assert_eq!(o.distance(Pos { x: 3, y: -2 }), 15);
        assert_eq!(o.distance(Pos { x: -6, y: 6 }), 30);
    }

    #[test]
    fn changes_from_hub_accept_aliases() {
        let ch = CharacterChanges::from_hub(&json!({"current_hp": 3, "armor_class": 17, "xp": 5}))
            .unwrap();
        let mut c = pc(20);
        ch.apply_stats(&mut c).unwrap();
        assert_eq!((c.hp, c.ac), (3, 17));
        let too_much = CharacterChanges {
            hp: Some(99),
            ..Default::default()
        };
        assert_eq!(
            too_much.apply_stats(&mut c).unwrap_err().code,
            codes::INVALID_CHARACTER
        );
        let mut c = pc(20);
        CharacterChanges {
            hp: Some(0),
            ..Default::default()
        }
        .apply_stats(&mut c)
        .unwrap();
        assert!(c.has(Condition::Unconscious));
        let mut m = monster(4);
        CharacterChanges {
            hp: Some(0),
            ..Default::default()
        }
        .apply_stats(&mut m)
        .unwrap();
        assert!(m.is_dead());
        CharacterChanges {
            hp: Some(4),
            ..Default::default()
        }
        .apply_stats(&mut m)
        .unwrap();
        assert!(!m.is_dead());
    }
}
