//! Combat lifecycle, initiative, turn order, rounds, action economy.

use super::harness::*;
use crate::combat::{Initiative, Participant};
use crate::command::{ActionType, Command};
use crate::conditions::Condition;
use crate::error::codes;
use crate::event::Event;
use serde_json::json;
use std::collections::BTreeMap;
use uuid::Uuid;

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind()).collect()
}

#[test]
fn combat_start_rolls_initiative_and_starts_round_one() {
    let mut t = Table::new();
    let all = t.all();
    let events = t.ok(
        t.dm,
        Command::CombatStart {
            participants: all.clone(),
            surprised: vec![],
        },
    );
    assert_eq!(
        kinds(&events),
        vec![
            "combat_started",
            "initiative_roll",
            "initiative_roll",
            "initiative_roll",
            "initiative_roll",
            "initiative_roll",
            "turn_change"
        ]
    );
    let c = t.s.game.combat.clone().unwrap();
    assert_eq!(c.round, 1);
    assert_eq!(c.turn_number, 1);
    assert_eq!(c.order.len(), 5);
    // Sorted by total, then modifier, then id.
    let key = |id: &Uuid| {
        let i = c.participants[id].initiative.clone().unwrap();
        (-i.total, -i.modifier, *id)
    };
    let mut sorted = c.order.clone();
    sorted.sort_by_key(key);
    assert_eq!(c.order, sorted);
    // Each initiative is d20 + dex (+ bonus), recorded with its roll.
    for e in &events {
        if let Event::InitiativeRoll(i) = e {
            let dex = t.ch(i.character_id).abilities.dex;
            assert_eq!(i.modifiers["dex"], dex);
            assert_eq!(i.roll, i.d20 as i32 + dex);
            assert_eq!(i.rolls.len(), 1);
            assert_eq!(i.rolls[0].faces, vec![i.d20]);
        }
    }
    let Some(Event::TurnChange(tc)) = events.last() else {
        panic!()
    };
    assert_eq!(
        (tc.active_character, tc.round, tc.turn_number),
        (c.order[0], 1, 1)
    );
}

#[test]
fn ties_break_by_modifier_then_id() {
    let init = |total, modifier| Participant {
        initiative: Some(Initiative {
            total,
            d20: 10,
            modifier,
        }),
        reaction_used: false,
        ..Default::default()
    };
    let (a, b, c, d) = (
        Uuid::from_u128(4),
        Uuid::from_u128(3),
        Uuid::from_u128(2),
        Uuid::from_u128(1),
    );
    let combat = crate::combat::Combat {
        id: Uuid::nil(),
        round: 0,
        turn_number: 0,
        participants: BTreeMap::from([
            (a, init(15, 2)),
            (b, init(15, 3)),
            (c, init(12, 0)),
            (d, init(15, 2)),
        ]),
        order: vec![],
        turn: None,
        opportunity: None,
    };
    // b has the higher modifier; a and d tie completely and go by id.
    assert_eq!(combat.initiative_order(), vec![b, d, a, c]);
}

#[test]
fn combat_start_errors() {
    let mut t = Table::new();
    let [p0, ..] = t.players;
    let all = t.all();
    let cases: Vec<(Uuid, Vec<Uuid>, &str)> = vec![
        (p0, all.clone(), codes::FORBIDDEN_FOR_ROLE),
        (t.observer, all.clone(), codes::FORBIDDEN_FOR_ROLE),
        (Uuid::from_u128(999), all.clone(), codes::NOT_MEMBER),
        (t.dm, vec![], codes::INVALID_PAYLOAD),
        (t.dm, vec![t.pcs[0], t.pcs[0]], codes::INVALID_PAYLOAD),
        (t.dm, vec![Uuid::from_u128(12345)], codes::UNKNOWN_CHARACTER),
    ];
    for (user, participants, code) in cases {
        assert_eq!(
            t.err(
                user,
                Command::CombatStart {
                    participants,
                    surprised: vec![]
                }
            ),
            code
        );
    }
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all.clone(),
            surprised: vec![],
        },
    );
    assert_eq!(
        t.err(
            t.dm,
            Command::CombatStart {
                participants: all,
                surprised: vec![]
            }
        ),
        codes::COMBAT_ALREADY_ACTIVE
    );
}

