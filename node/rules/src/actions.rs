//! Actions: who may act, what it costs, and how attacks, saving throws, damage,
//! healing and concentration resolve (SRD 5.1, "Combat" and "Spellcasting"). Help,
//! Hide and Ready are in [`crate::tactics`].
//!
//! An `action_declare` produces two events: `action_declare` (the declaration and the
//! action economy it spends) and `action_resolve` (one outcome per target, every roll).
//! A reaction that answers a paused move (see [`crate::movement`]) may add the rest of
//! that move (`character_moved`, maybe another `opportunity_attack`).
//!
//! # Who may act
//!
//! The character's controller or the DM (`not_your_character`), during combat
//! (`combat_not_active`, `initiative_pending`), for a participant
//! (`not_a_participant`) that is not incapacitated or dead (`incapacitated`) nor
//! surprised (`surprised`: no action or reaction until its first turn ends, SRD 5.1
//! "Combat: Surprise"), on its own turn (`not_your_turn`) unless the action costs its
//! reaction. A creature whose move is paused for opportunity attacks waits for them
//! (`reaction_pending`), except to react itself.
//!
//! # Cost (`details.cost`)
//!
//! `action` (default), `bonus_action` or `reaction`, once each per turn
//! (`no_action_left`, `no_bonus_action_left`, `no_reaction_left`). An Attack action
//! grants `attacks_per_action` attacks (Extra Attack): further `attack` declarations
//! that turn use them before needing a new action; so does an action that makes several
//! attack rolls (`details.attacks`, e.g. *scorching ray*: 3).
//!
//! # Attack (`action_type: "attack"`)
//!
//! "Making an attack [...] Choose a target" (SRD 5.1, "Combat: Making an Attack"): an
//! attack has exactly one target; each attack of Extra Attack is declared on its own.
//! d20 + `attack_bonus` (default: the ability modifier plus the proficiency bonus; the
//! ability is `details.ability`, else Strength for melee and Dexterity for ranged
//! attacks, except that a `thrown` melee weapon keeps Strength ("If the weapon is a
//! melee weapon, you use the same ability modifier for that attack roll [...] that you
//! would use for a melee attack") and a `finesse` weapon uses the better of Strength
//! and Dexterity, SRD 5.1 "Equipment: Weapon Properties") plus `details.attack_dice`
//! (e.g. *bless* `1d4`), against the target's AC plus its cover (SRD 5.1, "Combat:
//! Cover": +2 half, +5 three-quarters; the target's square, or `details.cover`). A
//! natural 1 always misses; a natural 20 always hits and is a critical hit, which
//! rolls the damage dice twice. Advantage and disadvantage come from conditions (see
//! [`crate::conditions`]), from `details.advantage` / `details.disadvantage`, from
//! Help, from exhaustion level 3, from a ranged attack beyond its normal range or with
//! a hostile creature within 5 ft; any of each cancel out. Melee reach is
//! `details.reach` or the creature's reach (5 ft); a ranged attack
//! (`details.range: {normal, long}`) cannot go beyond long range (`out_of_range`).
//! Distances are checked when both creatures are on the grid. A hidden attacker is
//! revealed by its attack.
//!
//! # Saving throw (`action_type: "save"`)
//!
//! `details.save: {ability, dc, half_on_success}`. Damage is rolled once for all
//! targets. Each target rolls its save ([`crate::saves`]: conditions, traits such as
//! Magic Resistance when `details.magical`, exhaustion, cover on Dexterity saves);
//! meeting the DC succeeds. A success takes half the damage when `half_on_success`
//! ("half as much damage": the total rolled is halved, rounded down, then shared out
//! among its types before resistances), else none, and avoids the conditions.
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
//! `details.conditions: [{condition, duration?, save_ends?}]` are imposed on a hit or a
//! failed save (not on an immune creature). `save_ends` (`{ability, dc}`, or `true` for
//! the action's own save) makes the target repeat the save at the end of each of its
//! turns ([`crate::combat`]). With `details.concentration: true` the actor starts
//! concentrating on this action (ending any earlier concentration) and the conditions
//! last only while it concentrates.
//!
//! # Heal, Dash, Disengage, Dodge, Other
//!
//! `heal` rolls `details.amount` once and heals each target (or grants temporary hit
//! points with `details.temporary`). `dash` adds the creature's speed to this turn's
//! movement; `disengage` stops this turn's moves from provoking opportunity attacks;
//! `dodge` imposes `dodging` until the start of the creature's next turn (or until it
//! is incapacitated or its speed drops to 0). `other` spends the cost and has no
//! mechanics.

