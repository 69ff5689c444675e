//! PostgreSQL access of a node (session_db): sessions, their event log, snapshots,
//! the hub cursors and the character index. Every SQL statement of the node is here;
//! [`crate::committer`] only decides what goes into one group commit.
//!
//! **Fencing.** Every write of a session's data carries the writer's epoch. A write
//! takes a shared advisory lock on each of its sessions ([`lock_key`]) and checks their
//! epochs once per batch ([`Store::write_batch`]); a new owner takes the lock
//! exclusively while it bumps `sessions.owner_epoch` ([`Store::take_over`]). The
//! `gs_fence_rows` statement trigger (migration V3) makes the same check inside
//! PostgreSQL for every insert into the session tables, whoever sends it.

mod batch;

use crate::error::{NodeError, Result};
use chrono::NaiveDateTime;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// The statements of an activation (epoch bump, snapshot + tail, command ids): prepared
/// once per connection, and on [`Store::warm`]'s connections before the node serves.
const BUMP_EPOCH: &str = "UPDATE sessions SET owner_epoch = owner_epoch + 1, owner_node = $2, \
     updated_at = now() AT TIME ZONE 'utc' \
     WHERE id = $1 AND NOT COALESCE(is_deleted, false) RETURNING owner_epoch";
const ACTIVATE_CURSOR: &str = "INSERT INTO hub_cursor (session_id, published_seq, active, epoch) \
     SELECT id, 0, true, owner_epoch FROM sessions \
     WHERE id = $1 AND NOT COALESCE(is_deleted, false) \
     ON CONFLICT (session_id) DO UPDATE SET active = true, epoch = EXCLUDED.epoch";
const NEWEST_SNAPSHOT: &str = "SELECT seq, state FROM session_states \
     WHERE session_id = $1 AND seq <= $2 ORDER BY seq DESC LIMIT 1";
const EVENTS_AFTER: &str = "SELECT seq, event_type, event_data, command_id, user_id, created_at \
     FROM session_events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
const RECENT_COMMANDS: &str = "SELECT command_id, seq FROM session_events \
     WHERE session_id = $1 AND command_id IS NOT NULL ORDER BY seq DESC LIMIT $2";
const TAIL_AFTER_NEWEST_SNAPSHOT: &str =
    "SELECT seq, event_type, event_data, command_id, user_id, created_at \
     FROM session_events WHERE session_id = $1 AND seq > COALESCE((SELECT seq \
     FROM session_states WHERE session_id = $1 ORDER BY seq DESC LIMIT 1), 0) ORDER BY seq";
const ACTIVATION_STATEMENTS: [&str; 6] = [
    BUMP_EPOCH,
    ACTIVATE_CURSOR,
    NEWEST_SNAPSHOT,
    EVENTS_AFTER,
    TAIL_AFTER_NEWEST_SNAPSHOT,
    RECENT_COMMANDS,
];

/// One event row to insert.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: Uuid,
    pub seq: u64,
    pub kind: String,
    /// The event's data as JSON text, written once: the same text goes to the log, to
    /// clients (in the rendered event) and to the hub.
    pub data_json: String,
    /// The command id, on the command's last event only (exactly-once record).
    pub command_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub created_at: NaiveDateTime,
    /// The command (or hub event) that produced it, on every event of the command.
    pub correlation: Option<Uuid>,
    /// The combat a combat event belongs to (for the hub's `combat_id`).
    pub combat_id: Option<Uuid>,
}

/// A snapshot of a session's state at `seq`, serialised once (straight from the state,
/// without an intermediate JSON value).
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub seq: u64,
    pub state: Box<serde_json::value::RawValue>,
}

