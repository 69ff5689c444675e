//! Redis key names (the ICD's "Key Structures", under `redis.key_prefix`) and their TTLs.

use std::time::Duration;
use uuid::Uuid;

/// ICD TTL: session metadata, 24 hours after last access.
pub const META_TTL: Duration = Duration::from_secs(24 * 3600);
/// ICD TTL: player sets, 1 hour after last update.
pub const PLAYERS_TTL: Duration = Duration::from_secs(3600);
/// ICD TTL: connection maps, 5 minutes after last heartbeat.
pub const CONNECTIONS_TTL: Duration = Duration::from_secs(300);
/// ICD TTL: combat state, 1 hour after last update.
pub const COMBAT_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `session:{id}:meta` (hash: name, campaign_id, status, created_at, updated_at)
    pub fn meta(&self, s: &Uuid) -> String {
        format!("{}session:{s}:meta", self.prefix)
    }
    /// `session:{id}:players` (set of player ids)
    pub fn players(&self, s: &Uuid) -> String {
        format!("{}session:{s}:players", self.prefix)
    }
    /// `session:{id}:connections` (hash: connection id → player id)
    pub fn connections(&self, s: &Uuid) -> String {
        format!("{}session:{s}:connections", self.prefix)
    }
    /// `session:{id}:combat` (hash: round, turn, initiative_order, active_effects)
    pub fn combat(&self, s: &Uuid) -> String {
        format!("{}session:{s}:combat", self.prefix)
    }
    /// The epoch of the owner that last wrote the session's cache keys (an extension
    /// of the ICD's keys): writes of an older epoch are dropped (`node::cache`).
    pub fn cache_epoch(&self, s: &Uuid) -> String {
        format!("{}session:{s}:cache_epoch", self.prefix)
    }
    /// The ownership lock of a session (rslock).
    pub fn lock(&self, s: &Uuid) -> String {
        format!("{}lock:session:{s}", self.prefix)
    }
    /// Who holds a session's lock (node id), written beside the lock with the same TTL.
    pub fn lock_holder(&self, s: &Uuid) -> String {
        format!("{}lock:session:{s}:holder", self.prefix)
    }
    /// A fixed-window rate-limit counter.
    pub fn rate(&self, scope: &str, subject: &str, window: u64) -> String {
        format!("{}rl:{scope}:{subject}:{window}", self.prefix)
    }
    /// Sessions a character plays in (hub relay index).
    pub fn character_sessions(&self, c: &Uuid) -> String {
        format!("{}character:{c}:sessions", self.prefix)
    }
}
