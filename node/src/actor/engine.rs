//! The session core, without I/O: every decision a session task makes about its
//! requests (which ids are repeats, what the rules allow, what to commit, whom to
//! answer with what, when to stop), as a state machine the task drives.
//!
//! In the spirit of openraft's engine and toydb's `step`: the task feeds an [`Input`]
//! (a batch of requests, a commit's result, a lease event, a tick, a stop) with the
//! time ([`Now`]) and executes the [`Output`]s pushed in return, in order (commit these
//! rows, look these ids up in the log, publish these events, answer these requests,
//! stop). The core reads no clock, touches no network and has no tokio: its table
//! tests (`engine/tests.rs`) run in milliseconds without services.
//!
//! A batch is processed in order. Some requests need I/O before the rest of the batch
//! can go on (a read sees committed state only, after a lock check; a rollback needs
//! the past state from the log): the core then emits the I/O as the last output of
//! the step and waits for its result as the next input ([`Output::is_suspension`]).

use super::Envelope;
use crate::store::{CommitItem, EventRow, SnapshotRow, StoredEvent};
use gs_rules::command::JoinRequest;
use gs_rules::{Command, Ctx, Event, SessionState};
use gs_shared::auth::Role;
use gs_shared::config::Config;
use gs_shared::protocol::{self, codes, WireError};
use gs_shared::rpc::{NodeReply, NodeRequest, RawEvent, ReplyBody, RequestBody, SessionView};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use uuid::Uuid;

mod dedupe;
mod quotas;
#[cfg(test)]
mod tests;

use dedupe::{Dedupe, VERIFY_AFTER_FAILURE};
use quotas::Quotas;

/// The time, passed in by the task (the core never reads a clock).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time: quotas, verification periods, idleness.
    pub at: Instant,
    /// Wall-clock time: request deadlines, event timestamps.
    pub wall: chrono::DateTime<chrono::Utc>,
}

impl Now {
    /// Reads the clocks (for the task; tests make their own).
    pub fn read() -> Now {
        Now {
            at: Instant::now(),
            wall: chrono::Utc::now(),
        }
    }

    fn wall_ms(&self) -> u64 {
        self.wall.timestamp_millis().max(0) as u64
    }

    /// The rules' timestamp (as `protocol::timestamp_now`).
    fn timestamp(&self) -> String {
        self.wall
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}

/// Why a session stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Fenced,
    LeaseLost,
    Handoff,
    Shutdown,
    Idle,
    Failed,
}

/// What the core needs of the configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub snapshot_every: u64,
    pub recent_events: usize,
    pub dedupe_window: usize,
    pub idle_passivate: Duration,
    pub state_saves_per_min: u32,
    pub joins_per_min: u32,
    pub doc_limits: gs_rules::limits::DocLimits,
    pub policy: gs_rules::state::Policy,
}

impl CoreConfig {
    pub fn new(cfg: &Config) -> CoreConfig {
        let d = &cfg.document;
        CoreConfig {
            snapshot_every: cfg.node.snapshot_every.max(1),
            recent_events: cfg.node.recent_events,
            dedupe_window: cfg.node.dedupe_window,
            idle_passivate: Duration::from_millis(cfg.node.idle_passivate_ms),
            state_saves_per_min: cfg.limits.state_updates_per_min_per_session,
            joins_per_min: cfg.limits.joins_per_min_per_session,
            doc_limits: gs_rules::limits::DocLimits {
                max_path_depth: d.max_path_depth,
                max_path_bytes: d.max_path_bytes,
                max_depth: d.max_depth,
                max_value_bytes: d.max_value_bytes,
                max_document_bytes: d.max_document_bytes,
                max_keys_per_object: d.max_keys_per_object,
            },
            policy: gs_rules::state::Policy {
                sheets_from_service: cfg.services.character_lookup,
            },
        }
    }
}

/// A session as recovered from the log (or just created).
pub struct Recovered {
    pub state: SessionState,
    /// The newest events, rendered, oldest first.
    pub recent: Vec<RawEvent>,
    /// The newest command ids with their versions, newest first.
    pub commands: Vec<(Uuid, u64)>,
    /// Whether `commands` is every command the session ever committed.
    pub complete: bool,
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    Ok,
    /// The epoch moved on: another node owns the session.
    Fenced,
    /// The database refused or could not be reached: the outcome is unknown.
    Failed(String),
}

