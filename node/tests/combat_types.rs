//! The router rate-limits "combat actions per minute per player" by message type alone
//! (`gs_shared::protocol::COMBAT_TYPES`, so it needs no rules); the rules classify the
//! parsed command (`gs_rules::Command::is_combat`). They must agree on every client
//! message type.

use gs_rules::command::CLIENT_TYPES;
use gs_rules::Command;
use gs_shared::protocol::{is_combat_type, COMBAT_TYPES};
use serde_json::{json, Value};

/// A payload that parses for `kind`.
fn sample(kind: &str) -> Value {
    let id = "00000000-0000-0000-0000-0000000000c1";
    match kind {
        "state_update" => json!({"changes": [{"path": "/a", "value": 1}]}),
        "spawn_character" => json!({"sheet": {"max_hp": 7, "ac": 15}}),
        "character_update" => json!({"character_id": id, "changes": {}}),
        "place_character" => json!({"character_id": id, "position": {"x": 0, "y": 0}}),
        "combat_start" | "combat_add" => json!({"participants": [id]}),
        "initiative_roll" | "stand_up" | "end_concentration" | "reaction_decline" => {
            json!({"character_id": id})
        }
        "action_declare" => json!({"character_id": id, "action_type": "dodge"}),
        "move" => json!({"character_id": id, "to": {"x": 1, "y": 0}}),
        "apply_condition" | "remove_condition" => json!({"character_id": id, "condition": "prone"}),
        "terrain_set" => json!({"clear": true}),
        "rollback" => json!({"to_version": 1}),
        "narrate" => json!({"prompt": "the cave"}),
        "monster_decide" => json!({"character_id": id}),
        "map_request" => json!({"description": "a cave", "grid": {"width": 10, "height": 10}}),
        _ => json!({}),
    }
}

#[test]
fn router_and_rules_agree_on_combat_actions() {
    for kind in CLIENT_TYPES {
        let cmd =
            Command::from_client(kind, sample(kind)).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(cmd.is_combat(), is_combat_type(kind), "{kind}");
    }
    for kind in COMBAT_TYPES {
        assert!(CLIENT_TYPES.contains(kind), "{kind} is not a client type");
    }
}