#[test]
fn combat_requires_an_active_session() {
    let mut t = Table::new();
    let all = t.all();
    t.ok(t.dm, Command::SessionPause {});
    assert_eq!(
        t.err(
            t.dm,
            Command::CombatStart {
                participants: all.clone(),
                surprised: vec![]
            }
        ),
        codes::SESSION_NOT_ACTIVE
    );
    t.ok(t.dm, Command::SessionResume {});
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    t.ok(t.dm, Command::SessionPause {});
    let active = t.active();
    for (user, cmd) in [
        (t.dm, Command::EndTurn {}),
        (t.dm, Command::CombatEnd {}),
        (
            t.owner(active),
            action(active, ActionType::Dodge, &[], json!({})),
        ),
    ] {
        assert_eq!(t.err(user, cmd), codes::SESSION_NOT_ACTIVE);
    }
    // Setting up characters is allowed while paused.
    t.place(t.goblins[0], 9, 9);
    t.ok(t.dm, Command::SessionEnd {});
    assert_eq!(t.err(t.dm, Command::EndTurn {}), codes::SESSION_ENDED);
}

#[test]
fn commands_without_combat() {
    let mut t = Table::new();
    let [a, ..] = t.pcs;
    assert_eq!(t.err(t.dm, Command::EndTurn {}), codes::COMBAT_NOT_ACTIVE);
    assert_eq!(t.err(t.dm, Command::CombatEnd {}), codes::COMBAT_NOT_ACTIVE);
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[t.goblins[0]], sword()),
        codes::COMBAT_NOT_ACTIVE
    );
    assert_eq!(
        t.err(
            t.players[0],
            Command::InitiativeRoll {
                character_id: a,
                roll: None,
                modifiers: BTreeMap::new()
            }
        ),
        codes::COMBAT_NOT_ACTIVE
    );
}

#[test]
fn turns_advance_and_rounds_count() {
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
    for round in 1..=2u32 {
        for (i, id) in order.iter().enumerate() {
            let c = t.s.game.combat.as_ref().unwrap();
            assert_eq!((c.round, c.turn_number), (round, i as u32 + 1));
            assert_eq!(c.turn.as_ref().unwrap().character_id, *id);
            // Someone else's player cannot end this turn; the controller can.
            let other = t
                .players
                .iter()
                .copied()
                .find(|p| *p != t.owner(*id))
                .unwrap();
            assert_eq!(t.err(other, Command::EndTurn {}), codes::NOT_YOUR_TURN);
            assert_eq!(
                t.err(t.observer, Command::EndTurn {}),
                codes::FORBIDDEN_FOR_ROLE
            );
            let events = t.ok(t.owner(*id), Command::EndTurn {});
            let Event::TurnChange(tc) = &events[0] else {
                panic!()
            };
            assert_eq!(tc.previous_character, Some(*id));
        }
    }
    assert_eq!(t.s.game.combat.as_ref().unwrap().round, 3);
    let ended = t.ok(t.dm, Command::CombatEnd {});
    let Event::CombatEnded(e) = &ended[0] else {
        panic!()
    };
    assert_eq!(e.rounds, 3);
    assert!(t.s.game.combat.is_none());
    assert!(t.s.game.combat_summary().is_none());
}

#[test]
fn dead_creatures_are_skipped() {
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
    // Kill the second creature in the order (a goblin or PC alike: hp 0 + dead).
    let victim = order[1];
    t.ok(
        t.dm,
        Command::CharacterUpdate {
            character_id: victim,
            changes: crate::character::CharacterChanges {
                conditions_add: vec![Condition::Dead],
                ..Default::default()
            },
        },
    );
    t.ok(t.owner(order[0]), Command::EndTurn {});
    let active = t.active();
    assert_eq!(active, order[2]);
    assert_eq!(t.s.game.combat.as_ref().unwrap().turn_number, 3);
}

#[test]
fn client_rolls_when_allowed() {
    let mut t = Table::with_settings(json!({"dice_seed": 7, "allow_client_rolls": true}));
    let all = t.all();
    let [a, b, c] = t.pcs;
    let events = t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    // Monsters are rolled by the server; the players roll their own.
    assert_eq!(
        kinds(&events),
        vec!["combat_started", "initiative_roll", "initiative_roll"]
    );
    assert_eq!(
        t.act_err(a, ActionType::Dodge, &[], json!({})),
        codes::INITIATIVE_PENDING
    );
    assert_eq!(t.err(t.dm, Command::EndTurn {}), codes::INITIATIVE_PENDING);
    let roll = |c, r: Option<u32>| Command::InitiativeRoll {
        character_id: c,
        roll: r,
        modifiers: BTreeMap::new(),
    };
    assert_eq!(
        t.err(t.players[1], roll(a, Some(10))),
        codes::NOT_YOUR_CHARACTER
    );
    assert_eq!(t.err(t.players[0], roll(a, Some(21))), codes::INVALID_DICE);
    assert_eq!(t.err(t.players[0], roll(a, Some(0))), codes::INVALID_DICE);
    let bonus = Command::InitiativeRoll {
        character_id: a,
        roll: Some(10),
        modifiers: BTreeMap::from([("dex".to_string(), 5)]),
    };
    assert_eq!(t.err(t.players[0], bonus), codes::INVALID_PAYLOAD);
    let e = t.ok(t.players[0], roll(a, Some(17)));
    let Event::InitiativeRoll(i) = &e[0] else {
        panic!()
    };
    assert_eq!((i.roll, i.d20, i.rolls[0].client), (19, 17, true));
    assert_eq!(t.err(t.players[0], roll(a, Some(3))), codes::ALREADY_ROLLED);
    // Without a reported roll the server rolls; the DM can roll for anyone.
    t.ok(t.players[1], roll(b, None));
    let e = t.ok(t.dm, roll(c, None));
    assert_eq!(kinds(&e), vec!["initiative_roll", "turn_change"]);
    assert_eq!(t.s.game.combat.as_ref().unwrap().round, 1);
    // A goblin is not a participant of a second roll, and a stranger id is unknown.
    assert_eq!(
        t.err(t.dm, roll(Uuid::from_u128(77), None)),
        codes::UNKNOWN_CHARACTER
    );
}

