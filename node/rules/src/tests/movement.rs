//! Movement on the grid and opportunity attacks.

use super::harness::*;
use crate::character::Pos;
use crate::command::{ActionType, Command};
use crate::conditions::Condition;
use crate::error::codes;
use crate::event::Event;
use serde_json::json;
use uuid::Uuid;

fn mv(c: Uuid, x: i32, y: i32) -> Command {
    Command::Move {
        character_id: c,
        to: Pos { x, y },
        path: vec![],
    }
}

#[test]
fn movement_budget_table() {
    let mut t = Table::new();
    let a = t.pcs[0];
    let all = t.all();
    t.combat(&all, a);
    // Aria (speed 30) from (0,0); a diagonal step is 5 ft: max(|dx|,|dy|) × 5.
    let e = t.ok(t.players[0], mv(a, 3, -2));
    let Event::CharacterMoved(m) = &e[0] else {
        panic!()
    };
    assert_eq!((m.distance, m.cost, m.movement_left), (15, 15, Some(15)));
    assert_eq!(t.err(t.players[0], mv(a, 3, -6)), codes::MOVEMENT_EXCEEDED);
    t.ok(t.players[0], mv(a, 3, -5));
    assert_eq!(t.err(t.players[0], mv(a, 3, -4)), codes::MOVEMENT_EXCEEDED);
    // Dash: another 30 ft.
    t.resolve(a, ActionType::Dash, &[], json!({}));
    t.ok(t.players[0], mv(a, 3, 1));
    assert_eq!(t.err(t.players[0], mv(a, 3, 2)), codes::MOVEMENT_EXCEEDED);
}

#[test]
fn movement_errors() {
    let mut t = Table::new();
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    let all = t.all();
    t.combat(&all, a);
    assert_eq!(t.err(t.players[1], mv(b, 1, 2)), codes::NOT_YOUR_TURN);
    assert_eq!(t.err(t.players[1], mv(a, 1, 0)), codes::NOT_YOUR_CHARACTER);
    assert_eq!(t.err(t.observer, mv(a, 1, 0)), codes::FORBIDDEN_FOR_ROLE);
    assert_eq!(t.err(t.players[0], mv(a, 0, 0)), codes::INVALID_PAYLOAD);
    assert_eq!(t.err(t.players[0], mv(a, 0, 2)), codes::SQUARE_OCCUPIED);
    assert_eq!(
        t.err(t.players[0], mv(a, 99_999, 0)),
        codes::INVALID_PAYLOAD
    );
    // Off the grid: the DM places it first.
    let ghost = Uuid::from_u128(0x6057);
    t.ok(
        t.dm,
        Command::SpawnCharacter {
            character_id: Some(ghost),
            sheet: json!({"max_hp": 5, "ac": 10}),
        },
    );
    assert_eq!(t.err(t.dm, mv(ghost, 1, 1)), codes::NOT_ON_MAP);
    t.place(ghost, 2, 2);
    // A creature not in the combat moves freely, even during it.
    t.ok(t.dm, mv(ghost, 20, 20));
    // Dead creatures do not block a square.
    t.ok(
        t.dm,
        Command::CharacterUpdate {
            character_id: g,
            changes: crate::character::CharacterChanges {
                hp: Some(0),
                ..Default::default()
            },
        },
    );
    t.ok(t.players[0], mv(a, 5, 0));
    let at = Pos { x: 6, y: 0 };
    assert_eq!(t.ch(g).position, Some(at));
    t.ok(t.players[0], mv(a, 6, 0));
}

#[test]
fn free_movement_out_of_combat() {
    let mut t = Table::new();
    let a = t.pcs[0];
    let e = t.ok(t.players[0], mv(a, 40, 0));
    let Event::CharacterMoved(m) = &e[0] else {
        panic!()
    };
    assert_eq!((m.distance, m.movement_left), (200, None));
    assert_eq!(t.err(t.players[1], mv(a, 41, 0)), codes::NOT_YOUR_CHARACTER);
    t.ok(t.dm, mv(a, 41, 0));
}

