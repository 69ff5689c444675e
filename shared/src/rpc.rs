//! The internal contract between routers and nodes, over NATS.
//!
//! Subjects (all under `nats.subject_prefix`, `gs` by default):
//!
//! | subject                         | direction        | payload                 |
//! |---------------------------------|------------------|-------------------------|
//! | `gs.node.{node}.rpc`            | router → node    | [`NodeRequest`] → [`NodeReply`] (request/reply) |
//! | `gs.session.{session}.events`   | owner → routers  | a rendered event, header `Gs-Version` |
//! | `gs.cluster.heartbeat`          | every member     | [`crate::membership::Heartbeat`] |
//! | `gs.cluster.leave`              | leaving member   | [`crate::membership::Leave`] |
//! | `gs.cluster.suspect`            | router → all     | a node id that gave "no responders" |
//!
//! Requests name a session; the router sends them to the node its ring names. A node
//! that does not own the session answers `not_owner` with its own view of the owner,
//! and the router retries (same command id) until its deadline.

use crate::auth::Role;
use crate::protocol::WireError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// NATS subject names of one cluster.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    pub fn node_rpc(&self, node: &str) -> String {
        format!("{}.node.{node}.rpc", self.prefix)
    }
    pub fn session_events(&self, session: &Uuid) -> String {
        format!("{}.session.{session}.events", self.prefix)
    }
    pub fn heartbeat(&self) -> String {
        format!("{}.cluster.heartbeat", self.prefix)
    }
    pub fn leave(&self) -> String {
        format!("{}.cluster.leave", self.prefix)
    }
    pub fn suspect(&self) -> String {
        format!("{}.cluster.suspect", self.prefix)
    }
}

/// Who is asking, as established by the router from the access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub user_id: Uuid,
    pub role: Role,
}

/// A request to the owner of `session_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRequest {
    pub session_id: Uuid,
    pub caller: Caller,
    pub body: RequestBody,
    /// Wall-clock time (ms since the epoch) after which the router no longer waits for
    /// the answer: a node must not apply a command past it, so that a command the
    /// client was told failed does not take effect later. Clocks of routers and nodes
    /// are assumed synchronised to well within `forward::DEADLINE_GRACE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// Milliseconds since the epoch, by the wall clock.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl NodeRequest {
    /// Whether the router has stopped waiting for this request.
    pub fn expired(&self) -> bool {
        self.deadline_ms.is_some_and(|d| wall_ms() > d)
    }
}

/// On the wire `{"op": …, "args": {…}}`, the tag first: serde then reads the arguments
/// straight into the variant (an internally tagged enum would buffer the whole request
/// first, a measurable cost per command).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum RequestBody {
    /// `POST /sessions`: the router chose the id; a retry of the same create is a no-op.
    Create {
        campaign_id: Uuid,
        name: String,
        settings: Value,
    },
    /// `POST /sessions/{id}/join`; `data` is the request body.
    Join {
        command_id: Uuid,
        data: Value,
        /// The Character Service's answer about `data.character_id`, added by the
        /// owner before the join enters the session (`gs_rules::command::CharacterLookup`
        /// as JSON); never from the client.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lookup: Option<Value>,
    },
    /// A client command from a WebSocket (`state_update`, combat messages, ...).
    Command {
        command_id: Uuid,
        kind: String,
        /// The message's `data` as the client sent it (a JSON object).
        data: crate::protocol::RawJson,
        /// The router follows the session's events and takes an applied command's ack
        /// from its last event (NATS header `Gs-Ack`): the owner sends no reply then
        /// (refusals, duplicates and errors are still replies).
        #[serde(default)]
        ack_by_event: bool,
    },
    /// `POST /sessions/{id}/state`: replaces the state document.
    SaveState {
        command_id: Uuid,
        state: Value,
        metadata: Value,
    },
    /// `GET /sessions/{id}/state`.
    GetState,
    /// `sync_request`; `paths` narrows the answer to those JSON Pointers.
    Sync { paths: Option<Vec<String>> },
    /// Events with version > `after`, at most `limit` (gap filling).
    EventsSince { after: u64, limit: u64 },
    /// A WebSocket connection opened; answers with what the client needs to start or
    /// resume (events after `last_version`, or the full state).
    Attach {
        conn_id: Uuid,
        router_id: String,
        last_version: Option<u64>,
        replay_limit: u64,
    },
    /// A WebSocket connection whose session moved to this node (a handoff, a
    /// failover): the new owner records it as attached (presence, the ICD's
    /// `session:{id}:connections`); nothing is resumed (the router follows the stream).
    Reattach { conn_id: Uuid, router_id: String },
    /// A WebSocket connection closed.
    Detach { conn_id: Uuid },
    /// A WebSocket connection is alive (its client sent a heartbeat, or answered the
    /// router's pings): the owner refreshes its `session:{id}:connections` entry and
    /// the hash's TTL (the ICD's "5 minutes after last heartbeat").
    Touch { conn_id: Uuid },
    /// `GET /sessions/{id}/presence`: who is connected.
    Presence,
    /// `GET /sessions/{id}/history`: the audit log, newest first, before `before`.
    History { before: Option<u64>, limit: u64 },
    /// Liveness probe of the node itself (the session id is ignored).
    Ping,
    /// An inbound Message Hub event (`character.state.changed`,
    /// `campaign.state.changed`) for the owner to apply; `event_id` makes a
    /// redelivery a no-op.
    HubEvent {
        event_id: Uuid,
        kind: String,
        payload: Value,
    },
}