/// What the task feeds the core.
pub enum Input<R> {
    /// Requests taken from the inbox, in order.
    Batch(Vec<Envelope<R>>),
    /// The answer to [`Output::Verify`]: the ids found in the log, with versions.
    Verified(Result<Vec<(Uuid, u64)>, WireError>),
    /// The answer to [`Output::Commit`].
    Committed(Committed),
    /// The answer to [`Output::ConfirmLease`]: whether the lock is still ours.
    LeaseConfirmed(Result<bool, String>),
    /// The answer to [`Output::LoadPast`]: the state at the rollback's version.
    Past(Result<SessionState, WireError>),
    /// The answer to [`Output::Reload`].
    Reloaded(Result<Recovered, String>),
    /// [`Output::Read`] was answered.
    ReadDone,
    /// The lease lapsed (between batches, or before a commit instead of it).
    LeaseLost,
    /// Time passes (between batches); `connections`: some client is attached.
    Tick { connections: bool },
    /// The task stops; `queued`: the requests left in its (closed) inbox.
    Stop {
        reason: Stop,
        queued: Vec<Envelope<R>>,
    },
}

/// What the core asks the task to do, in order. A suspension (see
/// [`Output::is_suspension`]) is always the last output of a step.
pub enum Output<R> {
    /// Suspension: look these command ids up in the log → [`Input::Verified`].
    Verify(Vec<Uuid>),
    /// Suspension: commit this (after a last lease check) → [`Input::Committed`], or
    /// [`Input::LeaseLost`] if the lease lapsed.
    Commit(CommitItem),
    /// Suspension: confirm in Redis that the lock is ours → [`Input::LeaseConfirmed`].
    ConfirmLease,
    /// Suspension: load the state at this version → [`Input::Past`].
    LoadPast(u64),
    /// Suspension: rebuild the session from the log → [`Input::Reloaded`].
    Reload,
    /// Suspension: answer this read from the committed state → [`Input::ReadDone`].
    Read(Envelope<R>),
    /// Publish the committed events (`acks`: index in `events`, command id carried).
    Publish {
        events: Vec<RawEvent>,
        acks: Vec<(usize, Uuid)>,
    },
    /// Publish the newest event again (after a reload), with no ack.
    Republish(RawEvent),
    /// Refresh the ICD's cache keys after a commit.
    RefreshCaches {
        status_changed: bool,
    },
    /// A connection detached.
    Detach(Uuid),
    /// A connection is alive.
    Touch(Uuid),
    /// A member's connection (of a router) attached again after the session moved.
    Reattach {
        conn: Uuid,
        user: Uuid,
        router: String,
    },
    Answer(R, NodeReply),
    /// Answer `not_owner`, naming the owner the task knows.
    NotOwner(R),
    /// The session must stop (the task then feeds [`Input::Stop`]).
    Stop(Stop),
    /// Stopping: write this passivation snapshot (if the lease is still valid).
    Snapshot(CommitItem),
    /// Stopping: release the lock.
    Release,
    /// Stopping: tell the hub relay (`owner_epoch`: stopped as the owner).
    HubStopped {
        owner_epoch: Option<u64>,
        version: u64,
    },
}

impl<R> Output<R> {
    /// Whether the core waits for the result of this output before going on.
    pub fn is_suspension(&self) -> bool {
        matches!(
            self,
            Output::Verify(_)
                | Output::Commit(_)
                | Output::ConfirmLease
                | Output::LoadPast(_)
                | Output::Reload
                | Output::Read(_)
        )
    }
}

/// Replies waiting for the batch's commit.
enum Waiting<R> {
    Ack {
        reply: R,
        version: u64,
        duplicate: bool,
        /// The router learns of it from the event's `Gs-Ack` header: no reply.
        by_event: bool,
    },
    Joined {
        reply: R,
        user: Uuid,
    },
    /// Refused commands are answered in order with the rest of the batch.
    Refused {
        reply: R,
        error: WireError,
    },
    /// Anything else answered in order with the batch.
    Done {
        reply: R,
        answer: NodeReply,
    },
}

impl<R> Waiting<R> {
    /// The answer to an applied command: the join's answer (the player's view) or an
    /// ack with the version it produced (or produced the first time, for a duplicate:
    /// no event carries that ack, so it is always a reply).
    fn applied(o: Origin<R>, version: u64, duplicate: bool) -> Waiting<R> {
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

    fn reply(self) -> R {
        match self {
            Waiting::Ack { reply, .. }
            | Waiting::Joined { reply, .. }
            | Waiting::Refused { reply, .. }
            | Waiting::Done { reply, .. } => reply,
        }
    }
}

/// Who sent a command, and how it wants its answer.
struct Origin<R> {
    reply: R,
    user: Uuid,
    role: Role,
    command_id: Uuid,
    /// A join: answered with the player's view.
    join: bool,
    /// A client command whose router takes the ack from the event (`Gs-Ack`).
    ack_by_event: bool,
}

impl<R> Origin<R> {
    fn new(reply: R, user: Uuid, role: Role, command_id: Uuid) -> Origin<R> {
        Origin {
            reply,
            user,
            role,
            command_id,
            join: false,
            ack_by_event: false,
        }
    }

