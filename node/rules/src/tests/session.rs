//! Characters entering play, updates from the DM and the hub, rollback, audit
//! entries, views and client parsing.

use super::harness::*;
use crate::character::CharacterChanges;
use crate::command::{ActionType, Command, Ctx, JoinRequest, CLIENT_TYPES};
use crate::conditions::Condition;
use crate::error::codes;
use crate::event::Event;
use crate::history::audit_entry;
use crate::state::{SessionState, Status};
use serde_json::json;
use uuid::Uuid;

fn join(c: Option<Uuid>, sheet: Option<serde_json::Value>) -> Command {
    Command::Join(JoinRequest {
        character_id: c,
        role: None,
        character: sheet,
        lookup: None,
    })
}

#[test]
fn joining_puts_the_character_in_play() {
    let t = Table::new();
    let a = t.ch(t.pcs[0]);
    assert_eq!(
        (a.name.as_str(), a.hp, a.ac, a.player_character),
        ("Aria", 30, 16, true)
    );
    assert_eq!(t.s.members[&t.players[0]].characters, vec![t.pcs[0]]);
    let g = t.ch(t.goblins[0]);
    assert!(!g.player_character);
    assert_eq!(g.side, "monsters");
}

#[test]
fn join_errors() {
    let mut t = Table::new();
    let newbie = Uuid::from_u128(0xA9);
    let c = Uuid::from_u128(0xC9);
    assert_eq!(
        t.err(newbie, join(None, Some(aria()))),
        codes::INVALID_CHARACTER
    );
    assert_eq!(
        t.err(newbie, join(Some(c), Some(json!({"max_hp": -1, "ac": 3})))),
        codes::INVALID_CHARACTER
    );
    assert_eq!(
        t.err(newbie, join(Some(t.goblins[0]), None)),
        codes::CHARACTER_TAKEN
    );
    assert_eq!(
        t.err(newbie, join(Some(t.pcs[0]), None)),
        codes::CHARACTER_TAKEN
    );
    // A join without a sheet binds the character without putting it in play.
    t.ok(newbie, join(Some(c), None));
    assert!(!t.s.game.characters.contains_key(&c));
    // The DM can put it in play (as a player character), and its player controls it.
    let sheet =
        json!({"max_hp": 9, "ac": 11, "player_character": true, "position": {"x": 8, "y": 8}});
    t.ok(
        t.dm,
        Command::SpawnCharacter {
            character_id: Some(c),
            sheet,
        },
    );
    assert!(t.ch(c).player_character);
    t.ok(
        newbie,
        Command::Move {
            character_id: c,
            to: crate::character::Pos { x: 9, y: 9 },
            path: vec![],
        },
    );
    assert_eq!(t.ch(c).position, Some(crate::character::Pos { x: 9, y: 9 }));
}

#[test]
fn rejoining_keeps_the_state_in_play() {
    let mut t = Table::new();
    let (p, a) = (t.players[0], t.pcs[0]);
    t.ch_mut(a).hp = 3;
    // A re-join with a fresh sheet does not heal.
    t.ok(p, join(Some(a), Some(aria())));
    assert_eq!(t.ch(a).hp, 3);
    // Leaving keeps the character in play under the DM.
    t.ok(p, Command::Leave {});
    assert!(t.s.game.characters.contains_key(&a));
    t.ok(
        t.dm,
        Command::Move {
            character_id: a,
            to: crate::character::Pos { x: 0, y: -3 },
            path: vec![],
        },
    );
    t.ok(p, join(Some(a), None));
    t.ok(
        p,
        Command::Move {
            character_id: a,
            to: crate::character::Pos { x: 0, y: -4 },
            path: vec![],
        },
    );
}

