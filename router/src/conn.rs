//! One client WebSocket after the upgrade: one task owns the socket.
//!
//! It joins the session's hub (subscribing before asking the owner for the state, so
//! nothing published in between is missed), attaches to the owner (which answers with
//! the events after the client's `?last_version=` or with the full state), then loops
//! over: client frames, hub events, answers of forwarded commands, heartbeats and
//! shutdown. The client's version `cv` only ever moves forward by one per event: older
//! events are skipped, and a jump is filled first (from the hub's buffer or the owner).
//!
//! **Writes are batched per wake-up.** Whatever is ready when the task wakes (the
//! frame that woke it, then every hub event and every answer already queued) is
//! encoded into the socket's write buffer, and the buffer is flushed once: one `write`
//! for a burst instead of one per frame. An applied command's ack is written right
//! behind the event that carries it (`crate::answers`). Events are shared bytes
//! ([`crate::hub::Ev`]): sending one to many clients copies nothing.
//!
//! **Live authorisation.** The socket is authorised by two tokens and a membership,
//! and stays so only while all three hold: when the earlier `exp` of the access and
//! the connection token (plus `auth.leeway_secs`) passes, the client gets
//! `connection_error` `token_expired` and close 4401; when the session's event stream
//! carries a `player_left` for this user (they left, or were removed, through any
//! router), the client gets that event, the answers still due, then `connection_error`
//! `not_member` and close 4403, and nothing of the session after it. The protocol has
//! no token refresh message: a client reconnects with fresh tokens (and
//! `last_version`).
//!
//! **Limits** (see `docs/security.md`, "Connection limits"):
//!
//! * the socket holds a [`Slot`] (its place under `router.max_connections` and the
//!   per-user and per-IP caps) for its whole life, and gives it back *before* the
//!   socket is closed, so a client that sees its socket close can connect again at
//!   once;
//! * **live connections.** With each ICD `heartbeat` (every
//!   `router.heartbeat_interval_ms`) the router sends a WebSocket ping. Two clocks
//!   run per socket: *silence* (nothing at all from the client: no message, no pong,
//!   no ping) for `router.client_silence_timeout_ms` (three missed heartbeats by
//!   default) means the client or its network is gone: close 4408
//!   (`silence_timeout`); *idleness* (no application message; pings and pongs do not
//!   count) for `router.ws_idle_timeout_ms` (5 min) means a client that holds a socket
//!   it does not use: close 4408 (`idle_timeout`). Either way the socket detaches, so
//!   its presence (the owner's connection table, `GET …/presence`, Redis
//!   `session:{id}:connections`) goes with it. While the client is heard from, the
//!   owner is told the connection is alive (`Touch`): at once on a client
//!   `heartbeat` (at most once per [`TOUCH_MIN_GAP`]), and once per heartbeat
//!   interval when the client answered pings, so the Redis entry and its 5-minute TTL
//!   follow the client's heartbeats as the ICD says;
//! * **slow consumers:** a socket's outbound backlog is the session's events it has not
//!   been given yet, kept once in the hub's buffer (no per-socket copy). While a write
//!   blocks (the client does not read, its TCP window is full), the connection watches
//!   the hub's newest version; a client that falls more than
//!   `router.max_outbound_queue` events behind, or whose write stays blocked for
//!   `router.ws_idle_timeout_ms`, is closed with 4008 (`slow_consumer`, close frame
//!   when it still fits). The hub's broadcast never waits for anyone, so the other
//!   clients of the session are not slowed.

use crate::answers::{EventAck, Owed};
use crate::api::caller;
use crate::hub::{Ev, Hub};
use crate::limits::{LocalWindow, SocketSlot};
use crate::server::ConnPermit;
use crate::ws::Socket;
use crate::RouterCtx;
use futures::{SinkExt, StreamExt};
use gs_shared::auth::Claims;
use gs_shared::protocol::{self, close_codes, codes, ClientMessage, SessionStatus, WireError};
use gs_shared::rpc::{Caller, ReplyBody, RequestBody, Resume};
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// How long a connection waits for the answers of its commands still in flight when
/// the session ends, before closing.
const FINAL_ANSWERS_WAIT: Duration = Duration::from_secs(2);

/// How long a connection's detach may take (best effort, after close).
const DETACH_DEADLINE: Duration = Duration::from_secs(2);
/// How long telling the owner a connection is alive may take (best effort).
const TOUCH_DEADLINE: Duration = Duration::from_secs(2);
/// How long attaching a connection to its session's new owner may take.
const REATTACH_DEADLINE: Duration = Duration::from_secs(2);
/// The least time between a ring change and a connection's attach to the new owner.
const REATTACH_AFTER: Duration = Duration::from_millis(250);
/// Client heartbeats refresh the connection's presence at most this often.
pub const TOUCH_MIN_GAP: Duration = Duration::from_secs(1);
/// Rounds of one catch-up (each answer holds at most half a MiB of events).
const CATCH_UP_ROUNDS: usize = 16;

/// Close code of a client idle (no message) or silent (nothing at all) too long.
pub const CLOSE_IDLE: u16 = close_codes::TIMEOUT;
/// Close code of a slow consumer.
pub const CLOSE_SLOW_CONSUMER: u16 = close_codes::SLOW_CONSUMER;

/// How long the router tries to send the `connection_error` and close frame of a
/// connection it ends itself (a client that does not read may never take them).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What an open socket holds for its whole life: its place under
/// `router.max_connections` and under the per-user and per-IP caps.
pub struct Slot {
    _permit: Option<ConnPermit>,
    _place: SocketSlot,
}

