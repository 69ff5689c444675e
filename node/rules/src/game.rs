//! Rules-managed play state: characters in play, effects, combat and dice.
//!
//! # How play commands are decided and applied
//!
//! [`crate::SessionState::decide`] hands play commands to `Game::decide`, which
//! runs the rules on a `Scratch` copy of the play state: it mutates the copy with the
//! same small helpers every rule uses (damage, healing, conditions, effects), draws
//! dice from the session's stream, and at each event boundary takes the JSON merge
//! patch from the copy's previous state ([`crate::patch`]). Each event carries its
//! patch and its rolls. [`Game::apply`] merges the patch, nothing more. Hence:
//!
//! * `apply` makes no choice and cannot disagree with `decide`;
//! * replaying the stored events reproduces the live state exactly;
//! * a refused command has touched only the scratch copy, so it changes nothing.
//!
//! # Invariants kept after every event (`Game::settle`)
//!
//! * A creature that is incapacitated (or dead) is not concentrating.
//! * A creature that is incapacitated or whose speed is 0 is not dodging (SRD 5.1,
//!   "Actions in Combat: Dodge").
//! * A creature whose grappler is incapacitated is not grappled by it (SRD 5.1,
//!   appendix A, "Grappled").
//! * A readied spell is held only while its caster concentrates on it (SRD 5.1,
//!   "Actions in Combat: Ready").
//! * An effect's condition is in its target's `conditions`.
//! * The dice counter only grows, also across rollbacks, so no roll is ever repeated.

use crate::character::{Character, CharacterChanges, Concentration, Pos};
use crate::command::{Command, Ctx, DurationSpec, JoinRequest, SaveEndsSpec};
use crate::conditions::{Condition, Duration, Effect, SaveEnds};
use crate::dice::{self, Roll, Roller};
use crate::encounter::Combat;
use crate::error::{codes, Result, RuleError};
use crate::event::{
    CharacterPlaced, CharacterSpawned, CharacterUpdated, ConcentrationEnded, ConditionApplied,
    ConditionRemoved, Event, TerrainChanged,
};
use crate::patch;
use crate::terrain::{self, Terrain, TerrainSquare};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Longest duration, in rounds, of an effect.
pub const MAX_DURATION_ROUNDS: u32 = 1_000;
/// Longest duration, in minutes, of an effect (10 rounds a minute).
pub const MAX_DURATION_MINUTES: u32 = MAX_DURATION_ROUNDS / 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Game {
    /// The dice seed. Never shown to clients: views drop it, and patches never carry
    /// it because it never changes after creation.
    pub seed: u64,
    /// How many random numbers the session has drawn.
    pub dice_counter: u64,
    /// `settings.allow_client_rolls` at creation: clients may report their initiative d20.
    pub allow_client_rolls: bool,
    pub characters: BTreeMap<Uuid, Character>,
    /// Active effects by id.
    pub effects: BTreeMap<u64, Effect>,
    /// The last effect id handed out (ids are never reused).
    pub next_effect_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub combat: Option<Combat>,
    /// Marked squares of the battle map (difficult terrain, cover), keyed `"x,y"`
    /// ([`terrain::key`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub terrain: BTreeMap<String, Terrain>,
    /// The battle map from the Image Service (`map_updated`): `{url, asset_id, grid,
    /// request_id}`, never the image itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map: Option<Value>,
}

/// Who issues a play command, as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Actor {
    pub user: Uuid,
    /// The session's DM, or an admin.
    pub dm: bool,
    /// The characters this member controls (bound at join).
    pub controls: Vec<Uuid>,
}

impl Actor {
    pub fn require_dm(&self, what: &str) -> Result<()> {
        if self.dm {
            return Ok(());
        }
        Err(RuleError::new(
            codes::FORBIDDEN_FOR_ROLE,
            format!("only the DM can {what}"),
        ))
    }

    /// The DM controls every character; a player the characters bound at join.
    pub fn require_control(&self, character: Uuid) -> Result<()> {
        if self.dm || self.controls.contains(&character) {
            return Ok(());
        }
        Err(RuleError::new(
            codes::NOT_YOUR_CHARACTER,
            "you do not control that character",
        )
        .with_details(json!({ "character_id": character })))
    }
}

