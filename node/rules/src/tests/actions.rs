//! Attacks, saving throws, damage, healing, death and concentration.

use super::harness::*;
use crate::character::{CharacterChanges, DamageType};
use crate::command::{ActionType, Command};
use crate::conditions::Condition;
use crate::dice::Mode;
use crate::error::codes;
use crate::event::Event;
use serde_json::json;

/// A table in combat on Aria's turn, with goblin 0 adjacent to her.
fn melee() -> Table {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    let all = t.all();
    t.combat(&all, a);
    t
}

#[test]
fn attack_roll_table() {
    // (kept d20, attack bonus, target AC) → (hit, critical)
    let rows = [
        (1, 30, 10, false, false), // a natural 1 always misses
        (20, -5, 40, true, true),  // a natural 20 always hits, critically
        (10, 5, 15, true, false),  // meeting the AC hits
        (9, 5, 15, false, false),  // below misses
        (19, 5, 25, false, false), // 19 is not special
    ];
    for (face, bonus, ac, hit, crit) in rows {
        let mut t = melee();
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.ch_mut(g).ac = ac;
        t.ch_mut(g).max_hp = 100;
        t.ch_mut(g).hp = 100;
        t.rig(&[(20, face), (8, 5), (8, 6)]);
        let details = json!({"attack_bonus": bonus, "damage": "1d8+3", "damage_type": "slashing"});
        let r = t.resolve(a, ActionType::Attack, &[g], details);
        let o = outcome(&r, g);
        let atk = o.attack.clone().unwrap();
        assert_eq!(
            (atk.d20, atk.total, atk.hit, atk.critical),
            (face, face as i32 + bonus, hit, crit),
            "{face} {bonus} {ac}"
        );
        match (hit, crit) {
            (false, _) => {
                assert_eq!(o.damage.total, 0);
                assert_eq!(r.rolls.len(), 1);
            }
            // A critical hit rolls the damage dice twice: 2d8+3.
            (true, true) => {
                assert_eq!(r.rolls[1].faces, vec![5, 6]);
                assert_eq!(o.damage.total, 14);
                assert!(o.effects.contains(&"critical".to_string()));
            }
            (true, false) => {
                assert_eq!(r.rolls[1].faces, vec![5]);
                assert_eq!(o.damage.total, 8);
            }
        }
        assert_eq!(t.ch(g).hp, 100 - o.damage.total);
        assert_eq!(o.hp, t.ch(g).hp);
    }
}

#[test]
fn advantage_and_disadvantage_from_conditions_cancel() {
    let cases: Vec<(Vec<Condition>, Vec<Condition>, Mode)> = vec![
        (vec![], vec![], Mode::Normal),
        (vec![], vec![Condition::Restrained], Mode::Advantage),
        (vec![Condition::Poisoned], vec![], Mode::Disadvantage),
        (
            vec![Condition::Poisoned],
            vec![Condition::Restrained],
            Mode::Normal,
        ),
        (
            vec![Condition::Invisible],
            vec![Condition::Invisible],
            Mode::Normal,
        ),
        (
            vec![Condition::Blinded, Condition::Prone],
            vec![Condition::Stunned],
            Mode::Normal,
        ),
    ];
    for (mine, theirs, mode) in cases {
        let mut t = melee();
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.ch_mut(a).conditions.extend(mine.iter().copied());
        t.ch_mut(g).conditions.extend(theirs.iter().copied());
        let r = t.resolve(a, ActionType::Attack, &[g], sword());
        let atk = outcome(&r, g).attack.clone().unwrap();
        assert_eq!(atk.mode, mode, "{mine:?} vs {theirs:?}");
        let faces = &r.rolls[0].faces;
        assert_eq!(faces.len(), if mode == Mode::Normal { 1 } else { 2 });
        let want = match mode {
            Mode::Advantage => *faces.iter().max().unwrap(),
            Mode::Disadvantage => *faces.iter().min().unwrap(),
            Mode::Normal => faces[0],
        };
        assert_eq!(atk.d20, want);
    }
    // Declared advantage (e.g. the Help action) counts as a source.
    let mut t = melee();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    let mut d = sword();
    d["advantage"] = json!(true);
    let r = t.resolve(a, ActionType::Attack, &[g], d);
    assert_eq!(
        outcome(&r, g).attack.as_ref().unwrap().advantage,
        vec!["declared"]
    );
}

