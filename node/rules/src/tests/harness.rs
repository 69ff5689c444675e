//! A table: a DM, three players with characters, two monsters, an observer.

use crate::character::{Character, Pos};
use crate::combat::Turn;
use crate::command::{ActionDeclare, ActionType, Command, Ctx, JoinRequest};
use crate::dice::Roller;
use crate::event::{ActionResolved, Event, Outcome};
use crate::state::{SessionRole, SessionState};
use serde_json::{json, Value};
use uuid::Uuid;

pub const T0: &str = "2026-01-01T20:00:00.000Z";

pub struct Table {
    pub s: SessionState,
    pub dm: Uuid,
    pub players: [Uuid; 3],
    pub observer: Uuid,
    /// Aria (fighter), Brom (cleric), Cyl (wizard).
    pub pcs: [Uuid; 3],
    /// Two goblins.
    pub goblins: [Uuid; 2],
    /// Every event applied, from version 1.
    pub log: Vec<Event>,
    next_command: u128,
}

pub fn aria() -> Value {
    json!({"name": "Aria", "max_hp": 30, "ac": 16,
        "abilities": {"str": 3, "dex": 2, "con": 2},
        "proficiency_bonus": 2, "save_proficiencies": ["str", "con"],
        "speed": 30, "attacks_per_action": 2, "position": {"x": 0, "y": 0}})
}

pub fn brom() -> Value {
    json!({"name": "Brom", "max_hp": 24, "ac": 18,
        "abilities": {"wis": 3, "con": 1}, "save_proficiencies": ["wis", "cha"],
        "speed": 25, "position": {"x": 0, "y": 2}})
}

pub fn cyl() -> Value {
    json!({"name": "Cyl", "max_hp": 16, "ac": 12,
        "abilities": {"int": 3, "dex": 2, "con": 0}, "save_proficiencies": ["int", "wis"],
        "position": {"x": 0, "y": 4}})
}

pub fn goblin(x: i32, y: i32) -> Value {
    json!({"name": "Goblin", "max_hp": 7, "ac": 15, "abilities": {"dex": 2},
        "speed": 30, "position": {"x": x, "y": y}})
}

impl Table {
    pub fn new() -> Table {
        Table::with_settings(json!({"dice_seed": 20260101}))
    }

    pub fn with_settings(settings: Value) -> Table {
        let id = Uuid::from_u128(0x5E55_1011);
        let dm = Uuid::from_u128(0xD1);
        let players = [
            Uuid::from_u128(0xA1),
            Uuid::from_u128(0xA2),
            Uuid::from_u128(0xA3),
        ];
        let pcs = [
            Uuid::from_u128(0xC1),
            Uuid::from_u128(0xC2),
            Uuid::from_u128(0xC3),
        ];
        let goblins = [Uuid::from_u128(0x6001), Uuid::from_u128(0x6002)];
        let mut t = Table {
            s: SessionState::empty(id),
            dm,
            players,
            observer: Uuid::from_u128(0x0B5),
            pcs,
            goblins,
            log: vec![],
            next_command: 0,
        };
        let created = SessionState::creation(
            id,
            Uuid::from_u128(0xCA),
            "Night".into(),
            settings,
            dm,
            T0.into(),
        );
        t.s.apply(&created);
        t.log.push(created);
        for (i, sheet) in [aria(), brom(), cyl()].into_iter().enumerate() {
            t.ok(
                players[i],
                Command::Join(JoinRequest {
                    character_id: Some(pcs[i]),
                    role: None,
                    character: Some(sheet),
                    lookup: None,
                }),
            );
        }
        t.ok(
            t.observer,
            Command::Join(JoinRequest {
                role: Some(SessionRole::Observer),
                ..Default::default()
            }),
        );
        for (g, x) in goblins.iter().zip([6, 7]) {
            t.ok(
                dm,
                Command::SpawnCharacter {
                    character_id: Some(*g),
                    sheet: goblin(x, 0),
                },
            );
        }
        t.ok(dm, Command::SessionStart {});
        t
    }

    pub fn ctx(&mut self, user: Uuid) -> Ctx {
        self.next_command += 1;
        Ctx {
            user_id: user,
            admin: false,
            command_id: Uuid::from_u128(0xC0DE_0000 + self.next_command),
            timestamp: T0.into(),
        }
    }

    /// Decides and applies, keeping the log.
    pub fn run(&mut self, user: Uuid, cmd: Command) -> crate::Result<Vec<Event>> {
        let ctx = self.ctx(user);
        self.run_ctx(&ctx, cmd)
    }

    pub fn run_ctx(&mut self, ctx: &Ctx, cmd: Command) -> crate::Result<Vec<Event>> {
        let events = self.s.decide(ctx, &cmd)?;
        for e in &events {
            self.s.apply(e);
            self.log.push(e.clone());
        }
        Ok(events)
    }

    #[track_caller]
    pub fn ok(&mut self, user: Uuid, cmd: Command) -> Vec<Event> {
        let kind = cmd.kind();
        match self.run(user, cmd) {
            Ok(e) => e,
            Err(e) => panic!("{kind} refused: {e}"),
        }
    }

