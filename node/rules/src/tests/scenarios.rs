//! Rules scenarios, one per rule of issue 15, each written from the SRD 5.1 text it
//! quotes: a setup on the test table (Aria at (0,0), Brom (0,2), Cyl (0,4), goblins
//! at (6,0) and (7,0)), the commands, and the events expected. `docs/rules.md` maps
//! every rule to its scenario. The `table_*` scenarios are the deviations the issue
//! reported, replayed as a table would play them.

use super::harness::*;
use crate::character::{CharacterChanges, DamageType, Pos, SaveTag};
use crate::command::{ActionType, Command, Ctx, DurationSpec, SaveEndsSpec, TurnOf};
use crate::conditions::{Boundary, Condition};
use crate::dice::Mode;
use crate::error::codes;
use crate::event::{CharacterMoved, Event, OpportunityAttack, RepeatSave, TurnChanged};
use crate::terrain::{Cover, TerrainSquare};
use serde_json::json;
use std::collections::BTreeSet;
use uuid::Uuid;

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind()).collect()
}

fn mv(c: Uuid, x: i32, y: i32) -> Command {
    Command::Move {
        character_id: c,
        to: Pos { x, y },
        path: vec![],
    }
}

fn mv_path(c: Uuid, path: &[(i32, i32)], (x, y): (i32, i32)) -> Command {
    Command::Move {
        character_id: c,
        to: Pos { x, y },
        path: path.iter().map(|(x, y)| Pos { x: *x, y: *y }).collect(),
    }
}

fn pos(x: i32, y: i32) -> Pos {
    Pos { x, y }
}

fn impose(c: Uuid, condition: Condition) -> Command {
    Command::ApplyCondition {
        character_id: c,
        condition,
        duration: None,
        source: None,
        save_ends: None,
    }
}

fn update(c: Uuid, changes: serde_json::Value) -> Command {
    Command::CharacterUpdate {
        character_id: c,
        changes: serde_json::from_value(changes).unwrap(),
    }
}

fn moved(events: &[Event]) -> Vec<CharacterMoved> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CharacterMoved(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn provoked(events: &[Event]) -> Option<OpportunityAttack> {
    events.iter().find_map(|e| match e {
        Event::OpportunityAttack(o) => Some(o.clone()),
        _ => None,
    })
}

fn turns(events: &[Event]) -> Vec<TurnChanged> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::TurnChange(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn repeat_saves(events: &[Event]) -> Vec<RepeatSave> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::RepeatSave(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// A scimitar for a goblin's reaction.
fn scimitar_reaction() -> serde_json::Value {
    json!({"name": "scimitar", "cost": "reaction", "attack_bonus": 4, "damage": "1d6+2",
           "damage_type": "slashing"})
}

/// The table in combat on `active`'s turn, goblins made sturdy (no one dies by chance).
fn fight(active: fn(&Table) -> Uuid) -> Table {
    let mut t = Table::new();
    for g in t.goblins {
        t.ch_mut(g).max_hp = 100;
        t.ch_mut(g).hp = 100;
    }
    let all = t.all();
    let who = active(&t);
    t.combat(&all, who);
    t
}

fn aria(t: &Table) -> Uuid {
    t.pcs[0]
}

fn cyl(t: &Table) -> Uuid {
    t.pcs[2]
}

fn left(t: &Table) -> u32 {
    let c = t.s.game.combat.as_ref().unwrap();
    let turn = c.turn.as_ref().unwrap();
    turn.movement_left(t.ch(turn.character_id).speed_now())
}

// ---- Issue 15, point 1: opportunity attacks can be made ----

/// "You can make an opportunity attack when a hostile creature that you can see moves
/// out of your reach. [...] the attack occurs right before the creature leaves your
/// reach." Aria at (0,0) steps to (-1,0), away from goblin 0 at (1,0): the move pauses
/// on (0,0), the goblin's attack is in reach, then Aria goes on.
#[test]
fn table_1_opportunity_attack_is_made_before_the_mover_leaves() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    let e = t.ok(t.players[0], mv(a, -1, 0));
    assert_eq!(kinds(&e), ["opportunity_attack"]);
    let o = provoked(&e).unwrap();
    assert_eq!(
        (o.from, o.to, o.reactors.clone()),
        (pos(0, 0), pos(-1, 0), vec![g])
    );
    assert_eq!(
        (o.destination, o.remaining),
        (Some(pos(-1, 0)), vec![pos(-1, 0)])
    );
    assert_eq!(t.ch(a).position, Some(pos(0, 0)));
    // The mover waits: no move, action or end of turn until the goblin has answered.
    assert_eq!(t.err(t.players[0], mv(a, 0, -1)), codes::REACTION_PENDING);
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[g], sword()),
        codes::REACTION_PENDING
    );
    assert_eq!(t.err(t.dm, Command::EndTurn {}), codes::REACTION_PENDING);
    // The goblin's reaction: a melee attack at 5 ft, then the rest of the move.
    let e = t
        .act(g, ActionType::Attack, &[a], scimitar_reaction())
        .unwrap();
    assert_eq!(
        kinds(&e),
        ["action_declare", "action_resolve", "character_moved"]
    );
    assert_eq!(
        outcome(&resolved(&e), a).attack.as_ref().unwrap().distance,
        Some(5)
    );
    let m = &moved(&e)[0];
    assert_eq!(
        (m.from, m.to, m.cost, m.movement_left),
        (pos(0, 0), pos(-1, 0), 5, Some(25))
    );
    assert!(t.s.game.combat.as_ref().unwrap().opportunity.is_none());
    t.ok(t.players[0], Command::EndTurn {});
}

// ---- Issue 15, point 2: movement is checked step by step ----

/// Goblin 0 at (2,1); Aria moves straight from (0,0) to (4,0). She enters its reach at
/// (1,0), stays in it to (3,0), and leaves it stepping to (4,0): the move pauses on
/// (3,0).
#[test]
fn table_2_leaving_reach_in_the_middle_of_a_move_provokes() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 2, 1);
    let e = t.ok(t.players[0], mv(a, 4, 0));
    assert_eq!(kinds(&e), ["character_moved", "opportunity_attack"]);
    let m = &moved(&e)[0];
    assert_eq!(
        (m.from, m.to, m.distance, m.cost),
        (pos(0, 0), pos(3, 0), 15, 15)
    );
    let o = provoked(&e).unwrap();
    assert_eq!((o.from, o.to, o.reactors), (pos(3, 0), pos(4, 0), vec![g]));
    // The DM lets it pass: the move goes on to (4,0).
    let e = t.ok(t.dm, Command::ReactionDecline { character_id: g });
    assert_eq!(kinds(&e), ["reaction_declined", "character_moved"]);
    let m = &moved(&e)[0];
    assert_eq!(
        (m.from, m.to, m.movement_left),
        (pos(3, 0), pos(4, 0), Some(10))
    );
    // The goblin still has its reaction.
    assert!(!t.s.game.combat.as_ref().unwrap().participants[&g].reaction_used);
}

