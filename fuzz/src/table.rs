//! The [`crate::decide`] target: a table of users and characters, a script of
//! commands, and the invariants checked after each command and at the end.
//!
//! Input forms:
//!
//! * readable: `{"setup": 255, "limits": {"max_document_bytes": 2048, …},
//!   "commands": [[who, "type", data], …]}` — `setup` as in [`Setup::bits`], `limits`
//!   any subset of `DocLimits` (defaults otherwise), `who` as in [`Table::user`];
//! * anything else: the bytes choose the setup, maybe small limits, and up to
//!   [`MAX_COMMANDS`] commands, each a type (every WebSocket type of
//!   `gs_rules::command::CLIENT_TYPES`, and REST `join` and `save_state`) with data
//!   that is mostly well-formed for the type (real ids, positions, dice, conditions)
//!   and sometimes arbitrary JSON anywhere in it.
//!
//! Each command goes the way it goes in the service: the edge checks of the router
//! (`check_json_text`: nesting and U+0000; `data` an object), the node's decoder
//! (`Command::from_client_json`, or serde for REST bodies), then `decide` (or, for a
//! rollback, `check_rollback` and `decide_rollback` with the past state replayed from
//! the log, as the node does). Invariants:
//!
//! 1. a refused command leaves the state exactly as it was, and has a code;
//! 2. every event survives its stored form (`to_parts`/`from_parts`, `data_json`);
//! 3. the document stays within the state's `DocLimits` (depth, size, width);
//! 4. at the end, replaying the log from the creation event reproduces the live
//!    state, and so does a serde snapshot;
//! 5. at the end, the live state and the replayed one decide the same two probes: a
//!    change that fills the document exactly to `max_document_bytes`, and one byte
//!    more (the live state keeps the document's size incrementally, the replayed one
//!    measures it: a drift in the bookkeeping shows here).

use crate::gen;
use crate::Trace;
use arbitrary::Unstructured;
use gs_rules::command::{JoinRequest, CLIENT_TYPES};
use gs_rules::limits::{self, DocLimits};
use gs_rules::{Command, Ctx, Event, SessionState};
use gs_shared::config::DocumentConfig;
use gs_shared::protocol;
use serde_json::{json, Value};
use uuid::Uuid;

/// Most commands of one input (bytes form).
pub const MAX_COMMANDS: usize = 48;

pub const T0: &str = "2026-01-01T20:00:00.000Z";
const SESSION: u128 = 0x5E55_1011;
const DM: u128 = 0xD1;
const PLAYERS: [u128; 3] = [0xA1, 0xA2, 0xA3];
const OBSERVER: u128 = 0x0B5;
const STRANGER: u128 = 0x5A;
const ADMIN: u128 = 0xAD;
const PCS: [u128; 3] = [0xC1, 0xC2, 0xC3];
const GOBLINS: [u128; 2] = [0x6001, 0x6002];

/// The types a script may send: the WebSocket types and REST `join`/`save_state`.
pub fn types() -> Vec<&'static str> {
    let mut v = CLIENT_TYPES.to_vec();
    v.extend(["join", "save_state"]);
    v
}

/// How the table is set up before the script.
#[derive(Debug, Clone)]
pub struct Setup {
    /// bits 0–1: players who join with a character (0–3); bit 2: the observer joins;
    /// bits 3–4: goblins spawned (0–2); bit 5: the session is started; bit 6:
    /// `allow_client_rolls`; bit 7: combat is started with every character and
    /// initiative rolled.
    pub bits: u8,
    pub limits: DocLimits,
}

/// A setup and the commands to send.
#[derive(Debug, Clone)]
pub struct Script {
    pub setup: Setup,
    pub commands: Vec<(u8, String, Value)>,
}

