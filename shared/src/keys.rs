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

/// The key names. On a Redis Cluster (`redis.cluster_urls`), [`Keys::hash_tagged`]:
/// the id in a session's keys is wrapped in braces, `session:{<id>}:meta`, making it
/// the key's hash tag, so all keys of one session hash to one slot and the cache's
/// multi-key scripts (fence + write) run there. The names stay the ICD's, readable
/// and greppable; only the braces are added. Lock keys are not tagged (they live on
/// the independent Redlock instances, never on a cluster), nor are rate-limit
/// counters (one key per script).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    tagged: bool,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            tagged: false,
        }
    }
    /// The keys of a Redis Cluster: session keys carry their id as hash tag.
    pub fn hash_tagged(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            tagged: true,
        }
    }
    /// The keys for a configuration: hash-tagged when the cache and limits are on a
    /// Redis Cluster.
    pub fn for_config(cfg: &crate::config::RedisConfig) -> Self {
        if cfg.cluster_urls.is_empty() {
            Self::new(&cfg.key_prefix)
        } else {
            Self::hash_tagged(&cfg.key_prefix)
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `{prefix}session:{id}:{what}`, or `{prefix}session:{{id}}:{what}` when tagged.
    fn session(&self, s: &Uuid, what: &str) -> String {
        if self.tagged {
            format!("{}session:{{{s}}}:{what}", self.prefix)
        } else {
            format!("{}session:{s}:{what}", self.prefix)
        }
    }
    /// `session:{id}:meta` (hash: name, campaign_id, status, created_at, updated_at)
    pub fn meta(&self, s: &Uuid) -> String {
        self.session(s, "meta")
    }
    /// `session:{id}:players` (set of player ids)
    pub fn players(&self, s: &Uuid) -> String {
        self.session(s, "players")
    }
    /// `session:{id}:connections` (hash: connection id → player id)
    pub fn connections(&self, s: &Uuid) -> String {
        self.session(s, "connections")
    }
    /// `session:{id}:combat` (hash: round, turn, initiative_order, active_effects)
    pub fn combat(&self, s: &Uuid) -> String {
        self.session(s, "combat")
    }
    /// The epoch of the owner that last wrote the session's cache keys (an extension
    /// of the ICD's keys): writes of an older epoch are dropped (`node::cache`).
    pub fn cache_epoch(&self, s: &Uuid) -> String {
        self.session(s, "cache_epoch")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot of a key (CRC16/XMODEM of its hash tag, or of the whole key).
    fn slot(key: &str) -> u16 {
        let tag = match (key.find('{'), key.find('}')) {
            (Some(a), Some(b)) if b > a + 1 => &key[a + 1..b],
            _ => key,
        };
        let mut crc: u16 = 0;
        for &byte in tag.as_bytes() {
            crc ^= (byte as u16) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    #[test]
    fn session_keys_are_the_icds_and_share_a_slot_when_tagged() {
        let s = Uuid::from_u128(0x5c1d);
        let plain = Keys::new("p:");
        assert_eq!(plain.meta(&s), format!("p:session:{s}:meta"));
        let tagged = Keys::hash_tagged("p:");
        assert_eq!(tagged.meta(&s), format!("p:session:{{{s}}}:meta"));
        let all = [
            tagged.meta(&s),
            tagged.players(&s),
            tagged.connections(&s),
            tagged.combat(&s),
            tagged.cache_epoch(&s),
        ];
        assert!(all.iter().all(|k| slot(k) == slot(&all[0])), "{all:?}");
        // Without the tag they spread (what the cluster refuses as CROSSSLOT).
        let spread = [plain.meta(&s), plain.players(&s), plain.cache_epoch(&s)];
        assert!(spread.iter().any(|k| slot(k) != slot(&spread[0])));
        // Lock keys are never tagged.
        assert_eq!(tagged.lock(&s), plain.lock(&s));
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("123456789"), 0x31C3, "CRC16/XMODEM check value");
    }
}
