//! One group commit: one round trip to PostgreSQL, two when a session was fenced.
//!
//! **One round trip** (every item writes at least one event: the usual case). `BEGIN`,
//! the sessions' advisory locks (shared, in key order so that no two writers wait for
//! each other in a circle), every write and `COMMIT` are sent together. The fencing
//! trigger on `session_events` checks every item's session at the item's epoch, under
//! those locks, before any later statement runs; a stale or missing session makes it
//! refuse the insert (or a uniqueness check refuses a fenced owner's row first: the
//! new owner wrote that version or that command), PostgreSQL turns the rest and the
//! `COMMIT` into a rollback, and the batch is written again the checked way.
//!
//! **Checked, two round trips** (an item without events, or after a refusal):
//! 1. `BEGIN`, the sessions' advisory locks and their epochs, pipelined. The epochs
//!    are read by a statement after the locks': it sees every epoch bump committed
//!    before the locks were granted, and no bump can commit until this transaction
//!    ends. Items whose epoch is stale (or whose session is gone) are left out.
//! 2. Every write of the remaining items and `COMMIT`, pipelined. If a write fails,
//!    PostgreSQL turns the `COMMIT` into a rollback; the first error is returned.
//!
//! Statements are prepared once per connection (`prepare_cached`); every value is a
//! parameter (arrays for the multi-row inserts).

use super::{BatchError, CommitError, CommitItem, JsonText};
use chrono::NaiveDateTime;
use futures::future::{join_all, BoxFuture, FutureExt};
use std::collections::HashMap;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;

type Client = deadpool_postgres::ClientWrapper;
type Outcomes = Vec<Result<(), CommitError>>;

pub(super) async fn write(
    client: &Client,
    items: &[&CommitItem],
    anchor_every: u64,
) -> Result<Outcomes, BatchError> {
    if items.iter().all(|i| !i.events.is_empty()) {
        match write_in_one_trip(client, items, anchor_every).await {
            Ok(()) => return Ok(items.iter().map(|_| Ok(())).collect()),
            // A refused row: the fence, or a row a fenced owner should not have
            // written (a newer owner's version or command is in the log already, a
            // uniqueness check that runs before the fence's). The checked way tells
            // them apart.
            Err(e) if e.is_per_item() => {
                metrics::counter!("gs_node_commit_rechecked_total").increment(1);
            }
            Err(e) => return Err(e),
        }
    }
    write_checked(client, items, anchor_every).await
}

/// Every item has events: the transaction, the locks, the writes and the commit in one
/// round trip; the fencing trigger refuses the whole batch if any session is fenced.
async fn write_in_one_trip(
    client: &Client,
    items: &[&CommitItem],
    anchor_every: u64,
) -> Result<(), BatchError> {
    let st = Statements::prepare(client).await?;
    let lock = client.prepare_cached(LOCK_SESSIONS).await?;
    let keys = lock_keys(items);
    let lock_params: [&(dyn ToSql + Sync); 1] = [&keys];
    // Polled in order: BEGIN and the locks are sent before the writes.
    let (begin, locked, written) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.execute(&lock, &lock_params),
        write_and_commit(client, &st, items, anchor_every),
    );
    begin?;
    locked?;
    written
}

/// Leaves out the items whose session is fenced and writes the others.
async fn write_checked(
    client: &Client,
    items: &[&CommitItem],
    anchor_every: u64,
) -> Result<Outcomes, BatchError> {
    let fenced = begin_and_fence(client, items).await?;
    let live: Vec<&CommitItem> = items
        .iter()
        .zip(&fenced)
        .filter(|(_, f)| !**f)
        .map(|(i, _)| *i)
        .collect();
    let st = Statements::prepare(client).await?;
    write_and_commit(client, &st, &live, anchor_every).await?;
    Ok(fenced
        .into_iter()
        .map(|f| if f { Err(CommitError::Fenced) } else { Ok(()) })
        .collect())
}

