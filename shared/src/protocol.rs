//! The client wire protocol (WebSocket text frames, JSON), as documented in
//! `docs/protocol.md`.
//!
//! Client → server: `{"id": uuid, "type": string, "data": object}`. Every such message
//! is answered with `ack` (`{"type":"ack","id":…,"data":{"version":N}}`) or `error`
//! (`{"type":"error","id":…,"error":{"code","message","details"}}`).
//!
//! Server → client session events: `{"type": T, "version": N, "data": {…}}`, where `N`
//! is the session version the event produced (one more than the previous event's).
//! Events are rendered once by the owning node ([`render_event`]) and forwarded to
//! clients byte for byte.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use uuid::Uuid;

/// The wire error type and its one code table live in `gs_wire` (below the rules and
/// this crate): each code's HTTP status, retryability and meaning are read from there.
pub use gs_wire::{codes, Code, WireError, CODES};

/// WebSocket close codes the server uses besides the standard ones (1000 session
/// ended, 1001 router shutting down). 4000–4999 are for applications (RFC 6455
/// §7.4.2): a socket the server closes after a `connection_error` closes with
/// [`close_codes::for_error`], 4000 + the HTTP status of the error's code (4400 bad
/// request, 4401 unauthorised, 4403 forbidden, 4404 no such session, 4408 silent or
/// idle, 4429 rate limited or too many sockets, 4500 internal, 4503 unavailable);
/// the one exception is 4008 (`slow_consumer`).
pub mod close_codes {
    use super::WireError;

    /// The access or connection token expired while the socket was open (after a
    /// `connection_error` `token_expired`): reconnect with fresh tokens.
    pub const TOKEN_EXPIRED: u16 = 4401;
    /// The user is no longer a member of the session (left or was removed; after a
    /// `connection_error` `not_member`).
    pub const NOT_MEMBER: u16 = 4403;
    /// The client went silent (no frame, not even a pong, for
    /// `router.client_silence_timeout_ms`) or idle (no message for
    /// `router.ws_idle_timeout_ms`).
    pub const TIMEOUT: u16 = 4408;
    /// The client does not read (`slow_consumer`).
    pub const SLOW_CONSUMER: u16 = 4008;

    /// The close code after a `connection_error` carrying `err`: 4000 + its HTTP
    /// status ([`WireError::http_status`], from the code table; 4503 for a full
    /// router), except 4008 for `slow_consumer`.
    pub fn for_error(err: &WireError) -> u16 {
        if err.code == super::codes::SLOW_CONSUMER {
            return SLOW_CONSUMER;
        }
        match err.http_status() {
            s @ 400..=599 => 4000 + s,
            _ => 4500,
        }
    }
}

/// A JSON object as received, kept as text: the router checks the envelope and passes
/// the payload on without building a JSON value; the owner reads it straight into the
/// command it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// `{}`.
    pub fn empty_object() -> RawJson {
        RawJson(RawValue::from_string("{}".into()).expect("{} is JSON"))
    }

    /// The JSON of a value.
    pub fn of(v: &impl Serialize) -> RawJson {
        RawJson(serde_json::value::to_raw_value(v).expect("a value serialises"))
    }

    /// Reads it as `T`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.get())
    }

    /// As a JSON value (for code that inspects it freely).
    pub fn to_value(&self) -> Value {
        self.parse().unwrap_or(Value::Null)
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// A parsed client → server message.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMessage {
    /// The envelope's `id`; for a message without one (an ICD client's), a
    /// `state_update`'s `data.update_id`, else an id the router made up.
    pub id: Uuid,
    /// The message had no envelope `id`: its sender follows the ICD alone and gets
    /// no `ack` (its own change comes back as the event carrying its `update_id`).
    pub anonymous: bool,
    pub kind: String,
    /// Always a JSON object (`{}` when the message had none).
    pub data: RawJson,
}

/// A client message that could not be accepted, with the id when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: Option<Uuid>,
    pub error: WireError,
}

/// Longest accepted `type`.
pub const MAX_TYPE_LEN: usize = 64;

/// The envelope's fields, as text; every other top-level field is ignored.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

fn rejected(id: Option<Uuid>, code: &str, message: impl Into<String>) -> Rejected {
    Rejected {
        id,
        error: WireError::new(code, message),
    }
}