impl Script {
    pub fn from_bytes(data: &[u8]) -> Script {
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            if let Some(cmds) = v.get("commands").and_then(Value::as_array) {
                let bits = v.get("setup").and_then(Value::as_u64).unwrap_or(255) as u8;
                let limits = v
                    .get("limits")
                    .and_then(|l| serde_json::from_value(l.clone()).ok())
                    .unwrap_or_default();
                let commands = cmds
                    .iter()
                    .filter_map(|c| {
                        let c = c.as_array()?;
                        let who = c.first()?.as_u64()? as u8;
                        let kind = c.get(1)?.as_str()?.to_string();
                        let data = c.get(2).cloned().unwrap_or(json!({}));
                        Some((who, kind, data))
                    })
                    .collect();
                return Script {
                    setup: Setup { bits, limits },
                    commands,
                };
            }
        }
        let mut u = Unstructured::new(data);
        let bits = u.arbitrary::<u8>().unwrap_or(255);
        let limits = if u.ratio(1, 3).unwrap_or(false) {
            small_limits(&mut u)
        } else {
            DocLimits::default()
        };
        let kinds = types();
        let mut commands = vec![];
        while !u.is_empty() && commands.len() < MAX_COMMANDS {
            let who = u.int_in_range(0..=7u8).unwrap_or(0);
            let kind = *u.choose(&kinds).unwrap_or(&"state_update");
            let data = if u.ratio(1, 10).unwrap_or(false) {
                gen::value(&mut u, 5)
            } else {
                template(&mut u, kind)
            };
            commands.push((who, kind.to_string(), data));
        }
        Script {
            setup: Setup { bits, limits },
            commands,
        }
    }
}

/// Small bounds, so that the limits' edges are reached by small inputs.
fn small_limits(u: &mut Unstructured) -> DocLimits {
    DocLimits {
        max_path_depth: u.int_in_range(1..=8).unwrap_or(1),
        max_path_bytes: u.int_in_range(2..=64).unwrap_or(2),
        max_depth: u.int_in_range(2..=10).unwrap_or(2),
        max_value_bytes: u.int_in_range(8..=512).unwrap_or(8),
        max_document_bytes: u.int_in_range(16..=4096).unwrap_or(16),
        max_keys_per_object: u.int_in_range(1..=16).unwrap_or(1),
    }
}

fn ids() -> Vec<Uuid> {
    let mut v: Vec<Uuid> = PCS
        .iter()
        .chain(GOBLINS.iter())
        .map(|x| Uuid::from_u128(*x))
        .collect();
    v.extend([
        Uuid::from_u128(DM),
        Uuid::from_u128(PLAYERS[0]),
        Uuid::nil(),
    ]);
    v
}

/// A character (or user) id: mostly one in play.
fn id(u: &mut Unstructured) -> Value {
    if u.ratio(1, 12).unwrap_or(false) {
        return json!(Uuid::from_u128(u.arbitrary::<u128>().unwrap_or(0)));
    }
    json!(u.choose(&ids()).copied().unwrap_or_default())
}

/// A small coordinate, or one at the map's edges.
fn coord(u: &mut Unstructured) -> Value {
    if u.ratio(1, 10).unwrap_or(false) {
        return json!(*u
            .choose(&[i32::MAX, i32::MIN, 10_000, -10_001, 1_000_000])
            .unwrap_or(&0));
    }
    json!(u.int_in_range(-2..=12i32).unwrap_or(0))
}

fn pos(u: &mut Unstructured) -> Value {
    json!({"x": coord(u), "y": coord(u)})
}

fn small(u: &mut Unstructured, lo: i64, hi: i64) -> Value {
    if u.ratio(1, 12).unwrap_or(false) {
        return json!(*u
            .choose(&[
                i64::MIN,
                -1,
                0,
                i64::MAX,
                1 << 40,
                i64::from(i32::MIN),
                i64::from(i32::MAX)
            ])
            .unwrap_or(&0));
    }
    json!(u.int_in_range(lo..=hi).unwrap_or(lo))
}

