//! One actor per owned session: the only code that changes a session's state.
//!
//! ```text
//!  inbox (bounded) ──▶ batch ──▶ decide (rules) ──▶ apply ──▶ commit (group) ──▶ publish ──▶ ack
//! ```
//!
//! * **Activation**: take the ownership lock, bump the fencing epoch in PostgreSQL,
//!   rebuild the state from the newest snapshot plus the events after it, load the
//!   recent command ids, and republish the newest event (so routers notice any event
//!   whose broadcast died with the previous owner).
//! * **Batches**: the actor takes everything queued (up to `node.actor_batch_max`),
//!   decides each command against the state, applies the events to its in-memory
//!   state, and hands all rows to the group committer in one item. Only after the
//!   commit does it publish the events (NATS, in version order) and answer the
//!   commands. Reads (sync, state, events) are answered between batches, so they
//!   never see an uncommitted change.
//! * **Failure**: if a commit is refused as fenced, another node owns the session:
//!   the actor answers `not_owner` and stops. If the outcome is unknown (database
//!   error), the in-memory state may be ahead of the log, so the actor rebuilds it
//!   from the log; the commands' retries then find their ids there (exactly once).
//! * **Stop**: on lease loss, handoff (ring change), passivation or shutdown, the
//!   actor writes a snapshot where useful, releases the lock and leaves the registry;
//!   queued requests get `not_owner` with the new owner, and routers retry there.

use crate::error::NodeError;
use crate::ownership::Lease;
use crate::store::{
    CommitError, CommitItem, Created, EventRow, NewSession, SnapshotRow, StoredEvent,
};
use crate::NodeCtx;
use gs_rules::command::JoinRequest;
use gs_rules::{Command, Ctx, Event, SessionState};
use gs_shared::auth::Role;
use gs_shared::protocol::{self, codes, WireError};
use gs_shared::rpc::{
    NodeReply, NodeRequest, RawEvent, ReplyBody, RequestBody, Resume, SessionView,
};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

/// Where a request's answer goes.
pub enum Reply {
    /// A NATS reply subject (requests from routers).
    Nats(async_nats::Subject),
    /// An in-process caller (the hub relay).
    Local(oneshot::Sender<NodeReply>),
}

impl Reply {
    pub async fn send(self, ctx: &NodeCtx, reply: NodeReply) {
        match self {
            Reply::Nats(subject) => {
                let payload = serde_json::to_vec(&reply).expect("replies serialise");
                if let Err(e) = ctx.nats.publish(subject, payload.into()).await {
                    tracing::debug!(error = %e, "reply not published");
                }
            }
            Reply::Local(tx) => {
                let _ = tx.send(reply);
            }
        }
    }
}

/// A request waiting in an actor's inbox.
pub struct Envelope {
    pub req: NodeRequest,
    pub reply: Reply,
}

/// Out-of-band instructions (not queued behind requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Run,
    /// The ring moved the session to another node: hand it off.
    Handoff,
    /// The node is shutting down.
    Shutdown,
}

/// Why an actor stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Fenced,
    LeaseLost,
    Handoff,
    Shutdown,
    Idle,
    Failed,
}

/// Exactly-once memory: command id → the version its last event produced.
struct Dedupe {
    map: HashMap<Uuid, u64>,
    order: VecDeque<Uuid>,
    cap: usize,
    /// Whether every command the session ever committed is in `map` (so a miss means
    /// new).
    complete: bool,
    /// Until when misses are checked against the log although the window is
    /// incomplete (see [`Dedupe::misses_to_verify`]).
    verify_until: Option<Instant>,
}

/// How long misses are checked against the log after a commit failed: the router
/// retries the failed commands under the same ids well within this.
const VERIFY_AFTER_FAILURE: Duration = Duration::from_secs(60);

impl Dedupe {
    /// The commands of a batch to look up in the log before deciding it.
    ///
    /// When the window covers the whole log, a miss is new. When it does not, a miss
    /// is almost always new too, and looking every batch up would cost a random
    /// index probe per command on a log that outgrew memory (throughput fell by
    /// a third over a 10-minute run). The `UNIQUE(session_id, command_id)` constraint
    /// keeps exactly-once without the look-up: a command older than the window that
    /// is sent again fails its commit instead of being applied twice; the failure
    /// ("outcome unknown") opens a verification period in which misses are looked up,
    /// so the router's retry under the same id finds the original version. Requests
    /// the router has given up on are always looked up: the answer "not applied" must
    /// never be given for a command that was.
    fn misses_to_verify(&self, batch: &[Envelope]) -> Vec<Uuid> {
        if self.complete {
            return Vec::new();
        }
        let verifying = self.verify_until.is_some_and(|t| Instant::now() < t);
        batch
            .iter()
            .filter(|e| verifying || e.req.expired())
            .filter_map(|e| command_id(&e.req.body))
            .filter(|c| !self.map.contains_key(c))
            .collect()
    }

    fn insert(&mut self, id: Uuid, version: u64) {
        if self.map.insert(id, version).is_none() {
            self.order.push_back(id);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                    self.complete = false;
                }
            }
        }
    }
}

/// Replies waiting for the batch's commit.
enum Waiting {
    Ack {
        reply: Reply,
        version: u64,
        duplicate: bool,
        /// The router learns of it from the event's `Gs-Ack` header: no reply.
        by_event: bool,
    },
    Joined {
        reply: Reply,
        user: Uuid,
    },
    /// Refused commands are answered in order with the rest of the batch.
    Refused {
        reply: Reply,
        error: WireError,
    },
    /// Anything else answered in order with the batch.
    Done {
        reply: Reply,
        answer: NodeReply,
    },
}

/// Who sent a command, and how it wants its answer.
struct Origin {
    reply: Reply,
    user: Uuid,
    role: Role,
    command_id: Uuid,
    /// A join: answered with the player's view.
    join: bool,
    /// A client command whose router takes the ack from the event (`Gs-Ack`).
    ack_by_event: bool,
}

impl Origin {
    fn new(reply: Reply, user: Uuid, role: Role, command_id: Uuid) -> Origin {
        Origin {
            reply,
            user,
            role,
            command_id,
            join: false,
            ack_by_event: false,
        }
    }
}

impl Waiting {
    /// The answer to an applied command: the join's answer (the player's view) or an
    /// ack with the version it produced (or produced the first time, for a duplicate:
    /// no event carries that ack, so it is always a reply).
    fn applied(o: Origin, version: u64, duplicate: bool) -> Waiting {
        if o.join {
            Waiting::Joined {
                reply: o.reply,
                user: o.user,
            }
        } else {
            Waiting::Ack {
                reply: o.reply,
                version,
                duplicate,
                by_event: o.ack_by_event && !duplicate,
            }
        }
    }
}