/// Everything one actor wants written atomically.
#[derive(Debug, Clone, Default)]
pub struct CommitItem {
    pub session: Uuid,
    pub epoch: u64,
    pub events: Vec<EventRow>,
    pub snapshot: Option<SnapshotRow>,
    /// Snapshots older than this version are pruned with this write, except anchors
    /// (versions that are multiples of `anchor_every`).
    pub prune_before: Option<u64>,
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

/// An event as the hub relay reads it back from the log.
#[derive(Debug, Clone)]
pub struct HubRow {
    pub id: Uuid,
    pub seq: u64,
    pub kind: String,
    pub data_json: String,
    pub created_at: NaiveDateTime,
    pub correlation: Option<Uuid>,
    pub combat_id: Option<Uuid>,
}

impl From<EventRow> for HubRow {
    fn from(e: EventRow) -> HubRow {
        HubRow {
            id: e.id,
            seq: e.seq,
            kind: e.kind,
            data_json: e.data_json,
            created_at: e.created_at,
            correlation: e.correlation,
            combat_id: e.combat_id,
        }
    }
}

/// JSON text sent as a `json`/`jsonb` parameter as it is (PostgreSQL parses it once),
/// instead of serialising a `serde_json::Value` again.
#[derive(Debug)]
pub struct JsonText<'a>(pub &'a str);