/// A working copy of the play state for one decision (see the module docs).
pub(crate) struct Scratch {
    pub g: Game,
    pub dice: Roller,
    last: Value,
}

impl Scratch {
    pub fn new(game: &Game) -> Self {
        Scratch {
            g: game.clone(),
            dice: Roller::new(game.seed, game.dice_counter),
            last: serde_json::to_value(game).expect("the play state serialises"),
        }
    }

    /// Restores the invariants and returns the merge patch since the last call.
    pub fn patch(&mut self) -> Value {
        self.g.settle();
        self.g.dice_counter = self.dice.counter();
        let now = serde_json::to_value(&self.g).expect("the play state serialises");
        let p = patch::diff_or_null(&self.last, &now);
        if cfg!(debug_assertions) {
            // The patch must rebuild exactly the state the rules reached.
            let mut check = self.last.clone();
            if !patch::is_empty(&p) {
                patch::merge(&mut check, &p);
            }
            let rebuilt: Game = serde_json::from_value(check).expect("patched state parses");
            assert_eq!(
                rebuilt, self.g,
                "a patch does not reproduce the decided state"
            );
        }
        self.last = now;
        p
    }

    /// The rolls drawn since the last call.
    pub fn rolls(&mut self) -> Vec<Roll> {
        self.dice.take_rolls()
    }

    pub fn ch(&mut self, id: Uuid) -> &mut Character {
        self.g
            .characters
            .get_mut(&id)
            .expect("decide checked the character is in play")
    }
}

pub(crate) fn unknown_character(id: Uuid) -> RuleError {
    RuleError::new(
        codes::UNKNOWN_CHARACTER,
        "that character is not in play in this session",
    )
    .with_details(json!({ "character_id": id }))
}

impl Game {
    /// The play state of a new session.
    pub fn new(session_id: Uuid, settings: &Value) -> Self {
        Game {
            seed: dice::session_seed(session_id, settings),
            allow_client_rolls: settings
                .get("allow_client_rolls")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ..Default::default()
        }
    }

