//! The router's HTTP(S) server: our own accept loop around warp's service.
//!
//! warp 0.4 has no TLS feature, so connections are accepted here, wrapped in
//! `tokio-rustls` when a certificate is configured, and handed to hyper-util's
//! auto (HTTP/1 + HTTP/2) builder with upgrades enabled (WebSockets). The peer address
//! goes into each request's extensions as [`PeerAddr`] (warp's `addr::remote()` is
//! empty on this path) for per-IP limits.
//!
//! Limits of the server (see `docs/security.md`, "Connection limits"):
//!
//! * a semaphore bounds open connections (`router.max_connections`). Its permit goes
//!   into each request's extensions as [`ConnPermit`]; the WebSocket handler keeps it
//!   for the socket's life, so a WebSocket counts until it closes. A connection over
//!   the limit is answered `503 too_many_connections` (and closed) by a small pool of
//!   refusers ([`REFUSERS`]), a WebSocket upgrade in band (`connection_error`, close
//!   4503); beyond that pool it is closed unanswered;
//! * hyper's header-read timeout, on a Tokio timer (`router.header_read_timeout_ms`):
//!   a request's header must arrive in time, and an idle keep-alive connection must
//!   start its next request in time;
//! * an idle timeout (`router.http_idle_timeout_ms`): a connection on which no byte
//!   moves that long is closed, whatever the protocol state (HTTP/2, a stalled body);
//! * a bound on the TLS handshake ([`HANDSHAKE_TIMEOUT`]).

use crate::api::error_reply;
use gs_shared::config::RouterConfig;
use gs_shared::protocol::{codes, WireError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use warp::Filter;

/// The client's address, as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A connection's place under `router.max_connections`, as a request extension: the
/// WebSocket handler keeps it for the socket's life (after the upgrade, hyper's
/// connection task ends but the socket lives on).
#[derive(Debug, Clone)]
pub struct ConnPermit(pub Arc<tokio::sync::OwnedSemaphorePermit>);

/// Bound on a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections over `router.max_connections` answered at once with
/// `503 too_many_connections`; more are closed unanswered.
pub const REFUSERS: usize = 64;

/// How long a refused connection may take to send its request and read the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// After the idle timeout, how long a connection may take to finish what it is doing
/// (an HTTP/2 GOAWAY, a response being written) before it is dropped.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// The server's limits, from the router's configuration.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    /// `None`: no header-read timeout.
    pub header_read_timeout: Option<Duration>,
    /// `None`: idle connections are never closed.
    pub idle_timeout: Option<Duration>,
}

impl ServerLimits {
    pub fn from_config(r: &RouterConfig) -> Self {
        let opt = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Self {
            max_connections: r.max_connections.max(1),
            header_read_timeout: opt(r.header_read_timeout_ms),
            idle_timeout: opt(r.http_idle_timeout_ms),
        }
    }
}

/// Loads a PEM certificate chain and key into a TLS acceptor.
pub fn tls_acceptor(cert_path: &str, key_path: &str) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(
        cert_path,
    )?))
    .collect::<Result<Vec<_>, _>>()?;
    let key =
        rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key_path)?))?
            .ok_or_else(|| anyhow::anyhow!("no private key in {key_path}"))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The error of a connection over `router.max_connections`.
pub(crate) fn full_error() -> WireError {
    WireError::new(
        codes::TOO_MANY_CONNECTIONS,
        "this router has too many open connections; retry later or use another router",
    )
    .with_details(json!({"scope": "router", "retry_after_secs": 1}))
}

/// The HTTP answer to a connection over `router.max_connections`.
pub(crate) fn refusal() -> warp::reply::Response {
    let e = full_error();
    // 503: `WireError::http_status` of a full router.
    let mut r = error_reply(&e);
    r.headers_mut()
        .insert("connection", "close".parse().expect("static header"));
    r
}