#[test]
fn spawn_errors_and_setup_before_start() {
    let id = Uuid::from_u128(0x5E55);
    let dm = Uuid::from_u128(0xD1);
    let mut s = SessionState::empty(id);
    s.apply(&SessionState::creation(
        id,
        Uuid::nil(),
        "prep".into(),
        json!({}),
        dm,
        T0.into(),
    ));
    let ctx = |u| Ctx {
        user_id: u,
        admin: false,
        command_id: Uuid::from_u128(0x77),
        timestamp: T0.into(),
    };
    // Spawning is setup: allowed before the session starts.
    let spawn = Command::SpawnCharacter {
        character_id: None,
        sheet: goblin(1, 1),
    };
    let events = s.decide(&ctx(dm), &spawn).unwrap();
    for e in &events {
        s.apply(e);
    }
    assert!(
        s.game.characters.contains_key(&Uuid::from_u128(0x77)),
        "the id defaults to the command id"
    );
    // But combat needs an active session.
    let start = Command::CombatStart {
        participants: vec![Uuid::from_u128(0x77)],
        surprised: vec![],
    };
    assert_eq!(
        s.decide(&ctx(dm), &start).unwrap_err().code,
        codes::SESSION_NOT_ACTIVE
    );
    // Same id again; a taken square; a bad sheet; a player.
    assert_eq!(
        s.decide(&ctx(dm), &spawn).unwrap_err().code,
        codes::INVALID_CHARACTER
    );
    let other = |sheet| Command::SpawnCharacter {
        character_id: Some(Uuid::from_u128(0x78)),
        sheet,
    };
    assert_eq!(
        s.decide(&ctx(dm), &other(goblin(1, 1))).unwrap_err().code,
        codes::SQUARE_OCCUPIED
    );
    assert_eq!(
        s.decide(&ctx(dm), &other(json!({"ac": 3})))
            .unwrap_err()
            .code,
        codes::INVALID_CHARACTER
    );
    let p = Uuid::from_u128(0xA1);
    for e in s
        .decide(&ctx(p), &Command::Join(JoinRequest::default()))
        .unwrap()
    {
        s.apply(&e);
    }
    assert_eq!(
        s.decide(&ctx(p), &other(goblin(2, 2))).unwrap_err().code,
        codes::FORBIDDEN_FOR_ROLE
    );
}

#[test]
fn character_update_and_sync() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    let upd = |c, changes: serde_json::Value| Command::CharacterUpdate {
        character_id: c,
        changes: serde_json::from_value(changes).unwrap(),
    };
    assert_eq!(
        t.err(t.players[0], upd(a, json!({"hp": 1}))),
        codes::FORBIDDEN_FOR_ROLE
    );
    assert_eq!(
        t.err(t.dm, upd(Uuid::from_u128(3), json!({"hp": 1}))),
        codes::UNKNOWN_CHARACTER
    );
    assert_eq!(
        t.err(t.dm, upd(a, json!({"hp": 31}))),
        codes::INVALID_CHARACTER
    );
    assert_eq!(
        t.err(t.dm, upd(a, json!({"ac": -1}))),
        codes::INVALID_CHARACTER
    );
    assert_eq!(
        t.err(t.dm, upd(a, json!({"conditions_remove": ["dead"]}))),
        codes::INVALID_PAYLOAD
    );
    let e = t.ok(
        t.dm,
        upd(
            a,
            json!({"max_hp": 40, "hp": 35, "conditions_add": ["poisoned"]}),
        ),
    );
    let Event::CharacterUpdated(u) = &e[0] else {
        panic!()
    };
    assert_eq!(u.source, "dm");
    assert_eq!((t.ch(a).max_hp, t.ch(a).hp), (40, 35));
    assert!(t.ch(a).has(Condition::Poisoned));
    // A change that changes nothing emits nothing (hub redeliveries are harmless).
    assert!(t.ok(t.dm, upd(a, json!({"hp": 35}))).is_empty());
    // Lowering max HP below current clamps.
    t.ok(t.dm, upd(a, json!({"max_hp": 20})));
    assert_eq!(t.ch(a).hp, 20);
    // Hub sync: internal only, via an admin (system) ctx.
    let changes =
        CharacterChanges::from_hub(&json!({"current_hp": 2, "armor_class": 13, "level": 4}))
            .unwrap();
    let sync = Command::CharacterSync {
        character_id: g,
        changes,
    };
    assert_eq!(t.err(t.dm, sync.clone()), codes::FORBIDDEN_FOR_ROLE);
    let ctx = Ctx {
        admin: true,
        ..t.ctx(Uuid::nil())
    };
    let e = t.run_ctx(&ctx, sync).unwrap();
    let Event::CharacterUpdated(u) = &e[0] else {
        panic!()
    };
    assert_eq!(u.source, "hub");
    assert_eq!((t.ch(g).hp, t.ch(g).ac), (2, 13));
    // Not a client type.
    assert_eq!(
        Command::from_client("character_sync", json!({}))
            .unwrap_err()
            .code,
        codes::UNKNOWN_TYPE
    );
}