impl Slot {
    pub fn new(permit: Option<ConnPermit>, place: SocketSlot) -> Slot {
        Slot {
            _permit: permit,
            _place: place,
        }
    }
}

/// Decrements the connection count when a connection task ends, however it ends.
struct ConnGuard(Arc<RouterCtx>);

impl ConnGuard {
    fn new(ctx: Arc<RouterCtx>) -> ConnGuard {
        let n = ctx.connections.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.cluster.set_load(n as u64);
        metrics::gauge!("gs_router_connections").set(n as f64);
        ConnGuard(ctx)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let n = self.0.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.cluster.set_load(n as u64);
        metrics::gauge!("gs_router_connections").set(n as f64);
    }
}

/// What a forwarded command's task sends back to the connection.
type Outbound = String;

/// A forwarded message's answer from its task: `serial` from [`Owed::forwarded`].
struct Answer {
    serial: u64,
    text: Outbound,
}

#[derive(Debug)]
pub struct Closed;

/// A close frame with `code` and `reason`.
pub(crate) fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}

/// Why the router ends a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    SlowConsumer,
}

/// What bounds a blocked write.
#[derive(Debug, Clone, Copy)]
struct WriteBound {
    /// The client's version, and how far the hub may move past it (`None`: not
    /// watched, e.g. while the connection opens).
    backlog: Option<(u64, u64)>,
    /// How long one write may stay blocked.
    stall: Option<Duration>,
}

pub struct Conn {
    /// Given back first when the connection is dropped (fields drop in order), before
    /// the socket closes.
    slot: Option<Slot>,
    ctx: Arc<RouterCtx>,
    sid: Uuid,
    caller: Caller,
    hub: Arc<Hub>,
    /// The newest version this client has been sent.
    cv: u64,
    /// The client has been sent the session's final event (or found it ended).
    ended: bool,
    /// The connection is open and following the stream live (after [`open`]): a
    /// `player_left` for this user now ends it (one replayed on resume does not: the
    /// attach just proved the user is a member again), and its backlog is watched.
    live: bool,
    /// The client has been sent the `player_left` of its own user: nothing more of the
    /// session is sent, and the connection closes (4403).
    removed: bool,
    ws: Socket,
    /// Frames are in the write buffer, not yet flushed.
    unflushed: bool,
    /// Events buffered since the last flush (counted once per flush).
    sent: u64,
    /// The hub's newest version (watched while a write blocks).
    newest: watch::Receiver<u64>,
    /// `router.max_outbound_queue`.
    max_behind: u64,
    /// `router.ws_idle_timeout_ms`: also the longest a write may block.
    idle: Option<Duration>,
    /// When the client last sent a frame (any: message, ping, pong, close): the
    /// silence clock.
    last_heard: tokio::time::Instant,
    /// When the client last sent a message (text or binary): the idle clock.
    last_message: tokio::time::Instant,
    /// When the owner was last told the connection is alive.
    last_touch: tokio::time::Instant,
    /// The connection's id at the owner (its `session:{id}:connections` field).
    conn_id: Uuid,
    /// The session's owner on this router's ring when the connection was last attached:
    /// after a ring change that moves the session (a handoff, a failover), the new
    /// owner has never heard of the connection, so it is attached there again.
    owner: Option<String>,
    /// The attach to a new owner under way (the detach waits for it).
    reattach: Option<tokio::task::JoinHandle<()>>,
    /// Set when the router ends the connection itself.
    stop: Option<Stop>,
    /// The session's DM (or an admin acting as one): its combat actions, mostly its
    /// monsters', have their own budget.
    dm: bool,
    /// The forwarded messages not yet answered.
    owed: Owed,
}