/// Checks JSON text for what the service cannot hold, without parsing it: nesting
/// deeper than `max_depth` (`limit_exceeded`, limit `max_json_depth`) and the
/// character U+0000 in any string or member name (`unsupported_character`:
/// PostgreSQL's jsonb refuses it). Text that is not JSON passes; the parser that
/// follows reports it.
pub fn check_json_text(text: &str, max_depth: usize) -> Result<(), WireError> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        if b.get(i + 1) == Some(&b'u') && b.get(i + 2..i + 6) == Some(b"0000") {
                            return Err(WireError::new(
                                UNSUPPORTED,
                                "strings may not contain U+0000 (\\u0000)",
                            ));
                        }
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(WireError::new(
                        codes::LIMIT_EXCEEDED,
                        format!("JSON may nest at most {max_depth} levels"),
                    )
                    .with_details(json!({"limit": "max_json_depth", "max": max_depth})));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

const UNSUPPORTED: &str = codes::UNSUPPORTED_CHARACTER;

/// Parses and checks the envelope of a client message: its size, the envelope, then
/// the payload's text ([`check_json_text`]: nesting, U+0000). The payload's contents
/// are checked by whoever handles the type.
pub fn parse_client_message(
    text: &str,
    max_bytes: usize,
    max_depth: usize,
) -> Result<ClientMessage, Rejected> {
    if text.len() > max_bytes {
        return Err(Rejected {
            id: None,
            error: WireError::new(
                codes::MESSAGE_TOO_LARGE,
                format!(
                    "message of {} bytes exceeds the limit of {max_bytes} bytes",
                    text.len()
                ),
            )
            .with_details(json!({"limit": max_bytes, "size": text.len()})),
        });
    }
    let env = envelope(text, max_depth)?;
    let (id, anonymous) = envelope_id(&env)?;
    let kind = envelope_type(&env).ok_or_else(|| {
        rejected(
            Some(id),
            codes::INVALID_MESSAGE,
            "`type` must be a lowercase identifier such as \"state_update\"",
        )
    })?;
    let data = envelope_data(&env).ok_or_else(|| {
        rejected(
            Some(id),
            codes::INVALID_MESSAGE,
            "`data` must be a JSON object",
        )
    })?;
    // The payload sits one level inside the envelope.
    check_json_text(data.get(), max_depth.saturating_sub(1)).map_err(|error| Rejected {
        id: Some(id),
        error,
    })?;
    Ok(ClientMessage {
        id,
        anonymous,
        kind,
        data,
    })
}

/// Reads the envelope's fields (no id can be read if this fails).
fn envelope(text: &str, max_depth: usize) -> Result<Envelope<'_>, Rejected> {
    serde_json::from_str(text).map_err(|e| match e.classify() {
        // Nested past serde_json's own limit (128): no id can be read.
        serde_json::error::Category::Syntax if e.to_string().contains("recursion limit") => {
            rejected(
                None,
                codes::LIMIT_EXCEEDED,
                format!("JSON may nest at most {max_depth} levels"),
            )
        }
        serde_json::error::Category::Data => rejected(
            None,
            codes::INVALID_MESSAGE,
            "a message must be a JSON object",
        ),
        _ => rejected(None, codes::MALFORMED_JSON, format!("not valid JSON: {e}")),
    })
}

/// The message's id, and whether it had none of its own ([`icd_message_id`]).
fn envelope_id(env: &Envelope) -> Result<(Uuid, bool), Rejected> {
    match env.id.map(|r| serde_json::from_str::<String>(r.get())) {
        Some(Ok(s)) => Ok((
            Uuid::parse_str(&s)
                .map_err(|_| rejected(None, codes::INVALID_MESSAGE, "`id` must be a UUID"))?,
            false,
        )),
        None => Ok((icd_message_id(env.kind, env.data), true)),
        Some(Err(_)) => Err(rejected(
            None,
            codes::INVALID_MESSAGE,
            "`id` must be a UUID string (or absent)",
        )),
    }
}

/// The message's `type`, if it is a lowercase identifier of at most
/// [`MAX_TYPE_LEN`] bytes.
fn envelope_type(env: &Envelope) -> Option<String> {
    let s = serde_json::from_str::<String>(env.kind?.get()).ok()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_TYPE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.');
    ok.then_some(s)
}

/// The message's `data`: an object (`{}` when absent or null), else `None`.
fn envelope_data(env: &Envelope) -> Option<RawJson> {
    match env.data {
        None => Some(RawJson::empty_object()),
        Some(r) if r.get() == "null" => Some(RawJson::empty_object()),
        Some(r) if r.get().starts_with('{') => Some(RawJson(r.to_owned())),
        Some(_) => None,
    }
}

