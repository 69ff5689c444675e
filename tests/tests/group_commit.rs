//! The group commit (`Store::write_batch`) against a real PostgreSQL, in a private
//! database: a batch is written in one round trip when no session in it is fenced, and
//! when one is, the others are still written together and that one alone is answered
//! `Fenced`, whichever way the batch went.

use anyhow::Result;
use gs_node::store::{CommitError, CommitItem, Created, EventRow, NewSession, SnapshotRow, Store};
use gs_shared::config::{Config, PostgresConfig};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// A migrated database of its own.
struct Db {
    pg: PostgresConfig,
    store: Store,
}

impl Db {
    async fn new() -> Result<Db> {
        let mut pg = Config::load(None).unwrap_or_default().postgres;
        pg.dbname = format!("gs_group_commit_{}", Uuid::new_v4().simple());
        gs_shared::db::migrate(&pg).await?;
        let store = Store::new(gs_shared::db::pool(&pg, true)?);
        Ok(Db { pg, store })
    }

    /// A new session owned by `n1` at epoch 1, holding its first event.
    async fn session(&self) -> Result<Uuid> {
        let s = NewSession {
            id: Uuid::new_v4(),
            campaign_id: Uuid::new_v4(),
            name: "group commit".into(),
            settings: serde_json::json!({}),
            created_by: Uuid::new_v4(),
            created_at: chrono::Utc::now().naive_utc(),
        };
        let created = self.store.create_session(&s, "n1", &event(1)).await?;
        assert_eq!(created, Created::New);
        Ok(s.id)
    }

    /// Writes `items` as one group commit: each item's outcome.
    async fn write(&self, items: &[CommitItem]) -> Result<Vec<Result<(), CommitError>>> {
        let items: Vec<&CommitItem> = items.iter().collect();
        self.store
            .write_batch(&items, 100)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    }

