//! PostgreSQL access of a node (session_db): sessions, their event log, snapshots and
//! the hub outbox.
//!
//! Every write of a session's data carries the writer's epoch; the `gs_fence` trigger
//! (migration V1) refuses it unless it equals `sessions.owner_epoch`, which a new owner
//! bumps in [`Store::take_ownership`]. Group commits are in [`crate::committer`].

use crate::error::{NodeError, Result};
use chrono::NaiveDateTime;
use deadpool_postgres::Pool;
use serde_json::Value;
use uuid::Uuid;

/// One event row as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: u64,
    pub kind: String,
    pub data: Value,
    pub command_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub created_at: NaiveDateTime,
}

/// What recovery reads: the newest snapshot and the events after it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub snapshot: Option<(u64, Value)>,
    pub events: Vec<StoredEvent>,
}

/// A new session's row.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub name: String,
    pub settings: Value,
    pub created_by: Uuid,
    pub created_at: NaiveDateTime,
}

/// The outcome of [`Store::create_session`].
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// Created, owned by the caller at epoch 1.
    New,
    /// The id exists already (a retried create, or a collision).
    Exists { created_by: Uuid },
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Inserts a session and its first event (`session_created`, version 1) at epoch 1,
    /// owned by `node`.
    pub async fn create_session(
        &self,
        s: &NewSession,
        node: &str,
        event: &crate::committer::EventRow,
        outbox: &[crate::committer::OutboxRow],
    ) -> Result<Created> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let inserted = tx
            .execute(
                "INSERT INTO sessions (id, campaign_id, name, status, metadata, created_at, \
                 updated_at, created_by, settings, owner_epoch, owner_node) \
                 VALUES ($1, $2, $3, 'created', '{}'::jsonb, $4, $4, $5, $6, 1, $7) \
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &s.id,
                    &s.campaign_id,
                    &s.name,
                    &s.created_at,
                    &s.created_by,
                    &s.settings,
                    &node,
                ],
            )
            .await?;
        if inserted == 0 {
            let row = tx
                .query_one("SELECT created_by FROM sessions WHERE id = $1", &[&s.id])
                .await?;
            tx.rollback().await?;
            return Ok(Created::Exists {
                created_by: row.get(0),
            });
        }
        tx.execute(
            "INSERT INTO session_events (id, session_id, event_type, event_data, created_at, \
             seq, epoch, command_id, user_id) VALUES ($1, $2, $3, $4, $5, 1, 1, NULL, $6)",
            &[
                &event.id,
                &s.id,
                &event.kind,
                &event.data,
                &s.created_at,
                &s.created_by,
            ],
        )
        .await?;
        for o in outbox {
            tx.execute(
                "INSERT INTO hub_outbox (event_id, session_id, seq, epoch, routing_key, payload, created_at) \
                 VALUES ($1, $2, $3, 1, $4, $5, $6)",
                &[&o.event_id, &s.id, &(o.seq as i64), &o.routing_key, &o.payload, &s.created_at],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Created::New)
    }

    /// Becomes the owner of `session`: bumps `owner_epoch` and returns the new epoch,
    /// or `SessionNotFound`. Called only while holding the session's lock. Waits at
    /// most `lock_timeout_ms` for in-flight writes of a previous owner (whose
    /// transactions PostgreSQL ends after `idle_in_transaction_timeout_ms`).
    pub async fn take_ownership(
        &self,
        session: Uuid,
        node: &str,
        lock_timeout_ms: u64,
    ) -> Result<u64> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {}",
            lock_timeout_ms.max(1)
        ))
        .await?;
        let row = tx
            .query_opt(
                "UPDATE sessions SET owner_epoch = owner_epoch + 1, owner_node = $2, \
                 updated_at = now() AT TIME ZONE 'utc' \
                 WHERE id = $1 AND NOT COALESCE(is_deleted, false) RETURNING owner_epoch",
                &[&session, &node],
            )
            .await?;
        tx.commit().await?;
        match row {
            Some(r) => Ok(r.get::<_, i64>(0) as u64),
            None => Err(NodeError::SessionNotFound(session)),
        }
    }

    /// The newest snapshot at or before version `at` (the newest of all when `None`)
    /// and the events after it up to `at`, in order.
    pub async fn load(&self, session: Uuid, at: Option<u64>) -> Result<Loaded> {
        let client = self.pool.get().await?;
        let at = at.map(|v| v as i64).unwrap_or(i64::MAX);
        let snap = client
            .query_opt(
                "SELECT seq, state FROM session_states WHERE session_id = $1 AND seq <= $2 \
                 ORDER BY seq DESC LIMIT 1",
                &[&session, &at],
            )
            .await?;
        let snapshot = snap.map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Value>(1)));
        let after = snapshot.as_ref().map(|(s, _)| *s).unwrap_or(0);
        let limit = (at as u64).saturating_sub(after);
        let events = self.events_after(session, after, limit).await?;
        Ok(Loaded { snapshot, events })
    }

    /// Events with `seq > after`, at most `limit`, in order.
    pub async fn events_after(
        &self,
        session: Uuid,
        after: u64,
        limit: u64,
    ) -> Result<Vec<StoredEvent>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT seq, event_type, event_data, command_id, user_id, created_at \
                 FROM session_events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[
                    &session,
                    &(after as i64),
                    &(limit.min(i64::MAX as u64) as i64),
                ],
            )
            .await?;
        Ok(rows.iter().map(row_to_event).collect())
    }

    /// Events with `seq < before` (all when `None`), newest first, at most `limit`.
    pub async fn events_before(
        &self,
        session: Uuid,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Vec<StoredEvent>> {
        let client = self.pool.get().await?;
        let before = before.map(|b| b as i64).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT seq, event_type, event_data, command_id, user_id, created_at \
                 FROM session_events WHERE session_id = $1 AND seq < $2 \
                 ORDER BY seq DESC LIMIT $3",
                &[&session, &before, &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(row_to_event).collect())
    }

    /// The `(command_id, seq)` of the newest `limit` commands of a session: the
    /// exactly-once memory a new owner starts with.
    pub async fn recent_commands(&self, session: Uuid, limit: u64) -> Result<Vec<(Uuid, u64)>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT command_id, seq FROM session_events \
                 WHERE session_id = $1 AND command_id IS NOT NULL ORDER BY seq DESC LIMIT $2",
                &[&session, &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    /// The versions of those of `ids` that a session has already committed.
    pub async fn find_commands(&self, session: Uuid, ids: &[Uuid]) -> Result<Vec<(Uuid, u64)>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT command_id, seq FROM session_events \
                 WHERE session_id = $1 AND command_id = ANY($2)",
                &[&session, &ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    /// A session's outbox rows not yet confirmed by the broker, in version order:
    /// `(event_id, routing_key, payload)`.
    pub async fn pending_outbox(
        &self,
        session: Uuid,
        limit: i64,
    ) -> Result<Vec<(Uuid, String, Value)>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT event_id, routing_key, payload FROM hub_outbox \
                 WHERE session_id = $1 AND published_at IS NULL ORDER BY seq LIMIT $2",
                &[&session, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Marks outbox rows as published (after the broker confirmed them).
    pub async fn mark_published(&self, event_ids: &[Uuid]) -> Result<u64> {
        let client = self.pool.get().await?;
        Ok(client
            .execute(
                "UPDATE hub_outbox SET published_at = now() AT TIME ZONE 'utc' \
                 WHERE event_id = ANY($1) AND published_at IS NULL",
                &[&event_ids],
            )
            .await?)
    }

    /// Sessions with outbox rows left unpublished for longer than `older_than_ms`
    /// (their owner died, or the broker was away).
    pub async fn stale_outbox_sessions(&self, older_than_ms: i64, limit: i64) -> Result<Vec<Uuid>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT DISTINCT session_id FROM hub_outbox WHERE published_at IS NULL \
                 AND created_at < (now() AT TIME ZONE 'utc') - make_interval(secs => $1::float8 / 1000) \
                 LIMIT $2",
                &[&(older_than_ms as f64), &limit],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Sessions a character plays in (the hub's character index).
    pub async fn character_sessions(&self, character: Uuid) -> Result<Vec<Uuid>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT c.session_id FROM session_characters c JOIN sessions s ON s.id = c.session_id \
                 WHERE c.character_id = $1 AND s.status <> 'ended' AND NOT COALESCE(s.is_deleted, false)",
                &[&character],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The live sessions of a campaign.
    pub async fn campaign_sessions(&self, campaign: Uuid) -> Result<Vec<Uuid>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id FROM sessions WHERE campaign_id = $1 AND status <> 'ended' \
                 AND NOT COALESCE(is_deleted, false)",
                &[&campaign],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Sessions a node owned according to PostgreSQL (for operators and tests).
    pub async fn session_count(&self) -> Result<i64> {
        let client = self.pool.get().await?;
        Ok(client
            .query_one("SELECT count(*) FROM sessions", &[])
            .await?
            .get(0))
    }
}

fn row_to_event(r: &tokio_postgres::Row) -> StoredEvent {
    StoredEvent {
        seq: r.get::<_, i64>(0) as u64,
        kind: r.get(1),
        data: r.get(2),
        command_id: r.get(3),
        user_id: r.get(4),
        created_at: r.get(5),
    }
}