#[test]
fn every_client_type_parses() {
    let id = "00000000-0000-0000-0000-0000000000c1";
    let samples = [
        ("spawn_character", json!({"sheet": {"max_hp": 7, "ac": 15}})),
        (
            "character_update",
            json!({"character_id": id, "changes": {"hp": 3}}),
        ),
        (
            "place_character",
            json!({"character_id": id, "position": {"x": 1, "y": 2}}),
        ),
        ("combat_start", json!({"participants": [id]})),
        ("combat_add", json!({"participants": [id]})),
        ("combat_end", json!({})),
        (
            "initiative_roll",
            json!({"character_id": id, "roll": 14, "modifiers": {}}),
        ),
        ("end_turn", json!({})),
        (
            "action_declare",
            json!({"action_id": id, "character_id": id, "action_type": "attack",
            "targets": [id], "details": {"attack_bonus": 5, "damage": "1d8+3", "damage_type": "slashing"}}),
        ),
        ("move", json!({"character_id": id, "to": {"x": 1, "y": 1}})),
        ("stand_up", json!({"character_id": id})),
        (
            "apply_condition",
            json!({"character_id": id, "condition": "prone",
            "duration": {"rounds": 1, "ends": "start", "of": "target"}}),
        ),
        (
            "remove_condition",
            json!({"character_id": id, "condition": "prone"}),
        ),
        ("end_concentration", json!({"character_id": id})),
        ("rollback", json!({"to_version": 3})),
        (
            "combat_start",
            json!({"participants": [id], "surprised": [id]}),
        ),
        (
            "move",
            json!({"character_id": id, "to": {"x": 2, "y": 1}, "path": [{"x": 1, "y": 1}]}),
        ),
        (
            "apply_condition",
            json!({"character_id": id, "condition": "paralyzed",
            "duration": {"minutes": 1}, "save_ends": {"ability": "wis", "dc": 13}}),
        ),
        (
            "terrain_set",
            json!({"squares": [{"x": 1, "y": 2, "difficult": true, "cover": "half"}]}),
        ),
        ("terrain_set", json!({"clear": true})),
        ("reaction_decline", json!({"character_id": id})),
        (
            "action_declare",
            json!({"character_id": id, "action_type": "ready",
            "details": {"action": "attack", "trigger": "it moves"}}),
        ),
    ];
    for (kind, data) in samples {
        let c = Command::from_client(kind, data).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(c.kind(), kind);
        assert!(CLIENT_TYPES.contains(&kind));
    }
    for (kind, data) in [
        (
            "action_declare",
            json!({"character_id": id, "action_type": "fly"}),
        ),
        (
            "apply_condition",
            json!({"character_id": id, "condition": "sleepy"}),
        ),
        (
            "move",
            json!({"character_id": id, "to": {"x": 1.5, "y": 1}}),
        ),
        ("initiative_roll", json!({"character_id": id, "roll": -1})),
        (
            "terrain_set",
            json!({"squares": [{"x": 1, "y": 2, "cover": "full"}]}),
        ),
    ] {
        assert_eq!(
            Command::from_client(kind, data).unwrap_err().code,
            codes::INVALID_PAYLOAD,
            "{kind}"
        );
    }
}