/// The id of a message without an envelope `id`: a `state_update`'s `data.update_id`
/// (so a resend of the same update takes effect once), else a new one.
fn icd_message_id(kind: Option<&RawValue>, data: Option<&RawValue>) -> Uuid {
    #[derive(Deserialize)]
    struct UpdateId {
        #[serde(default)]
        update_id: Option<String>,
    }
    let is_update = kind.is_some_and(|k| k.get() == r#""state_update""#);
    is_update
        .then_some(data)
        .flatten()
        .and_then(|d| serde_json::from_str::<UpdateId>(d.get()).ok())
        .and_then(|d| d.update_id)
        .and_then(|s| Uuid::parse_str(&s).ok())
        .unwrap_or_else(Uuid::new_v4)
}

/// Message types the router answers itself; everything else goes to the session owner.
pub const TYPE_SYNC_REQUEST: &str = "sync_request";
pub const TYPE_HEARTBEAT: &str = "heartbeat";

/// Client message types that count against the ICD's "combat actions per minute per
/// player" limit (kept equal to the rules' `Command::is_combat` by a test in the node).
pub const COMBAT_TYPES: &[&str] = &[
    "combat_start",
    "combat_add",
    "combat_end",
    "initiative_roll",
    "end_turn",
    "action_declare",
    "move",
    "stand_up",
    "reaction_decline",
];

/// Whether a client message type is a combat action (by its type alone: the router
/// classifies without parsing the payload).
pub fn is_combat_type(kind: &str) -> bool {
    COMBAT_TYPES.contains(&kind)
}

/// A session's lifecycle status as clients see it: the view's `game.status`, and the
/// `data.status` of a `session_status_changed` event. Routers read a session's end
/// from it (typed, not by comparing text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Created,
    Active,
    Paused,
    Ended,
}

impl SessionStatus {
    /// Nothing follows: the session has ended.
    pub fn is_final(self) -> bool {
        self == SessionStatus::Ended
    }

    /// The status a rendered event moves its session to, if it is a
    /// `session_status_changed`.
    pub fn changed_by(event_json: &str) -> Option<SessionStatus> {
        #[derive(Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum Lifecycle {
            SessionStatusChanged { data: Change },
        }
        #[derive(Deserialize)]
        struct Change {
            status: SessionStatus,
        }
        // Most events are not one: skip them without parsing.
        if !event_json.contains(r#""session_status_changed""#) {
            return None;
        }
        match serde_json::from_str::<Lifecycle>(event_json).ok()? {
            Lifecycle::SessionStatusChanged { data } => Some(data.status),
        }
    }
}

