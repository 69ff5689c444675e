//! Movement on the square grid, step by step (SRD 5.1, "Movement and Position"), and
//! opportunity attacks (SRD 5.1, "Combat: Making an Attack: Opportunity Attacks").
//!
//! # A move is a walk
//!
//! * Squares are 5 ft; every step, straight or diagonal, enters a neighbouring square.
//!   A `move` walks `path` (the squares between the creature's square and `to`, each
//!   next to the one before; at most [`MAX_PATH`]) or, without one, the straight line
//!   (the squares nearest the line, one step per square of the longer axis).
//! * In combat a participant moves on its own turn, and every step is checked:
//!   - its cost: 5 ft, +5 ft into difficult terrain ([`crate::terrain`]) or into
//!     another creature's space ("another creature's space is difficult terrain for
//!     you"), +5 ft while crawling prone ("Crawling: every foot of movement costs 1
//!     extra foot"); the extra costs add up. The walk must fit the turn's movement
//!     (speed, plus speed again after Dash; `movement_exceeded`);
//!   - a hostile creature's square cannot be crossed, a friend's can ("You can move
//!     through a nonhostile creature's space"; creature sizes are not modelled, so the
//!     "two sizes larger or smaller" exception is the DM's), and nobody ends a move on
//!     a living creature's square (`square_occupied`);
//!   - a frightened creature never steps closer to the source of its fear
//!     (`movement_blocked`).
//! * Speed 0 (grappled, restrained, paralyzed, petrified, stunned, unconscious,
//!   exhaustion level 5) forbids moving (`movement_exceeded`); exhaustion level 2
//!   halves the speed.
//! * Standing up from prone costs half the speed (`stand_up`).
//! * Outside combat, and for a creature not in the combat, moves have no budget and
//!   only the destination and fear are checked (exploration is the DM's).
//!
//! # Opportunity attacks: the move pauses at the step
//!
//! "You can make an opportunity attack when a hostile creature that you can see moves
//! out of your reach. [...] the attack occurs right before the creature leaves your
//! reach." So before each step the walk asks which hostile participants the step takes
//! it out of reach of: able to react (not incapacitated, not surprised, reaction
//! unspent), not blinded, seeing the mover (not invisible or hidden). Unless the mover
//! took the Disengage action, the walk **stops on the square it is about to leave**:
//! `character_moved` for the steps taken (if any), then `opportunity_attack` naming
//! the reactors, the next square and the squares still to walk; the play state records
//! the pause (`combat.opportunity`).
//!
//! While the pause waits for a reactor, the mover does nothing else (its moves,
//! actions, standing up and the end of its turn are `reaction_pending`; reactions
//! stay open to everyone). Each reactor answers once: with its reaction (an
//! `action_declare` with `details.cost = "reaction"`, normally the melee attack on
//! the mover, who is still within reach), or with `reaction_decline`. When the last
//! one has answered, the rest of the move is walked in the same command, as far as it
//! still can go (the attack may have felled, grappled or knocked the mover prone), and
//! may pause again at the next reach it leaves. A reactor that can no longer react
//! (the DM stunned it) is not waited for; the mover then sends `move` again.
//! Teleporting and being placed by the DM (`place_character`) provoke nothing.

use crate::character::Pos;
use crate::command::Ctx;
use crate::conditions::Condition;
use crate::encounter::Opportunity;
use crate::error::{codes, Result, RuleError};
use crate::event::{CharacterMoved, Event, OpportunityAttack, ReactionDeclined, StoodUp};
use crate::game::{check_in_bounds, occupied_error, Actor, Game, Scratch};
use serde_json::json;
use uuid::Uuid;

/// Most squares in a move's `path`.
pub const MAX_PATH: usize = 200;