#[test]
fn paralyzed_or_unconscious_target_within_5ft_is_critical() {
    for cond in [Condition::Paralyzed, Condition::Unconscious] {
        let mut t = melee();
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.ch_mut(g).conditions.insert(cond);
        t.ch_mut(g).max_hp = 100;
        t.ch_mut(g).hp = 100;
        // Advantage: two d20s, kept 12 hits AC 15 with +5; then 2d8 for the critical.
        t.rig(&[(20, 12), (20, 3), (8, 1), (8, 2)]);
        let r = t.resolve(a, ActionType::Attack, &[g], sword());
        let atk = outcome(&r, g).attack.clone().unwrap();
        assert!(atk.hit && atk.critical, "{cond:?}");
        assert_eq!(outcome(&r, g).damage.total, 6);
        // From range it is not critical.
        let mut t = melee();
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.place(g, 4, 0);
        t.ch_mut(g).conditions.insert(cond);
        t.ch_mut(g).max_hp = 100;
        t.ch_mut(g).hp = 100;
        t.rig(&[(20, 12), (20, 3), (6, 1)]);
        let bow = json!({"attack_bonus": 5, "damage": "1d6", "damage_type": "piercing", "range": {"normal": 80, "long": 320}});
        let r = t.resolve(a, ActionType::Attack, &[g], bow);
        let atk = outcome(&r, g).attack.clone().unwrap();
        assert!(atk.hit && !atk.critical);
    }
}

#[test]
fn ranges_table() {
    // (goblin square, details, result)
    let bow = json!({"attack_bonus": 5, "damage": "1d6", "damage_type": "piercing", "range": {"normal": 30, "long": 120}});
    let spear = json!({"attack_bonus": 5, "damage": "1d6", "damage_type": "piercing", "reach": 10});
    type Row = (
        (i32, i32),
        serde_json::Value,
        Result<Option<&'static str>, &'static str>,
    );
    let rows: Vec<Row> = vec![
        ((1, 1), sword(), Ok(None)),
        ((2, 0), sword(), Err(codes::OUT_OF_RANGE)),
        ((2, 2), spear.clone(), Ok(None)),
        ((3, 0), spear, Err(codes::OUT_OF_RANGE)),
        ((6, 0), bow.clone(), Ok(None)),
        ((8, 0), bow.clone(), Ok(Some("beyond_normal_range"))),
        ((24, 0), bow.clone(), Ok(Some("beyond_normal_range"))),
        ((25, 0), bow.clone(), Err(codes::OUT_OF_RANGE)),
        // A hostile within 5 ft spoils a ranged attack.
        ((1, 0), bow, Ok(Some("hostile_within_5ft"))),
    ];
    for ((x, y), details, want) in rows {
        let mut t = melee();
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.place(g, x, y);
        match want {
            Err(code) => assert_eq!(
                t.act_err(a, ActionType::Attack, &[g], details),
                code,
                "({x},{y})"
            ),
            Ok(dis) => {
                let r = t.resolve(a, ActionType::Attack, &[g], details);
                let atk = outcome(&r, g).attack.clone().unwrap();
                assert_eq!(
                    atk.disadvantage.first().map(String::as_str),
                    dis,
                    "({x},{y})"
                );
                assert_eq!(atk.distance, Some(((x.abs().max(y.abs())) * 5) as u32));
            }
        }
    }
}

