//! The WebSocket endpoint, `GET /api/v2/sessions/{id}/ws`.
//!
//! Before the upgrade: the access token (`Authorization` header or `?token=`) and the
//! session token (`X-Session-Token` header or `?session_token=`, bound to this user
//! and this session) are checked, and the per-IP connection limit applied; failures
//! are plain HTTP errors (401/403/429) and no socket is opened.
//!
//! After it, one task owns the socket. It joins the session's hub (subscribing before
//! asking the owner for the state, so nothing published in between is missed),
//! attaches to the owner (which answers with the events after the client's
//! `?last_version=` or with the full state), then loops over: client frames,
//! acknowledgements of forwarded commands, hub events, heartbeats and shutdown.
//! The client's version `cv` only ever moves forward by one per event: older events
//! are skipped, and a jump is filled first (from the hub's buffer or the owner).

use crate::api::{self, authenticate, caller, error_reply, parse_session_id, token_of};
use crate::hub::{Ev, Hub};
use crate::limits::LocalWindow;
use crate::server::PeerAddr;
use crate::RouterCtx;
use futures::{SinkExt, StreamExt};
use gs_shared::auth::Claims;
use gs_shared::protocol::{self, codes, ClientMessage, WireError};
use gs_shared::rpc::{Caller, RawEvent, ReplyBody, RequestBody, Resume};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, Semaphore};
use uuid::Uuid;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

/// How long a connection waits for the answers of its commands still in flight when
/// the session ends, before closing.
const FINAL_ANSWERS_WAIT: Duration = Duration::from_secs(2);

/// How long a connection's detach may take (best effort, after close).
const DETACH_DEADLINE: Duration = Duration::from_secs(2);

pub fn route(ctx: Arc<RouterCtx>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "v2" / "sessions" / String / "ws")
        .and(warp::get())
        .and(warp::ws())
        .and(warp::any().map(move || ctx.clone()))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("x-session-token"))
        .and(warp::query::<HashMap<String, String>>())
        .and(api::peer())
        .then(
            |id: String,
             ws: Ws,
             ctx: Arc<RouterCtx>,
             auth: Option<String>,
             session_token: Option<String>,
             query: HashMap<String, String>,
             peer: Option<PeerAddr>| async move {
                match accept(&ctx, &id, &auth, session_token, &query, peer).await {
                    Ok((sid, claims, last_version)) => {
                        let max = ctx.cfg.router.max_frame_bytes;
                        ws.max_message_size(max)
                            .max_frame_size(max)
                            .on_upgrade(move |socket| {
                                connection(ctx, socket, sid, claims, last_version)
                            })
                            .into_response()
                    }
                    Err(e) => {
                        metrics::counter!("gs_router_ws_refused_total", "code" => e.code.clone())
                            .increment(1);
                        error_reply(&e)
                    }
                }
            },
        )
}

/// Checks everything that can be checked before the upgrade.
async fn accept(
    ctx: &RouterCtx,
    id: &str,
    auth: &Option<String>,
    session_token: Option<String>,
    query: &HashMap<String, String>,
    peer: Option<PeerAddr>,
) -> Result<(Uuid, Claims, Option<u64>), WireError> {
    let claims = authenticate(ctx, token_of(auth, query))?;
    let sid = parse_session_id(id)?;
    let st = session_token.or_else(|| query.get("session_token").cloned());
    ctx.auth
        .verify_session(st.as_deref(), claims.sub, sid)
        .map_err(|e| WireError::new(e.code(), e.to_string()))?;
    let last_version = match query.get("last_version") {
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            WireError::new(
                codes::BAD_REQUEST,
                "`last_version` must be a version number",
            )
        })?),
        None => None,
    };
    let ip = peer
        .map(|p| p.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    ctx.limiter
        .check(
            "connect",
            &ip,
            ctx.cfg.limits.ws_connects_per_min_per_ip,
            Duration::from_secs(60),
        )
        .await?;
    Ok((sid, claims, last_version))
}

