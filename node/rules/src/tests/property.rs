//! The replay property. A table (a DM, three players with characters, two monsters,
//! an observer) receives random command sequences — valid and invalid, from the right
//! and the wrong users, including rollbacks and hub syncs, and every rule of issue 15:
//! paths, paused moves and their answers (reactions, `reaction_decline`), terrain,
//! surprise, save ends, exhaustion and save traits, Help/Hide/Ready, cover, dice with
//! several terms, minute durations. Then:
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
use crate::character::{Ability, CharacterChanges, Pos, SaveTag};
use crate::command::{ActionType, Command, Ctx, DurationSpec, Named, SaveEndsSpec, TurnOf};
use crate::conditions::{Boundary, Condition};
use crate::event::Event;
use crate::state::SessionState;
use crate::terrain::{Cover, TerrainSquare};
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

/// Kinds of op (see `step`).
const KINDS: u8 = 36;

fn op() -> impl Strategy<Value = Op> {
    (
        0u8..KINDS,
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u16>(),
    )
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
    let mut d = match n % 9 {
        0 => sword(),
        1 => {
            json!({"attack_bonus": 4, "damage": "1d6+2", "damage_type": "piercing", "range": {"normal": 30, "long": 120}})
        }
        2 => json!({"attack_bonus": 5, "damage": "1d10", "damage_type": "piercing", "reach": 10}),
        3 => json!({"attack_bonus": 5, "damage": "2d7", "damage_type": "fire"}),
        4 => {
            json!({"attack_bonus": 9, "damage": "30", "damage_type": "force", "extra_damage": [{"dice": "1d4", "type": "cold"}]})
        }
        5 => {
            json!({"damage": "1d4", "damage_type": "bludgeoning", "conditions": [{"condition": "grappled"}]})
        }
        6 => {
            json!({"damage": "1d6+1d4", "damage_type": "slashing", "range": {"normal": 20, "long": 60},
            "thrown": true, "finesse": n % 2 == 0, "attack_dice": "1d4", "cover": "half"})
        }
        7 => json!({"attack_bonus": 3, "damage": "4d6kh3", "damage_type": "cold",
            "conditions": [{"condition": "restrained", "save_ends": {"ability": "str", "dc": 12}}]}),
        _ => {
            json!({"attack_bonus": 2, "damage": "1d8", "damage_type": "piercing", "readied": true})
        }
    };
    d["cost"] = json!(["action", "bonus_action", "reaction", "action"][(n / 7 % 4) as usize]);
    d
}

fn save_details(n: u16) -> Value {
    match n % 6 {
        0 => {
            json!({"save": {"ability": "dex", "dc": 13, "half_on_success": true}, "damage": "3d6", "damage_type": "fire"})
        }
        1 => json!({"name": "hold", "save": {"ability": "wis", "dc": 12},
            "conditions": [{"condition": "paralyzed", "duration": {"rounds": 2, "ends": "end", "of": "target"}}],
            "concentration": true}),
        2 => {
            json!({"save": {"ability": "str", "dc": 11}, "conditions": [{"condition": "prone"}], "range": 30})
        }
        3 => json!({"save": {"ability": "con", "dc": 50}}),
        4 => json!({"name": "hold", "save": {"ability": "wis", "dc": 14}, "magical": true,
            "conditions": [{"condition": "paralyzed", "save_ends": true,
                            "duration": {"minutes": 1, "of": "target"}}], "concentration": n % 3 == 0}),
        _ => {
            json!({"save": {"ability": "dex", "dc": 12, "half_on_success": true}, "cover": "three_quarters",
            "damage": "2d6", "damage_type": "fire", "extra_damage": [{"dice": "1d6+1d4", "type": "cold"}]})
        }
    }
}

/// Help, Hide, Ready and the release of a readied action.
fn tactic(actor: Uuid, target: Uuid, other: Uuid, n: u16) -> Command {
    match n % 5 {
        0 => action(
            actor,
            ActionType::Help,
            &[target],
            json!({"against": other}),
        ),
        1 => action(
            actor,
            ActionType::Help,
            &[target],
            json!({"cost": "bonus_action"}),
        ),
        2 => action(
            actor,
            ActionType::Hide,
            &[],
            json!({"dc": 5 + n % 15, "cost": if n % 2 == 0 { "action" } else { "bonus_action" }}),
        ),
        3 => action(
            actor,
            ActionType::Ready,
            &[],
            json!({"action": (["attack", "save", "heal", "other"][(n / 5 % 4) as usize]),
            "trigger": "it moves", "spell": n % 3 == 0, "name": "held"}),
        ),
        _ => {
            let kind = [ActionType::Attack, ActionType::Other][(n / 5 % 2) as usize];
            let targets: &[Uuid] = if kind == ActionType::Attack {
                &[target]
            } else {
                &[]
            };
            action(
                actor,
                kind,
                targets,
                json!({"cost": "reaction", "readied": true, "damage": "1d6", "damage_type": "fire"}),
            )
        }
    }
}

/// A walk of 1 to 6 steps from `from` (sometimes through others' squares).
fn path(from: Pos, n: u16) -> (Vec<Pos>, Pos) {
    let steps = 1 + (n % 6) as usize;
    let mut at = from;
    let mut squares = vec![];
    for i in 0..steps {
        let d = (n >> (3 + i * 2)) % 8;
        let (dx, dy) = [
            (1, 0),
            (1, 1),
            (0, 1),
            (-1, 1),
            (-1, 0),
            (-1, -1),
            (0, -1),
            (1, -1),
        ][d as usize];
        at = Pos {
            x: at.x + dx,
            y: at.y + dy,
        };
        squares.push(at);
    }
    let to = squares.pop().expect("at least one step");
    (squares, to)
}