#[test]
fn damage_types_resistance_vulnerability_immunity() {
    // (adjustment, rolled 7) → dealt
    let rows = [
        ("none", 7, None),
        ("resistances", 3, Some("resistant")),
        ("vulnerabilities", 14, Some("vulnerable")),
        ("immunities", 0, Some("immune")),
    ];
    for (field, dealt, note) in rows {
        let mut t = melee();
        let (a, g) = (t.pcs[0], t.goblins[0]);
        t.ch_mut(g).max_hp = 100;
        t.ch_mut(g).hp = 100;
        if field != "none" {
            let changes: CharacterChanges =
                serde_json::from_value(json!({ field: ["fire"] })).unwrap();
            t.ok(
                t.dm,
                Command::CharacterUpdate {
                    character_id: g,
                    changes,
                },
            );
        }
        t.rig(&[(20, 15), (6, 4)]);
        let d = json!({"attack_bonus": 5, "damage": "1d6+3", "damage_type": "fire"});
        let r = t.resolve(a, ActionType::Attack, &[g], d);
        let o = outcome(&r, g);
        assert_eq!(o.damage.rolled[&DamageType::Fire], 7);
        assert_eq!(o.damage.dealt[&DamageType::Fire], dealt, "{field}");
        assert_eq!(
            o.damage
                .adjustments
                .get(&DamageType::Fire)
                .map(String::as_str),
            note
        );
        assert_eq!(t.ch(g).hp, 100 - dealt);
    }
    // Mixed types: each is adjusted separately.
    let mut t = melee();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.ch_mut(g).max_hp = 100;
    t.ch_mut(g).hp = 100;
    t.ch_mut(g).resistances.insert(DamageType::Slashing);
    t.rig(&[(20, 15), (8, 5), (6, 6)]);
    let d = json!({"attack_bonus": 5, "damage": "1d8", "damage_type": "slashing",
        "extra_damage": [{"dice": "1d6", "type": "fire"}]});
    let r = t.resolve(a, ActionType::Attack, &[g], d);
    assert_eq!(outcome(&r, g).damage.total, 2 + 6);
}

#[test]
fn temporary_hit_points_absorb_first() {
    let mut t = melee();
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    t.set_turn(b);
    t.rig(&[(4, 4)]);
    let r = t.resolve(
        b,
        ActionType::Heal,
        &[a],
        json!({"amount": "1d4+4", "temporary": true, "cost": "bonus_action"}),
    );
    assert_eq!(outcome(&r, a).temp_hp, 8);
    // Temporary hit points do not stack: a smaller grant changes nothing.
    t.resolve(
        b,
        ActionType::Heal,
        &[a],
        json!({"amount": "3", "temporary": true}),
    );
    assert_eq!(t.ch(a).temp_hp, 8);
    t.set_turn(g);
    t.rig(&[(20, 15), (6, 6)]);
    let r = t.resolve(
        g,
        ActionType::Attack,
        &[a],
        json!({"attack_bonus": 4, "damage": "1d6+5", "damage_type": "slashing"}),
    );
    let o = outcome(&r, a);
    assert_eq!(
        (o.damage.total, o.damage.temp_hp_absorbed, o.temp_hp, o.hp),
        (11, 8, 0, 27)
    );
}

#[test]
fn saving_throws_table() {
    // (goblin 0's d20, half_on_success) → (success, damage to goblin 0)
    // 2d6 fire rolled once (4 + 3 = 7); goblins have Dex +2 (no proficiency) vs DC 13.
    let rows = [
        (11, true, true, 3),
        (10, true, false, 7),
        (15, false, true, 0),
        (2, false, false, 7),
    ];
    for (face, half, success, damage) in rows {
        let mut t = melee();
        let (c, g0, g1) = (t.pcs[2], t.goblins[0], t.goblins[1]);
        for g in [g0, g1] {
            t.ch_mut(g).max_hp = 50;
            t.ch_mut(g).hp = 50;
        }
        t.set_turn(c);
        t.rig(&[(6, 4), (6, 3), (20, face), (20, 1)]);
        let d = json!({"save": {"ability": "dex", "dc": 13, "half_on_success": half},
            "damage": "2d6", "damage_type": "fire", "conditions": [{"condition": "prone"}]});
        let r = t.resolve(c, ActionType::Save, &[g0, g1], d);
        let o = outcome(&r, g0);
        let save = o.save.clone().unwrap();
        assert_eq!(
            (save.d20, save.total, save.success),
            (Some(face), Some(face as i32 + 2), success)
        );
        assert_eq!(o.damage.total, damage, "{face} {half}");
        assert_eq!(o.damage.halved_by_save, success && half);
        // Conditions only on a failed save.
        assert_eq!(t.ch(g0).has(Condition::Prone), !success);
        assert_eq!(outcome(&r, g1).damage.total, 7);
        assert!(t.ch(g1).has(Condition::Prone));
        // Damage is rolled once for all targets: one damage roll, one save each.
        assert_eq!(r.rolls.iter().filter(|r| r.purpose == "damage").count(), 1);
    }
}