#[derive(Default)]
struct Batch {
    rows: Vec<EventRow>,
    rendered: Vec<RawEvent>,
    /// Events that carry a command's ack (`Gs-Ack`): index in `rendered`, command id.
    acks_on: Vec<(usize, Uuid)>,
    waiting: Vec<Waiting>,
    status: Option<(String, chrono::NaiveDateTime)>,
    final_event: bool,
    /// Some reply shows the session's state without a commit behind it (a repeated
    /// join, a retried create): confirm the lock before sending it.
    needs_barrier: bool,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.waiting.is_empty()
    }
}

/// Whether a test hook's marker appears in these events (never when the hook is off:
/// an empty marker).
fn mentions(events: &[RawEvent], marker: &str) -> bool {
    !marker.is_empty() && events.iter().any(|e| e.json.as_str().contains(marker))
}

pub struct Actor {
    ctx: Arc<NodeCtx>,
    id: Uuid,
    gen: u64,
    state: SessionState,
    epoch: u64,
    lease: Lease,
    recent: VecDeque<RawEvent>,
    dedupe: Dedupe,
    last_snapshot: u64,
    /// Attached WebSocket connections: id → (user, router).
    connections: HashMap<Uuid, (Uuid, String)>,
    last_activity: Instant,
    /// The combat summary last written to Redis.
    last_combat: Option<std::collections::BTreeMap<String, String>>,
    /// Hub events the `fault_hub_fail_once` test hook has refused.
    hook_refused: std::collections::HashSet<Uuid>,
    /// `gs.session.{id}.events`.
    events_subject: async_nats::Subject,
    /// When `updated_at` was last written to the Redis meta key.
    meta_touched: Instant,
    /// The session's own rate limits (saves and joins per minute).
    quotas: Quotas,
}

/// A session's per-minute quotas of the ICD (`POST /state` saves, joins), kept by its
/// owner: it sees every command of the session whatever router sent it, and only
/// after the rules allowed it. A new owner starts with fresh windows.
#[derive(Debug, Default)]
struct Quotas {
    saves: Window,
    joins: Window,
}

/// A fixed one-minute window.
#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    count: u32,
}

impl Window {
    /// Counts one use; refuses (counting nothing) past `limit` (0: no limit).
    fn hit(&mut self, limit: u32, now: Instant) -> Result<(), Duration> {
        if limit == 0 {
            return Ok(());
        }
        let start = match self.start {
            Some(s) if now.duration_since(s) < QUOTA_WINDOW => s,
            _ => {
                self.count = 0;
                *self.start.insert(now)
            }
        };
        if self.count >= limit {
            return Err(QUOTA_WINDOW.saturating_sub(now.duration_since(start)));
        }
        self.count += 1;
        Ok(())
    }
}

const QUOTA_WINDOW: Duration = Duration::from_secs(60);

impl Quotas {
    /// Counts an allowed command against its quota, if it has one.
    fn hit(
        &mut self,
        cmd: &Command,
        limits: &gs_shared::config::LimitsConfig,
        now: Instant,
    ) -> Result<(), WireError> {
        let (window, limit, what) = match cmd {
            Command::SaveState { .. } => (
                &mut self.saves,
                limits.state_updates_per_min_per_session,
                "state saves",
            ),
            Command::Join(_) => (&mut self.joins, limits.joins_per_min_per_session, "joins"),
            _ => return Ok(()),
        };
        window.hit(limit, now).map_err(|wait| {
            WireError::new(
                codes::RATE_LIMITED,
                format!("too many {what} in this session; retry shortly"),
            )
            .with_details(json!({"retry_after_secs": wait.as_secs().max(1),
                "limit": limit, "window_secs": QUOTA_WINDOW.as_secs()}))
        })
    }
}

/// How often at most a busy session's `updated_at` is written to Redis.
const META_TOUCH_EVERY: Duration = Duration::from_secs(1);

/// Entry point of an actor task: activate, serve, stop. Always leaves the registry.
pub async fn run(
    ctx: Arc<NodeCtx>,
    id: Uuid,
    gen: u64,
    mut inbox: mpsc::Receiver<Envelope>,
    mut control: watch::Receiver<Control>,
) {
    let started = Instant::now();
    // Requests that arrived before activation are handled first, in order.
    let mut held = Vec::new();
    while let Ok(env) = inbox.try_recv() {
        held.push(env);
    }
    match activate(&ctx, id, gen, &held).await {
        Ok(mut actor) => {
            metrics::histogram!("gs_node_activation_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::info!(session = %id, epoch = actor.epoch, version = actor.state.version,
                ms = started.elapsed().as_millis() as u64, "session activated");
            let stop = actor.serve(held, &mut inbox, &mut control).await;
            actor.finish(stop, &mut inbox).await;
        }
        Err(e) => {
            tracing::info!(session = %id, error = %e, "activation failed");
            if let NodeError::Corrupt(reason) = &e {
                ctx.registry.quarantine(id, reason.clone());
            }
            ctx.registry.remove(&ctx, &id, gen);
            inbox.close();
            let err = e.to_wire();
            while let Ok(env) = inbox.try_recv() {
                held.push(env);
            }
            for env in held {
                env.reply.send(&ctx, NodeReply::err(err.clone())).await;
            }
        }
    }
}