/// "You can move through a nonhostile creature's space. In contrast, you can move
/// through a hostile creature's space only if the creature is at least two sizes
/// larger or smaller than you." (sizes are not modelled: never). "Whether a creature
/// is a friend or an enemy, you can't willingly end your move in its space."
#[test]
fn table_2_a_hostile_square_cannot_be_crossed() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 2, 0);
    let before = t.s.clone();
    let err = t.run(t.players[0], mv(a, 4, 0)).unwrap_err();
    assert_eq!(err.code, codes::SQUARE_OCCUPIED);
    assert_eq!(err.details["at"], json!({"x": 2, "y": 0}));
    assert_eq!(t.s, before);
    // Around it is fine (and leaving its reach on the way provokes).
    let e = t.ok(t.players[0], mv_path(a, &[(1, 0), (2, 1), (3, 0)], (4, 0)));
    let m = &moved(&e)[0];
    assert_eq!(m.to, pos(3, 0));
    assert_eq!(m.path, vec![pos(1, 0), pos(2, 1)]);
    assert_eq!(provoked(&e).unwrap().to, pos(4, 0));
}

/// "Remember that another creature's space is difficult terrain for you." Aria walks
/// through Brom's square: 5 + 10 + 5 + 5 ft.
#[test]
fn an_allys_space_can_be_crossed_as_difficult_terrain() {
    let mut t = fight(aria);
    let (a, b) = (t.pcs[0], t.pcs[1]);
    t.place(b, 2, 0);
    let e = t.ok(t.players[0], mv(a, 4, 0));
    let m = &moved(&e)[0];
    assert_eq!((m.distance, m.cost, m.movement_left), (20, 25, Some(5)));
    // But not end there.
    t.place(a, 0, 0);
    assert_eq!(t.err(t.players[0], mv(a, 2, 0)), codes::SQUARE_OCCUPIED);
}

/// Every creature whose reach the mover leaves on a step gets the chance; the move goes
/// on once each has answered (here one declines and one attacks).
#[test]
fn every_reactor_answers_before_the_move_goes_on() {
    let mut t = fight(aria);
    let (a, g0, g1) = (t.pcs[0], t.goblins[0], t.goblins[1]);
    t.place(g0, 1, 0);
    t.place(g1, -1, 0);
    let e = t.ok(t.players[0], mv(a, 0, -2));
    assert_eq!(kinds(&e), ["character_moved", "opportunity_attack"]);
    let o = provoked(&e).unwrap();
    assert_eq!((o.from, o.reactors), (pos(0, -1), vec![g0, g1]));
    let e = t.ok(t.dm, Command::ReactionDecline { character_id: g0 });
    assert_eq!(kinds(&e), ["reaction_declined"]);
    assert_eq!(
        t.err(t.dm, Command::ReactionDecline { character_id: g0 }),
        codes::INVALID_TARGET
    );
    let e = t
        .act(g1, ActionType::Attack, &[a], scimitar_reaction())
        .unwrap();
    assert_eq!(
        kinds(&e),
        ["action_declare", "action_resolve", "character_moved"]
    );
    assert_eq!(t.ch(a).position, Some(pos(0, -2)));
}

/// A reactor that can no longer react is not waited for; nor does a move provoke
/// creatures that cannot see the mover ("a hostile creature that you can see").
#[test]
fn only_creatures_able_to_react_are_offered_or_waited_for() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    t.ok(t.players[0], mv(a, -1, 0));
    t.ok(t.dm, impose(g, Condition::Stunned));
    // Nobody is waited for: Aria moves again, and the stunned goblin is not asked.
    let e = t.ok(t.players[0], mv(a, -1, 0));
    assert_eq!(kinds(&e), ["character_moved"]);
    for (setup, who) in [
        (Condition::Blinded, "goblin"),
        (Condition::Invisible, "aria"),
    ] {
        let mut t = fight(aria);
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.place(g, 1, 0);
        t.ok(t.dm, impose(if who == "aria" { a } else { g }, setup));
        let e = t.ok(t.players[0], mv(a, -1, 0));
        assert_eq!(kinds(&e), ["character_moved"], "{setup:?}");
    }
}

/// "You also don't provoke an opportunity attack when you teleport or when someone or
/// something moves you without using your movement"; and Disengage: "your movement
/// doesn't provoke opportunity attacks for the rest of the turn".
#[test]
fn placing_and_disengaging_provoke_nothing() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    t.place(a, -3, 0);
    t.place(a, 0, 0);
    t.resolve(a, ActionType::Disengage, &[], json!({}));
    let e = t.ok(t.players[0], mv(a, -1, 0));
    assert_eq!(kinds(&e), ["character_moved"]);
}

/// "Difficult Terrain: every foot of movement in difficult terrain costs 1 extra foot"
/// and "Crawling: every foot of movement costs 1 extra foot" (they add up: 15 ft).
#[test]
fn difficult_terrain_and_crawling_cost_extra_per_step() {
    let mut t = fight(aria);
    let a = t.pcs[0];
    let squares = vec![
        TerrainSquare {
            x: 1,
            y: 0,
            difficult: true,
            cover: Cover::None,
        },
        TerrainSquare {
            x: 2,
            y: 0,
            difficult: true,
            cover: Cover::None,
        },
    ];
    t.ok(
        t.dm,
        Command::TerrainSet {
            squares,
            clear: false,
        },
    );
    let e = t.ok(t.players[0], mv(a, 3, 0));
    let m = &moved(&e)[0];
    assert_eq!((m.distance, m.cost, m.movement_left), (15, 25, Some(5)));
    // Prone, crawling into difficult terrain: 15 ft for one square.
    let mut t = fight(aria);
    let a = t.pcs[0];
    t.ok(
        t.dm,
        Command::TerrainSet {
            squares: vec![TerrainSquare {
                x: 1,
                y: 0,
                difficult: true,
                cover: Cover::None,
            }],
            clear: false,
        },
    );
    t.ok(t.dm, impose(a, Condition::Prone));
    let e = t.ok(t.players[0], mv(a, 1, 0));
    assert_eq!(moved(&e)[0].cost, 15);
    // Two more squares of crawling (10 + 10) do not fit in the 15 ft left.
    assert_eq!(t.err(t.players[0], mv(a, 3, 0)), codes::MOVEMENT_EXCEEDED);
    t.ok(t.players[0], mv(a, 2, 0));
}