#[test]
fn save_bonus_adds_proficiency() {
    let mut t = melee();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.set_turn(g);
    t.rig(&[(20, 8), (20, 8)]);
    let d =
        json!({"save": {"ability": "str", "dc": 13}, "conditions": [{"condition": "grappled"}]});
    let r = t.resolve(g, ActionType::Save, &[a], d.clone());
    // Aria: Str +3, proficient (+2).
    let s = outcome(&r, a).save.clone().unwrap();
    assert_eq!((s.bonus, s.total, s.success), (5, Some(13), true));
    assert!(!t.ch(a).has(Condition::Grappled));
}

#[test]
fn conditions_change_saving_throws() {
    // (condition, ability) → (auto-fail?, mode)
    let rows = [
        (Condition::Paralyzed, "dex", true, Mode::Normal),
        (Condition::Stunned, "str", true, Mode::Normal),
        (Condition::Unconscious, "dex", true, Mode::Normal),
        (Condition::Petrified, "str", true, Mode::Normal),
        (Condition::Paralyzed, "wis", false, Mode::Normal),
        (Condition::Restrained, "dex", false, Mode::Disadvantage),
        (Condition::Restrained, "str", false, Mode::Normal),
        (Condition::Dodging, "dex", false, Mode::Advantage),
        (Condition::Poisoned, "dex", false, Mode::Normal),
    ];
    for (cond, ability, auto_fail, mode) in rows {
        let mut t = melee();
        let (c, g) = (t.pcs[2], t.goblins[0]);
        t.set_turn(c);
        t.ch_mut(g).conditions.insert(cond);
        let d = json!({"save": {"ability": ability, "dc": 10}});
        let r = t.resolve(c, ActionType::Save, &[g], d);
        let s = outcome(&r, g).save.clone().unwrap();
        assert_eq!(s.auto_fail.is_some(), auto_fail, "{cond:?} {ability}");
        if auto_fail {
            assert!(!s.success && s.d20.is_none() && r.rolls.is_empty());
        } else {
            assert_eq!(s.mode, mode, "{cond:?} {ability}");
        }
    }
}

#[test]
fn healing_caps_and_wakes_the_dying() {
    let mut t = melee();
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    t.set_turn(b);
    t.ch_mut(a).hp = 25;
    t.rig(&[(8, 8)]);
    let r = t.resolve(b, ActionType::Heal, &[a], json!({"amount": "1d8+3"}));
    assert_eq!((outcome(&r, a).healed, t.ch(a).hp), (Some(11), 30));
    // Knock Aria out, fail a death save, then heal her.
    t.ok(
        t.dm,
        Command::CharacterUpdate {
            character_id: a,
            changes: CharacterChanges {
                hp: Some(0),
                ..Default::default()
            },
        },
    );
    assert!(t.ch(a).has(Condition::Unconscious));
    t.ch_mut(a).death_saves.failures = 2;
    t.set_turn(b);
    t.rig(&[(4, 2)]);
    let r = t.resolve(b, ActionType::Heal, &[a], json!({"amount": "1d4"}));
    assert!(outcome(&r, a).effects.contains(&"conscious".to_string()));
    let c = t.ch(a);
    assert_eq!((c.hp, c.death_saves.failures), (2, 0));
    assert!(!c.has(Condition::Unconscious) && c.has(Condition::Prone));
    // The dead cannot be healed.
    t.ok(
        t.dm,
        Command::CharacterUpdate {
            character_id: g,
            changes: CharacterChanges {
                hp: Some(0),
                ..Default::default()
            },
        },
    );
    assert!(t.ch(g).is_dead());
    t.set_turn(b);
    assert_eq!(
        t.act_err(b, ActionType::Heal, &[g], json!({"amount": "1d4"})),
        codes::INVALID_TARGET
    );
    assert_eq!(
        t.act_err(b, ActionType::Heal, &[a], json!({})),
        codes::INVALID_PAYLOAD
    );
}

