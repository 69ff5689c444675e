//! The WebSocket endpoint, `GET /api/v2/sessions/{id}/ws`: checks and the upgrade.
//!
//! Before the upgrade: the access token (`Authorization` header or `?token=`) and the
//! session token (`X-Session-Token` header or `?session_token=`, bound to this user
//! and this session) are checked, a place is taken under the caps on open sockets per
//! user and per IP (`router.max_sockets_per_user`, `router.max_sockets_per_ip`), and
//! the per-IP connection rate limit applied. Every failure goes through [`refuse`]:
//! as the ICD says, a valid WebSocket upgrade request is upgraded, gets
//! `{"type":"connection_error","error":{code,message}}` and a close frame with
//! 4000 + the code's HTTP status (4400, 4401, 4403, 4429, 4503: see
//! [`close_codes::for_error`]), so a browser (which sees no HTTP status) learns why.
//! A refused socket holds its connection permit only while it says so, bounded by
//! [`REFUSED_SOCKET_GRACE`], and never a per-user or per-IP place. A request to this
//! path that is not a valid upgrade gets the plain HTTP error (400/401/403/429/503).
//! A router at `router.max_connections` refuses upgrades the same way (4503) from its
//! small pool of refusers ([`full_router_route`]).
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
use futures::{SinkExt, StreamExt};
use gs_shared::auth::Claims;
use gs_shared::protocol::{self, close_codes, codes, WireError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
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
                    return refuse(
                        None,
                        &WireError::new(
                            codes::BAD_REQUEST,
                            "this endpoint takes a WebSocket upgrade (RFC 6455)",
                        ),
                    );
                };
                match accept(&ctx, &id, &headers, &query, peer).await {
                    Ok(ok) => upgrade(ctx, up, ok),
                    Err(e) => refuse(Some(up), &e),
                }
            },
        )
}

/// How long a refused socket may live: the `101`, the `connection_error`, the close
/// frame and the client's close reply. It holds its connection permit meanwhile (it
/// is an open connection), and nothing else.
pub const REFUSED_SOCKET_GRACE: Duration = Duration::from_secs(2);

/// The answer to a handshake that is refused: every refusal goes through here. A
/// valid upgrade request is upgraded and told in band (`connection_error`, then a
/// close frame with [`close_codes::for_error`]); anything else gets the HTTP error.
fn refuse(up: Option<Upgrade>, e: &WireError) -> Response {
    metrics::counter!("gs_router_ws_refused_total", "code" => e.code.clone()).increment(1);
    match up {
        Some(up) => refuse_in_band(up, e),
        None => error_reply(e),
    }
}

/// Completes the upgrade only to send `connection_error` and close with the error's
/// 4xxx code; the socket's task ends within [`REFUSED_SOCKET_GRACE`].
fn refuse_in_band(up: Upgrade, e: &WireError) -> Response {
    let Upgrade {
        key,
        on_upgrade,
        permit,
    } = up;
    let text = protocol::connection_error(e);
    let code = close_codes::for_error(e);
    let reason = e.code.clone();
    tokio::spawn(async move {
        // Given back when the refusal is over, however it ends.
        let _permit = permit;
        let _ = tokio::time::timeout(REFUSED_SOCKET_GRACE, async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let io = hyper_util::rt::TokioIo::new(upgraded);
            // Small buffers: nothing but the client's close reply is read.
            let config = socket_config(READ_BUFFER);
            let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            if ws.feed(Message::text(text)).await.is_err() {
                return;
            }
            if ws.send(crate::conn::close(code, &reason)).await.is_err() {
                return;
            }
            // The client's close reply ends the closing handshake (RFC 6455 §5.5.1);
            // anything else it sends meanwhile is dropped.
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    });
    switching_protocols(&key)
}

/// `101 Switching Protocols` for the request whose `Sec-WebSocket-Key` is `key`.
fn switching_protocols(key: &str) -> Response {
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

/// What a router at `router.max_connections` answers (served by the accept loop's
/// refusers, whose permit comes as the request's [`ConnPermit`]): a WebSocket upgrade
/// to the session endpoint is refused in band (`too_many_connections`, close 4503);
/// any other request gets `503 too_many_connections` with `Connection: close`.
pub fn full_router_route(
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    warp::path::full()
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and(warp::ext::optional::<ConnPermit>())
        .map(
            |path: warp::path::FullPath,
             headers: HeaderMap,
             on_upgrade: Option<hyper::upgrade::OnUpgrade>,
             permit: Option<ConnPermit>| {
                let e = crate::server::full_error();
                if is_ws_path(path.as_str()) {
                    if let Some(up) = upgrade_of(&headers, on_upgrade, permit) {
                        return refuse(Some(up), &e);
                    }
                }
                crate::server::refusal()
            },
        )
}

/// `/api/v2/sessions/{id}/ws`.
fn is_ws_path(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(parts.as_slice(), ["api", "v2", "sessions", _, "ws"])
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
    switching_protocols(&key)
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
        .map_err(WireError::from)?;
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
        assert!(is_ws_path("/api/v2/sessions/x/ws"));
        assert!(!is_ws_path("/api/v2/sessions/x/state"));
        assert!(!is_ws_path("/api/v2/sessions/ws"));
        // RFC 6455's example key and answer.
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