impl tokio_postgres::types::ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        use bytes::BufMut;
        if *ty == tokio_postgres::types::Type::JSONB {
            // jsonb's binary input: a format version, then the text.
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        matches!(
            *ty,
            tokio_postgres::types::Type::JSON | tokio_postgres::types::Type::JSONB
        )
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The advisory-lock key of a session: the first 64 bits of its id (the same as the
/// SQL function `gs_lock_key`).
pub fn lock_key(session: &Uuid) -> i64 {
    let b = session.as_bytes();
    i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

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

    /// Opens `connections` connections at once and prepares every statement of an
    /// activation and of a group commit on each. Run before the node joins the ring: a
    /// new node then takes over its first sessions on warm connections, instead of
    /// paying for new server processes, their catalog caches and a prepare per
    /// statement while the moved sessions' clients wait.
    pub async fn warm(&self, connections: usize) -> Result<()> {
        let n = connections.min(self.pool.status().max_size).max(1);
        let clients = futures::future::try_join_all((0..n).map(|_| self.pool.get())).await?;
        let statements = ACTIVATION_STATEMENTS.iter().chain(batch::STATEMENTS.iter());
        futures::future::try_join_all(
            clients
                .iter()
                .flat_map(|c| statements.clone().map(move |sql| c.prepare_cached(sql))),
        )
        .await?;
        Ok(())
    }

    /// Inserts a session, its first event (`session_created`, version 1) and its hub
    /// cursor at epoch 1, owned by `node`.
    pub async fn create_session(
        &self,
        s: &NewSession,
        node: &str,
        event: &EventRow,
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
             seq, epoch, command_id, user_id, correlation_id) \
             VALUES ($1, $2, $3, $4, $5, 1, 1, NULL, $6, $7)",
            &[
                &event.id,
                &s.id,
                &event.kind,
                &JsonText(&event.data_json),
                &s.created_at,
                &s.created_by,
                &event.correlation,
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO hub_cursor (session_id, published_seq, active, epoch) VALUES ($1, 0, true, 1)",
            &[&s.id],
        )
        .await?;
        tx.commit().await?;
        Ok(Created::New)
    }

    /// The sessions last owned by one of `nodes` that were not stopped cleanly (their
    /// hub cursor is still active): what a departed member leaves to adopt.
    pub async fn unfinished_sessions_of(&self, nodes: &[String]) -> Result<Vec<Uuid>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT s.id FROM sessions s JOIN hub_cursor c ON c.session_id = s.id \
                 WHERE c.active AND s.owner_node = ANY($1) AND NOT COALESCE(s.is_deleted, false)",
                &[&nodes],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Becomes the owner of `session`: bumps `owner_epoch` and returns the new epoch
    /// with what recovery reads (the newest snapshot, the events after it, the newest
    /// `commands` command ids), or `SessionNotFound`. Called only while holding the
    /// session's lock. The epoch bump holds the session's advisory lock exclusively, so
    /// it waits for in-flight writes of a previous owner (at most `lock_timeout_ms`;
    /// PostgreSQL ends a paused writer's transaction after
    /// `idle_in_transaction_timeout_ms`), and writes queued behind it see the new
    /// epoch. The hub cursor is marked active (this owner may leave events to publish).
    ///
    /// Everything is sent together and executed in order, in one transaction: the lock
    /// timeout, the exclusive lock (its key a number computed here, not input), the
    /// bump, the cursor (which reads the bumped epoch; nothing when the session does
    /// not exist), then the reads — one round trip and the commit. The reads run under
    /// the exclusive lock, after the bump: no writer of the session (they all take the
    /// lock shared) can add an event or a snapshot between them. Should the tail still
    /// not start right after the snapshot, the reads are made again on their own.
    pub async fn take_over(
        &self,
        session: Uuid,
        node: &str,
        lock_timeout_ms: u64,
        commands: u64,
    ) -> Result<(u64, Loaded, Vec<(Uuid, u64)>)> {
        let mut client = self.pool.get().await?;
        let (bump, cursor, newest, tail, recent) = tokio::try_join!(
            client.prepare_cached(BUMP_EPOCH),
            client.prepare_cached(ACTIVATE_CURSOR),
            client.prepare_cached(NEWEST_SNAPSHOT),
            client.prepare_cached(TAIL_AFTER_NEWEST_SNAPSHOT),
            client.prepare_cached(RECENT_COMMANDS)
        )?;
        let tx = client.transaction().await?;
        let lock = format!(
            "SET LOCAL lock_timeout = {}; SELECT pg_advisory_xact_lock({})",
            lock_timeout_ms.max(1),
            lock_key(&session)
        );
        let newest_at = i64::MAX;
        let limit = commands as i64;
        let bump_args: [&(dyn ToSql + Sync); 2] = [&session, &node];
        let session_arg: [&(dyn ToSql + Sync); 1] = [&session];
        let newest_args: [&(dyn ToSql + Sync); 2] = [&session, &newest_at];
        let recent_args: [&(dyn ToSql + Sync); 2] = [&session, &limit];
        let (_, row, _, snap, tail_rows, recent_rows) = tokio::try_join!(
            tx.batch_execute(&lock),
            tx.query_opt(&bump, &bump_args),
            tx.execute(&cursor, &session_arg),
            tx.query_opt(&newest, &newest_args),
            tx.query(&tail, &session_arg),
            tx.query(&recent, &recent_args)
        )?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(NodeError::SessionNotFound(session));
        };
        let epoch = row.get::<_, i64>(0) as u64;
        tx.commit().await?;
        drop(client);
        let snapshot = snapshot_of(session, snap)?;
        let events = events_of(session, &tail_rows)?;
        let after = snapshot.as_ref().map_or(0, |(seq, _)| *seq);
        if events.first().is_some_and(|e| e.seq != after + 1) {
            let (loaded, commands) = self.load_with_commands(session, None, commands).await?;
            return Ok((epoch, loaded, commands));
        }
        Ok((
            epoch,
            Loaded { snapshot, events },
            command_ids(&recent_rows),
        ))
    }

    /// The newest snapshot at or before version `at` (the newest of all when `None`)
    /// and the events after it up to `at`, in order.
    pub async fn load(&self, session: Uuid, at: Option<u64>) -> Result<Loaded> {
        Ok(self.load_with_commands(session, at, 0).await?.0)
    }

    /// [`load`](Self::load), and the ids of the newest `commands` commands with their
    /// versions, on one connection: the snapshot and the command ids are asked
    /// together, then the events after the snapshot.
    pub async fn load_with_commands(
        &self,
        session: Uuid,
        at: Option<u64>,
        commands: u64,
    ) -> Result<(Loaded, Vec<(Uuid, u64)>)> {
        let client = self.pool.get().await?;
        let at = at.map(|v| v as i64).unwrap_or(i64::MAX);
        let (newest, after_stmt, recent) = tokio::try_join!(
            client.prepare_cached(NEWEST_SNAPSHOT),
            client.prepare_cached(EVENTS_AFTER),
            client.prepare_cached(RECENT_COMMANDS)
        )?;
        let recent_rows = async {
            match commands {
                0 => Ok(Vec::new()),
                n => client.query(&recent, &[&session, &(n as i64)]).await,
            }
        };
        let newest_args: [&(dyn ToSql + Sync); 2] = [&session, &at];
        let (snap, recent_rows) =
            tokio::try_join!(client.query_opt(&newest, &newest_args), recent_rows)?;
        let snapshot = snapshot_of(session, snap)?;
        let after = snapshot.as_ref().map(|(s, _)| *s).unwrap_or(0);
        let limit = (at as u64).saturating_sub(after).min(i64::MAX as u64) as i64;
        let rows = client
            .query(&after_stmt, &[&session, &(after as i64), &limit])
            .await?;
        let events = events_of(session, &rows)?;
        Ok((Loaded { snapshot, events }, command_ids(&recent_rows)))
    }

    /// Events with `seq > after`, at most `limit`, in order.
    pub async fn events_after(
        &self,
        session: Uuid,
        after: u64,
        limit: u64,
    ) -> Result<Vec<StoredEvent>> {
        let client = self.pool.get().await?;
        let after_stmt = client.prepare_cached(EVENTS_AFTER).await?;
        let rows = client
            .query(
                &after_stmt,
                &[
                    &session,
                    &(after as i64),
                    &(limit.min(i64::MAX as u64) as i64),
                ],
            )
            .await?;
        events_of(session, &rows)
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
        events_of(session, &rows)
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

    /// Writes many sessions' items in one transaction (group commit). Items whose
    /// session is no longer owned at their epoch are left out and answered `Fenced`;
    /// the others are written together. `anchor_every`: snapshots at multiples of it
    /// survive pruning (they bound a rollback's replay).
    pub async fn write_batch(
        &self,
        items: &[&CommitItem],
        anchor_every: u64,
    ) -> std::result::Result<Vec<Result<(), CommitError>>, BatchError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| BatchError::Pool(e.to_string()))?;
        let r = batch::write(&client, items, anchor_every).await;
        if r.is_err() {
            // Its transaction may still be open: the connection is not reused.
            drop(deadpool_postgres::Object::take(client));
        }
        r
    }

    /// The hub cursor of a session: every event up to it has been confirmed by the
    /// broker (`None`: no cursor, nothing to publish).
    pub async fn hub_cursor(&self, session: Uuid) -> Result<Option<u64>> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT published_seq FROM hub_cursor WHERE session_id = $1",
                &[&session],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    /// Events after `after` for the hub, in order, at most `limit`.
    pub async fn hub_events(&self, session: Uuid, after: u64, limit: u64) -> Result<Vec<HubRow>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, seq, event_type, event_data::text, created_at, correlation_id, combat_id \
                 FROM session_events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&session, &(after as i64), &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| HubRow {
                id: r.get(0),
                seq: r.get::<_, i64>(1) as u64,
                kind: r.get(2),
                data_json: r.get(3),
                created_at: r.get(4),
                correlation: r.get(5),
                combat_id: r.get(6),
            })
            .collect())
    }

    /// Moves hub cursors forward (never back), in one statement.
    pub async fn advance_cursors(&self, to: &[(Uuid, u64)]) -> Result<()> {
        if to.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let ids: Vec<Uuid> = to.iter().map(|(s, _)| *s).collect();
        let seqs: Vec<i64> = to.iter().map(|(_, v)| *v as i64).collect();
        client
            .execute(
                "UPDATE hub_cursor c SET published_seq = v.seq \
                 FROM unnest($1::uuid[], $2::int8[]) AS v(id, seq) \
                 WHERE c.session_id = v.id AND c.published_seq < v.seq",
                &[&ids, &seqs],
            )
            .await?;
        Ok(())
    }

    /// An owner stopped with everything up to `version` published: the session no
    /// longer needs the sweeper's attention (unless a newer owner marked it since).
    pub async fn deactivate_cursor(&self, session: Uuid, epoch: u64, version: u64) -> Result<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE hub_cursor SET active = false \
                 WHERE session_id = $1 AND epoch = $2 AND published_seq >= $3",
                &[&session, &(epoch as i64), &(version as i64)],
            )
            .await?;
        Ok(())
    }

    /// Active sessions with events committed more than `older_than_ms` ago and not yet
    /// published (their owner died, or the broker was away).
    pub async fn lagging_sessions(&self, older_than_ms: i64, limit: i64) -> Result<Vec<Uuid>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT c.session_id FROM hub_cursor c WHERE c.active AND EXISTS ( \
                   SELECT 1 FROM session_events e WHERE e.session_id = c.session_id \
                   AND e.seq > c.published_seq \
                   AND e.created_at < (now() AT TIME ZONE 'utc') - make_interval(secs => $1::float8 / 1000)) \
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

    /// The campaign of a session (`None`: no such session), for the membership check
    /// of a join.
    pub async fn session_campaign(&self, session: Uuid) -> Result<Option<Uuid>> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT campaign_id FROM sessions WHERE id = $1",
                &[&session],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
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