fn terrain(n: u16) -> Command {
    let squares = (0..(n % 4))
        .map(|i| TerrainSquare {
            x: ((n >> (2 + i)) % 7) as i32 - 2,
            y: ((n >> (5 + i)) % 5) as i32 - 2 + i as i32 * 5,
            difficult: (n >> i) % 2 == 0,
            cover: [Cover::None, Cover::Half, Cover::ThreeQuarters][((n >> (8 + i)) % 3) as usize],
        })
        .collect();
    Command::TerrainSet {
        squares,
        clear: n % 11 == 0,
    }
}

fn step(t: &Table, op: &Op, actor: Uuid, target: Uuid, other: Uuid) -> Step {
    let n = op.n;
    let pos = t.ch(actor).position.unwrap_or(Pos { x: 0, y: 0 });
    match op.kind {
        28 => {
            let (path, to) = path(pos, n);
            Step::Cmd(Command::Move {
                character_id: actor,
                to,
                path: if n % 5 == 0 { vec![] } else { path },
            })
        }
        // Next to the nearest hostile creature (to provoke when leaving it later).
        29 => {
            let me = t.ch(actor);
            let hostile =
                t.s.game
                    .characters
                    .values()
                    .filter(|c| c.side != me.side && !c.is_dead());
            let at = hostile
                .filter_map(|c| c.position)
                .min_by_key(|p| (p.distance(pos), p.x, p.y))
                .unwrap_or(pos);
            let (dx, dy) = [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1)][(n % 6) as usize];
            Step::Cmd(Command::Move {
                character_id: actor,
                to: Pos {
                    x: at.x + dx,
                    y: at.y + dy,
                },
                path: vec![],
            })
        }
        30 => Step::Cmd(Command::ReactionDecline {
            character_id: actor,
        }),
        31 => Step::Dm(terrain(n)),
        32 | 33 => Step::Cmd(tactic(actor, target, other, n)),
        34 => Step::Dm(Command::ApplyCondition {
            character_id: target,
            condition: Condition::ALL[(n % 16) as usize],
            duration: (n % 3 == 0).then_some(DurationSpec {
                rounds: 0,
                minutes: Some(1 + (n / 3 % 2) as u32),
                ends: Boundary::End,
                of: TurnOf::default(),
            }),
            source: (n % 2 == 0).then_some(actor),
            save_ends: Some(SaveEndsSpec::Save {
                ability: [Ability::Str, Ability::Dex, Ability::Wis][(n / 7 % 3) as usize],
                dc: 8 + (n % 10) as i32,
            }),
        }),
        35 => match n % 3 {
            0 => Step::Dm(Command::CombatStart {
                participants: t
                    .s
                    .game
                    .characters
                    .values()
                    .filter(|c| !c.is_dead())
                    .map(|c| c.id)
                    .collect(),
                surprised: vec![actor, target],
            }),
            1 => Step::Dm(Command::CharacterUpdate {
                character_id: target,
                changes: CharacterChanges {
                    exhaustion: Some((n / 3 % 7) as i64),
                    ..Default::default()
                },
            }),
            _ => Step::Dm(Command::CharacterUpdate {
                character_id: target,
                changes: CharacterChanges {
                    save_advantages: Some([SaveTag::Magic, SaveTag::Concentration].into()),
                    save_disadvantages: Some([SaveTag::Dex].into()),
                    ..Default::default()
                },
            }),
        },
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
        // ...or, while a move is paused, with a creature it waits for.
        if let Some(r) = t.s.game.waiting_reactors().first() {
            if op.a % 3 != 0 {
                actor = *r;
            }
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
        // The text form the node stores is the same JSON.
        let text: serde_json::Value = serde_json::from_str(&e.data_json()).unwrap();
        prop_assert_eq!(&text, &d, "data_json differs from to_parts");
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
    let ops: Vec<Op> = (0..1500u32)
        .map(|i| {
            let x = crate::dice::draw(99, u64::from(i));
            Op {
                kind: (x % u64::from(KINDS)) as u8,
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
        "terrain_changed",
        "repeat_save",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
}

/// A fixed run that stays in combat and moves a lot (no pauses of the session, few
/// ends of combat), so that moves pause for opportunity attacks and are answered by
/// reactions and declines; the replay property holds through all of it.
#[test]
fn a_fixed_run_of_paused_moves_replays() {
    // Start combat, approach hostiles, walk off, react, decline, act, end turns.
    const MIX: &[u8] = &[
        24, 29, 29, 28, 28, 28, 30, 30, 2, 3, 4, 0, 1, 31, 32, 33, 34,
    ];
    let ops: Vec<Op> = (0..1500u32)
        .map(|i| {
            let x = crate::dice::draw(7, u64::from(i));
            Op {
                kind: MIX[(x % MIX.len() as u64) as usize],
                who: (x >> 8) as u8 | 1,
                a: (x >> 16) as u8,
                b: (x >> 24) as u8,
                n: (x >> 32) as u16,
            }
        })
        .collect();
    let (kinds, _) = run(11, &ops).unwrap();
    for k in [
        "opportunity_attack",
        "reaction_declined",
        "character_moved",
        "action_resolve",
        "terrain_changed",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    // Some pause was answered by a reaction that let the move go on.
    let resumed = kinds
        .windows(3)
        .any(|w| w == ["action_declare", "action_resolve", "character_moved"]);
    assert!(resumed, "no move resumed after an opportunity attack");
}