    /// The error code of a refused command; asserts it changed nothing.
    #[track_caller]
    pub fn err(&mut self, user: Uuid, cmd: Command) -> String {
        let before = self.s.clone();
        let kind = cmd.kind();
        match self.run(user, cmd) {
            Ok(e) => panic!("{kind} accepted: {e:?}"),
            Err(e) => {
                assert_eq!(self.s, before, "a refused command changed the state");
                e.code
            }
        }
    }

    pub fn ch(&self, id: Uuid) -> &Character {
        &self.s.game.characters[&id]
    }

    pub fn ch_mut(&mut self, id: Uuid) -> &mut Character {
        self.s.game.characters.get_mut(&id).unwrap()
    }

    /// The user controlling a character (the DM for monsters).
    pub fn owner(&self, c: Uuid) -> Uuid {
        self.pcs
            .iter()
            .position(|p| *p == c)
            .map_or(self.dm, |i| self.players[i])
    }

    /// Moves the dice counter to a point of the stream whose next dice show `faces`
    /// (`(sides, face)` pairs, in the order the rules will roll them).
    pub fn rig(&mut self, faces: &[(u32, u32)]) {
        let seed = self.s.game.seed;
        let start = self.s.game.dice_counter;
        for n in start..start + 5_000_000 {
            let mut r = Roller::new(seed, n);
            if faces.iter().all(|(sides, face)| r.die(*sides) == *face) {
                self.s.game.dice_counter = n;
                return;
            }
        }
        panic!("no point of the stream rolls {faces:?}");
    }

    pub fn place(&mut self, c: Uuid, x: i32, y: i32) {
        self.ok(
            self.dm,
            Command::PlaceCharacter {
                character_id: c,
                position: Pos { x, y },
            },
        );
    }

    /// Starts combat with everyone and hands the turn to `active` (test shortcut that
    /// sets the turn directly, bypassing initiative order).
    pub fn combat(&mut self, participants: &[Uuid], active: Uuid) {
        self.ok(
            self.dm,
            Command::CombatStart {
                participants: participants.to_vec(),
                surprised: vec![],
            },
        );
        self.set_turn(active);
    }

    pub fn set_turn(&mut self, active: Uuid) {
        let c = self.s.game.combat.as_mut().unwrap();
        c.turn = Some(Turn::new(active));
        c.turn_number = c.order.iter().position(|x| *x == active).unwrap() as u32 + 1;
    }

    /// The character whose turn it is (panics outside combat).
    pub fn active(&self) -> Uuid {
        let combat = self.s.game.combat.as_ref().expect("in combat");
        combat.turn.as_ref().expect("a turn").character_id
    }

    pub fn all(&self) -> Vec<Uuid> {
        let mut v = self.pcs.to_vec();
        v.extend(self.goblins);
        v
    }

    /// Declares an action for `actor` as its owner.
    pub fn act(
        &mut self,
        actor: Uuid,
        kind: ActionType,
        targets: &[Uuid],
        details: Value,
    ) -> crate::Result<Vec<Event>> {
        let user = self.owner(actor);
        self.run(user, action(actor, kind, targets, details))
    }

    /// The resolution of a successful action.
    #[track_caller]
    pub fn resolve(
        &mut self,
        actor: Uuid,
        kind: ActionType,
        targets: &[Uuid],
        details: Value,
    ) -> ActionResolved {
        match self.act(actor, kind, targets, details) {
            Ok(events) => resolved(&events),
            Err(e) => panic!("action refused: {e}"),
        }
    }

    /// The error code of a refused action (state unchanged).
    #[track_caller]
    pub fn act_err(
        &mut self,
        actor: Uuid,
        kind: ActionType,
        targets: &[Uuid],
        details: Value,
    ) -> String {
        let user = self.owner(actor);
        self.err(user, action(actor, kind, targets, details))
    }
}

pub fn action(actor: Uuid, kind: ActionType, targets: &[Uuid], details: Value) -> Command {
    Command::ActionDeclare(ActionDeclare {
        action_id: None,
        character_id: actor,
        action_type: kind,
        targets: targets.to_vec(),
        details,
    })
}

#[track_caller]
pub fn resolved(events: &[Event]) -> ActionResolved {
    events
        .iter()
        .find_map(|e| match e {
            Event::ActionResolve(r) => Some(r.clone()),
            _ => None,
        })
        .expect("an action_resolve event")
}

pub fn outcome(r: &ActionResolved, target: Uuid) -> &Outcome {
    r.outcomes.iter().find(|o| o.target_id == target).unwrap()
}

/// A melee weapon attack: +5 to hit, 1d8+3 slashing.
pub fn sword() -> Value {
    json!({"name": "longsword", "attack_bonus": 5, "damage": "1d8+3", "damage_type": "slashing"})
}

/// Replays `log` from an empty state through the stored form.
pub fn replay(id: Uuid, log: &[Event]) -> SessionState {
    let mut s = SessionState::empty(id);
    for e in log {
        let (k, d) = e.to_parts();
        s.apply(&Event::from_parts(&k, d).expect("stored events parse"));
    }
    s
}