    fn ctx(&self, now: Now) -> Ctx {
        Ctx {
            user_id: self.user,
            admin: self.role == Role::Admin,
            command_id: self.command_id,
            timestamp: now.timestamp(),
        }
    }
}

/// What the batch has staged since its last commit.
struct Batch<R> {
    rows: Vec<EventRow>,
    rendered: Vec<RawEvent>,
    /// Events that carry a command's ack (`Gs-Ack`): index in `rendered`, command id.
    acks_on: Vec<(usize, Uuid)>,
    waiting: Vec<Waiting<R>>,
    status: Option<(String, chrono::NaiveDateTime)>,
    final_event: bool,
    /// Some reply shows the session's state without a commit behind it (a repeated
    /// join, a retried create): confirm the lock before sending it.
    needs_barrier: bool,
}

impl<R> Default for Batch<R> {
    fn default() -> Self {
        Batch {
            rows: Vec::new(),
            rendered: Vec::new(),
            acks_on: Vec::new(),
            waiting: Vec::new(),
            status: None,
            final_event: false,
            needs_barrier: false,
        }
    }
}

impl<R> Batch<R> {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.waiting.is_empty()
    }
}

/// What follows once the staged commands are committed.
enum Then<R> {
    /// The next request of the batch (or the batch's end).
    Next,
    /// A rollback (it is decided against committed state).
    Rollback(Origin<R>, u64),
    /// A read (it sees committed state only).
    Read(Envelope<R>),
}

/// What the core waits for.
enum Wait<R> {
    /// Between batches.
    Idle,
    Verify(Vec<Envelope<R>>),
    Commit {
        then: Then<R>,
        batch: Batch<R>,
        snap_seq: Option<u64>,
    },
    /// The lock check before answering from uncommitted-free state (no rows).
    Barrier(Then<R>),
    /// The lock check before the batch's first read.
    ReadBarrier(Envelope<R>),
    Read,
    Past {
        origin: Origin<R>,
        ctx: Ctx,
        to_version: u64,
    },
    Reload(Then<R>),
    Stopped(Stop),
}

/// Whether processing goes on within this step.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Suspend,
}

/// A session's pure state and the batch in progress.
pub struct SessionCore<R> {
    id: Uuid,
    epoch: u64,
    cfg: CoreConfig,
    state: SessionState,
    recent: VecDeque<RawEvent>,
    dedupe: Dedupe,
    quotas: Quotas,
    last_snapshot: u64,
    last_activity: Instant,
    batch: Batch<R>,
    /// The requests of the current batch not yet taken.
    rest: std::vec::IntoIter<Envelope<R>>,
    /// The lock was confirmed for this batch's reads.
    read_confirmed: bool,
    wait: Wait<R>,
}

