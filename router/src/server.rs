//! The router's HTTP(S) server: our own accept loop around warp's service.
//!
//! warp 0.4 has no TLS feature, so connections are accepted here, wrapped in
//! `tokio-rustls` when a certificate is configured, and handed to hyper-util's
//! auto (HTTP/1 + HTTP/2) builder with upgrades enabled (WebSockets). The peer address
//! goes into each request's extensions as [`PeerAddr`] (warp's `addr::remote()` is
//! empty on this path) for per-IP rate limits. A semaphore bounds connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

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

/// Serves `routes` on `listener` until `shutdown` turns true.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    routes: F,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let svc = warp::service(routes);
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("gs_router_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        let tls = tls.clone();
        let permit = ConnPermit(Arc::new(permit));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    req.extensions_mut().insert(permit.clone());
                    let mut svc = svc.clone();
                    tower_service::Service::call(&mut svc, req)
                },
            );
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            builder
                                .serve_connection_with_upgrades(
                                    hyper_util::rt::TokioIo::new(tls_stream),
                                    service,
                                )
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                None => {
                    builder
                        .serve_connection_with_upgrades(
                            hyper_util::rt::TokioIo::new(stream),
                            service,
                        )
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