/// Feet per square.
const SQUARE: u32 = 5;

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
        Ok(Some(turn.movement_left(self.characters[&id].speed_now())))
    }

    fn check_can_move(&self, id: Uuid) -> Result<()> {
        let c = &self.characters[&id];
        let why = match crate::conditions::movement_stopper(&c.conditions) {
            Some(cond) => Some((cond.as_str(), json!({ "condition": cond }))),
            None if c.exhaustion >= 5 => {
                Some(("exhaustion", json!({ "exhaustion": c.exhaustion })))
            }
            None => None,
        };
        if let Some((what, mut details)) = why {
            details["movement_left"] = json!(0);
            return Err(RuleError::new(
                codes::MOVEMENT_EXCEEDED,
                format!("its speed is 0 ({what})"),
            )
            .with_details(details));
        }
        Ok(())
    }

    pub(crate) fn decide_move(
        &self,
        who: &Actor,
        ctx: &Ctx,
        id: Uuid,
        to: Pos,
        path: &[Pos],
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
        let route = route(from, to, path)?;
        let budget = self.movement_budget(id)?;
        if budget.is_some() {
            self.require_no_pending_reactions(id)?;
        }
        self.check_can_move(id)?;
        let (costs, refused) = self.price(id, from, &route, budget.is_some());
        if let Some(e) = refused {
            return Err(e);
        }
        let cost: u32 = costs.iter().sum();
        if let Some(left) = budget.filter(|left| cost > *left) {
            return Err(RuleError::new(
                codes::MOVEMENT_EXCEEDED,
                "not enough movement left this turn",
            )
            .with_details(json!({ "cost": cost, "movement_left": left })));
        }
        let mut s = Scratch::new(self);
        // A pause whose reactors can no longer react is over; those offered the
        // attack on this square are not offered it again.
        let combat = s.g.combat.as_mut();
        let stale = combat.and_then(|c| c.opportunity.take_if(|o| o.mover == id));
        let skip = stale
            .filter(|o| o.at == from)
            .map(|o| o.offered)
            .unwrap_or_default();
        let mut events = vec![];
        let walk = Walk {
            id,
            route,
            costs,
            budgeted: budget.is_some(),
            skip,
        };
        walk.run(&mut s, ctx, &mut events);
        Ok(events)
    }

    /// The cost of each step of `route` from `from`, checking every step (module
    /// docs); `in_combat` adds the per-step checks of a participant's move. Returns the
    /// costs of the steps that pass, and the error of the first that does not.
    fn price(
        &self,
        id: Uuid,
        from: Pos,
        route: &[Pos],
        in_combat: bool,
    ) -> (Vec<u32>, Option<RuleError>) {
        let mover = &self.characters[&id];
        let fears: Vec<(Option<Uuid>, Pos)> = self
            .effects
            .values()
            .filter(|e| e.target == id && e.condition == Condition::Frightened)
            .filter_map(|e| Some((e.source, self.characters.get(&e.source?)?.position?)))
            .collect();
        let mut costs = Vec::with_capacity(route.len());
        let mut at = from;
        for (i, q) in route.iter().enumerate() {
            let last = i + 1 == route.len();
            let there = self.occupied(*q, id).map(|o| &self.characters[&o]);
            if let Some(other) = there {
                if last {
                    return (costs, Some(occupied_error(other.id)));
                }
                if in_combat && other.side != mover.side {
                    let e = occupied_error(other.id)
                        .with_details(json!({ "occupied_by": other.id, "at": q, "hostile": true }));
                    return (costs, Some(e));
                }
            }
            if let Some((source, _)) = fears
                .iter()
                .find(|(_, src)| q.distance(*src) < at.distance(*src))
            {
                let e = RuleError::new(
                    codes::MOVEMENT_BLOCKED,
                    "a frightened creature cannot move closer to the source of its fear",
                )
                .with_details(json!({ "source": source, "at": q }));
                return (costs, Some(e));
            }
            let cost = if in_combat {
                let difficult = self.terrain_at(*q).difficult || there.is_some();
                let crawling = mover.has(Condition::Prone);
                SQUARE * (1 + u32::from(difficult) + u32::from(crawling))
            } else {
                0
            };
            costs.push(cost);
            at = *q;
        }
        (costs, None)
    }

    /// Hostile participants whose reach the step from `p` to `q` leaves and that can
    /// make an opportunity attack on `mover` (module docs), except those in `skip`.
    fn provoked(&self, mover: Uuid, p: Pos, q: Pos, skip: &[Uuid]) -> Vec<Uuid> {
        let Some(combat) = &self.combat else {
            return vec![];
        };
        let m = &self.characters[&mover];
        if m.has(Condition::Invisible) || m.has(Condition::Hidden) {
            return vec![];
        }
        combat
            .participants
            .iter()
            .filter(|(id, pt)| {
                **id != mover && !pt.reaction_used && !pt.surprised && !skip.contains(id)
            })
            .filter_map(|(id, _)| self.characters.get(id))
            .filter(|h| h.side != m.side && !h.incapacitated() && !h.has(Condition::Blinded))
            .filter(|h| {
                h.position
                    .is_some_and(|at| p.distance(at) <= h.reach && q.distance(at) > h.reach)
            })
            .map(|h| h.id)
            .collect()
    }

    /// The reactors a paused move still waits for: those that have not answered and
    /// can still react.
    pub(crate) fn waiting_reactors(&self) -> Vec<Uuid> {
        let Some(c) = &self.combat else {
            return vec![];
        };
        let Some(o) = &c.opportunity else {
            return vec![];
        };
        o.waiting
            .iter()
            .copied()
            .filter(|id| {
                let p = c.participants.get(id);
                let ch = self.characters.get(id);
                p.is_some_and(|p| !p.reaction_used && !p.surprised)
                    && ch.is_some_and(|c| !c.incapacitated())
            })
            .collect()
    }

    /// `reaction_pending` while a move of `mover` is paused for reactors.
    pub(crate) fn require_no_pending_reactions(&self, mover: Uuid) -> Result<()> {
        let paused = self
            .combat
            .as_ref()
            .and_then(|c| c.opportunity.as_ref())
            .is_some_and(|o| o.mover == mover);
        let waiting = self.waiting_reactors();
        if paused && !waiting.is_empty() {
            return Err(RuleError::new(
                codes::REACTION_PENDING,
                "the move is paused until the creatures it provoked have reacted or declined",
            )
            .with_details(json!({ "character_id": mover, "waiting": waiting })));
        }
        Ok(())
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
        if budget.is_some() {
            self.require_no_pending_reactions(id)?;
        }
        self.check_can_move(id)?;
        let speed = c.speed_now();
        let cost = speed / 2;
        if speed == 0 || budget.is_some_and(|left| cost > left) {
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

    /// `reaction_decline`: a reactor a paused move waits for lets it go; the move goes
    /// on when nobody else is waited for.
    pub(crate) fn decide_reaction_decline(
        &self,
        who: &Actor,
        ctx: &Ctx,
        id: Uuid,
    ) -> Result<Vec<Event>> {
        let (combat, _) = self.require_turn()?;
        self.character(id)?;
        who.require_control(id)?;
        let Some(o) = combat
            .opportunity
            .as_ref()
            .filter(|o| o.waiting.contains(&id))
        else {
            return Err(RuleError::new(
                codes::INVALID_TARGET,
                "that creature is not waiting to make an opportunity attack",
            )
            .with_details(json!({ "character_id": id })));
        };
        let mut s = Scratch::new(self);
        let resume = answer_opportunity(&mut s, id);
        let mut events = vec![Event::ReactionDeclined(ReactionDeclined {
            character_id: id,
            mover: o.mover,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })];
        if let Some(o) = resume {
            resume_move(&mut s, ctx, o, &mut events);
        }
        Ok(events)
    }
}

/// The squares a move enters, in order: `path` then `to`, each next to the one before
/// (`invalid_payload` otherwise), or the straight line to `to`.
fn route(from: Pos, to: Pos, path: &[Pos]) -> Result<Vec<Pos>> {
    if path.is_empty() {
        return Ok(straight(from, to));
    }
    if path.len() > MAX_PATH {
        return Err(RuleError::new(
            codes::INVALID_PAYLOAD,
            format!("a path has at most {MAX_PATH} squares"),
        ));
    }
    let mut squares = path.to_vec();
    squares.push(to);
    let mut at = from;
    for q in &squares {
        check_in_bounds(*q)?;
        if at.distance(*q) != SQUARE {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "each square of a path is next to the one before",
            )
            .with_details(json!({ "from": at, "to": q })));
        }
        at = *q;
    }
    Ok(squares)
}