/// Runs `op` (a write to the socket); a write that blocks is bounded by `bound`.
async fn bounded<F>(
    op: F,
    newest: &mut watch::Receiver<u64>,
    bound: WriteBound,
) -> Result<(), Option<Stop>>
where
    F: Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
{
    tokio::pin!(op);
    // Most writes complete at once: no timer, no watch.
    if let Poll::Ready(r) = futures::poll!(op.as_mut()) {
        return r.map_err(|_| None);
    }
    let behind = async {
        match bound.backlog {
            Some((cv, max)) => loop {
                if newest.borrow_and_update().saturating_sub(cv) > max {
                    return;
                }
                if newest.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
            None => std::future::pending().await,
        }
    };
    let stalled = async {
        match bound.stall {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = op => r.map_err(|_| None),
        _ = behind => Err(Some(Stop::SlowConsumer)),
        _ = stalled => Err(Some(Stop::SlowConsumer)),
    }
}

impl Conn {
    /// Puts a frame in the write buffer (written by [`Conn::flush`], or earlier when
    /// the buffer is full).
    async fn feed(&mut self, msg: Message) -> Result<(), Closed> {
        self.unflushed = true;
        let bound = self.write_bound();
        let r = bounded(self.ws.feed(msg), &mut self.newest, bound).await;
        self.written(r)
    }

    fn write_bound(&self) -> WriteBound {
        WriteBound {
            backlog: self.live.then_some((self.cv, self.max_behind)),
            stall: self.idle,
        }
    }

    fn written(&mut self, r: Result<(), Option<Stop>>) -> Result<(), Closed> {
        r.map_err(|stop| {
            self.stop = self.stop.or(stop);
            Closed
        })
    }

    /// Closes a slow consumer when the router holds more of the session's events for
    /// it than `router.max_outbound_queue` (it lagged while its writes blocked).
    fn check_backlog(&mut self, newest: u64) -> Result<(), Closed> {
        if self.live && newest.saturating_sub(self.cv) > self.max_behind {
            self.stop = Some(Stop::SlowConsumer);
            return Err(Closed);
        }
        Ok(())
    }

    /// Gives the socket's places back (before it is closed).
    fn release(&mut self) {
        self.slot = None;
    }

    /// After a ring change: if the session has a new owner, attaches the connection
    /// there in the background (its presence and Redis entry follow the session; a
    /// new owner after a failover is activated at once), within [`REATTACH_DEADLINE`].
    /// The connection's detach waits for it, so it cannot be overtaken.
    fn follow_owner(&mut self) {
        let owner = self.ctx.cluster.owner(&self.sid);
        if owner.is_none() || owner == self.owner {
            return;
        }
        self.owner = owner;
        metrics::counter!("gs_router_reattached_total").increment(1);
        let body = RequestBody::Reattach {
            conn_id: self.conn_id,
            router_id: self.ctx.id.clone(),
        };
        let (ctx, sid, caller) = (self.ctx.clone(), self.sid, self.caller);
        let before = self.reattach.take();
        // After the move itself, spread over a second: the handoff's activations and
        // the commands waiting for them come first.
        let spread = REATTACH_AFTER + Duration::from_millis((self.conn_id.as_u128() % 1000) as u64);
        self.reattach = Some(self.ctx.tasks.spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            tokio::time::sleep(spread).await;
            let deadline = Instant::now() + REATTACH_DEADLINE;
            if let Err(e) = ctx.forwarder.request_until(sid, caller, body, deadline).await {
                tracing::debug!(session = %sid, code = %e.code, "connection not attached to the new owner");
            }
        }));
    }

    /// Tells the owner the connection is alive (in the background): it refreshes the
    /// connection's Redis entry and the hash's TTL.
    fn touch(&mut self) {
        self.last_touch = tokio::time::Instant::now();
        let (ctx, sid, caller, conn_id) = (self.ctx.clone(), self.sid, self.caller, self.conn_id);
        metrics::counter!("gs_router_presence_touches_total").increment(1);
        tokio::spawn(async move {
            let _ = ctx
                .forwarder
                .request_until(
                    sid,
                    caller,
                    RequestBody::Touch { conn_id },
                    Instant::now() + TOUCH_DEADLINE,
                )
                .await;
        });
    }

    /// Ends the connection from the router's side: gives its places back, then sends
    /// `connection_error` and a close frame if the client takes them within
    /// [`CLOSE_GRACE`].
    async fn close_with(&mut self, close_code: u16, code: &str, message: String) {
        self.release();
        self.live = false;
        self.idle = None;
        metrics::counter!("gs_router_ws_closed_by_router_total", "code" => code.to_string())
            .increment(1);
        let err = WireError::new(code, message);
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            self.feed_text(protocol::connection_error(&err)).await?;
            self.send_now(close(close_code, code)).await
        })
        .await;
    }

    /// Buffers a forwarded command's answer, unless its event already carried it (an
    /// empty one is an `ack` an ICD client, which sends no ids, does not get).
    async fn feed_answer(&mut self, out: Answer) -> Result<(), Closed> {
        if !self.owed.take_answer(out.serial) || out.text.is_empty() {
            return Ok(());
        }
        self.feed_text(out.text).await
    }

    async fn feed_text(&mut self, text: String) -> Result<(), Closed> {
        self.feed(Message::text(text)).await
    }

    /// Writes what is buffered.
    async fn flush(&mut self) -> Result<(), Closed> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        if self.sent > 0 {
            metrics::counter!("gs_router_events_sent_total").increment(self.sent);
            self.sent = 0;
        }
        let bound = self.write_bound();
        let r = bounded(self.ws.flush(), &mut self.newest, bound).await;
        self.written(r)
    }

    /// Sends one frame now.
    async fn send_now(&mut self, msg: Message) -> Result<(), Closed> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Buffers the next event of the stream (`ev.version` must be `cv + 1`).
    async fn send_event(&mut self, ev: &Ev) -> Result<(), Closed> {
        if self.removed {
            return Ok(());
        }
        self.feed(Message::Text(ev.json.clone())).await?;
        if let Some(command) = ev.ack {
            if self.owed.event_acks(command) == EventAck::Write {
                self.feed_text(protocol::ack(command, ev.version)).await?;
            }
        }
        self.cv = ev.version;
        self.ended |= ev.is_final;
        self.removed |= self.live && ev.left == Some(self.caller.user_id);
        self.sent += 1;
        Ok(())
    }

    /// Buffers `ev` after anything between the client's version and it.
    async fn deliver(&mut self, ev: Ev) -> Result<(), Closed> {
        if ev.version <= self.cv || self.removed {
            return Ok(());
        }
        if ev.version > self.cv + 1 {
            self.check_backlog(ev.version)?;
            self.catch_up(ev.version - 1).await?;
            if ev.version != self.cv + 1 {
                // Could not fill the gap now; the next event (or a retry) will.
                return Ok(());
            }
        }
        self.send_event(&ev).await
    }

    /// Brings the client up to `up_to` from the hub's buffer or the owner (whose
    /// answers are bounded in size: asked again while they make progress).
    async fn catch_up(&mut self, up_to: u64) -> Result<(), Closed> {
        for _ in 0..CATCH_UP_ROUNDS {
            let before = self.cv;
            self.catch_up_once(up_to).await?;
            if self.cv >= up_to || self.cv == before {
                break;
            }
        }
        Ok(())
    }

    async fn catch_up_once(&mut self, up_to: u64) -> Result<(), Closed> {
        let events = match self.hub.recent_range(self.cv, up_to) {
            Some(evs) => evs,
            None => {
                metrics::counter!("gs_router_client_catchups_total").increment(1);
                let r = self
                    .ctx
                    .forwarder
                    .request(
                        self.sid,
                        self.caller,
                        RequestBody::EventsSince {
                            after: self.cv,
                            limit: up_to - self.cv,
                        },
                    )
                    .await;
                match r {
                    Ok(ReplyBody::Events { events, .. }) => {
                        events.into_iter().map(Ev::from_raw).collect()
                    }
                    _ => vec![],
                }
            }
        };
        for ev in events {
            if ev.version == self.cv + 1 && ev.version <= up_to {
                self.send_event(&ev).await?;
            }
        }
        Ok(())
    }

    /// Handles one hub delivery (an event, or the news that this client lagged).
    async fn on_event(
        &mut self,
        ev: Result<Ev, broadcast::error::RecvError>,
    ) -> Result<(), Closed> {
        match ev {
            Ok(ev) => self.deliver(ev).await,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                metrics::counter!("gs_router_client_lagged_total").increment(n);
                match self.hub.last_version() {
                    Some(last) => {
                        self.check_backlog(last)?;
                        self.catch_up(last).await
                    }
                    None => Ok(()),
                }
            }
            Err(broadcast::error::RecvError::Closed) => Err(Closed),
        }
    }

    /// The session ended: every message still gets its answer (the one that ended it
    /// among them, bounded by [`FINAL_ANSWERS_WAIT`]), then a normal close.
    async fn close_ended(&mut self, io: &mut ConnIo) {
        self.answer_in_flight(io).await;
        self.release();
        let _ = self.send_now(close(1000, "session ended")).await;
    }

    /// The user is no longer a member: the answers still due (their `leave` among
    /// them), then `connection_error` `not_member` and close 4403.
    async fn close_removed(&mut self, io: &mut ConnIo) {
        metrics::counter!("gs_router_ws_revoked_total", "code" => codes::NOT_MEMBER).increment(1);
        self.answer_in_flight(io).await;
        self.close_with(
            close_codes::NOT_MEMBER,
            codes::NOT_MEMBER,
            "you are no longer a member of this session".into(),
        )
        .await;
    }

    /// The access or the connection token expired: `connection_error`
    /// `token_expired` and close 4401, at once (answers already here go first;
    /// commands still in flight are resent by the client after reconnecting, with the
    /// same ids).
    async fn close_expired(&mut self, io: &mut ConnIo) {
        metrics::counter!("gs_router_ws_revoked_total", "code" => codes::TOKEN_EXPIRED)
            .increment(1);
        while let Ok(out) = io.acks.try_recv() {
            let _ = self.feed_answer(out).await;
        }
        self.close_with(
            close_codes::TOKEN_EXPIRED,
            codes::TOKEN_EXPIRED,
            "the access or connection token expired; reconnect with fresh tokens".into(),
        )
        .await;
    }

    /// Buffers the answers of the commands still in flight, waiting for them at most
    /// [`FINAL_ANSWERS_WAIT`].
    async fn answer_in_flight(&mut self, io: &mut ConnIo) {
        let until = tokio::time::Instant::now() + FINAL_ANSWERS_WAIT;
        while io.inflight.available_permits() < io.max_inflight {
            match tokio::time::timeout_at(until, io.acks.recv()).await {
                Ok(Some(out)) => {
                    if self.feed_answer(out).await.is_err() {
                        return;
                    }
                }
                _ => break,
            }
        }
        while let Ok(out) = io.acks.try_recv() {
            let _ = self.feed_answer(out).await;
        }
    }
}

