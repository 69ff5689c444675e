//! Ownership of sessions: Redis locks (rslock's Redlock over `redis.lock_urls`) with a
//! renewal task, plus the record of who holds each lock.
//!
//! A node serves session S only while it holds S's lock (`{prefix}lock:session:S`,
//! TTL `node.lock_ttl_ms`, renewed every `node.lock_renew_ms`) **and** S's newest
//! fencing epoch (taken from PostgreSQL after the lock, see
//! [`crate::store::Store::take_over`]). The lock keeps two nodes from serving S at
//! once in the normal case; the epoch makes that safe in every case: a paused or
//! partitioned ex-owner's writes are refused by PostgreSQL.
//!
//! The lock lives on N independent Redis masters (`redis.lock_urls`; default: the one
//! `redis.url`): acquired, extended and released when a majority (N/2+1) agrees. Every
//! other lock-related key and check follows the same quorum rule, so a minority of the
//! instances may be down without any effect:
//! * the holder record (`…:holder` = node id) is written beside the lock on each
//!   instance where the lock is ours; a lookup takes the answer of a majority;
//! * breaking a dead holder's lock runs, atomically per instance, on each instance;
//! * [`Lease::confirm`] counts the instances where the lock value is ours.
//!
//! With a majority down no lease can be taken or renewed: sessions stop and commands
//! are refused with `service_unavailable` until the instances return. Each instance is
//! reconnected on its own (a health check pings the instances and rebuilds rslock's
//! connections when one comes back).
//!
//! rslock gives no fencing token and no holder identity (its value is random), hence
//! the holder record. When the lock is busy and its holder is a member the membership
//! table declares dead, the lock is broken at once instead of waiting for the TTL:
//! failover then takes the failure-detection time, not failure detection plus the
//! remaining TTL. Breaking the lock of a node that is in fact alive is safe (it is
//! fenced by the epoch, and its next renewal fails, so it stops serving).

use futures::future::join_all;
use gs_shared::keys::Keys;
use redis::aio::MultiplexedConnection;
use rslock::{Lock, LockError, LockManager};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
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

/// Writes the holder key where the lock (KEYS[1]) has our value (ARGV[1]).
const WRITE_HOLDER_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#;

/// Poll interval while waiting for a busy lock, for the first [`LOCK_POLL_FAST_FOR`].
const LOCK_POLL_FAST: Duration = Duration::from_millis(5);
const LOCK_POLL_FAST_FOR: Duration = Duration::from_millis(500);
/// Longest poll interval afterwards.
const LOCK_POLL_MAX: Duration = Duration::from_millis(100);
/// How often the instances of a multi-instance lock are pinged (to rebuild rslock's
/// connections when one returns).
const HEALTH_EVERY: Duration = Duration::from_millis(250);

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

/// One Redis instance of the lock, with our own connection for the holder record and
/// the lock checks (rslock keeps its own).
struct Instance {
    client: redis::Client,
    con: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
}

impl Instance {
    /// Runs `cmd` within `timeout`; on any failure the connection is dropped, and the
    /// next call connects afresh.
    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Result<T, String> {
        let r = tokio::time::timeout(timeout, async {
            let mut con = self.connection().await?;
            cmd.query_async::<T>(&mut con)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("timeout".into()));
        if r.is_err() {
            *self.con.lock().await = None;
        }
        self.up.store(r.is_ok(), Ordering::SeqCst);
        r
    }

    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        let mut con = self.con.lock().await;
        if let Some(c) = &*con {
            return Ok(c.clone());
        }
        let c = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        *con = Some(c.clone());
        Ok(c)
    }
}

/// The lock's Redis instances.
struct Instances {
    urls: Vec<String>,
    all: Vec<Instance>,
    locks: Mutex<LockManager>,
}

impl Instances {
    fn quorum(&self) -> usize {
        self.all.len() / 2 + 1
    }

    /// Runs `cmd` on every instance at once.
    async fn each<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Vec<Result<T, String>> {
        join_all(self.all.iter().map(|i| i.query::<T>(cmd, timeout))).await
    }
}

/// Lock service of one node.
#[derive(Clone)]
pub struct Ownership {
    node: String,
    keys: Keys,
    instances: Arc<Instances>,
    ttl: Duration,
    renew: Duration,
    op_timeout: Duration,
}

