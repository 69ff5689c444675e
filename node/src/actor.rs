//! One task per owned session ([`Session`]): the only code that changes a session's
//! state. The task is a thin shell around the session core ([`engine`], no I/O): it
//! receives requests and control, feeds them to the core, and executes what the core
//! asks (store, committer, lease checks, NATS publishes, Redis cache), feeding the
//! results back.
//!
//! ```text
//!  inbox (bounded) ──▶ batch ──▶ core: decide (rules), apply ──▶ commit (group) ──▶ core ──▶ publish, answer
//! ```
//!
//! * **Activation** ([`activate`]): take the ownership lock, bump the fencing epoch in
//!   PostgreSQL, rebuild the state from the newest snapshot plus the events after it,
//!   load the recent command ids, and republish the newest event (so routers notice
//!   any event whose broadcast died with the previous owner).
//! * **Batches**: the task takes everything queued (up to `node.actor_batch_max`); the
//!   core decides each command against the state, applies the events in memory, and
//!   asks for one commit of all rows. Only after the commit does it have the events
//!   published (NATS, in version order) and the commands answered. Reads
//!   ([`read`]) are answered between commits, so they never see an uncommitted change.
//! * **Failure**: if a commit is refused as fenced, another node owns the session:
//!   `not_owner`, and the task stops. If the outcome is unknown (database error), the
//!   in-memory state may be ahead of the log, so it is rebuilt from the log; the
//!   commands' retries then find their ids there (exactly once).
//! * **Stop**: on lease loss, handoff (ring change), passivation or shutdown, the
//!   task writes a snapshot where useful, releases the lock and leaves the registry;
//!   queued requests get `not_owner` with the new owner, and routers retry there.
//! * **Fault injection** for the chaos tests sits behind one seam ([`faults`]).

mod activate;
pub mod engine;
mod faults;
mod read;

pub use activate::{load_state, load_state_at};

use crate::error::NodeError;
use crate::ownership::Lease;
use crate::store::{CommitError, CommitItem, EventRow};
use crate::NodeCtx;
use engine::{Committed, CoreConfig, Input, Now, Output, Recovered, SessionCore, Stop};
use faults::Faults;
use gs_shared::event_batch;
use gs_shared::protocol::{codes, WireError};
use gs_shared::rpc::{NodeReply, NodeRequest, RawEvent};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

/// Where a request's answer goes.
pub enum Reply {
    /// A NATS reply subject (requests from routers and the hub relay).
    Nats(async_nats::Subject),
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
        }
    }
}

