//! The ICD's Redis keys, kept by session owners as a cache (never the only copy):
//!
//! * `session:{id}:meta` (hash: name, campaign_id, status, created_at, updated_at), TTL 24 h
//!   after last access;
//! * `session:{id}:players` (set of connected player ids), TTL 1 h after last update;
//! * `session:{id}:connections` (hash: connection id → player id), TTL 5 min after the
//!   last heartbeat;
//! * `session:{id}:combat` (hash: round, turn, initiative_order, active_effects), TTL 1 h.
//!
//! Writes go through a bounded queue to one task that pipelines them, so a slow or
//! absent Redis never slows a session down; when the queue is full, writes are shed
//! and counted (`gs_node_cache_dropped_total`).

use gs_shared::keys::{self, Keys};
use redis::aio::ConnectionManager;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Removes a connection, and its player from the connected set when it was the
/// player's last connection.
const DETACH_SCRIPT: &str = r#"
redis.call('HDEL', KEYS[1], ARGV[1])
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  if v == ARGV[2] then return 0 end
end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"#;

enum Op {
    Meta(Uuid, Vec<(String, String)>),
    TouchMeta(Uuid, String),
    Attach(Uuid, Uuid, Uuid),
    Detach(Uuid, Uuid, Uuid),
    Refresh(Uuid, bool),
    Combat(Uuid, BTreeMap<String, String>),
}

#[derive(Clone)]
pub struct Cache {
    tx: mpsc::Sender<Op>,
}

impl Cache {
    pub fn start(
        redis: ConnectionManager,
        keys: Keys,
        op_timeout: Duration,
    ) -> (Cache, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16_384);
        let task = tokio::spawn(writer(redis, keys, op_timeout, rx));
        (Cache { tx }, task)
    }

    fn send(&self, op: Op) {
        if self.tx.try_send(op).is_err() {
            metrics::counter!("gs_node_cache_dropped_total").increment(1);
        }
    }

    pub fn meta(&self, s: Uuid, fields: Vec<(String, String)>) {
        self.send(Op::Meta(s, fields));
    }
    pub fn touch_meta(&self, s: Uuid, updated_at: &str) {
        self.send(Op::TouchMeta(s, updated_at.to_string()));
    }
    pub fn attach(&self, s: Uuid, conn: Uuid, user: Uuid) {
        self.send(Op::Attach(s, conn, user));
    }
    pub fn detach(&self, s: Uuid, conn: Uuid, user: Uuid) {
        self.send(Op::Detach(s, conn, user));
    }
    /// Periodic TTL refresh of an owned session's keys.
    pub fn refresh(&self, s: Uuid, has_connections: bool) {
        self.send(Op::Refresh(s, has_connections));
    }
    pub fn combat(&self, s: Uuid, fields: BTreeMap<String, String>) {
        self.send(Op::Combat(s, fields));
    }
}

async fn writer(
    mut redis: ConnectionManager,
    keys: Keys,
    op_timeout: Duration,
    mut rx: mpsc::Receiver<Op>,
) {
    let mut failures: u64 = 0;
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < 512 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        for op in &ops {
            match op {
                Op::Meta(s, fields) => {
                    let k = keys.meta(s);
                    pipe.hset_multiple(&k, fields).ignore();
                    pipe.expire(&k, keys::META_TTL.as_secs() as i64).ignore();
                }
                Op::TouchMeta(s, at) => {
                    let k = keys.meta(s);
                    pipe.hset(&k, "updated_at", at).ignore();
                    pipe.expire(&k, keys::META_TTL.as_secs() as i64).ignore();
                }
                Op::Attach(s, c, u) => {
                    let (ck, pk) = (keys.connections(s), keys.players(s));
                    pipe.hset(&ck, c.to_string(), u.to_string()).ignore();
                    pipe.expire(&ck, keys::CONNECTIONS_TTL.as_secs() as i64)
                        .ignore();
                    pipe.sadd(&pk, u.to_string()).ignore();
                    pipe.expire(&pk, keys::PLAYERS_TTL.as_secs() as i64)
                        .ignore();
                }
                Op::Detach(s, c, u) => {
                    // EVAL, not EVALSHA: a restarted Redis has no scripts cached, and a
                    // NOSCRIPT would fail the whole pipeline.
                    pipe.cmd("EVAL")
                        .arg(DETACH_SCRIPT)
                        .arg(2)
                        .arg(keys.connections(s))
                        .arg(keys.players(s))
                        .arg(c.to_string())
                        .arg(u.to_string())
                        .ignore();
                }
                Op::Refresh(s, conns) => {
                    pipe.expire(keys.meta(s), keys::META_TTL.as_secs() as i64)
                        .ignore();
                    if *conns {
                        pipe.expire(keys.connections(s), keys::CONNECTIONS_TTL.as_secs() as i64)
                            .ignore();
                        pipe.expire(keys.players(s), keys::PLAYERS_TTL.as_secs() as i64)
                            .ignore();
                    }
                }
                Op::Combat(s, fields) => {
                    let k = keys.combat(s);
                    if fields.is_empty() {
                        pipe.del(&k).ignore();
                    } else {
                        let f: Vec<(&String, &String)> = fields.iter().collect();
                        pipe.del(&k).ignore();
                        pipe.hset_multiple(&k, &f).ignore();
                        pipe.expire(&k, keys::COMBAT_TTL.as_secs() as i64).ignore();
                    }
                }
            }
        }
        let r: Result<Result<(), redis::RedisError>, _> =
            tokio::time::timeout(op_timeout, pipe.query_async(&mut redis)).await;
        let err = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timeout".to_string()),
        };
        if let Some(e) = err {
            failures += 1;
            metrics::counter!("gs_node_cache_errors_total").increment(1);
            if failures.is_power_of_two() {
                tracing::warn!(error = %e, failures, "Redis cache write failed");
            }
        }
    }
}