/// "Standing up takes more effort; doing so costs an amount of movement equal to half
/// your speed." Then the walk has what is left: Aria (speed 30) stands (15 ft) and walks
/// three squares; a fourth does not fit.
#[test]
fn standing_up_then_walking_shares_the_turns_movement() {
    let mut t = fight(aria);
    let a = t.pcs[0];
    t.ok(t.dm, impose(a, Condition::Prone));
    let e = t.ok(t.players[0], Command::StandUp { character_id: a });
    let Event::StoodUp(up) = &e[0] else { panic!() };
    assert_eq!((up.cost, up.movement_left), (15, Some(15)));
    assert_eq!(t.err(t.players[0], mv(a, 0, -4)), codes::MOVEMENT_EXCEEDED);
    let e = t.ok(t.players[0], mv(a, 0, -3));
    assert_eq!(moved(&e)[0].movement_left, Some(0));
}

/// Frightened: "The creature can't willingly move closer to the source of its fear" —
/// on any step, even when the move ends no closer.
#[test]
fn frightened_is_checked_on_every_step() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 4, 0);
    t.ok(
        t.dm,
        Command::ApplyCondition {
            character_id: a,
            condition: Condition::Frightened,
            duration: None,
            source: Some(g),
            save_ends: None,
        },
    );
    let err = t.err(t.players[0], mv_path(a, &[(1, 1)], (0, 2)));
    assert_eq!(err, codes::MOVEMENT_BLOCKED);
    t.ok(t.players[0], mv_path(a, &[(0, -1)], (-1, -2)));
}

// ---- Issue 15, point 3: one attack, one target ----

/// "Making an attack [...] 1. Choose a target." One Attack action is one attack on one
/// target; Extra Attack ("you can attack twice, instead of once, whenever you take the
/// Attack action") is a second declaration, which may pick another target.
#[test]
fn table_3_an_attack_has_one_target() {
    let mut t = fight(aria);
    let (a, g0, g1) = (t.pcs[0], t.goblins[0], t.goblins[1]);
    t.place(g0, 1, 0);
    t.place(g1, 1, 1);
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[g0, g1], sword()),
        codes::INVALID_TARGET
    );
    let r = t.resolve(a, ActionType::Attack, &[g0], sword());
    assert_eq!(r.outcomes.len(), 1);
    assert_eq!(r.rolls.iter().filter(|r| r.purpose == "attack").count(), 1);
    let r = t.resolve(a, ActionType::Attack, &[g1], sword());
    assert_eq!(r.outcomes.len(), 1);
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[g0], sword()),
        codes::NO_ACTION_LEFT
    );
}

/// *Scorching ray*: "You create three rays of fire and hurl them at targets within range.
/// [...] Make a ranged spell attack for each ray." Each ray is its own attack, declared
/// on its own; the first spends the action.
#[test]
fn a_spell_with_several_attack_rolls() {
    let mut t = fight(cyl);
    let (c, g0, g1) = (t.pcs[2], t.goblins[0], t.goblins[1]);
    let ray = json!({"name": "scorching ray", "attack_bonus": 5, "damage": "2d6",
        "damage_type": "fire", "range": 120, "attacks": 3});
    for g in [g0, g1, g0] {
        let r = t.resolve(c, ActionType::Attack, &[g], ray.clone());
        assert_eq!(r.outcomes.len(), 1);
    }
    assert_eq!(
        t.act_err(c, ActionType::Attack, &[g1], ray),
        codes::NO_ACTION_LEFT
    );
}

// ---- Issue 15, point 5: Dodge and grapples end as the SRD says ----

/// Dodge: "You lose this benefit if you are incapacitated or if your speed drops to 0."
#[test]
fn table_5_dodge_ends_when_incapacitated_or_at_speed_zero() {
    for cond in [Condition::Stunned, Condition::Grappled] {
        let mut t = fight(aria);
        let a = t.pcs[0];
        t.resolve(a, ActionType::Dodge, &[], json!({}));
        assert!(t.ch(a).has(Condition::Dodging));
        let e = t.ok(t.dm, impose(a, cond));
        assert!(!t.ch(a).has(Condition::Dodging), "{cond:?}");
        assert!(t.s.game.effects.is_empty());
        let p = e[0].patch().unwrap();
        assert!(p["effects"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v.is_null()));
    }
}

/// Grappled: "The condition ends if the grappler is incapacitated."
#[test]
fn table_5_a_grapple_ends_when_the_grappler_is_incapacitated() {
    for how in ["stunned", "killed"] {
        let mut t = fight(aria);
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.place(g, 1, 0);
        t.set_turn(g);
        t.rig(&[(20, 15), (4, 1)]);
        let grab = json!({"name": "grab", "attack_bonus": 4, "damage": "1d4",
            "damage_type": "bludgeoning", "conditions": [{"condition": "grappled"}]});
        let r = t.resolve(g, ActionType::Attack, &[a], grab);
        assert_eq!(outcome(&r, a).conditions, vec![Condition::Grappled]);
        // Another, sourceless grapple (the DM's) is not the goblin's to lose.
        match how {
            "stunned" => {
                t.ok(t.dm, impose(g, Condition::Stunned));
            }
            _ => {
                t.ok(t.dm, update(g, json!({"hp": 0})));
            }
        }
        assert!(!t.ch(a).has(Condition::Grappled), "{how}");
        assert!(t.s.game.effects.is_empty(), "{how}");
    }
}

// ---- Issue 15, point 4: save ends ----

/// *Hold person*: "At the end of each of its turns, the target can make another Wisdom
/// saving throw. On a success, the spell ends on the target."
#[test]
fn save_ends_condition_ends_on_a_successful_repeat_save() {
    for (face, ends) in [(15, true), (3, false)] {
        let mut t = fight(cyl);
        let (c, g) = (t.pcs[2], t.goblins[0]);
        t.rig(&[(20, 2)]);
        let hold = json!({"name": "hold person", "save": {"ability": "wis", "dc": 13},
            "magical": true, "concentration": true,
            "conditions": [{"condition": "paralyzed", "save_ends": true}]});
        t.resolve(c, ActionType::Save, &[g], hold);
        let effect = t.s.game.effects.values().next().unwrap().clone();
        let save = effect.save_ends.unwrap();
        assert_eq!((save.dc, save.magical), (13, true));
        // The goblin's turn ends: the repeat save comes before the next turn begins.
        t.set_turn(g);
        t.rig(&[(20, face)]);
        let e = t.ok(t.dm, Command::EndTurn {});
        assert_eq!(kinds(&e)[..2], ["repeat_save", "turn_change"]);
        let r = &repeat_saves(&e)[0];
        assert_eq!(
            (r.effect_ids.clone(), r.save.d20, r.ended),
            (vec![effect.id], Some(face), ends)
        );
        assert_eq!(r.rolls[0].purpose, "save");
        assert_eq!(t.ch(g).has(Condition::Paralyzed), !ends, "{face}");
        // Other creatures' turns bring no save.
        let active = t.active();
        let e = t.ok(t.owner(active), Command::EndTurn {});
        assert!(repeat_saves(&e).is_empty() || active == g);
    }
}