const CONDITIONS: &[&str] = &[
    "blinded",
    "charmed",
    "deafened",
    "frightened",
    "grappled",
    "incapacitated",
    "invisible",
    "paralyzed",
    "petrified",
    "poisoned",
    "prone",
    "restrained",
    "stunned",
    "unconscious",
    "dodging",
    "hidden",
    "dead",
    "exhaustion",
    "sleepy",
];
const ABILITIES: &[&str] = &["str", "dex", "con", "int", "wis", "cha", "luck"];
const DAMAGE: &[&str] = &[
    "acid",
    "bludgeoning",
    "cold",
    "fire",
    "force",
    "lightning",
    "necrotic",
    "piercing",
    "poison",
    "psychic",
    "radiant",
    "slashing",
    "thunder",
    "love",
];
const DICE: &[&str] = &[
    "1d8+3",
    "2d6",
    "4d6kh3",
    "1d20",
    "1d4",
    "3d6",
    "1d6+1d4",
    "30",
    "0",
    "-1d4",
    "1d0",
    "0d6",
    "101d6",
    "1d7",
    "d",
    "",
    "1d8+1d8+1d8+1d8+1d8+1d8+1d8+1d8+1d8+1d8+1d8",
    "1000d1000",
    "1d8+99999999999",
    "2d20kl1",
    "4d6kh5",
    "1d6-1001",
];
const ACTIONS: &[&str] = &[
    "attack",
    "save",
    "heal",
    "dash",
    "disengage",
    "dodge",
    "help",
    "hide",
    "ready",
    "other",
    "cast",
];

fn pick(u: &mut Unstructured, from: &[&str]) -> Value {
    json!(*u.choose(from).unwrap_or(&""))
}

fn duration(u: &mut Unstructured) -> Value {
    let mut d = json!({"rounds": small(u, 0, 5), "ends": pick(u, &["start", "end", "middle"])});
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => d["of"] = json!("actor"),
        1 => d["of"] = id(u),
        2 => d["minutes"] = small(u, 0, 10),
        _ => {}
    }
    d
}

fn condition_spec(u: &mut Unstructured) -> Value {
    let mut c = json!({"condition": pick(u, CONDITIONS)});
    if u.arbitrary().unwrap_or(false) {
        c["duration"] = duration(u);
    }
    if u.arbitrary().unwrap_or(false) {
        c["save_ends"] = if u.arbitrary().unwrap_or(false) {
            json!(true)
        } else {
            json!({"ability": pick(u, ABILITIES), "dc": small(u, 1, 30)})
        };
    }
    c
}

fn sheet(u: &mut Unstructured) -> Value {
    let mut s = json!({
        "name": gen::string(u).chars().take(40).collect::<String>(),
        "max_hp": small(u, 1, 60),
        "ac": small(u, 5, 25),
        "speed": *u.choose(&[30, 25, 0, 35, 7, 1000]).unwrap_or(&30),
        "abilities": {"str": small(u, -5, 5), "dex": small(u, -5, 5), "con": small(u, -5, 5)},
        "position": pos(u),
    });
    if u.arbitrary().unwrap_or(false) {
        s["conditions"] = json!([pick(u, CONDITIONS)]);
        s["resistances"] = json!([pick(u, DAMAGE)]);
        s["save_proficiencies"] = json!([pick(u, ABILITIES)]);
        s["attacks_per_action"] = small(u, 0, 4);
        s["reach"] = small(u, 0, 20);
        s["side"] = pick(u, &["party", "monsters", ""]);
    }
    s
}

fn details(u: &mut Unstructured) -> Value {
    let mut d = json!({});
    let fields = u.int_in_range(0..=8u8).unwrap_or(0);
    for _ in 0..fields {
        match u.int_in_range(0..=17u8).unwrap_or(0) {
            0 => d["attack_bonus"] = small(u, -2, 12),
            1 => d["damage"] = pick(u, DICE),
            2 => d["damage_type"] = pick(u, DAMAGE),
            3 => d["range"] = json!({"normal": small(u, 5, 80), "long": small(u, 5, 320)}),
            4 => d["reach"] = small(u, 0, 15),
            5 => {
                d["save"] = json!({"ability": pick(u, ABILITIES), "dc": small(u, 1, 30),
                "half_on_success": u.arbitrary::<bool>().unwrap_or(false)})
            }
            6 => d["conditions"] = json!([condition_spec(u)]),
            7 => d["cost"] = pick(u, &["action", "bonus_action", "reaction", "free"]),
            8 => d["extra_damage"] = json!([{"dice": pick(u, DICE), "type": pick(u, DAMAGE)}]),
            9 => d["concentration"] = json!(true),
            10 => d["amount"] = pick(u, DICE),
            11 => d["against"] = id(u),
            12 => d["action"] = pick(u, ACTIONS),
            13 => d["readied"] = json!(true),
            14 => d["cover"] = pick(u, &["none", "half", "three_quarters", "total"]),
            15 => d["attack_dice"] = pick(u, DICE),
            16 => d["advantage"] = json!(true),
            _ => d["attacks"] = small(u, 0, 5),
        }
    }
    d
}