impl<R> SessionCore<R> {
    pub fn new(id: Uuid, epoch: u64, cfg: CoreConfig, rec: Recovered, now: Instant) -> Self {
        let mut state = rec.state;
        state.limits = cfg.doc_limits;
        state.policy = cfg.policy;
        let last_snapshot = state.version / cfg.snapshot_every * cfg.snapshot_every;
        SessionCore {
            id,
            epoch,
            dedupe: Dedupe::new(cfg.dedupe_window, rec.commands, rec.complete),
            recent: rec.recent.into(),
            cfg,
            state,
            quotas: Quotas::default(),
            last_snapshot,
            last_activity: now,
            batch: Batch::default(),
            rest: Vec::new().into_iter(),
            read_confirmed: false,
            wait: Wait::Idle,
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The state, with the staged (not yet committed) events applied; when the core
    /// asks for a read, nothing uncommitted is staged.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// The newest committed events, oldest first.
    pub fn recent(&self) -> &VecDeque<RawEvent> {
        &self.recent
    }

    pub fn view(&self) -> SessionView {
        SessionView {
            state: self.state.doc.clone(),
            metadata: self.state.metadata.clone(),
            game: self.state.game_view(),
            version: self.state.version,
            timestamp: self.state.updated_at.clone(),
        }
    }

    /// Feeds one input; pushes what to do onto `out`.
    pub fn step(&mut self, input: Input<R>, now: Now, out: &mut Vec<Output<R>>) {
        if let Wait::Stopped(stop) = self.wait {
            return self.after_stop(stop, input, out);
        }
        match input {
            Input::Batch(batch) => self.on_batch(batch, now, out),
            Input::Verified(found) => self.on_verified(found, now, out),
            Input::Committed(result) => self.on_committed(result, now, out),
            Input::LeaseConfirmed(r) => self.on_confirmed(r, now, out),
            Input::Past(past) => self.on_past(past, now, out),
            Input::Reloaded(r) => self.on_reloaded(r, now, out),
            Input::ReadDone => {
                debug_assert!(matches!(self.wait, Wait::Read));
                self.run(now, out)
            }
            Input::LeaseLost => self.stop(Stop::LeaseLost, out),
            Input::Tick { connections } => self.on_tick(connections, now, out),
            Input::Stop { reason, queued } => {
                self.halt(reason, out);
                self.finish(reason, queued, out);
            }
        }
    }

    /// A stopped core answers what still reaches it; a stop input finishes it.
    fn after_stop(&mut self, stop: Stop, input: Input<R>, out: &mut Vec<Output<R>>) {
        match input {
            Input::Batch(batch) => {
                for env in batch {
                    self.refuse(stop, env.reply, out);
                }
            }
            Input::Stop { queued, .. } => self.finish(stop, queued, out),
            _ => {}
        }
    }

    fn on_batch(&mut self, batch: Vec<Envelope<R>>, now: Now, out: &mut Vec<Output<R>>) {
        debug_assert!(matches!(self.wait, Wait::Idle));
        self.last_activity = now.at;
        self.read_confirmed = false;
        // Commands this session has not seen, when its memory does not cover the whole
        // log and a miss may be a repeat: ask the log once for the batch.
        let unknown = self.dedupe.misses_to_verify(&batch, now);
        if !unknown.is_empty() {
            self.wait = Wait::Verify(batch);
            out.push(Output::Verify(unknown));
            return;
        }
        self.rest = batch.into_iter();
        self.run(now, out);
    }

    fn on_verified(
        &mut self,
        found: Result<Vec<(Uuid, u64)>, WireError>,
        now: Now,
        out: &mut Vec<Output<R>>,
    ) {
        let Wait::Verify(batch) = std::mem::replace(&mut self.wait, Wait::Idle) else {
            debug_assert!(false, "Verified while not verifying");
            return;
        };
        match found {
            Ok(found) => {
                for (c, v) in found {
                    self.dedupe.insert(c, v);
                }
                self.rest = batch.into_iter();
                self.run(now, out);
            }
            Err(e) => {
                for env in batch {
                    out.push(Output::Answer(env.reply, NodeReply::err(e.clone())));
                }
            }
        }
    }

    /// Takes the batch's requests until one needs I/O; at its end, commits.
    fn run(&mut self, now: Now, out: &mut Vec<Output<R>>) {
        while let Some(env) = self.rest.next() {
            if self.take(env, now, out) == Flow::Suspend {
                return;
            }
        }
        if self.flush(Then::Next, now, out) == Flow::Continue {
            self.wait = Wait::Idle;
        }
    }

    /// Stages one request (or starts what it needs first).
    fn take(&mut self, env: Envelope<R>, now: Now, out: &mut Vec<Output<R>>) -> Flow {
        let Envelope { req, reply } = env;
        if let Some(c) = command_id(&req.body) {
            if expired(&req, now) && !self.dedupe.map.contains_key(&c) {
                // The router has given up on it: applying it now would contradict the
                // failure it reported. (One already applied is answered below with its
                // original version, however late.)
                metrics::counter!("gs_node_expired_total").increment(1);
                let error = WireError::new(
                    codes::DEADLINE_EXCEEDED,
                    "the request's deadline has passed",
                );
                self.batch.waiting.push(Waiting::Refused { reply, error });
                return Flow::Continue;
            }
        }
        let (user, role) = (req.caller.user_id, req.caller.role);
        match req.body {
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
                    let Some(origin) = self.answer_duplicate(origin) else {
                        return Flow::Continue;
                    };
                    return self.flush(Then::Rollback(origin, to_version), now, out);
                }
                self.stage(origin, cmd, now);
            }
            RequestBody::Detach { conn_id } => {
                out.push(Output::Detach(conn_id));
                self.done(reply);
            }
            RequestBody::Touch { conn_id } => {
                out.push(Output::Touch(conn_id));
                self.done(reply);
            }
            RequestBody::Reattach { conn_id, router_id } => {
                // No state is read, so no flush: only a member's socket is recorded.
                if role == Role::Admin || self.state.role_of(&user).is_some() {
                    out.push(Output::Reattach {
                        conn: conn_id,
                        user,
                        router: router_id,
                    });
                }
                self.done(reply);
            }
            body @ (RequestBody::SaveState { .. }
            | RequestBody::Join { .. }
            | RequestBody::Create { .. }
            | RequestBody::HubEvent { .. }) => self.take_other(body, reply, user, role, now),
            body => {
                // Reads see committed state only.
                let req = NodeRequest { body, ..req };
                return self.flush(Then::Read(Envelope { req, reply }), now, out);
            }
        }
        Flow::Continue
    }