#[test]
fn monsters_die_at_zero_and_player_characters_fall() {
    let mut t = melee();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.rig(&[(20, 15), (8, 8)]);
    let r = t.resolve(a, ActionType::Attack, &[g], sword());
    assert!(outcome(&r, g).effects.contains(&"dead".to_string()));
    assert!(t.ch(g).is_dead());
    assert_eq!(
        t.act_err(a, ActionType::Attack, &[g], sword()),
        codes::INVALID_TARGET
    );
    // A goblin knocks Cyl (16 HP) to 0: unconscious, prone, dying.
    let (c, g1) = (t.pcs[2], t.goblins[1]);
    t.place(g1, 1, 4);
    t.set_turn(g1);
    t.rig(&[(20, 15), (6, 6)]);
    let club = json!({"attack_bonus": 4, "damage": "1d6+10", "damage_type": "bludgeoning"});
    let r = t.resolve(g1, ActionType::Attack, &[c], club.clone());
    assert_eq!(outcome(&r, c).effects, vec!["hit", "unconscious"]);
    assert!(t.ch(c).dying() && t.ch(c).has(Condition::Prone));
    // Cannot act while unconscious.
    t.set_turn(c);
    assert_eq!(
        t.act_err(c, ActionType::Dodge, &[], json!({})),
        codes::INCAPACITATED
    );
    // Damage at 0 HP: one failure; a critical (automatic within 5 ft), two.
    t.set_turn(g1);
    t.rig(&[(20, 15), (20, 15), (6, 1), (6, 1)]);
    let r = t.resolve(
        g1,
        ActionType::Attack,
        &[c],
        json!({"attack_bonus": 4, "damage": "1d6", "damage_type": "bludgeoning"}),
    );
    assert!(outcome(&r, c).effects.contains(&"critical".to_string()));
    assert_eq!(t.ch(c).death_saves.failures, 2);
    assert!(!t.ch(c).is_dead());
    t.set_turn(g1);
    t.place(g1, 5, 4);
    // Unconscious (advantage) but prone beyond 5 ft (disadvantage): one d20.
    t.rig(&[(20, 15), (6, 1)]);
    let bow = json!({"attack_bonus": 4, "damage": "1d6", "damage_type": "piercing", "range": {"normal": 80}});
    let r = t.resolve(g1, ActionType::Attack, &[c], bow);
    assert!(!outcome(&r, c).effects.contains(&"critical".to_string()));
    assert!(t.ch(c).is_dead());
}

#[test]
fn death_saves_at_the_start_of_the_turn() {
    // (d20) → (result, outcome)
    let rows = [
        (10, "success", "dying"),
        (9, "failure", "dying"),
        (1, "two_failures", "dying"),
        (20, "regain_hp", "conscious"),
    ];
    for (face, result, out) in rows {
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
        let victim = t.pcs[0];
        let i = order.iter().position(|x| *x == victim).unwrap();
        let before = order[(i + order.len() - 1) % order.len()];
        t.ok(
            t.dm,
            Command::CharacterUpdate {
                character_id: victim,
                changes: CharacterChanges {
                    hp: Some(0),
                    ..Default::default()
                },
            },
        );
        t.set_turn(before);
        t.rig(&[(20, face)]);
        let events = t.ok(t.dm, Command::EndTurn {});
        assert_eq!(events.len(), 2);
        let Event::DeathSave(d) = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(
            (d.roll, d.result.as_str(), d.outcome.as_str()),
            (face, result, out)
        );
        assert_eq!(d.rolls[0].purpose, "death_save");
        if face == 20 {
            assert_eq!(t.ch(victim).hp, 1);
        }
    }
    // Three successes: stable, no more saves.
    let mut t = Table::new();
    let victim = t.pcs[0];
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: vec![victim, t.goblins[0]],
            surprised: vec![],
        },
    );
    t.ok(
        t.dm,
        Command::CharacterUpdate {
            character_id: victim,
            changes: CharacterChanges {
                hp: Some(0),
                ..Default::default()
            },
        },
    );
    t.set_turn(t.goblins[0]);
    let mut outcomes = vec![];
    for _ in 0..3 {
        t.rig(&[(20, 15)]);
        let e = t.ok(t.dm, Command::EndTurn {});
        if let Some(Event::DeathSave(d)) = e.get(1) {
            outcomes.push(d.outcome.clone());
        }
        t.ok(t.dm, Command::EndTurn {});
    }
    assert_eq!(outcomes, vec!["dying", "dying", "stable"]);
    assert!(t.ch(victim).stable);
    let e = t.ok(t.dm, Command::EndTurn {});
    assert_eq!(e.len(), 1, "a stable character rolls no death save");
}