/// The connection's queues: answers of forwarded commands, and their bound.
struct ConnIo {
    acks: mpsc::Receiver<Answer>,
    ack_tx: mpsc::Sender<Answer>,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    window: LocalWindow,
}

/// What woke the connection.
enum Step {
    Shutdown,
    Answer(Answer),
    Event(Result<Ev, broadcast::error::RecvError>),
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Heartbeat,
    Expired,
    SilenceCheck,
    IdleCheck,
    Ring,
}

/// When a token expiring at `exp` (unix seconds) stops being accepted, as a timer
/// deadline: once `exp` plus the leeway has passed, i.e. at the next whole second (the
/// handshake compares whole seconds and still accepts it during second `exp + leeway`).
fn expiry_deadline(exp: u64, leeway_secs: u64) -> tokio::time::Instant {
    let at = std::time::UNIX_EPOCH
        + Duration::from_secs(exp.saturating_add(leeway_secs).saturating_add(1));
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    // Far-future expiries are capped (a timer wants a representable instant).
    tokio::time::Instant::now() + left.min(Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Serves one client socket until it closes, the session ends, its authorisation
/// ends (`expires`: the earlier `exp` of its tokens, unix seconds; or the user leaves)
/// or the router stops.
pub async fn run(
    ctx: Arc<RouterCtx>,
    ws: Socket,
    sid: Uuid,
    claims: Claims,
    last_version: Option<u64>,
    expires: u64,
    slot: Slot,
) {
    let _guard = ConnGuard::new(ctx.clone());
    let conn_id = Uuid::new_v4();
    let caller = caller(&claims);
    let Some((mut conn, mut events)) =
        open(&ctx, ws, sid, &claims, conn_id, last_version, slot).await
    else {
        return detach(ctx, sid, caller, conn_id);
    };
    if !conn.ended {
        let deadline = expiry_deadline(expires, ctx.auth.leeway_secs());
        serve(&mut conn, &mut events, deadline).await;
    }
    if conn.stop == Some(Stop::SlowConsumer) {
        metrics::counter!("gs_router_slow_consumers_total").increment(1);
        let max = conn.max_behind;
        conn.close_with(
            CLOSE_SLOW_CONSUMER,
            codes::SLOW_CONSUMER,
            format!(
                "the client does not read: more than {max} events behind, or a write blocked too long"
            ),
        )
        .await;
    }
    // The socket's places were given back first (see `Conn::slot`).
    let reattach = conn.reattach.take();
    drop(conn);
    detach_after(ctx, sid, caller, conn_id, reattach);
}

/// Joins the hub, attaches to the owner and brings the client up to date; `None`
/// when the connection could not be opened (the client has been told why).
async fn open(
    ctx: &Arc<RouterCtx>,
    mut ws: Socket,
    sid: Uuid,
    claims: &Claims,
    conn_id: Uuid,
    last_version: Option<u64>,
    slot: Slot,
) -> Option<(Conn, broadcast::Receiver<Ev>)> {
    let caller = caller(claims);
    let hub = match ctx.hubs.join(sid).await {
        Ok(h) => h,
        Err(e) => {
            drop(slot);
            let err = WireError::new(codes::SERVICE_UNAVAILABLE, format!("cannot subscribe: {e}"));
            refuse(&mut ws, &err).await;
            return None;
        }
    };
    let events = hub.subscribe();
    let (role, version, resume) = match attach(ctx, sid, caller, conn_id, last_version).await {
        Ok(attached) => attached,
        Err(err) => {
            drop(slot);
            // The owner may have registered the connection before the answer was lost:
            // undo it, or the session would count a client that is not there.
            detach(ctx.clone(), sid, caller, conn_id);
            refuse(&mut ws, &err).await;
            return None;
        }
    };
    let mut conn = Conn::new(ctx, ws, slot, sid, caller, conn_id, hub.clone(), &role);
    let established = json!({
        "type": "connection_established",
        "data": {
            "session_id": sid,
            "player_id": claims.sub,
            "connection_id": conn_id,
            "session_role": role,
            "version": version,
            "timestamp": protocol::timestamp_now(),
        }
    });
    conn.feed_text(established.to_string()).await.ok()?;
    resume_client(&mut conn, resume, last_version).await.ok()?;
    if conn.ended {
        // An ended session: the client has its final state; nothing more will come.
        conn.release();
        let _ = conn.feed(close(1000, "session ended")).await;
    }
    conn.flush().await.ok()?;
    hub.seed(conn.cv);
    conn.live = true;
    Some((conn, events))
}

/// Tells a client its connection cannot be opened: `connection_error`, then the close,
/// if the client takes them within [`CLOSE_GRACE`] (a client that does not read holds
/// the task no longer than that).
async fn refuse(ws: &mut Socket, err: &WireError) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        ws.feed(Message::text(protocol::connection_error(err)))
            .await?;
        ws.send(close(close_codes::for_error(err), &err.code)).await
    })
    .await;
}