/// Data for a command type: mostly what the type expects.
pub fn template(u: &mut Unstructured, kind: &str) -> Value {
    let mut d = match kind {
        "state_update" => {
            let n = match u.int_in_range(0..=9u8).unwrap_or(0) {
                0 => 0,
                9 => u.int_in_range(95..=105usize).unwrap_or(100),
                _ => u.int_in_range(1..=4usize).unwrap_or(1),
            };
            let changes: Vec<Value> = (0..n)
                .map(|_| {
                    let mut c = json!({"path": gen::path(u)});
                    match u.int_in_range(0..=4u8).unwrap_or(0) {
                        0 => c["op"] = json!("remove"),
                        1 => {
                            c["value"] = gen::value(u, 4);
                            c["previous"] = gen::value(u, 1);
                        }
                        _ => c["value"] = gen::value(u, 4),
                    }
                    c
                })
                .collect();
            json!({ "changes": changes })
        }
        "spawn_character" => {
            let mut d = json!({"sheet": sheet(u)});
            if u.arbitrary().unwrap_or(false) {
                d["character_id"] = id(u);
            }
            d
        }
        "character_update" => {
            let mut ch = json!({});
            for _ in 0..u.int_in_range(0..=3u8).unwrap_or(0) {
                match u.int_in_range(0..=5u8).unwrap_or(0) {
                    0 => ch["hp"] = small(u, -5, 70),
                    1 => ch["max_hp"] = small(u, -1, 70),
                    2 => ch["temp_hp"] = small(u, 0, 10),
                    3 => ch["ac"] = small(u, 0, 30),
                    4 => ch["conditions"] = json!([pick(u, CONDITIONS)]),
                    _ => ch["speed"] = small(u, 0, 60),
                }
            }
            json!({"character_id": id(u), "changes": ch})
        }
        "place_character" => json!({"character_id": id(u), "position": pos(u)}),
        "combat_start" | "combat_add" => {
            let n = u.int_in_range(0..=6usize).unwrap_or(0);
            let ps: Vec<Value> = (0..n).map(|_| id(u)).collect();
            let mut d = json!({ "participants": ps });
            if kind == "combat_start" && u.arbitrary().unwrap_or(false) {
                d["surprised"] = json!([id(u)]);
            }
            d
        }
        "initiative_roll" => {
            let mut d = json!({"character_id": id(u)});
            if u.arbitrary().unwrap_or(false) {
                d["roll"] = small(u, 0, 21);
            }
            if u.arbitrary().unwrap_or(false) {
                d["modifiers"] = json!({"dex": small(u, -5, 5), "bless": small(u, -1000, 1000)});
            }
            d
        }
        "action_declare" => {
            let n = u.int_in_range(0..=3usize).unwrap_or(0);
            let targets: Vec<Value> = (0..n).map(|_| id(u)).collect();
            json!({"character_id": id(u), "action_type": pick(u, ACTIONS),
                   "targets": targets, "details": details(u)})
        }
        "move" => {
            let mut d = json!({"character_id": id(u), "to": pos(u)});
            if u.arbitrary().unwrap_or(false) {
                let n = u.int_in_range(0..=6usize).unwrap_or(0);
                d["path"] = Value::Array((0..n).map(|_| pos(u)).collect());
            }
            d
        }
        "apply_condition" => {
            let mut d = condition_spec(u);
            d["character_id"] = id(u);
            if u.arbitrary().unwrap_or(false) {
                d["source"] = id(u);
            }
            d
        }
        "remove_condition" => json!({"character_id": id(u), "condition": pick(u, CONDITIONS)}),
        "stand_up" | "end_concentration" | "reaction_decline" => json!({"character_id": id(u)}),
        "terrain_set" => {
            let n = u.int_in_range(0..=4usize).unwrap_or(0);
            let squares: Vec<Value> = (0..n)
                .map(|_| {
                    json!({"x": coord(u), "y": coord(u), "difficult": u.arbitrary::<bool>().unwrap_or(false),
                           "cover": pick(u, &["none", "half", "three_quarters", "full"])})
                })
                .collect();
            json!({"squares": squares, "clear": u.arbitrary::<bool>().unwrap_or(false)})
        }
        "rollback" => json!({"to_version": small(u, 0, 40)}),
        "join" => {
            let mut d = json!({});
            match u.int_in_range(0..=4u8).unwrap_or(0) {
                0 => d["role"] = pick(u, &["player", "observer", "dm", "god"]),
                1 => {
                    d["character_id"] = id(u);
                    d["character"] = sheet(u);
                }
                2 => d["character_id"] = id(u),
                _ => {}
            }
            d
        }
        "save_state" => {
            let state = match u.int_in_range(0..=3u8).unwrap_or(0) {
                0 => json!({}),
                1 => gen::value(u, 6),
                _ => json!({"map": gen::value(u, 3), "notes": gen::string(u)}),
            };
            let mut d = json!({ "state": state });
            if u.arbitrary().unwrap_or(false) {
                d["metadata"] = gen::value(u, 2);
            }
            d
        }
        // leave, session_*, combat_end, end_turn: no data.
        _ => json!({}),
    };
    // Now and then a field of any type, or an unknown field.
    if u.ratio(1, 8).unwrap_or(false) {
        if let Some(m) = d.as_object_mut() {
            let k = match m.keys().nth(u.int_in_range(0..=m.len()).unwrap_or(0)) {
                Some(k) => k.clone(),
                None => gen::key(u),
            };
            m.insert(k, gen::value(u, 3));
        }
    }
    d
}

