//! The ICD's Redis keys, kept by session owners as a cache (never the only copy):
//!
//! * `session:{id}:meta` (hash: name, campaign_id, status, created_at, updated_at), TTL 24 h
//!   after last access;
//! * `session:{id}:players` (set of connected player ids), TTL 1 h after last update;
//! * `session:{id}:connections` (hash: connection id → player id), TTL 5 min after the
//!   last heartbeat: written on attach and again on every touch (a router's report that
//!   the connection's client sent a heartbeat or answered its pings), removed on detach;
//! * `session:{id}:combat` (hash: round, turn, initiative_order, active_effects), TTL 1 h.
//!
//! Writes go through a bounded queue to one task that pipelines them, so a slow or
//! absent Redis never slows a session down; when the queue is full, writes are shed
//! and counted (`gs_node_cache_dropped_total`).
//!
//! Writes are fenced: each is a script that first compares the writer's ownership
//! epoch with the session's `session:{id}:cache_epoch` and drops the write of an
//! older owner, so a deposed (paused, partitioned) owner cannot overwrite what the
//! new owner wrote. A new owner rewrites every key on activation.

use gs_shared::keys::{self, Keys};
use gs_shared::primary::PrimaryRedis;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// The fence every write starts with: `KEYS[1]` is the session's cache epoch key,
/// `ARGV[1]` the writer's epoch. A write of an older owner is dropped (returns 0); a
/// newer owner's first write raises the epoch.
const FENCE: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local e = tonumber(ARGV[1])
if e < cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', 86400)
"#;

/// `HSET` of field/value pairs (`ARGV[3..]`) on `KEYS[2]`, then its TTL (`ARGV[2]`).
const HASH_BODY: &str = r#"
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"#;

/// Replaces the hash `KEYS[2]` by the pairs in `ARGV[3..]` (deletes it when none).
const REPLACE_BODY: &str = r#"
redis.call('DEL', KEYS[2])
if #ARGV > 2 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 3))
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"#;

/// Adds connection `ARGV[2]` of player `ARGV[3]` (`KEYS[2]` connections, `KEYS[3]`
/// players; TTLs `ARGV[4]`, `ARGV[5]`).
const ATTACH_BODY: &str = r#"
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 1
"#;

/// Removes a connection, and its player from the connected set when it was the
/// player's last connection.
const DETACH_BODY: &str = r#"
redis.call('HDEL', KEYS[2], ARGV[2])
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  if v == ARGV[3] then return 1 end
end
redis.call('SREM', KEYS[3], ARGV[3])
return 1
"#;

/// Every write carries the epoch of the owner that makes it: Redis drops writes of a
/// deposed owner (one whose epoch is older than the newest writer's), so a paused
/// ex-owner cannot overwrite what the new owner wrote.
enum Op {
    Meta(Uuid, u64, Vec<(String, String)>),
    Attach(Uuid, u64, Uuid, Uuid),
    Detach(Uuid, u64, Uuid, Uuid),
    Refresh(Uuid, bool),
    Combat(Uuid, u64, BTreeMap<String, String>),
    /// Answered once every write queued before it was sent.
    Flush(oneshot::Sender<()>),
}

impl Op {
    /// The session whose keys the write touches.
    fn session(&self) -> Option<Uuid> {
        match self {
            Op::Meta(s, ..)
            | Op::Attach(s, ..)
            | Op::Detach(s, ..)
            | Op::Refresh(s, ..)
            | Op::Combat(s, ..) => Some(*s),
            Op::Flush(_) => None,
        }
    }
}

#[derive(Clone)]
pub struct Cache {
    tx: mpsc::Sender<Op>,
}

impl Cache {
    pub fn start(
        redis: impl Into<PrimaryRedis>,
        keys: Keys,
        op_timeout: Duration,
    ) -> (Cache, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16_384);
        let task = tokio::spawn(writer(redis.into(), keys, op_timeout, rx));
        (Cache { tx }, task)
    }

    fn send(&self, op: Op) {
        if self.tx.try_send(op).is_err() {
            metrics::counter!("gs_node_cache_dropped_total").increment(1);
        }
    }

    pub fn meta(&self, s: Uuid, epoch: u64, fields: Vec<(String, String)>) {
        self.send(Op::Meta(s, epoch, fields));
    }
    pub fn touch_meta(&self, s: Uuid, epoch: u64, updated_at: &str) {
        let fields = vec![("updated_at".to_string(), updated_at.to_string())];
        self.send(Op::Meta(s, epoch, fields));
    }
    pub fn attach(&self, s: Uuid, epoch: u64, conn: Uuid, user: Uuid) {
        self.send(Op::Attach(s, epoch, conn, user));
    }
    pub fn detach(&self, s: Uuid, epoch: u64, conn: Uuid, user: Uuid) {
        self.send(Op::Detach(s, epoch, conn, user));
    }
    /// Periodic TTL refresh of an owned session's keys.
    pub fn refresh(&self, s: Uuid, has_connections: bool) {
        self.send(Op::Refresh(s, has_connections));
    }
    pub fn combat(&self, s: Uuid, epoch: u64, fields: BTreeMap<String, String>) {
        self.send(Op::Combat(s, epoch, fields));
    }

    /// Waits until every write queued before this call has been sent to Redis (or
    /// failed); false if the writer is gone.
    pub async fn flush(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Flush(tx)).await.is_err() {
            return false;
        }
        rx.await.is_ok()
    }
}