    /// Stages a save, a join, a retried create or a hub event.
    fn take_other(&mut self, body: RequestBody, reply: R, user: Uuid, role: Role, now: Now) {
        match body {
            RequestBody::SaveState {
                command_id,
                state,
                metadata,
            } => {
                let cmd = Ok(Command::SaveState { state, metadata });
                self.stage(Origin::new(reply, user, role, command_id), cmd, now);
            }
            RequestBody::Join {
                command_id,
                data,
                lookup,
            } => {
                let cmd = serde_json::from_value::<JoinRequest>(data)
                    .map(|mut j| {
                        // The node's own addition (the Character Service's answer).
                        j.lookup = lookup.and_then(|l| serde_json::from_value(l).ok());
                        Command::Join(j)
                    })
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
                self.stage(origin, cmd, now);
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
                self.batch.needs_barrier = true;
                self.batch.waiting.push(Waiting::Done { reply, answer });
            }
            RequestBody::HubEvent {
                event_id,
                kind,
                payload,
            } => {
                // Applied by the system, as an admin; the event id is the command
                // id, so a redelivered hub event is answered from memory.
                let cmd = crate::hub::command_for(&kind, &payload);
                let origin = Origin::new(reply, Uuid::nil(), Role::Admin, event_id);
                self.stage(origin, cmd, now);
            }
            _ => unreachable!("take_other is given saves, joins, creates and hub events"),
        }
    }

    fn done(&mut self, reply: R) {
        self.batch.waiting.push(Waiting::Done {
            reply,
            answer: NodeReply::Ok {
                body: ReplyBody::Done,
            },
        });
    }