use crate::character::{Ability, Character, Concentration, DamageReport, DamageType};
use crate::combat::not_a_participant;
use crate::command::{ActionDeclare, ActionType, Cost, Ctx, DurationSpec, SaveEndsSpec};
use crate::conditions::{attack_conditions, Boundary, Condition, Duration, Effect};
use crate::dice::{Dice, Mode};
use crate::encounter::Opportunity;
use crate::error::{codes, Result, RuleError};
use crate::event::{ActionDeclared, ActionResolved, AttackRoll, Event, Outcome};
use crate::game::{save_ends_of, Actor, Game, Scratch};
use crate::movement::{answer_opportunity, resume_move};
use crate::saves::{concentration_check, roll_save, SaveContext};
use crate::terrain::Cover;
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
pub(crate) struct Details {
    pub name: Option<String>,
    pub cost: Option<Cost>,
    attack_bonus: Option<i32>,
    ability: Option<Ability>,
    /// A melee weapon that can be thrown: a ranged attack keeping Strength.
    thrown: bool,
    /// Strength or Dexterity, whichever is better.
    finesse: bool,
    /// Dice added to the attack roll (*bless* `1d4`, *bane* `-1d4`).
    attack_dice: Option<String>,
    /// Attack rolls the action makes (a spell such as *scorching ray*: 3); each is
    /// declared on its own.
    attacks: Option<u32>,
    damage: Option<String>,
    damage_type: Option<DamageType>,
    extra_damage: Vec<DamagePart>,
    reach: Option<u32>,
    range: Option<Range>,
    pub advantage: bool,
    pub disadvantage: bool,
    /// The cover the targets have (instead of the cover of their squares).
    cover: Option<Cover>,
    save: Option<SaveSpec>,
    half_on_success: bool,
    /// A spell or other magical effect (Magic Resistance applies to its saves).
    magical: bool,
    conditions: Vec<ConditionSpec>,
    pub concentration: bool,
    amount: Option<String>,
    temporary: bool,
    /// Help: the creature the helped ally's next attack is against.
    pub against: Option<Uuid>,
    /// Hide: the DC (the highest passive Perception) and the Stealth bonus.
    pub dc: Option<i32>,
    pub bonus: Option<i32>,
    /// Ready: the action readied, its trigger, and whether it is a spell.
    pub action: Option<ActionType>,
    pub trigger: Option<String>,
    pub spell: bool,
    /// Releases the readied action (with the reaction).
    pub readied: bool,
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
    #[serde(default)]
    save_ends: Option<SaveEndsSpec>,
}