/// ISO 8601 / RFC 3339 timestamp with milliseconds, UTC.
pub fn timestamp_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `{"type":"ack","id":…,"data":{"version":N}}` (written directly: one per command).
pub fn ack(id: Uuid, version: u64) -> String {
    format!(r#"{{"type":"ack","id":"{id}","data":{{"version":{version}}}}}"#)
}

/// `{"type":"error","id":…,"error":{…}}`; `id` is null when the message had none.
pub fn error(id: Option<Uuid>, err: &WireError) -> String {
    json!({"type": "error", "id": id, "error": err}).to_string()
}

/// `{"type":"connection_error","error":{…}}`, sent before closing a connection.
pub fn connection_error(err: &WireError) -> String {
    json!({"type": "connection_error", "error": err}).to_string()
}

/// `{"type":"heartbeat","data":{"timestamp":…}}`
pub fn heartbeat() -> String {
    json!({"type": "heartbeat", "data": {"timestamp": timestamp_now()}}).to_string()
}

/// A session event as clients receive it. Rendered once, by the owner, both when the
/// event is new and when it is read back from the log, so the bytes are identical.
pub fn render_event(kind: &str, version: u64, data: &Value) -> String {
    render_event_raw(kind, version, &data.to_string())
}

/// [`render_event`] from the data's JSON text (written once, also for the log).
pub fn render_event_raw(kind: &str, version: u64, data_json: &str) -> String {
    use std::fmt::Write;
    // Type first, then the version, then the data as is.
    let mut out = String::with_capacity(48 + kind.len() + data_json.len());
    out.push_str(r#"{"type":"#);
    out.push_str(&Value::from(kind).to_string());
    write!(out, r#","version":{version},"data":"#).expect("writing to a String");
    out.push_str(data_json);
    out.push('}');
    out
}

/// The part of an event a router needs to order it, without parsing the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHeader {
    pub version: u64,
}

/// NATS header carrying an event's version, so routers can sequence without parsing.
pub const VERSION_HEADER: &str = "Gs-Version";

/// NATS header on the last event of a command sent with `ack_by_event`: the command's
/// id. The router answers the command with the event's version.
pub const ACK_HEADER: &str = "Gs-Ack";

#[cfg(test)]
mod tests {
    #[test]
    fn close_codes_follow_the_http_status() {
        use super::{close_codes::for_error, codes, WireError};
        let e = |c: &str| WireError::new(c, "x");
        for (code, close) in [
            (codes::BAD_REQUEST, 4400),
            (codes::MISSING_TOKEN, 4401),
            (codes::INVALID_TOKEN, 4401),
            (codes::TOKEN_EXPIRED, 4401),
            (codes::WRONG_SESSION, 4403),
            (codes::WRONG_USER, 4403),
            (codes::NOT_MEMBER, 4403),
            (codes::SESSION_NOT_FOUND, 4404),
            (codes::IDLE_TIMEOUT, 4408),
            (codes::SILENCE_TIMEOUT, 4408),
            (codes::RATE_LIMITED, 4429),
            (codes::TOO_MANY_CONNECTIONS, 4429),
            (codes::SERVICE_UNAVAILABLE, 4503),
            (codes::INTERNAL, 4500),
            (codes::SLOW_CONSUMER, 4008),
        ] {
            assert_eq!(for_error(&e(code)), close, "{code}");
        }
        let full =
            e(codes::TOO_MANY_CONNECTIONS).with_details(serde_json::json!({"scope": "router"}));
        assert_eq!(for_error(&full), 4503);
    }

    use super::*;

    #[test]
    fn json_text_checks_nesting_and_nul_without_parsing() {
        assert!(check_json_text(r#"{"a":[1,{"b":"x"}]}"#, 3).is_ok());
        let e = check_json_text(r#"{"a":[1,{"b":"x"}]}"#, 2).unwrap_err();
        assert_eq!(e.code, codes::LIMIT_EXCEEDED);
        assert_eq!(e.details["limit"], "max_json_depth");
        // Brackets inside strings are text, not nesting.
        assert!(check_json_text(r#"{"a":"[[[[{{{{"}"#, 1).is_ok());
        assert!(check_json_text(r#"{"a":"\"[[["}"#, 1).is_ok());
        for nul in [
            r#"{"a":"x\u0000"}"#,
            r#"{"k\u0000":1}"#,
            r#"{"a":["\\\u0000"]}"#,
        ] {
            assert_eq!(
                check_json_text(nul, 8).unwrap_err().code,
                codes::UNSUPPORTED_CHARACTER,
                "{nul}"
            );
        }
        // An escaped backslash followed by the text u0000 is not U+0000.
        assert!(check_json_text(r#"{"a":"\\u0000"}"#, 8).is_ok());
        assert!(check_json_text(r#"{"a":"\u0001"}"#, 8).is_ok());
        // Through the envelope parser: refused before anything else reads it.
        let deep = format!(
            r#"{{"id":"{}","type":"x","data":{{"v":{}1{}}}}}"#,
            Uuid::nil(),
            "[".repeat(70),
            "]".repeat(70)
        );
        let r = parse_client_message(&deep, 100_000, 64).unwrap_err();
        assert_eq!(r.error.code, codes::LIMIT_EXCEEDED);
        assert_eq!(r.id, Some(Uuid::nil()), "the id is reported when readable");
        let deeper = deep
            .replace(&"[".repeat(70), &"[".repeat(200))
            .replace(&"]".repeat(70), &"]".repeat(200));
        let r = parse_client_message(&deeper, 100_000, 64).unwrap_err();
        assert_eq!(
            (r.id, r.error.code.as_str()),
            (Some(Uuid::nil()), codes::LIMIT_EXCEEDED)
        );
        let nul = format!(
            r#"{{"id":"{}","type":"x","data":{{"v":"\u0000"}}}}"#,
            Uuid::nil()
        );
        let r = parse_client_message(&nul, 100_000, 64).unwrap_err();
        assert_eq!(
            (r.id, r.error.code.as_str()),
            (Some(Uuid::nil()), codes::UNSUPPORTED_CHARACTER)
        );
    }

    #[test]
    fn envelope_table() {
        let id = Uuid::new_v4();
        let ok = format!(r#"{{"id":"{id}","type":"state_update","data":{{"changes":[]}}}}"#);
        let m = parse_client_message(&ok, 1024, 64).unwrap();
        assert_eq!(m.id, id);
        assert_eq!(m.kind, "state_update");

        let cases: Vec<(String, &str, bool)> = vec![
            ("{nope".into(), codes::MALFORMED_JSON, false),
            ("[1,2]".into(), codes::INVALID_MESSAGE, false),
            (
                r#"{"id":"12","type":"x"}"#.into(),
                codes::INVALID_MESSAGE,
                false,
            ),
            (format!(r#"{{"id":"{id}"}}"#), codes::INVALID_MESSAGE, true),
            (
                format!(r#"{{"id":"{id}","type":"Bad Type"}}"#),
                codes::INVALID_MESSAGE,
                true,
            ),
            (
                format!(r#"{{"id":"{id}","type":"x","data":5}}"#),
                codes::INVALID_MESSAGE,
                true,
            ),
            ("x".repeat(2000), codes::MESSAGE_TOO_LARGE, false),
        ];
        for (text, code, has_id) in cases {
            let r = parse_client_message(&text, 1024, 64).unwrap_err();
            assert_eq!(r.error.code, code, "{text}");
            assert_eq!(r.id.is_some(), has_id, "{text}");
        }
        // Without an envelope id (the ICD's messages): a state_update's update_id is
        // its id; anything else gets a new one.
        let update = Uuid::new_v4();
        let icd = format!(
            r#"{{"type":"state_update","data":{{"update_id":"{update}","changes":[],"timestamp":"t"}}}}"#
        );
        let m = parse_client_message(&icd, 1024, 64).unwrap();
        assert_eq!((m.id, m.anonymous), (update, true));
        let m = parse_client_message(r#"{"type":"sync_request"}"#, 1024, 64).unwrap();
        assert!(m.anonymous && !m.id.is_nil());
        assert!(!parse_client_message(&ok, 1024, 64).unwrap().anonymous);
    }

    #[test]
    fn events_render_type_first_and_parse_back() {
        let data = json!({"changes": [{"path": "/a\"b", "value": 1}], "timestamp": "t"});
        let text = render_event("state_update", 12, &data);
        assert!(text.starts_with(r#"{"type":"state_update","version":12,"data":"#));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"type": "state_update", "version": 12, "data": data})
        );
    }

    #[test]
    fn acks_are_json() {
        let id = Uuid::new_v4();
        let v: Value = serde_json::from_str(&ack(id, 42)).unwrap();
        assert_eq!(v, json!({"type": "ack", "id": id, "data": {"version": 42}}));
    }

    #[test]
    fn missing_data_is_an_empty_object() {
        let id = Uuid::new_v4();
        let m = parse_client_message(&format!(r#"{{"id":"{id}","type":"heartbeat"}}"#), 100, 64)
            .unwrap();
        assert_eq!(m.data.get(), "{}");
    }

    #[test]
    fn retryable_codes() {
        assert!(WireError::new(codes::NOT_OWNER, "").is_retryable());
        assert!(!WireError::new(codes::CONFLICT, "").is_retryable());
        assert_eq!(WireError::new(codes::CONFLICT, "").http_status(), 409);
        assert_eq!(WireError::new("not_your_turn", "").http_status(), 422);
        assert_eq!(WireError::new(codes::WRONG_USER, "").http_status(), 403);
    }

    #[test]
    fn a_session_ends_with_its_status_change_to_ended() {
        let end = r#"{"type":"session_status_changed","version":9,"data":{"status":"ended","previous":"active"}}"#;
        assert_eq!(SessionStatus::changed_by(end), Some(SessionStatus::Ended));
        assert!(SessionStatus::Ended.is_final() && !SessionStatus::Paused.is_final());
        let pause = r#"{"type":"session_status_changed","version":3,"data":{"status":"paused"}}"#;
        assert_eq!(
            SessionStatus::changed_by(pause),
            Some(SessionStatus::Paused)
        );
        let other = r#"{"type":"state_update","version":1,"data":{"status":"ended"}}"#;
        assert_eq!(SessionStatus::changed_by(other), None);
        let text =
            r#"{"type":"state_update","version":1,"data":{"note":"session_status_changed"}}"#;
        assert_eq!(SessionStatus::changed_by(text), None);
    }
}