#[test]
fn rollback_restores_document_and_play() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.ok(
        t.players[0],
        Command::from_client(
            "state_update",
            json!({"changes": [{"path": "/notes", "value": "before"}]}),
        )
        .unwrap(),
    );
    let all = t.all();
    t.place(g, 1, 0);
    t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    let v = t.s.version;
    let snapshot = t.s.clone();
    // Things happen: damage, notes, a condition, a new monster joins the fight (dice).
    // (No rigging here: the log alone must reproduce the state.)
    t.ok(
        t.dm,
        Command::CharacterUpdate {
            character_id: a,
            changes: CharacterChanges {
                hp: Some(22),
                ..Default::default()
            },
        },
    );
    t.ok(
        t.dm,
        Command::ApplyCondition {
            character_id: a,
            condition: Condition::Prone,
            duration: None,
            source: None,
            save_ends: None,
        },
    );
    t.ok(
        t.players[0],
        Command::from_client(
            "state_update",
            json!({"changes": [{"path": "/notes", "value": "after"}]}),
        )
        .unwrap(),
    );
    let ogre = Uuid::from_u128(0x06E);
    t.ok(
        t.dm,
        Command::SpawnCharacter {
            character_id: Some(ogre),
            sheet: json!({"name": "Ogre", "max_hp": 59, "ac": 11}),
        },
    );
    t.ok(
        t.dm,
        Command::CombatAdd {
            participants: vec![ogre],
        },
    );
    t.ok(t.dm, Command::SessionPause {});
    assert_eq!(t.ch(a).hp, 22);
    let counter = t.s.game.dice_counter;
    assert!(counter > snapshot.game.dice_counter);
    // Only the DM; only to an earlier version; decide() alone cannot do it.
    let ctx = t.ctx(t.players[0]);
    let past = replay(t.s.id, &t.log[..v as usize]);
    assert_eq!(
        t.s.decide_rollback(&ctx, v, &past).unwrap_err().code,
        codes::FORBIDDEN_FOR_ROLE
    );
    let ctx = t.ctx(t.dm);
    for bad in [0, t.s.version, t.s.version + 5] {
        assert_eq!(
            t.s.check_rollback(&ctx, bad).unwrap_err().code,
            codes::INVALID_VERSION
        );
    }
    assert_eq!(
        t.s.decide(&ctx, &Command::Rollback { to_version: v })
            .unwrap_err()
            .code,
        codes::ROLLBACK_NEEDS_HISTORY
    );
    let wrong = replay(t.s.id, &t.log[..v as usize - 1]);
    assert_eq!(
        t.s.decide_rollback(&ctx, v, &wrong).unwrap_err().code,
        codes::INVALID_VERSION
    );
    // The node replays the log to v and asks for the rollback.
    assert_eq!(past.game, snapshot.game);
    let events = t.s.decide_rollback(&ctx, v, &past).unwrap();
    for e in &events {
        t.s.apply(e);
        t.log.push(e.clone());
    }
    let Event::StateRestored(r) = &events[0] else {
        panic!()
    };
    assert_eq!(r.to_version, v);
    assert_eq!(t.s.doc, json!({"notes": "before"}));
    assert_eq!(t.ch(a).hp, 30);
    assert!(!t.ch(a).has(Condition::Prone));
    assert!(!t.s.game.characters.contains_key(&ogre));
    assert_eq!(t.s.game.combat, snapshot.game.combat);
    // Lifecycle and members stay; the dice stream continues; history is kept.
    assert_eq!(t.s.status, Status::Paused);
    assert_eq!(t.s.game.dice_counter, counter);
    assert_eq!(t.s.version as usize, t.log.len());
    assert_eq!(replay(t.s.id, &t.log), t.s);
}

