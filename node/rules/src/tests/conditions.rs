//! Conditions through the engine: imposing, removing, durations, and the mechanical
//! effects that are not attack-roll modifiers (those are tabled in
//! `conditions::tests::attack_roll_table`).

use super::harness::*;
use crate::character::{CharacterChanges, DamageType, Pos};
use crate::command::{ActionType, Command, DurationSpec, Named, TurnOf};
use crate::conditions::{Boundary, Condition};
use crate::error::codes;
use crate::event::Event;
use serde_json::json;
use uuid::Uuid;

fn apply(c: Uuid, condition: Condition) -> Command {
    Command::ApplyCondition {
        character_id: c,
        condition,
        duration: None,
        source: None,
        save_ends: None,
    }
}

#[test]
fn apply_condition_errors() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    assert_eq!(
        t.err(t.players[0], apply(a, Condition::Prone)),
        codes::FORBIDDEN_FOR_ROLE
    );
    assert_eq!(
        t.err(t.dm, apply(Uuid::from_u128(1), Condition::Prone)),
        codes::UNKNOWN_CHARACTER
    );
    assert_eq!(
        t.err(t.dm, apply(a, Condition::Dead)),
        codes::INVALID_PAYLOAD
    );
    t.ch_mut(g)
        .condition_immunities
        .insert(Condition::Frightened);
    assert_eq!(
        t.err(t.dm, apply(g, Condition::Frightened)),
        codes::CONDITION_IMMUNE
    );
    // Petrified creatures are immune to poison.
    t.ok(t.dm, apply(a, Condition::Petrified));
    assert_eq!(
        t.err(t.dm, apply(a, Condition::Poisoned)),
        codes::CONDITION_IMMUNE
    );
    let bad_source = Command::ApplyCondition {
        character_id: g,
        condition: Condition::Charmed,
        duration: None,
        source: Some(Uuid::from_u128(2)),
        save_ends: None,
    };
    assert_eq!(t.err(t.dm, bad_source), codes::UNKNOWN_CHARACTER);
    let zero = Command::ApplyCondition {
        character_id: g,
        condition: Condition::Blinded,
        duration: Some(DurationSpec {
            rounds: 0,
            ends: Boundary::End,
            of: TurnOf::default(),
            minutes: None,
        }),
        source: None,
        save_ends: None,
    };
    assert_eq!(t.err(t.dm, zero), codes::INVALID_PAYLOAD);
    assert_eq!(
        t.err(
            t.dm,
            Command::RemoveCondition {
                character_id: g,
                condition: Condition::Blinded
            }
        ),
        codes::INVALID_TARGET
    );
    // Unconscious creatures fall prone.
    t.ok(t.dm, apply(g, Condition::Unconscious));
    assert!(t.ch(g).has(Condition::Prone));
}

#[test]
fn durations_end_at_the_named_turn_boundary() {
    let mut t = Table::new();
    let all = t.all();
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    let order = t.s.game.combat.as_ref().unwrap().order.clone();
    let (x, y) = (order[1], order[3]);
    // Blinded until the end of x's next turn (1 end boundary); poisoned until the
    // start of y's second turn from now (2 start boundaries).
    let blind = Command::ApplyCondition {
        character_id: x,
        condition: Condition::Blinded,
        duration: Some(DurationSpec {
            rounds: 1,
            ends: Boundary::End,
            of: TurnOf::Named(Named::Target),
            minutes: None,
        }),
        source: None,
        save_ends: None,
    };
    let poison = Command::ApplyCondition {
        character_id: x,
        condition: Condition::Poisoned,
        duration: Some(DurationSpec {
            rounds: 2,
            ends: Boundary::Start,
            of: TurnOf::Character(y),
            minutes: None,
        }),
        source: Some(y),
        save_ends: None,
    };
    let e1 = t.ok(t.dm, blind);
    let e2 = t.ok(t.dm, poison);
    let id = |e: &[Event]| match &e[0] {
        Event::ConditionApplied(c) => c.effect_id.unwrap(),
        _ => panic!(),
    };
    let (blind_id, poison_id) = (id(&e1), id(&e2));
    let mut ended_at = vec![];
    for step in 0..order.len() * 2 {
        let active = t.active();
        let e = t.ok(t.owner(active), Command::EndTurn {});
        let Event::TurnChange(tc) = &e[0] else {
            panic!()
        };
        for ended in &tc.effects_ended {
            ended_at.push((*ended, step, active, tc.active_character));
        }
    }
    // The blindness ends when x's turn ends (step 1: ending order[1]'s turn).
    assert!(ended_at.contains(&(blind_id, 1, x, order[2])));
    // The poison ends at the start of y's turn in round 2 (step 2 + 5).
    assert!(ended_at.contains(&(poison_id, 2 + order.len(), order[2], y)));
    assert!(!t.ch(x).has(Condition::Blinded) && !t.ch(x).has(Condition::Poisoned));
}