/// Sends every write of `items` and `COMMIT` (in an open transaction), pipelined; the
/// first error, if any (then the `COMMIT` was a rollback).
async fn write_and_commit(
    client: &Client,
    st: &Statements,
    items: &[&CommitItem],
    anchor_every: u64,
) -> Result<(), BatchError> {
    let events = EventArrays::of(items);
    let snapshots = SnapshotArrays::of(items, anchor_every);
    let statuses: Vec<(Uuid, &String, &NaiveDateTime, i64)> = items
        .iter()
        .filter_map(|i| {
            i.status
                .as_ref()
                .map(|(s, at)| (i.session, s, at, i.epoch as i64))
        })
        .collect();
    // The parameters outlive the pipelined requests.
    let event_params = events.as_ref().map(EventArrays::params);
    let snapshot_params = snapshots.as_ref().map(SnapshotArrays::insert_params);
    let prune_params = snapshots.as_ref().and_then(SnapshotArrays::prune_params);
    let character_params: Vec<[&(dyn ToSql + Sync); 2]> = items
        .iter()
        .filter(|i| !i.characters.is_empty())
        .map(|i| [&i.characters as &(dyn ToSql + Sync), &i.session])
        .collect();
    let status_params: Vec<[&(dyn ToSql + Sync); 4]> = statuses
        .iter()
        .map(|(session, status, at, epoch)| [session as &(dyn ToSql + Sync), *status, *at, epoch])
        .collect();
    // The events first: their fencing trigger runs before anything else is written.
    let mut writes: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = Vec::new();
    if let Some(p) = &event_params {
        writes.push(client.execute(&st.events, p).boxed());
    }
    if let Some(p) = &snapshot_params {
        writes.push(client.execute(&st.snapshots, p).boxed());
    }
    if let Some(p) = &prune_params {
        writes.push(client.execute(&st.prune, p).boxed());
    }
    for p in &character_params {
        writes.push(client.execute(&st.characters, p).boxed());
    }
    for p in &status_params {
        writes.push(client.execute(&st.status, p).boxed());
    }
    // Polled in order: every write is sent before the COMMIT.
    let (results, commit) = tokio::join!(join_all(writes), client.batch_execute("COMMIT"));
    for r in results {
        r?;
    }
    commit?;
    Ok(())
}

/// The items' sessions' advisory-lock keys, sorted, once each.
fn lock_keys(items: &[&CommitItem]) -> Vec<i64> {
    let mut keys: Vec<i64> = items.iter().map(|i| super::lock_key(&i.session)).collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Round trip 1: opens the transaction, locks the sessions and returns, per item,
/// whether its epoch is stale.
async fn begin_and_fence(client: &Client, items: &[&CommitItem]) -> Result<Vec<bool>, BatchError> {
    let mut sessions: Vec<Uuid> = items.iter().map(|i| i.session).collect();
    sessions.sort();
    sessions.dedup();
    let keys = lock_keys(items);
    let lock = client.prepare_cached(LOCK_SESSIONS).await?;
    let epochs = client.prepare_cached(SESSION_EPOCHS).await?;
    let (lock_params, epoch_params): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
        ([&keys], [&sessions]);
    let (begin, locked, rows) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.execute(&lock, &lock_params),
        client.query(&epochs, &epoch_params),
    );
    begin?;
    locked?;
    let epochs: HashMap<Uuid, i64> = rows?.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(items
        .iter()
        .map(|i| epochs.get(&i.session) != Some(&(i.epoch as i64)))
        .collect())
}

struct Statements {
    events: tokio_postgres::Statement,
    snapshots: tokio_postgres::Statement,
    prune: tokio_postgres::Statement,
    characters: tokio_postgres::Statement,
    status: tokio_postgres::Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            events: client.prepare_cached(INSERT_EVENTS).await?,
            snapshots: client.prepare_cached(INSERT_SNAPSHOTS).await?,
            prune: client.prepare_cached(PRUNE_SNAPSHOTS).await?,
            characters: client.prepare_cached(INSERT_CHARACTERS).await?,
            status: client.prepare_cached(UPDATE_STATUS).await?,
        })
    }
}

/// The columns of the event rows, as arrays (one multi-row insert).
struct EventArrays<'a> {
    ids: Vec<Uuid>,
    sessions: Vec<Uuid>,
    kinds: Vec<&'a str>,
    datas: Vec<JsonText<'a>>,
    times: Vec<NaiveDateTime>,
    seqs: Vec<i64>,
    epochs: Vec<i64>,
    commands: Vec<Option<Uuid>>,
    users: Vec<Option<Uuid>>,
    correlations: Vec<Option<Uuid>>,
    combats: Vec<Option<Uuid>>,
}

impl<'a> EventArrays<'a> {
    fn of(items: &[&'a CommitItem]) -> Option<EventArrays<'a>> {
        let n: usize = items.iter().map(|i| i.events.len()).sum();
        if n == 0 {
            return None;
        }
        let mut a = EventArrays {
            ids: Vec::with_capacity(n),
            sessions: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            datas: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            epochs: Vec::with_capacity(n),
            commands: Vec::with_capacity(n),
            users: Vec::with_capacity(n),
            correlations: Vec::with_capacity(n),
            combats: Vec::with_capacity(n),
        };
        for item in items {
            for e in &item.events {
                a.ids.push(e.id);
                a.sessions.push(item.session);
                a.kinds.push(e.kind.as_str());
                a.datas.push(JsonText(&e.data_json));
                a.times.push(e.created_at);
                a.seqs.push(e.seq as i64);
                a.epochs.push(item.epoch as i64);
                a.commands.push(e.command_id);
                a.users.push(e.user_id);
                a.correlations.push(e.correlation);
                a.combats.push(e.combat_id);
            }
        }
        Some(a)
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.ids,
            &self.sessions,
            &self.kinds,
            &self.datas,
            &self.times,
            &self.seqs,
            &self.epochs,
            &self.commands,
            &self.users,
            &self.correlations,
            &self.combats,
        ]
    }
}

/// The items' snapshots, and the older ones they make redundant.
struct SnapshotArrays<'a> {
    ids: Vec<Uuid>,
    sessions: Vec<Uuid>,
    states: Vec<Json<&'a serde_json::value::RawValue>>,
    versions: Vec<String>,
    times: Vec<NaiveDateTime>,
    seqs: Vec<i64>,
    epochs: Vec<i64>,
    prune_sessions: Vec<Uuid>,
    prune_before: Vec<i64>,
    anchor_every: i64,
}