#[test]
fn client_rolls_are_refused_by_default() {
    let mut t = Table::new();
    let [a, ..] = t.pcs;
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![t.goblins[0]],
            surprised: vec![],
        },
    );
    t.ok(
        t.dm,
        Command::CombatAdd {
            participants: vec![a],
        },
    );
    let cmd = Command::InitiativeRoll {
        character_id: a,
        roll: Some(20),
        modifiers: BTreeMap::new(),
    };
    // `a` was rolled by the server on joining; a fresh one would be client_rolls_disabled.
    assert_eq!(t.err(t.players[0], cmd), codes::ALREADY_ROLLED);
    let mut t = Table::with_settings(json!({"allow_client_rolls": false}));
    let b = t.pcs[1];
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![t.goblins[0]],
            surprised: vec![],
        },
    );
    // Not a participant.
    let cmd = Command::InitiativeRoll {
        character_id: b,
        roll: Some(20),
        modifiers: BTreeMap::new(),
    };
    assert_eq!(t.err(t.players[1], cmd), codes::NOT_A_PARTICIPANT);
}

#[test]
fn client_rolls_disabled_code() {
    let mut t = Table::with_settings(json!({"allow_client_rolls": true}));
    let a = t.pcs[0];
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![a, t.goblins[0]],
            surprised: vec![],
        },
    );
    // Flip the setting off in the state to reach the check (settings are fixed at creation).
    t.s.game.allow_client_rolls = false;
    let cmd = Command::InitiativeRoll {
        character_id: a,
        roll: Some(20),
        modifiers: BTreeMap::new(),
    };
    assert_eq!(t.err(t.players[0], cmd), codes::CLIENT_ROLLS_DISABLED);
}

#[test]
fn combat_add_joins_the_order() {
    let mut t = Table::new();
    let [a, b, c] = t.pcs;
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![a, b],
            surprised: vec![],
        },
    );
    let active = t.active();
    assert_eq!(
        t.err(
            t.dm,
            Command::CombatAdd {
                participants: vec![a]
            }
        ),
        codes::INVALID_TARGET
    );
    assert_eq!(
        t.err(
            t.players[0],
            Command::CombatAdd {
                participants: vec![c]
            }
        ),
        codes::FORBIDDEN_FOR_ROLE
    );
    let e = t.ok(
        t.dm,
        Command::CombatAdd {
            participants: vec![c, t.goblins[0]],
        },
    );
    assert_eq!(
        kinds(&e),
        vec!["combat_joined", "initiative_roll", "initiative_roll"]
    );
    let combat = t.s.game.combat.as_ref().unwrap();
    assert_eq!(combat.order.len(), 4);
    // The active creature keeps its turn; turn_number follows its new position.
    assert_eq!(combat.turn.as_ref().unwrap().character_id, active);
    assert_eq!(combat.order[combat.turn_number as usize - 1], active);
}