#[test]
fn combat_end_ends_timed_effects_only() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    let all = t.all();
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    t.ok(
        t.dm,
        Command::ApplyCondition {
            character_id: g,
            condition: Condition::Frightened,
            duration: Some(DurationSpec {
                rounds: 10,
                ends: Boundary::End,
                of: TurnOf::Named(Named::Actor),
                minutes: None,
            }),
            source: Some(a),
            save_ends: None,
        },
    );
    t.ok(t.dm, apply(g, Condition::Prone));
    let e = t.ok(t.dm, Command::CombatEnd {});
    let Event::CombatEnded(ended) = &e[0] else {
        panic!()
    };
    assert_eq!(ended.effects_ended.len(), 1);
    assert!(!t.ch(g).has(Condition::Frightened) && t.ch(g).has(Condition::Prone));
}

#[test]
fn overlapping_effects_keep_the_condition() {
    let mut t = Table::new();
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    for src in [a, b] {
        t.ok(
            t.dm,
            Command::ApplyCondition {
                character_id: g,
                condition: Condition::Frightened,
                duration: None,
                source: Some(src),
                save_ends: None,
            },
        );
    }
    let first = *t.s.game.effects.keys().next().unwrap();
    let mut g2 = t.s.game.clone();
    g2.end_effect(first);
    assert!(
        g2.characters[&g].has(Condition::Frightened),
        "another effect still frightens it"
    );
    // Removing the condition ends every effect imposing it.
    let e = t.ok(
        t.dm,
        Command::RemoveCondition {
            character_id: g,
            condition: Condition::Frightened,
        },
    );
    let Event::ConditionRemoved(r) = &e[0] else {
        panic!()
    };
    assert_eq!(r.effects_ended.len(), 2);
    assert!(!t.ch(g).has(Condition::Frightened));
}

#[test]
fn incapacitating_conditions_forbid_actions() {
    for cond in [
        Condition::Incapacitated,
        Condition::Paralyzed,
        Condition::Petrified,
        Condition::Stunned,
        Condition::Unconscious,
    ] {
        let mut t = Table::new();
        let a = t.pcs[0];
        let all = t.all();
        t.combat(&all, a);
        t.ok(t.dm, apply(a, cond));
        assert_eq!(
            t.act_err(a, ActionType::Dodge, &[], json!({})),
            codes::INCAPACITATED,
            "{cond:?}"
        );
    }
    // Others do not.
    for cond in [
        Condition::Blinded,
        Condition::Poisoned,
        Condition::Grappled,
        Condition::Deafened,
    ] {
        let mut t = Table::new();
        let a = t.pcs[0];
        let all = t.all();
        t.combat(&all, a);
        t.ok(t.dm, apply(a, cond));
        t.resolve(a, ActionType::Dodge, &[], json!({}));
    }
}

#[test]
fn speed_zero_conditions_forbid_moving() {
    for cond in Condition::ALL {
        if cond == Condition::Dead {
            continue;
        }
        let mut t = Table::new();
        let a = t.pcs[0];
        t.ok(t.dm, apply(a, cond));
        let mv = Command::Move {
            character_id: a,
            to: Pos { x: 0, y: -1 },
            path: vec![],
        };
        let stops = matches!(
            cond,
            Condition::Grappled
                | Condition::Restrained
                | Condition::Paralyzed
                | Condition::Petrified
                | Condition::Stunned
                | Condition::Unconscious
        );
        if stops {
            assert_eq!(
                t.err(t.players[0], mv),
                codes::MOVEMENT_EXCEEDED,
                "{cond:?}"
            );
        } else {
            t.ok(t.players[0], mv);
        }
    }
}

#[test]
fn charmed_cannot_attack_the_charmer() {
    let mut t = Table::new();
    let (a, g0, g1) = (t.pcs[0], t.goblins[0], t.goblins[1]);
    t.place(g0, 1, 0);
    t.place(g1, 0, 1);
    let all = t.all();
    t.combat(&all, a);
    t.ok(
        t.dm,
        Command::ApplyCondition {
            character_id: a,
            condition: Condition::Charmed,
            duration: None,
            source: Some(g0),
            save_ends: None,
        },
    );
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[g0], sword()),
        codes::INVALID_TARGET
    );
    let hold = json!({"save": {"ability": "wis", "dc": 10}});
    assert_eq!(
        t.act_err(a, ActionType::Save, &[g0], hold),
        codes::INVALID_TARGET
    );
    t.resolve(a, ActionType::Attack, &[g1], sword());
}