#[test]
fn rollback_keeps_characters_of_members_who_joined_later() {
    let mut t = Table::new();
    let v = t.s.version;
    let (p, c) = (Uuid::from_u128(0xA7), Uuid::from_u128(0xC7));
    t.ok(
        p,
        join(
            Some(c),
            Some(json!({"name": "Dara", "max_hp": 12, "ac": 13})),
        ),
    );
    let past = replay(t.s.id, &t.log[..v as usize]);
    let ctx = t.ctx(t.dm);
    for e in t.s.decide_rollback(&ctx, v, &past).unwrap() {
        t.s.apply(&e);
        t.log.push(e);
    }
    assert_eq!(t.ch(c).name, "Dara");
    assert_eq!(replay(t.s.id, &t.log), t.s);
}

#[test]
fn audit_entries_show_who_what_when_and_rolls() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    let all = t.all();
    t.combat(&all, a);
    t.rig(&[(20, 20), (8, 4), (8, 4)]);
    let events = t.act(a, ActionType::Attack, &[g], sword()).unwrap();
    let v = t.s.version;
    let entry = audit_entry(v, &events[1]);
    assert_eq!(entry["version"], v);
    assert_eq!(entry["type"], "action_resolve");
    assert_eq!(entry["by"], json!(t.players[0]));
    assert_eq!(entry["at"], T0);
    assert_eq!(entry["rolls"][0]["faces"], json!([20]));
    assert_eq!(entry["rolls"][1]["faces"], json!([4, 4]));
    assert!(entry["data"].get("patch").is_none());
    let summary = entry["summary"].as_str().unwrap();
    assert!(summary.contains("hit/critical/dead"), "{summary}");
    // The dice seed never shows.
    let created = audit_entry(1, &t.log[0]);
    assert!(created["data"]["settings"].get("dice_seed").is_none());
    assert!(t.s.game_view()["settings"].get("dice_seed").is_none());
    assert!(t.s.game_view()["play"].get("seed").is_none());
    assert_eq!(
        t.s.game_view()["play"]["characters"][a.to_string()]["name"],
        "Aria"
    );
    // Every event of the log has an entry with a summary.
    for (i, e) in t.log.iter().enumerate() {
        let entry = audit_entry(i as u64 + 1, e);
        assert!(!entry["summary"].as_str().unwrap().is_empty());
    }
}

#[test]
fn patches_let_clients_mirror_the_play_view() {
    let mut t = Table::new();
    let (a, g) = (t.pcs[0], t.goblins[0]);
    t.place(g, 1, 0);
    let mut view = t.s.game.view();
    let all = t.all();
    let mut events = t.ok(
        t.dm,
        Command::CombatStart {
            participants: all,
            surprised: vec![],
        },
    );
    let active = t.active();
    events.extend(t.ok(t.owner(active), Command::EndTurn {}));
    let active = t.active();
    if active == a {
        events.extend(t.act(a, ActionType::Attack, &[g], sword()).unwrap());
    }
    for e in &events {
        let p = e.patch().unwrap();
        if !crate::patch::is_empty(p) {
            crate::patch::merge(&mut view, p);
        }
    }
    assert_eq!(view, t.s.game.view());
}

fn update(changes: serde_json::Value) -> Command {
    Command::from_client("state_update", json!({ "changes": changes })).unwrap()
}