/// Attaches the connection to the session's owner: the member's role, the session's
/// version, and what the client is missing.
async fn attach(
    ctx: &RouterCtx,
    sid: Uuid,
    caller: Caller,
    conn_id: Uuid,
    last_version: Option<u64>,
) -> Result<(String, u64, Resume), WireError> {
    let attach = ctx
        .forwarder
        .request(
            sid,
            caller,
            RequestBody::Attach {
                conn_id,
                router_id: ctx.id.clone(),
                last_version,
                replay_limit: ctx.cfg.router.replay_limit,
            },
        )
        .await?;
    match attach {
        ReplyBody::Attached {
            session_role,
            version,
            resume,
        } => Ok((session_role, version, resume)),
        _ => Err(WireError::new(
            codes::INTERNAL,
            "unexpected reply to attach",
        )),
    }
}

impl Conn {
    #[allow(clippy::too_many_arguments)] // the parts of an opened connection, each once
    fn new(
        ctx: &Arc<RouterCtx>,
        ws: Socket,
        slot: Slot,
        sid: Uuid,
        caller: Caller,
        conn_id: Uuid,
        hub: Arc<Hub>,
        role: &str,
    ) -> Conn {
        let idle = Some(ctx.cfg.router.ws_idle_timeout_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let now = tokio::time::Instant::now();
        Conn {
            slot: Some(slot),
            ctx: ctx.clone(),
            sid,
            caller,
            newest: hub.watch_newest(),
            hub,
            cv: 0,
            ended: false,
            live: false,
            removed: false,
            ws,
            unflushed: false,
            sent: 0,
            max_behind: ctx.cfg.router.max_outbound_queue.max(1),
            idle,
            last_heard: now,
            last_message: now,
            last_touch: now,
            conn_id,
            owner: ctx.cluster.owner(&sid),
            reattach: None,
            stop: None,
            dm: role == "dm",
            owed: Owed::default(),
        }
    }
}

/// Sends what the owner's attach answer says the client is missing.
async fn resume_client(
    conn: &mut Conn,
    resume: Resume,
    last_version: Option<u64>,
) -> Result<(), Closed> {
    match resume {
        Resume::Events { events } => {
            conn.cv = last_version.unwrap_or(0);
            for raw in events {
                if raw.version == conn.cv + 1 {
                    conn.send_event(&Ev::from_raw(raw)).await?;
                }
            }
            Ok(())
        }
        Resume::Full { view } => {
            conn.ended = view.status().is_some_and(SessionStatus::is_final);
            let msg = json!({"type": "sync_response", "id": null, "data": view});
            conn.cv = view.version;
            conn.feed_text(msg.to_string()).await
        }
    }
}

/// The connection's main loop; `expires`: when its tokens stop being valid.
async fn serve(
    conn: &mut Conn,
    events: &mut broadcast::Receiver<Ev>,
    expires: tokio::time::Instant,
) {
    let mut io = ConnIo::new(&conn.ctx);
    let mut shutdown = conn.ctx.shutdown.clone();
    let mut clocks = Clocks::start(conn, expires).await;
    let mut ring = conn.ctx.cluster.ring_changes();
    loop {
        let step = tokio::select! {
            biased;
            _ = shutdown.changed() => Step::Shutdown,
            _ = &mut clocks.expiry => Step::Expired,
            frame = conn.ws.next() => Step::Frame(frame),
            // Events before answers: an applied command's event carries its ack.
            ev = events.recv() => Step::Event(ev),
            Some(out) = io.acks.recv() => Step::Answer(out),
            _ = clocks.heartbeat.tick() => Step::Heartbeat,
            _ = &mut clocks.silence_check => Step::SilenceCheck,
            _ = &mut clocks.idle_check, if clocks.idle.is_some() => Step::IdleCheck,
            Ok(()) = ring.changed() => Step::Ring,
        };
        let r = match step {
            Step::Shutdown => {
                conn.release();
                let _ = conn.send_now(close(1001, "router shutting down")).await;
                return;
            }
            Step::Answer(out) => conn.feed_answer(out).await,
            Step::Frame(frame) => on_frame(conn, frame, &mut io).await,
            Step::Event(ev) => conn.on_event(ev).await,
            Step::Expired => {
                conn.close_expired(&mut io).await;
                return;
            }
            Step::Heartbeat => conn.heartbeat().await,
            Step::Ring => {
                conn.follow_owner();
                Ok(())
            }
            Step::SilenceCheck => {
                let Some(due) = conn.check_silence(clocks.silence).await else {
                    return;
                };
                clocks.silence_check.as_mut().reset(due);
                Ok(())
            }
            Step::IdleCheck => {
                let idle = clocks.idle.expect("checked only with an idle timeout");
                let Some(due) = conn.check_idle(idle).await else {
                    return;
                };
                clocks.idle_check.as_mut().reset(due);
                Ok(())
            }
        };
        if r.is_err() || !after_step(conn, events, &mut io).await {
            return;
        }
    }
}

impl ConnIo {
    fn new(ctx: &RouterCtx) -> ConnIo {
        let max_inflight = ctx.cfg.router.max_inflight_per_connection.max(1);
        let (ack_tx, acks) = mpsc::channel::<Answer>(max_inflight * 2);
        ConnIo {
            acks,
            ack_tx,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            window: LocalWindow::new(
                ctx.cfg.limits.ws_messages_per_min_per_conn,
                Duration::from_secs(60),
                Instant::now(),
            ),
        }
    }
}

/// A connection's clocks: heartbeats, the tokens' expiry, and the idle and silence
/// checks.
struct Clocks {
    heartbeat: tokio::time::Interval,
    expiry: Pin<Box<tokio::time::Sleep>>,
    idle: Option<Duration>,
    /// Checks, at `last_message + idle`, whether the client sent a message since.
    idle_check: Pin<Box<tokio::time::Sleep>>,
    silence: Duration,
    /// Checks, at `last_heard + silence`, whether anything came from the client since.
    silence_check: Pin<Box<tokio::time::Sleep>>,
}

impl Clocks {
    /// Starts the clocks; the client counts as heard from now.
    async fn start(conn: &mut Conn, expires: tokio::time::Instant) -> Clocks {
        let mut heartbeat = tokio::time::interval(conn.ctx.cfg.router.heartbeat_interval());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let idle = conn.idle;
        let silence = conn.ctx.cfg.router.client_silence_timeout();
        let clocks = Clocks {
            heartbeat,
            expiry: Box::pin(tokio::time::sleep_until(expires)),
            idle,
            idle_check: Box::pin(tokio::time::sleep(
                idle.unwrap_or(Duration::from_secs(3600)),
            )),
            silence,
            silence_check: Box::pin(tokio::time::sleep(silence)),
        };
        let now = tokio::time::Instant::now();
        conn.last_heard = now;
        conn.last_message = now;
        // The attach wrote the entry just now; a first client heartbeat refreshes it
        // whenever it comes.
        conn.last_touch = now.checked_sub(TOUCH_MIN_GAP).unwrap_or(now);
        clocks
    }
}

impl Conn {
    /// A heartbeat tick: the ICD `heartbeat` and a ping; and, if the client was heard
    /// from since the last touch (a pong to the last ping, or anything else), the
    /// owner refreshes the connection's presence.
    async fn heartbeat(&mut self) -> Result<(), Closed> {
        if self.last_heard > self.last_touch {
            self.touch();
        }
        self.feed_text(protocol::heartbeat()).await?;
        // A ping too: a live WebSocket stack answers it by itself (not silent).
        self.feed(Message::Ping(Default::default())).await
    }