#[test]
fn frightened_cannot_approach_the_source() {
    let mut t = Table::new();
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
    let to = |x, y| Command::Move {
        character_id: a,
        to: Pos { x, y },
        path: vec![],
    };
    assert_eq!(t.err(t.players[0], to(1, 0)), codes::MOVEMENT_BLOCKED);
    // Sideways at the same distance, or away, is fine.
    t.ok(t.players[0], to(0, 1));
    t.ok(t.players[0], to(-1, 1));
}

#[test]
fn petrified_resists_all_damage() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    let all = t.all();
    t.combat(&all, a);
    t.ok(t.dm, apply(g, Condition::Petrified));
    t.ch_mut(g).max_hp = 50;
    t.ch_mut(g).hp = 50;
    t.rig(&[(20, 10), (20, 10), (8, 7)]);
    let r = t.resolve(a, ActionType::Attack, &[g], sword());
    let o = outcome(&r, g);
    assert!(o.attack.as_ref().unwrap().hit);
    assert_eq!(o.damage.dealt[&DamageType::Slashing], 5);
    assert_eq!(o.damage.adjustments[&DamageType::Slashing], "resistant");
}

#[test]
fn prone_crawling_and_standing_up() {
    let mut t = Table::new();
    let a = t.pcs[0];
    let all = t.all();
    t.combat(&all, a);
    t.ok(t.dm, apply(a, Condition::Prone));
    // Crawling 5 ft costs 10.
    let e = t.ok(
        t.players[0],
        Command::Move {
            character_id: a,
            to: Pos { x: 0, y: -1 },
            path: vec![],
        },
    );
    let Event::CharacterMoved(m) = &e[0] else {
        panic!()
    };
    assert_eq!((m.distance, m.cost, m.movement_left), (5, 10, Some(20)));
    // Standing costs half the speed (15 of the 20 left).
    let e = t.ok(t.players[0], Command::StandUp { character_id: a });
    let Event::StoodUp(s) = &e[0] else { panic!() };
    assert_eq!((s.cost, s.movement_left), (15, Some(5)));
    assert!(!t.ch(a).has(Condition::Prone));
    assert_eq!(
        t.err(t.players[0], Command::StandUp { character_id: a }),
        codes::INVALID_TARGET
    );
    t.ok(t.dm, apply(a, Condition::Prone));
    assert_eq!(
        t.err(t.players[0], Command::StandUp { character_id: a }),
        codes::MOVEMENT_EXCEEDED
    );
}

#[test]
fn conditions_from_actions_with_durations_and_immunity() {
    let mut t = Table::new();
    let (c, g0, g1) = (t.pcs[2], t.goblins[0], t.goblins[1]);
    let all = t.all();
    t.combat(&all, c);
    t.ch_mut(g1).condition_immunities.insert(Condition::Blinded);
    t.rig(&[(20, 1), (20, 1)]);
    let d = json!({"save": {"ability": "con", "dc": 12},
        "conditions": [{"condition": "blinded", "duration": {"rounds": 1, "ends": "end", "of": "actor"}}]});
    let r = t.resolve(c, ActionType::Save, &[g0, g1], d);
    assert_eq!(outcome(&r, g0).conditions, vec![Condition::Blinded]);
    assert!(outcome(&r, g1)
        .effects
        .contains(&"immune:blinded".to_string()));
    let effect = t.s.game.effects.values().next().unwrap().clone();
    assert_eq!((effect.source, effect.duration.unwrap().of), (Some(c), c));
    // Ends at the end of Cyl's turn.
    t.ok(t.players[2], Command::EndTurn {});
    assert!(!t.ch(g0).has(Condition::Blinded));
}

#[test]
fn hub_and_dm_updates_keep_effects_consistent() {
    let mut t = Table::new();
    let (c, g) = (t.pcs[2], t.goblins[0]);
    let all = t.all();
    t.combat(&all, c);
    t.rig(&[(20, 1)]);
    let hold = json!({"save": {"ability": "wis", "dc": 13}, "conditions": [{"condition": "paralyzed"}], "concentration": true});
    t.resolve(c, ActionType::Save, &[g], hold);
    // The hub says Cyl dropped to 0 HP: unconscious, so the hold ends.
    let ctx = crate::command::Ctx {
        admin: true,
        ..t.ctx(Uuid::nil())
    };
    t.run_ctx(
        &ctx,
        Command::CharacterSync {
            character_id: c,
            changes: CharacterChanges {
                hp: Some(0),
                ..Default::default()
            },
        },
    )
    .unwrap();
    assert!(t.ch(c).has(Condition::Unconscious) && t.ch(c).concentration.is_none());
    assert!(!t.ch(g).has(Condition::Paralyzed));
    assert!(t.s.game.effects.is_empty());
}