/// Adds an `EVAL` of `FENCE` + `body` to the pipeline. EVAL, not EVALSHA: a restarted
/// Redis has no scripts cached, and a NOSCRIPT would fail the whole pipeline.
fn fenced(
    pipe: &mut redis::Pipeline,
    keys: &Keys,
    s: &Uuid,
    epoch: u64,
    body: &str,
    more_keys: &[String],
    args: &[String],
) {
    let script = format!("{FENCE}{body}");
    let cmd = pipe.cmd("EVAL").arg(script).arg(1 + more_keys.len());
    cmd.arg(keys.cache_epoch(s));
    for k in more_keys {
        cmd.arg(k);
    }
    cmd.arg(epoch);
    for a in args {
        cmd.arg(a);
    }
    cmd.ignore();
}

fn pairs(ttl: Duration, fields: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut args = vec![ttl.as_secs().to_string()];
    for (k, v) in fields {
        args.push(k);
        args.push(v);
    }
    args
}

/// The writer task: takes what is queued (up to 512 writes), sends it as one pipeline,
/// then answers the flushes that were among it.
async fn writer(
    mut redis: PrimaryRedis,
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
        // One pipeline; on a Redis Cluster one per session (its keys share a slot).
        let per_session = redis.is_cluster();
        let mut pipes: BTreeMap<Option<Uuid>, redis::Pipeline> = BTreeMap::new();
        let mut flushed = Vec::new();
        for op in ops {
            match op {
                Op::Flush(done) => flushed.push(done),
                op => {
                    let key = per_session.then(|| op.session()).flatten();
                    add(pipes.entry(key).or_insert_with(redis::pipe), &keys, op);
                }
            }
        }
        if per_session {
            let sends = pipes.values().map(|pipe| {
                let mut conn = redis.clone();
                async move { send_one(&mut conn, pipe, op_timeout).await }
            });
            for r in futures::future::join_all(sends).await {
                count_failure(r, &mut failures);
            }
        } else if let Some(pipe) = pipes.values().next() {
            let r = send_one(&mut redis, pipe, op_timeout).await;
            count_failure(r, &mut failures);
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// Adds one write to the pipeline.
fn add(pipe: &mut redis::Pipeline, keys: &Keys, op: Op) {
    match op {
        Op::Meta(s, epoch, fields) => {
            let args = pairs(keys::META_TTL, fields);
            fenced(pipe, keys, &s, epoch, HASH_BODY, &[keys.meta(&s)], &args);
        }
        Op::Attach(s, epoch, c, u) => {
            let args = [
                c.to_string(),
                u.to_string(),
                keys::CONNECTIONS_TTL.as_secs().to_string(),
                keys::PLAYERS_TTL.as_secs().to_string(),
            ];
            let k = [keys.connections(&s), keys.players(&s)];
            fenced(pipe, keys, &s, epoch, ATTACH_BODY, &k, &args);
        }
        Op::Detach(s, epoch, c, u) => {
            let args = [c.to_string(), u.to_string()];
            let k = [keys.connections(&s), keys.players(&s)];
            fenced(pipe, keys, &s, epoch, DETACH_BODY, &k, &args);
        }
        Op::Refresh(s, conns) => {
            // TTLs only: harmless whoever sends them. Not the connections hash: its TTL
            // runs from the last heartbeat (`Cache::touch`).
            pipe.expire(keys.meta(&s), keys::META_TTL.as_secs() as i64)
                .ignore();
            if conns {
                pipe.expire(keys.players(&s), keys::PLAYERS_TTL.as_secs() as i64)
                    .ignore();
            }
        }
        Op::Combat(s, epoch, fields) => {
            let args = pairs(keys::COMBAT_TTL, fields);
            fenced(
                pipe,
                keys,
                &s,
                epoch,
                REPLACE_BODY,
                &[keys.combat(&s)],
                &args,
            );
        }
        Op::Flush(_) => {}
    }
}

/// Sends a pipeline, bounded by `op_timeout`; the error text if it failed.
async fn send_one(
    redis: &mut PrimaryRedis,
    pipe: &redis::Pipeline,
    op_timeout: Duration,
) -> Result<(), String> {
    let r: Result<Result<(), redis::RedisError>, _> =
        tokio::time::timeout(op_timeout, pipe.query_async(redis)).await;
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".to_string()),
    }
}

/// Counts a failed pipeline (and logs at every power of two).
fn count_failure(r: Result<(), String>, failures: &mut u64) {
    let Err(err) = r else { return };
    *failures += 1;
    metrics::counter!("gs_node_cache_errors_total").increment(1);
    if failures.is_power_of_two() {
        tracing::warn!(error = %err, failures = *failures, "Redis cache write failed");
    }
}