    /// Decides one command and stages its events (applied in memory, not yet durable).
    fn stage(&mut self, o: Origin<R>, cmd: Result<Command, gs_rules::RuleError>, now: Now) {
        let Some(o) = self.answer_duplicate(o) else {
            return;
        };
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => {
                let error = e;
                self.batch.waiting.push(Waiting::Refused {
                    reply: o.reply,
                    error,
                });
                return;
            }
        };
        let mut events = self.state.decide(&o.ctx(now), &cmd);
        // The session's quotas count only what its members were allowed to do and
        // that changes something: an outsider's refused saves or joins use none.
        if let Ok(ev) = &events {
            if !ev.is_empty() {
                if let Err(e) = self.quotas.hit(&cmd, &self.cfg, now.at) {
                    events = Err(e);
                }
            }
        }
        self.stage_events(o, events, now);
    }

    /// A retry of a command already committed (or staged in this batch) is answered
    /// with its original version; otherwise the origin is handed back.
    fn answer_duplicate(&mut self, o: Origin<R>) -> Option<Origin<R>> {
        let Some(&version) = self.dedupe.map.get(&o.command_id) else {
            return Some(o);
        };
        metrics::counter!("gs_node_commands_deduplicated_total").increment(1);
        self.batch.needs_barrier |= o.join;
        self.batch.waiting.push(Waiting::applied(o, version, true));
        None
    }

    /// Applies decided events in memory and stages their rows for the next commit.
    fn stage_events(&mut self, mut o: Origin<R>, events: Result<Vec<Event>, WireError>, now: Now) {
        let events = match events {
            Ok(ev) => ev,
            Err(e) => {
                metrics::counter!("gs_node_commands_refused_total", "code" => e.code.clone())
                    .increment(1);
                self.batch.waiting.push(Waiting::Refused {
                    reply: o.reply,
                    error: e,
                });
                return;
            }
        };
        let created_at = now.wall.naive_utc();
        let n = events.len();
        for (i, ev) in events.into_iter().enumerate() {
            self.stage_event(&o, ev, i + 1 == n, created_at);
        }
        let b = &mut self.batch;
        if n > 0 {
            self.dedupe.insert(o.command_id, self.state.version);
            if o.ack_by_event && !o.join {
                b.acks_on.push((b.rendered.len() - 1, o.command_id));
            }
        } else {
            b.needs_barrier |= o.join;
            // No event carries its ack: it is answered by reply.
            o.ack_by_event = false;
        }
        let version = self.state.version;
        b.waiting.push(Waiting::applied(o, version, false));
    }

    /// Applies one event and stages its row and rendering.
    fn stage_event(&mut self, o: &Origin<R>, ev: Event, last: bool, now: chrono::NaiveDateTime) {
        // The combat an event belongs to is the one running when it happened.
        let combat = crate::outbox::current_combat(&self.state);
        let kind = ev.kind().to_string();
        let data_json = ev.data_json();
        let status = match &ev {
            Event::SessionStatusChanged { status, .. } => Some(status.as_str().to_string()),
            _ => None,
        };
        let is_final = ev.is_final();
        // Rendered first: the state takes the event's values without copying them.
        self.state.apply_owned(ev);
        let version = self.state.version;
        let json = render(&kind, version, &data_json);
        let combat_id = crate::outbox::combat_of(&kind, &data_json, combat);
        let b = &mut self.batch;
        if let Some(status) = status {
            b.status = Some((status, now));
        }
        b.final_event |= is_final;
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

    /// Commits what is staged, then goes on with `then`: at once when nothing needs
    /// I/O, else after the I/O's result.
    fn flush(&mut self, then: Then<R>, now: Now, out: &mut Vec<Output<R>>) -> Flow {
        if self.batch.is_empty() {
            return self.then(then, now, out);
        }
        if self.batch.rows.is_empty() {
            if self.batch.needs_barrier {
                self.wait = Wait::Barrier(then);
                out.push(Output::ConfirmLease);
                return Flow::Suspend;
            }
            let waiting = std::mem::take(&mut self.batch.waiting);
            self.batch = Batch::default();
            self.answer(waiting, out);
            return self.then(then, now, out);
        }
        let mut batch = std::mem::take(&mut self.batch);
        let every = self.cfg.snapshot_every;
        let snapshot =
            (self.state.version / every > self.last_snapshot / every).then(|| SnapshotRow {
                seq: self.state.version,
                state: serde_json::value::to_raw_value(&self.state).expect("state serialises"),
            });
        let snap_seq = snapshot.as_ref().map(|s| s.seq);
        let rows = std::mem::take(&mut batch.rows);
        let item = CommitItem {
            session: self.id,
            epoch: self.epoch,
            characters: crate::outbox::characters(&rows),
            events: rows,
            // A new snapshot makes the ones before the previous one redundant.
            prune_before: snap_seq.map(|_| self.last_snapshot),
            snapshot,
            status: batch.status.clone(),
        };
        self.wait = Wait::Commit {
            then,
            batch,
            snap_seq,
        };
        out.push(Output::Commit(item));
        Flow::Suspend
    }

    /// Goes on after a flush.
    fn then(&mut self, then: Then<R>, now: Now, out: &mut Vec<Output<R>>) -> Flow {
        match then {
            Then::Next => Flow::Continue,
            Then::Rollback(origin, to_version) => self.rollback(origin, to_version, now, out),
            Then::Read(env) => {
                // And only the owner's: confirm the lock once per batch.
                if self.read_confirmed {
                    self.wait = Wait::Read;
                    out.push(Output::Read(env));
                } else {
                    self.wait = Wait::ReadBarrier(env);
                    out.push(Output::ConfirmLease);
                }
                Flow::Suspend
            }
        }
    }

    /// A rollback: the cheap checks, then the state at `to_version` from the log.
    fn rollback(
        &mut self,
        o: Origin<R>,
        to_version: u64,
        now: Now,
        out: &mut Vec<Output<R>>,
    ) -> Flow {
        let ctx = o.ctx(now);
        if let Err(e) = self.state.check_rollback(&ctx, to_version) {
            self.stage_events(o, Err(e), now);
            return Flow::Continue;
        }
        self.wait = Wait::Past {
            origin: o,
            ctx,
            to_version,
        };
        out.push(Output::LoadPast(to_version));
        Flow::Suspend
    }

    fn on_past(
        &mut self,
        past: Result<SessionState, WireError>,
        now: Now,
        out: &mut Vec<Output<R>>,
    ) {
        let Wait::Past {
            origin,
            ctx,
            to_version,
        } = std::mem::replace(&mut self.wait, Wait::Idle)
        else {
            debug_assert!(false, "Past while not loading");
            return;
        };
        let events = past.and_then(|past| self.state.decide_rollback(&ctx, to_version, &past));
        self.stage_events(origin, events, now);
        self.run(now, out);
    }

    fn on_committed(&mut self, result: Committed, now: Now, out: &mut Vec<Output<R>>) {
        let Wait::Commit {
            then,
            batch,
            snap_seq,
        } = std::mem::replace(&mut self.wait, Wait::Idle)
        else {
            debug_assert!(false, "Committed while not committing");
            return;
        };
        match result {
            Committed::Ok => {
                if let Some(s) = snap_seq {
                    self.last_snapshot = s;
                }
                self.recent.extend(batch.rendered.iter().cloned());
                while self.recent.len() > self.cfg.recent_events {
                    self.recent.pop_front();
                }
                metrics::counter!("gs_node_events_committed_total")
                    .increment(batch.rendered.len() as u64);
                out.push(Output::Publish {
                    events: batch.rendered,
                    acks: batch.acks_on,
                });
                out.push(Output::RefreshCaches {
                    status_changed: batch.status.is_some(),
                });
                self.answer(batch.waiting, out);
                if batch.final_event {
                    return self.stop_with(Stop::Idle, then, out);
                }
                self.go_on(then, now, out);
            }
            Committed::Fenced => {
                for w in batch.waiting {
                    out.push(Output::NotOwner(w.reply()));
                }
                self.stop_with(Stop::Fenced, then, out);
            }
            Committed::Failed(_) => {
                // The commit may have landed (a lost reply): the router must not
                // report this command as not applied.
                let err = WireError::new(
                    codes::SERVICE_UNAVAILABLE,
                    "the session store is unavailable",
                )
                .with_details(json!({"outcome": "unknown"}));
                for w in batch.waiting {
                    out.push(Output::Answer(w.reply(), NodeReply::err(err.clone())));
                }
                // The in-memory state may be ahead of the log, or the commit may have
                // landed with its reply lost: rebuild from the log either way. The
                // retries of these commands are checked against the log (one may have
                // been a repeat of a command older than the window).
                self.dedupe.verify_until = Some(now.at + VERIFY_AFTER_FAILURE);
                self.wait = Wait::Reload(then);
                out.push(Output::Reload);
            }
        }
    }

    /// Goes on with `then`, then with the rest of the batch.
    fn go_on(&mut self, then: Then<R>, now: Now, out: &mut Vec<Output<R>>) {
        if self.then(then, now, out) == Flow::Continue {
            self.run(now, out);
        }
    }

    fn on_reloaded(&mut self, r: Result<Recovered, String>, now: Now, out: &mut Vec<Output<R>>) {
        let Wait::Reload(then) = std::mem::replace(&mut self.wait, Wait::Idle) else {
            debug_assert!(false, "Reloaded while not reloading");
            return;
        };
        match r {
            Ok(rec) => {
                self.state = rec.state;
                self.state.limits = self.cfg.doc_limits;
                self.state.policy = self.cfg.policy;
                self.recent = rec.recent.into();
                self.dedupe.reset(rec.commands, rec.complete);
                if let Some(last) = self.recent.back() {
                    out.push(Output::Republish(last.clone()));
                }
                self.go_on(then, now, out);
            }
            Err(_) => self.stop_with(Stop::Failed, then, out),
        }
    }

    fn on_confirmed(&mut self, r: Result<bool, String>, now: Now, out: &mut Vec<Output<R>>) {
        match std::mem::replace(&mut self.wait, Wait::Idle) {
            Wait::Barrier(then) => {
                let waiting = std::mem::take(&mut self.batch.waiting);
                self.batch = Batch::default();
                match r {
                    Ok(true) => self.answer(waiting, out),
                    Ok(false) => {
                        for w in waiting {
                            out.push(Output::NotOwner(w.reply()));
                        }
                        return self.stop_with(Stop::LeaseLost, then, out);
                    }
                    Err(e) => {
                        let err = cannot_confirm(&e);
                        for w in waiting {
                            out.push(Output::Answer(w.reply(), NodeReply::err(err.clone())));
                        }
                    }
                }
                self.go_on(then, now, out);
            }
            Wait::ReadBarrier(env) => match r {
                Ok(true) => {
                    self.read_confirmed = true;
                    self.wait = Wait::Read;
                    out.push(Output::Read(env));
                }
                Ok(false) => {
                    out.push(Output::NotOwner(env.reply));
                    self.stop(Stop::LeaseLost, out);
                }
                Err(e) => {
                    out.push(Output::Answer(
                        env.reply,
                        NodeReply::err(cannot_confirm(&e)),
                    ));
                    self.run(now, out);
                }
            },
            other => {
                self.wait = other;
                debug_assert!(false, "LeaseConfirmed while not confirming");
            }
        }
    }

    fn on_tick(&mut self, connections: bool, now: Now, out: &mut Vec<Output<R>>) {
        if !matches!(self.wait, Wait::Idle) {
            return;
        }
        if self.dedupe.verify_until.is_some_and(|t| now.at >= t) {
            self.dedupe.verify_until = None;
        }
        if !connections && now.at.duration_since(self.last_activity) >= self.cfg.idle_passivate {
            self.stop(Stop::Idle, out);
        }
    }

    /// Stops with a continuation pending: it is refused like the rest of the batch.
    fn stop_with(&mut self, stop: Stop, then: Then<R>, out: &mut Vec<Output<R>>) {
        self.refuse_then(stop, then, out);
        self.stop(stop, out);
    }

    /// Stops and tells the task so.
    fn stop(&mut self, stop: Stop, out: &mut Vec<Output<R>>) {
        self.halt(stop, out);
        out.push(Output::Stop(stop));
    }

    /// Whatever still waits in this core is refused with the stop's answer.
    fn halt(&mut self, stop: Stop, out: &mut Vec<Output<R>>) {
        let waiting = std::mem::take(&mut self.batch.waiting);
        self.batch = Batch::default();
        for w in waiting {
            self.refuse(stop, w.reply(), out);
        }
        match std::mem::replace(&mut self.wait, Wait::Stopped(stop)) {
            Wait::Verify(batch) => {
                for env in batch {
                    self.refuse(stop, env.reply, out);
                }
            }
            Wait::Commit { then, batch, .. } => {
                for w in batch.waiting {
                    self.refuse(stop, w.reply(), out);
                }
                self.refuse_then(stop, then, out);
            }
            Wait::Barrier(then) | Wait::Reload(then) => self.refuse_then(stop, then, out),
            Wait::ReadBarrier(env) => self.refuse(stop, env.reply, out),
            Wait::Past { origin, .. } => self.refuse(stop, origin.reply, out),
            Wait::Idle | Wait::Read | Wait::Stopped(_) => {}
        }
        let rest = std::mem::replace(&mut self.rest, Vec::new().into_iter());
        for env in rest {
            self.refuse(stop, env.reply, out);
        }
    }

    fn refuse_then(&self, stop: Stop, then: Then<R>, out: &mut Vec<Output<R>>) {
        match then {
            Then::Next => {}
            Then::Rollback(origin, _) => self.refuse(stop, origin.reply, out),
            Then::Read(env) => self.refuse(stop, env.reply, out),
        }
    }

    /// The answer to a request that reaches a stopped session.
    fn refuse(&self, stop: Stop, reply: R, out: &mut Vec<Output<R>>) {
        out.push(match stop {
            Stop::Failed => Output::Answer(reply, stopped_failed()),
            _ => Output::NotOwner(reply),
        });
    }

    /// The last outputs of a stopped session: snapshot, unlock, tell the hub relay,
    /// redirect what is queued.
    fn finish(&mut self, stop: Stop, queued: Vec<Envelope<R>>, out: &mut Vec<Output<R>>) {
        match stop {
            // Someone is waiting for the session (a new owner, redirected clients): free
            // the lock first, then redirect what is queued. No snapshot: the new owner
            // replays at most `snapshot_every` events from the last periodic one.
            Stop::Handoff | Stop::Shutdown | Stop::Failed => out.push(Output::Release),
            // Nobody is waiting: leave a snapshot at the stopping point, then unlock.
            Stop::Idle => {
                if self.state.version > self.last_snapshot {
                    out.push(Output::Snapshot(CommitItem {
                        session: self.id,
                        epoch: self.epoch,
                        snapshot: Some(SnapshotRow {
                            seq: self.state.version,
                            state: serde_json::value::to_raw_value(&self.state)
                                .expect("state serialises"),
                        }),
                        prune_before: Some(self.last_snapshot),
                        ..CommitItem::default()
                    }));
                }
                out.push(Output::Release);
            }
            // The lock is gone or another node holds the epoch: nothing to release.
            Stop::Fenced | Stop::LeaseLost => {}
        }
        // The hub publishes what is left; an owner that stopped as the owner lets the
        // sweeper pass the session by once all is published.
        let as_owner = matches!(stop, Stop::Handoff | Stop::Shutdown | Stop::Idle);
        out.push(Output::HubStopped {
            owner_epoch: as_owner.then_some(self.epoch),
            version: self.state.version,
        });
        for env in queued {
            self.refuse(stop, env.reply, out);
        }
    }

    /// Answers the waiting requests of a committed (or commit-free) batch, in order.
    fn answer(&self, waiting: Vec<Waiting<R>>, out: &mut Vec<Output<R>>) {
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
            out.push(Output::Answer(reply, answer));
        }
    }
}