impl RequestBody {
    /// Name for logs and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            RequestBody::Create { .. } => "create",
            RequestBody::Join { .. } => "join",
            RequestBody::Command { .. } => "command",
            RequestBody::SaveState { .. } => "save_state",
            RequestBody::GetState => "get_state",
            RequestBody::Sync { .. } => "sync",
            RequestBody::EventsSince { .. } => "events_since",
            RequestBody::Attach { .. } => "attach",
            RequestBody::Reattach { .. } => "reattach",
            RequestBody::Detach { .. } => "detach",
            RequestBody::Touch { .. } => "touch",
            RequestBody::Presence => "presence",
            RequestBody::History { .. } => "history",
            RequestBody::Ping => "ping",
            RequestBody::HubEvent { .. } => "hub_event",
        }
    }
}

/// The node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum NodeReply {
    Ok {
        body: ReplyBody,
    },
    Err {
        error: WireError,
        /// With `not_owner`: the node this node believes owns the session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
}

impl NodeReply {
    pub fn err(error: WireError) -> Self {
        NodeReply::Err { error, owner: None }
    }
}

/// What a session looks like to a client: the state document, its metadata, the
/// rules-managed part (`game`: lifecycle, members, characters, combat) and the version.
///
/// On the wire it has the ICD's shape (`GET /state`, `sync_response`, `session_state`):
/// `version` is a *string* of the decimal number, as the ICD types it, and the
/// extension `version_number` carries the same number as a number. It reads either
/// form back (a number in `version`, or `version_number` alone).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionView {
    pub state: Value,
    pub metadata: Value,
    pub game: Value,
    pub version: u64,
    pub timestamp: String,
}

impl SessionView {
    /// The session's lifecycle status (`game.status`), if the view has one.
    pub fn status(&self) -> Option<crate::protocol::SessionStatus> {
        Deserialize::deserialize(&self.game["status"]).ok()
    }
}

impl Serialize for SessionView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            state: &'a Value,
            metadata: &'a Value,
            game: &'a Value,
            version: String,
            version_number: u64,
            timestamp: &'a str,
        }
        Wire {
            state: &self.state,
            metadata: &self.metadata,
            game: &self.game,
            version: self.version.to_string(),
            version_number: self.version,
            timestamp: &self.timestamp,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SessionView {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            state: Value,
            metadata: Value,
            game: Value,
            #[serde(default)]
            version: Option<Value>,
            #[serde(default)]
            version_number: Option<u64>,
            timestamp: String,
        }
        let w = Wire::deserialize(d)?;
        let version = w
            .version_number
            .or_else(|| w.version.as_ref().and_then(version_number))
            .ok_or_else(|| serde::de::Error::custom("a session view needs its version"))?;
        Ok(SessionView {
            state: w.state,
            metadata: w.metadata,
            game: w.game,
            version,
            timestamp: w.timestamp,
        })
    }
}

/// A version as the ICD types it (a string of the decimal number) or as a number.
pub fn version_number(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// An event as stored and as sent to clients (`json` is the rendered message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEvent {
    pub version: u64,
    pub json: SharedJson,
}

/// JSON text (a rendered event) shared without copying: a clone is a reference count,
/// and the same bytes go to NATS, to the recent-events buffer and to every client.
/// Always valid UTF-8 (built from a `String`). On the wire, a JSON string.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedJson(bytes::Bytes);

impl SharedJson {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("SharedJson holds UTF-8")
    }

    /// The text's bytes, borrowed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes (shared, not copied).
    pub fn bytes(&self) -> bytes::Bytes {
        self.0.clone()
    }
}

