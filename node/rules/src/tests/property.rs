//! The replay property. A table (a DM, three players with characters, two monsters,
//! an observer) receives random command sequences — valid and invalid, from the right
//! and the wrong users, including rollbacks and hub syncs. Then:
//!
//! 1. replaying the recorded events from `SessionState::empty`, through their stored
//!    form (`to_parts`/`from_parts`), reproduces exactly the live state; so does a
//!    serde snapshot, alone or followed by the rest of the log;
//! 2. every refused command leaves the state exactly as it was.
//!
//! The runner is seeded and bounded, so the run is deterministic and quick.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use super::harness::*;
use crate::character::{CharacterChanges, Pos};
use crate::command::{ActionType, Command, Ctx, DurationSpec, Named, TurnOf};
use crate::conditions::{Boundary, Condition};
use crate::event::Event;
use crate::state::SessionState;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Op {
    kind: u8,
    who: u8,
    a: u8,
    b: u8,
    n: u16,
}

fn op() -> impl Strategy<Value = Op> {
    (0u8..28, any::<u8>(), any::<u8>(), any::<u8>(), any::<u16>())
        .prop_map(|(kind, who, a, b, n)| Op { kind, who, a, b, n })
}

/// What to run: a command as some user, a hub sync, or a rollback.
enum Step {
    Cmd(Command),
    /// A DM-only command: sent by the DM unless the op picks a random user.
    Dm(Command),
    Sync(Command),
    Rollback(u64),
}

fn attack_details(n: u16) -> Value {
    let mut d = match n % 6 {
        0 => sword(),
        1 => {
            json!({"attack_bonus": 4, "damage": "1d6+2", "damage_type": "piercing", "range": {"normal": 30, "long": 120}})
        }
        2 => json!({"attack_bonus": 5, "damage": "1d10", "damage_type": "piercing", "reach": 10}),
        3 => json!({"attack_bonus": 5, "damage": "2d7", "damage_type": "fire"}),
        4 => {
            json!({"attack_bonus": 9, "damage": "30", "damage_type": "force", "extra_damage": [{"dice": "1d4", "type": "cold"}]})
        }
        _ => {
            json!({"damage": "1d4", "damage_type": "bludgeoning", "conditions": [{"condition": "grappled"}]})
        }
    };
    d["cost"] = json!(["action", "bonus_action", "reaction", "action"][(n / 7 % 4) as usize]);
    d
}

fn save_details(n: u16) -> Value {
    match n % 4 {
        0 => {
            json!({"save": {"ability": "dex", "dc": 13, "half_on_success": true}, "damage": "3d6", "damage_type": "fire"})
        }
        1 => json!({"name": "hold", "save": {"ability": "wis", "dc": 12},
            "conditions": [{"condition": "paralyzed", "duration": {"rounds": 2, "ends": "end", "of": "target"}}],
            "concentration": true}),
        2 => {
            json!({"save": {"ability": "str", "dc": 11}, "conditions": [{"condition": "prone"}], "range": 30})
        }
        _ => json!({"save": {"ability": "con", "dc": 50}}),
    }
}