#[test]
fn action_payload_errors() {
    let mut t = melee();
    let (a, b, g) = (t.pcs[0], t.pcs[1], t.goblins[0]);
    let rows: Vec<(ActionType, Vec<uuid::Uuid>, serde_json::Value, &str)> = vec![
        (
            ActionType::Attack,
            vec![g],
            json!({"damage": "2d7", "damage_type": "fire"}),
            codes::INVALID_DICE,
        ),
        (
            ActionType::Attack,
            vec![g],
            json!({"damage": "1d6+x", "damage_type": "fire"}),
            codes::INVALID_DICE,
        ),
        (
            ActionType::Attack,
            vec![g],
            json!({"damage": "1d6"}),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Attack,
            vec![g],
            json!({"damage": "1d6", "damage_type": "cheese"}),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Attack,
            vec![g],
            json!({"attack_bonus": 99}),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Attack,
            vec![g],
            json!("sword"),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Attack,
            vec![g],
            json!({"cost": "free"}),
            codes::INVALID_PAYLOAD,
        ),
        (ActionType::Attack, vec![], sword(), codes::INVALID_TARGET),
        (ActionType::Attack, vec![a], sword(), codes::INVALID_TARGET),
        (
            ActionType::Attack,
            vec![g, g],
            sword(),
            codes::INVALID_TARGET,
        ),
        (
            ActionType::Attack,
            vec![uuid::Uuid::from_u128(5)],
            sword(),
            codes::UNKNOWN_CHARACTER,
        ),
        (
            ActionType::Save,
            vec![g],
            json!({"damage": "1d6", "damage_type": "fire"}),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Save,
            vec![g],
            json!({"save": {"ability": "dex", "dc": 99}}),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Save,
            vec![g],
            json!({"save": {"ability": "luck", "dc": 9}}),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Save,
            vec![t.goblins[1]],
            json!({"save": {"ability": "dex", "dc": 9}, "range": 5}),
            codes::OUT_OF_RANGE,
        ),
        (
            ActionType::Heal,
            vec![b],
            json!({"amount": "0d4"}),
            codes::INVALID_DICE,
        ),
        (
            ActionType::Heal,
            vec![b],
            json!({"amount": "1d4", "range": 5}),
            codes::OUT_OF_RANGE,
        ),
        (
            ActionType::Save,
            vec![g],
            json!({"save": {"ability": "dex", "dc": 9}, "conditions": [{"condition": "dead"}]}),
            codes::INVALID_PAYLOAD,
        ),
        (
            ActionType::Save,
            vec![g],
            json!({"save": {"ability": "dex", "dc": 9}, "conditions": [{"condition": "prone", "duration": {"rounds": 0, "ends": "end"}}]}),
            codes::INVALID_PAYLOAD,
        ),
    ];
    t.place(g, 1, 0);
    for (kind, targets, details, code) in rows {
        // Make failures of the save deterministic so conditions get imposed (duration check).
        t.rig(&[(20, 1)]);
        assert_eq!(
            t.act_err(a, kind, &targets, details.clone()),
            code,
            "{kind:?} {details}"
        );
    }
}

