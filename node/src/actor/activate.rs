//! Activation: take the ownership lock, then either create the session (a create is
//! queued) or take it over (bump the fencing epoch, rebuild the state from the newest
//! snapshot plus the events after it, load the recent command ids). Recovery
//! ([`recover`]) is shared with the reload after a failed commit.

use super::engine::{render, render_stored, Recovered};
use super::{Envelope, Parts, Session};
use crate::error::NodeError;
use crate::store::{Created, EventRow, Loaded, NewSession, StoredEvent};
use crate::NodeCtx;
use gs_rules::{Event, SessionState};
use gs_shared::protocol;
use gs_shared::rpc::{RawEvent, RequestBody};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What activation found, under the lock.
enum SetUp {
    /// The session was created by this activation (version 1, epoch 1).
    Created { recovered: Recovered, row: EventRow },
    /// An existing session, taken over with a new epoch.
    TakenOver { epoch: u64, recovered: Recovered },
}

/// A create's arguments (from the first create queued).
struct Create {
    campaign_id: Uuid,
    name: String,
    settings: Value,
    creator: Uuid,
}

/// Activates a session: lock, set-up, first publications. On any error the lock is
/// released before returning.
pub(super) async fn activate(
    ctx: &Arc<NodeCtx>,
    id: Uuid,
    gen: u64,
    held: &[Envelope],
) -> Result<Session, NodeError> {
    let deadline = Instant::now() + Duration::from_millis(ctx.cfg.node.activation_timeout_ms);
    let cluster = ctx.cluster.clone();
    let t0 = Instant::now();
    let lease = ctx
        .ownership
        .acquire(id, deadline, |holder| cluster.is_known_dead(holder))
        .await
        .map_err(|e| NodeError::Other(format!("ownership lock: {e}")))?;
    let locked = t0.elapsed();
    let set_up = match set_up(ctx, id, held).await {
        Ok(s) => {
            tracing::debug!(session = %id, lock_ms = locked.as_millis() as u64,
                set_up_ms = (t0.elapsed() - locked).as_millis() as u64, "activation steps");
            s
        }
        Err(e) => {
            lease.release().await;
            return Err(e);
        }
    };
    let parts = |epoch, recovered| Parts {
        ctx: ctx.clone(),
        id,
        gen,
        epoch,
        lease,
        recovered,
    };
    match set_up {
        SetUp::Created { recovered, row } => {
            let session = Session::new(parts(1, recovered));
            session.cache_meta();
            ctx.hub.committed(id, vec![row]);
            Ok(session)
        }
        SetUp::TakenOver { epoch, recovered } => {
            let mut session = Session::new(parts(epoch, recovered));
            // Routers fill gaps when they see a newer version; republishing the newest
            // event makes them notice one whose broadcast died with the old owner.
            if let Some(last) = session.core.recent().back().cloned() {
                session.publish(&[last], &[]).await;
            }
            // A new owner rewrites every ICD key (the combat key too, deleted when
            // there is no combat): what a previous owner left may be stale.
            session.cache_meta();
            session.rewrite_combat_cache();
            // Outbox rows the previous owner committed but did not get confirmed.
            ctx.hub.dirty(id);
            // Requests to other services the previous owner may not have seen through.
            crate::services::resume(ctx, id, session.core.state());
            Ok(session)
        }
    }
}

/// Creates the session if a create is queued (and it does not exist yet), else takes
/// the existing one over.
async fn set_up(ctx: &NodeCtx, id: Uuid, held: &[Envelope]) -> Result<SetUp, NodeError> {
    // A create is answered by inserting; anything else takes over an existing session.
    if let Some(create) = held.iter().find_map(create_of) {
        if let Some((recovered, row)) = create_session(ctx, id, create).await? {
            return Ok(SetUp::Created { recovered, row });
        }
        // A retried create: take over below.
    }
    let window = ctx.cfg.node.dedupe_window as u64;
    let (epoch, loaded, commands) = ctx
        .store
        .take_over(id, &ctx.id, ctx.cfg.node.activation_timeout_ms / 2, window)
        .await?;
    let recovered = recovered(ctx, id, loaded, commands)?;
    Ok(SetUp::TakenOver { epoch, recovered })
}

fn create_of(env: &Envelope) -> Option<Create> {
    match &env.req.body {
        RequestBody::Create {
            campaign_id,
            name,
            settings,
        } => Some(Create {
            campaign_id: *campaign_id,
            name: name.clone(),
            settings: settings.clone(),
            creator: env.req.caller.user_id,
        }),
        _ => None,
    }
}