/// `apply_condition` with `save_ends`; one save per action for the conditions it
/// imposed together.
#[test]
fn save_ends_from_the_dm_and_one_save_per_action() {
    let mut t = fight(cyl);
    let (c, g) = (t.pcs[2], t.goblins[0]);
    t.ok(
        t.dm,
        Command::ApplyCondition {
            character_id: g,
            condition: Condition::Poisoned,
            duration: None,
            source: None,
            save_ends: Some(SaveEndsSpec::Save {
                ability: crate::character::Ability::Con,
                dc: 10,
            }),
        },
    );
    t.rig(&[(20, 1), (20, 1)]);
    let d = json!({"save": {"ability": "wis", "dc": 13},
        "conditions": [{"condition": "blinded", "save_ends": true},
                       {"condition": "deafened", "save_ends": true}]});
    t.resolve(c, ActionType::Save, &[g], d);
    t.set_turn(g);
    t.rig(&[(20, 12), (20, 20)]);
    let e = t.ok(t.dm, Command::EndTurn {});
    let saves = repeat_saves(&e);
    assert_eq!(saves.len(), 2);
    assert_eq!(saves[0].conditions, vec![Condition::Poisoned]);
    assert_eq!(
        saves[1].conditions,
        vec![Condition::Blinded, Condition::Deafened]
    );
    assert!(saves.iter().all(|s| s.ended));
    assert!(t.s.game.effects.is_empty());
    // `save_ends: true` needs an action's save; DCs are 1 to 40.
    let bad = Command::ApplyCondition {
        character_id: g,
        condition: Condition::Blinded,
        duration: None,
        source: None,
        save_ends: Some(SaveEndsSpec::Same(true)),
    };
    assert_eq!(t.err(t.dm, bad), codes::INVALID_PAYLOAD);
}

// ---- Issue 15, point 6: surprise ----

/// "If you're surprised, you can't move or take an action on your first turn of the
/// combat, and you can't take a reaction until that turn ends."
#[test]
fn a_surprised_creature_loses_its_first_turn() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    // The goblin rolls 18 (+2), Aria 5 (+2): the goblin would act first.
    t.rig(&[(20, 18), (20, 5)]);
    let e = t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![g, a],
            surprised: vec![g],
        },
    );
    assert_eq!(
        kinds(&e),
        [
            "combat_started",
            "initiative_roll",
            "initiative_roll",
            "turn_change",
            "turn_change"
        ]
    );
    let tc = turns(&e);
    assert_eq!((tc[0].active_character, tc[0].surprised), (g, true));
    assert_eq!(
        (
            tc[1].active_character,
            tc[1].previous_character,
            tc[1].round
        ),
        (a, Some(g), 1)
    );
    assert!(!tc[1].surprised);
    // Its first turn has ended: it reacts again.
    assert!(!t.s.game.combat.as_ref().unwrap().surprised(g));
    t.place(g, 1, 0);
    let e = t.ok(t.players[0], mv(a, -1, 0));
    assert_eq!(provoked(&e).unwrap().reactors, vec![g]);
}

#[test]
fn a_surprised_creature_takes_no_reaction_until_its_turn_ends() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    t.rig(&[(20, 5), (20, 18)]);
    let e = t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![g, a],
            surprised: vec![g],
        },
    );
    assert_eq!(turns(&e)[0].active_character, a);
    assert_eq!(
        t.act_err(g, ActionType::Attack, &[a], scimitar_reaction()),
        codes::SURPRISED
    );
    // Leaving its reach provokes nothing from it.
    let e = t.ok(t.players[0], mv(a, -1, 0));
    assert_eq!(kinds(&e), ["character_moved"]);
    // Aria ends her turn: the goblin's turn begins and ends at once; round 2.
    let e = t.ok(t.players[0], Command::EndTurn {});
    let tc = turns(&e);
    assert_eq!(tc.len(), 2);
    assert!(tc[0].surprised && tc[0].active_character == g);
    assert_eq!((tc[1].active_character, tc[1].round), (a, 2));
    // In round 2 it is an ordinary creature.
    t.ok(t.players[0], Command::EndTurn {});
    assert_eq!(t.active(), g);
    t.resolve(g, ActionType::Dodge, &[], json!({}));
}

#[test]
fn surprised_must_be_participants() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    let cmd = Command::CombatStart {
        participants: vec![a],
        surprised: vec![g],
    };
    assert_eq!(t.err(t.dm, cmd), codes::INVALID_PAYLOAD);
}

// ---- Exhaustion ----

/// Exhaustion levels, cumulative: 1 disadvantage on ability checks, 2 speed halved,
/// 3 disadvantage on attack rolls and saving throws, 4 hit point maximum halved,
/// 5 speed reduced to 0, 6 death.
#[test]
fn exhaustion_levels() {
    // Level 1: the Hide check has disadvantage.
    let mut t = fight(aria);
    let a = t.pcs[0];
    t.ok(t.dm, update(a, json!({"exhaustion": 1})));
    let r = t.resolve(a, ActionType::Hide, &[], json!({"dc": 10}));
    let check = outcome(&r, a).check.clone().unwrap();
    assert_eq!(
        (check.mode, check.disadvantage),
        (Mode::Disadvantage, vec!["exhaustion".to_string()])
    );
    // Level 2: speed 15.
    let mut t = fight(aria);
    t.ok(t.dm, update(a, json!({"exhaustion": 2})));
    assert_eq!(left(&t), 15);
    assert_eq!(t.err(t.players[0], mv(a, 0, -4)), codes::MOVEMENT_EXCEEDED);
    t.ok(t.players[0], mv(a, 0, -3));
    // Level 3: attacks and saves with disadvantage.
    let mut t = fight(aria);
    let g = t.goblins[0];
    t.place(g, 1, 0);
    t.ok(t.dm, update(a, json!({"exhaustion": 3})));
    let r = t.resolve(a, ActionType::Attack, &[g], sword());
    let atk = outcome(&r, g).attack.clone().unwrap();
    assert!(atk.disadvantage.contains(&"attacker_exhausted".to_string()));
    t.set_turn(g);
    let r = t.resolve(
        g,
        ActionType::Save,
        &[a],
        json!({"save": {"ability": "wis", "dc": 10}}),
    );
    let save = outcome(&r, a).save.clone().unwrap();
    assert_eq!(
        (save.mode, save.disadvantage),
        (Mode::Disadvantage, vec!["exhaustion".to_string()])
    );
    // Level 4: hit point maximum 15 (of 30); healing stops there.
    t.ok(t.dm, update(a, json!({"exhaustion": 4})));
    assert_eq!((t.ch(a).hp, t.ch(a).hp_max()), (15, 15));
    assert_eq!(
        t.err(t.dm, update(a, json!({"hp": 20}))),
        codes::INVALID_CHARACTER
    );
    // Level 5: speed 0.
    t.ok(t.dm, update(a, json!({"exhaustion": 5})));
    t.set_turn(a);
    let err = t.run(t.players[0], mv(a, 0, -1)).unwrap_err();
    assert_eq!(
        (err.code.as_str(), &err.details["exhaustion"]),
        (codes::MOVEMENT_EXCEEDED, &json!(5))
    );
    // Level 6: death.
    t.ok(t.dm, update(a, json!({"exhaustion": 6})));
    assert!(t.ch(a).is_dead());
}

