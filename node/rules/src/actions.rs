//! Actions: who may act, what it costs, and how attacks, saving throws, damage,
//! healing and concentration resolve (SRD 5.1, "Combat" and "Spellcasting").
//!
//! An `action_declare` produces two events: `action_declare` (the declaration and the
//! action economy it spends) and `action_resolve` (one outcome per target, every roll).
//!
//! # Who may act
//!
//! The character's controller or the DM (`not_your_character`), during combat
//! (`combat_not_active`, `initiative_pending`), for a participant
//! (`not_a_participant`) that is not incapacitated or dead (`incapacitated`), on its
//! own turn (`not_your_turn`) unless the action costs its reaction.
//!
//! # Cost (`details.cost`)
//!
//! `action` (default), `bonus_action` or `reaction`, once each per turn
//! (`no_action_left`, `no_bonus_action_left`, `no_reaction_left`). An Attack action
//! grants `attacks_per_action` attacks (Extra Attack): further `attack` declarations
//! that turn use them before needing a new action.
//!
//! # Attack (`action_type: "attack"`)
//!
//! Per target: d20 + `attack_bonus` (default: the ability modifier — `ability`, else
//! Str for melee and Dex for ranged — plus the proficiency bonus) against the
//! target's AC. A natural 1 always misses; a natural 20 always hits and is a critical
//! hit, which rolls the damage dice twice. Advantage and disadvantage come from
//! conditions (see [`crate::conditions`]), from `details.advantage` /
//! `details.disadvantage`, from a ranged attack beyond its normal range or with a
//! hostile creature within 5 ft; any of each cancel out. Melee reach is
//! `details.reach` or the creature's reach (5 ft); a ranged attack
//! (`details.range: {normal, long}`) cannot go beyond long range (`out_of_range`).
//! Distances are checked when both creatures are on the grid.
//!
//! # Saving throw (`action_type: "save"`)
//!
//! `details.save: {ability, dc, half_on_success}`. Damage is rolled once for all
//! targets. Each target rolls d20 + ability modifier + proficiency bonus if
//! proficient, with the conditions' automatic failures and (dis)advantage; meeting the
//! DC succeeds. A success takes half damage (per damage type, rounded down) when
//! `half_on_success`, else none, and avoids the conditions.
//!
//! # Damage
//!
//! `details.damage` (dice) of `details.damage_type`, plus `details.extra_damage:
//! [{dice, type}]`; then the target's immunities, resistances and vulnerabilities,
//! temporary hit points, 0 hit points (see [`crate::character`]). A concentrating
//! creature that takes damage makes a Constitution save with DC max(10, ⌊damage/2⌋)
//! or loses concentration.
//!
//! # Conditions and concentration
//!
//! `details.conditions: [{condition, duration?}]` are imposed on a hit or a failed save
//! (not on an immune creature). With `details.concentration: true` the actor starts
//! concentrating on this action (ending any earlier concentration) and the conditions
//! last only while it concentrates.
//!
//! # Heal, Dash, Disengage, Dodge, Other
//!
//! `heal` rolls `details.amount` once and heals each target (or grants temporary hit
//! points with `details.temporary`). `dash` adds the creature's speed to this turn's
//! movement; `disengage` stops this turn's moves from provoking opportunity attacks;
//! `dodge` imposes `dodging` until the start of the creature's next turn. `other`
//! spends the cost and has no mechanics.

use crate::character::{Ability, Character, Concentration, DamageReport, DamageType};
use crate::combat::not_a_participant;
use crate::command::{ActionDeclare, ActionType, Cost, Ctx, DurationSpec};
use crate::conditions::{
    attack_conditions, save_conditions, Boundary, Condition, Duration, Effect,
};
use crate::dice::{Dice, Mode};
use crate::error::{codes, Result, RuleError};
use crate::event::{
    ActionDeclared, ActionResolved, AttackRoll, ConcentrationCheck, Event, Outcome, SaveRoll,
};
use crate::game::{Actor, Game, Scratch};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Most targets of one action.
pub const MAX_TARGETS: usize = 20;
/// Most conditions one action imposes, and extra damage parts.
pub const MAX_PARTS: usize = 10;