    /// The silence check: the time of the next one, or `None` when nothing came from
    /// the client for `silence` (then the socket has been closed).
    async fn check_silence(&mut self, silence: Duration) -> Option<tokio::time::Instant> {
        let due = self.last_heard + silence;
        if tokio::time::Instant::now() < due {
            return Some(due);
        }
        metrics::counter!("gs_router_silent_clients_total").increment(1);
        self.close_with(
            CLOSE_IDLE,
            codes::SILENCE_TIMEOUT,
            format!(
                "nothing received from the client (not even a pong) for {} s",
                silence.as_secs_f64()
            ),
        )
        .await;
        None
    }

    /// The idle check: the time of the next one, or `None` when the client sent no
    /// message for `idle` (then the socket has been closed).
    async fn check_idle(&mut self, idle: Duration) -> Option<tokio::time::Instant> {
        let due = self.last_message + idle;
        if tokio::time::Instant::now() < due {
            return Some(due);
        }
        self.close_with(
            CLOSE_IDLE,
            codes::IDLE_TIMEOUT,
            format!(
                "no message received from the client for {} s (send heartbeats)",
                idle.as_secs_f64()
            ),
        )
        .await;
        None
    }
}

/// After a step: takes whatever else is ready, closes the socket of a removed member
/// or an ended session, and flushes the writes. `false`: the connection is over.
async fn after_step(
    conn: &mut Conn,
    events: &mut broadcast::Receiver<Ev>,
    io: &mut ConnIo,
) -> bool {
    if drain_ready(conn, events, io).await.is_err() {
        return false;
    }
    if conn.removed {
        conn.close_removed(io).await;
        return false;
    }
    if conn.ended {
        conn.close_ended(io).await;
        return false;
    }
    conn.flush().await.is_ok()
}

/// Buffers every hub event and then every answer already waiting, so one flush writes
/// them all.
async fn drain_ready(
    conn: &mut Conn,
    events: &mut broadcast::Receiver<Ev>,
    io: &mut ConnIo,
) -> Result<(), Closed> {
    // Events first: an applied command's event carries its ack (the task's copy,
    // already here or not, is then dropped).
    loop {
        match events.try_recv() {
            Ok(ev) => conn.deliver(ev).await?,
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                conn.on_event(Err(broadcast::error::RecvError::Lagged(n)))
                    .await?
            }
            Err(broadcast::error::TryRecvError::Closed) => return Err(Closed),
        }
        if conn.ended || conn.removed {
            break;
        }
    }
    while let Ok(out) = io.acks.try_recv() {
        conn.feed_answer(out).await?;
    }
    Ok(())
}