#[test]
fn concentration_one_at_a_time_and_checks_on_damage() {
    let mut t = melee();
    let (a, c, g0, g1) = (t.pcs[0], t.pcs[2], t.goblins[0], t.goblins[1]);
    t.place(g1, 2, 4);
    // Cyl holds goblin 0 (paralyzed, concentration).
    t.set_turn(c);
    t.rig(&[(20, 2)]);
    let hold = json!({"name": "hold person", "save": {"ability": "wis", "dc": 13},
        "conditions": [{"condition": "paralyzed"}], "concentration": true});
    t.resolve(c, ActionType::Save, &[g0], hold.clone());
    assert!(t.ch(g0).has(Condition::Paralyzed));
    assert_eq!(t.ch(c).concentration.as_ref().unwrap().name, "hold person");
    // A new concentration ends the old one: goblin 0 is free, goblin 1 held.
    t.set_turn(c);
    t.rig(&[(20, 2)]);
    t.resolve(c, ActionType::Save, &[g1], hold.clone());
    assert!(!t.ch(g0).has(Condition::Paralyzed));
    assert!(t.ch(g1).has(Condition::Paralyzed));
    assert_eq!(t.s.game.effects.len(), 1);
    // Damage: Con save DC max(10, half the damage). (Cyl: Con +0, not proficient.)
    t.ch_mut(c).max_hp = 100;
    t.ch_mut(c).hp = 100;
    // (damage, d20) → (dc, kept)
    let rows = [
        (8, 10, 10, true),
        (22, 10, 11, false),
        (30, 15, 15, true),
        (30, 14, 15, false),
    ];
    for (damage, face, dc, kept) in rows {
        if t.ch(c).concentration.is_none() {
            t.set_turn(c);
            t.rig(&[(20, 2)]);
            t.resolve(c, ActionType::Save, &[g1], hold.clone());
        }
        t.set_turn(a);
        t.place(a, 1, 4);
        t.rig(&[(20, 15), (20, face)]);
        // Aria (a friend, but the DM allows it) hits Cyl for a flat amount.
        let d = json!({"attack_bonus": 5, "damage": damage.to_string(), "damage_type": "force"});
        let r = t.resolve(a, ActionType::Attack, &[c], d);
        let check = outcome(&r, c).concentration_check.clone().unwrap();
        assert_eq!(
            (check.dc, check.d20, check.success),
            (dc, face, kept),
            "{damage}"
        );
        assert_eq!(t.ch(c).concentration.is_some(), kept);
        assert_eq!(t.ch(g1).has(Condition::Paralyzed), kept);
        t.place(a, 0, 0);
    }
}

#[test]
fn incapacitation_and_voluntary_end_of_concentration() {
    let mut t = melee();
    let (c, g1) = (t.pcs[2], t.goblins[1]);
    let hold = json!({"save": {"ability": "wis", "dc": 13},
        "conditions": [{"condition": "paralyzed"}], "concentration": true});
    t.set_turn(c);
    t.rig(&[(20, 2)]);
    t.resolve(c, ActionType::Save, &[g1], hold.clone());
    assert!(t.ch(g1).has(Condition::Paralyzed));
    // Stunned (incapacitated) ends concentration.
    t.ok(
        t.dm,
        Command::ApplyCondition {
            character_id: c,
            condition: Condition::Stunned,
            duration: None,
            source: None,
            save_ends: None,
        },
    );
    assert!(t.ch(c).concentration.is_none());
    assert!(!t.ch(g1).has(Condition::Paralyzed));
    t.ok(
        t.dm,
        Command::RemoveCondition {
            character_id: c,
            condition: Condition::Stunned,
        },
    );
    // Voluntary end; then there is nothing to end.
    t.set_turn(c);
    t.rig(&[(20, 2)]);
    t.resolve(c, ActionType::Save, &[g1], hold);
    assert_eq!(
        t.err(t.players[0], Command::EndConcentration { character_id: c }),
        codes::NOT_YOUR_CHARACTER
    );
    let e = t.ok(t.players[2], Command::EndConcentration { character_id: c });
    let Event::ConcentrationEnded(ended) = &e[0] else {
        panic!()
    };
    assert_eq!(ended.effects_ended.len(), 1);
    assert!(!t.ch(g1).has(Condition::Paralyzed));
    assert_eq!(
        t.err(t.players[2], Command::EndConcentration { character_id: c }),
        codes::NOT_CONCENTRATING
    );
}
