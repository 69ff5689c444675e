//! REST endpoints (ICD "REST API Interface", under `/api/v2`), health and metrics.
//!
//! Every `/api/v2` request carries an access token (`Authorization: Bearer …`, or
//! `?token=` where headers cannot be set). Errors are JSON
//! `{"error": {"code", "message", "details"}}` with the HTTP status of the code.

use crate::server::PeerAddr;
use crate::RouterCtx;
use bytes::Bytes;
use gs_shared::auth::{Claims, Role};
use gs_shared::protocol::{codes, WireError};
use gs_shared::rpc::{Caller, ReplyBody, RequestBody};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// A JSON response.
pub fn json_reply(status: StatusCode, body: &Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// An error response.
pub fn error_reply(e: &WireError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_reply(status, &json!({ "error": e }));
    if let Some(secs) = e.details.get("retry_after_secs").and_then(Value::as_u64) {
        if let Ok(v) = secs.to_string().parse() {
            r.headers_mut().insert("retry-after", v);
        }
    }
    r
}

/// The access token of a request: the `Authorization` header, else `?token=`.
pub fn token_of(header: &Option<String>, query: &HashMap<String, String>) -> Option<String> {
    header
        .as_deref()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string())
        .or_else(|| query.get("token").cloned())
}

pub fn authenticate(ctx: &RouterCtx, token: Option<String>) -> Result<Claims, WireError> {
    ctx.auth
        .verify_access(token.as_deref())
        .map_err(WireError::from)
}

pub fn caller(c: &Claims) -> Caller {
    Caller {
        user_id: c.sub,
        role: c.role,
    }
}

pub fn parse_session_id(s: &str) -> Result<Uuid, WireError> {
    Uuid::parse_str(s)
        .map_err(|_| WireError::new(codes::BAD_REQUEST, "the session id must be a UUID"))
}

