//! Group commit: one PostgreSQL transaction for the pending writes of many sessions.
//!
//! Session actors hand a [`CommitItem`] (their events, maybe a snapshot, outbox rows)
//! to [`Committer::commit`] and wait. A few committer tasks (`node.committers`) each
//! take everything queued (up to `node.commit_batch_max` events) and write it with one
//! multi-row `INSERT … SELECT FROM UNNEST(…)` per table, in one transaction. Nothing is
//! acknowledged to a client before its item's transaction has committed
//! (invariant 2), and an actor never has two items in flight, so per-session order
//! is kept even with several committers.
//!
//! If a group transaction fails because one session is fenced (or another
//! deterministic refusal), the group is retried one item per transaction, so one stale
//! owner never fails its neighbours' writes.

use crate::store::Store;
use chrono::NaiveDateTime;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// One event row to insert.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: Uuid,
    pub seq: u64,
    pub kind: String,
    pub data: Value,
    pub command_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub created_at: NaiveDateTime,
    /// The command (or hub event) that produced it, on every event of the command.
    pub correlation: Option<Uuid>,
}

/// A snapshot of a session's state at `seq`.
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub seq: u64,
    pub state: Value,
}

/// A Message Hub event to publish later (transactional outbox).
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub event_id: Uuid,
    pub seq: u64,
    pub routing_key: String,
    pub payload: Value,
}

/// Everything one actor wants written atomically.
#[derive(Debug, Clone)]
pub struct CommitItem {
    pub session: Uuid,
    pub epoch: u64,
    pub events: Vec<EventRow>,
    pub snapshot: Option<SnapshotRow>,
    pub outbox: Vec<OutboxRow>,
    /// New `sessions.status` (lifecycle change), with the time of the change.
    pub status: Option<(String, NaiveDateTime)>,
    /// Characters that entered the session (for the hub's character index).
    pub characters: Vec<Uuid>,
}

/// Why an item was not committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The session's epoch moved on: this node is no longer its owner.
    #[error("fenced")]
    Fenced,
    /// The database refused or could not be reached; the outcome may be unknown
    /// (a commit whose reply was lost), so the actor reloads from the log.
    #[error("commit failed: {0}")]
    Failed(String),
}

type Job = (CommitItem, oneshot::Sender<Result<(), CommitError>>);

/// Handle to the committer tasks.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl Committer {
    /// Starts `workers` committer tasks on `store`.
    pub fn start(
        store: Store,
        workers: usize,
        max_events: usize,
    ) -> (Committer, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel::<Job>(8192);
        let rx = Arc::new(Mutex::new(rx));
        let tasks = (0..workers.max(1))
            .map(|_| {
                let rx = rx.clone();
                let store = store.clone();
                tokio::spawn(async move { worker(store, rx, max_events.max(1)).await })
            })
            .collect();
        (Committer { tx }, tasks)
    }

    /// Commits `item`; returns once it is durable (or refused).
    pub async fn commit(&self, item: CommitItem) -> Result<(), CommitError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((item, done))
            .await
            .map_err(|_| CommitError::Failed("committer stopped".into()))?;
        wait.await
            .unwrap_or_else(|_| Err(CommitError::Failed("committer stopped".into())))
    }
}