/// The table: the session's live state, its log, and where the next command id comes
/// from.
pub struct Table {
    pub s: SessionState,
    pub log: Vec<Event>,
    next_command: u128,
    max_json_depth: usize,
}

impl Table {
    /// Creates the session and sets the table up as `setup` says (through
    /// [`Table::step`], so the setup is checked like the script).
    pub fn new(setup: &Setup, t: &mut Trace) -> Table {
        let id = Uuid::from_u128(SESSION);
        let mut s = SessionState::empty(id);
        s.limits = setup.limits;
        let settings = json!({"dice_seed": 20260101, "allow_client_rolls": setup.bits & 64 != 0});
        let created = SessionState::creation(
            id,
            Uuid::from_u128(0xCA),
            "Night".into(),
            settings,
            Uuid::from_u128(DM),
            T0.into(),
        );
        s.apply(&created);
        let mut table = Table {
            s,
            log: vec![created],
            next_command: 0,
            max_json_depth: DocumentConfig::default().max_json_depth,
        };
        let b = setup.bits;
        let players = (b & 3) as usize;
        let sheets = [
            json!({"name": "Aria", "max_hp": 30, "ac": 16, "abilities": {"str": 3, "dex": 2},
                   "attacks_per_action": 2, "position": {"x": 0, "y": 0}}),
            json!({"name": "Brom", "max_hp": 24, "ac": 18, "abilities": {"wis": 3},
                   "speed": 25, "position": {"x": 0, "y": 2}}),
            json!({"name": "Cyl", "max_hp": 16, "ac": 12, "abilities": {"int": 3},
                   "position": {"x": 0, "y": 4}}),
        ];
        for (i, sheet) in sheets.into_iter().enumerate().take(players) {
            let data = json!({"character_id": Uuid::from_u128(PCS[i]), "character": sheet});
            table.step(1 + i as u8, "join", &data, t);
        }
        if b & 4 != 0 {
            table.step(4, "join", &json!({"role": "observer"}), t);
        }
        let goblins = ((b >> 3) & 3).min(2) as usize;
        for (i, g) in GOBLINS.iter().enumerate().take(goblins) {
            let data = json!({"character_id": Uuid::from_u128(*g), "sheet":
                {"name": "Goblin", "max_hp": 7, "ac": 15, "abilities": {"dex": 2},
                 "position": {"x": 6 + i, "y": 0}}});
            table.step(0, "spawn_character", &data, t);
        }
        if b & 32 != 0 {
            table.step(0, "session_start", &json!({}), t);
        }
        if b & 128 != 0 {
            let chars: Vec<Uuid> = table.s.game.characters.keys().copied().collect();
            table.step(0, "combat_start", &json!({ "participants": chars }), t);
            for c in chars {
                let who = PCS
                    .iter()
                    .position(|p| Uuid::from_u128(*p) == c)
                    .map_or(0, |i| 1 + i as u8);
                table.step(who, "initiative_roll", &json!({ "character_id": c }), t);
            }
        }
        t.hit(("setup", b, table.s.version));
        table
    }

