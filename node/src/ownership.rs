//! Ownership of sessions: Redis locks (rslock) with a renewal task, plus the record of
//! who holds each lock.
//!
//! A node serves session S only while it holds S's lock (`{prefix}lock:session:S`,
//! TTL `node.lock_ttl_ms`, renewed every `node.lock_renew_ms`) **and** S's newest
//! fencing epoch (taken from PostgreSQL after the lock, see
//! [`crate::store::Store::take_ownership`]). The lock keeps two nodes from serving S at
//! once in the normal case; the epoch makes that safe in every case: a paused or
//! partitioned ex-owner's writes are refused by PostgreSQL.
//!
//! rslock gives no fencing token and no holder identity (its value is random), so a
//! holder key (`…:holder` = node id, same TTL) is written beside the lock. When the
//! lock is busy and its holder is a member the membership table declares dead, the
//! lock is broken at once instead of waiting for the TTL: failover then takes the
//! failure-detection time, not failure detection plus the remaining TTL. Breaking the
//! lock of a node that is in fact alive is safe (it is fenced by the epoch, and its
//! next renewal fails, so it stops serving).

use gs_shared::keys::Keys;
use redis::aio::ConnectionManager;
use rslock::{Lock, LockError, LockManager};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Deletes the lock and its holder key if the holder is still the one named.
const BREAK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"#;

/// Deletes the holder key if it names this node.
const CLEAR_HOLDER_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Poll interval while waiting for a busy lock, for the first [`LOCK_POLL_FAST_FOR`].
const LOCK_POLL_FAST: Duration = Duration::from_millis(5);
const LOCK_POLL_FAST_FOR: Duration = Duration::from_millis(500);
/// Longest poll interval afterwards.
const LOCK_POLL_MAX: Duration = Duration::from_millis(100);

/// A busy lock, after looking at its holder.
enum Busy {
    /// Its holder was dead and the lock is broken: try again at once.
    Broken,
    /// Held by another (named when the holder key says who).
    HeldBy(Option<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("lock held by {holder:?} past the deadline")]
    Busy { holder: Option<String> },
    #[error("Redis unavailable: {0}")]
    Redis(String),
}

/// Lock service of one node.
#[derive(Clone)]
pub struct Ownership {
    node: String,
    keys: Keys,
    locks: Arc<Mutex<LockManager>>,
    redis_url: String,
    redis: ConnectionManager,
    ttl: Duration,
    renew: Duration,
    op_timeout: Duration,
}

fn new_lock_manager(url: &str) -> Result<LockManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut m = LockManager::from_clients(vec![client]);
    // Our own loop retries (it also checks for dead holders between tries).
    m.set_retry(1, Duration::from_millis(1));
    Ok(m)
}