/// Serves `routes` on `listener` until `shutdown` turns true.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    routes: F,
    limits: ServerLimits,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusers = Arc::new(Semaphore::new(REFUSERS));
    // An upgrade to the WebSocket endpoint is refused in band (4503), anything else
    // with the HTTP 503.
    let refuse_routes = crate::ws::full_router_route();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("gs_router_connections_refused_total").increment(1);
            let Ok(refuser) = refusers.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let (tls, routes) = (tls.clone(), refuse_routes.clone());
            tokio::spawn(async move {
                // The refuser's place goes with the request: a WebSocket refused in
                // band keeps it until its `connection_error` is sent (bounded by
                // `ws::REFUSED_SOCKET_GRACE`), so refusals stay at most `REFUSERS`.
                let refuser = Some(ConnPermit(Arc::new(refuser)));
                let refused = ServerLimits {
                    max_connections: 0,
                    header_read_timeout: Some(REFUSAL_TIMEOUT),
                    idle_timeout: None,
                };
                // Keep-alive stays on: without it hyper would write `Connection: close`
                // over a refused upgrade's `101` (`Connection: upgrade`); the HTTP
                // refusal says `Connection: close` itself.
                let _ = tokio::time::timeout(
                    REFUSAL_TIMEOUT,
                    connection(stream, peer, tls, routes, refuser, refused, true),
                )
                .await;
            });
            continue;
        };
        let (tls, routes) = (tls.clone(), routes.clone());
        let permit = ConnPermit(Arc::new(permit));
        tokio::spawn(connection(
            stream,
            peer,
            tls,
            routes,
            Some(permit),
            limits,
            true,
        ));
    }
}

/// Serves one accepted connection until it ends (or is handed over to a WebSocket).
async fn connection<F>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    routes: F,
    permit: Option<ConnPermit>,
    limits: ServerLimits,
    keep_alive: bool,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let activity = Arc::new(AtomicU64::new(0));
    let io = match tls {
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        None => Stream::Plain(stream),
    };
    let io = Metered {
        io,
        activity: activity.clone(),
    };
    let svc = warp::service(routes);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            if let Some(p) = &permit {
                req.extensions_mut().insert(p.clone());
            }
            let mut svc = svc.clone();
            tower_service::Service::call(&mut svc, req)
        });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(keep_alive)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = match limits.idle_timeout {
        None => conn.await,
        Some(idle) => {
            tokio::select! {
                r = conn.as_mut() => r,
                _ = idle_for(&activity, idle) => {
                    metrics::counter!("gs_router_idle_connections_closed_total").increment(1);
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(IDLE_GRACE, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Returns once no byte has moved on the connection for `idle` (checked every half of
/// it, so after between `idle` and 1.5 × `idle` of silence).
async fn idle_for(activity: &AtomicU64, idle: Duration) {
    let step = (idle / 2).max(Duration::from_millis(10));
    let mut seen = activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            quiet += step;
            if quiet >= idle {
                return;
            }
        } else {
            seen = now;
            quiet = Duration::ZERO;
        }
    }
}

/// A client connection, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection that counts its reads and writes (for the idle timeout): one relaxed
/// atomic increment per I/O that moved bytes.
struct Metered {
    io: Stream,
    activity: Arc<AtomicU64>,
}

impl Metered {
    fn moved(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = match &mut self.io {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = match &mut self.io {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = match &mut self.io {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server with `limits` on a loopback port, serving `ok` everywhere.
    async fn server(limits: ServerLimits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, None, warp::any().map(|| "ok"), limits, rx));
        (addr, tx)
    }

    /// Reads until the server closes the connection (bounded); returns what it sent.
    async fn until_closed(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "the server did not close the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_half_sent_header_is_cut_off() {
        let (addr, _stop) = server(ServerLimits {
            max_connections: 10,
            header_read_timeout: Some(Duration::from_millis(200)),
            idle_timeout: None,
        })
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        until_closed(&mut s).await;
        // An idle keep-alive connection too, after its first answer.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_when_idle() {
        let (addr, _stop) = server(ServerLimits {
            max_connections: 10,
            header_read_timeout: None,
            idle_timeout: Some(Duration::from_millis(200)),
        })
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HT").await.unwrap();
        until_closed(&mut s).await;
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_answered_503() {
        let (addr, _stop) = server(ServerLimits {
            max_connections: 1,
            header_read_timeout: None,
            idle_timeout: None,
        })
        .await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = first.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // `first` is open (keep-alive): the next one is over the limit.
        let mut second = TcpStream::connect(addr).await.unwrap();
        second
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut second).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("too_many_connections"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        // A WebSocket upgrade over the limit is upgraded and refused in band: the
        // ICD's `connection_error`, then a close frame with 4503 (0x1197).
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(
                b"GET /api/v2/sessions/x/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
                  Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "the refused socket was not closed");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: upgrade"),
            "{text}"
        );
        assert!(text.contains(r#""type":"connection_error""#), "{text}");
        assert!(text.contains("too_many_connections"), "{text}");
        assert!(
            out.windows(2).any(|w| w == [0x11, 0x97]),
            "no 4503 close: {text}"
        );
    }
}