/// The answer of a session that stopped because it could not recover.
pub fn stopped_failed() -> NodeReply {
    NodeReply::err(WireError::new(
        codes::SERVICE_UNAVAILABLE,
        "the session is being recovered",
    ))
}

fn cannot_confirm(e: &str) -> WireError {
    WireError::new(
        codes::SERVICE_UNAVAILABLE,
        format!("cannot confirm ownership: {e}"),
    )
}

/// Whether the router has stopped waiting for this request.
fn expired(req: &NodeRequest, now: Now) -> bool {
    req.deadline_ms.is_some_and(|d| now.wall_ms() > d)
}

pub fn command_id(body: &RequestBody) -> Option<Uuid> {
    match body {
        RequestBody::Command { command_id, .. }
        | RequestBody::SaveState { command_id, .. }
        | RequestBody::Join { command_id, .. } => Some(*command_id),
        RequestBody::HubEvent { event_id, .. } => Some(*event_id),
        _ => None,
    }
}

pub fn render_stored(e: &StoredEvent) -> RawEvent {
    RawEvent {
        version: e.seq,
        json: render(&e.kind, e.seq, &e.data.to_string()).into(),
    }
}

/// An event as clients receive it: the stored data, minus what clients must not see
/// (the dice seed in `session_created`'s settings: it would predict every roll).
/// A live event and the same event read back from the log are the same JSON (their
/// keys may come in another order).
pub fn render(kind: &str, version: u64, data_json: &str) -> String {
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