/// `details` of an `action_declare`; which fields matter depends on the type.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Details {
    name: Option<String>,
    cost: Option<Cost>,
    attack_bonus: Option<i32>,
    ability: Option<Ability>,
    damage: Option<String>,
    damage_type: Option<DamageType>,
    extra_damage: Vec<DamagePart>,
    reach: Option<u32>,
    range: Option<Range>,
    advantage: bool,
    disadvantage: bool,
    save: Option<SaveSpec>,
    half_on_success: bool,
    conditions: Vec<ConditionSpec>,
    concentration: bool,
    amount: Option<String>,
    temporary: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct DamagePart {
    dice: String,
    #[serde(rename = "type")]
    damage_type: DamageType,
}

/// `60` or `{normal: 80, long: 320}` (feet).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Range {
    Feet(u32),
    Band {
        normal: u32,
        #[serde(default)]
        long: Option<u32>,
    },
}

impl Range {
    fn normal(self) -> u32 {
        match self {
            Range::Feet(f) => f,
            Range::Band { normal, .. } => normal,
        }
    }

    fn long(self) -> u32 {
        match self {
            Range::Feet(f) => f,
            Range::Band { normal, long } => long.unwrap_or(normal).max(normal),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct SaveSpec {
    ability: Ability,
    dc: i32,
    #[serde(default)]
    half_on_success: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct ConditionSpec {
    condition: Condition,
    #[serde(default)]
    duration: Option<DurationSpec>,
}

fn bad(message: impl Into<String>) -> RuleError {
    RuleError::new(codes::INVALID_PAYLOAD, message)
}

impl Details {
    fn parse(v: &Value) -> Result<Details> {
        if v.is_null() {
            return Ok(Details::default());
        }
        if !v.is_object() {
            return Err(bad("`details` is an object"));
        }
        let d: Details = serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("invalid `details`: {e}")))?;
        if let Some(b) = d.attack_bonus {
            if !(-20..=30).contains(&b) {
                return Err(bad("details.attack_bonus is -20 to 30"));
            }
        }
        if let Some(s) = d.save {
            if !(1..=40).contains(&s.dc) {
                return Err(bad("details.save.dc is 1 to 40"));
            }
        }
        if let Some(r) = d.reach {
            if !(5..=100).contains(&r) {
                return Err(bad("details.reach is 5 to 100 ft"));
            }
        }
        if let Some(r) = d.range {
            if !(5..=10_000).contains(&r.normal()) || r.long() > 10_000 {
                return Err(bad("details.range is 5 to 10000 ft"));
            }
        }
        if d.extra_damage.len() > MAX_PARTS || d.conditions.len() > MAX_PARTS {
            return Err(bad(format!(
                "at most {MAX_PARTS} extra damage parts and {MAX_PARTS} conditions"
            )));
        }
        if d.conditions.iter().any(|c| c.condition == Condition::Dead) {
            return Err(bad("`dead` is not imposed as a condition"));
        }
        if d.name.as_ref().is_some_and(|n| n.chars().count() > 100) {
            return Err(bad("details.name is at most 100 characters"));
        }
        Ok(d)
    }

    /// The damage parts, parsed: `damage` + `damage_type`, then `extra_damage`.
    fn damage_parts(&self) -> Result<Vec<(Dice, DamageType)>> {
        let mut parts = vec![];
        if let Some(d) = &self.damage {
            let t = self
                .damage_type
                .ok_or_else(|| bad("details.damage_type is required with damage"))?;
            parts.push((Dice::parse(d)?, t));
        }
        for p in &self.extra_damage {
            parts.push((Dice::parse(&p.dice)?, p.damage_type));
        }
        Ok(parts)
    }
}

impl Game {
    pub(crate) fn decide_action(
        &self,
        who: &Actor,
        ctx: &Ctx,
        a: &ActionDeclare,
    ) -> Result<Vec<Event>> {
        let (combat, turn) = self.require_turn()?;
        let actor = self.character(a.character_id)?;
        who.require_control(a.character_id)?;
        let participant = combat
            .participants
            .get(&a.character_id)
            .ok_or_else(|| not_a_participant(a.character_id))?;
        if actor.incapacitated() {
            return Err(RuleError::new(
                codes::INCAPACITATED,
                "an incapacitated creature takes no actions or reactions",
            )
            .with_details(json!({ "conditions": actor.conditions })));
        }
        let details = Details::parse(&a.details)?;
        let cost = details.cost.unwrap_or_default();
        let on_turn = turn.character_id == a.character_id;
        if !on_turn && cost != Cost::Reaction {
            return Err(RuleError::new(
                codes::NOT_YOUR_TURN,
                "off its turn, a creature can only use its reaction",
            )
            .with_details(json!({ "active_character": turn.character_id })));
        }
        if cost == Cost::Reaction
            && matches!(
                a.action_type,
                ActionType::Dash | ActionType::Disengage | ActionType::Dodge
            )
        {
            return Err(bad("dash, disengage and dodge are not reactions"));
        }
        // Spend the cost on the scratch copy.
        let mut s = Scratch::new(self);
        let extra_attacks = actor.attacks_per_action.saturating_sub(1);
        let combat_mut = s.g.combat.as_mut().expect("checked above");
        match cost {
            Cost::Reaction => {
                if participant.reaction_used {
                    return Err(RuleError::new(
                        codes::NO_REACTION_LEFT,
                        "the reaction is spent until the start of its next turn",
                    ));
                }
                combat_mut
                    .participants
                    .get_mut(&a.character_id)
                    .expect("a participant")
                    .reaction_used = true;
            }
            Cost::BonusAction => {
                let t = combat_mut.turn.as_mut().expect("checked above");
                if t.bonus_action_used {
                    return Err(RuleError::new(
                        codes::NO_BONUS_ACTION_LEFT,
                        "the bonus action of this turn is spent",
                    ));
                }
                t.bonus_action_used = true;
            }
            Cost::Action => {
                let t = combat_mut.turn.as_mut().expect("checked above");
                if a.action_type == ActionType::Attack && t.action_used && t.attacks_left > 0 {
                    t.attacks_left -= 1;
                } else if t.action_used {
                    return Err(RuleError::new(
                        codes::NO_ACTION_LEFT,
                        "the action of this turn is spent",
                    ));
                } else {
                    t.action_used = true;
                    t.attacks_left = if a.action_type == ActionType::Attack {
                        extra_attacks
                    } else {
                        0
                    };
                }
            }
        }
        self.check_targets(a, &details)?;
        let action_id = a.action_id.unwrap_or(ctx.command_id);
        let declared = Event::ActionDeclare(ActionDeclared {
            action_id,
            character_id: a.character_id,
            action_type: a.action_type,
            targets: a.targets.clone(),
            details: a.details.clone(),
            cost,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        });
        let mut r = Resolution {
            s,
            actor: a.character_id,
            action_id,
            details,
        };
        let outcomes = match a.action_type {
            ActionType::Attack => r.attack(&a.targets)?,
            ActionType::Save => r.save(&a.targets)?,
            ActionType::Heal => r.heal(&a.targets)?,
            ActionType::Dash => {
                let speed = r.s.g.characters[&r.actor].speed;
                r.turn().movement_bonus += speed;
                vec![]
            }
            ActionType::Disengage => {
                r.turn().disengaged = true;
                vec![]
            }
            ActionType::Dodge => {
                r.s.g.add_effect(Effect {
                    id: 0,
                    target: r.actor,
                    condition: Condition::Dodging,
                    source: Some(r.actor),
                    concentration: false,
                    action_id: Some(action_id),
                    duration: Some(Duration {
                        rounds: 1,
                        ends: Boundary::Start,
                        of: r.actor,
                    }),
                });
                vec![]
            }
            ActionType::Other => vec![],
        };
        let resolved = Event::ActionResolve(ActionResolved {
            action_id,
            character_id: a.character_id,
            action_type: a.action_type,
            outcomes,
            rolls: r.s.rolls(),
            by: ctx.user_id,
            patch: r.s.patch(),
            timestamp: ctx.timestamp.clone(),
        });
        Ok(vec![declared, resolved])
    }

    /// Targets: the right number, distinct, in play, alive, not the charmer.
    fn check_targets(&self, a: &ActionDeclare, d: &Details) -> Result<()> {
        let needs_targets = matches!(
            a.action_type,
            ActionType::Attack | ActionType::Save | ActionType::Heal
        );
        let no_targets = matches!(
            a.action_type,
            ActionType::Dash | ActionType::Disengage | ActionType::Dodge
        );
        let invalid = |m: &str| RuleError::new(codes::INVALID_TARGET, m.to_string());
        if needs_targets && a.targets.is_empty() {
            return Err(invalid("this action needs at least one target"));
        }
        if no_targets && !a.targets.is_empty() {
            return Err(invalid("this action takes no targets"));
        }
        if a.targets.len() > MAX_TARGETS {
            return Err(invalid(&format!("at most {MAX_TARGETS} targets")));
        }
        let harmful = matches!(a.action_type, ActionType::Attack | ActionType::Save);
        for (i, t) in a.targets.iter().enumerate() {
            if a.targets[..i].contains(t) {
                return Err(invalid("a target is listed twice"));
            }
            let target = self.character(*t)?;
            if target.is_dead() && a.action_type != ActionType::Other {
                return Err(invalid("the target is dead").with_details(json!({ "target_id": t })));
            }
            if a.action_type == ActionType::Attack && *t == a.character_id {
                return Err(invalid("a creature does not attack itself"));
            }
            if harmful && self.charmed_by(a.character_id, *t) {
                return Err(invalid("a charmed creature cannot harm its charmer")
                    .with_details(json!({ "target_id": t })));
            }
        }
        // Surface dice errors before anything resolves.
        d.damage_parts()?;
        if let Some(amount) = &d.amount {
            Dice::parse(amount)?;
        }
        Ok(())
    }

    /// Whether `who` is charmed by `by` (an effect records the charmer).
    pub(crate) fn charmed_by(&self, who: Uuid, by: Uuid) -> bool {
        self.effects
            .values()
            .any(|e| e.target == who && e.condition == Condition::Charmed && e.source == Some(by))
    }

    /// Feet between two creatures, when both are on the grid.
    pub(crate) fn distance(&self, a: Uuid, b: Uuid) -> Option<u32> {
        let pa = self.characters.get(&a)?.position?;
        let pb = self.characters.get(&b)?.position?;
        Some(pa.distance(pb))
    }
}

/// Resolving one declared action on the scratch copy.
struct Resolution {
    s: Scratch,
    actor: Uuid,
    action_id: Uuid,
    details: Details,
}

impl Resolution {
    fn turn(&mut self) -> &mut crate::combat::Turn {
        self.s
            .g
            .combat
            .as_mut()
            .and_then(|c| c.turn.as_mut())
            .expect("resolving on a turn")
    }

    fn attack(&mut self, targets: &[Uuid]) -> Result<Vec<Outcome>> {
        let parts = self.details.damage_parts()?;
        let ranged = self.details.range.is_some();
        let actor = self.s.g.characters[&self.actor].clone();
        let ability =
            self.details
                .ability
                .unwrap_or(if ranged { Ability::Dex } else { Ability::Str });
        let bonus = self
            .details
            .attack_bonus
            .unwrap_or(actor.abilities.get(ability) + actor.proficiency_bonus);
        // Check every range before rolling anything.
        for t in targets {
            if let Some(d) = self.s.g.distance(self.actor, *t) {
                let max = match self.details.range {
                    Some(r) => r.long(),
                    None => self.details.reach.unwrap_or(actor.reach),
                };
                if d > max {
                    return Err(
                        RuleError::new(codes::OUT_OF_RANGE, "the target is out of range")
                            .with_details(json!({ "target_id": t, "distance": d, "range": max })),
                    );
                }
            }
        }
        self.start_concentration();
        let mut outcomes = vec![];
        for t in targets {
            let target = self.s.g.characters[t].clone();
            let distance = self.s.g.distance(self.actor, *t);
            let mut why =
                attack_conditions(&actor.conditions, &target.conditions, distance, !ranged);
            if self.details.advantage {
                why.advantage.push("declared".into());
            }
            if self.details.disadvantage {
                why.disadvantage.push("declared".into());
            }
            if let (Some(r), Some(d)) = (self.details.range, distance) {
                if d > r.normal() {
                    why.disadvantage.push("beyond_normal_range".into());
                }
            }
            if ranged && self.hostile_within_5ft(&actor) {
                why.disadvantage.push("hostile_within_5ft".into());
            }
            let mode = Mode::from_sources(!why.advantage.is_empty(), !why.disadvantage.is_empty());
            let d20 = self.s.dice.d20("attack", Some(self.actor), mode, bonus);
            let hit = d20.kept == 20 || (d20.kept != 1 && d20.total >= target.ac as i32);
            let critical = hit && (d20.kept == 20 || why.auto_critical);
            let mut outcome = Outcome {
                target_id: *t,
                effects: vec![if hit { "hit" } else { "miss" }.into()],
                damage: DamageReport::default(),
                conditions: vec![],
                attack: Some(AttackRoll {
                    d20: d20.kept,
                    bonus,
                    total: d20.total,
                    ac: target.ac,
                    mode,
                    advantage: why.advantage,
                    disadvantage: why.disadvantage,
                    distance,
                    hit,
                    critical,
                }),
                save: None,
                concentration_check: None,
                healed: None,
                hp: 0,
                temp_hp: 0,
            };
            if critical {
                outcome.effects.push("critical".into());
            }
            if hit {
                let mut rolled = BTreeMap::new();
                for (dice, t) in &parts {
                    let dice = if critical { dice.doubled() } else { *dice };
                    let n = self.s.dice.roll("damage", Some(self.actor), dice).max(0) as u32;
                    *rolled.entry(*t).or_insert(0) += n;
                }
                self.damage(&mut outcome, rolled, critical, false);
                self.impose(&mut outcome)?;
            }
            self.finish(&mut outcome);
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn save(&mut self, targets: &[Uuid]) -> Result<Vec<Outcome>> {
        let spec = self
            .details
            .save
            .ok_or_else(|| bad("a save action needs details.save {ability, dc}"))?;
        let half = spec.half_on_success || self.details.half_on_success;
        self.check_range(targets)?;
        let parts = self.details.damage_parts()?;
        self.start_concentration();
        // Area damage is rolled once for every target.
        let mut rolled = BTreeMap::new();
        for (dice, t) in &parts {
            let n = self.s.dice.roll("damage", Some(self.actor), *dice).max(0) as u32;
            *rolled.entry(*t).or_insert(0) += n;
        }
        let mut outcomes = vec![];
        for t in targets {
            let target = self.s.g.characters[t].clone();
            let why = save_conditions(&target.conditions, spec.ability);
            let bonus = target.save_bonus(spec.ability);
            let mode = Mode::from_sources(!why.advantage.is_empty(), !why.disadvantage.is_empty());
            let (d20, total, success) = match why.auto_fail {
                Some(_) => (None, None, false),
                None => {
                    let r = self.s.dice.d20("save", Some(*t), mode, bonus);
                    (Some(r.kept), Some(r.total), r.total >= spec.dc)
                }
            };
            let mut outcome = Outcome {
                target_id: *t,
                effects: vec![if success {
                    "save_succeeded"
                } else {
                    "save_failed"
                }
                .into()],
                damage: DamageReport::default(),
                conditions: vec![],
                attack: None,
                save: Some(SaveRoll {
                    ability: spec.ability,
                    dc: spec.dc,
                    d20,
                    bonus,
                    total,
                    mode,
                    auto_fail: why.auto_fail,
                    success,
                }),
                concentration_check: None,
                healed: None,
                hp: 0,
                temp_hp: 0,
            };
            if !rolled.is_empty() {
                if success && half {
                    let halved = rolled.iter().map(|(t, n)| (*t, n / 2)).collect();
                    self.damage(&mut outcome, halved, false, true);
                } else if !success {
                    self.damage(&mut outcome, rolled.clone(), false, false);
                }
            }
            if !success {
                self.impose(&mut outcome)?;
            }
            self.finish(&mut outcome);
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn heal(&mut self, targets: &[Uuid]) -> Result<Vec<Outcome>> {
        let amount = self
            .details
            .amount
            .as_deref()
            .ok_or_else(|| bad("a heal action needs details.amount (dice)"))?;
        let dice = Dice::parse(amount)?;
        self.check_range(targets)?;
        self.start_concentration();
        let n = self.s.dice.roll("heal", Some(self.actor), dice).max(0) as u32;
        let mut outcomes = vec![];
        for t in targets {
            let mut outcome = Outcome {
                target_id: *t,
                effects: vec![],
                damage: DamageReport::default(),
                conditions: vec![],
                attack: None,
                save: None,
                concentration_check: None,
                healed: Some(n),
                hp: 0,
                temp_hp: 0,
            };
            if self.details.temporary {
                self.s.ch(*t).gain_temp_hp(n);
                outcome.effects.push("temp_hp_gained".into());
            } else {
                let what = self.s.ch(*t).heal(n);
                outcome.effects.extend(what.into_iter().map(String::from));
            }
            self.impose(&mut outcome)?;
            self.finish(&mut outcome);
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// `out_of_range` if a target on the grid is beyond `details.range`.
    fn check_range(&self, targets: &[Uuid]) -> Result<()> {
        let Some(range) = self.details.range else {
            return Ok(());
        };
        for t in targets {
            if let Some(d) = self.s.g.distance(self.actor, *t) {
                if d > range.normal() {
                    return Err(
                        RuleError::new(codes::OUT_OF_RANGE, "the target is out of range")
                            .with_details(
                                json!({ "target_id": t, "distance": d, "range": range.normal() }),
                            ),
                    );
                }
            }
        }
        Ok(())
    }

    /// A ranged attack with a hostile, able creature within 5 ft has disadvantage.
    fn hostile_within_5ft(&self, actor: &Character) -> bool {
        let Some(p) = actor.position else {
            return false;
        };
        self.s.g.characters.values().any(|c| {
            c.side != actor.side
                && !c.incapacitated()
                && c.position.is_some_and(|q| q.distance(p) <= 5)
        })
    }

    /// A concentration action replaces the actor's previous concentration.
    fn start_concentration(&mut self) {
        if !self.details.concentration {
            return;
        }
        self.s.g.end_concentration(self.actor);
        self.s.ch(self.actor).concentration = Some(Concentration {
            action_id: self.action_id,
            name: self.details.name.clone().unwrap_or_default(),
        });
    }

    /// Deals typed damage to the outcome's target, then its concentration check.
    fn damage(
        &mut self,
        outcome: &mut Outcome,
        rolled: BTreeMap<DamageType, u32>,
        critical: bool,
        halved: bool,
    ) {
        let t = outcome.target_id;
        let target = self.s.ch(t);
        let mut report = DamageReport {
            critical,
            halved_by_save: halved,
            ..Default::default()
        };
        for (ty, n) in &rolled {
            let (dealt, adj) = target.adjust_damage(*ty, *n);
            report.dealt.insert(*ty, dealt);
            if let Some(adj) = adj {
                report.adjustments.insert(*ty, adj.into());
            }
            report.total += dealt;
        }
        report.rolled = rolled;
        report.temp_hp_absorbed = report.total.min(target.temp_hp);
        let what = target.take_damage(report.total, critical);
        outcome.effects.extend(what.into_iter().map(String::from));
        outcome.damage = report;
        let total = outcome.damage.total;
        let target = self.s.ch(t);
        if total == 0 || target.concentration.is_none() {
            return;
        }
        if target.incapacitated() {
            self.s.g.end_concentration(t);
            outcome.effects.push("concentration_broken".into());
            return;
        }
        let dc = (total as i32 / 2).max(10);
        let bonus = target.save_bonus(Ability::Con);
        let r = self
            .s
            .dice
            .d20("concentration", Some(t), Mode::Normal, bonus);
        let success = r.total >= dc;
        outcome.concentration_check = Some(ConcentrationCheck {
            dc,
            d20: r.kept,
            total: r.total,
            success,
        });
        if success {
            outcome.effects.push("concentration_kept".into());
        } else {
            self.s.g.end_concentration(t);
            outcome.effects.push("concentration_broken".into());
        }
    }

    /// Imposes the action's conditions on the outcome's target.
    fn impose(&mut self, outcome: &mut Outcome) -> Result<()> {
        let t = outcome.target_id;
        for spec in self.details.conditions.clone() {
            let target = &self.s.g.characters[&t];
            if target.is_dead() {
                break;
            }
            if target.immune_to(spec.condition) {
                outcome
                    .effects
                    .push(format!("immune:{}", spec.condition.as_str()));
                continue;
            }
            // If the actor lost this concentration mid-action, its effects are gone too.
            let concentrating = self.details.concentration
                && self.s.g.characters[&self.actor]
                    .concentration
                    .as_ref()
                    .is_some_and(|c| c.action_id == self.action_id);
            if self.details.concentration && !concentrating {
                continue;
            }
            let duration = match spec.duration {
                Some(d) => Some(self.s.g.duration(d, t, Some(self.actor))?),
                None => None,
            };
            self.s.g.add_effect(Effect {
                id: 0,
                target: t,
                condition: spec.condition,
                source: Some(self.actor),
                concentration: self.details.concentration,
                action_id: Some(self.action_id),
                duration,
            });
            outcome.conditions.push(spec.condition);
        }
        Ok(())
    }

    /// Records the target's hit points after the action.
    fn finish(&mut self, outcome: &mut Outcome) {
        let c = &self.s.g.characters[&outcome.target_id];
        outcome.hp = c.hp;
        outcome.temp_hp = c.temp_hp;
    }
}