// ---- Advantage and disadvantage on saving throws ----

/// Magic Resistance: "advantage on saving throws against spells and other magical
/// effects". Traits may also name an ability or concentration (War Caster).
#[test]
fn trait_advantage_and_disadvantage_on_saves() {
    let mut t = fight(cyl);
    let (c, g) = (t.pcs[2], t.goblins[0]);
    t.ok(
        t.dm,
        update(
            g,
            json!({"save_advantages": ["magic"], "save_disadvantages": ["dex"]}),
        ),
    );
    let wis = |magical: bool| json!({"save": {"ability": "wis", "dc": 10}, "magical": magical});
    let r = t.resolve(c, ActionType::Save, &[g], wis(true));
    let s = outcome(&r, g).save.clone().unwrap();
    assert_eq!(
        (s.mode, s.advantage),
        (Mode::Advantage, vec!["trait_magic".to_string()])
    );
    t.set_turn(c);
    let r = t.resolve(c, ActionType::Save, &[g], wis(false));
    assert_eq!(outcome(&r, g).save.as_ref().unwrap().mode, Mode::Normal);
    // Magic against a Dexterity weakness: they cancel.
    t.set_turn(c);
    let d = json!({"save": {"ability": "dex", "dc": 10}, "magical": true});
    let r = t.resolve(c, ActionType::Save, &[g], d);
    let s = outcome(&r, g).save.clone().unwrap();
    assert_eq!(
        (s.mode, s.disadvantage),
        (Mode::Normal, vec!["trait_dex".to_string()])
    );
}

/// War Caster: "advantage on Constitution saving throws that you make to maintain your
/// concentration on a spell when you take damage".
#[test]
fn concentration_saves_with_advantage() {
    let mut t = fight(cyl);
    let (a, c, g) = (t.pcs[0], t.pcs[2], t.goblins[0]);
    t.ok(
        t.dm,
        update(c, json!({"save_advantages": ["concentration"]})),
    );
    t.ch_mut(c).max_hp = 100;
    t.ch_mut(c).hp = 100;
    t.rig(&[(20, 1)]);
    let hold = json!({"save": {"ability": "wis", "dc": 13}, "concentration": true,
        "conditions": [{"condition": "paralyzed"}]});
    t.resolve(c, ActionType::Save, &[g], hold);
    t.set_turn(a);
    t.place(a, 1, 4);
    t.rig(&[(20, 15), (20, 3), (20, 12)]);
    let r = t.resolve(
        a,
        ActionType::Attack,
        &[c],
        json!({"attack_bonus": 5, "damage": "8", "damage_type": "force"}),
    );
    let check = outcome(&r, c).concentration_check.clone().unwrap();
    assert_eq!(
        (check.mode, check.d20, check.success),
        (Mode::Advantage, 12, true)
    );
    assert_eq!(check.advantage, vec!["trait_concentration".to_string()]);
}

/// "Whenever you take damage while you are concentrating on a spell, you must make a
/// Constitution saving throw" — also when the damage comes as a hit point change from
/// the DM or the character service (Message Hub).
#[test]
fn concentration_save_on_hit_points_lost_through_updates() {
    let mut t = fight(cyl);
    let (c, g) = (t.pcs[2], t.goblins[0]);
    t.rig(&[(20, 1)]);
    let hold = json!({"save": {"ability": "wis", "dc": 13}, "concentration": true,
        "conditions": [{"condition": "paralyzed"}]});
    t.resolve(c, ActionType::Save, &[g], hold);
    // The hub: 16 → 12 (4 lost): DC 10; Cyl (Con +0) rolls 15 and keeps it.
    t.rig(&[(20, 15)]);
    let ctx = Ctx {
        admin: true,
        ..t.ctx(Uuid::nil())
    };
    let sync = Command::CharacterSync {
        character_id: c,
        changes: CharacterChanges {
            hp: Some(12),
            ..Default::default()
        },
    };
    let e = t.run_ctx(&ctx, sync.clone()).unwrap();
    let Event::CharacterUpdated(u) = &e[0] else {
        panic!()
    };
    let check = u.concentration_check.clone().unwrap();
    assert_eq!((check.dc, check.d20, check.success), (10, 15, true));
    assert_eq!(u.rolls[0].purpose, "concentration");
    // Redelivered: nothing changes, nothing is rolled.
    let counter = t.s.game.dice_counter;
    assert!(t.run_ctx(&ctx, sync).unwrap().is_empty());
    assert_eq!(t.s.game.dice_counter, counter);
    // The DM: 12 → 2 (10 lost): Cyl rolls 9 and loses it; the goblin is free.
    t.rig(&[(20, 9)]);
    let e = t.ok(t.dm, update(c, json!({"hp": 2})));
    let Event::CharacterUpdated(u) = &e[0] else {
        panic!()
    };
    assert!(!u.concentration_check.as_ref().unwrap().success);
    assert!(t.ch(c).concentration.is_none());
    assert!(!t.ch(g).has(Condition::Paralyzed));
}

// ---- Help, Hide, Ready ----

/// Help: "the next attack roll your ally makes against that creature before the start
/// of your next turn has advantage" — the creature within 5 feet of the helper.
#[test]
fn help_gives_advantage_on_the_allys_next_attack() {
    let mut t = fight(|t| t.pcs[1]);
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    t.place(g, 1, 0);
    assert_eq!(
        t.act_err(b, ActionType::Help, &[a], json!({"against": g})),
        codes::OUT_OF_RANGE
    );
    t.place(b, 1, 1);
    assert_eq!(
        t.act_err(b, ActionType::Help, &[], json!({"against": g})),
        codes::INVALID_TARGET
    );
    t.resolve(b, ActionType::Help, &[a], json!({"against": g}));
    t.set_turn(a);
    let r = t.resolve(a, ActionType::Attack, &[g], sword());
    let atk = outcome(&r, g).attack.clone().unwrap();
    assert_eq!(
        (atk.mode, atk.advantage),
        (Mode::Advantage, vec!["helped".to_string()])
    );
    // Used up by that attack.
    let r = t.resolve(a, ActionType::Attack, &[g], sword());
    assert_eq!(outcome(&r, g).attack.as_ref().unwrap().mode, Mode::Normal);
}