pub(crate) fn bad(message: impl Into<String>) -> RuleError {
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
        let out = |what: &str| Err(bad(what.to_string()));
        if d.attack_bonus.is_some_and(|b| !(-20..=30).contains(&b)) {
            return out("details.attack_bonus is -20 to 30");
        }
        if d.save.is_some_and(|s| !(1..=40).contains(&s.dc))
            || d.dc.is_some_and(|dc| !(1..=40).contains(&dc))
        {
            return out("a DC is 1 to 40");
        }
        if d.attacks.is_some_and(|n| !(1..=10).contains(&n)) {
            return out("details.attacks is 1 to 10");
        }
        if d.bonus.is_some_and(|b| !(-10..=30).contains(&b)) {
            return out("details.bonus is -10 to 30");
        }
        if d.reach.is_some_and(|r| !(5..=100).contains(&r)) {
            return out("details.reach is 5 to 100 ft");
        }
        if d.range
            .is_some_and(|r| !(5..=10_000).contains(&r.normal()) || r.long() > 10_000)
        {
            return out("details.range is 5 to 10000 ft");
        }
        if d.extra_damage.len() > MAX_PARTS || d.conditions.len() > MAX_PARTS {
            return Err(bad(format!(
                "at most {MAX_PARTS} extra damage parts and {MAX_PARTS} conditions"
            )));
        }
        if d.conditions.iter().any(|c| c.condition == Condition::Dead) {
            return out("`dead` is not imposed as a condition");
        }
        let long = |t: &Option<String>| t.as_ref().is_some_and(|n| n.chars().count() > 100);
        if long(&d.name) || long(&d.trigger) {
            return out("details.name and details.trigger are at most 100 characters");
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

    /// The ability of an attack (module docs: melee Str, ranged Dex, thrown Str,
    /// finesse the better).
    fn attack_ability(&self, actor: &Character) -> Ability {
        if let Some(a) = self.ability {
            return a;
        }
        if self.finesse {
            return if actor.abilities.dex > actor.abilities.str {
                Ability::Dex
            } else {
                Ability::Str
            };
        }
        if self.range.is_some() && !self.thrown {
            Ability::Dex
        } else {
            Ability::Str
        }
    }
}

impl Game {
    pub(crate) fn decide_action(
        &self,
        who: &Actor,
        ctx: &Ctx,
        a: &ActionDeclare,
    ) -> Result<Vec<Event>> {
        let (details, cost) = self.check_actor(who, a)?;
        let mut s = Scratch::new(self);
        let resume = self.spend(&mut s, a, cost, &details)?;
        self.check_targets(a, &details)?;
        let action_id = a.action_id.unwrap_or(ctx.command_id);
        let mut events = vec![Event::ActionDeclare(ActionDeclared {
            action_id,
            character_id: a.character_id,
            action_type: a.action_type,
            targets: a.targets.clone(),
            details: a.details.clone(),
            cost,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })];
        let mut r = Resolution {
            s,
            actor: a.character_id,
            action_id,
            details,
        };
        let outcomes = r.resolve(a.action_type, &a.targets, cost)?;
        events.push(Event::ActionResolve(ActionResolved {
            action_id,
            character_id: a.character_id,
            action_type: a.action_type,
            outcomes,
            rolls: r.s.rolls(),
            by: ctx.user_id,
            patch: r.s.patch(),
            timestamp: ctx.timestamp.clone(),
        }));
        if let Some(o) = resume {
            resume_move(&mut r.s, ctx, o, &mut events);
        }
        Ok(events)
    }

    /// Who may act, and when (module docs); returns the parsed details and the cost.
    fn check_actor(&self, who: &Actor, a: &ActionDeclare) -> Result<(Details, Cost)> {
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
        if participant.surprised {
            return Err(RuleError::new(
                codes::SURPRISED,
                "a surprised creature takes no action or reaction until its first turn ends",
            ));
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
        use ActionType::*;
        let not_reactions = [Dash, Disengage, Dodge, Help, Hide, Ready];
        if cost == Cost::Reaction && not_reactions.contains(&a.action_type) {
            return Err(bad(
                "dash, disengage, dodge, help, hide and ready are not reactions",
            ));
        }
        if a.action_type == Ready && cost != Cost::Action {
            return Err(bad("readying takes the action"));
        }
        if details.readied {
            let readied = participant.readied.as_ref();
            if cost != Cost::Reaction || readied.is_none_or(|r| r.action_type != a.action_type) {
                return Err(bad(
                    "`readied` releases a readied action of the same type, with the reaction",
                ));
            }
        }
        if cost != Cost::Reaction {
            self.require_no_pending_reactions(a.character_id)?;
        }
        Ok((details, cost))
    }

    /// Spends the cost on the scratch copy; a reaction may release a readied action
    /// and may answer a paused move (returned when it was the last one waited for).
    fn spend(
        &self,
        s: &mut Scratch,
        a: &ActionDeclare,
        cost: Cost,
        details: &Details,
    ) -> Result<Option<Opportunity>> {
        let id = a.character_id;
        let extra_attacks = self.characters[&id].attacks_per_action.saturating_sub(1);
        let combat = s.g.combat.as_mut().expect("checked above");
        let t = combat.turn.as_mut().expect("checked above");
        match cost {
            Cost::Reaction => {
                let p = combat.participants.get_mut(&id).expect("a participant");
                if p.reaction_used {
                    return Err(RuleError::new(
                        codes::NO_REACTION_LEFT,
                        "the reaction is spent until the start of its next turn",
                    ));
                }
                p.reaction_used = true;
                if details.readied {
                    let r = p.readied.take().expect("checked above");
                    let holding = s.g.characters[&id].concentration.as_ref();
                    if r.spell && holding.is_some_and(|c| c.action_id == r.action_id) {
                        // The held spell is released: its concentration was the holding.
                        s.g.end_concentration(id);
                    }
                }
                return Ok(answer_opportunity(s, id));
            }
            Cost::BonusAction => {
                if t.bonus_action_used {
                    return Err(RuleError::new(
                        codes::NO_BONUS_ACTION_LEFT,
                        "the bonus action of this turn is spent",
                    ));
                }
                t.bonus_action_used = true;
            }
            Cost::Action => {
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
                        extra_attacks.max(details.attacks.unwrap_or(1) - 1)
                    } else {
                        0
                    };
                }
            }
        }
        Ok(None)
    }

    /// Targets: the right number, distinct, in play, alive, not the charmer.
    fn check_targets(&self, a: &ActionDeclare, d: &Details) -> Result<()> {
        use ActionType::*;
        let invalid = |m: &str| RuleError::new(codes::INVALID_TARGET, m.to_string());
        let (min, max) = match a.action_type {
            Attack | Help => (1, 1),
            Save | Heal => (1, MAX_TARGETS),
            Dash | Disengage | Dodge | Hide | Ready => (0, 0),
            Other => (0, MAX_TARGETS),
        };
        if a.targets.len() < min || a.targets.len() > max {
            let why = match (a.action_type, max) {
                (Attack, _) => {
                    "an attack has exactly one target (each attack is declared on its own)"
                }
                (Help, _) => "help names the one ally helped",
                (_, 0) => "this action takes no targets",
                _ => "1 to 20 targets",
            };
            return Err(invalid(why));
        }
        let harmful = matches!(a.action_type, Attack | Save);
        for (i, t) in a.targets.iter().enumerate() {
            if a.targets[..i].contains(t) {
                return Err(invalid("a target is listed twice"));
            }
            let target = self.character(*t)?;
            if target.is_dead() && a.action_type != Other {
                return Err(invalid("the target is dead").with_details(json!({ "target_id": t })));
            }
            if matches!(a.action_type, Attack | Help) && *t == a.character_id {
                return Err(invalid("not on itself"));
            }
            if harmful && self.charmed_by(a.character_id, *t) {
                return Err(invalid("a charmed creature cannot harm its charmer")
                    .with_details(json!({ "target_id": t })));
            }
        }
        // Surface dice errors before anything resolves.
        d.damage_parts()?;
        for dice in [&d.amount, &d.attack_dice].into_iter().flatten() {
            Dice::parse(dice)?;
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

    /// The cover `target` has against an action: the declared one, else its square's.
    fn cover_of(&self, target: Uuid, declared: Option<Cover>) -> Cover {
        declared.unwrap_or_else(|| {
            self.characters[&target]
                .position
                .map_or(Cover::None, |p| self.terrain_at(p).cover)
        })
    }
}

/// Resolving one declared action on the scratch copy.
pub(crate) struct Resolution {
    pub s: Scratch,
    pub actor: Uuid,
    pub action_id: Uuid,
    pub details: Details,
}

impl Resolution {
    fn resolve(&mut self, kind: ActionType, targets: &[Uuid], cost: Cost) -> Result<Vec<Outcome>> {
        Ok(match kind {
            ActionType::Attack => vec![self.attack(targets[0])?],
            ActionType::Save => self.save(targets)?,
            ActionType::Heal => self.heal(targets)?,
            ActionType::Help => self.help(targets[0])?,
            ActionType::Hide => vec![self.hide()],
            ActionType::Ready => self.ready(cost)?,
            ActionType::Dash => {
                let speed = self.s.g.characters[&self.actor].speed_now();
                self.turn().movement_bonus += speed;
                vec![]
            }
            ActionType::Disengage => {
                self.turn().disengaged = true;
                vec![]
            }
            ActionType::Dodge => {
                let (actor, action_id) = (self.actor, self.action_id);
                self.s.g.add_effect(Effect {
                    id: 0,
                    target: actor,
                    condition: Condition::Dodging,
                    source: Some(actor),
                    concentration: false,
                    action_id: Some(action_id),
                    duration: Some(Duration {
                        rounds: 1,
                        ends: Boundary::Start,
                        of: actor,
                        minutes: None,
                    }),
                    save_ends: None,
                });
                vec![]
            }
            ActionType::Other => vec![],
        })
    }

    fn turn(&mut self) -> &mut crate::encounter::Turn {
        self.s
            .g
            .combat
            .as_mut()
            .and_then(|c| c.turn.as_mut())
            .expect("resolving on a turn")
    }

    /// An empty outcome for `target`.
    pub(crate) fn outcome(target: Uuid) -> Outcome {
        Outcome {
            target_id: target,
            effects: vec![],
            damage: DamageReport::default(),
            conditions: vec![],
            attack: None,
            save: None,
            concentration_check: None,
            check: None,
            healed: None,
            hp: 0,
            temp_hp: 0,
        }
    }

    fn attack(&mut self, t: Uuid) -> Result<Outcome> {
        let parts = self.details.damage_parts()?;
        let actor = self.s.g.characters[&self.actor].clone();
        let ranged = self.details.range.is_some();
        let bonus = self.details.attack_bonus.unwrap_or(
            actor.abilities.get(self.details.attack_ability(&actor)) + actor.proficiency_bonus,
        );
        let distance = self.s.g.distance(self.actor, t);
        self.check_reach(&actor, t, distance)?;
        self.start_concentration();
        let target = self.s.g.characters[&t].clone();
        let (advantage, disadvantage) = self.attack_sources(&actor, &target, distance);
        let mode = Mode::from_sources(!advantage.is_empty(), !disadvantage.is_empty());
        let d20 = self.s.dice.d20("attack", Some(self.actor), mode, bonus);
        let bonus_dice = match &self.details.attack_dice {
            Some(dice) => Some(self.s.dice.roll(
                "attack_bonus",
                Some(self.actor),
                &Dice::parse(dice)?,
            )),
            None => None,
        };
        let total = d20.total + bonus_dice.unwrap_or(0);
        let cover = self.s.g.cover_of(t, self.details.cover);
        let ac = target.ac + cover.bonus() as u32;
        let hit = d20.kept == 20 || (d20.kept != 1 && total >= ac as i32);
        let auto_critical =
            attack_conditions(&actor.conditions, &target.conditions, distance, !ranged)
                .auto_critical;
        let critical = hit && (d20.kept == 20 || auto_critical);
        let mut outcome = Resolution::outcome(t);
        outcome
            .effects
            .push(if hit { "hit" } else { "miss" }.into());
        outcome.attack = Some(AttackRoll {
            d20: d20.kept,
            bonus,
            bonus_dice,
            total,
            ac,
            cover,
            mode,
            advantage,
            disadvantage,
            distance,
            hit,
            critical,
        });
        if critical {
            outcome.effects.push("critical".into());
        }
        if hit {
            let mut rolled = BTreeMap::new();
            for (dice, ty) in &parts {
                let dice = if critical {
                    dice.doubled()
                } else {
                    dice.clone()
                };
                let n = self.s.dice.roll("damage", Some(self.actor), &dice).max(0) as u32;
                *rolled.entry(*ty).or_insert(0) += n;
            }
            self.damage(&mut outcome, rolled, critical, false);
            self.impose(&mut outcome, None)?;
        }
        // "If you are hidden [...] you give away your location when the attack hits or
        // misses" (SRD 5.1, "Combat: Unseen Attackers and Targets").
        self.s.g.remove_condition(self.actor, Condition::Hidden);
        self.finish(&mut outcome);
        Ok(outcome)
    }

    /// `out_of_range` beyond the melee reach, or beyond a ranged attack's long range.
    fn check_reach(&self, actor: &Character, t: Uuid, distance: Option<u32>) -> Result<()> {
        let Some(d) = distance else {
            return Ok(());
        };
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
        Ok(())
    }

    /// Why an attack roll on `target` has advantage and disadvantage; consumes the
    /// Help that applies.
    fn attack_sources(
        &mut self,
        actor: &Character,
        target: &Character,
        distance: Option<u32>,
    ) -> (Vec<String>, Vec<String>) {
        let ranged = self.details.range.is_some();
        let mut why = attack_conditions(&actor.conditions, &target.conditions, distance, !ranged);
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
        if ranged && self.hostile_within_5ft(actor) {
            why.disadvantage.push("hostile_within_5ft".into());
        }
        if actor.exhaustion >= 3 {
            why.disadvantage.push("attacker_exhausted".into());
        }
        if self.take_help(Some(target.id)) {
            why.advantage.push("helped".into());
        }
        (why.advantage, why.disadvantage)
    }

    /// Uses up the help given to the actor for an attack on `against` (or, with
    /// `None`, for an ability check); whether there was one.
    pub(crate) fn take_help(&mut self, against: Option<Uuid>) -> bool {
        let actor = self.actor;
        let Some(c) = self.s.g.combat.as_mut() else {
            return false;
        };
        let helper = c.participants.values_mut().find(|p| {
            p.help
                .as_ref()
                .is_some_and(|h| h.ally == actor && h.against == against)
        });
        match helper {
            Some(p) => {
                p.help = None;
                true
            }
            None => false,
        }
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
            let n = self.s.dice.roll("damage", Some(self.actor), dice).max(0) as u32;
            *rolled.entry(*t).or_insert(0) += n;
        }
        let action_save = (spec.ability, spec.dc, self.details.magical);
        let mut outcomes = vec![];
        for t in targets {
            let target = self.s.g.characters[t].clone();
            let ctx = SaveContext {
                magical: self.details.magical,
                cover: self.s.g.cover_of(*t, self.details.cover),
                concentration: false,
            };
            let roll = roll_save(
                &mut self.s.dice,
                "save",
                &target,
                spec.ability,
                spec.dc,
                ctx,
            );
            let success = roll.success;
            let mut outcome = Resolution::outcome(*t);
            outcome.effects.push(
                if success {
                    "save_succeeded"
                } else {
                    "save_failed"
                }
                .into(),
            );
            outcome.save = Some(roll);
            if !rolled.is_empty() {
                if success && half {
                    self.damage(&mut outcome, halve_total(&rolled), false, true);
                } else if !success {
                    self.damage(&mut outcome, rolled.clone(), false, false);
                }
            }
            if !success {
                self.impose(&mut outcome, Some(action_save))?;
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
        let n = self.s.dice.roll("heal", Some(self.actor), &dice).max(0) as u32;
        let mut outcomes = vec![];
        for t in targets {
            let mut outcome = Resolution::outcome(*t);
            outcome.healed = Some(n);
            if self.details.temporary {
                self.s.ch(*t).gain_temp_hp(n);
                outcome.effects.push("temp_hp_gained".into());
            } else {
                let what = self.s.ch(*t).heal(n);
                outcome.effects.extend(what.into_iter().map(String::from));
            }
            self.impose(&mut outcome, None)?;
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
    pub(crate) fn start_concentration(&mut self) {
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
        let target = target.clone();
        let check = concentration_check(&mut self.s.dice, &target, total);
        if check.success {
            outcome.effects.push("concentration_kept".into());
        } else {
            self.s.g.end_concentration(t);
            outcome.effects.push("concentration_broken".into());
        }
        outcome.concentration_check = Some(check);
    }

    /// Imposes the action's conditions on the outcome's target. `action_save` is the
    /// save of a save action, `(ability, dc, magical)`, for `save_ends: true`.
    fn impose(
        &mut self,
        outcome: &mut Outcome,
        action_save: Option<(Ability, i32, bool)>,
    ) -> Result<()> {
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
            let save_ends = match spec.save_ends {
                Some(se) => Some(save_ends_of(se, action_save)?),
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
                save_ends,
            });
            outcome.conditions.push(spec.condition);
        }
        Ok(())
    }

    /// Records the target's hit points after the action.
    pub(crate) fn finish(&mut self, outcome: &mut Outcome) {
        let c = &self.s.g.characters[&outcome.target_id];
        outcome.hp = c.hp;
        outcome.temp_hp = c.temp_hp;
    }
}

/// Half of a damage roll (a successful save for half): "half as much damage" is half
/// the total, rounded down (SRD 5.1, "Spellcasting: Saving Throws"; "Rounding Down"),
/// shared out among the types so that resistances still apply per type: each type
/// keeps half its amount rounded down, and the odd points left go to the odd types in
/// turn (7 fire + 7 cold → 3 fire + 4 cold = 7, not 6).
pub(crate) fn halve_total(rolled: &BTreeMap<DamageType, u32>) -> BTreeMap<DamageType, u32> {
    let total: u32 = rolled.values().sum();
    let mut half: BTreeMap<DamageType, u32> = rolled.iter().map(|(t, n)| (*t, n / 2)).collect();
    let mut left = total / 2 - half.values().sum::<u32>();
    for (t, n) in rolled {
        if left == 0 {
            break;
        }
        if n % 2 == 1 {
            *half.get_mut(t).expect("same keys") += 1;
            left -= 1;
        }
    }
    half
}