    /// The one value `sql` selects about `session` (its only parameter).
    async fn value<T>(&self, sql: &str, session: Uuid) -> Result<T>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let client = self.store.pool().get().await?;
        Ok(client.query_one(sql, &[&session]).await?.get(0))
    }

    /// The versions of the session's stored events, in order.
    async fn versions(&self, session: Uuid) -> Result<Vec<i64>> {
        let client = self.store.pool().get().await?;
        let rows = client
            .query(
                "SELECT seq FROM session_events WHERE session_id = $1 ORDER BY seq",
                &[&session],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

fn event(seq: u64) -> EventRow {
    EventRow {
        id: Uuid::new_v4(),
        seq,
        kind: "state_update".into(),
        data_json: format!(r#"{{"n":{seq}}}"#),
        command_id: Some(Uuid::new_v4()),
        user_id: None,
        created_at: chrono::Utc::now().naive_utc(),
        correlation: None,
        combat_id: None,
    }
}

/// Version 2 of `session`, written at `epoch`.
fn second(session: Uuid, epoch: u64) -> CommitItem {
    CommitItem {
        session,
        epoch,
        events: vec![event(2)],
        ..CommitItem::default()
    }
}

/// Runs `body` on a fresh database (at most a minute) and drops the database
/// whatever happened.
async fn with_db<F, Fut>(body: F) -> Result<()>
where
    F: FnOnce(Arc<Db>) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let db = Arc::new(Db::new().await?);
    let r = tokio::time::timeout(Duration::from_secs(60), body(db.clone())).await;
    let _ = gs_shared::db::drop_database(&db.pg, &db.pg.dbname).await;
    r.map_err(|_| anyhow::anyhow!("timed out"))?
}

/// Every item with its events, snapshot, prune and status change: all written, in the
/// one-round-trip way (no session fenced).
#[tokio::test]
async fn a_batch_of_live_sessions_is_written_whole() -> Result<()> {
    with_db(|db| async move {
        let (a, b) = (db.session().await?, db.session().await?);
        let mut with_more = second(b, 1);
        with_more.snapshot = Some(SnapshotRow {
            seq: 2,
            state: serde_json::value::RawValue::from_string(r#"{"k":2}"#.into())?,
        });
        with_more.prune_before = Some(2);
        with_more.status = Some(("active".into(), chrono::Utc::now().naive_utc()));
        with_more.characters = vec![Uuid::new_v4()];
        let items = [second(a, 1), with_more];
        let out = db.write(&items).await?;
        assert_eq!(out, vec![Ok(()), Ok(())]);
        assert_eq!(db.versions(a).await?, vec![1, 2]);
        assert_eq!(db.versions(b).await?, vec![1, 2]);
        let status: String = db
            .value("SELECT status FROM sessions WHERE id = $1", b)
            .await?;
        assert_eq!(status, "active");
        let snapshots: i64 = db
            .value(
                "SELECT count(*) FROM session_states WHERE session_id = $1 AND seq = 2",
                b,
            )
            .await?;
        assert_eq!(snapshots, 1);
        let characters: i64 = db
            .value(
                "SELECT count(*) FROM session_characters WHERE session_id = $1",
                b,
            )
            .await?;
        assert_eq!(characters, 1);
        Ok(())
    })
    .await
}

/// One session of the batch was taken over (its epoch bumped) and another never
/// existed: those two are answered `Fenced` and nothing of theirs is stored; the
/// others are written. A fenced item may also collide with what the new owner wrote
/// meanwhile (the same version): still `Fenced`, not a failed batch.
#[tokio::test]
async fn a_fenced_or_missing_session_is_left_out_and_the_rest_written() -> Result<()> {
    with_db(|db| async move {
        let (a, b, c, d) = (
            db.session().await?,
            db.session().await?,
            db.session().await?,
            db.session().await?,
        );
        for s in [b, d] {
            let (epoch, _, _) = db.store.take_over(s, "n2", 1000, 0).await?;
            assert_eq!(epoch, 2);
        }
        // The new owner of `d` writes its version 2 first.
        let out = db.write(&[second(d, 2)]).await?;
        assert_eq!(out, vec![Ok(())]);
        let missing = Uuid::new_v4();
        let stale = [
            second(a, 1),
            second(b, 1),
            second(missing, 1),
            second(d, 1),
            second(c, 1),
        ];
        let out = db.write(&stale).await?;
        let fenced = Err(CommitError::Fenced);
        assert_eq!(
            out,
            vec![Ok(()), fenced.clone(), fenced.clone(), fenced, Ok(())]
        );
        assert_eq!(db.versions(a).await?, vec![1, 2]);
        assert_eq!(db.versions(b).await?, vec![1]);
        assert_eq!(db.versions(missing).await?, Vec::<i64>::new());
        assert_eq!(db.versions(c).await?, vec![1, 2]);
        let epoch: i64 = db
            .value(
                "SELECT epoch FROM session_events WHERE session_id = $1 AND seq = 2",
                d,
            )
            .await?;
        assert_eq!(epoch, 2, "the new owner's version 2 stays");
        // The new owner of `b` writes at its epoch.
        let out = db.write(&[second(b, 2)]).await?;
        assert_eq!(out, vec![Ok(())]);
        assert_eq!(db.versions(b).await?, vec![1, 2]);
        Ok(())
    })
    .await
}

/// An item without events (a status change alone) is not covered by the events'
/// fence: such a batch is checked first, and a fenced one changes nothing.
#[tokio::test]
async fn a_fenced_item_without_events_changes_nothing() -> Result<()> {
    with_db(|db| async move {
        let (a, b) = (db.session().await?, db.session().await?);
        db.store.take_over(b, "n2", 1000, 0).await?;
        let status_only = CommitItem {
            session: b,
            epoch: 1,
            status: Some(("ended".into(), chrono::Utc::now().naive_utc())),
            ..CommitItem::default()
        };
        let items = [second(a, 1), status_only];
        let out = db.write(&items).await?;
        assert_eq!(out, vec![Ok(()), Err(CommitError::Fenced)]);
        let status: String = db
            .value("SELECT status FROM sessions WHERE id = $1", b)
            .await?;
        assert_eq!(status, "created");
        assert_eq!(db.versions(a).await?, vec![1, 2]);
        Ok(())
    })
    .await
}