/// A request waiting in a session's inbox (`R`: where its answer goes; the core's
/// tests use plain tags).
pub struct Envelope<R = Reply> {
    pub req: NodeRequest,
    pub reply: R,
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

/// How often at most a busy session's `updated_at` is written to Redis.
const META_TOUCH_EVERY: Duration = Duration::from_secs(1);

/// A session task: the core plus what only I/O needs.
pub struct Session {
    ctx: Arc<NodeCtx>,
    gen: u64,
    lease: Lease,
    core: SessionCore<Reply>,
    /// Attached WebSocket connections: id → (user, router).
    connections: HashMap<Uuid, (Uuid, String)>,
    /// The combat summary last written to Redis.
    last_combat: Option<BTreeMap<String, String>>,
    /// `gs.session.{id}.events`.
    events_subject: async_nats::Subject,
    /// When `updated_at` was last written to the Redis meta key.
    meta_touched: Instant,
    faults: Faults,
    /// The rows of the last commit, handed to the hub relay once published.
    committed: Vec<EventRow>,
    /// The core's output buffer (reused).
    out: Vec<Output<Reply>>,
}

/// What a session task is made of (activation's result).
struct Parts {
    ctx: Arc<NodeCtx>,
    id: Uuid,
    gen: u64,
    epoch: u64,
    lease: Lease,
    recovered: Recovered,
}

/// Entry point of a session task: activate, serve, stop. Always leaves the registry.
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
    match activate::activate(&ctx, id, gen, &held).await {
        Ok(mut session) => {
            metrics::histogram!("gs_node_activation_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::info!(session = %id, epoch = session.core.epoch(),
                version = session.core.state().version,
                ms = started.elapsed().as_millis() as u64, "session activated");
            let stop = session.serve(held, &mut inbox, &mut control).await;
            session.finish(stop, &mut inbox).await;
        }
        Err(e) => {
            tracing::info!(session = %id, error = %e, "activation failed");
            if let NodeError::Corrupt(reason) = &e {
                ctx.registry.quarantine(id, reason.clone());
            }
            ctx.registry.remove(&id, gen);
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

/// `not_owner`, naming the owner this node knows (if another).
fn not_owner(ctx: &NodeCtx, id: &Uuid) -> NodeReply {
    NodeReply::Err {
        error: WireError::new(codes::NOT_OWNER, "this node does not own the session"),
        owner: ctx.cluster.owner(id).filter(|o| o != &ctx.id),
    }
}

impl Session {
    fn new(p: Parts) -> Session {
        let cfg = CoreConfig::new(&p.ctx.cfg);
        let now = Instant::now();
        Session {
            events_subject: p.ctx.subjects.session_events(&p.id).into(),
            faults: Faults::new(&p.ctx.cfg.node),
            core: SessionCore::new(p.id, p.epoch, cfg, p.recovered, now),
            ctx: p.ctx,
            gen: p.gen,
            lease: p.lease,
            connections: HashMap::new(),
            last_combat: None,
            meta_touched: now,
            committed: Vec::new(),
            out: Vec::new(),
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
                    if let Some(stop) = self.handle(batch).await {
                        return stop;
                    }
                }
                _ = tick.tick() => {
                    self.forget_dead_routers();
                    self.refresh_cache();
                    let connections = !self.connections.is_empty();
                    if let Some(stop) = self.step(Input::Tick { connections }).await {
                        return stop;
                    }
                }
            }
        }
    }

    /// Handles one batch; returns `Some` when the task must stop.
    async fn handle(&mut self, mut batch: Vec<Envelope>) -> Option<Stop> {
        let failed = self
            .faults
            .hub_events_to_fail(&self.ctx.cfg.node, &mut batch);
        for env in failed {
            // Fault injection: an error the forwarder does not retry, so the hub relay
            // has to requeue the event.
            let err = WireError::new(codes::INTERNAL, "fault injection");
            env.reply.send(&self.ctx, NodeReply::err(err)).await;
        }
        let lost = if self.lease.is_valid() {
            None
        } else {
            // The core stops, then refuses the batch.
            self.step(Input::LeaseLost).await
        };
        let stop = self.step(Input::Batch(batch)).await;
        lost.or(stop)
    }

    /// Feeds the core one input, then the results of the I/O it asks for, until it
    /// waits for nothing. Returns `Some` when the core says stop.
    async fn step(&mut self, input: Input<Reply>) -> Option<Stop> {
        let mut out = std::mem::take(&mut self.out);
        let mut next = Some(input);
        let mut stop = None;
        while let Some(input) = next.take() {
            self.core.step(input, Now::read(), &mut out);
            for o in out.drain(..) {
                match o {
                    Output::Stop(s) => stop = Some(s),
                    // A suspension is the step's last output: its result is the next input.
                    o => {
                        if let Some(input) = self.execute(o).await {
                            next = Some(input);
                        }
                    }
                }
            }
        }
        self.out = out;
        stop
    }

    /// Executes one output of the core; a suspension's result is the next input.
    async fn execute(&mut self, o: Output<Reply>) -> Option<Input<Reply>> {
        let id = self.core.id();
        let input = match o {
            Output::Verify(ids) => {
                let found = self.ctx.store.find_commands(id, &ids).await;
                Input::Verified(found.map_err(|e| e.to_wire()))
            }
            Output::Commit(item) => self.commit(item).await,
            Output::ConfirmLease => Input::LeaseConfirmed(self.lease.confirm().await),
            Output::LoadPast(version) => {
                let past = load_state_at(&self.ctx, id, Some(version)).await;
                Input::Past(past.map(|(state, _)| state).map_err(|e| e.to_wire()))
            }
            Output::Reload => Input::Reloaded(self.reload().await),
            Output::Read(env) => {
                let answer = self.read(&env.req).await;
                env.reply.send(&self.ctx, answer).await;
                Input::ReadDone
            }
            other => {
                self.execute_effect(other).await;
                return None;
            }
        };
        Some(input)
    }

    /// Executes an output the core does not wait for.
    async fn execute_effect(&mut self, o: Output<Reply>) {
        let (id, epoch) = (self.core.id(), self.core.epoch());
        match o {
            Output::Publish { events, acks } => {
                self.publish(&events, &acks).await;
                // Requests to other services start once what asked for them is durable.
                crate::services::after_commit(&self.ctx, id, &self.committed);
                self.ctx
                    .hub
                    .committed(id, std::mem::take(&mut self.committed));
            }
            Output::Republish(ev) => self.publish(&[ev], &[]).await,
            Output::RefreshCaches { status_changed } => self.refresh_after_commit(status_changed),
            Output::Detach(conn) => {
                if let Some((user, _)) = self.connections.remove(&conn) {
                    self.ctx.cache.detach(id, epoch, conn, user);
                }
            }
            Output::Touch(conn) => {
                // Only a connection the owner knows (a late touch after its detach
                // must not bring its entry back).
                if let Some((user, _)) = self.connections.get(&conn) {
                    self.ctx.cache.attach(id, epoch, conn, *user);
                }
            }
            Output::Reattach { conn, user, router } => {
                self.connections.insert(conn, (user, router));
                self.ctx.cache.attach(id, epoch, conn, user);
            }
            Output::Answer(reply, answer) => reply.send(&self.ctx, answer).await,
            Output::NotOwner(reply) => reply.send(&self.ctx, not_owner(&self.ctx, &id)).await,
            // Suspensions go through `execute`, stopping outputs through `finish`.
            _ => debug_assert!(false, "unexpected output"),
        }
    }

    /// Commits for the core (after the last local lease check).
    async fn commit(&mut self, item: CommitItem) -> Input<Reply> {
        let id = self.core.id();
        // Last local check before the write: a lease that lapsed while this batch was
        // decided (a slow decision, a pause) means another node may own the session;
        // PostgreSQL's epoch check would refuse the write anyway, this just answers
        // sooner.
        if !self.lease.is_valid() {
            return Input::LeaseLost;
        }
        self.faults.before_commit(&self.ctx, id, &item.events).await;
        let started = Instant::now();
        let (item, result) = self.ctx.committer.commit(item).await;
        metrics::histogram!("gs_node_commit_wait_seconds").record(started.elapsed().as_secs_f64());
        Input::Committed(match result {
            Ok(()) => {
                self.faults
                    .after_commit(&self.ctx.cfg.node, id, &item.events);
                self.committed = item.events;
                Committed::Ok
            }
            Err(CommitError::Fenced) => {
                tracing::warn!(session = %id, epoch = self.core.epoch(), "fenced: another node owns the session");
                Committed::Fenced
            }
            Err(CommitError::Failed(msg)) => {
                tracing::warn!(session = %id, error = %msg, "commit failed; reloading from the log");
                Committed::Failed(msg)
            }
        })
    }

    /// Rebuilds the session from the log (after a commit whose outcome is unknown).
    async fn reload(&mut self) -> Result<Recovered, String> {
        let id = self.core.id();
        activate::recover(&self.ctx, id).await.map_err(|e| {
            tracing::warn!(session = %id, error = %e, "reload failed; stopping");
            e.to_string()
        })
    }

    /// Publishes committed events for the routers, one message per run of them (see
    /// [`event_batch`]); `acks`: index in `events`, the command whose ack it carries.
    async fn publish(&self, events: &[RawEvent], acks: &[(usize, Uuid)]) {
        for m in event_batch::messages(events, acks) {
            if let Err(e) = self
                .ctx
                .nats
                .publish_with_headers(self.events_subject.clone(), m.headers(), m.payload)
                .await
            {
                // Routers fill the gap from the log when the next event arrives.
                tracing::debug!(error = %e, "events not published");
            }
        }
    }

    fn refresh_after_commit(&mut self, status_changed: bool) {
        if status_changed {
            self.cache_meta();
        } else if self.meta_touched.elapsed() >= META_TOUCH_EVERY {
            self.meta_touched = Instant::now();
            let state = self.core.state();
            self.ctx
                .cache
                .touch_meta(self.core.id(), self.core.epoch(), &state.updated_at);
        }
        self.cache_combat();
    }

    fn cache_meta(&self) {
        let state = self.core.state();
        let created_at = state
            .members
            .get(&state.created_by)
            .map(|m| m.joined_at.clone())
            .unwrap_or_default();
        self.ctx.cache.meta(
            self.core.id(),
            self.core.epoch(),
            vec![
                ("name".into(), state.name.clone()),
                ("campaign_id".into(), state.campaign_id.to_string()),
                ("status".into(), state.status.as_str().to_string()),
                ("created_at".into(), created_at),
                ("updated_at".into(), state.updated_at.clone()),
            ],
        );
    }

    /// Mirrors the combat summary into Redis when it changed (an empty map deletes
    /// the key when combat ends).
    fn cache_combat(&mut self) {
        let now = crate::outbox::combat_summary(self.core.state());
        if now != self.last_combat {
            self.write_combat(now);
        }
    }

    /// Writes the combat key whatever it holds now.
    fn rewrite_combat_cache(&mut self) {
        self.write_combat(crate::outbox::combat_summary(self.core.state()));
    }

    fn write_combat(&mut self, now: Option<BTreeMap<String, String>>) {
        let (id, epoch) = (self.core.id(), self.core.epoch());
        self.ctx
            .cache
            .combat(id, epoch, now.clone().unwrap_or_default());
        self.last_combat = now;
    }

    /// Connections of routers that left the cluster will never detach: forget them
    /// (so the session can passivate, and its presence keys stay true).
    fn forget_dead_routers(&mut self) {
        let (id, epoch) = (self.core.id(), self.core.epoch());
        let cluster = self.ctx.cluster.clone();
        let gone: Vec<(Uuid, Uuid)> = self
            .connections
            .iter()
            .filter(|(_, (_, router))| !cluster.is_alive(router))
            .map(|(c, (u, _))| (*c, *u))
            .collect();
        for (conn, user) in gone {
            self.connections.remove(&conn);
            self.ctx.cache.detach(id, epoch, conn, user);
        }
    }

    fn refresh_cache(&self) {
        self.ctx
            .cache
            .refresh(self.core.id(), !self.connections.is_empty());
    }

    /// Stops: answers what is queued, snapshots where useful, releases the lock, and
    /// leaves the registry (the core decides which, in order).
    async fn finish(self, stop: Stop, inbox: &mut mpsc::Receiver<Envelope>) {
        let Session {
            ctx,
            gen,
            lease,
            mut core,
            ..
        } = self;
        let id = core.id();
        tracing::info!(session = %id, reason = ?stop, version = core.state().version, "session actor stopping");
        ctx.registry.remove(&id, gen);
        inbox.close();
        let mut queued = Vec::new();
        while let Ok(env) = inbox.try_recv() {
            queued.push(env);
        }
        let mut out = Vec::new();
        core.step(
            Input::Stop {
                reason: stop,
                queued,
            },
            Now::read(),
            &mut out,
        );
        let mut lease = Some(lease);
        for o in out {
            match o {
                Output::Snapshot(item) => {
                    if lease.as_ref().is_some_and(Lease::is_valid) {
                        if let (_, Err(e)) = ctx.committer.commit(item).await {
                            tracing::debug!(session = %id, error = %e, "passivation snapshot not written");
                        }
                    }
                }
                Output::Release => {
                    if let Some(lease) = lease.take() {
                        lease.release().await;
                    }
                }
                Output::HubStopped {
                    owner_epoch,
                    version,
                } => ctx.hub.stopped(id, owner_epoch, version),
                Output::Answer(reply, answer) => reply.send(&ctx, answer).await,
                Output::NotOwner(reply) => reply.send(&ctx, not_owner(&ctx, &id)).await,
                _ => debug_assert!(false, "unexpected output while stopping"),
            }
        }
    }
}