#[test]
fn help_lapses_at_the_start_of_the_helpers_next_turn() {
    let mut t = Table::new();
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    t.place(g, 1, 0);
    t.place(b, 1, 1);
    let all = t.all();
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    while t.active() != b {
        let active = t.active();
        t.ok(t.owner(active), Command::EndTurn {});
    }
    t.resolve(b, ActionType::Help, &[a], json!({"against": g}));
    let help = |t: &Table| {
        t.s.game.combat.as_ref().unwrap().participants[&b]
            .help
            .clone()
    };
    assert!(help(&t).is_some());
    t.ok(t.players[1], Command::EndTurn {});
    while t.active() != b {
        assert!(help(&t).is_some());
        let active = t.active();
        t.ok(t.owner(active), Command::EndTurn {});
    }
    assert!(help(&t).is_none());
}

/// Hide: "you make a Dexterity (Stealth) check in an attempt to hide"; hidden: "you
/// have advantage on attack rolls against it [...] If you are hidden [...] you give
/// away your location when the attack hits or misses."
#[test]
fn hide_then_attack_from_hiding() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    t.rig(&[(20, 2)]);
    let r = t.resolve(a, ActionType::Hide, &[], json!({}));
    let check = outcome(&r, a).check.clone().unwrap();
    assert_eq!((check.dc, check.total, check.success), (10, 4, false));
    assert_eq!(outcome(&r, a).effects, vec!["not_hidden"]);
    t.set_turn(a);
    t.rig(&[(20, 15)]);
    let r = t.resolve(
        a,
        ActionType::Hide,
        &[],
        json!({"cost": "bonus_action", "dc": 14}),
    );
    assert_eq!(outcome(&r, a).effects, vec!["hidden"]);
    assert!(t.ch(a).has(Condition::Hidden));
    // Attacked while hidden: disadvantage.
    t.set_turn(g);
    let claw = json!({"attack_bonus": 4, "damage": "1", "damage_type": "slashing"});
    let r = t.resolve(g, ActionType::Attack, &[a], claw);
    assert!(outcome(&r, a)
        .attack
        .as_ref()
        .unwrap()
        .disadvantage
        .contains(&"target_hidden".to_string()));
    // Attacking from hiding: advantage, then revealed.
    t.set_turn(a);
    let r = t.resolve(a, ActionType::Attack, &[g], sword());
    assert!(outcome(&r, g)
        .attack
        .as_ref()
        .unwrap()
        .advantage
        .contains(&"attacker_hidden".to_string()));
    assert!(!t.ch(a).has(Condition::Hidden));
}

/// Help with a task: the ally's next ability check has advantage (Hide's check).
#[test]
fn help_with_a_task_gives_advantage_on_the_hide_check() {
    let mut t = fight(|t| t.pcs[1]);
    let (a, b) = (t.pcs[0], t.pcs[1]);
    t.resolve(b, ActionType::Help, &[a], json!({}));
    t.set_turn(a);
    let r = t.resolve(a, ActionType::Hide, &[], json!({}));
    let check = outcome(&r, a).check.clone().unwrap();
    assert_eq!(
        (check.mode, check.advantage),
        (Mode::Advantage, vec!["helped".to_string()])
    );
}

/// Ready: "When the trigger occurs, you can either take your reaction right after the
/// trigger finishes or ignore the trigger." A readied attack is one attack.
#[test]
fn ready_an_attack_and_release_it_with_the_reaction() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 2, 0);
    let ready = json!({"action": "attack", "trigger": "a goblin comes within reach"});
    assert_eq!(
        t.act_err(
            a,
            ActionType::Ready,
            &[],
            json!({"action": "dash", "trigger": "x"})
        ),
        codes::INVALID_PAYLOAD
    );
    t.resolve(a, ActionType::Ready, &[], ready);
    let turn = t.s.game.combat.as_ref().unwrap().turn.clone().unwrap();
    assert!(turn.action_used);
    // The goblin steps in; Aria releases the attack with her reaction.
    t.set_turn(g);
    t.ok(t.dm, mv(g, 1, 0));
    let mut d = sword();
    d["cost"] = json!("reaction");
    d["readied"] = json!(true);
    let r = t.resolve(a, ActionType::Attack, &[g], d.clone());
    assert_eq!(r.outcomes.len(), 1);
    let p = &t.s.game.combat.as_ref().unwrap().participants[&a];
    assert!(p.reaction_used && p.readied.is_none());
    // Nothing readied any more.
    let mut t = fight(aria);
    t.set_turn(g);
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[g], d),
        codes::INVALID_PAYLOAD
    );
}

/// "When you ready a spell, you cast it as normal but hold its energy [...] holding
/// onto the spell's magic requires concentration"; it lapses at the start of the
/// readier's next turn.
#[test]
fn a_readied_spell_is_held_with_concentration() {
    let ready = json!({"name": "held fire bolt", "action": "attack", "spell": true,
        "trigger": "the goblin moves"});
    let readied = |t: &Table, c| {
        t.s.game.combat.as_ref().unwrap().participants[&c]
            .readied
            .clone()
    };
    // Released: the holding ends with the release.
    let mut t = fight(cyl);
    let (c, g) = (t.pcs[2], t.goblins[0]);
    t.resolve(c, ActionType::Ready, &[], ready.clone());
    let held = t.ch(c).concentration.clone().unwrap();
    assert_eq!(held.name, "held fire bolt");
    assert!(readied(&t, c).unwrap().spell);
    t.set_turn(g);
    let bolt = json!({"attack_bonus": 5, "damage": "1d10", "damage_type": "fire",
        "range": 120, "cost": "reaction", "readied": true});
    t.resolve(c, ActionType::Attack, &[g], bolt);
    assert!(t.ch(c).concentration.is_none() && readied(&t, c).is_none());
    // Lost when the concentration breaks (the DM knocks 10 hit points off, Cyl rolls 3).
    let mut t = fight(cyl);
    t.resolve(c, ActionType::Ready, &[], ready.clone());
    t.rig(&[(20, 3)]);
    t.ok(t.dm, update(c, json!({"hp": 6})));
    assert!(readied(&t, c).is_none());
    // Unreleased, it lapses at the start of Cyl's next turn, with the concentration.
    let mut t = Table::new();
    let all = t.all();
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    let next = |t: &mut Table| {
        let active = t.active();
        t.ok(t.owner(active), Command::EndTurn {});
    };
    while t.active() != c {
        next(&mut t);
    }
    t.resolve(c, ActionType::Ready, &[], ready);
    next(&mut t);
    while t.active() != c {
        assert!(readied(&t, c).is_some());
        next(&mut t);
    }
    assert!(readied(&t, c).is_none() && t.ch(c).concentration.is_none());
}