fn step(t: &Table, op: &Op, actor: Uuid, target: Uuid, other: Uuid) -> Step {
    let n = op.n;
    let pos = t.ch(actor).position.unwrap_or(Pos { x: 0, y: 0 });
    match op.kind {
        0 | 1 => Step::Cmd(Command::EndTurn {}),
        2..=4 => Step::Cmd(action(
            actor,
            ActionType::Attack,
            &[target],
            attack_details(n),
        )),
        5 => Step::Cmd(action(
            actor,
            ActionType::Save,
            &[target, other],
            save_details(n),
        )),
        6 => Step::Cmd(action(
            actor,
            ActionType::Heal,
            &[target],
            json!({"amount": "1d8+2", "temporary": n % 3 == 0, "cost": if n % 2 == 0 { "bonus_action" } else { "action" }}),
        )),
        7 => {
            let kind = [
                ActionType::Dash,
                ActionType::Disengage,
                ActionType::Dodge,
                ActionType::Other,
            ][(n % 4) as usize];
            Step::Cmd(action(actor, kind, &[], json!({})))
        }
        8 | 9 => {
            let (dx, dy) = ((n % 7) as i32 - 3, (n / 7 % 7) as i32 - 3);
            Step::Cmd(Command::Move {
                character_id: actor,
                to: Pos {
                    x: pos.x + dx,
                    y: pos.y + dy,
                },
                path: vec![],
            })
        }
        10 => Step::Cmd(Command::StandUp {
            character_id: actor,
        }),
        11 => {
            let condition = Condition::ALL[(n % 16) as usize];
            let duration = (n / 16 % 2 == 0).then_some(DurationSpec {
                rounds: 1 + (n / 32 % 3) as u32,
                ends: if n % 2 == 0 {
                    Boundary::Start
                } else {
                    Boundary::End
                },
                of: if n % 3 == 0 {
                    TurnOf::Named(Named::Actor)
                } else {
                    TurnOf::Character(other)
                },
                minutes: None,
            });
            Step::Dm(Command::ApplyCondition {
                character_id: target,
                condition,
                duration,
                source: (n % 5 == 0).then_some(actor),
                save_ends: None,
            })
        }
        12 => Step::Dm(Command::RemoveCondition {
            character_id: target,
            condition: Condition::ALL[(n % 16) as usize],
        }),
        13 => Step::Cmd(Command::EndConcentration {
            character_id: actor,
        }),
        // Combat is where most rules live: start it often, with everyone or a few.
        24..=27 => Step::Dm(Command::CombatStart {
            participants: t
                .s
                .game
                .characters
                .values()
                .filter(|c| !c.is_dead())
                .map(|c| c.id)
                .collect(),
            surprised: vec![],
        }),
        14 => {
            let mut ids: Vec<Uuid> =
                t.s.game
                    .characters
                    .keys()
                    .enumerate()
                    .filter(|(i, _)| n & (1 << (i % 16)) != 0)
                    .map(|(_, id)| *id)
                    .collect();
            if ids.is_empty() {
                ids.push(actor);
            }
            Step::Dm(Command::CombatStart {
                participants: ids,
                surprised: vec![],
            })
        }
        15 => Step::Dm(Command::CombatEnd {}),
        16 => Step::Dm(Command::CombatAdd {
            participants: vec![actor],
        }),
        17 => Step::Cmd(Command::InitiativeRoll {
            character_id: actor,
            roll: (n % 3 == 0).then_some((n % 22) as u32),
            modifiers: Default::default(),
        }),
        18 => Step::Dm(Command::CharacterUpdate {
            character_id: target,
            changes: CharacterChanges {
                hp: (n % 2 == 0).then_some((n % 40) as i64),
                conditions_add: if n % 3 == 0 {
                    vec![Condition::ALL[(n / 3 % 16) as usize]]
                } else {
                    vec![]
                },
                conditions_remove: if n % 5 == 0 {
                    vec![Condition::ALL[(n / 5 % 15) as usize]]
                } else {
                    vec![]
                },
                ..Default::default()
            },
        }),
        19 => Step::Sync(Command::CharacterSync {
            character_id: target,
            changes: CharacterChanges {
                hp: Some((n % 30) as i64),
                ac: (n % 4 == 0).then_some((10 + n % 10) as i64),
                ..Default::default()
            },
        }),
        20 => Step::Dm(match n % 400 {
            0 => Command::SessionEnd {},
            1..=99 => Command::SessionPause {},
            _ => Command::SessionResume {},
        }),
        21 => Step::Cmd(
            Command::from_client(
                "state_update",
                json!({"changes": [{"path": format!("/k{}", n % 4), "value": n}]}),
            )
            .unwrap(),
        ),
        22 if n % 3 == 0 => Step::Rollback(u64::from(n / 3) % (t.s.version + 2)),
        22 => Step::Cmd(Command::EndTurn {}),
        23 => {
            if n % 2 == 0 {
                Step::Dm(Command::SpawnCharacter {
                    character_id: None,
                    sheet: goblin((n % 9) as i32 - 2, (n / 9 % 9) as i32 - 2),
                })
            } else {
                Step::Dm(Command::PlaceCharacter {
                    character_id: target,
                    position: Pos {
                        x: (n % 9) as i32 - 2,
                        y: (n / 9 % 9) as i32 - 2,
                    },
                })
            }
        }
        _ => Step::Cmd(Command::EndTurn {}),
    }
}