    /// Validates the rules' part of a join: a sheet needs a character id and must be
    /// valid; a monster's id cannot be claimed. A character already in play keeps its
    /// state (the sheet of a re-join is ignored, so re-joining cannot heal).
    pub fn check_join(&self, _ctx: &Ctx, join: &JoinRequest) -> Result<()> {
        match (join.character_id, &join.character) {
            (None, Some(_)) => Err(RuleError::new(
                codes::INVALID_CHARACTER,
                "a character sheet needs a character_id",
            )),
            (Some(id), sheet) => {
                if let Some(c) = self.characters.get(&id) {
                    if !c.player_character {
                        return Err(RuleError::new(
                            codes::CHARACTER_TAKEN,
                            "that character is a monster or NPC of the DM",
                        )
                        .with_details(json!({ "character_id": id })));
                    }
                    return Ok(());
                }
                if let Some(sheet) = sheet {
                    Character::from_sheet(id, sheet, true)?;
                }
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// Follows every applied event: play events merge their patch; a join with a
    /// sheet puts the player's character in play.
    pub fn apply(&mut self, event: &Event) {
        if let Event::PlayerJoined {
            character_id: Some(id),
            character: Some(sheet),
            patch,
            ..
        } = event
        {
            if !patch.is_null() {
                // Decided with a patch: the patch is the truth (below).
                if !patch::is_empty(patch) {
                    let mut v = serde_json::to_value(&*self).expect("the play state serialises");
                    patch::merge(&mut v, patch);
                    *self = serde_json::from_value(v).expect("a decided patch applies");
                }
                return;
            }
            if !self.characters.contains_key(id) {
                // check_join validated the sheet; a sheet that a later version of the
                // rules refuses leaves the character out of play instead of failing.
                if let Ok(c) = Character::from_sheet(*id, sheet, true) {
                    self.characters.insert(*id, c);
                }
            }
            return;
        }
        if let Some(p) = event.patch() {
            if !patch::is_empty(p) {
                let mut v = serde_json::to_value(&*self).expect("the play state serialises");
                patch::merge(&mut v, p);
                *self = serde_json::from_value(v).expect("a decided patch applies");
            }
        }
    }

    /// What clients see: everything but the dice seed.
    pub fn view(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("the play state serialises");
        if let Value::Object(m) = &mut v {
            m.remove("seed");
        }
        v
    }

    /// The ICD's Redis hash `session:{id}:combat`: `round`, `turn`, `initiative_order`
    /// (a JSON array), `active_effects` (a JSON array), plus `combat_id` and
    /// `active_character`. `None` when no combat is running (delete the key).
    pub fn combat_summary(&self) -> Option<BTreeMap<String, String>> {
        let c = self.combat.as_ref()?;
        let order: Vec<Value> = c
            .initiative_order()
            .into_iter()
            .map(|id| {
                let p = &c.participants[&id];
                json!({
                    "character_id": id,
                    "name": self.characters.get(&id).map(|ch| ch.name.as_str()),
                    "initiative": p.initiative.as_ref().map(|i| i.total),
                })
            })
            .collect();
        let effects: Vec<&Effect> = self.effects.values().collect();
        let mut m = BTreeMap::new();
        m.insert("combat_id".into(), c.id.to_string());
        m.insert("round".into(), c.round.to_string());
        m.insert("turn".into(), c.turn_number.to_string());
        if let Some(t) = &c.turn {
            m.insert("active_character".into(), t.character_id.to_string());
        }
        m.insert("initiative_order".into(), Value::Array(order).to_string());
        m.insert(
            "active_effects".into(),
            serde_json::to_string(&effects).expect("effects serialise"),
        );
        Some(m)
    }

    /// A character in play, or `unknown_character`.
    pub fn character(&self, id: Uuid) -> Result<&Character> {
        self.characters
            .get(&id)
            .ok_or_else(|| unknown_character(id))
    }

    /// The play state restored by a rollback to `past`: the past characters, effects
    /// and combat; the current dice counter and effect ids (so nothing repeats); and
    /// the current state of `keep`, characters bound by current members that were not
    /// yet in play back then.
    pub fn restored(&self, past: &Game, keep: &[Uuid]) -> Game {
        let mut g = past.clone();
        g.seed = self.seed;
        g.allow_client_rolls = self.allow_client_rolls;
        g.dice_counter = self.dice_counter.max(past.dice_counter);
        g.next_effect_id = self.next_effect_id.max(past.next_effect_id);
        for id in keep {
            if let (false, Some(c)) = (g.characters.contains_key(id), self.characters.get(id)) {
                let mut c = c.clone();
                // Its effects are not restored, so neither is what depended on them.
                c.concentration = None;
                g.characters.insert(*id, c);
            }
        }
        g.settle();
        g
    }

    /// The merge patch from this state to `other` (used by rollbacks).
    pub fn patch_to(&self, other: &Game) -> Value {
        patch::diff_or_null(
            &serde_json::to_value(self).expect("the play state serialises"),
            &serde_json::to_value(other).expect("the play state serialises"),
        )
    }

    // ---- Helpers that change the play state (used on a Scratch copy) ----

    /// Imposes a condition through an effect; returns the effect's id.
    pub(crate) fn add_effect(&mut self, mut e: Effect) -> u64 {
        self.next_effect_id += 1;
        e.id = self.next_effect_id;
        if let Some(c) = self.characters.get_mut(&e.target) {
            c.add_condition(e.condition);
        }
        self.effects.insert(e.id, e);
        self.next_effect_id
    }

    /// Ends an effect; its condition goes unless another effect still imposes it.
    pub(crate) fn end_effect(&mut self, id: u64) {
        let Some(e) = self.effects.remove(&id) else {
            return;
        };
        let still = self
            .effects
            .values()
            .any(|o| o.target == e.target && o.condition == e.condition);
        if !still {
            if let Some(c) = self.characters.get_mut(&e.target) {
                c.conditions.remove(&e.condition);
            }
        }
    }

    /// Ends `who`'s concentration and the effects that hung on it.
    pub(crate) fn end_concentration(&mut self, who: Uuid) -> Option<(Concentration, Vec<u64>)> {
        let conc = self.characters.get_mut(&who)?.concentration.take()?;
        let ended: Vec<u64> = self
            .effects
            .values()
            .filter(|e| {
                e.concentration && e.source == Some(who) && e.action_id == Some(conc.action_id)
            })
            .map(|e| e.id)
            .collect();
        for id in &ended {
            self.end_effect(*id);
        }
        Some((conc, ended))
    }

    /// Removes a condition from `who`, ending every effect that imposes it.
    pub(crate) fn remove_condition(&mut self, who: Uuid, cond: Condition) -> Vec<u64> {
        let ended: Vec<u64> = self
            .effects
            .values()
            .filter(|e| e.target == who && e.condition == cond)
            .map(|e| e.id)
            .collect();
        for id in &ended {
            self.end_effect(*id);
        }
        if let Some(c) = self.characters.get_mut(&who) {
            c.conditions.remove(&cond);
        }
        ended
    }

    /// Restores the invariants (module docs): incapacitated creatures stop
    /// concentrating and dodging, creatures at speed 0 stop dodging, grapples of
    /// incapacitated grapplers end, readied spells without concentration are lost.
    pub(crate) fn settle(&mut self) {
        loop {
            if let Some(id) = self
                .characters
                .values()
                .find(|c| c.concentration.is_some() && c.incapacitated())
                .map(|c| c.id)
            {
                self.end_concentration(id);
                continue;
            }
            if let Some(id) = self
                .characters
                .values()
                .find(|c| c.has(Condition::Dodging) && (c.incapacitated() || c.speed_now() == 0))
                .map(|c| c.id)
            {
                self.remove_condition(id, Condition::Dodging);
                continue;
            }
            let loose = self.effects.values().find(|e| {
                e.condition == Condition::Grappled
                    && e.source
                        .is_some_and(|g| self.characters.get(&g).is_none_or(|g| g.incapacitated()))
            });
            if let Some(id) = loose.map(|e| e.id) {
                self.end_effect(id);
                continue;
            }
            self.drop_lost_readied_spells();
            return;
        }
    }

    /// Ends the readied spells whose casters no longer concentrate on them.
    fn drop_lost_readied_spells(&mut self) {
        let Some(combat) = self.combat.as_mut() else {
            return;
        };
        for (id, p) in combat.participants.iter_mut() {
            let held = |r: &crate::encounter::Readied| {
                !r.spell
                    || self
                        .characters
                        .get(id)
                        .and_then(|c| c.concentration.as_ref())
                        .is_some_and(|c| c.action_id == r.action_id)
            };
            if p.readied.as_ref().is_some_and(|r| !held(r)) {
                p.readied = None;
            }
        }
    }

    /// The marks of a square (none if unmarked).
    pub fn terrain_at(&self, p: Pos) -> Terrain {
        self.terrain
            .get(&terrain::key(p))
            .copied()
            .unwrap_or_default()
    }

    /// Whether a living creature other than `except` stands on `pos`.
    pub(crate) fn occupied(&self, pos: Pos, except: Uuid) -> Option<Uuid> {
        self.characters
            .values()
            .find(|c| c.id != except && c.position == Some(pos) && !c.is_dead())
            .map(|c| c.id)
    }

    // ---- Decisions ----

    /// Decides a play command (the session's status and the sender's membership were
    /// checked by the caller).
    pub(crate) fn decide(&self, who: &Actor, ctx: &Ctx, cmd: &Command) -> Result<Vec<Event>> {
        match cmd {
            Command::SpawnCharacter {
                character_id,
                sheet,
            } => self.decide_spawn(who, ctx, character_id.unwrap_or(ctx.command_id), sheet),
            Command::CharacterUpdate {
                character_id,
                changes,
            } => {
                who.require_dm("update characters")?;
                self.decide_update(ctx, *character_id, changes, "dm")
            }
            Command::CharacterSync {
                character_id,
                changes,
            } => self.decide_update(ctx, *character_id, changes, "hub"),
            Command::PlaceCharacter {
                character_id,
                position,
            } => self.decide_place(who, ctx, *character_id, *position),
            Command::CombatStart {
                participants,
                surprised,
            } => self.decide_combat_start(who, ctx, participants, surprised),
            Command::CombatAdd { participants } => self.decide_combat_add(who, ctx, participants),
            Command::CombatEnd {} => self.decide_combat_end(who, ctx),
            Command::InitiativeRoll {
                character_id,
                roll,
                modifiers,
            } => self.decide_initiative(who, ctx, *character_id, *roll, modifiers),
            Command::EndTurn {} => self.decide_end_turn(who, ctx),
            Command::ActionDeclare(a) => self.decide_action(who, ctx, a),
            Command::Move {
                character_id,
                to,
                path,
            } => self.decide_move(who, ctx, *character_id, *to, path),
            Command::StandUp { character_id } => self.decide_stand_up(who, ctx, *character_id),
            Command::ApplyCondition {
                character_id,
                condition,
                duration,
                source,
                save_ends,
            } => self.decide_apply_condition(
                who,
                ctx,
                *character_id,
                *condition,
                (*duration, *source, *save_ends),
            ),
            Command::RemoveCondition {
                character_id,
                condition,
            } => self.decide_remove_condition(who, ctx, *character_id, *condition),
            Command::EndConcentration { character_id } => {
                self.decide_end_concentration(who, ctx, *character_id)
            }
            Command::TerrainSet { squares, clear } => {
                self.decide_terrain(who, ctx, squares, *clear)
            }
            Command::ReactionDecline { character_id } => {
                self.decide_reaction_decline(who, ctx, *character_id)
            }
            other => Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("{} is not a play command", other.kind()),
            )),
        }
    }

    fn decide_spawn(&self, who: &Actor, ctx: &Ctx, id: Uuid, sheet: &Value) -> Result<Vec<Event>> {
        who.require_dm("spawn characters")?;
        if self.characters.contains_key(&id) {
            return Err(RuleError::new(
                codes::INVALID_CHARACTER,
                "a character with that id is already in play",
            )
            .with_details(json!({ "character_id": id })));
        }
        let c = Character::from_sheet(id, sheet, false)?;
        if let Some(other) = c.position.and_then(|p| self.occupied(p, id)) {
            return Err(occupied_error(other));
        }
        let name = c.name.clone();
        let mut s = Scratch::new(self);
        s.g.characters.insert(id, c);
        Ok(vec![Event::CharacterSpawned(CharacterSpawned {
            character_id: id,
            name,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }

    /// `character_update` and hub syncs. A change that changes nothing emits nothing,
    /// so a redelivered hub event is harmless. Hit points lost this way are damage to
    /// a concentrating creature: it makes the Constitution save that keeps concentration
    /// (SRD 5.1, "Spellcasting: Concentration": "Whenever you take damage while you are
    /// concentrating on a spell, you must make a Constitution saving throw").
    fn decide_update(
        &self,
        ctx: &Ctx,
        id: Uuid,
        changes: &CharacterChanges,
        source: &str,
    ) -> Result<Vec<Event>> {
        let before = self.character(id)?.hp;
        if changes.conditions_remove.contains(&Condition::Dead) {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "the dead come back by gaining hit points (`hp`), not by removing `dead`",
            ));
        }
        let mut s = Scratch::new(self);
        changes.apply_stats(s.ch(id))?;
        if source == "hub" {
            // The Character Service's word: a pending stand-in is now its character.
            s.ch(id).pending = false;
        }
        let mut effects_ended = vec![];
        for c in &changes.conditions_remove {
            effects_ended.extend(s.g.remove_condition(id, *c));
        }
        for c in &changes.conditions_add {
            if *c == Condition::Dead {
                s.ch(id).die();
            } else {
                s.ch(id).add_condition(*c);
            }
        }
        let lost = before.saturating_sub(s.g.characters[&id].hp);
        let target = &s.g.characters[&id];
        let concentration_check = if changes.hp.is_some()
            && lost > 0
            && target.concentration.is_some()
            && !target.incapacitated()
        {
            let target = target.clone();
            let check = crate::saves::concentration_check(&mut s.dice, &target, lost);
            if !check.success {
                s.g.end_concentration(id);
            }
            Some(check)
        } else {
            None
        };
        let rolls = s.rolls();
        let patch = s.patch();
        if patch::is_empty(&patch) {
            return Ok(vec![]);
        }
        Ok(vec![Event::CharacterUpdated(CharacterUpdated {
            character_id: id,
            changes: changes.clone(),
            source: source.into(),
            effects_ended,
            concentration_check,
            rolls,
            by: ctx.user_id,
            patch,
            timestamp: ctx.timestamp.clone(),
        })])
    }

    fn decide_place(&self, who: &Actor, ctx: &Ctx, id: Uuid, pos: Pos) -> Result<Vec<Event>> {
        who.require_dm("place characters")?;
        let from = self.character(id)?.position;
        check_in_bounds(pos)?;
        if let Some(other) = self.occupied(pos, id) {
            return Err(occupied_error(other));
        }
        let mut s = Scratch::new(self);
        s.ch(id).position = Some(pos);
        Ok(vec![Event::CharacterPlaced(CharacterPlaced {
            character_id: id,
            from,
            position: pos,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }

    /// `terrain_set` (DM, any time): marks squares as difficult terrain or cover, or
    /// clears them (see [`crate::terrain`]).
    fn decide_terrain(
        &self,
        who: &Actor,
        ctx: &Ctx,
        squares: &[TerrainSquare],
        clear: bool,
    ) -> Result<Vec<Event>> {
        who.require_dm("mark the battle map")?;
        terrain::check_squares(squares, clear)?;
        let mut s = Scratch::new(self);
        if clear {
            s.g.terrain.clear();
        }
        for sq in squares {
            if sq.terrain().is_plain() {
                s.g.terrain.remove(&terrain::key(sq.pos()));
            } else {
                s.g.terrain.insert(terrain::key(sq.pos()), sq.terrain());
            }
        }
        if s.g.terrain.len() > terrain::MAX_TERRAIN_SQUARES {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                format!(
                    "at most {} marked squares on a map",
                    terrain::MAX_TERRAIN_SQUARES
                ),
            ));
        }
        Ok(vec![Event::TerrainChanged(TerrainChanged {
            squares: squares.to_vec(),
            cleared: clear,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }

    /// `apply_condition` (DM). With a source, a duration or `save_ends`, an effect
    /// records the condition (`ended` = `(duration, source, save_ends)`).
    fn decide_apply_condition(
        &self,
        who: &Actor,
        ctx: &Ctx,
        id: Uuid,
        condition: Condition,
        ended: (Option<DurationSpec>, Option<Uuid>, Option<SaveEndsSpec>),
    ) -> Result<Vec<Event>> {
        let (duration, source, save_ends) = ended;
        who.require_dm("impose conditions")?;
        let target = self.character(id)?;
        if condition == Condition::Dead {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "kill a creature with `character_update` (hp 0), not a condition",
            ));
        }
        if target.is_dead() {
            return Err(RuleError::new(codes::INVALID_TARGET, "the target is dead"));
        }
        if target.immune_to(condition) {
            return Err(RuleError::new(
                codes::CONDITION_IMMUNE,
                format!("the target is immune to {}", condition.as_str()),
            ));
        }
        if let Some(src) = source {
            self.character(src)?;
        }
        let duration = match duration {
            Some(d) => Some(self.duration(d, id, source)?),
            None => None,
        };
        let save_ends = match save_ends {
            None => None,
            Some(spec) => Some(save_ends_of(spec, None)?),
        };
        let mut s = Scratch::new(self);
        let effect_id = if duration.is_some() || source.is_some() || save_ends.is_some() {
            Some(s.g.add_effect(Effect {
                id: 0,
                target: id,
                condition,
                source,
                concentration: false,
                action_id: None,
                duration,
                save_ends,
            }))
        } else {
            s.ch(id).add_condition(condition);
            None
        };
        Ok(vec![Event::ConditionApplied(ConditionApplied {
            character_id: id,
            condition,
            effect_id,
            duration,
            source,
            save_ends,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }

    /// A client's duration, checked and resolved to a creature: `rounds` (1–1000) or
    /// `minutes` (1–100, ten rounds each), not both.
    pub(crate) fn duration(
        &self,
        d: DurationSpec,
        target: Uuid,
        actor: Option<Uuid>,
    ) -> Result<Duration> {
        let rounds = match (d.rounds, d.minutes) {
            (r, None) if (1..=MAX_DURATION_ROUNDS).contains(&r) => r,
            (0, Some(m)) if (1..=MAX_DURATION_MINUTES).contains(&m) => m * 10,
            _ => {
                return Err(RuleError::new(
                    codes::INVALID_PAYLOAD,
                    format!(
                        "a duration is rounds (1 to {MAX_DURATION_ROUNDS}) or minutes (1 to {MAX_DURATION_MINUTES})"
                    ),
                ))
            }
        };
        let of = d.of.resolve(target, actor);
        self.character(of)?;
        Ok(Duration {
            rounds,
            ends: d.ends,
            of,
            minutes: d.minutes,
        })
    }

    fn decide_remove_condition(
        &self,
        who: &Actor,
        ctx: &Ctx,
        id: Uuid,
        condition: Condition,
    ) -> Result<Vec<Event>> {
        who.require_dm("remove conditions")?;
        let target = self.character(id)?;
        if condition == Condition::Dead {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "the dead come back by gaining hit points (`hp`), not by removing `dead`",
            ));
        }
        if !target.has(condition) {
            return Err(RuleError::new(
                codes::INVALID_TARGET,
                format!("the target is not {}", condition.as_str()),
            ));
        }
        let mut s = Scratch::new(self);
        let effects_ended = s.g.remove_condition(id, condition);
        Ok(vec![Event::ConditionRemoved(ConditionRemoved {
            character_id: id,
            condition,
            effects_ended,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }

    fn decide_end_concentration(&self, who: &Actor, ctx: &Ctx, id: Uuid) -> Result<Vec<Event>> {
        let c = self.character(id)?;
        who.require_control(id)?;
        if c.concentration.is_none() {
            return Err(RuleError::new(
                codes::NOT_CONCENTRATING,
                "that character is not concentrating",
            ));
        }
        let mut s = Scratch::new(self);
        let (conc, effects_ended) = s.g.end_concentration(id).expect("checked above");
        Ok(vec![Event::ConcentrationEnded(ConcentrationEnded {
            character_id: id,
            action_id: conc.action_id,
            reason: "voluntary".into(),
            effects_ended,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }
}

pub(crate) fn check_in_bounds(p: Pos) -> Result<()> {
    if p.in_bounds() {
        return Ok(());
    }
    Err(RuleError::new(
        codes::INVALID_PAYLOAD,
        format!(
            "grid coordinates are within ±{}",
            crate::character::MAX_COORD
        ),
    ))
}

/// A `save_ends` spec resolved: `{ability, dc}` as given, or `true` for `action_save`
/// (the saving throw of the action imposing the condition).
pub(crate) fn save_ends_of(
    spec: SaveEndsSpec,
    action_save: Option<(crate::character::Ability, i32, bool)>,
) -> Result<SaveEnds> {
    match (spec, action_save) {
        (SaveEndsSpec::Save { ability, dc }, _) if (1..=40).contains(&dc) => Ok(SaveEnds {
            ability,
            dc,
            magical: action_save.is_some_and(|a| a.2),
        }),
        (SaveEndsSpec::Same(true), Some((ability, dc, magical))) => Ok(SaveEnds {
            ability,
            dc,
            magical,
        }),
        _ => Err(RuleError::new(
            codes::INVALID_PAYLOAD,
            "save_ends is {ability, dc} (DC 1 to 40), or true in a save action",
        )),
    }
}

pub(crate) fn occupied_error(by: Uuid) -> RuleError {
    RuleError::new(codes::SQUARE_OCCUPIED, "another creature is on that square")
        .with_details(json!({ "occupied_by": by }))
}
