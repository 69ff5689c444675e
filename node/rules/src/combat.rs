//! Combat: initiative, turn order, rounds, the action economy and turn boundaries.
//!
//! # Flow
//!
//! 1. The DM's `combat_start` lists the participants (`combat_started`). The server
//!    rolls initiative (`initiative_roll`: d20 + Dexterity modifier + the sheet's
//!    `initiative_bonus`) for everyone — except, when `settings.allow_client_rolls`
//!    is true, for player characters, whose controllers send `initiative_roll`
//!    themselves (with a reported d20, or without one to let the server roll).
//! 2. Once everyone has rolled, the order is fixed: higher total first, ties broken by
//!    the higher initiative modifier, then by character id (deterministic). Round 1
//!    begins with the first creature (`turn_change`).
//! 3. On its turn a creature has one action, one bonus action, movement up to its
//!    speed, and its reaction back (a reaction is the only thing usable off-turn).
//!    `end_turn` passes to the next creature; after the last, the round number grows.
//!    Dead creatures' turns are skipped (their turn boundaries still count for
//!    durations).
//! 4. At the start of its turn a dying player character rolls a death save
//!    (`death_save`; with disadvantage from exhaustion level 3).
//! 5. At the end of its turn a creature repeats the saving throw of each "save ends"
//!    effect on it (`repeat_save`); a success ends the effect.
//! 6. `combat_end` (DM) clears the combat and the effects timed in rounds (those timed
//!    in minutes outlast it).
//!
//! `combat_add` (DM) brings more creatures into a running combat; the server rolls
//! their initiative (or, with `settings.allow_client_rolls`, player characters roll
//! their own) and they take their place in the order once rolled.
//!
//! # Surprise (SRD 5.1, "Combat: Surprise")
//!
//! "If you're surprised, you can't move or take an action on your first turn of the
//! combat, and you can't take a reaction until that turn ends." `combat_start` names
//! the surprised participants (the DM decides who noticed whom). A surprised creature
//! loses its first turn: the turn begins (`turn_change` with `surprised: true`, its
//! death save if dying) and ends at once, with its end-of-turn effects; until then it
//! takes no reaction (`surprised`) and makes no opportunity attack.

use crate::command::Ctx;
use crate::conditions::{Boundary, Condition, SaveEnds};
use crate::dice::Mode;
pub use crate::encounter::{
    Combat, HelpGiven, Initiative, Opportunity, Participant, Readied, Turn, MAX_CLIENT_MODIFIER,
    MAX_CLIENT_MODIFIERS, MAX_PARTICIPANTS,
};
use crate::error::{codes, Result, RuleError};
use crate::event::{
    CombatEnded, CombatJoined, CombatStarted, DeathSaveRolled, Event, InitiativeRolled, RepeatSave,
    TurnChanged,
};
use crate::game::{Actor, Game, Scratch};
use crate::saves::{roll_save, SaveContext};
use serde_json::json;
use std::collections::BTreeMap;
use uuid::Uuid;

fn combat_not_active() -> RuleError {
    RuleError::new(codes::COMBAT_NOT_ACTIVE, "no combat is running")
}

impl Game {
    pub(crate) fn require_combat(&self) -> Result<&Combat> {
        self.combat.as_ref().ok_or_else(combat_not_active)
    }

    /// The running turn, or `initiative_pending` while initiative is being rolled.
    pub(crate) fn require_turn(&self) -> Result<(&Combat, &Turn)> {
        let c = self.require_combat()?;
        let t = c.turn.as_ref().ok_or_else(|| {
            RuleError::new(
                codes::INITIATIVE_PENDING,
                "not every participant has rolled initiative yet",
            )
            .with_details(json!({
                "waiting_for": c.participants.iter()
                    .filter(|(_, p)| p.initiative.is_none())
                    .map(|(id, _)| *id).collect::<Vec<_>>()
            }))
        })?;
        Ok((c, t))
    }