fn new_lock_manager(urls: &[String]) -> Result<LockManager, redis::RedisError> {
    let clients = urls
        .iter()
        .map(|u| redis::Client::open(u.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut m = LockManager::from_clients(clients);
    // Our own loop retries (it also checks for dead holders between tries).
    m.set_retry(1, Duration::from_millis(1));
    Ok(m)
}

fn eval(script: &str, keys: &[&str], args: &[&[u8]]) -> redis::Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(script).arg(keys.len()).arg(keys);
    for a in args {
        c.arg(*a);
    }
    c
}

impl Ownership {
    /// `lock_urls`: the lock's independent Redis instances (at least one).
    pub fn new(
        node: String,
        keys: Keys,
        lock_urls: &[String],
        ttl: Duration,
        renew: Duration,
        op_timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let all = lock_urls
            .iter()
            .map(|u| {
                Ok(Instance {
                    client: redis::Client::open(u.as_str())?,
                    con: tokio::sync::Mutex::new(None),
                    up: AtomicBool::new(true),
                })
            })
            .collect::<Result<Vec<_>, redis::RedisError>>()?;
        let instances = Arc::new(Instances {
            urls: lock_urls.to_vec(),
            all,
            locks: Mutex::new(new_lock_manager(lock_urls)?),
        });
        if lock_urls.len() > 1 {
            tokio::spawn(health_loop(Arc::downgrade(&instances), op_timeout));
        }
        Ok(Self {
            node,
            keys,
            instances,
            ttl,
            renew,
            op_timeout,
        })
    }

    /// How many of the lock's instances answered their latest command or health ping,
    /// and of how many.
    pub fn instances_up(&self) -> (usize, usize) {
        let all = &self.instances.all;
        let up = all.iter().filter(|i| i.up.load(Ordering::SeqCst)).count();
        (up, all.len())
    }

    fn manager(&self) -> LockManager {
        self.instances.locks.lock().unwrap().clone()
    }

    /// rslock keeps one multiplexed connection per instance; after an instance restarts
    /// it may stay broken, so a fresh manager (connecting to each instance lazily)
    /// replaces it on errors and when an instance comes back.
    fn reset_manager(&self) {
        reset_manager(&self.instances);
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
                    self.write_holder(session, &key, &holder_key, &lock.val)
                        .await;
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

    /// Records this node as the lock's holder, on each instance where the lock is ours.
    /// The holder key only speeds up takeover after a crash; without it a successor
    /// waits for the TTL.
    async fn write_holder(&self, session: Uuid, key: &str, holder_key: &str, val: &[u8]) {
        let ttl = self.ttl.as_millis().to_string();
        let cmd = eval(
            WRITE_HOLDER_SCRIPT,
            &[key, holder_key],
            &[val, self.node.as_bytes(), ttl.as_bytes()],
        );
        let written = self
            .instances
            .each::<i64>(&cmd, self.op_timeout)
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(1)))
            .count();
        if written < self.instances.quorum() {
            tracing::debug!(%session, written, "holder key not written on a majority");
        }
    }

    /// The lock is busy (or a majority of its instances unreachable, which rslock
    /// reports the same way): asks the instances who holds it, which also tells whether
    /// a majority answers at all, and breaks the lock if its holder is dead.
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

    /// The node recorded as holding a lock (the name most instances give); `Err` when
    /// fewer than a majority of the instances answer.
    async fn holder(&self, holder_key: &str) -> Result<Option<String>, String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(holder_key);
        let answers = self
            .instances
            .each::<Option<String>>(&cmd, self.op_timeout)
            .await;
        let mut names: Vec<(String, usize)> = Vec::new();
        let mut answered = 0;
        let mut error = None;
        for a in answers {
            match a {
                Ok(Some(h)) => {
                    answered += 1;
                    match names.iter_mut().find(|(n, _)| *n == h) {
                        Some((_, c)) => *c += 1,
                        None => names.push((h, 1)),
                    }
                }
                Ok(None) => answered += 1,
                Err(e) => error = Some(e),
            }
        }
        if answered < self.instances.quorum() {
            return Err(error.unwrap_or_else(|| "no lock quorum".into()));
        }
        Ok(names.into_iter().max_by_key(|(_, c)| *c).map(|(n, _)| n))
    }

    /// Breaks the lock on every instance where `holder` still holds it (atomic per
    /// instance); whether it was broken anywhere.
    async fn break_lock(&self, key: &str, holder_key: &str, holder: &str) -> bool {
        let cmd = eval(BREAK_SCRIPT, &[key, holder_key], &[holder.as_bytes()]);
        self.instances
            .each::<i64>(&cmd, self.op_timeout)
            .await
            .into_iter()
            .any(|r| matches!(r, Ok(1)))
    }
}

fn reset_manager(instances: &Instances) {
    if let Ok(m) = new_lock_manager(&instances.urls) {
        *instances.locks.lock().unwrap() = m;
    }
}

/// Pings the instances of a multi-instance lock; when one that was down answers again,
/// rslock's connections are rebuilt so that it counts towards the quorum again. Ends
/// with the [`Ownership`].
async fn health_loop(instances: Weak<Instances>, op_timeout: Duration) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cmd = redis::cmd("PING");
    cmd.arg("lock-health");
    loop {
        tick.tick().await;
        let Some(i) = instances.upgrade() else { return };
        let before: Vec<bool> = i.all.iter().map(|x| x.up.load(Ordering::SeqCst)).collect();
        let after: Vec<bool> = i
            .each::<String>(&cmd, op_timeout)
            .await
            .iter()
            .map(Result::is_ok)
            .collect();
        if before.iter().zip(&after).any(|(b, a)| !b && *a) {
            tracing::info!(up = ?after, "a lock instance is back; reconnecting the lock");
            reset_manager(&i);
        }
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
        let instances = &self.ownership.instances;
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        let answers = instances
            .each::<Option<Vec<u8>>>(&cmd, self.ownership.op_timeout)
            .await;
        let ours = answers
            .iter()
            .filter(|a| matches!(a, Ok(Some(v)) if *v == val))
            .count();
        let unanswered = answers.iter().filter(|a| a.is_err()).count();
        if ours >= instances.quorum() {
            return Ok(true);
        }
        if ours + unanswered < instances.quorum() {
            // A majority says the lock is not ours.
            self.shared.lost.store(true, Ordering::SeqCst);
            self.shared.lost_tx.send_replace(true);
            return Ok(false);
        }
        Err(answers
            .into_iter()
            .find_map(Result::err)
            .unwrap_or_else(|| "no lock quorum".into()))
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
        let holder_key = own.keys.lock_holder(&self.session);
        let cmd = eval(CLEAR_HOLDER_SCRIPT, &[&holder_key], &[own.node.as_bytes()]);
        let _ = own.instances.each::<i64>(&cmd, own.op_timeout).await;
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
                let mut cmd = redis::cmd("PEXPIRE");
                cmd.arg(own.keys.lock_holder(&session))
                    .arg(own.ttl.as_millis() as u64);
                let _ = own.instances.each::<i64>(&cmd, own.op_timeout).await;
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