/// Decrements the connection count when a connection task ends, however it ends.
struct ConnGuard(Arc<RouterCtx>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let n = self.0.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.cluster.set_load(n as u64);
        metrics::gauge!("gs_router_connections").set(n as f64);
    }
}

/// What a forwarded command's task sends back to the connection.
type Outbound = String;

struct Conn {
    ctx: Arc<RouterCtx>,
    sid: Uuid,
    caller: Caller,
    hub: Arc<Hub>,
    /// The newest version this client has been sent.
    cv: u64,
    /// The client has been sent the session's final event (or found it ended).
    ended: bool,
    sink: futures::stream::SplitSink<WebSocket, Message>,
}

#[derive(Debug)]
struct Closed;

impl Conn {
    async fn send(&mut self, text: impl Into<String>) -> Result<(), Closed> {
        self.sink
            .send(Message::text(text.into()))
            .await
            .map_err(|_| Closed)
    }

    /// Sends the next event of the stream (`ev.version` must be `cv + 1`).
    async fn send_event(&mut self, ev: &Ev) -> Result<(), Closed> {
        self.send(ev.json.to_string()).await?;
        self.cv = ev.version;
        self.ended |= ev.is_final;
        metrics::counter!("gs_router_events_sent_total").increment(1);
        Ok(())
    }

    /// Sends `ev` after anything between the client's version and it.
    async fn deliver(&mut self, ev: Ev) -> Result<(), Closed> {
        if ev.version <= self.cv {
            return Ok(());
        }
        if ev.version > self.cv + 1 {
            self.catch_up(ev.version - 1).await?;
            if ev.version != self.cv + 1 {
                // Could not fill the gap now; the next event (or a retry) will.
                return Ok(());
            }
        }
        self.send_event(&ev).await
    }