/// Handles one frame from the client.
async fn on_frame(
    conn: &mut Conn,
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    io: &mut ConnIo,
) -> Result<(), Closed> {
    let msg = match frame {
        Some(Ok(m)) => {
            let now = tokio::time::Instant::now();
            conn.last_heard = now;
            if matches!(m, Message::Text(_) | Message::Binary(_)) {
                conn.last_message = now;
            }
            m
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "websocket read error");
            return Err(Closed);
        }
        None => return Err(Closed),
    };
    let text = match msg {
        Message::Text(t) => t,
        Message::Close(_) => return Err(Closed),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        Message::Binary(_) => {
            let e = WireError::new(
                codes::INVALID_MESSAGE,
                "binary frames are not supported; send JSON text",
            );
            return conn.feed_text(protocol::error(None, &e)).await;
        }
    };
    let ctx = conn.ctx.clone();
    let m = match protocol::parse_client_message(
        text.as_str(),
        ctx.cfg.router.max_message_bytes,
        ctx.cfg.document.max_json_depth,
    ) {
        Ok(m) => m,
        Err(r) => {
            metrics::counter!("gs_router_ws_rejected_total", "code" => r.error.code.clone())
                .increment(1);
            return conn.feed_text(protocol::error(r.id, &r.error)).await;
        }
    };
    if let Err(wait) = io.window.hit(Instant::now()) {
        let e = WireError::new(codes::RATE_LIMITED, "too many messages on this connection")
            .with_details(json!({"retry_after_secs": wait.as_secs().max(1),
                "limit": ctx.cfg.limits.ws_messages_per_min_per_conn, "window_secs": 60}));
        return conn.feed_text(protocol::error(Some(m.id), &e)).await;
    }
    handle_message(conn, m, io).await
}

/// Handles one parsed client message.
async fn handle_message(conn: &mut Conn, m: ClientMessage, io: &ConnIo) -> Result<(), Closed> {
    match m.kind.as_str() {
        // A client heartbeat refreshes the connection's presence (Redis
        // `session:{id}:connections` and its TTL); an ICD one (no id) needs no answer.
        protocol::TYPE_HEARTBEAT => {
            if conn.last_touch.elapsed() >= TOUCH_MIN_GAP {
                conn.touch();
            }
            if m.anonymous {
                return Ok(());
            }
            let v = conn.cv;
            conn.feed_text(protocol::ack(m.id, v)).await
        }
        protocol::TYPE_SYNC_REQUEST => sync(conn, m).await,
        _ => forward(conn, m, io).await,
    }
}