/// A REST body: a JSON object, checked as client messages are
/// ([`protocol::check_json_text`]: nesting, U+0000).
fn parse_body(ctx: &RouterCtx, body: &Bytes) -> Result<Value, WireError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    if let Ok(text) = std::str::from_utf8(body) {
        gs_shared::protocol::check_json_text(text, ctx.cfg.document.max_json_depth)?;
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        WireError::new(
            codes::MALFORMED_JSON,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(WireError::new(
            codes::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    Ok(v)
}

/// `{…}/api/v2/sessions/{id}/ws` for clients.
pub fn websocket_url(ctx: &RouterCtx, id: &Uuid) -> String {
    format!("{}/api/v2/sessions/{id}/ws", ctx.ws_base)
}

type Auth = (Option<String>, HashMap<String, String>);

fn with_auth() -> impl Filter<Extract = (Auth,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::query::<HashMap<String, String>>())
        .map(|h, q| (h, q))
}

fn with_ctx(
    ctx: Arc<RouterCtx>,
) -> impl Filter<Extract = (Arc<RouterCtx>,), Error = Infallible> + Clone {
    warp::any().map(move || ctx.clone())
}

/// All REST routes (the WebSocket route is in `ws`).
pub fn routes(
    ctx: Arc<RouterCtx>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    session_routes(ctx.clone()).or(ops_routes(ctx)).unify()
}

/// `/api/v2/sessions…`: create, join, state, history, presence.
fn session_routes(
    ctx: Arc<RouterCtx>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let limit = ctx.cfg.router.max_body_bytes;
    let body = warp::body::content_length_limit(limit).and(warp::body::bytes());

    let create = warp::path!("api" / "v2" / "sessions")
        .and(warp::post())
        .and(with_ctx(ctx.clone()))
        .and(with_auth())
        .and(body)
        .then(|ctx, auth, body| async move { reply(create_session(ctx, auth, body).await) });
    let join = warp::path!("api" / "v2" / "sessions" / String / "join")
        .and(warp::post())
        .and(with_ctx(ctx.clone()))
        .and(with_auth())
        .and(body)
        .then(|id, ctx, auth, body| async move { reply(join_session(ctx, id, auth, body).await) });
    let get_state = warp::path!("api" / "v2" / "sessions" / String / "state")
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .and(with_auth())
        .then(|id, ctx, auth| async move { reply(get_state(ctx, id, auth).await) });
    let save_state = warp::path!("api" / "v2" / "sessions" / String / "state")
        .and(warp::post())
        .and(with_ctx(ctx.clone()))
        .and(with_auth())
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(body)
        .then(|id, ctx, auth, key, body| async move {
            reply(save_state(ctx, id, auth, key, body).await)
        });
    let history = warp::path!("api" / "v2" / "sessions" / String / "history")
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .and(with_auth())
        .then(|id, ctx, auth| async move { reply(history(ctx, id, auth).await) });
    let presence = warp::path!("api" / "v2" / "sessions" / String / "presence")
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .and(with_auth())
        .then(|id, ctx, auth| async move { reply(presence(ctx, id, auth).await) });
    create
        .or(join)
        .unify()
        .or(get_state)
        .unify()
        .or(save_state)
        .unify()
        .or(history)
        .unify()
        .or(presence)
        .unify()
}

/// The cluster view, the OpenAPI document, health and metrics.
fn ops_routes(
    ctx: Arc<RouterCtx>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let cluster = warp::path!("api" / "v2" / "cluster")
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .and(with_auth())
        .then(|ctx, auth| async move { reply(cluster_info(ctx, auth).await) });
    let openapi = warp::path!("api" / "v2" / "openapi.json")
        .and(warp::get())
        .map(|| {
            warp::reply::with_header(OPENAPI, "content-type", "application/json").into_response()
        });
    let live = warp::path!("health" / "live")
        .and(warp::get())
        .map(|| json_reply(StatusCode::OK, &json!({"status": "live"})));
    let ready = warp::path!("health" / "ready")
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .then(|ctx: Arc<RouterCtx>| async move {
            let (up, body) = readiness(&ctx).await;
            json_reply(
                if up {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                &body,
            )
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_ctx(ctx))
        .and(with_auth())
        .map(|ctx: Arc<RouterCtx>, auth: Auth| {
            reply(require_admin(&ctx, &auth, "metrics").map(|_| {
                gs_shared::telemetry::record_process_metrics();
                metrics::gauge!("gs_router_requests_waiting")
                    .set(ctx.forwarder.requests_waiting() as f64);
                warp::reply::with_header(
                    ctx.metrics.render(),
                    "content-type",
                    "text/plain; version=0.0.4",
                )
                .into_response()
            }))
        });
    cluster
        .or(openapi)
        .unify()
        .or(live)
        .unify()
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
}

fn reply(r: Result<Response, WireError>) -> Response {
    match r {
        Ok(r) => r,
        Err(e) => error_reply(&e),
    }
}

/// Readiness of a router: NATS connected, Redis answering, at least one node.
pub async fn readiness(ctx: &RouterCtx) -> (bool, Value) {
    let nats_up = ctx.nats.connection_state() == async_nats::connection::State::Connected;
    let mut redis = ctx.redis.clone();
    let redis_up = matches!(
        tokio::time::timeout(
            Duration::from_millis(1000),
            redis::cmd("PING").query_async::<String>(&mut redis)
        )
        .await,
        Ok(Ok(_))
    );
    let nodes = ctx.cluster.node_count();
    let up = nats_up && redis_up && nodes > 0;
    let status = |b: bool| if b { "up" } else { "down" };
    (
        up,
        json!({
            "status": if up { "ready" } else { "not_ready" },
            "router": ctx.id,
            "checks": { "nats": status(nats_up), "redis": status(redis_up), "nodes": nodes },
        }),
    )
}

async fn create_session(
    ctx: Arc<RouterCtx>,
    auth: Auth,
    body: Bytes,
) -> Result<Response, WireError> {
    let claims = authenticate(&ctx, token_of(&auth.0, &auth.1))?;
    let (campaign_id, name, settings) =
        create_request(&parse_body(&ctx, &body)?, claims.role == Role::Admin)?;
    ctx.limiter
        .check(
            "create",
            &claims.sub.to_string(),
            ctx.cfg.limits.sessions_created_per_hour_per_user,
            Duration::from_secs(3600),
        )
        .await?;
    let id = Uuid::new_v4();
    let body = ctx
        .forwarder
        .request(
            id,
            caller(&claims),
            RequestBody::Create {
                campaign_id,
                name,
                settings,
            },
        )
        .await?;
    let ReplyBody::Created { version, view } = body else {
        return Err(WireError::new(
            codes::INTERNAL,
            "unexpected reply to create",
        ));
    };
    metrics::counter!("gs_router_sessions_created_total").increment(1);
    Ok(json_reply(
        StatusCode::CREATED,
        &json!({
            "session_id": id,
            "connection_token": ctx.auth.mint_session(claims.sub, id),
            "websocket_url": websocket_url(&ctx, &id),
            "version": version,
            "session_state": view,
        }),
    ))
}

/// A create request's `campaign_id`, `name` and `settings`, checked.
fn create_request(body: &Value, admin: bool) -> Result<(Uuid, String, Value), WireError> {
    let campaign_id = body
        .get("campaign_id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| WireError::new(codes::BAD_REQUEST, "`campaign_id` (a UUID) is required"))?;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty() && n.chars().count() <= 255)
        .ok_or_else(|| {
            WireError::new(
                codes::BAD_REQUEST,
                "`name` (1 to 255 characters) is required",
            )
        })?
        .to_string();
    let settings = match body.get("settings") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            return Err(WireError::new(
                codes::BAD_REQUEST,
                "`settings` must be an object",
            ))
        }
    };
    // The dice seed is the service's secret (it predicts every roll): only an admin
    // may fix one, for a replayable test table.
    if !settings["dice_seed"].is_null() && !admin {
        return Err(WireError::new(
            codes::FORBIDDEN,
            "`settings.dice_seed` may only be set by an admin (the service chooses a secret seed)",
        )
        .with_details(json!({"field": "settings.dice_seed"})));
    }
    Ok((campaign_id, name, settings))
}

async fn join_session(
    ctx: Arc<RouterCtx>,
    id: String,
    auth: Auth,
    body: Bytes,
) -> Result<Response, WireError> {
    let claims = authenticate(&ctx, token_of(&auth.0, &auth.1))?;
    let id = parse_session_id(&id)?;
    let body = parse_body(&ctx, &body)?;
    // Per user here (an outsider spends only its own allowance); the session's own
    // quota is kept by its owner, counting only what the rules allowed.
    ctx.limiter
        .check(
            "join",
            &format!("{id}:{}", claims.sub),
            ctx.cfg.limits.joins_per_min_per_session,
            Duration::from_secs(60),
        )
        .await?;
    let reply = ctx
        .forwarder
        .request(
            id,
            caller(&claims),
            RequestBody::Join {
                command_id: Uuid::new_v4(),
                data: body,
                lookup: None,
            },
        )
        .await?;
    let ReplyBody::Joined {
        version,
        session_role,
        view,
    } = reply
    else {
        return Err(WireError::new(codes::INTERNAL, "unexpected reply to join"));
    };
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "connection_token": ctx.auth.mint_session(claims.sub, id),
            "websocket_url": websocket_url(&ctx, &id),
            "session_role": session_role,
            "version": version,
            "session_state": view,
        }),
    ))
}

