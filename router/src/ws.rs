//! The WebSocket endpoint, `GET /api/v2/sessions/{id}/ws`: checks and the upgrade.
//!
//! Before the upgrade: the access token (`Authorization` header or `?token=`) and the
//! session token (`X-Session-Token` header or `?session_token=`, bound to this user
//! and this session) are checked, a place is taken under the caps on open sockets per
//! user and per IP (`router.max_sockets_per_user`, `router.max_sockets_per_ip`), and
//! the per-IP connection rate limit applied. Every failure is answered by [`refuse`]
//! (plain HTTP errors, 400/401/403/429/503) and no socket is opened.
//!
//! The upgrade is done here rather than by warp's `ws()` filter, for two reasons:
//! the socket's buffers are ours to size ([`socket_config`]: tungstenite's default
//! 128 KiB read buffer is zero-filled on every read and held by every idle
//! connection), and the connection's permit (`router.max_connections`, taken by the
//! accept loop) moves into the socket's task with the socket's per-user/per-IP place
//! ([`crate::conn::Slot`]), so a WebSocket counts against every cap for its whole
//! life. The socket itself is served by [`crate::conn`], which also keeps checking
//! the authorisation while the socket is open (the tokens' expiry, the user's
//! membership).

use crate::api::{self, authenticate, error_reply, parse_session_id, token_of};
use crate::conn::Slot;
use crate::limits::SocketSlot;
use crate::server::{ConnPermit, PeerAddr};
use crate::RouterCtx;
use gs_shared::auth::Claims;
use gs_shared::protocol::{codes, WireError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

/// A client's socket after the upgrade.
pub type Socket = WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Read buffer of a socket: client messages are small (at most
/// `router.max_message_bytes`); a larger frame grows the buffer for its own length.
/// tungstenite zero-fills this much on every read attempt, so it stays small.
const READ_BUFFER: usize = 1024;
/// Frames written in one wake-up are buffered up to this much before a write, then
/// flushed together.
const WRITE_BUFFER: usize = 64 * 1024;

/// The socket settings of every client connection.
pub fn socket_config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

/// What the handshake needs from the request.
struct Upgrade {
    key: String,
    on_upgrade: hyper::upgrade::OnUpgrade,
    permit: Option<ConnPermit>,
}

/// The request is a WebSocket upgrade (RFC 6455 §4.2.1); `None` if it is not.
fn upgrade_of(
    headers: &HeaderMap,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    permit: Option<ConnPermit>,
) -> Option<Upgrade> {
    let has = |name: &str, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    if !has("connection", "upgrade") || !has("upgrade", "websocket") {
        return None;
    }
    if headers.get("sec-websocket-version")?.as_bytes() != b"13" {
        return None;
    }
    let key = headers.get("sec-websocket-key")?.to_str().ok()?.to_string();
    Some(Upgrade {
        key,
        on_upgrade: on_upgrade?,
        permit,
    })
}

pub fn route(ctx: Arc<RouterCtx>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "v2" / "sessions" / String / "ws")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and(warp::ext::optional::<ConnPermit>())
        .and(warp::any().map(move || ctx.clone()))
        .and(warp::query::<HashMap<String, String>>())
        .and(api::peer())
        .then(
            |id: String,
             headers: HeaderMap,
             on_upgrade: Option<hyper::upgrade::OnUpgrade>,
             permit: Option<ConnPermit>,
             ctx: Arc<RouterCtx>,
             query: HashMap<String, String>,
             peer: Option<PeerAddr>| async move {
                let Some(up) = upgrade_of(&headers, on_upgrade, permit) else {
                    return refuse(&WireError::new(
                        codes::BAD_REQUEST,
                        "this endpoint takes a WebSocket upgrade (RFC 6455)",
                    ));
                };
                match accept(&ctx, &id, &headers, &query, peer).await {
                    Ok(ok) => upgrade(ctx, up, ok),
                    Err(e) => refuse(&e),
                }
            },
        )
}

/// The answer to a handshake that is refused before the upgrade: every refusal goes
/// through here (an HTTP error with the code's status; no socket is opened).
fn refuse(e: &WireError) -> Response {
    metrics::counter!("gs_router_ws_refused_total", "code" => e.code.clone()).increment(1);
    error_reply(e)
}

/// A handshake that passed every check.
struct Accepted {
    sid: Uuid,
    claims: Claims,
    last_version: Option<u64>,
    /// When the connection's authorisation ends: the earlier `exp` of its two tokens
    /// (unix seconds).
    expires: u64,
    /// The socket's place under the per-user and per-IP caps.
    place: SocketSlot,
}

/// Answers `101 Switching Protocols` and serves the socket once hyper hands it over.
fn upgrade(ctx: Arc<RouterCtx>, up: Upgrade, ok: Accepted) -> Response {
    let Upgrade {
        key,
        on_upgrade,
        permit,
    } = up;
    let Accepted {
        sid,
        claims,
        last_version,
        expires,
        place,
    } = ok;
    let config = socket_config(ctx.cfg.router.max_frame_bytes);
    // Held until the socket closes (or the upgrade fails): given back when this task
    // ends, however it ends.
    let slot = Slot::new(permit, place);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = hyper_util::rt::TokioIo::new(upgraded);
                let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                crate::conn::run(ctx, socket, sid, claims, last_version, expires, slot).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut res = Response::default();
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert("connection", "upgrade".parse().expect("static header"));
    h.insert("upgrade", "websocket".parse().expect("static header"));
    if let Ok(v) = derive_accept_key(key.as_bytes()).parse() {
        h.insert("sec-websocket-accept", v);
    }
    res
}

/// Checks everything that can be checked before the upgrade. Besides the session,
/// the caller and `last_version`, returns when the connection's authorisation ends:
/// the earlier `exp` of its two tokens (unix seconds).
async fn accept(
    ctx: &RouterCtx,
    id: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    peer: Option<PeerAddr>,
) -> Result<Accepted, WireError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let claims = authenticate(ctx, token_of(&header("authorization"), query))?;
    let sid = parse_session_id(id)?;
    let st = header("x-session-token").or_else(|| query.get("session_token").cloned());
    let session = ctx
        .auth
        .verify_session(st.as_deref(), claims.sub, sid)
        .map_err(|e| WireError::new(e.code(), e.to_string()))?;
    let expires = claims.exp.min(session.exp);
    let last_version = match query.get("last_version") {
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            WireError::new(
                codes::BAD_REQUEST,
                "`last_version` must be a version number",
            )
        })?),
        None => None,
    };
    // Counted in memory for the socket's life; given back (dropped) if a later check
    // refuses.
    let place = ctx.sockets.acquire(claims.sub, peer.map(|p| p.0.ip()))?;
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
    Ok(Accepted {
        sid,
        claims,
        last_version,
        expires,
        place,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        let ok = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        let on = || Some(hyper::upgrade::on(hyper::Request::new(())));
        assert!(upgrade_of(&headers(&ok), on(), None).is_some());
        assert!(
            upgrade_of(&headers(&ok), None, None).is_none(),
            "no upgrade state"
        );
        for skip in 0..ok.len() {
            let partial: Vec<_> = ok
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            assert!(
                upgrade_of(&headers(&partial), on(), None).is_none(),
                "without {}",
                ok[skip].0
            );
        }
        // RFC 6455's example key and answer.
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