/// `sync_request`: the state (or the asked paths) from the owner.
async fn sync(conn: &mut Conn, m: ClientMessage) -> Result<(), Closed> {
    #[derive(serde::Deserialize)]
    struct SyncData {
        #[serde(default)]
        paths: Option<Vec<String>>,
    }
    let paths = match m.data.parse::<SyncData>() {
        Ok(d) => d.paths,
        Err(_) => {
            let e = WireError::new(
                codes::INVALID_PAYLOAD,
                "`paths` must be a list of JSON Pointers",
            );
            return conn.feed_text(protocol::error(Some(m.id), &e)).await;
        }
    };
    let partial = paths.as_ref().is_some_and(|p| !p.is_empty());
    let r = conn
        .ctx
        .forwarder
        .request(conn.sid, conn.caller, RequestBody::Sync { paths })
        .await;
    match r {
        Ok(ReplyBody::State { view }) => {
            let version = view.version;
            // An ICD client (no envelope id) gets the ICD's answer alone: no made-up
            // id, no `ack`.
            let id = (!m.anonymous).then_some(m.id);
            let msg = json!({"type": "sync_response", "id": id, "data": view});
            conn.feed_text(msg.to_string()).await?;
            if !partial && version > conn.cv {
                conn.cv = version;
            }
            if m.anonymous {
                return Ok(());
            }
            conn.feed_text(protocol::ack(m.id, version)).await
        }
        Ok(_) => {
            let e = WireError::new(codes::INTERNAL, "unexpected reply to sync");
            conn.feed_text(protocol::error(Some(m.id), &e)).await
        }
        Err(e) => conn.feed_text(protocol::error(Some(m.id), &e)).await,
    }
}

/// A command for the owner: forwarded in its own task (the connection goes on
/// reading), its answer comes back through `io.acks`.
async fn forward(conn: &mut Conn, m: ClientMessage, io: &ConnIo) -> Result<(), Closed> {
    // The ICD's "combat actions per minute per player", counted across routers.
    if protocol::is_combat_type(&m.kind) {
        let who = format!("{}:{}", conn.sid, conn.caller.user_id);
        let limits = &conn.ctx.cfg.limits;
        let (scope, limit) = if conn.dm {
            ("combat_dm", limits.combat_actions_per_min_per_dm)
        } else {
            ("combat", limits.combat_actions_per_min_per_player)
        };
        if let Err(e) = conn
            .ctx
            .limiter
            .check(scope, &who, limit, Duration::from_secs(60))
            .await
        {
            return conn.feed_text(protocol::error(Some(m.id), &e)).await;
        }
    }
    let Ok(permit) = io.inflight.clone().try_acquire_owned() else {
        let e = WireError::new(
            codes::TOO_MANY_IN_FLIGHT,
            "too many commands waiting for their ack on this connection",
        );
        return conn.feed_text(protocol::error(Some(m.id), &e)).await;
    };
    let forwarder = conn.ctx.forwarder.clone();
    let (sid, caller, acks) = (conn.sid, conn.caller, io.ack_tx.clone());
    // This connection's hub follows the session: the ack comes with the event.
    let (waiting, by_event) = conn.ctx.hubs.acks.wait(m.id);
    let serial = conn.owed.forwarded(m.id, m.anonymous);
    tokio::spawn(async move {
        let _permit = permit;
        let request = forwarder.request(
            sid,
            caller,
            RequestBody::Command {
                command_id: m.id,
                kind: m.kind,
                data: m.data,
                ack_by_event: true,
            },
        );
        let r = tokio::select! {
            r = request => r,
            Ok(version) = by_event => Ok(ReplyBody::Ack { version, duplicate: false }),
        };
        drop(waiting);
        let out = match r {
            // A sender without ids (the ICD's) sees its change as the event instead.
            Ok(ReplyBody::Ack { .. }) if m.anonymous => Outbound::new(),
            Ok(ReplyBody::Ack { version, .. }) => protocol::ack(m.id, version),
            Ok(_) => protocol::error(
                Some(m.id),
                &WireError::new(codes::INTERNAL, "unexpected reply"),
            ),
            Err(e) => protocol::error(Some(m.id), &e),
        };
        let _ = acks.send(Answer { serial, text: out }).await;
    });
    Ok(())
}

/// Tells the owner the connection is gone (best effort, in the background).
fn detach(ctx: Arc<RouterCtx>, sid: Uuid, caller: Caller, conn_id: Uuid) {
    detach_after(ctx, sid, caller, conn_id, None)
}

/// [`detach`], once the attach to a new owner (`reattach`) is done.
fn detach_after(
    ctx: Arc<RouterCtx>,
    sid: Uuid,
    caller: Caller,
    conn_id: Uuid,
    reattach: Option<tokio::task::JoinHandle<()>>,
) {
    // Tracked: a shutting-down router tells the owners its sockets are gone first.
    let tasks = ctx.tasks.clone();
    tasks.spawn(async move {
        if let Some(r) = reattach {
            let _ = r.await;
        }
        let _ = ctx
            .forwarder
            .request_until(
                sid,
                caller,
                RequestBody::Detach { conn_id },
                Instant::now() + DETACH_DEADLINE,
            )
            .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use gs_shared::rpc::RawEvent;

    #[test]
    fn close_frames_carry_code_and_reason() {
        match close(1008, "not_member") {
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 1008);
                assert_eq!(f.reason.as_str(), "not_member");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn raw_events_keep_their_bytes() {
        let ev = Ev::from_raw(RawEvent {
            version: 3,
            json: r#"{"type":"x","version":3,"data":{}}"#.into(),
        });
        assert_eq!(ev.version, 3);
        assert_eq!(ev.json.as_str(), r#"{"type":"x","version":3,"data":{}}"#);
        assert!(!ev.is_final);
    }
}