    /// The user `who` stands for, and whether its token is an admin's: 0 the DM, 1–3
    /// the players, 4 the observer, 5 a stranger, 6 an admin stranger, 7 player 1 with
    /// an admin token.
    pub fn user(who: u8) -> (Uuid, bool) {
        match who % 8 {
            0 => (Uuid::from_u128(DM), false),
            i @ 1..=3 => (Uuid::from_u128(PLAYERS[i as usize - 1]), false),
            4 => (Uuid::from_u128(OBSERVER), false),
            5 => (Uuid::from_u128(STRANGER), false),
            6 => (Uuid::from_u128(ADMIN), true),
            _ => (Uuid::from_u128(PLAYERS[0]), true),
        }
    }

    /// What the router and the node's decoder make of a command: `Err` with the code
    /// of the refusal at the edge or in decoding.
    fn decode(&self, kind: &str, data: &Value) -> Result<Command, String> {
        let text = data.to_string();
        match kind {
            "join" | "save_state" => {
                // A REST body: checked as a whole, a JSON object.
                protocol::check_json_text(&text, self.max_json_depth).map_err(|e| e.code)?;
                if !data.is_object() {
                    return Err("bad_request".into());
                }
                if kind == "join" {
                    return serde_json::from_value::<JoinRequest>(data.clone())
                        .map(Command::Join)
                        .map_err(|_| "invalid_payload".into());
                }
                let state = match data.get("state") {
                    Some(v @ Value::Object(_)) => v.clone(),
                    _ => return Err("bad_request".into()),
                };
                let metadata = match data.get("metadata") {
                    None | Some(Value::Null) => json!({}),
                    Some(v @ Value::Object(_)) => v.clone(),
                    Some(_) => return Err("bad_request".into()),
                };
                Ok(Command::SaveState { state, metadata })
            }
            _ => {
                // A WebSocket message: the envelope's `data` must be an object (null
                // stands for `{}`), nested one level inside the envelope.
                let text = match data {
                    Value::Null => "{}".to_string(),
                    Value::Object(_) => text,
                    _ => return Err("invalid_message".into()),
                };
                protocol::check_json_text(&text, self.max_json_depth - 1).map_err(|e| e.code)?;
                Command::from_client_json(kind, &text).map_err(|e| e.code)
            }
        }
    }

    /// Sends one command as `who` and checks the invariants of one step.
    pub fn step(&mut self, who: u8, kind: &str, data: &Value, t: &mut Trace) {
        if std::env::var_os("GS_FUZZ_VERBOSE").is_some() {
            let text = data.to_string();
            eprintln!(
                "step {who} {kind} {}",
                &text[..text.floor_char_boundary(300)]
            );
        }
        let cmd = match self.decode(kind, data) {
            Ok(c) => c,
            Err(code) => {
                t.hit(("edge", kind, code));
                return;
            }
        };
        let (user, admin) = Table::user(who);
        self.next_command += 1;
        let ctx = Ctx {
            user_id: user,
            admin,
            command_id: Uuid::from_u128(0xC0DE_0000_0000 + self.next_command),
            timestamp: T0.into(),
        };
        let before = self.s.clone();
        let result = match cmd {
            Command::Rollback { to_version } => match self.s.check_rollback(&ctx, to_version) {
                Ok(()) => {
                    let past = self.replay(to_version as usize);
                    self.s.decide_rollback(&ctx, to_version, &past)
                }
                Err(e) => Err(e),
            },
            ref c => self.s.decide(&ctx, c),
        };
        match result {
            Err(e) => {
                assert!(!e.code.is_empty(), "a refusal without a code");
                assert!(self.s == before, "a refused {kind} ({e}) changed the state");
                t.hit(("refused", kind, e.code, who % 8));
            }
            Ok(events) => {
                let mut kinds = vec![];
                for e in events {
                    let (k, d) = e.to_parts();
                    let text: Value =
                        serde_json::from_str(&e.data_json()).expect("data_json is JSON");
                    assert_eq!(text, d, "data_json differs from to_parts for {k}");
                    let back = Event::from_parts(&k, d).expect("a stored event parses");
                    assert_eq!(back, e, "a {k} event changed in storage");
                    // As the owner applies it (taking the event); `check_end`
                    // replays the stored form through `apply`: the two must agree.
                    self.s.apply_owned(e.clone());
                    kinds.push(e.kind());
                    self.log.push(e);
                }
                self.check_document();
                t.hit(("applied", kind, kinds));
            }
        }
        assert_eq!(self.s.version as usize, self.log.len());
    }