async fn worker(store: Store, rx: Arc<Mutex<mpsc::Receiver<Job>>>, max_events: usize) {
    loop {
        let mut jobs: Vec<Job> = Vec::new();
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut events = first.0.events.len();
            jobs.push(first);
            while events < max_events {
                match rx.try_recv() {
                    Ok(job) => {
                        events += job.0.events.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
        }
        let started = Instant::now();
        let items: Vec<&CommitItem> = jobs.iter().map(|(i, _)| i).collect();
        let result = write(&store, &items).await;
        metrics::histogram!("gs_node_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("gs_node_commit_items").record(items.len() as f64);
        match result {
            Ok(()) => {
                for (_, done) in jobs {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) if jobs.len() > 1 && is_per_item(&e) => {
                // Isolate the refused item(s): one transaction each.
                for (item, done) in jobs {
                    let r = write(&store, &[&item]).await.map_err(classify);
                    let _ = done.send(r);
                }
            }
            Err(e) => {
                let err = classify(e);
                tracing::warn!(error = %err, items = jobs.len(), "group commit failed");
                for (_, done) in jobs {
                    let _ = done.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Errors caused by one item rather than by the database as a whole.
fn is_per_item(e: &WriteError) -> bool {
    match e {
        WriteError::Pg(e) => {
            gs_shared::db::is_fenced(e)
                || e.code().is_some_and(|c| {
                    *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                        || *c == tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION
                })
        }
        WriteError::Pool(_) => false,
    }
}

fn classify(e: WriteError) -> CommitError {
    match e {
        WriteError::Pg(e) if gs_shared::db::is_fenced(&e) => CommitError::Fenced,
        WriteError::Pg(e) => CommitError::Failed(format!("{e}")),
        WriteError::Pool(e) => CommitError::Failed(e),
    }
}

enum WriteError {
    Pg(tokio_postgres::Error),
    Pool(String),
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::Pg(e)
    }
}

const INSERT_EVENTS: &str = "INSERT INTO session_events \
    (id, session_id, event_type, event_data, created_at, seq, epoch, command_id, user_id) \
    SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::varchar[], $4::jsonb[], \
    $5::timestamp[], $6::int8[], $7::int8[], $8::uuid[], $9::uuid[])";

const INSERT_SNAPSHOTS: &str = "INSERT INTO session_states \
    (id, session_id, state, version, created_at, seq, epoch) \
    SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::jsonb[], $4::varchar[], \
    $5::timestamp[], $6::int8[], $7::int8[])";

const INSERT_OUTBOX: &str = "INSERT INTO hub_outbox \
    (event_id, session_id, seq, epoch, routing_key, payload, created_at) \
    SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::int8[], $5::varchar[], \
    $6::jsonb[], $7::timestamp[])";

const INSERT_CHARACTERS: &str = "INSERT INTO session_characters (character_id, session_id) \
    SELECT c, $2 FROM UNNEST($1::uuid[]) AS c ON CONFLICT DO NOTHING";

const UPDATE_STATUS: &str = "UPDATE sessions SET status = $2, updated_at = $3 \
    WHERE id = $1 AND owner_epoch = $4";

async fn write(store: &Store, items: &[&CommitItem]) -> Result<(), WriteError> {
    let mut client = store
        .pool()
        .get()
        .await
        .map_err(|e| WriteError::Pool(e.to_string()))?;
    let tx = client.transaction().await?;

    let n: usize = items.iter().map(|i| i.events.len()).sum();
    if n > 0 {
        let mut ids = Vec::with_capacity(n);
        let mut sessions = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut datas = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(n);
        let mut epochs = Vec::with_capacity(n);
        let mut commands = Vec::with_capacity(n);
        let mut users = Vec::with_capacity(n);
        for item in items {
            for e in &item.events {
                ids.push(e.id);
                sessions.push(item.session);
                kinds.push(e.kind.as_str());
                datas.push(&e.data);
                times.push(e.created_at);
                seqs.push(e.seq as i64);
                epochs.push(item.epoch as i64);
                commands.push(e.command_id);
                users.push(e.user_id);
            }
        }
        let stmt = tx.prepare_cached(INSERT_EVENTS).await?;
        tx.execute(
            &stmt,
            &[
                &ids, &sessions, &kinds, &datas, &times, &seqs, &epochs, &commands, &users,
            ],
        )
        .await?;
    }

    let snaps: Vec<(&CommitItem, &SnapshotRow)> = items
        .iter()
        .filter_map(|i| i.snapshot.as_ref().map(|s| (*i, s)))
        .collect();
    if !snaps.is_empty() {
        let now = chrono::Utc::now().naive_utc();
        let ids: Vec<Uuid> = snaps.iter().map(|_| Uuid::new_v4()).collect();
        let sessions: Vec<Uuid> = snaps.iter().map(|(i, _)| i.session).collect();
        let states: Vec<&Value> = snaps.iter().map(|(_, s)| &s.state).collect();
        let versions: Vec<String> = snaps.iter().map(|(_, s)| s.seq.to_string()).collect();
        let times: Vec<NaiveDateTime> = snaps.iter().map(|_| now).collect();
        let seqs: Vec<i64> = snaps.iter().map(|(_, s)| s.seq as i64).collect();
        let epochs: Vec<i64> = snaps.iter().map(|(i, _)| i.epoch as i64).collect();
        let stmt = tx.prepare_cached(INSERT_SNAPSHOTS).await?;
        tx.execute(
            &stmt,
            &[&ids, &sessions, &states, &versions, &times, &seqs, &epochs],
        )
        .await?;
    }

    let m: usize = items.iter().map(|i| i.outbox.len()).sum();
    if m > 0 {
        let now = chrono::Utc::now().naive_utc();
        let mut ids = Vec::with_capacity(m);
        let mut sessions = Vec::with_capacity(m);
        let mut seqs = Vec::with_capacity(m);
        let mut epochs = Vec::with_capacity(m);
        let mut keys = Vec::with_capacity(m);
        let mut payloads = Vec::with_capacity(m);
        let mut times = Vec::with_capacity(m);
        for item in items {
            for o in &item.outbox {
                ids.push(o.event_id);
                sessions.push(item.session);
                seqs.push(o.seq as i64);
                epochs.push(item.epoch as i64);
                keys.push(o.routing_key.as_str());
                payloads.push(&o.payload);
                times.push(now);
            }
        }
        let stmt = tx.prepare_cached(INSERT_OUTBOX).await?;
        tx.execute(
            &stmt,
            &[&ids, &sessions, &seqs, &epochs, &keys, &payloads, &times],
        )
        .await?;
    }

    for item in items.iter().filter(|i| !i.characters.is_empty()) {
        let stmt = tx.prepare_cached(INSERT_CHARACTERS).await?;
        tx.execute(&stmt, &[&item.characters, &item.session])
            .await?;
    }

    for item in items {
        if let Some((status, at)) = &item.status {
            let stmt = tx.prepare_cached(UPDATE_STATUS).await?;
            tx.execute(&stmt, &[&item.session, status, at, &(item.epoch as i64)])
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