/// The squares of the straight line from `from` to `to` (excluding `from`): one step
/// along the longer axis each, the other axis rounded to the nearest square.
pub fn straight(from: Pos, to: Pos) -> Vec<Pos> {
    let dx = i64::from(to.x) - i64::from(from.x);
    let dy = i64::from(to.y) - i64::from(from.y);
    let n = dx.abs().max(dy.abs());
    let along = |d: i64, i: i64| -> i32 {
        // d·i/n rounded half away from zero; |d·i/n| ≤ |d| fits an i32 offset.
        let q = (2 * (d * i).abs() + n) / (2 * n);
        (if d < 0 { -q } else { q }) as i32
    };
    (1..=n)
        .map(|i| Pos {
            x: from.x + along(dx, i),
            y: from.y + along(dy, i),
        })
        .collect()
}

/// A walk to carry out on the scratch copy: the squares, their costs, whether it
/// spends a turn's movement, and the reactors not to ask again on the first step.
struct Walk {
    id: Uuid,
    route: Vec<Pos>,
    costs: Vec<u32>,
    budgeted: bool,
    skip: Vec<Uuid>,
}

impl Walk {
    /// Walks until the end or a step that provokes; emits `character_moved` for the
    /// steps taken and `opportunity_attack` if it paused.
    fn run(self, s: &mut Scratch, ctx: &Ctx, events: &mut Vec<Event>) {
        let from = s.g.characters[&self.id].position.expect("on the grid");
        let disengaged =
            s.g.combat
                .as_ref()
                .and_then(|c| c.turn.as_ref())
                .is_some_and(|t| t.disengaged);
        let (mut at, mut walked, mut cost, mut pause) = (from, 0, 0, None);
        for (i, q) in self.route.iter().enumerate() {
            if self.budgeted && !disengaged {
                let skip = if i == 0 { &self.skip[..] } else { &[] };
                let reactors = s.g.provoked(self.id, at, *q, skip);
                if !reactors.is_empty() {
                    pause = Some((i, reactors));
                    break;
                }
            }
            at = *q;
            walked += 1;
            cost += self.costs[i];
        }
        if walked > 0 {
            self.moved(s, ctx, from, walked, cost, events);
        }
        if let Some((i, reactors)) = pause {
            let remaining = self.route[i..].to_vec();
            let combat = s.g.combat.as_mut().expect("a paused walk is in combat");
            combat.opportunity = Some(Opportunity {
                mover: self.id,
                at,
                remaining: remaining.clone(),
                waiting: reactors.clone(),
                offered: reactors.clone(),
            });
            events.push(Event::OpportunityAttack(OpportunityAttack {
                character_id: self.id,
                from: at,
                to: self.route[i],
                reactors,
                destination: self.route.last().copied(),
                remaining,
                by: ctx.user_id,
                patch: s.patch(),
                timestamp: ctx.timestamp.clone(),
            }));
        }
    }