    /// Brings the client up to `up_to` from the hub's buffer or the owner.
    async fn catch_up(&mut self, up_to: u64) -> Result<(), Closed> {
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
                    Ok(ReplyBody::Events { events, .. }) => events
                        .into_iter()
                        .map(|RawEvent { version, json }| Ev::new(version, json))
                        .collect(),
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

    /// The session ended: every message still gets its answer (the one that ended it
    /// among them, bounded by [`FINAL_ANSWERS_WAIT`]), then a normal close.
    async fn close_ended(
        &mut self,
        acks: &mut mpsc::Receiver<Outbound>,
        inflight: &Semaphore,
        max: usize,
    ) {
        let until = tokio::time::Instant::now() + FINAL_ANSWERS_WAIT;
        while inflight.available_permits() < max {
            match tokio::time::timeout_at(until, acks.recv()).await {
                Ok(Some(out)) => {
                    if self.send(out).await.is_err() {
                        return;
                    }
                }
                _ => break,
            }
        }
        while let Ok(out) = acks.try_recv() {
            let _ = self.send(out).await;
        }
        let _ = self
            .sink
            .send(Message::close_with(1000u16, "session ended"))
            .await;
    }
}

async fn connection(
    ctx: Arc<RouterCtx>,
    socket: WebSocket,
    sid: Uuid,
    claims: Claims,
    last_version: Option<u64>,
) {
    let n = ctx.connections.fetch_add(1, Ordering::Relaxed) + 1;
    ctx.cluster.set_load(n as u64);
    metrics::gauge!("gs_router_connections").set(n as f64);
    let _guard = ConnGuard(ctx.clone());
    let conn_id = Uuid::new_v4();
    let (mut sink, mut stream) = socket.split();
    let caller = caller(&claims);

    let hub = match ctx.hubs.join(sid).await {
        Ok(h) => h,
        Err(e) => {
            let err = WireError::new(codes::SERVICE_UNAVAILABLE, format!("cannot subscribe: {e}"));
            let _ = sink
                .send(Message::text(protocol::connection_error(&err)))
                .await;
            let _ = sink
                .send(Message::close_with(1011u16, "service unavailable"))
                .await;
            return;
        }
    };
    let mut events = hub.subscribe();
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
        .await;
    let (role, version, resume) = match attach {
        Ok(ReplyBody::Attached {
            session_role,
            version,
            resume,
        }) => (session_role, version, resume),
        Ok(_) | Err(_) => {
            let err = match attach {
                Err(e) => e,
                _ => WireError::new(codes::INTERNAL, "unexpected reply to attach"),
            };
            let _ = sink
                .send(Message::text(protocol::connection_error(&err)))
                .await;
            let _ = sink
                .send(Message::close_with(1008u16, err.code.clone()))
                .await;
            return;
        }
    };

    let mut conn = Conn {
        ctx: ctx.clone(),
        sid,
        caller,
        hub: hub.clone(),
        cv: 0,
        ended: false,
        sink,
    };
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
    if conn.send(established.to_string()).await.is_err() {
        return detach(ctx, sid, caller, conn_id);
    }
    let opened = match resume {
        Resume::Events { events } => {
            conn.cv = last_version.unwrap_or(0);
            let mut ok = true;
            for RawEvent { version, json } in events {
                if version == conn.cv + 1 {
                    ok = conn.send_event(&Ev::new(version, json)).await.is_ok();
                    if !ok {
                        break;
                    }
                }
            }
            ok
        }
        Resume::Full { view } => {
            conn.ended = view.game["status"] == "ended";
            let msg = json!({"type": "sync_response", "id": null, "data": view});
            conn.cv = view.version;
            conn.send(msg.to_string()).await.is_ok()
        }
    };
    if !opened {
        return detach(ctx, sid, caller, conn_id);
    }
    if conn.ended {
        // An ended session: the client has its final state; nothing more will come.
        let _ = conn
            .sink
            .send(Message::close_with(1000u16, "session ended"))
            .await;
        return detach(ctx, sid, caller, conn_id);
    }
    hub.seed(conn.cv);

    let (ack_tx, mut acks) =
        mpsc::channel::<Outbound>(ctx.cfg.router.max_inflight_per_connection.max(1) * 2);
    let inflight = Arc::new(Semaphore::new(
        ctx.cfg.router.max_inflight_per_connection.max(1),
    ));
    let mut window = LocalWindow::new(
        ctx.cfg.limits.ws_messages_per_min_per_conn,
        Duration::from_secs(60),
        Instant::now(),
    );
    let mut heartbeat = tokio::time::interval(Duration::from_millis(
        ctx.cfg.router.heartbeat_interval_ms.max(100),
    ));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut shutdown = ctx.shutdown.clone();

    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let _ = conn.sink.send(Message::close_with(1001u16, "router shutting down")).await;
                break;
            }
            Some(out) = acks.recv() => {
                if conn.send(out).await.is_err() { break; }
            }
            frame = stream.next() => {
                let msg = match frame {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "websocket read error");
                        break;
                    }
                    None => break,
                };
                if msg.is_close() {
                    break;
                }
                if msg.is_ping() || msg.is_pong() {
                    continue;
                }
                let Ok(text) = msg.to_str() else {
                    let e = WireError::new(codes::INVALID_MESSAGE, "binary frames are not supported; send JSON text");
                    if conn.send(protocol::error(None, &e)).await.is_err() { break; }
                    continue;
                };
                let parsed = protocol::parse_client_message(text, ctx.cfg.router.max_message_bytes);
                let m = match parsed {
                    Ok(m) => m,
                    Err(r) => {
                        metrics::counter!("gs_router_ws_rejected_total", "code" => r.error.code.clone()).increment(1);
                        if conn.send(protocol::error(r.id, &r.error)).await.is_err() { break; }
                        continue;
                    }
                };
                if let Err(wait) = window.hit(Instant::now()) {
                    let e = WireError::new(codes::RATE_LIMITED, "too many messages on this connection")
                        .with_details(json!({"retry_after_secs": wait.as_secs().max(1),
                            "limit": ctx.cfg.limits.ws_messages_per_min_per_conn, "window_secs": 60}));
                    if conn.send(protocol::error(Some(m.id), &e)).await.is_err() { break; }
                    continue;
                }
                if handle_message(&mut conn, m, &ack_tx, &inflight).await.is_err() {
                    break;
                }
            }
            ev = events.recv() => {
                let sent = match ev {
                    Ok(ev) => conn.deliver(ev).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics::counter!("gs_router_client_lagged_total").increment(n);
                        match conn.hub.last_version() {
                            Some(last) => conn.catch_up(last).await,
                            None => Ok(()),
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if sent.is_err() {
                    break;
                }
                if conn.ended {
                    let max = ctx.cfg.router.max_inflight_per_connection.max(1);
                    conn.close_ended(&mut acks, &inflight, max).await;
                    break;
                }
            }
            _ = heartbeat.tick() => {
                if conn.send(protocol::heartbeat()).await.is_err() { break; }
            }
        }
    }
    detach(ctx, sid, caller, conn_id);
}