    /// Checks a list of new participants: some, distinct, in play, alive.
    fn check_participants(&self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() || ids.len() > MAX_PARTICIPANTS {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("1 to {MAX_PARTICIPANTS} participants"),
            ));
        }
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(RuleError::new(
                    codes::INVALID_PAYLOAD,
                    "a participant is listed twice",
                ));
            }
            if self.character(*id)?.is_dead() {
                return Err(
                    RuleError::new(codes::INVALID_TARGET, "the dead do not fight")
                        .with_details(json!({ "character_id": id })),
                );
            }
        }
        Ok(())
    }

    /// Whether the server rolls `id`'s initiative: always, except for player
    /// characters when `settings.allow_client_rolls` is on (they roll their own).
    fn server_rolls(&self, id: Uuid) -> bool {
        !self.allow_client_rolls || !self.characters[&id].player_character
    }

    pub(crate) fn decide_combat_start(
        &self,
        who: &Actor,
        ctx: &Ctx,
        participants: &[Uuid],
        surprised: &[Uuid],
    ) -> Result<Vec<Event>> {
        who.require_dm("start combat")?;
        if let Some(c) = &self.combat {
            return Err(RuleError::new(
                codes::COMBAT_ALREADY_ACTIVE,
                "a combat is already running",
            )
            .with_details(json!({ "combat_id": c.id })));
        }
        self.check_participants(participants)?;
        if surprised
            .iter()
            .enumerate()
            .any(|(i, id)| !participants.contains(id) || surprised[..i].contains(id))
        {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "`surprised` lists participants, each once",
            ));
        }
        let mut s = Scratch::new(self);
        s.g.combat = Some(Combat {
            id: ctx.command_id,
            round: 0,
            turn_number: 0,
            participants: participants
                .iter()
                .map(|id| {
                    let p = Participant {
                        surprised: surprised.contains(id),
                        ..Default::default()
                    };
                    (*id, p)
                })
                .collect(),
            order: vec![],
            turn: None,
            opportunity: None,
        });
        let mut events = vec![Event::CombatStarted(CombatStarted {
            combat_id: ctx.command_id,
            participants: participants.to_vec(),
            surprised: surprised.to_vec(),
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })];
        for id in participants {
            if self.server_rolls(*id) {
                events.push(roll_initiative(&mut s, ctx, *id, None, &BTreeMap::new()));
            }
        }
        begin_if_ready(&mut s, ctx, &mut events);
        Ok(events)
    }

    pub(crate) fn decide_combat_add(
        &self,
        who: &Actor,
        ctx: &Ctx,
        participants: &[Uuid],
    ) -> Result<Vec<Event>> {
        who.require_dm("add combatants")?;
        let c = self.require_combat()?;
        self.check_participants(participants)?;
        if c.participants.len() + participants.len() > MAX_PARTICIPANTS {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("at most {MAX_PARTICIPANTS} participants"),
            ));
        }
        if let Some(id) = participants
            .iter()
            .find(|id| c.participants.contains_key(id))
        {
            return Err(
                RuleError::new(codes::INVALID_TARGET, "already in the combat")
                    .with_details(json!({ "character_id": id })),
            );
        }
        let mut s = Scratch::new(self);
        let combat = s.g.combat.as_mut().expect("checked above");
        for id in participants {
            combat.participants.insert(*id, Participant::default());
        }
        let mut events = vec![Event::CombatJoined(CombatJoined {
            combat_id: c.id,
            participants: participants.to_vec(),
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })];
        for id in participants {
            if self.server_rolls(*id) {
                events.push(roll_initiative(&mut s, ctx, *id, None, &BTreeMap::new()));
            }
        }
        begin_if_ready(&mut s, ctx, &mut events);
        Ok(events)
    }

    pub(crate) fn decide_initiative(
        &self,
        who: &Actor,
        ctx: &Ctx,
        id: Uuid,
        reported: Option<u32>,
        modifiers: &BTreeMap<String, i32>,
    ) -> Result<Vec<Event>> {
        let c = self.require_combat()?;
        self.character(id)?;
        let p = c
            .participants
            .get(&id)
            .ok_or_else(|| not_a_participant(id))?;
        who.require_control(id)?;
        if p.initiative.is_some() {
            return Err(RuleError::new(
                codes::ALREADY_ROLLED,
                "initiative is already rolled for that character",
            ));
        }
        if (reported.is_some() || !modifiers.is_empty()) && !self.allow_client_rolls {
            return Err(RuleError::new(
                codes::CLIENT_ROLLS_DISABLED,
                "this session rolls dice on the server (settings.allow_client_rolls is off)",
            ));
        }
        if let Some(r) = reported {
            if !(1..=20).contains(&r) {
                return Err(RuleError::new(codes::INVALID_DICE, "a d20 shows 1 to 20"));
            }
        }
        if modifiers.len() > MAX_CLIENT_MODIFIERS
            || modifiers.iter().any(|(k, v)| {
                k.is_empty()
                    || k.len() > 30
                    || v.unsigned_abs() > MAX_CLIENT_MODIFIER as u32
                    || k == "dex"
            })
        {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                format!(
                    "at most {MAX_CLIENT_MODIFIERS} named modifiers within ±{MAX_CLIENT_MODIFIER} (`dex` is added by the server)"
                ),
            ));
        }
        let mut s = Scratch::new(self);
        let mut events = vec![roll_initiative(&mut s, ctx, id, reported, modifiers)];
        begin_if_ready(&mut s, ctx, &mut events);
        Ok(events)
    }

    pub(crate) fn decide_end_turn(&self, who: &Actor, ctx: &Ctx) -> Result<Vec<Event>> {
        let (_, turn) = self.require_turn()?;
        if who.require_control(turn.character_id).is_err() {
            return Err(RuleError::new(
                codes::NOT_YOUR_TURN,
                "only the active character's controller or the DM ends the turn",
            )
            .with_details(json!({ "active_character": turn.character_id })));
        }
        self.require_no_pending_reactions(turn.character_id)?;
        let mut s = Scratch::new(self);
        let mut events = vec![];
        advance(&mut s, ctx, &mut events);
        Ok(events)
    }

    /// Ends the combat and the effects timed in rounds; effects timed in minutes, and
    /// effects without a duration (a grapple, a save-ends condition), stay.
    pub(crate) fn decide_combat_end(&self, who: &Actor, ctx: &Ctx) -> Result<Vec<Event>> {
        who.require_dm("end combat")?;
        let c = self.require_combat()?;
        let mut s = Scratch::new(self);
        let timed: Vec<u64> =
            s.g.effects
                .values()
                .filter(|e| e.duration.is_some_and(|d| d.minutes.is_none()))
                .map(|e| e.id)
                .collect();
        for id in &timed {
            s.g.end_effect(*id);
        }
        s.g.combat = None;
        Ok(vec![Event::CombatEnded(CombatEnded {
            combat_id: c.id,
            rounds: c.round,
            effects_ended: timed,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }
}

pub(crate) fn not_a_participant(id: Uuid) -> RuleError {
    RuleError::new(
        codes::NOT_A_PARTICIPANT,
        "that character is not in the combat",
    )
    .with_details(json!({ "character_id": id }))
}

/// Rolls (or records a reported) initiative for `id`; returns its event.
fn roll_initiative(
    s: &mut Scratch,
    ctx: &Ctx,
    id: Uuid,
    reported: Option<u32>,
    extra: &BTreeMap<String, i32>,
) -> Event {
    let c = &s.g.characters[&id];
    let mut modifiers = BTreeMap::from([("dex".to_string(), c.abilities.dex)]);
    if c.initiative_bonus != 0 {
        modifiers.insert("bonus".into(), c.initiative_bonus);
    }
    modifiers.extend(extra.iter().map(|(k, v)| (k.clone(), *v)));
    let modifier: i32 = modifiers.values().sum();
    let d20 = match reported {
        Some(face) => s.dice.reported_d20("initiative", Some(id), face, modifier),
        None => s.dice.d20("initiative", Some(id), Mode::Normal, modifier),
    };
    let combat = s.g.combat.as_mut().expect("rolling inside a combat");
    combat
        .participants
        .get_mut(&id)
        .expect("a participant")
        .initiative = Some(Initiative {
        total: d20.total,
        d20: d20.kept,
        modifier,
    });
    let combat_id = combat.id;
    if !combat.order.is_empty() {
        // Joining a running combat: take its place; the active creature keeps its turn.
        combat.order = combat.rolled_order();
        combat.turn_number = combat.active_index().map_or(0, |i| i as u32 + 1);
    }
    Event::InitiativeRoll(InitiativeRolled {
        combat_id,
        character_id: id,
        roll: d20.total,
        modifiers,
        d20: d20.kept,
        rolls: s.rolls(),
        by: ctx.user_id,
        patch: s.patch(),
        timestamp: ctx.timestamp.clone(),
    })
}

/// Fixes the order and starts round 1 once everyone has rolled.
fn begin_if_ready(s: &mut Scratch, ctx: &Ctx, events: &mut Vec<Event>) {
    let combat = s.g.combat.as_mut().expect("inside a combat");
    if !combat.order.is_empty() || !combat.everyone_rolled() {
        return;
    }
    combat.order = combat.sorted();
    combat.round = 1;
    // Start "before" the first creature so that advancing lands on the first living one.
    let first = combat.order[0];
    let mut ended = vec![];
    let next = if s.g.characters[&first].is_dead() {
        combat.turn = Some(Turn::new(first));
        combat.turn_number = 1;
        next_living(s, &mut ended)
    } else {
        first
    };
    start_turn(s, ctx, None, next, ended, events);
    skip_surprised(s, ctx, events);
}

/// Ends the active creature's turn and starts the next one's (then skips the turns
/// surprised creatures lose).
fn advance(s: &mut Scratch, ctx: &Ctx, events: &mut Vec<Event>) {
    end_and_start(s, ctx, events);
    skip_surprised(s, ctx, events);
}

/// A surprised creature loses its first turn: it ends as soon as it began.
fn skip_surprised(s: &mut Scratch, ctx: &Ctx, events: &mut Vec<Event>) {
    while let Some(c) = &s.g.combat {
        let active = c.turn.as_ref().expect("a turn").character_id;
        if !c.surprised(active) {
            return;
        }
        end_and_start(s, ctx, events);
    }
}

fn end_and_start(s: &mut Scratch, ctx: &Ctx, events: &mut Vec<Event>) {
    let current =
        s.g.combat
            .as_ref()
            .and_then(|c| c.turn.as_ref())
            .expect("a turn")
            .character_id;
    repeat_saves(s, ctx, current, events);
    let mut ended = boundary(s, Boundary::End, current);
    let combat = s.g.combat.as_mut().expect("inside a combat");
    combat.opportunity = None;
    if let Some(p) = combat.participants.get_mut(&current) {
        // "...and you can't take a reaction until that turn ends."
        p.surprised = false;
    }
    let next = next_living(s, &mut ended);
    start_turn(s, ctx, Some(current), next, ended, events);
}

/// Moves past the active creature to the next living one (or simply the next one if
/// all are dead), counting rounds and the skipped creatures' turn boundaries.
fn next_living(s: &mut Scratch, ended: &mut Vec<u64>) -> Uuid {
    let combat = s.g.combat.as_ref().expect("inside a combat");
    let order = combat.order.clone();
    let mut idx = combat.active_index().unwrap_or(0);
    let dead = |g: &Game, id: &Uuid| g.characters.get(id).is_none_or(|c| c.is_dead());
    let all_dead = order.iter().all(|id| dead(&s.g, id));
    loop {
        idx = (idx + 1) % order.len();
        if idx == 0 {
            s.g.combat.as_mut().expect("inside a combat").round += 1;
        }
        let next = order[idx];
        if all_dead || !dead(&s.g, &next) {
            return next;
        }
        // A dead creature's turn passes at once, but it still happened.
        ended.extend(boundary(s, Boundary::Start, next));
        ended.extend(boundary(s, Boundary::End, next));
    }
}

/// Starts `next`'s turn: fresh action economy, its reaction back, what it readied or
/// the help it gave lapses, effects ending at the start of its turn expire; then its
/// death save if it is dying (SRD 5.1, "Death Saving Throws"; disadvantage from
/// exhaustion level 3, which covers every saving throw).
fn start_turn(
    s: &mut Scratch,
    ctx: &Ctx,
    previous: Option<Uuid>,
    next: Uuid,
    mut ended: Vec<u64>,
    events: &mut Vec<Event>,
) {
    let combat = s.g.combat.as_mut().expect("inside a combat");
    combat.turn = Some(Turn::new(next));
    combat.turn_number = combat.active_index().map_or(0, |i| i as u32 + 1);
    let mut surprised = false;
    let mut readied_spell = None;
    if let Some(p) = combat.participants.get_mut(&next) {
        p.reaction_used = false;
        p.help = None;
        readied_spell = p.readied.take().filter(|r| r.spell).map(|r| r.action_id);
        surprised = p.surprised;
    }
    let (combat_id, round, turn_number) = (combat.id, combat.round, combat.turn_number);
    if let Some(held) = readied_spell {
        // An unreleased readied spell is lost, and with it the concentration.
        let holding = s.g.characters[&next].concentration.as_ref();
        if holding.is_some_and(|c| c.action_id == held) {
            s.g.end_concentration(next);
        }
    }
    ended.extend(boundary(s, Boundary::Start, next));
    events.push(Event::TurnChange(TurnChanged {
        combat_id,
        active_character: next,
        round,
        turn_number,
        previous_character: previous,
        effects_ended: ended,
        surprised,
        by: ctx.user_id,
        patch: s.patch(),
        timestamp: ctx.timestamp.clone(),
    }));
    if s.g.characters[&next].dying() {
        death_save(s, ctx, next, events);
    }
}

fn death_save(s: &mut Scratch, ctx: &Ctx, who: Uuid, events: &mut Vec<Event>) {
    let mode = if s.g.characters[&who].exhaustion >= 3 {
        Mode::Disadvantage
    } else {
        Mode::Normal
    };
    let d20 = s.dice.d20("death_save", Some(who), mode, 0);
    let c = s.ch(who);
    let (result, outcome) = c.death_save(d20.kept);
    let (successes, failures) = (c.death_saves.successes, c.death_saves.failures);
    events.push(Event::DeathSave(DeathSaveRolled {
        character_id: who,
        roll: d20.kept,
        result: result.into(),
        successes,
        failures,
        outcome: outcome.into(),
        rolls: s.rolls(),
        by: ctx.user_id,
        patch: s.patch(),
        timestamp: ctx.timestamp.clone(),
    }));
}

/// At the end of `who`'s turn, one repeat save per "save ends" group on it: the
/// effects of one action (or one DM command) with the same save share it, and a
/// success ends them all. The dead make no saves.
fn repeat_saves(s: &mut Scratch, ctx: &Ctx, who: Uuid, events: &mut Vec<Event>) {
    if s.g.characters.get(&who).is_none_or(|c| c.is_dead()) {
        return;
    }
    type Group = (Option<Uuid>, u64, SaveEnds);
    let mut groups: Vec<(Group, Vec<u64>, Vec<Condition>)> = vec![];
    for e in s.g.effects.values().filter(|e| e.target == who) {
        let Some(save) = e.save_ends else { continue };
        // Effects of one action group by its id; others stand alone.
        let key: Group = (
            e.action_id,
            if e.action_id.is_some() { 0 } else { e.id },
            save,
        );
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => {
                g.1.push(e.id);
                g.2.push(e.condition);
            }
            None => groups.push((key, vec![e.id], vec![e.condition])),
        }
    }
    for ((_, _, save), effect_ids, conditions) in groups {
        let saver = s.g.characters[&who].clone();
        let ctx_save = SaveContext {
            magical: save.magical,
            ..Default::default()
        };
        let roll = roll_save(&mut s.dice, "save", &saver, save.ability, save.dc, ctx_save);
        if roll.success {
            for id in &effect_ids {
                s.g.end_effect(*id);
            }
        }
        events.push(Event::RepeatSave(RepeatSave {
            character_id: who,
            effect_ids,
            conditions,
            ended: roll.success,
            save: roll,
            rolls: s.rolls(),
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        }));
    }
}

/// A turn boundary of `who`: timed effects counting it tick down; those at 0 end.
fn boundary(s: &mut Scratch, kind: Boundary, who: Uuid) -> Vec<u64> {
    let mut ended = vec![];
    for e in s.g.effects.values_mut() {
        if let Some(d) = &mut e.duration {
            if d.ends == kind && d.of == who {
                d.rounds = d.rounds.saturating_sub(1);
                if d.rounds == 0 {
                    ended.push(e.id);
                }
            }
        }
    }
    for id in &ended {
        s.g.end_effect(*id);
    }
    ended
}