/// A snapshot row (`seq`, `state`), if any.
fn snapshot_of(session: Uuid, row: Option<tokio_postgres::Row>) -> Result<Option<(u64, Value)>> {
    let Some(r) = row else { return Ok(None) };
    let seq = r.get::<_, i64>(0) as u64;
    let state = r.try_get::<_, Value>(1).map_err(|e| {
        NodeError::Corrupt(format!("snapshot {seq} of {session} cannot be read: {e}"))
    })?;
    Ok(Some((seq, state)))
}

/// Command id rows (`command_id`, `seq`).
fn command_ids(rows: &[tokio_postgres::Row]) -> Vec<(Uuid, u64)> {
    rows.iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect()
}

/// Event rows, in their order (see [`row_to_event`]).
fn events_of(session: Uuid, rows: &[tokio_postgres::Row]) -> Result<Vec<StoredEvent>> {
    rows.iter().map(|r| row_to_event(session, r)).collect()
}

/// An event row. Its data is decoded fallibly (serde_json's nesting limit applies):
/// a row that cannot be read is `Corrupt`, never a panic.
fn row_to_event(session: Uuid, r: &tokio_postgres::Row) -> Result<StoredEvent> {
    let seq = r.get::<_, i64>(0) as u64;
    let data = r
        .try_get(2)
        .map_err(|e| NodeError::Corrupt(format!("event {seq} of {session} cannot be read: {e}")))?;
    Ok(StoredEvent {
        seq,
        kind: r.get(1),
        data,
        command_id: r.get(3),
        user_id: r.get(4),
        created_at: r.get(5),
    })
}