/// Handles one parsed client message.
async fn handle_message(
    conn: &mut Conn,
    m: ClientMessage,
    acks: &mpsc::Sender<Outbound>,
    inflight: &Arc<Semaphore>,
) -> Result<(), Closed> {
    match m.kind.as_str() {
        protocol::TYPE_HEARTBEAT => {
            let v = conn.cv;
            conn.send(protocol::ack(m.id, v)).await
        }
        protocol::TYPE_SYNC_REQUEST => {
            let paths = match m.data.get("paths") {
                None | Some(serde_json::Value::Null) => None,
                Some(p) => match serde_json::from_value::<Vec<String>>(p.clone()) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        let e = WireError::new(
                            codes::INVALID_PAYLOAD,
                            "`paths` must be a list of JSON Pointers",
                        );
                        return conn.send(protocol::error(Some(m.id), &e)).await;
                    }
                },
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
                    let msg = json!({"type": "sync_response", "id": m.id, "data": view});
                    conn.send(msg.to_string()).await?;
                    if !partial && version > conn.cv {
                        conn.cv = version;
                    }
                    conn.send(protocol::ack(m.id, version)).await
                }
                Ok(_) => {
                    let e = WireError::new(codes::INTERNAL, "unexpected reply to sync");
                    conn.send(protocol::error(Some(m.id), &e)).await
                }
                Err(e) => conn.send(protocol::error(Some(m.id), &e)).await,
            }
        }
        _ => {
            // The ICD's "combat actions per minute per player", counted across routers.
            let combat = gs_rules::Command::from_client(&m.kind, m.data.clone())
                .is_ok_and(|c| c.is_combat());
            if combat {
                let who = format!("{}:{}", conn.sid, conn.caller.user_id);
                let limit = conn.ctx.cfg.limits.combat_actions_per_min_per_player;
                if let Err(e) = conn
                    .ctx
                    .limiter
                    .check("combat", &who, limit, Duration::from_secs(60))
                    .await
                {
                    return conn.send(protocol::error(Some(m.id), &e)).await;
                }
            }
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                let e = WireError::new(
                    codes::TOO_MANY_IN_FLIGHT,
                    "too many commands waiting for their ack on this connection",
                );
                return conn.send(protocol::error(Some(m.id), &e)).await;
            };
            let forwarder = conn.ctx.forwarder.clone();
            let (sid, caller, acks) = (conn.sid, conn.caller, acks.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let r = forwarder
                    .request(
                        sid,
                        caller,
                        RequestBody::Command {
                            command_id: m.id,
                            kind: m.kind,
                            data: m.data,
                        },
                    )
                    .await;
                let out = match r {
                    Ok(ReplyBody::Ack { version, .. }) => protocol::ack(m.id, version),
                    Ok(_) => protocol::error(
                        Some(m.id),
                        &WireError::new(codes::INTERNAL, "unexpected reply"),
                    ),
                    Err(e) => protocol::error(Some(m.id), &e),
                };
                let _ = acks.send(out).await;
            });
            Ok(())
        }
    }
}

/// Tells the owner the connection is gone (best effort, in the background).
fn detach(ctx: Arc<RouterCtx>, sid: Uuid, caller: Caller, conn_id: Uuid) {
    tokio::spawn(async move {
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