#[test]
fn action_economy_table() {
    let mut t = Table::new();
    let [a, b, _] = t.pcs;
    let g = t.goblins[0];
    let all = t.all();
    t.place(g, 1, 0);
    t.combat(&all, a);
    let other = json!({"name": "shove"});
    let bonus = json!({"cost": "bonus_action"});
    let reaction =
        json!({"cost": "reaction", "attack_bonus": 0, "damage": "1", "damage_type": "piercing"});
    t.ch_mut(g).max_hp = 100;
    t.ch_mut(g).hp = 100;
    // Aria has two attacks per Attack action.
    t.resolve(a, ActionType::Attack, &[g], sword());
    t.resolve(a, ActionType::Attack, &[g], sword());
    let g2 = t.goblins[1];
    t.place(g2, 1, 1);
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[g2], sword()),
        codes::NO_ACTION_LEFT
    );
    assert_eq!(
        t.act_err(a, ActionType::Other, &[], other.clone()),
        codes::NO_ACTION_LEFT
    );
    t.resolve(a, ActionType::Other, &[], bonus.clone());
    assert_eq!(
        t.act_err(a, ActionType::Other, &[], bonus.clone()),
        codes::NO_BONUS_ACTION_LEFT
    );
    // Off-turn: only reactions, once per round.
    assert_eq!(
        t.act_err(b, ActionType::Other, &[], other.clone()),
        codes::NOT_YOUR_TURN
    );
    t.resolve(b, ActionType::Attack, &[g2], reaction.clone());
    assert_eq!(
        t.act_err(b, ActionType::Attack, &[g2], reaction.clone()),
        codes::NO_REACTION_LEFT
    );
    assert_eq!(
        t.act_err(b, ActionType::Dodge, &[], json!({"cost": "reaction"})),
        codes::INVALID_PAYLOAD
    );
    // Not your character; observers; non-participants.
    assert_eq!(
        t.err(t.players[1], action(a, ActionType::Other, &[], json!({}))),
        codes::NOT_YOUR_CHARACTER
    );
    assert_eq!(
        t.err(t.observer, action(a, ActionType::Other, &[], json!({}))),
        codes::FORBIDDEN_FOR_ROLE
    );
    assert!(t.s.game.combat.as_ref().unwrap().participants[&b].reaction_used);
}

#[test]
fn reaction_returns_at_start_of_own_turn() {
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
    let (first, second) = (order[0], order[1]);
    t.s.game
        .combat
        .as_mut()
        .unwrap()
        .participants
        .get_mut(&second)
        .unwrap()
        .reaction_used = true;
    t.ok(t.owner(first), Command::EndTurn {});
    assert!(!t.s.game.combat.as_ref().unwrap().participants[&second].reaction_used);
}

#[test]
fn non_participants_cannot_act() {
    let mut t = Table::new();
    let [a, b, _] = t.pcs;
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![a, t.goblins[0]],
            surprised: vec![],
        },
    );
    t.set_turn(a);
    assert_eq!(
        t.act_err(b, ActionType::Dodge, &[], json!({})),
        codes::NOT_A_PARTICIPANT
    );
}

#[test]
fn dash_disengage_dodge() {
    let mut t = Table::new();
    let [a, ..] = t.pcs;
    let all = t.all();
    t.combat(&all, a);
    t.resolve(a, ActionType::Dash, &[], json!({}));
    let turn = t.s.game.combat.as_ref().unwrap().turn.clone().unwrap();
    assert_eq!(turn.movement_left(30), 60);
    assert_eq!(
        t.act_err(
            a,
            ActionType::Dash,
            &[t.goblins[0]],
            json!({"cost": "bonus_action"})
        ),
        codes::INVALID_TARGET
    );
    t.resolve(
        a,
        ActionType::Disengage,
        &[],
        json!({"cost": "bonus_action"}),
    );
    assert!(
        t.s.game
            .combat
            .as_ref()
            .unwrap()
            .turn
            .as_ref()
            .unwrap()
            .disengaged
    );
    // Dodge lasts until the start of Aria's next turn.
    t.set_turn(a);
    t.resolve(a, ActionType::Dodge, &[], json!({}));
    assert!(t.ch(a).has(Condition::Dodging));
    let order = t.s.game.combat.as_ref().unwrap().order.clone();
    for _ in 0..order.len() {
        assert!(t.ch(a).has(Condition::Dodging));
        let active = t.active();
        t.ok(t.owner(active), Command::EndTurn {});
    }
    assert!(!t.ch(a).has(Condition::Dodging));
    assert!(t.s.game.effects.is_empty());
}

#[test]
fn combat_summary_for_redis() {
    let mut t = Table::new();
    let all = t.all();
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    let m = t.s.game.combat_summary().unwrap();
    assert_eq!(m["round"], "1");
    assert_eq!(m["turn"], "1");
    let order: serde_json::Value = serde_json::from_str(&m["initiative_order"]).unwrap();
    assert_eq!(order.as_array().unwrap().len(), 5);
    assert!(order[0]["initiative"].is_i64() && order[0]["name"].is_string());
    let effects: serde_json::Value = serde_json::from_str(&m["active_effects"]).unwrap();
    assert_eq!(effects, json!([]));
    assert_eq!(
        m["active_character"],
        order[0]["character_id"].as_str().unwrap()
    );
}