impl From<String> for SharedJson {
    fn from(s: String) -> Self {
        SharedJson(bytes::Bytes::from(s))
    }
}

impl From<&str> for SharedJson {
    fn from(s: &str) -> Self {
        SharedJson(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl std::fmt::Debug for SharedJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for SharedJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SharedJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SharedJson::from)
    }
}

/// How a (re)connecting client catches up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Resume {
    /// The events after the client's `last_version`, in order.
    Events { events: Vec<RawEvent> },
    /// The whole state at `view.version`.
    Full { view: SessionView },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplyBody {
    /// A command was committed (or had been: `duplicate`) at `version`.
    Ack {
        version: u64,
        duplicate: bool,
    },
    Created {
        version: u64,
        view: SessionView,
    },
    Joined {
        version: u64,
        session_role: String,
        view: SessionView,
    },
    State {
        view: SessionView,
    },
    Events {
        events: Vec<RawEvent>,
        /// The session's version when answering.
        current: u64,
    },
    Attached {
        session_role: String,
        version: u64,
        resume: Resume,
    },
    History {
        entries: Vec<Value>,
        next_before: Option<u64>,
    },
    Presence {
        players: Vec<Present>,
    },
    Done,
}

/// A connected user of a session and how many sockets it has open (any router).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Present {
    pub player_id: Uuid,
    pub connections: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_round_trip_as_json() {
        let req = NodeRequest {
            session_id: Uuid::new_v4(),
            caller: Caller {
                user_id: Uuid::new_v4(),
                role: Role::Player,
            },
            body: RequestBody::Command {
                command_id: Uuid::new_v4(),
                kind: "state_update".into(),
                data: crate::protocol::RawJson::of(&json!({"changes": []})),
                ack_by_event: true,
            },
            deadline_ms: Some(wall_ms() + 5000),
        };
        assert!(!req.expired());
        let s = serde_json::to_string(&req).unwrap();
        assert!(s.contains(r#""body":{"op":"command","args":{"#), "{s}");
        assert_eq!(serde_json::from_str::<NodeRequest>(&s).unwrap(), req);

        let rep = NodeReply::Err {
            error: WireError::new("not_owner", "x"),
            owner: Some("node-2".into()),
        };
        let s = serde_json::to_string(&rep).unwrap();
        assert_eq!(serde_json::from_str::<NodeReply>(&s).unwrap(), rep);
    }

    #[test]
    fn raw_events_carry_their_json_as_a_string() {
        let ev = RawEvent {
            version: 2,
            json: r#"{"type":"x","version":2}"#.into(),
        };
        let s = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            s,
            r#"{"version":2,"json":"{\"type\":\"x\",\"version\":2}"}"#
        );
        assert_eq!(serde_json::from_str::<RawEvent>(&s).unwrap(), ev);
    }

    #[test]
    fn views_carry_the_version_as_the_icd_types_it() {
        let view = SessionView {
            state: json!({"a": 1}),
            metadata: json!({}),
            game: json!({"status": "active"}),
            version: 43,
            timestamp: "2026-12-01T00:00:00.000Z".into(),
        };
        let v = serde_json::to_value(&view).unwrap();
        assert_eq!(v["version"], json!("43"));
        assert_eq!(v["version_number"], json!(43));
        assert_eq!(serde_json::from_value::<SessionView>(v).unwrap(), view);
        // Either form alone reads back.
        let only_string = json!({"state": {"a": 1}, "metadata": {}, "game": {"status": "active"},
            "version": "43", "timestamp": "2026-12-01T00:00:00.000Z"});
        assert_eq!(
            serde_json::from_value::<SessionView>(only_string).unwrap(),
            view
        );
        let number = json!({"state": {"a": 1}, "metadata": {}, "game": {"status": "active"},
            "version": 43, "timestamp": "2026-12-01T00:00:00.000Z"});
        assert_eq!(serde_json::from_value::<SessionView>(number).unwrap(), view);
        let none = json!({"state": {}, "metadata": {}, "game": {}, "timestamp": ""});
        assert!(serde_json::from_value::<SessionView>(none).is_err());
        assert_eq!(version_number(&json!("x")), None);
    }

    #[test]
    fn subjects() {
        let s = Subjects::new("gs");
        let id = Uuid::nil();
        assert_eq!(s.node_rpc("n1"), "gs.node.n1.rpc");
        assert_eq!(
            s.session_events(&id),
            "gs.session.00000000-0000-0000-0000-000000000000.events"
        );
    }
}