/// Runs the ops; returns the kinds of the events accepted and the number refused.
fn run(seed: u64, ops: &[Op]) -> Result<(Vec<&'static str>, usize), TestCaseError> {
    let mut t =
        Table::with_settings(json!({"dice_seed": seed, "allow_client_rolls": seed % 3 == 0}));
    let stranger = Uuid::from_u128(0x5_7A);
    let users = [
        t.dm,
        t.players[0],
        t.players[1],
        t.players[2],
        t.observer,
        stranger,
    ];
    let (mut kinds, mut refused) = (vec![], 0);
    for op in ops {
        let chars: Vec<Uuid> = t.s.game.characters.keys().copied().collect();
        let pick = |i: u8| chars[i as usize % chars.len()];
        let (mut actor, mut target, other) =
            (pick(op.a), pick(op.b), pick(op.a.wrapping_add(op.b)));
        // In combat, usually act with the creature whose turn it is...
        let active =
            t.s.game
                .combat
                .as_ref()
                .and_then(|c| c.turn.as_ref())
                .map(|t| t.character_id);
        // (or, while initiative is pending, with one that has not rolled)...
        let unrolled = t.s.game.combat.as_ref().and_then(|c| {
            c.participants
                .iter()
                .find(|(_, p)| p.initiative.is_none())
                .map(|(id, _)| *id)
        });
        if let (Some(c), true) = (active.or(unrolled), op.a % 4 != 0) {
            actor = c;
        }
        // ...and usually against the nearest living creature.
        if op.b % 2 == 0 {
            if let Some(p) = t.ch(actor).position {
                let near =
                    t.s.game
                        .characters
                        .values()
                        .filter(|c| c.id != actor && !c.is_dead())
                        .filter_map(|c| Some((c.position?.distance(p), c.id)))
                        .min();
                if let Some((_, id)) = near {
                    target = id;
                }
            }
        }
        // Mostly the right user; one op in four from anyone (invalid attempts).
        let random_user = (op.who % 4 == 0).then(|| users[(op.who / 4) as usize % users.len()]);
        let before = t.s.clone();
        let result = match step(&t, op, actor, target, other) {
            Step::Cmd(c) => {
                let ctx = t.ctx(random_user.unwrap_or_else(|| t.owner(actor)));
                t.s.decide(&ctx, &c)
            }
            Step::Dm(c) => {
                let ctx = t.ctx(random_user.unwrap_or(t.dm));
                t.s.decide(&ctx, &c)
            }
            Step::Sync(c) => {
                let ctx = Ctx {
                    admin: random_user.is_none(),
                    ..t.ctx(Uuid::nil())
                };
                t.s.decide(&ctx, &c)
            }
            Step::Rollback(v) => {
                let ctx = t.ctx(random_user.unwrap_or(t.dm));
                match t.s.check_rollback(&ctx, v) {
                    Ok(()) => {
                        let past = replay(t.s.id, &t.log[..v as usize]);
                        t.s.decide_rollback(&ctx, v, &past)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(events) => {
                for e in events {
                    t.s.apply(&e);
                    kinds.push(e.kind());
                    t.log.push(e);
                }
            }
            Err(e) => {
                refused += 1;
                prop_assert!(!e.code.is_empty());
                prop_assert_eq!(&t.s, &before, "refused command changed the state: {}", e);
            }
        }
    }
    // (1) Replay through the stored form reproduces the live state.
    prop_assert_eq!(t.s.version as usize, t.log.len());
    for e in &t.log {
        let (k, d) = e.to_parts();
        prop_assert_eq!(
            &Event::from_parts(&k, d).unwrap(),
            e,
            "an event changed in storage"
        );
    }
    let replayed = replay(t.s.id, &t.log);
    prop_assert_eq!(&replayed, &t.s);
    // A snapshot round-trips, alone and followed by the rest of the log.
    let back: SessionState = serde_json::from_value(serde_json::to_value(&t.s).unwrap()).unwrap();
    prop_assert_eq!(&back, &t.s);
    let half = t.log.len() / 2;
    let snap = serde_json::to_value(replay(t.s.id, &t.log[..half])).unwrap();
    let mut resumed: SessionState = serde_json::from_value(snap).unwrap();
    for e in &t.log[half..] {
        let (k, d) = e.to_parts();
        resumed.apply(&Event::from_parts(&k, d).unwrap());
    }
    prop_assert_eq!(&resumed, &t.s);
    // The seed never leaks into what clients see.
    prop_assert!(t.s.game_view()["play"].get("seed").is_none());
    Ok((kinds, refused))
}

proptest! {
    #![proptest_config(Config {
        cases: 96,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x5E55_1011),
        ..Config::default()
    })]

    #[test]
    fn replay_reproduces_the_live_state(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..120)) {
        run(seed, &ops)?;
    }
}

/// A fixed long run that exercises most commands, so a regression in the generator's
/// reach shows up as a count, not as silence.
#[test]
fn a_long_fixed_run_accepts_and_refuses_plenty() {
    let ops: Vec<Op> = (0..400u32)
        .map(|i| {
            let x = crate::dice::draw(99, u64::from(i));
            Op {
                kind: (x % 28) as u8,
                who: (x >> 8) as u8,
                a: (x >> 16) as u8,
                b: (x >> 24) as u8,
                n: (x >> 32) as u16,
            }
        })
        .collect();
    let (kinds, refused) = run(43, &ops).unwrap();
    assert!(refused > 50, "only {refused} refused");
    for k in [
        "action_declare",
        "action_resolve",
        "turn_change",
        "character_moved",
        "condition_applied",
        "state_restored",
        "character_updated",
        "combat_started",
        "combat_ended",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
}