async fn get_state(ctx: Arc<RouterCtx>, id: String, auth: Auth) -> Result<Response, WireError> {
    let claims = authenticate(&ctx, token_of(&auth.0, &auth.1))?;
    let id = parse_session_id(&id)?;
    let reply = ctx
        .forwarder
        .request(id, caller(&claims), RequestBody::GetState)
        .await?;
    let ReplyBody::State { view } = reply else {
        return Err(WireError::new(
            codes::INTERNAL,
            "unexpected reply to get state",
        ));
    };
    Ok(json_reply(
        StatusCode::OK,
        &serde_json::to_value(view).unwrap_or_default(),
    ))
}

/// `GET /sessions/{id}/presence`: the users with a WebSocket open on the session
/// (through any router) and how many each, as the owner knows them: a socket counts
/// from its attach until it closes (or is closed for silence) or its router leaves.
async fn presence(ctx: Arc<RouterCtx>, id: String, auth: Auth) -> Result<Response, WireError> {
    let claims = authenticate(&ctx, token_of(&auth.0, &auth.1))?;
    let id = parse_session_id(&id)?;
    let reply = ctx
        .forwarder
        .request(id, caller(&claims), RequestBody::Presence)
        .await?;
    let ReplyBody::Presence { players } = reply else {
        return Err(WireError::new(
            codes::INTERNAL,
            "unexpected reply to presence",
        ));
    };
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "session_id": id,
            "players": players,
            "timestamp": gs_shared::protocol::timestamp_now(),
        }),
    ))
}

async fn save_state(
    ctx: Arc<RouterCtx>,
    id: String,
    auth: Auth,
    idempotency_key: Option<String>,
    body: Bytes,
) -> Result<Response, WireError> {
    let claims = authenticate(&ctx, token_of(&auth.0, &auth.1))?;
    let id = parse_session_id(&id)?;
    let body = parse_body(&ctx, &body)?;
    let state = match body.get("state") {
        Some(v @ Value::Object(_)) => v.clone(),
        _ => {
            return Err(WireError::new(
                codes::BAD_REQUEST,
                "`state` (an object) is required",
            ))
        }
    };
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            return Err(WireError::new(
                codes::BAD_REQUEST,
                "`metadata` must be an object",
            ))
        }
    };
    let command_id = match idempotency_key {
        Some(k) => Uuid::parse_str(&k)
            .map_err(|_| WireError::new(codes::BAD_REQUEST, "Idempotency-Key must be a UUID"))?,
        None => Uuid::new_v4(),
    };
    // Per user here (an outsider spends only its own allowance); the session's own
    // quota is kept by its owner, counting only what the rules allowed.
    ctx.limiter
        .check(
            "state",
            &format!("{id}:{}", claims.sub),
            ctx.cfg.limits.state_updates_per_min_per_session,
            Duration::from_secs(60),
        )
        .await?;
    let reply = ctx
        .forwarder
        .request(
            id,
            caller(&claims),
            RequestBody::SaveState {
                command_id,
                state,
                metadata,
            },
        )
        .await?;
    let ReplyBody::Ack { version, duplicate } = reply else {
        return Err(WireError::new(
            codes::INTERNAL,
            "unexpected reply to save state",
        ));
    };
    Ok(json_reply(
        StatusCode::OK,
        // The ICD types `version` as a string; `version_number` is the extension.
        &json!({
            "version": version.to_string(),
            "version_number": version,
            "timestamp": gs_shared::protocol::timestamp_now(),
            "duplicate": duplicate,
        }),
    ))
}

