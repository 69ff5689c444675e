//! The one error type on the wire, [`WireError`], and its code table, [`CODES`].
//!
//! Every refusal the service sends (a WebSocket `error` or `connection_error`, a REST
//! error body, a node's reply to a router, a rule violation) is a [`WireError`]:
//! `{"code", "message", "details"?}`. Its `code` is one of [`codes`], and each code
//! has exactly one row in [`CODES`] saying its HTTP status, whether a router retries
//! it, and what it means. Everything that needs a status or a retry decision reads it
//! from that row ([`WireError::http_status`], [`WireError::is_retryable`]); a test
//! checks `docs/protocol.md`'s error tables against it.
//!
//! This crate sits below both the pure rules (`gs_rules`, which must not reach
//! `shared`'s config, tokio or clients) and `gs_shared`: it depends on serde alone.

pub mod pointer;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One row of the code table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// The code as sent (`"not_your_turn"`).
    pub name: &'static str,
    /// The HTTP status a REST endpoint answers it with (a WebSocket close after a
    /// `connection_error` is 4000 + this, see `gs_shared::protocol::close_codes`).
    pub http: u16,
    /// Whether a router retries the request (same command id) elsewhere or later.
    pub retryable: bool,
    /// What it means, in one line.
    pub about: &'static str,
}

/// HTTP status of a code that is not in the table (none should be: a test keeps every
/// code the service sends in it): a client mistake about game state.
pub const UNKNOWN_CODE_HTTP: u16 = 422;