// ---- Cover ----

/// "Half cover: +2 bonus to AC and Dexterity saving throws. Three-quarters cover: +5
/// [...]" A target on a square marked with cover has it; an action may say otherwise.
#[test]
fn cover_adds_to_ac_and_dexterity_saves() {
    for (cover, ac) in [(Cover::Half, 17), (Cover::ThreeQuarters, 20)] {
        let mut t = fight(aria);
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.place(g, 1, 0);
        t.ok(
            t.dm,
            Command::TerrainSet {
                squares: vec![TerrainSquare {
                    x: 1,
                    y: 0,
                    difficult: false,
                    cover,
                }],
                clear: false,
            },
        );
        // d20 = AC − 6: one short (+5 to hit).
        t.rig(&[(20, ac - 6)]);
        let r = t.resolve(a, ActionType::Attack, &[g], sword());
        let atk = outcome(&r, g).attack.clone().unwrap();
        assert_eq!((atk.ac, atk.cover, atk.hit), (ac, cover, false));
        t.rig(&[(20, ac - 5), (8, 1)]);
        let r = t.resolve(a, ActionType::Attack, &[g], sword());
        assert!(outcome(&r, g).attack.as_ref().unwrap().hit);
        // Declared: no cover from this side.
        t.set_turn(a);
        let mut d = sword();
        d["cover"] = json!("none");
        let r = t.resolve(a, ActionType::Attack, &[g], d);
        assert_eq!(outcome(&r, g).attack.as_ref().unwrap().ac, 15);
        // A Dexterity save gains it (in `bonus`), a Wisdom save does not.
        t.set_turn(t.pcs[2]);
        let c = t.pcs[2];
        let r = t.resolve(
            c,
            ActionType::Save,
            &[g],
            json!({"save": {"ability": "dex", "dc": 10}}),
        );
        let s = outcome(&r, g).save.clone().unwrap();
        assert_eq!((s.cover, s.bonus), (cover, 2 + cover.bonus()));
        t.set_turn(c);
        let r = t.resolve(
            c,
            ActionType::Save,
            &[g],
            json!({"save": {"ability": "wis", "dc": 10}}),
        );
        assert_eq!(outcome(&r, g).save.as_ref().unwrap().bonus, 0);
    }
}

/// Terrain on the battle map: the DM's marks, shown in the play view.
#[test]
fn terrain_is_the_dms_and_shows_in_the_view() {
    let mut t = Table::new();
    let sq = |x, y, difficult, cover| TerrainSquare {
        x,
        y,
        difficult,
        cover,
    };
    let set = |squares: Vec<TerrainSquare>, clear| Command::TerrainSet { squares, clear };
    assert_eq!(
        t.err(t.players[0], set(vec![sq(1, 1, true, Cover::None)], false)),
        codes::FORBIDDEN_FOR_ROLE
    );
    for bad in [
        vec![],
        vec![sq(1, 1, true, Cover::None), sq(1, 1, false, Cover::Half)],
        vec![sq(20_000, 0, true, Cover::None)],
    ] {
        assert_eq!(t.err(t.dm, set(bad, false)), codes::INVALID_PAYLOAD);
    }
    // Allowed while paused, like other setup.
    t.ok(t.dm, Command::SessionPause {});
    let e = t.ok(
        t.dm,
        set(
            vec![
                sq(1, 1, true, Cover::None),
                sq(-2, 3, false, Cover::ThreeQuarters),
            ],
            false,
        ),
    );
    assert_eq!(kinds(&e), ["terrain_changed"]);
    let view = t.s.game_view();
    assert_eq!(
        view["play"]["terrain"],
        json!({"1,1": {"difficult": true}, "-2,3": {"cover": "three_quarters"}})
    );
    // A square without marks is cleared; `clear` empties the map first.
    t.ok(t.dm, set(vec![sq(1, 1, false, Cover::None)], false));
    assert_eq!(t.s.game.terrain.len(), 1);
    t.ok(t.dm, set(vec![], true));
    assert!(t.s.game_view()["play"].get("terrain").is_none());
}

// ---- Dice, damage, abilities ----

/// Dice expressions with several terms or dice kept: `2d4+1d6+1`, `4d6kh3`; a critical
/// hit rolls every die twice; `attack_dice` adds dice to the attack roll (*bless*).
#[test]
fn dice_with_several_terms_and_kept_dice() {
    let mut t = fight(|t| t.pcs[1]);
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    t.ch_mut(a).hp = 1;
    t.rig(&[(4, 1), (4, 2), (6, 3)]);
    let r = t.resolve(b, ActionType::Heal, &[a], json!({"amount": "2d4+1d6+1"}));
    assert_eq!(
        (
            r.rolls[0].dice.as_str(),
            r.rolls[0].faces.clone(),
            r.rolls[0].total
        ),
        ("2d4+1d6", vec![1, 2, 3], 7)
    );
    assert_eq!(t.ch(a).hp, 8);
    t.set_turn(a);
    t.place(g, 1, 0);
    // A critical hit with 2d6kh1: rolled twice, each keeping the higher die.
    t.rig(&[(20, 20), (6, 1), (6, 5), (6, 6), (6, 2)]);
    let d = json!({"attack_bonus": 5, "damage": "2d6kh1", "damage_type": "fire"});
    let r = t.resolve(a, ActionType::Attack, &[g], d);
    assert_eq!(r.rolls[1].dice, "2d6kh1+2d6kh1");
    assert_eq!(outcome(&r, g).damage.total, 5 + 6);
    // 4d6kh3, as for ability scores.
    t.set_turn(a);
    t.rig(&[(20, 15), (6, 1), (6, 4), (6, 2), (6, 5)]);
    let d = json!({"attack_bonus": 5, "damage": "4d6kh3", "damage_type": "fire"});
    let r = t.resolve(a, ActionType::Attack, &[g], d);
    assert_eq!(outcome(&r, g).damage.total, 4 + 2 + 5);
    // Bless: 1d20+5 plus 1d4.
    t.rig(&[(20, 9), (4, 2)]);
    let mut d = sword();
    d["attack_dice"] = json!("1d4");
    let r = t.resolve(a, ActionType::Attack, &[g], d);
    let atk = outcome(&r, g).attack.clone().unwrap();
    assert_eq!((atk.d20, atk.bonus_dice, atk.total), (9, Some(2), 16));
    assert_eq!(r.rolls[1].purpose, "attack_bonus");
}