    /// Puts the mover on the last square walked and spends the movement.
    fn moved(
        &self,
        s: &mut Scratch,
        ctx: &Ctx,
        from: Pos,
        walked: usize,
        cost: u32,
        events: &mut Vec<Event>,
    ) {
        let steps = &self.route[..walked];
        let to = steps[walked - 1];
        let speed = s.g.characters[&self.id].speed_now();
        let mut movement_left = None;
        if self.budgeted {
            let turn =
                s.g.combat
                    .as_mut()
                    .and_then(|c| c.turn.as_mut())
                    .expect("a budget means a turn");
            turn.movement_used += cost;
            movement_left = Some(turn.movement_left(speed));
        }
        s.ch(self.id).position = Some(to);
        let between = &steps[..walked - 1];
        let path = if between
            .iter()
            .eq(straight(from, to).iter().take(walked - 1))
        {
            vec![]
        } else {
            between.to_vec()
        };
        events.push(Event::CharacterMoved(CharacterMoved {
            character_id: self.id,
            from,
            to,
            path,
            distance: SQUARE.saturating_mul(walked as u32),
            cost,
            movement_left,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        }));
    }
}

/// A reactor answered a paused move (its reaction, or a decline): it is no longer
/// waited for. When nobody able to react is left, the pause ends and is returned, for
/// [`resume_move`] to walk the rest.
pub(crate) fn answer_opportunity(s: &mut Scratch, reactor: Uuid) -> Option<Opportunity> {
    let combat = s.g.combat.as_mut()?;
    let o = combat.opportunity.as_mut()?;
    if !o.waiting.contains(&reactor) {
        return None;
    }
    o.waiting.retain(|id| *id != reactor);
    if !s.g.waiting_reactors().is_empty() {
        return None;
    }
    s.g.combat.as_mut()?.opportunity.take()
}

/// Walks the rest of a paused move, as far as it still goes: the mover must still be
/// on the square where it paused, on its turn and able to move; the walk stops before
/// the first step that is no longer allowed or affordable, and not on another
/// creature's square.
pub(crate) fn resume_move(s: &mut Scratch, ctx: &Ctx, o: Opportunity, events: &mut Vec<Event>) {
    let id = o.mover;
    if s.g.characters.get(&id).and_then(|c| c.position) != Some(o.at) {
        return;
    }
    let Ok(Some(left)) = s.g.movement_budget(id) else {
        return;
    };
    if s.g.check_can_move(id).is_err() {
        return;
    }
    let (costs, _) = s.g.price(id, o.at, &o.remaining, true);
    let mut n = 0;
    let mut spent = 0;
    for c in &costs {
        if spent + c > left {
            break;
        }
        spent += c;
        n += 1;
    }
    while n > 0 && s.g.occupied(o.remaining[n - 1], id).is_some() {
        n -= 1;
    }
    if n == 0 {
        return;
    }
    let walk = Walk {
        id,
        route: o.remaining[..n].to_vec(),
        costs: costs[..n].to_vec(),
        budgeted: true,
        skip: o.offered,
    };
    walk.run(s, ctx, events);
}