async fn activate(
    ctx: &Arc<NodeCtx>,
    id: Uuid,
    gen: u64,
    held: &[Envelope],
) -> Result<Actor, NodeError> {
    let deadline = Instant::now() + Duration::from_millis(ctx.cfg.node.activation_timeout_ms);
    let cluster = ctx.cluster.clone();
    let lease = ctx
        .ownership
        .acquire(id, deadline, |holder| cluster.is_known_dead(holder))
        .await
        .map_err(|e| NodeError::Other(format!("ownership lock: {e}")))?;

    // A create is answered by inserting; anything else takes over an existing session.
    let create = held.iter().find_map(|env| match &env.req.body {
        RequestBody::Create {
            campaign_id,
            name,
            settings,
        } => Some((
            *campaign_id,
            name.clone(),
            settings.clone(),
            env.req.caller.user_id,
        )),
        _ => None,
    });
    if let Some((campaign_id, name, mut settings, creator)) = create {
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
        match ctx.store.create_session(&new, &ctx.id, &row).await {
            Ok(Created::New) => {
                let rendered = RawEvent {
                    version: 1,
                    json: render(&kind, 1, &data_json).into(),
                };
                let actor = Actor::new(
                    ctx.clone(),
                    id,
                    gen,
                    state,
                    1,
                    lease,
                    vec![rendered],
                    Vec::new(),
                    true,
                );
                actor.cache_meta();
                ctx.hub.committed(id, vec![row]);
                return Ok(actor);
            }
            Ok(Created::Exists { .. }) => {} // a retried create: take over below
            Err(e) => {
                lease.release().await;
                return Err(e);
            }
        }
    }

    let epoch = match ctx
        .store
        .take_ownership(id, &ctx.id, ctx.cfg.node.activation_timeout_ms / 2)
        .await
    {
        Ok(e) => e,
        Err(e) => {
            lease.release().await;
            return Err(e);
        }
    };
    match load_state(ctx, id).await {
        Ok((state, events)) => {
            let window = ctx.cfg.node.dedupe_window as u64;
            let commands = match ctx.store.recent_commands(id, window).await {
                Ok(c) => c,
                Err(e) => {
                    lease.release().await;
                    return Err(e);
                }
            };
            let complete = (commands.len() as u64) < window;
            let rendered: Vec<RawEvent> = events
                .iter()
                .rev()
                .take(ctx.cfg.node.recent_events)
                .rev()
                .map(render_stored)
                .collect();
            let mut actor = Actor::new(
                ctx.clone(),
                id,
                gen,
                state,
                epoch,
                lease,
                rendered,
                commands,
                complete,
            );
            // Routers fill gaps when they see a newer version; republishing the newest
            // event makes them notice one whose broadcast died with the old owner.
            if let Some(last) = actor.recent.back().cloned() {
                actor.publish(&last, None).await;
            }
            // A new owner rewrites every ICD key (the combat key too, deleted when
            // there is no combat): what a previous owner left may be stale.
            actor.cache_meta();
            actor.rewrite_combat_cache();
            // Outbox rows the previous owner committed but did not get confirmed.
            ctx.hub.dirty(id);
            Ok(actor)
        }
        Err(e) => {
            lease.release().await;
            Err(e)
        }
    }
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
    let loaded = ctx.store.load(id, at).await?;
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

/// The rules' bounds on the state document, from the configuration.
fn doc_limits(c: &gs_shared::config::DocumentConfig) -> gs_rules::limits::DocLimits {
    gs_rules::limits::DocLimits {
        max_path_depth: c.max_path_depth,
        max_path_bytes: c.max_path_bytes,
        max_depth: c.max_depth,
        max_value_bytes: c.max_value_bytes,
        max_document_bytes: c.max_document_bytes,
        max_keys_per_object: c.max_keys_per_object,
    }
}

/// Bytes of events in one reply (NATS caps a message at 1 MiB by default; the
/// largest single event, a `state_restored` with a whole document, stays well under).
const MAX_EVENTS_REPLY_BYTES: usize = 512 * 1024;

/// The first events of `events` that fit in [`MAX_EVENTS_REPLY_BYTES`] (at least one).
fn within_budget(events: impl Iterator<Item = RawEvent>) -> Vec<RawEvent> {
    let mut total = 0;
    let mut out = Vec::new();
    for e in events {
        total += e.json.as_str().len();
        if total > MAX_EVENTS_REPLY_BYTES && !out.is_empty() {
            break;
        }
        out.push(e);
    }
    out
}

fn render_stored(e: &StoredEvent) -> RawEvent {
    RawEvent {
        version: e.seq,
        json: render(&e.kind, e.seq, &e.data.to_string()).into(),
    }
}

/// An event as clients receive it: the stored data, minus what clients must not see
/// (the dice seed in `session_created`'s settings: it would predict every roll).
/// A live event and the same event read back from the log are the same JSON (their
/// keys may come in another order).
fn render(kind: &str, version: u64, data_json: &str) -> String {
    if kind == "session_created" && data_json.contains("dice_seed") {
        if let Ok(mut data) = serde_json::from_str::<Value>(data_json) {
            if let Some(settings) = data["settings"].as_object_mut() {
                settings.remove("dice_seed");
            }
            return protocol::render_event(kind, version, &data);
        }
    }
    protocol::render_event_raw(kind, version, data_json)
}

impl Actor {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: Arc<NodeCtx>,
        id: Uuid,
        gen: u64,
        state: SessionState,
        epoch: u64,
        lease: Lease,
        recent: Vec<RawEvent>,
        commands: Vec<(Uuid, u64)>,
        complete: bool,
    ) -> Actor {
        let cap = ctx.cfg.node.dedupe_window.max(1);
        let mut dedupe = Dedupe {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
            complete,
            verify_until: None,
        };
        // Oldest first, so the newest stay when the window is full.
        for (c, v) in commands.into_iter().rev() {
            dedupe.insert(c, v);
        }
        dedupe.complete = complete;
        let snapshot_every = ctx.cfg.node.snapshot_every.max(1);
        let last_snapshot = state.version / snapshot_every * snapshot_every;
        let events_subject = ctx.subjects.session_events(&id).into();
        let mut state = state;
        state.limits = doc_limits(&ctx.cfg.document);
        Actor {
            ctx,
            id,
            gen,
            epoch,
            lease,
            recent: recent.into_iter().collect(),
            dedupe,
            last_snapshot,
            connections: HashMap::new(),
            last_activity: Instant::now(),
            last_combat: None,
            hook_refused: Default::default(),
            events_subject,
            meta_touched: Instant::now(),
            quotas: Quotas::default(),
            state,
        }
    }

    async fn serve(
        &mut self,
        held: Vec<Envelope>,
        inbox: &mut mpsc::Receiver<Envelope>,
        control: &mut watch::Receiver<Control>,
    ) -> Stop {
        let mut lost = self.lease.lost();
        let refresh = Duration::from_millis(self.ctx.cfg.node.redis_refresh_ms.max(1000));
        let mut tick = tokio::time::interval(refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let idle = Duration::from_millis(self.ctx.cfg.node.idle_passivate_ms);

        if !held.is_empty() {
            if let Some(stop) = self.handle(held).await {
                return stop;
            }
        }
        loop {
            tokio::select! {
                biased;
                _ = control.changed() => {
                    match *control.borrow_and_update() {
                        Control::Run => {}
                        Control::Handoff => return Stop::Handoff,
                        Control::Shutdown => return Stop::Shutdown,
                    }
                }
                _ = lost.changed() => return Stop::LeaseLost,
                env = inbox.recv() => {
                    let Some(env) = env else { return Stop::Shutdown };
                    let mut batch = vec![env];
                    while batch.len() < self.ctx.cfg.node.actor_batch_max {
                        match inbox.try_recv() {
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                    self.last_activity = Instant::now();
                    if let Some(stop) = self.handle(batch).await {
                        return stop;
                    }
                }
                _ = tick.tick() => {
                    self.forget_dead_routers();
                    self.refresh_cache();
                    if self.connections.is_empty() && self.last_activity.elapsed() >= idle {
                        return Stop::Idle;
                    }
                }
            }
        }
    }

    /// Handles one batch; returns `Some` when the actor must stop.
    async fn handle(&mut self, batch: Vec<Envelope>) -> Option<Stop> {
        if !self.lease.is_valid() {
            for env in batch {
                env.reply.send(&self.ctx, self.not_owner()).await;
            }
            return Some(Stop::LeaseLost);
        }
        // Commands this actor has not seen, when its memory does not cover the whole
        // log and a miss may be a repeat: ask the log once for the batch.
        {
            let unknown = self.dedupe.misses_to_verify(&batch);
            if !unknown.is_empty() {
                match self.ctx.store.find_commands(self.id, &unknown).await {
                    Ok(found) => {
                        for (c, v) in found {
                            self.dedupe.insert(c, v);
                        }
                    }
                    Err(e) => {
                        let err = e.to_wire();
                        for env in batch {
                            env.reply.send(&self.ctx, NodeReply::err(err.clone())).await;
                        }
                        return None;
                    }
                }
            }
        }

        let mut b = Batch::default();
        let mut read_confirmed = false;
        let mut rest = batch.into_iter();
        while let Some(env) = rest.next() {
            let applied =
                command_id(&env.req.body).is_some_and(|c| self.dedupe.map.contains_key(&c));
            if env.req.expired() && command_id(&env.req.body).is_some() && !applied {
                // The router has given up on it: applying it now would contradict the
                // failure it reported. (One already applied is answered below with its
                // original version, however late.)
                metrics::counter!("gs_node_expired_total").increment(1);
                b.waiting.push(Waiting::Refused {
                    reply: env.reply,
                    error: WireError::new(
                        codes::DEADLINE_EXCEEDED,
                        "the request's deadline has passed",
                    ),
                });
                continue;
            }
            let Envelope { req, reply } = env;
            let NodeRequest {
                session_id,
                caller,
                body,
                deadline_ms,
            } = req;
            let (user, role) = (caller.user_id, caller.role);
            match body {
                RequestBody::Command {
                    command_id,
                    kind,
                    data,
                    ack_by_event,
                } => {
                    let origin = Origin {
                        ack_by_event,
                        ..Origin::new(reply, user, role, command_id)
                    };
                    let cmd = Command::from_client_json(&kind, data.get());
                    if let Ok(Command::Rollback { to_version }) = cmd {
                        // A rollback needs the past state, replayed from the log.
                        let Some(origin) = self.answer_duplicate(&mut b, origin) else {
                            continue;
                        };
                        if let Some(stop) = self.flush(&mut b).await {
                            origin.reply.send(&self.ctx, self.stopped_reply(stop)).await;
                            self.refuse_rest(rest, stop).await;
                            return Some(stop);
                        }
                        let events = self
                            .decide_rollback(user, role, command_id, to_version)
                            .await;
                        self.stage_events(&mut b, origin, events);
                    } else {
                        self.stage(&mut b, origin, cmd);
                    }
                }
                RequestBody::SaveState {
                    command_id,
                    state,
                    metadata,
                } => {
                    let cmd = Ok(Command::SaveState { state, metadata });
                    self.stage(&mut b, Origin::new(reply, user, role, command_id), cmd);
                }
                RequestBody::Join { command_id, data } => {
                    let cmd = serde_json::from_value::<JoinRequest>(data)
                        .map(Command::Join)
                        .map_err(|e| {
                            gs_rules::RuleError::new(
                                codes::INVALID_PAYLOAD,
                                format!("invalid join body: {e}"),
                            )
                        });
                    let origin = Origin {
                        join: true,
                        ..Origin::new(reply, user, role, command_id)
                    };
                    self.stage(&mut b, origin, cmd);
                }
                RequestBody::Create { .. } => {
                    // The session exists and is ours: a retried create.
                    let answer = if self.state.created_by == user {
                        NodeReply::Ok {
                            body: ReplyBody::Created {
                                version: self.state.version,
                                view: self.view(),
                            },
                        }
                    } else {
                        NodeReply::err(WireError::new(codes::CONFLICT, "that session id is taken"))
                    };
                    b.needs_barrier = true;
                    b.waiting.push(Waiting::Done { reply, answer });
                }
                RequestBody::HubEvent {
                    event_id,
                    kind,
                    payload,
                } => {
                    let hook = &self.ctx.cfg.node.fault_hub_fail_once;
                    if !hook.is_empty()
                        && payload.to_string().contains(hook.as_str())
                        && self.hook_refused.insert(event_id)
                    {
                        // Test hook: fail it once (an error the forwarder does not retry),
                        // so the relay has to requeue it.
                        let err = WireError::new(codes::INTERNAL, "fault injection");
                        b.waiting.push(Waiting::Refused { reply, error: err });
                        continue;
                    }
                    // Applied by the system, as an admin; the event id is the command
                    // id, so a redelivered hub event is answered from memory.
                    let cmd = crate::hub::command_for(&kind, &payload);
                    let origin = Origin::new(reply, Uuid::nil(), Role::Admin, event_id);
                    self.stage(&mut b, origin, cmd);
                }
                RequestBody::Detach { conn_id } => {
                    if let Some((user, _)) = self.connections.remove(&conn_id) {
                        self.ctx.cache.detach(self.id, self.epoch, conn_id, user);
                    }
                    b.waiting.push(Waiting::Done {
                        reply,
                        answer: NodeReply::Ok {
                            body: ReplyBody::Done,
                        },
                    });
                }
                RequestBody::Touch { conn_id } => {
                    // Only a connection the owner knows (a late touch after its detach
                    // must not bring its entry back).
                    if let Some((user, _)) = self.connections.get(&conn_id) {
                        self.ctx.cache.attach(self.id, self.epoch, conn_id, *user);
                    }
                    b.waiting.push(Waiting::Done {
                        reply,
                        answer: NodeReply::Ok {
                            body: ReplyBody::Done,
                        },
                    });
                }
                body => {
                    // Reads see committed state only.
                    if let Some(stop) = self.flush(&mut b).await {
                        reply.send(&self.ctx, self.stopped_reply(stop)).await;
                        self.refuse_rest(rest, stop).await;
                        return Some(stop);
                    }
                    // And only the owner's: confirm the lock once per batch.
                    if !read_confirmed {
                        match self.lease.confirm().await {
                            Ok(true) => read_confirmed = true,
                            Ok(false) => {
                                reply.send(&self.ctx, self.not_owner()).await;
                                self.refuse_rest(rest, Stop::LeaseLost).await;
                                return Some(Stop::LeaseLost);
                            }
                            Err(e) => {
                                let err = WireError::new(
                                    codes::SERVICE_UNAVAILABLE,
                                    format!("cannot confirm ownership: {e}"),
                                );
                                reply.send(&self.ctx, NodeReply::err(err)).await;
                                continue;
                            }
                        }
                    }
                    let req = NodeRequest {
                        session_id,
                        caller,
                        body,
                        deadline_ms,
                    };
                    let answer = self.read(&req).await;
                    reply.send(&self.ctx, answer).await;
                }
            }
        }
        self.flush(&mut b).await
    }

    /// Decides one command and stages its events (applied in memory, not yet durable).
    fn stage(&mut self, b: &mut Batch, o: Origin, cmd: Result<Command, gs_rules::RuleError>) {
        let Some(o) = self.answer_duplicate(b, o) else {
            return;
        };
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => {
                b.waiting.push(Waiting::Refused {
                    reply: o.reply,
                    error: e.into_wire(),
                });
                return;
            }
        };
        let ctx = Ctx {
            user_id: o.user,
            admin: o.role == Role::Admin,
            command_id: o.command_id,
            timestamp: protocol::timestamp_now(),
        };
        let mut events = self.state.decide(&ctx, &cmd).map_err(IntoWire::into_wire);
        // The session's quotas count only what its members were allowed to do and
        // that changes something: an outsider's refused saves or joins use none.
        if let Ok(ev) = &events {
            if !ev.is_empty() {
                if let Err(e) = self.quotas.hit(&cmd, &self.ctx.cfg.limits, Instant::now()) {
                    events = Err(e);
                }
            }
        }
        self.stage_events(b, o, events);
    }

    /// Answers the requests left in a batch when the actor stops in its middle.
    async fn refuse_rest(&self, rest: impl Iterator<Item = Envelope>, stop: Stop) {
        let reply = self.stopped_reply(stop);
        for env in rest {
            env.reply.send(&self.ctx, reply.clone()).await;
        }
    }

    /// A retry of a command already committed (or staged in this batch) is answered
    /// with its original version; otherwise the origin is handed back.
    fn answer_duplicate(&self, b: &mut Batch, o: Origin) -> Option<Origin> {
        let Some(&version) = self.dedupe.map.get(&o.command_id) else {
            return Some(o);
        };
        metrics::counter!("gs_node_commands_deduplicated_total").increment(1);
        b.needs_barrier |= o.join;
        b.waiting.push(Waiting::applied(o, version, true));
        None
    }

    /// Applies decided events in memory and stages their rows for the next commit.
    fn stage_events(&mut self, b: &mut Batch, o: Origin, events: Result<Vec<Event>, WireError>) {
        let events = match events {
            Ok(ev) => ev,
            Err(e) => {
                metrics::counter!("gs_node_commands_refused_total", "code" => e.code.clone())
                    .increment(1);
                b.waiting.push(Waiting::Refused {
                    reply: o.reply,
                    error: e,
                });
                return;
            }
        };
        let now = chrono::Utc::now().naive_utc();
        let n = events.len();
        for (i, ev) in events.iter().enumerate() {
            let last = i + 1 == n;
            self.stage_event(b, &o, ev, last, now);
        }
        if n > 0 {
            self.dedupe.insert(o.command_id, self.state.version);
            if o.ack_by_event && !o.join {
                b.acks_on.push((b.rendered.len() - 1, o.command_id));
            }
        } else {
            b.needs_barrier |= o.join;
        }
        let version = self.state.version;
        b.waiting.push(Waiting::applied(o, version, false));
    }

    /// Applies one event and stages its row and rendering.
    fn stage_event(
        &mut self,
        b: &mut Batch,
        o: &Origin,
        ev: &Event,
        last: bool,
        now: chrono::NaiveDateTime,
    ) {
        // The combat an event belongs to is the one running when it happened.
        let combat = crate::outbox::current_combat(&self.state);
        self.state.apply(ev);
        let version = self.state.version;
        let kind = ev.kind().to_string();
        let data_json = ev.data_json();
        let json = render(&kind, version, &data_json);
        let combat_id = crate::outbox::combat_of(&kind, &data_json, combat);
        if let Event::SessionStatusChanged { status, .. } = ev {
            b.status = Some((status.as_str().to_string(), now));
        }
        b.final_event |= ev.is_final();
        b.rows.push(EventRow {
            // Time-ordered ids: the primary key index grows at its end.
            id: Uuid::now_v7(),
            seq: version,
            kind,
            data_json,
            // The id goes on the command's last event: its version is the ack's.
            command_id: last.then_some(o.command_id),
            user_id: Some(o.user),
            created_at: now,
            correlation: Some(o.command_id),
            combat_id,
        });
        b.rendered.push(RawEvent {
            version,
            json: json.into(),
        });
    }

    /// A rollback: the cheap checks, then the state at `to_version` (replayed from the
    /// newest snapshot at or before it), then the rules' decision.
    async fn decide_rollback(
        &self,
        user: Uuid,
        role: Role,
        command_id: Uuid,
        to_version: u64,
    ) -> Result<Vec<Event>, WireError> {
        let ctx = Ctx {
            user_id: user,
            admin: role == Role::Admin,
            command_id,
            timestamp: protocol::timestamp_now(),
        };
        self.state
            .check_rollback(&ctx, to_version)
            .map_err(IntoWire::into_wire)?;
        let (past, _) = load_state_at(&self.ctx, self.id, Some(to_version))
            .await
            .map_err(|e| e.to_wire())?;
        self.state
            .decide_rollback(&ctx, to_version, &past)
            .map_err(IntoWire::into_wire)
    }

    /// Commits the staged events, then publishes them and answers the waiting
    /// commands. Returns `Some` when the actor must stop.
    async fn flush(&mut self, b: &mut Batch) -> Option<Stop> {
        if b.is_empty() {
            return None;
        }
        let batch = std::mem::take(b);
        if batch.rows.is_empty() {
            if batch.needs_barrier {
                match self.lease.confirm().await {
                    Ok(true) => {}
                    Ok(false) => {
                        let reply = self.not_owner();
                        for w in batch.waiting {
                            waiting_reply(w).send(&self.ctx, reply.clone()).await;
                        }
                        return Some(Stop::LeaseLost);
                    }
                    Err(e) => {
                        let err = WireError::new(
                            codes::SERVICE_UNAVAILABLE,
                            format!("cannot confirm ownership: {e}"),
                        );
                        for w in batch.waiting {
                            waiting_reply(w)
                                .send(&self.ctx, NodeReply::err(err.clone()))
                                .await;
                        }
                        return None;
                    }
                }
            }
            self.answer(batch.waiting).await;
            return None;
        }
        let every = self.ctx.cfg.node.snapshot_every.max(1);
        let snapshot =
            (self.state.version / every > self.last_snapshot / every).then(|| SnapshotRow {
                seq: self.state.version,
                state: serde_json::value::to_raw_value(&self.state).expect("state serialises"),
            });
        let snap_seq = snapshot.as_ref().map(|s| s.seq);
        let characters = crate::outbox::characters(&batch.rows);
        let item = CommitItem {
            session: self.id,
            epoch: self.epoch,
            events: batch.rows,
            // A new snapshot makes the ones before the previous one redundant.
            prune_before: snap_seq.map(|_| self.last_snapshot),
            snapshot,
            status: batch.status.clone(),
            characters,
        };
        // Last local check before the write: a lease that lapsed while this batch was
        // decided (a slow decision, a pause) means another node may own the session;
        // PostgreSQL's epoch check would refuse the write anyway, this just answers
        // sooner.
        if !self.lease.is_valid() {
            let reply = self.not_owner();
            for w in batch.waiting {
                waiting_reply(w).send(&self.ctx, reply.clone()).await;
            }
            return Some(Stop::LeaseLost);
        }
        // Test hook: a pause between the last local check and the write, the window
        // only PostgreSQL's epoch check closes.
        let delay = &self.ctx.cfg.node.fault_delay_commit;
        if mentions(&batch.rendered, delay) {
            tracing::warn!(session = %self.id, "fault injection: delaying a commit");
            let subject = format!("{}.fault.delaying", self.ctx.cfg.nats.subject_prefix);
            let _ = self
                .ctx
                .nats
                .publish(subject, self.id.to_string().into())
                .await;
            let _ = self.ctx.nats.flush().await;
            tokio::time::sleep(Duration::from_millis(
                self.ctx.cfg.node.fault_delay_commit_ms,
            ))
            .await;
        }
        let started = Instant::now();
        let (item, result) = self.ctx.committer.commit(item).await;
        metrics::histogram!("gs_node_commit_wait_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                let fault = &self.ctx.cfg.node.fault_crash_after_commit;
                if mentions(&batch.rendered, fault) {
                    tracing::error!(session = %self.id, "fault injection: aborting after commit, before ack");
                    std::process::abort();
                }
                if let Some(s) = snap_seq {
                    self.last_snapshot = s;
                }
                let mut acks = batch.acks_on.iter().peekable();
                for (i, ev) in batch.rendered.iter().enumerate() {
                    let ack = acks.next_if(|(at, _)| *at == i).map(|(_, id)| *id);
                    self.publish(ev, ack).await;
                    self.recent.push_back(ev.clone());
                }
                self.ctx.hub.committed(self.id, item.events);
                while self.recent.len() > self.ctx.cfg.node.recent_events {
                    self.recent.pop_front();
                }
                metrics::counter!("gs_node_events_committed_total")
                    .increment(batch.rendered.len() as u64);
                if batch.status.is_some() {
                    self.cache_meta();
                } else if self.meta_touched.elapsed() >= META_TOUCH_EVERY {
                    self.meta_touched = Instant::now();
                    self.ctx
                        .cache
                        .touch_meta(self.id, self.epoch, &self.state.updated_at);
                }
                self.cache_combat();
                self.answer(batch.waiting).await;
                if batch.final_event {
                    return Some(Stop::Idle);
                }
                None
            }
            Err(CommitError::Fenced) => {
                tracing::warn!(session = %self.id, epoch = self.epoch, "fenced: another node owns the session");
                let reply = self.not_owner();
                for w in batch.waiting {
                    waiting_reply(w).send(&self.ctx, reply.clone()).await;
                }
                Some(Stop::Fenced)
            }
            Err(CommitError::Failed(msg)) => {
                tracing::warn!(session = %self.id, error = %msg, "commit failed; reloading from the log");
                // The commit may have landed (a lost reply): the router must not
                // report this command as not applied.
                let err = WireError::new(
                    codes::SERVICE_UNAVAILABLE,
                    "the session store is unavailable",
                )
                .with_details(json!({"outcome": "unknown"}));
                for w in batch.waiting {
                    waiting_reply(w)
                        .send(&self.ctx, NodeReply::err(err.clone()))
                        .await;
                }
                // The in-memory state may be ahead of the log, or the commit may have
                // landed with its reply lost: rebuild from the log either way. The
                // retries of these commands are checked against the log (one may have
                // been a repeat of a command older than the window).
                self.dedupe.verify_until = Some(Instant::now() + VERIFY_AFTER_FAILURE);
                match self.reload().await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(session = %self.id, error = %e, "reload failed; stopping");
                        Some(Stop::Failed)
                    }
                }
            }
        }
    }

    async fn reload(&mut self) -> Result<(), NodeError> {
        let (state, events) = load_state(&self.ctx, self.id).await?;
        let window = self.ctx.cfg.node.dedupe_window as u64;
        let commands = self.ctx.store.recent_commands(self.id, window).await?;
        self.state = state;
        self.state.limits = doc_limits(&self.ctx.cfg.document);
        self.recent = events
            .iter()
            .rev()
            .take(self.ctx.cfg.node.recent_events)
            .rev()
            .map(render_stored)
            .collect();
        self.dedupe.map.clear();
        self.dedupe.order.clear();
        let complete = (commands.len() as u64) < window;
        for (c, v) in commands.into_iter().rev() {
            self.dedupe.insert(c, v);
        }
        self.dedupe.complete = complete;
        if let Some(last) = self.recent.back().cloned() {
            self.publish(&last, None).await;
        }
        Ok(())
    }

    async fn answer(&self, waiting: Vec<Waiting>) {
        for w in waiting {
            let (reply, answer) = match w {
                // Its event carried the ack.
                Waiting::Ack { by_event: true, .. } => continue,
                Waiting::Ack {
                    reply,
                    version,
                    duplicate,
                    ..
                } => (
                    reply,
                    NodeReply::Ok {
                        body: ReplyBody::Ack { version, duplicate },
                    },
                ),
                Waiting::Refused { reply, error } => (reply, NodeReply::err(error)),
                Waiting::Done { reply, answer } => (reply, answer),
                Waiting::Joined { reply, user } => {
                    let answer = match self.state.role_of(&user) {
                        Some(role) => NodeReply::Ok {
                            body: ReplyBody::Joined {
                                version: self.state.version,
                                session_role: role.as_str().to_string(),
                                view: self.view(),
                            },
                        },
                        None => NodeReply::err(WireError::new(codes::NOT_MEMBER, "not a member")),
                    };
                    (reply, answer)
                }
            };
            reply.send(&self.ctx, answer).await;
        }
    }

    async fn read(&mut self, req: &NodeRequest) -> NodeReply {
        let user = req.caller.user_id;
        let admin = req.caller.role == Role::Admin;
        let member = admin || self.state.role_of(&user).is_some();
        let not_member =
            || NodeReply::err(WireError::new(codes::NOT_MEMBER, "join the session first"));
        match &req.body {
            RequestBody::GetState => {
                if !member {
                    return not_member();
                }
                NodeReply::Ok {
                    body: ReplyBody::State { view: self.view() },
                }
            }
            RequestBody::Sync { paths } => {
                if !member {
                    return not_member();
                }
                let mut view = self.view();
                if let Some(paths) = paths.as_ref().filter(|p| !p.is_empty()) {
                    let mut out = serde_json::Map::new();
                    for p in paths {
                        match gs_rules::pointer::get(&self.state.doc, p) {
                            Ok(v) => {
                                out.insert(p.clone(), v.cloned().unwrap_or(Value::Null));
                            }
                            Err(e) => {
                                return NodeReply::err(
                                    WireError::new(
                                        codes::INVALID_PATH,
                                        format!("invalid path {p:?}: {}", e.reason),
                                    )
                                    .with_details(json!({"path": p})),
                                )
                            }
                        }
                    }
                    view.state = Value::Object(out);
                }
                NodeReply::Ok {
                    body: ReplyBody::State { view },
                }
            }
            RequestBody::EventsSince { after, limit } => {
                if !member {
                    return not_member();
                }
                match self.events_since(*after, *limit).await {
                    Ok(events) => NodeReply::Ok {
                        body: ReplyBody::Events {
                            events,
                            current: self.state.version,
                        },
                    },
                    Err(e) => NodeReply::err(e.to_wire()),
                }
            }
            RequestBody::Attach {
                conn_id,
                router_id,
                last_version,
                replay_limit,
            } => {
                let Some(role) = self
                    .state
                    .role_of(&user)
                    .or(admin.then_some(gs_rules::SessionRole::Dm))
                else {
                    return not_member();
                };
                self.connections.insert(*conn_id, (user, router_id.clone()));
                self.ctx.cache.attach(self.id, self.epoch, *conn_id, user);
                let version = self.state.version;
                let resume = match last_version {
                    Some(lv) if *lv <= version && version - lv <= *replay_limit => {
                        match self.events_since(*lv, *replay_limit).await {
                            // All of them fitted in one reply.
                            Ok(events)
                                if *lv == version
                                    || events.last().is_some_and(|e| e.version == version) =>
                            {
                                Resume::Events { events }
                            }
                            Ok(_) => Resume::Full { view: self.view() },
                            Err(e) => return NodeReply::err(e.to_wire()),
                        }
                    }
                    _ => Resume::Full { view: self.view() },
                };
                NodeReply::Ok {
                    body: ReplyBody::Attached {
                        session_role: role.as_str().to_string(),
                        version,
                        resume,
                    },
                }
            }
            RequestBody::Presence => {
                if !member {
                    return not_member();
                }
                let mut count: std::collections::BTreeMap<Uuid, u32> = Default::default();
                for (user, _) in self.connections.values() {
                    *count.entry(*user).or_default() += 1;
                }
                let players = count
                    .into_iter()
                    .map(|(player_id, connections)| gs_shared::rpc::Present {
                        player_id,
                        connections,
                    })
                    .collect();
                NodeReply::Ok {
                    body: ReplyBody::Presence { players },
                }
            }
            RequestBody::History { before, limit } => {
                if !member {
                    return not_member();
                }
                let limit = (*limit).clamp(1, 500);
                match self.ctx.store.events_before(self.id, *before, limit).await {
                    Ok(events) => {
                        let next_before = (events.len() as u64 == limit)
                            .then(|| events.last().map(|e| e.seq))
                            .flatten();
                        let entries = events.iter().map(crate::history::entry).collect();
                        NodeReply::Ok {
                            body: ReplyBody::History {
                                entries,
                                next_before,
                            },
                        }
                    }
                    Err(e) => NodeReply::err(e.to_wire()),
                }
            }
            other => NodeReply::err(WireError::new(
                codes::BAD_REQUEST,
                format!("{} is not a read", other.op()),
            )),
        }
    }

    /// Events after `after`, from memory when possible, else from the log; at most
    /// `limit` of them and [`MAX_EVENTS_REPLY_BYTES`] in all (at least one), so the
    /// reply fits in a NATS message: the asker asks again from where it ends.
    async fn events_since(&self, after: u64, limit: u64) -> Result<Vec<RawEvent>, NodeError> {
        let limit = limit.clamp(1, 10_000) as usize;
        if after >= self.state.version {
            return Ok(vec![]);
        }
        if let Some(first) = self.recent.front() {
            if first.version <= after + 1 {
                return Ok(within_budget(
                    self.recent
                        .iter()
                        .filter(|e| e.version > after)
                        .take(limit)
                        .cloned(),
                ));
            }
        }
        let stored = self
            .ctx
            .store
            .events_after(self.id, after, limit as u64)
            .await?;
        Ok(within_budget(stored.iter().map(render_stored)))
    }

    /// Publishes an event for the routers; `ack`: the command whose ack it carries.
    async fn publish(&self, ev: &RawEvent, ack: Option<Uuid>) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(protocol::VERSION_HEADER, ev.version.to_string().as_str());
        if let Some(id) = ack {
            headers.insert(protocol::ACK_HEADER, id.to_string().as_str());
        }
        if let Err(e) = self
            .ctx
            .nats
            .publish_with_headers(self.events_subject.clone(), headers, ev.json.bytes())
            .await
        {
            // Routers fill the gap from the log when the next event arrives.
            tracing::debug!(error = %e, "event not published");
        }
    }

    fn view(&self) -> SessionView {
        SessionView {
            state: self.state.doc.clone(),
            metadata: self.state.metadata.clone(),
            game: self.state.game_view(),
            version: self.state.version,
            timestamp: self.state.updated_at.clone(),
        }
    }

    fn not_owner(&self) -> NodeReply {
        let owner = self
            .ctx
            .cluster
            .owner(&self.id)
            .filter(|o| o != &self.ctx.id);
        NodeReply::Err {
            error: WireError::new(codes::NOT_OWNER, "this node does not own the session"),
            owner,
        }
    }

    fn stopped_reply(&self, stop: Stop) -> NodeReply {
        match stop {
            Stop::Failed => NodeReply::err(WireError::new(
                codes::SERVICE_UNAVAILABLE,
                "the session is being recovered",
            )),
            _ => self.not_owner(),
        }
    }

    fn cache_meta(&self) {
        self.ctx.cache.meta(
            self.id,
            self.epoch,
            vec![
                ("name".into(), self.state.name.clone()),
                ("campaign_id".into(), self.state.campaign_id.to_string()),
                ("status".into(), self.state.status.as_str().to_string()),
                ("created_at".into(), self.created_at()),
                ("updated_at".into(), self.state.updated_at.clone()),
            ],
        );
    }

    /// Mirrors the combat summary into Redis when it changed (an empty map deletes
    /// the key when combat ends).
    fn cache_combat(&mut self) {
        let now = crate::outbox::combat_summary(&self.state);
        if now != self.last_combat {
            self.ctx
                .cache
                .combat(self.id, self.epoch, now.clone().unwrap_or_default());
            self.last_combat = now;
        }
    }

    /// Writes the combat key whatever it holds now.
    fn rewrite_combat_cache(&mut self) {
        let now = crate::outbox::combat_summary(&self.state);
        self.ctx
            .cache
            .combat(self.id, self.epoch, now.clone().unwrap_or_default());
        self.last_combat = now;
    }

    fn created_at(&self) -> String {
        self.state
            .members
            .get(&self.state.created_by)
            .map(|m| m.joined_at.clone())
            .unwrap_or_default()
    }

    /// Connections of routers that left the cluster will never detach: forget them
    /// (so the session can passivate, and its presence keys stay true).
    fn forget_dead_routers(&mut self) {
        let cluster = self.ctx.cluster.clone();
        let gone: Vec<(Uuid, Uuid)> = self
            .connections
            .iter()
            .filter(|(_, (_, router))| !cluster.is_alive(router))
            .map(|(c, (u, _))| (*c, *u))
            .collect();
        for (conn, user) in gone {
            self.connections.remove(&conn);
            self.ctx.cache.detach(self.id, self.epoch, conn, user);
        }
    }

    fn refresh_cache(&self) {
        self.ctx
            .cache
            .refresh(self.id, !self.connections.is_empty());
    }

    /// Stops: answers what is queued, snapshots where useful, releases the lock, and
    /// leaves the registry.
    async fn finish(self, stop: Stop, inbox: &mut mpsc::Receiver<Envelope>) {
        tracing::info!(session = %self.id, reason = ?stop, version = self.state.version, "session actor stopping");
        self.ctx.registry.remove(&self.ctx, &self.id, self.gen);
        inbox.close();
        let Actor {
            ctx,
            id,
            epoch,
            state,
            lease,
            last_snapshot,
            ..
        } = self;
        match stop {
            // Someone is waiting for the session (a new owner, redirected clients): free
            // the lock first, then redirect what is queued. No snapshot: the new owner
            // replays at most `snapshot_every` events from the last periodic one.
            Stop::Handoff | Stop::Shutdown | Stop::Failed => lease.release().await,
            // Nobody is waiting: leave a snapshot at the stopping point, then unlock.
            Stop::Idle => {
                if lease.is_valid() && state.version > last_snapshot {
                    let item = CommitItem {
                        session: id,
                        epoch,
                        events: vec![],
                        snapshot: Some(SnapshotRow {
                            seq: state.version,
                            state: serde_json::value::to_raw_value(&state)
                                .expect("state serialises"),
                        }),
                        prune_before: Some(last_snapshot),
                        status: None,
                        characters: vec![],
                    };
                    if let (_, Err(e)) = ctx.committer.commit(item).await {
                        tracing::debug!(session = %id, error = %e, "passivation snapshot not written");
                    }
                }
                lease.release().await;
            }
            // The lock is gone or another node holds the epoch: nothing to release.
            Stop::Fenced | Stop::LeaseLost => {}
        }
        // The hub publishes what is left; an owner that stopped as the owner lets the
        // sweeper pass the session by once all is published.
        let as_owner = matches!(stop, Stop::Handoff | Stop::Shutdown | Stop::Idle);
        ctx.hub
            .stopped(id, as_owner.then_some(epoch), state.version);
        let reply = match stop {
            Stop::Failed => NodeReply::err(WireError::new(
                codes::SERVICE_UNAVAILABLE,
                "the session is being recovered",
            )),
            _ => NodeReply::Err {
                error: WireError::new(codes::NOT_OWNER, "this node does not own the session"),
                owner: ctx.cluster.owner(&id).filter(|o| o != &ctx.id),
            },
        };
        while let Ok(env) = inbox.try_recv() {
            env.reply.send(&ctx, reply.clone()).await;
        }
    }
}

fn command_id(body: &RequestBody) -> Option<Uuid> {
    match body {
        RequestBody::Command { command_id, .. }
        | RequestBody::SaveState { command_id, .. }
        | RequestBody::Join { command_id, .. } => Some(*command_id),
        RequestBody::HubEvent { event_id, .. } => Some(*event_id),
        _ => None,
    }
}

fn waiting_reply(w: Waiting) -> Reply {
    match w {
        Waiting::Ack { reply, .. }
        | Waiting::Joined { reply, .. }
        | Waiting::Refused { reply, .. }
        | Waiting::Done { reply, .. } => reply,
    }
}

/// Into the one wire error type (a rule's refusal already is one; a node error
/// converts with `From`).
trait IntoWire {
    fn into_wire(self) -> WireError;
}

impl<E: Into<WireError>> IntoWire for E {
    fn into_wire(self) -> WireError {
        self.into()
    }
}