impl Ownership {
    pub fn new(
        node: String,
        keys: Keys,
        redis_url: &str,
        redis: ConnectionManager,
        ttl: Duration,
        renew: Duration,
        op_timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            node,
            keys,
            locks: Arc::new(Mutex::new(new_lock_manager(redis_url)?)),
            redis_url: redis_url.to_string(),
            redis,
            ttl,
            renew,
            op_timeout,
        })
    }

    fn manager(&self) -> LockManager {
        self.locks.lock().unwrap().clone()
    }

    /// rslock keeps one multiplexed connection; after Redis restarts it may stay
    /// broken, so a fresh manager replaces it on errors.
    fn reset_manager(&self) {
        if let Ok(m) = new_lock_manager(&self.redis_url) {
            *self.locks.lock().unwrap() = m;
        }
    }

    /// Acquires the lock of `session` before `deadline`. `is_dead(holder)` says whether
    /// a holder node is known dead (its lock may then be broken).
    pub async fn acquire(
        &self,
        session: Uuid,
        deadline: Instant,
        is_dead: impl Fn(&str) -> bool,
    ) -> Result<Lease, AcquireError> {
        let key = self.keys.lock(&session);
        let holder_key = self.keys.lock_holder(&session);
        let mut last_holder = None;
        // A planned handoff frees the lock within milliseconds: poll it quickly at
        // first, then back off (a crashed holder's lock is broken, not waited for).
        let started_at = Instant::now();
        let mut pause = LOCK_POLL_FAST;
        loop {
            let started = Instant::now();
            let attempt = tokio::time::timeout(
                self.op_timeout,
                self.manager().lock(key.as_bytes(), self.ttl),
            )
            .await;
            match attempt {
                Ok(Ok(lock)) => {
                    let valid_until = started + Duration::from_millis(lock.validity_time as u64);
                    self.write_holder(session, &holder_key).await;
                    return Ok(Lease::start(self.clone(), session, lock, valid_until));
                }
                Ok(Err(LockError::Unavailable)) | Ok(Err(LockError::TtlExceeded)) => {
                    match self.busy(session, &key, &holder_key, &is_dead).await? {
                        Busy::Broken => continue,
                        Busy::HeldBy(holder) => last_holder = holder,
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(%session, error = %e, "lock attempt failed");
                    self.failed_attempt(e.to_string(), pause, deadline)?;
                }
                Err(_) => {
                    self.failed_attempt("lock attempt timed out".into(), pause, deadline)?;
                }
            }
            if Instant::now() + pause >= deadline {
                return Err(AcquireError::Busy {
                    holder: last_holder,
                });
            }
            tokio::time::sleep(pause).await;
            if started_at.elapsed() > LOCK_POLL_FAST_FOR {
                pause = (pause * 2).min(LOCK_POLL_MAX);
            }
        }
    }

    /// Records this node as the lock's holder. The holder key only speeds up takeover
    /// after a crash; without it a successor waits for the TTL.
    async fn write_holder(&self, session: Uuid, holder_key: &str) {
        let mut redis = self.redis.clone();
        let set = tokio::time::timeout(
            self.op_timeout,
            redis::cmd("SET")
                .arg(holder_key)
                .arg(&self.node)
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .query_async::<()>(&mut redis),
        )
        .await;
        if !matches!(set, Ok(Ok(()))) {
            tracing::debug!(%session, "holder key not written");
        }
    }

    /// The lock is busy (or Redis unreachable, which rslock reports the same way): asks
    /// Redis who holds it, which also tells whether it answers at all, and breaks the
    /// lock if its holder is dead.
    async fn busy(
        &self,
        session: Uuid,
        key: &str,
        holder_key: &str,
        is_dead: impl Fn(&str) -> bool,
    ) -> Result<Busy, AcquireError> {
        let holder = match self.holder(holder_key).await {
            Ok(h) => h,
            Err(e) => {
                self.reset_manager();
                return Err(AcquireError::Redis(e));
            }
        };
        if let Some(h) = &holder {
            if is_dead(h) && self.break_lock(key, holder_key, h).await {
                tracing::info!(%session, holder = %h, "broke the lock of a dead owner");
                return Ok(Busy::Broken);
            }
        }
        Ok(Busy::HeldBy(holder))
    }

    /// A lock attempt failed (Redis error or timeout): a fresh lock manager for the
    /// next one, or the error when no pause is left before `deadline`.
    fn failed_attempt(
        &self,
        error: String,
        pause: Duration,
        deadline: Instant,
    ) -> Result<(), AcquireError> {
        self.reset_manager();
        if Instant::now() + pause >= deadline {
            return Err(AcquireError::Redis(error));
        }
        Ok(())
    }

    /// The node recorded as holding a lock; `Err` when Redis does not answer.
    async fn holder(&self, holder_key: &str) -> Result<Option<String>, String> {
        let mut redis = self.redis.clone();
        match tokio::time::timeout(
            self.op_timeout,
            redis::cmd("GET")
                .arg(holder_key)
                .query_async::<Option<String>>(&mut redis),
        )
        .await
        {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timeout".into()),
        }
    }

    async fn break_lock(&self, key: &str, holder_key: &str, holder: &str) -> bool {
        let mut redis = self.redis.clone();
        let script = redis::Script::new(BREAK_SCRIPT);
        let r = tokio::time::timeout(
            self.op_timeout,
            script
                .key(key)
                .key(holder_key)
                .arg(holder)
                .invoke_async::<i64>(&mut redis),
        )
        .await;
        matches!(r, Ok(Ok(1)))
    }
}

/// A held lock, renewed in the background until released or lost.
pub struct Lease {
    session: Uuid,
    shared: Arc<LeaseShared>,
    renewer: JoinHandle<()>,
    ownership: Ownership,
}

struct LeaseShared {
    lock: Mutex<Lock>,
    valid_until: Mutex<Instant>,
    lost: AtomicBool,
    lost_tx: tokio::sync::watch::Sender<bool>,
}