macro_rules! code_table {
    ($( $konst:ident = $name:literal => $http:literal, $retry:ident, $about:literal; )*) => {
        /// Stable wire error codes. Part of the contract (`docs/protocol.md`): clients
        /// branch on them. Each has its row in [`CODES`](crate::CODES).
        pub mod codes {
            $( #[doc = $about] pub const $konst: &str = $name; )*
        }

        /// The code table: every code, its HTTP status, retryability and meaning.
        pub const CODES: &[Code] = &[
            $( Code { name: $name, http: $http, retryable: code_table!(@retry $retry), about: $about }, )*
        ];
    };
    (@retry retry) => { true };
    (@retry once) => { false };
}

code_table! {
    // --- framing and envelope
    MALFORMED_JSON = "malformed_json" => 400, once, "not valid JSON";
    INVALID_MESSAGE = "invalid_message" => 400, once, "not an object, a missing or invalid `id` or `type`, non-object `data`, a binary frame";
    MESSAGE_TOO_LARGE = "message_too_large" => 413, once, "a message or body over the size limit";
    UNKNOWN_TYPE = "unknown_type" => 400, once, "no such message type";
    INVALID_PAYLOAD = "invalid_payload" => 400, once, "`data` (or `details`) does not fit the message";
    LIMIT_EXCEEDED = "limit_exceeded" => 413, once, "a bound on messages or the state document (`details.limit` names it; `rules::limits`)";
    UNSUPPORTED_CHARACTER = "unsupported_character" => 400, once, "a string or member name holds a character the service cannot store (U+0000)";
    // --- auth
    MISSING_TOKEN = "missing_token" => 401, once, "no token";
    INVALID_TOKEN = "invalid_token" => 401, once, "a token that is not valid";
    TOKEN_EXPIRED = "token_expired" => 401, once, "the token expired";
    WRONG_SESSION = "wrong_session" => 403, once, "the session token belongs to another session";
    WRONG_USER = "wrong_user" => 403, once, "the session token belongs to another user";
    FORBIDDEN = "forbidden" => 403, once, "a valid identity asking for what it may not have";
    NOT_MEMBER = "not_member" => 403, once, "not a member of the session: join it first";
    NOT_IN_CAMPAIGN = "not_in_campaign" => 403, once, "the Campaign Service says the user is not in the session's campaign (creation and joins, when `campaign.require_membership` is on)";
    // --- limits
    RATE_LIMITED = "rate_limited" => 429, once, "over a rate limit";
    TOO_MANY_IN_FLIGHT = "too_many_in_flight" => 429, once, "too many requests of one connection in flight";
    TOO_MANY_CONNECTIONS = "too_many_connections" => 429, once, "over a connection cap: one user's or one IP's open WebSockets (429), or the router's (503, `details.scope` = `router`)";
    IDLE_TIMEOUT = "idle_timeout" => 408, once, "`connection_error` before a close (4408): no message (only pings, pongs or nothing) for `router.ws_idle_timeout_ms`";
    SILENCE_TIMEOUT = "silence_timeout" => 408, once, "`connection_error` before a close (4408): nothing at all from the client for `router.client_silence_timeout_ms`";
    SLOW_CONSUMER = "slow_consumer" => 429, once, "`connection_error` before a close (4008): the client fell more than `router.max_outbound_queue` events behind";
    // --- state
    SESSION_NOT_FOUND = "session_not_found" => 404, once, "no such session";
    SESSION_QUARANTINED = "session_quarantined" => 500, once, "the session's stored data cannot be loaded; it is set aside and refused until repaired";
    NOT_FOUND = "not_found" => 404, once, "no such endpoint";
    METHOD_NOT_ALLOWED = "method_not_allowed" => 405, once, "wrong HTTP method";
    CONFLICT = "conflict" => 409, once, "a `previous` guard did not match";
    INVALID_PATH = "invalid_path" => 400, once, "a malformed JSON Pointer, or a path that cannot be set or removed";
    BAD_REQUEST = "bad_request" => 400, once, "invalid REST input (ids, bodies, query)";
    // --- cluster
    NOT_OWNER = "not_owner" => 503, retry, "between routers and nodes only: this node does not own the session (the reply may name the owner)";
    OVERLOADED = "overloaded" => 503, retry, "between routers and nodes only: the session's inbox is full";
    SERVICE_UNAVAILABLE = "service_unavailable" => 503, retry, "the owner could not be reached in time, or a dependency is down (`details.outcome`)";
    DEADLINE_EXCEEDED = "deadline_exceeded" => 503, once, "between routers and nodes only: the router had stopped waiting";
    INTERNAL = "internal_error" => 500, once, "a bug; reported";
    // --- the rules (docs/protocol.md, "Game messages"): client mistakes about game state
    FORBIDDEN_FOR_ROLE = "forbidden_for_role" => 422, once, "the session role may not do this";
    SESSION_NOT_ACTIVE = "session_not_active" => 422, once, "the session is `created` or `paused`";
    SESSION_ENDED = "session_ended" => 422, once, "the session has ended";
    INVALID_TRANSITION = "invalid_transition" => 422, once, "no such lifecycle step from the current status";
    CHARACTER_TAKEN = "character_taken" => 422, once, "the character belongs to another member, or is a monster";
    TOO_MANY_CHANGES = "too_many_changes" => 422, once, "more than 100 changes in one `state_update`";
    INVALID_CHARACTER = "invalid_character" => 422, once, "a character sheet or character change is invalid";
    UNKNOWN_CHARACTER = "unknown_character" => 422, once, "the character id is not in play in this session";
    CHARACTER_NOT_FOUND = "character_not_found" => 404, once, "the Character Service does not know that character id (a join)";
    NOT_YOUR_CHARACTER = "not_your_character" => 403, once, "the sender does not control that character (the DM controls all), or the Character Service says another user owns it";
    COMBAT_NOT_ACTIVE = "combat_not_active" => 422, once, "no combat is running";
    COMBAT_ALREADY_ACTIVE = "combat_already_active" => 422, once, "a combat is already running";
    INITIATIVE_PENDING = "initiative_pending" => 422, once, "acting before every participant has rolled initiative";
    ALREADY_ROLLED = "already_rolled" => 422, once, "initiative already rolled for that character";
    CLIENT_ROLLS_DISABLED = "client_rolls_disabled" => 422, once, "a client reported a roll but `settings.allow_client_rolls` is off";
    NOT_A_PARTICIPANT = "not_a_participant" => 422, once, "the character is not in the combat";
    NOT_YOUR_TURN = "not_your_turn" => 422, once, "it is another creature's turn";
    NO_ACTION_LEFT = "no_action_left" => 422, once, "the action is spent";
    NO_BONUS_ACTION_LEFT = "no_bonus_action_left" => 422, once, "the bonus action is spent";
    NO_REACTION_LEFT = "no_reaction_left" => 422, once, "the reaction is spent";
    INCAPACITATED = "incapacitated" => 422, once, "the creature is incapacitated (or dead): no actions or reactions";
    INVALID_TARGET = "invalid_target" => 422, once, "a target that this action cannot take";
    OUT_OF_RANGE = "out_of_range" => 422, once, "beyond reach or range";
    INVALID_DICE = "invalid_dice" => 422, once, "a dice expression (or reported d20) that is not valid";
    CONDITION_IMMUNE = "condition_immune" => 422, once, "the creature cannot gain that condition";
    NOT_CONCENTRATING = "not_concentrating" => 422, once, "nothing to end";
    MOVEMENT_EXCEEDED = "movement_exceeded" => 422, once, "not enough movement left, or speed 0";
    MOVEMENT_BLOCKED = "movement_blocked" => 422, once, "a frightened creature moving closer to the source of its fear";
    SQUARE_OCCUPIED = "square_occupied" => 422, once, "a creature stands on the destination or in the way";
    REACTION_PENDING = "reaction_pending" => 422, once, "a move paused for opportunity attacks waits until the provoked creatures reacted or declined (`details.waiting`)";
    SURPRISED = "surprised" => 422, once, "a surprised creature takes no action or reaction until its first turn ends";
    NOT_ON_MAP = "not_on_map" => 422, once, "the character has no position";
    INVALID_VERSION = "invalid_version" => 422, once, "a rollback's `to_version` is not an earlier version of the session";
    ROLLBACK_NEEDS_HISTORY = "rollback_needs_history" => 422, once, "internal: `decide` was handed a rollback; the node must call `decide_rollback` with the past state";
}

/// The row of `code`, if it is in the table.
pub fn lookup(code: &str) -> Option<&'static Code> {
    CODES.iter().find(|c| c.name == code)
}

/// The HTTP status of `code` (from the table; [`UNKNOWN_CODE_HTTP`] if not in it).
pub fn http_status(code: &str) -> u16 {
    lookup(code).map_or(UNKNOWN_CODE_HTTP, |c| c.http)
}

/// Whether a router retries a request refused with `code` (from the table).
pub fn is_retryable(code: &str) -> bool {
    lookup(code).is_some_and(|c| c.retryable)
}

/// An error as it appears on the wire (`error` events, REST error bodies, node
/// replies, rule violations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl WireError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// Its row in the code table.
    pub fn info(&self) -> Option<&'static Code> {
        lookup(&self.code)
    }

    /// Whether a router should retry the request (same command id) elsewhere or later.
    pub fn is_retryable(&self) -> bool {
        is_retryable(&self.code)
    }

    /// The HTTP status a REST endpoint answers this error with: its code's, except
    /// that a full router (`too_many_connections` with `details.scope` = `router`) is
    /// "unavailable" (503), where a user or IP at its cap is "too many" (429).
    pub fn http_status(&self) -> u16 {
        if self.code == codes::TOO_MANY_CONNECTIONS && self.details["scope"] == "router" {
            return 503;
        }
        http_status(&self.code)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

pub type Result<T, E = WireError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
