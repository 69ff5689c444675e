//! Movement on the square grid (SRD 5.1, "Movement and Position").
//!
//! * Squares are 5 ft; distance is max(|dx|, |dy|) × 5 (every diagonal step is 5 ft).
//! * A `move` goes straight from the current square to `to` (clients send one move
//!   per leg of a path). In combat it needs the mover's turn and costs its distance
//!   from the turn's movement (speed, plus speed again after Dash); crawling while
//!   prone costs double. `movement_exceeded` when it does not fit.
//! * Speed 0 conditions (grappled, restrained, paralyzed, petrified, stunned,
//!   unconscious) forbid moving (`movement_exceeded`, with the condition).
//! * A frightened creature cannot move closer to the source of its fear
//!   (`movement_blocked`).
//! * Nobody ends a move on a square a living creature occupies (`square_occupied`).
//! * Standing up from prone costs half the speed (`stand_up`).
//! * Leaving a hostile creature's reach provokes an opportunity attack unless the mover
//!   took the Disengage action: the move emits `opportunity_attack` naming every
//!   hostile participant that can react (not incapacitated, reaction unspent). The
//!   attack itself is declared by its controller (`action_declare` with
//!   `details.cost = "reaction"`); nothing is automated.
//! * Outside combat (or for a creature not in the combat) moves have no budget.

use crate::character::Pos;
use crate::command::Ctx;
use crate::conditions::{movement_stopper, Condition};
use crate::error::{codes, Result, RuleError};
use crate::event::{CharacterMoved, Event, OpportunityAttack, StoodUp};
use crate::game::{check_in_bounds, occupied_error, Actor, Game, Scratch};
use serde_json::json;
use uuid::Uuid;

impl Game {
    /// The mover's turn budget if it is a combat participant: `Ok(None)` outside
    /// combat, `not_your_turn` if it is someone else's turn.
    fn movement_budget(&self, id: Uuid) -> Result<Option<u32>> {
        let Some(c) = &self.combat else {
            return Ok(None);
        };
        if !c.participants.contains_key(&id) {
            return Ok(None);
        }
        let (_, turn) = self.require_turn()?;
        if turn.character_id != id {
            return Err(
                RuleError::new(codes::NOT_YOUR_TURN, "a creature moves on its own turn")
                    .with_details(json!({ "active_character": turn.character_id })),
            );
        }
        Ok(Some(turn.movement_left(self.characters[&id].speed)))
    }

    fn check_can_move(&self, id: Uuid) -> Result<()> {
        let c = &self.characters[&id];
        if let Some(cond) = movement_stopper(&c.conditions) {
            return Err(RuleError::new(
                codes::MOVEMENT_EXCEEDED,
                format!("its speed is 0 ({})", cond.as_str()),
            )
            .with_details(json!({ "condition": cond, "movement_left": 0 })));
        }
        Ok(())
    }

    pub(crate) fn decide_move(
        &self,
        who: &Actor,
        ctx: &Ctx,
        id: Uuid,
        to: Pos,
    ) -> Result<Vec<Event>> {
        let c = self.character(id)?;
        who.require_control(id)?;
        check_in_bounds(to)?;
        let from = c.position.ok_or_else(|| {
            RuleError::new(
                codes::NOT_ON_MAP,
                "the character is not on the grid (the DM places it first)",
            )
        })?;
        if from == to {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "already on that square",
            ));
        }
        let budget = self.movement_budget(id)?;
        self.check_can_move(id)?;
        if let Some(other) = self.occupied(to, id) {
            return Err(occupied_error(other));
        }
        for e in self.effects.values() {
            if e.target != id || e.condition != Condition::Frightened {
                continue;
            }
            let Some(src) = e.source.and_then(|s| self.characters.get(&s)?.position) else {
                continue;
            };
            if to.distance(src) < from.distance(src) {
                return Err(RuleError::new(
                    codes::MOVEMENT_BLOCKED,
                    "a frightened creature cannot move closer to the source of its fear",
                )
                .with_details(json!({ "source": e.source })));
            }
        }
        let distance = from.distance(to);
        let cost = if c.has(Condition::Prone) {
            distance * 2
        } else {
            distance
        };
        if let Some(left) = budget {
            if cost > left {
                return Err(RuleError::new(
                    codes::MOVEMENT_EXCEEDED,
                    "not enough movement left this turn",
                )
                .with_details(json!({ "cost": cost, "movement_left": left })));
            }
        }
        let mut s = Scratch::new(self);
        let mut reactors = vec![];
        let mut movement_left = None;
        if let Some(left) = budget {
            let combat = s.g.combat.as_mut().expect("a budget means a combat");
            let turn = combat.turn.as_mut().expect("a budget means a turn");
            turn.movement_used += cost;
            movement_left = Some(left - cost);
            if !turn.disengaged {
                reactors = self.provoked(id, from, to);
            }
        }
        s.ch(id).position = Some(to);
        let mut events = vec![Event::CharacterMoved(CharacterMoved {
            character_id: id,
            from,
            to,
            distance,
            cost,
            movement_left,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })];
        if !reactors.is_empty() {
            events.push(Event::OpportunityAttack(OpportunityAttack {
                character_id: id,
                from,
                to,
                reactors,
                by: ctx.user_id,
                patch: s.patch(),
                timestamp: ctx.timestamp.clone(),
            }));
        }
        Ok(events)
    }

    /// Hostile participants whose reach the mover leaves and that can react.
    fn provoked(&self, mover: Uuid, from: Pos, to: Pos) -> Vec<Uuid> {
        let Some(combat) = &self.combat else {
            return vec![];
        };
        let side = &self.characters[&mover].side;
        combat
            .participants
            .iter()
            .filter(|(id, p)| **id != mover && !p.reaction_used)
            .filter_map(|(id, _)| self.characters.get(id))
            .filter(|h| &h.side != side && !h.incapacitated())
            .filter(|h| {
                h.position
                    .is_some_and(|p| from.distance(p) <= h.reach && to.distance(p) > h.reach)
            })
            .map(|h| h.id)
            .collect()
    }

    pub(crate) fn decide_stand_up(&self, who: &Actor, ctx: &Ctx, id: Uuid) -> Result<Vec<Event>> {
        let c = self.character(id)?;
        who.require_control(id)?;
        if !c.has(Condition::Prone) {
            return Err(RuleError::new(
                codes::INVALID_TARGET,
                "the character is not prone",
            ));
        }
        let budget = self.movement_budget(id)?;
        self.check_can_move(id)?;
        let cost = c.speed / 2;
        if c.speed == 0 || budget.is_some_and(|left| cost > left) {
            return Err(RuleError::new(
                codes::MOVEMENT_EXCEEDED,
                "standing up costs half the speed",
            )
            .with_details(json!({ "cost": cost, "movement_left": budget })));
        }
        let mut s = Scratch::new(self);
        if budget.is_some() {
            let combat = s.g.combat.as_mut().expect("a budget means a combat");
            combat
                .turn
                .as_mut()
                .expect("a budget means a turn")
                .movement_used += cost;
        }
        s.g.remove_condition(id, Condition::Prone);
        Ok(vec![Event::StoodUp(StoodUp {
            character_id: id,
            cost,
            movement_left: budget.map(|left| left - cost),
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }
}