impl Lease {
    fn start(ownership: Ownership, session: Uuid, lock: Lock, valid_until: Instant) -> Lease {
        let (lost_tx, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(LeaseShared {
            lock: Mutex::new(lock),
            valid_until: Mutex::new(valid_until),
            lost: AtomicBool::new(false),
            lost_tx,
        });
        let renewer = {
            let shared = shared.clone();
            let own = ownership.clone();
            tokio::spawn(async move { renew_loop(own, session, shared).await })
        };
        Lease {
            session,
            shared,
            renewer,
            ownership,
        }
    }

    /// Whether the lock is still ours by our own clock: not reported lost, and its
    /// validity (TTL minus drift, from the last successful renewal) not yet over.
    /// A process paused past its TTL sees this turn false the moment it resumes.
    pub fn is_valid(&self) -> bool {
        !self.shared.lost.load(Ordering::SeqCst)
            && Instant::now() < *self.shared.valid_until.lock().unwrap()
    }

    /// A read barrier: asks Redis whether the lock is still ours. `Ok(false)` (and the
    /// lease is then lost) when another node holds it, e.g. after breaking it because
    /// it wrongly took us for dead; a state read after `Ok(true)` was the owner's.
    pub async fn confirm(&self) -> Result<bool, String> {
        let (key, val) = {
            let l = self.shared.lock.lock().unwrap();
            (l.resource.clone(), l.val.clone())
        };
        let mut redis = self.ownership.redis.clone();
        let r = tokio::time::timeout(
            self.ownership.op_timeout,
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<Vec<u8>>>(&mut redis),
        )
        .await;
        match r {
            Ok(Ok(held)) => {
                let ours = held.as_deref() == Some(val.as_slice());
                if !ours {
                    self.shared.lost.store(true, Ordering::SeqCst);
                    self.shared.lost_tx.send_replace(true);
                }
                Ok(ours)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timeout".into()),
        }
    }

    /// Resolves when the lease is lost.
    pub fn lost(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.lost_tx.subscribe()
    }

    /// Releases the lock (planned handoff, passivation, shutdown).
    pub async fn release(self) {
        self.renewer.abort();
        let lock = {
            let l = self.shared.lock.lock().unwrap();
            Lock {
                resource: l.resource.clone(),
                val: l.val.clone(),
                validity_time: l.validity_time,
                lock_manager: l.lock_manager.clone(),
            }
        };
        let own = &self.ownership;
        let _ = tokio::time::timeout(own.op_timeout, own.manager().unlock(&lock)).await;
        let mut redis = own.redis.clone();
        let _ = tokio::time::timeout(
            own.op_timeout,
            redis::Script::new(CLEAR_HOLDER_SCRIPT)
                .key(own.keys.lock_holder(&self.session))
                .arg(&own.node)
                .invoke_async::<i64>(&mut redis),
        )
        .await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

async fn renew_loop(own: Ownership, session: Uuid, shared: Arc<LeaseShared>) {
    let mut tick = tokio::time::interval(own.renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        if Instant::now() >= *shared.valid_until.lock().unwrap() {
            break; // expired before we could renew (e.g. the process was paused)
        }
        let current = {
            let l = shared.lock.lock().unwrap();
            Lock {
                resource: l.resource.clone(),
                val: l.val.clone(),
                validity_time: l.validity_time,
                lock_manager: l.lock_manager.clone(),
            }
        };
        let started = Instant::now();
        let r = tokio::time::timeout(own.op_timeout, own.manager().extend(&current, own.ttl)).await;
        match r {
            Ok(Ok(renewed)) => {
                *shared.valid_until.lock().unwrap() =
                    started + Duration::from_millis(renewed.validity_time as u64);
                *shared.lock.lock().unwrap() = renewed;
                let mut redis = own.redis.clone();
                let _ = tokio::time::timeout(
                    own.op_timeout,
                    redis::cmd("PEXPIRE")
                        .arg(own.keys.lock_holder(&session))
                        .arg(own.ttl.as_millis() as u64)
                        .query_async::<i64>(&mut redis),
                )
                .await;
            }
            Ok(Err(e)) => {
                tracing::warn!(%session, error = %e, "lock renewal failed; giving the session up");
                if !matches!(e, LockError::Unavailable) {
                    own.reset_manager();
                }
                break;
            }
            Err(_) => {
                tracing::warn!(%session, "lock renewal timed out; giving the session up");
                own.reset_manager();
                break;
            }
        }
    }
    shared.lost.store(true, Ordering::SeqCst);
    shared.lost_tx.send_replace(true);
}