/// Inserts a new session with its first event; `None` when it exists already.
async fn create_session(
    ctx: &NodeCtx,
    id: Uuid,
    c: Create,
) -> Result<Option<(Recovered, EventRow)>, NodeError> {
    let Create {
        campaign_id,
        name,
        mut settings,
        creator,
    } = c;
    let now = chrono::Utc::now();
    // Every session gets a secret dice seed unless its creator chose one: a seed
    // derived from the (public) session id would let anyone predict the rolls.
    // Routers let only admins choose one; a `null` (or anything not a number) is
    // no choice.
    if let Some(m) = settings.as_object_mut() {
        if !m.get("dice_seed").is_some_and(Value::is_u64) {
            m.insert("dice_seed".into(), json!(Uuid::new_v4().as_u64_pair().0));
        }
    }
    let ev = SessionState::creation(
        id,
        campaign_id,
        name.clone(),
        settings.clone(),
        creator,
        protocol::timestamp_now(),
    );
    let (kind, data_json) = (ev.kind().to_string(), ev.data_json());
    let new = NewSession {
        id,
        campaign_id,
        name,
        settings,
        created_by: creator,
        created_at: now.naive_utc(),
    };
    // Version 1 is an event like any other: the hub publishes it too.
    let mut state = SessionState::empty(id);
    state.apply(&ev);
    let row = EventRow {
        id: Uuid::now_v7(),
        seq: 1,
        kind: kind.clone(),
        data_json: data_json.clone(),
        command_id: None,
        user_id: Some(creator),
        created_at: now.naive_utc(),
        correlation: None,
        combat_id: None,
    };
    match ctx.store.create_session(&new, &ctx.id, &row).await? {
        Created::New => {
            let rendered = RawEvent {
                version: 1,
                json: render(&kind, 1, &data_json).into(),
            };
            let recovered = Recovered {
                state,
                recent: vec![rendered],
                commands: Vec::new(),
                complete: true,
            };
            Ok(Some((recovered, row)))
        }
        Created::Exists { .. } => Ok(None),
    }
}

/// A session rebuilt from the log: state, newest events, newest command ids.
pub(super) async fn recover(ctx: &NodeCtx, id: Uuid) -> Result<Recovered, NodeError> {
    let window = ctx.cfg.node.dedupe_window as u64;
    let (loaded, commands) = ctx.store.load_with_commands(id, None, window).await?;
    recovered(ctx, id, loaded, commands)
}

/// A session rebuilt from what was read: the state, the newest events rendered, and
/// the command ids (all of the session's, when fewer than the window).
fn recovered(
    ctx: &NodeCtx,
    id: Uuid,
    loaded: Loaded,
    commands: Vec<(Uuid, u64)>,
) -> Result<Recovered, NodeError> {
    let window = ctx.cfg.node.dedupe_window as u64;
    let (state, events) = rebuild(id, loaded)?;
    let complete = (commands.len() as u64) < window;
    let recent = events
        .iter()
        .rev()
        .take(ctx.cfg.node.recent_events)
        .rev()
        .map(render_stored)
        .collect();
    Ok(Recovered {
        state,
        recent,
        commands,
        complete,
    })
}

/// Rebuilds a session from its newest snapshot and the events after it.
pub async fn load_state(
    ctx: &NodeCtx,
    id: Uuid,
) -> Result<(SessionState, Vec<StoredEvent>), NodeError> {
    load_state_at(ctx, id, None).await
}

/// Rebuilds a session as it was at version `at` (the newest when `None`).
pub async fn load_state_at(
    ctx: &NodeCtx,
    id: Uuid,
    at: Option<u64>,
) -> Result<(SessionState, Vec<StoredEvent>), NodeError> {
    rebuild(id, ctx.store.load(id, at).await?)
}

/// The state the snapshot and the events after it make.
fn rebuild(id: Uuid, loaded: Loaded) -> Result<(SessionState, Vec<StoredEvent>), NodeError> {
    let mut state = match &loaded.snapshot {
        Some((seq, snap)) => {
            let s: SessionState = serde_json::from_value(snap.clone())
                .map_err(|e| NodeError::Corrupt(format!("snapshot {seq} of {id}: {e}")))?;
            if s.version != *seq {
                return Err(NodeError::Corrupt(format!(
                    "snapshot of {id} at seq {seq} holds version {}",
                    s.version
                )));
            }
            s
        }
        None => SessionState::empty(id),
    };
    for e in &loaded.events {
        if e.seq != state.version + 1 {
            return Err(NodeError::Corrupt(format!(
                "event log of {id} jumps from {} to {}",
                state.version, e.seq
            )));
        }
        let ev = Event::from_parts(&e.kind, e.data.clone())
            .map_err(|err| NodeError::Corrupt(format!("event {} of {id}: {err}", e.seq)))?;
        state.apply(&ev);
    }
    if state.version == 0 {
        return Err(NodeError::SessionNotFound(id));
    }
    Ok((state, loaded.events))
}