    /// The document is within the state's bounds.
    fn check_document(&self) {
        let l = &self.s.limits;
        let doc = &self.s.doc;
        assert!(doc.is_object(), "the document is not an object");
        let depth = limits::depth(doc);
        assert!(
            depth <= l.max_depth.max(1),
            "document depth {depth} > {}",
            l.max_depth
        );
        let size = limits::json_len(doc);
        assert!(
            size <= l.max_document_bytes.max(2),
            "document size {size} > {}",
            l.max_document_bytes
        );
        let width = limits::widest_object(doc);
        assert!(
            width <= l.max_keys_per_object,
            "an object of {width} members > {}",
            l.max_keys_per_object
        );
    }

    /// The state after the first `n` events of the log, through their stored form.
    pub fn replay(&self, n: usize) -> SessionState {
        let mut s = SessionState::empty(self.s.id);
        s.limits = self.s.limits;
        for e in &self.log[..n] {
            let (k, d) = e.to_parts();
            s.apply(&Event::from_parts(&k, d).expect("stored events parse"));
        }
        s
    }

    /// The invariants of the end of a script.
    pub fn check_end(&mut self, t: &mut Trace) {
        let replayed = self.replay(self.log.len());
        assert!(replayed == self.s, "replaying the log gives another state");
        let snap = serde_json::to_value(&self.s).expect("a state serialises");
        let mut back: SessionState = serde_json::from_value(snap).expect("a snapshot loads");
        back.limits = self.s.limits;
        assert!(back == self.s, "a snapshot does not round-trip");
        // The size bookkeeping: live (incremental) and replayed (measured) agree on
        // the document's edge.
        let size = limits::json_len(&self.s.doc);
        let l = self.s.limits;
        let key = "zz";
        if self.s.doc.get(key).is_none() && size < l.max_document_bytes {
            let comma = usize::from(self.s.doc.as_object().is_some_and(|m| !m.is_empty()));
            // `"zz":"…"`: comma + 4 + 1 + n + 2 bytes.
            let fixed = comma + 4 + 1 + 2;
            let room = l.max_document_bytes - size;
            if room >= fixed {
                for extra in [0, 1] {
                    let n = room - fixed + extra;
                    let data = json!({"changes": [{"path": "/zz", "value": "z".repeat(n)}]});
                    let cmd = Command::from_client("state_update", data).expect("a probe decodes");
                    let ctx = Ctx {
                        user_id: Uuid::from_u128(DM),
                        admin: false,
                        command_id: Uuid::from_u128(0xFFFF),
                        timestamp: T0.into(),
                    };
                    let live = self.s.decide(&ctx, &cmd);
                    let fresh = replayed.decide(&ctx, &cmd);
                    assert_eq!(
                        live.as_ref().map_err(|e| &e.details),
                        fresh.as_ref().map_err(|e| &e.details),
                        "the live state and its replay decide a probe of {n} bytes differently"
                    );
                    if let Err(e) = &fresh {
                        t.hit(("probe", extra, e.code.clone()));
                    } else {
                        assert_eq!(extra, 0, "a document one byte over the bound was accepted");
                        t.hit(("probe", extra, "ok"));
                    }
                }
            }
        }
        t.hit(("end", self.s.status.as_str(), self.log.len().min(64)));
    }
}