async fn history(ctx: Arc<RouterCtx>, id: String, auth: Auth) -> Result<Response, WireError> {
    let claims = authenticate(&ctx, token_of(&auth.0, &auth.1))?;
    let id = parse_session_id(&id)?;
    let before = match auth.1.get("before") {
        Some(b) => Some(b.parse::<u64>().map_err(|_| {
            WireError::new(codes::BAD_REQUEST, "`before` must be a version number")
        })?),
        None => None,
    };
    let limit = match auth.1.get("limit") {
        Some(l) => l
            .parse::<u64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| WireError::new(codes::BAD_REQUEST, "`limit` must be 1 to 500"))?,
        None => 50,
    };
    let reply = ctx
        .forwarder
        .request(id, caller(&claims), RequestBody::History { before, limit })
        .await?;
    let ReplyBody::History {
        entries,
        next_before,
    } = reply
    else {
        return Err(WireError::new(
            codes::INTERNAL,
            "unexpected reply to history",
        ));
    };
    Ok(json_reply(
        StatusCode::OK,
        &json!({ "session_id": id, "entries": entries, "next_before": next_before }),
    ))
}

/// Operator endpoints (`/metrics`, the cluster view): an access token with the
/// `admin` role; 401 without a valid token, 403 with another role.
fn require_admin(ctx: &RouterCtx, auth: &Auth, what: &str) -> Result<Claims, WireError> {
    let claims = authenticate(ctx, token_of(&auth.0, &auth.1))?;
    if claims.role != Role::Admin {
        return Err(WireError::new(
            codes::FORBIDDEN,
            format!("the {what} endpoint needs the admin role"),
        ));
    }
    Ok(claims)
}

async fn cluster_info(ctx: Arc<RouterCtx>, auth: Auth) -> Result<Response, WireError> {
    require_admin(&ctx, &auth, "cluster view")?;
    let ring = ctx.cluster.ring();
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "router": ctx.id,
            "ring_version": ctx.cluster.ring_version(),
            "ring_fingerprint": format!("{:016x}", ring.fingerprint()),
            "nodes_on_ring": ring.nodes(),
            "members": ctx.cluster.members(),
        }),
    ))
}

/// Turns warp's own rejections (unknown path, wrong method, body too large) into
/// JSON errors.
pub async fn recover(r: Rejection) -> Result<Response, Infallible> {
    let e = if r.is_not_found() {
        WireError::new(codes::NOT_FOUND, "no such endpoint")
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        WireError::new(codes::MESSAGE_TOO_LARGE, "the request body is too large")
    } else if r.find::<warp::reject::LengthRequired>().is_some() {
        WireError::new(codes::BAD_REQUEST, "a Content-Length header is required")
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        WireError::new(codes::METHOD_NOT_ALLOWED, "method not allowed")
    } else if r.find::<warp::reject::InvalidQuery>().is_some() {
        WireError::new(codes::BAD_REQUEST, "the query string is invalid")
    } else if r.find::<warp::reject::MissingHeader>().is_some()
        || r.find::<warp::reject::InvalidHeader>().is_some()
    {
        WireError::new(
            codes::BAD_REQUEST,
            "a required header is missing or invalid",
        )
    } else {
        tracing::debug!(rejection = ?r, "unhandled rejection");
        WireError::new(codes::BAD_REQUEST, "bad request")
    };
    let mut reply = error_reply(&e);
    if e.code == codes::MESSAGE_TOO_LARGE || e.code == codes::BAD_REQUEST {
        // The body was not read: this connection cannot carry another request, and the
        // client must not reuse it.
        reply
            .headers_mut()
            .insert("connection", warp::http::HeaderValue::from_static("close"));
    }
    Ok(reply)
}

/// The peer of a request (for per-IP limits).
pub fn peer() -> impl Filter<Extract = (Option<PeerAddr>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerAddr>()
}