impl<'a> SnapshotArrays<'a> {
    fn of(items: &[&'a CommitItem], anchor_every: u64) -> Option<SnapshotArrays<'a>> {
        let snaps: Vec<(&CommitItem, &super::SnapshotRow)> = items
            .iter()
            .filter_map(|i| i.snapshot.as_ref().map(|s| (*i, s)))
            .collect();
        if snaps.is_empty() {
            return None;
        }
        let now = chrono::Utc::now().naive_utc();
        let prune: Vec<(Uuid, i64)> = snaps
            .iter()
            .filter_map(|(i, _)| i.prune_before.map(|p| (i.session, p as i64)))
            .collect();
        Some(SnapshotArrays {
            ids: snaps.iter().map(|_| Uuid::now_v7()).collect(),
            sessions: snaps.iter().map(|(i, _)| i.session).collect(),
            states: snaps.iter().map(|(_, s)| Json(&*s.state)).collect(),
            versions: snaps.iter().map(|(_, s)| s.seq.to_string()).collect(),
            times: snaps.iter().map(|_| now).collect(),
            seqs: snaps.iter().map(|(_, s)| s.seq as i64).collect(),
            epochs: snaps.iter().map(|(i, _)| i.epoch as i64).collect(),
            prune_sessions: prune.iter().map(|p| p.0).collect(),
            prune_before: prune.iter().map(|p| p.1).collect(),
            anchor_every: anchor_every.max(1) as i64,
        })
    }

    fn insert_params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.ids,
            &self.sessions,
            &self.states,
            &self.versions,
            &self.times,
            &self.seqs,
            &self.epochs,
        ]
    }

    fn prune_params(&self) -> Option<[&(dyn ToSql + Sync); 3]> {
        (!self.prune_sessions.is_empty()).then_some([
            &self.prune_sessions as &(dyn ToSql + Sync),
            &self.prune_before,
            &self.anchor_every,
        ])
    }
}

/// Every statement of a group commit (prepared ahead by [`super::Store::warm`]).
pub(super) const STATEMENTS: [&str; 7] = [
    LOCK_SESSIONS,
    SESSION_EPOCHS,
    INSERT_EVENTS,
    INSERT_SNAPSHOTS,
    PRUNE_SNAPSHOTS,
    INSERT_CHARACTERS,
    UPDATE_STATUS,
];

const LOCK_SESSIONS: &str =
    "SELECT count(pg_advisory_xact_lock_shared(k)) FROM unnest($1::int8[]) AS k";

const SESSION_EPOCHS: &str = "SELECT id, owner_epoch FROM sessions WHERE id = ANY($1)";

const INSERT_EVENTS: &str = "INSERT INTO session_events \
    (id, session_id, event_type, event_data, created_at, seq, epoch, command_id, user_id, \
     correlation_id, combat_id) \
    SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::varchar[], $4::jsonb[], \
    $5::timestamp[], $6::int8[], $7::int8[], $8::uuid[], $9::uuid[], $10::uuid[], $11::uuid[])";

const INSERT_SNAPSHOTS: &str = "INSERT INTO session_states \
    (id, session_id, state, version, created_at, seq, epoch) \
    SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::jsonb[], $4::varchar[], \
    $5::timestamp[], $6::int8[], $7::int8[])";

const PRUNE_SNAPSHOTS: &str = "DELETE FROM session_states s \
    USING unnest($1::uuid[], $2::int8[]) AS v(id, before) \
    WHERE s.session_id = v.id AND s.seq < v.before AND s.seq % $3 <> 0";

const INSERT_CHARACTERS: &str = "INSERT INTO session_characters (character_id, session_id) \
    SELECT c, $2 FROM UNNEST($1::uuid[]) AS c ON CONFLICT DO NOTHING";

const UPDATE_STATUS: &str = "UPDATE sessions SET status = $2, updated_at = $3 \
    WHERE id = $1 AND owner_epoch = $4";