/// Why a group commit failed as a whole.
#[derive(Debug)]
pub enum BatchError {
    Pg(tokio_postgres::Error),
    Pool(String),
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(e: tokio_postgres::Error) -> Self {
        BatchError::Pg(e)
    }
}

impl BatchError {
    /// Errors caused by one item rather than by the database as a whole (retrying
    /// the items one by one isolates it).
    pub fn is_per_item(&self) -> bool {
        match self {
            BatchError::Pg(e) => {
                gs_shared::db::is_fenced(e)
                    || e.code().is_some_and(|c| {
                        *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                            || *c == tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION
                            || c.code().starts_with("22")
                    })
            }
            BatchError::Pool(_) => false,
        }
    }

    pub fn into_commit_error(self) -> CommitError {
        match self {
            BatchError::Pg(e) if gs_shared::db::is_fenced(&e) => CommitError::Fenced,
            BatchError::Pg(e) => CommitError::Failed(format!("{e}")),
            BatchError::Pool(e) => CommitError::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_the_first_64_bits() {
        let id = Uuid::parse_str("01234567-89ab-cdef-0123-456789abcdef").unwrap();
        assert_eq!(lock_key(&id), 0x0123_4567_89ab_cdef_i64);
        let high = Uuid::parse_str("ffffffff-ffff-ffff-0000-000000000000").unwrap();
        assert_eq!(lock_key(&high), -1);
    }
}