/// "[...] takes half as much damage on a successful one": half of the total (7 fire +
/// 7 cold → 7, not 3 + 3), rounded down, shared out among the types.
#[test]
fn save_for_half_halves_the_total() {
    let mut t = fight(cyl);
    let (c, g) = (t.pcs[2], t.goblins[0]);
    t.rig(&[(20, 18)]);
    let d = json!({"save": {"ability": "dex", "dc": 10, "half_on_success": true},
        "damage": "7", "damage_type": "fire", "extra_damage": [{"dice": "7", "type": "cold"}]});
    let r = t.resolve(c, ActionType::Save, &[g], d);
    let o = outcome(&r, g);
    assert_eq!(o.damage.total, 7);
    assert_eq!(
        (
            o.damage.rolled[&DamageType::Cold],
            o.damage.rolled[&DamageType::Fire]
        ),
        (4, 3)
    );
    assert_eq!(t.ch(g).hp, 93);
    // Resistance still works per type, after halving.
    t.set_turn(c);
    t.ch_mut(g).resistances.insert(DamageType::Cold);
    t.rig(&[(20, 18)]);
    let d = json!({"save": {"ability": "dex", "dc": 10, "half_on_success": true},
        "damage": "7", "damage_type": "fire", "extra_damage": [{"dice": "7", "type": "cold"}]});
    let r = t.resolve(c, ActionType::Save, &[g], d);
    assert_eq!(outcome(&r, g).damage.total, 3 + 2);
}

/// Thrown: "If the weapon is a melee weapon, you use the same ability modifier for that
/// attack roll and damage roll that you would use for a melee attack with the weapon."
/// Finesse: "you use your choice of your Strength or Dexterity modifier".
#[test]
fn thrown_and_finesse_weapons_choose_their_ability() {
    let mut t = fight(aria);
    let (a, c, g) = (t.pcs[0], t.pcs[2], t.goblins[0]);
    t.place(g, 3, 0);
    let bonus = |t: &mut Table, who, d: serde_json::Value| {
        t.set_turn(who);
        let r = t.resolve(who, ActionType::Attack, &[g], d);
        outcome(&r, g).attack.as_ref().unwrap().bonus
    };
    let handaxe = json!({"damage": "1d6+3", "damage_type": "slashing",
        "range": {"normal": 20, "long": 60}, "thrown": true});
    let bow = json!({"damage": "1d8+2", "damage_type": "piercing", "range": {"normal": 150, "long": 600}});
    let dagger = json!({"damage": "1d4+2", "damage_type": "piercing",
        "range": {"normal": 20, "long": 60}, "thrown": true, "finesse": true});
    // Aria: Str +3, Dex +2, proficiency +2. Cyl: Str 0, Dex +2.
    assert_eq!(bonus(&mut t, a, handaxe), 5);
    assert_eq!(bonus(&mut t, a, bow), 4);
    assert_eq!(bonus(&mut t, a, dagger.clone()), 5);
    t.place(c, 0, 1);
    assert_eq!(bonus(&mut t, c, dagger), 4);
}

// ---- Combat bookkeeping ----

/// `settings.allow_client_rolls`: players roll their own initiative, also when they
/// join a running combat; until they have, they are not in the order.
#[test]
fn combat_add_honours_client_rolls() {
    let mut t = Table::with_settings(json!({"dice_seed": 7, "allow_client_rolls": true}));
    let (a, g0, g1) = (t.pcs[0], t.goblins[0], t.goblins[1]);
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![g0],
            surprised: vec![],
        },
    );
    let e = t.ok(
        t.dm,
        Command::CombatAdd {
            participants: vec![a, g1],
        },
    );
    assert_eq!(kinds(&e), ["combat_joined", "initiative_roll"]);
    let order = |t: &Table| t.s.game.combat.as_ref().unwrap().order.clone();
    assert_eq!(order(&t).len(), 2);
    assert!(!order(&t).contains(&a));
    let e = t.ok(
        t.players[0],
        Command::InitiativeRoll {
            character_id: a,
            roll: Some(17),
            modifiers: Default::default(),
        },
    );
    let Event::InitiativeRoll(i) = &e[0] else {
        panic!()
    };
    assert!(i.rolls[0].client);
    assert_eq!(order(&t).len(), 3);
    assert_eq!(t.active(), g0);
}

/// Durations in minutes (10 rounds each) outlast the combat; those in rounds end
/// with it.
#[test]
fn combat_end_ends_round_durations_only() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    let timed = |condition, rounds, minutes| Command::ApplyCondition {
        character_id: g,
        condition,
        duration: Some(DurationSpec {
            rounds,
            minutes,
            ends: Boundary::End,
            of: TurnOf::default(),
        }),
        source: Some(a),
        save_ends: None,
    };
    t.ok(t.dm, timed(Condition::Blinded, 10, None));
    t.ok(t.dm, timed(Condition::Frightened, 0, Some(1)));
    let minute = t.s.game.effects.values().last().unwrap().duration.unwrap();
    assert_eq!((minute.rounds, minute.minutes), (10, Some(1)));
    assert_eq!(
        t.err(t.dm, timed(Condition::Poisoned, 3, Some(1))),
        codes::INVALID_PAYLOAD
    );
    let e = t.ok(t.dm, Command::CombatEnd {});
    let Event::CombatEnded(ended) = &e[0] else {
        panic!()
    };
    assert_eq!(ended.effects_ended.len(), 1);
    assert!(!t.ch(g).has(Condition::Blinded) && t.ch(g).has(Condition::Frightened));
}

/// Every new command and rule replays: the events, applied to the state they were
/// decided on, reproduce the live state (the property test does it at random).
#[test]
fn scenarios_replay() {
    let mut t = fight(aria);
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 2, 1);
    let (start, from) = (t.s.clone(), t.log.len());
    t.ok(
        t.dm,
        Command::TerrainSet {
            squares: vec![TerrainSquare {
                x: 1,
                y: 0,
                difficult: true,
                cover: Cover::Half,
            }],
            clear: false,
        },
    );
    t.ok(t.players[0], mv(a, 4, 0));
    t.act(g, ActionType::Attack, &[a], scimitar_reaction())
        .unwrap();
    t.ok(
        t.dm,
        update(a, json!({"exhaustion": 2, "save_advantages": ["magic"]})),
    );
    let set: BTreeSet<SaveTag> = [SaveTag::Magic].into();
    assert_eq!(t.ch(a).save_advantages, set);
    let mut replayed = start;
    for e in &t.log[from..] {
        let (k, d) = e.to_parts();
        replayed.apply(&Event::from_parts(&k, d).unwrap());
    }
    assert_eq!(replayed, t.s);
}