#[test]
fn leaving_reach_provokes_opportunity_attacks() {
    // (goblin setup, Aria's move, reactors expected)
    let cases: Vec<(&str, (i32, i32), bool)> = vec![
        ("adjacent", (-1, 0), true),
        ("adjacent", (0, 1), false), // still within 5 ft of (1,0)
        ("disengaged", (-1, 0), false),
        ("reaction_spent", (-1, 0), false),
        ("incapacitated", (-1, 0), false),
        ("ally", (-1, 0), false),
    ];
    for (setup, (x, y), provokes) in cases {
        let mut t = Table::new();
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.place(g, 1, 0);
        let all = t.all();
        t.combat(&all, a);
        match setup {
            "disengaged" => {
                t.resolve(a, ActionType::Disengage, &[], json!({}));
            }
            "reaction_spent" => {
                t.s.game
                    .combat
                    .as_mut()
                    .unwrap()
                    .participants
                    .get_mut(&g)
                    .unwrap()
                    .reaction_used = true;
            }
            "incapacitated" => {
                t.ok(
                    t.dm,
                    Command::ApplyCondition {
                        character_id: g,
                        condition: Condition::Stunned,
                        duration: None,
                        source: None,
                        save_ends: None,
                    },
                );
            }
            "ally" => t.ch_mut(g).side = "party".into(),
            _ => {}
        }
        let e = t.ok(t.players[0], mv(a, x, y));
        let reactors = e.iter().find_map(|e| match e {
            Event::OpportunityAttack(o) => Some(o.reactors.clone()),
            _ => None,
        });
        assert_eq!(reactors.is_some(), provokes, "{setup} → ({x},{y})");
        if provokes {
            assert_eq!(reactors.unwrap(), vec![g]);
            // The move paused before the step out of reach: Aria is still within the
            // goblin's reach, so its opportunity attack (its reaction) is in range.
            assert_eq!(t.ch(a).position, Some(Pos { x: 0, y: 0 }));
            let d = json!({"cost": "reaction", "attack_bonus": 4, "damage": "1d6+2", "damage_type": "slashing"});
            let e = t.act(g, ActionType::Attack, &[a], d.clone()).unwrap();
            // Then the move goes on.
            let Some(Event::CharacterMoved(m)) = e.last() else {
                panic!("{e:?}")
            };
            assert_eq!(m.to, Pos { x, y });
            assert_eq!(
                t.act_err(g, ActionType::Attack, &[a], d),
                codes::NO_REACTION_LEFT
            );
        }
    }
}

#[test]
fn place_character_is_for_the_dm() {
    let mut t = Table::new();
    let (a, b) = (t.pcs[0], t.pcs[1]);
    let place = |c, x, y| Command::PlaceCharacter {
        character_id: c,
        position: Pos { x, y },
    };
    assert_eq!(
        t.err(t.players[0], place(a, 3, 3)),
        codes::FORBIDDEN_FOR_ROLE
    );
    assert_eq!(t.err(t.dm, place(a, 0, 2)), codes::SQUARE_OCCUPIED);
    let e = t.ok(t.dm, place(b, 3, 3));
    let Event::CharacterPlaced(p) = &e[0] else {
        panic!()
    };
    assert_eq!(
        (p.from, p.position),
        (Some(Pos { x: 0, y: 2 }), Pos { x: 3, y: 3 })
    );
}

/// Found by fuzzing: `i32::MIN.abs()` overflowed in the bounds check, so a move (or a
/// placement) to y = -2147483648 passed it and planned a walk of 2^31 squares (a node
/// out of memory in release builds, a panic in debug builds).
#[test]
fn coordinates_at_i32_min_are_out_of_bounds() {
    let mut t = Table::new();
    let a = t.pcs[0];
    let p = t.players[0];
    for (x, y) in [
        (0, i32::MIN),
        (i32::MIN, 0),
        (i32::MIN, i32::MIN),
        (12, i32::MAX),
    ] {
        assert_eq!(t.err(p, mv(a, x, y)), codes::INVALID_PAYLOAD, "{x} {y}");
        let place = Command::PlaceCharacter {
            character_id: a,
            position: Pos { x, y },
        };
        assert_eq!(t.err(t.dm, place), codes::INVALID_PAYLOAD, "{x} {y}");
    }
    assert!(!Pos { x: 0, y: i32::MIN }.in_bounds());
    assert!(Pos {
        x: -10_000,
        y: 10_000
    }
    .in_bounds());
}