/// The document's bounds (issue 10): each refused with `limit_exceeded`, nothing
/// changed (`Table::err` checks the state is untouched).
#[test]
fn the_document_keeps_its_bounds() {
    let mut t = Table::new();
    let dm = t.dm;
    t.s.limits.max_document_bytes = 4096;
    // Path depth and bytes.
    let deep = "/a".repeat(33);
    assert_eq!(
        t.err(dm, update(json!([{"path": deep, "value": 1}]))),
        codes::LIMIT_EXCEEDED
    );
    let long = format!("/{}", "k".repeat(2000));
    assert_eq!(
        t.err(dm, update(json!([{"path": long, "value": 1}]))),
        codes::LIMIT_EXCEEDED
    );
    // Depth of path + value.
    let mut v = json!(1);
    for _ in 0..40 {
        v = json!([v]);
    }
    let path = "/p".repeat(9);
    assert_eq!(
        t.err(dm, update(json!([{"path": path, "value": v}]))),
        codes::LIMIT_EXCEEDED
    );
    // Width of an object, in a value and by adding members one by one.
    t.s.limits.max_keys_per_object = 3;
    let wide = json!({"a": 1, "b": 2, "c": 3, "d": 4});
    assert_eq!(
        t.err(dm, update(json!([{"path": "/w", "value": wide}]))),
        codes::LIMIT_EXCEEDED
    );
    t.ok(
        dm,
        update(json!([{"path": "/o/a", "value": 1}, {"path": "/o/b", "value": 2}])),
    );
    t.ok(dm, update(json!([{"path": "/o/c", "value": 3}])));
    assert_eq!(
        t.err(dm, update(json!([{"path": "/o/d", "value": 4}]))),
        codes::LIMIT_EXCEEDED
    );
    t.s.limits.max_keys_per_object = 1000;
    // The document's size: growth refused at the bound, within one update too.
    let big = "x".repeat(1500);
    t.ok(dm, update(json!([{"path": "/b1", "value": big}])));
    t.ok(dm, update(json!([{"path": "/b2", "value": big}])));
    assert_eq!(
        t.err(dm, update(json!([{"path": "/b3", "value": big}]))),
        codes::LIMIT_EXCEEDED
    );
    assert_eq!(
        t.err(
            dm,
            update(json!([{"path": "/b1", "value": "y"}, {"path": "/b3", "value": big}, {"path": "/b4", "value": big}]))
        ),
        codes::LIMIT_EXCEEDED
    );
    // Shrinking is allowed, and makes room again.
    t.ok(dm, update(json!([{"path": "/b1", "op": "remove"}])));
    t.ok(dm, update(json!([{"path": "/b3", "value": big}])));
    // A whole-document save is held to the same bounds.
    let save = Command::SaveState {
        state: json!({ "huge": "z".repeat(5000) }),
        metadata: json!({}),
    };
    assert_eq!(t.err(dm, save), codes::LIMIT_EXCEEDED);
}

/// The size the state keeps incrementally equals the document's measured size
/// after any mix of changes, saves and rollbacks of the document.
#[test]
fn the_kept_document_size_is_exact() {
    let mut t = Table::new();
    let dm = t.dm;
    let steps = [
        json!([{"path": "/a", "value": {"b": [1, 2, 3]}}]),
        json!([{"path": "/a/b/-", "value": "é\"\\"}]),
        json!([{"path": "/a/b/0", "op": "remove"}]),
        json!([{"path": "/x/y/z", "value": null}]),
        json!([{"path": "/a", "value": 5}, {"path": "/c", "value": {}}]),
        json!([{"path": "/c/d", "value": [[], {}]}]),
        json!([{"path": "/x", "op": "remove"}]),
    ];
    for s in steps {
        t.ok(dm, update(s));
        let fresh: SessionState =
            serde_json::from_value(serde_json::to_value(&t.s).unwrap()).unwrap();
        // A fresh copy measures; the live one kept its size by deltas.
        assert_eq!(
            t.s.doc_size_for_tests(),
            crate::limits::json_len(&fresh.doc),
            "{}",
            t.s.doc
        );
    }
}

/// Found by fuzzing: a change setting a path to `null` was stored as `"value": null`
/// and read back as no value, so replaying the log skipped it and the document of a
/// reloaded session differed from the live one.
#[test]
fn a_change_to_null_survives_storage_and_replay() {
    let mut t = Table::new();
    let p = t.players[0];
    let set = |v: serde_json::Value| {
        Command::from_client(
            "state_update",
            json!({"changes": [{"path": "/hp", "value": v}]}),
        )
        .unwrap()
    };
    t.ok(p, set(json!(5)));
    t.ok(p, set(json!(null)));
    t.ok(p, set(json!(null)));
    assert_eq!(t.s.doc["hp"], json!(null));
    for e in &t.log {
        let (k, d) = e.to_parts();
        assert_eq!(
            &Event::from_parts(&k, d).unwrap(),
            e,
            "{k} changed in storage"
        );
    }
    assert_eq!(replay(t.s.id, &t.log), t.s);
}
