//! Router (edge) of the Game Session Service.
//!
//! Routers are stateless: they terminate clients' HTTPS and WebSocket (wss)
//! connections, check tokens, place each session on a node with the ring, forward
//! requests to the owner over NATS (retrying across failovers), and fan the owner's
//! events out to their clients in version order. Any number can run; a client may use
//! any of them, and may reconnect to another and resume where it left off.
//!
//! # Layout
//!
//! * [`run`]: start-up and shutdown; [`RouterCtx`]: shared state.
//! * [`server`]: the accept loop (plain or TLS) around warp.
//! * [`api`]: REST endpoints, health, metrics, OpenAPI.
//! * [`ws`]: the WebSocket endpoint: checks and the upgrade.
//! * [`conn`]: one client WebSocket: attach, resume, commands, fan-out.
//! * [`hub`]: per-session NATS subscription, ordering and fan-out.
//! * [`sequencer`]: ordering of an event stream (sans-IO).
//! * [`limits`]: the ICD's rate limits; caps on open sockets per user and per IP.
//! * [`web`]: the embedded static files: the browser client module and the play page.

pub mod answers;
pub mod api;
pub mod conn;
pub mod hub;
pub mod limits;
pub mod sequencer;
pub mod server;
pub mod web;
pub mod ws;

use gs_shared::auth::Authority;
use gs_shared::cluster_view::ClusterView;
use gs_shared::config::{ms, Config};
use gs_shared::keys::Keys;
use gs_shared::membership::MemberKind;
use gs_shared::rpc::Subjects;
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use warp::Filter;

pub struct RouterCtx {
    pub cfg: Config,
    pub id: String,
    pub auth: Authority,
    pub cluster: ClusterView,
    pub forwarder: gs_shared::forward::Forwarder,
    pub hubs: hub::Hubs,
    pub limiter: limits::Limiter,
    /// Open WebSockets per user and per IP on this router (`router.max_sockets_per_*`).
    pub sockets: limits::SocketSlots,
    /// `https://host:port` (or `http://`): the REST base.
    pub http_base: String,
    /// `wss://host:port` (or `ws://`): the WebSocket base.
    pub ws_base: String,
    pub nats: async_nats::Client,
    /// The primary Redis (rate limits, readiness): one instance or a cluster.
    pub redis: gs_shared::primary::PrimaryRedis,
    pub connections: AtomicUsize,
    pub shutdown: watch::Receiver<bool>,
    /// The WebSocket connections' tasks and their detach notices: [`run`] waits for
    /// them (bounded by [`SHUTDOWN_GRACE`]) before it leaves.
    pub tasks: TaskTracker,
    pub metrics: PrometheusHandle,
}

/// Runs a router until `shutdown` resolves; then closes client connections
/// (code 1001, so clients reconnect to another router) and leaves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    cfg.validate()?;
    gs_shared::telemetry::install_crypto_provider();
    let id = router_id(&cfg);
    let tls = if cfg.router.tls_cert.is_empty() {
        None
    } else {
        Some(server::tls_acceptor(
            &cfg.router.tls_cert,
            &cfg.router.tls_key,
        )?)
    };
    let listener = tokio::net::TcpListener::bind(&cfg.router.listen).await?;
    let (http_base, ws_base) = public_bases(&cfg, listener.local_addr()?, tls.is_some());
    tracing::info!(
        router = %id,
        nats = %gs_shared::config::redact_url(&cfg.nats.url),
        redis = %gs_shared::config::redact_url(&cfg.redis.url),
        "starting router"
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ctx, cluster_tasks) =
        connect(&cfg, &id, http_base.clone(), ws_base, shutdown_rx.clone()).await?;
    let server = tokio::spawn(server::serve(
        listener,
        tls,
        filters(ctx.clone()),
        server::ServerLimits::from_config(&cfg.router),
        shutdown_rx,
    ));
    tracing::info!(router = %id, url = %http_base, "router ready");

    shutdown.await;
    tracing::info!(router = %id, "shutting down");
    let _ = shutdown_tx.send(true);
    ctx.cluster.leave().await;
    drain(&ctx, server, cluster_tasks).await;
    Ok(())
}

/// How long a stopping router waits for its connections to send their close frames
/// (1001) and their detach notices.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// After the shutdown signal: the accept loop stops on its own; every WebSocket task
/// closes its socket (1001) and tells the owner; the membership tasks end. Each is
/// joined, none is left running: what outlives [`SHUTDOWN_GRACE`] is reported.
async fn drain(ctx: &RouterCtx, server: JoinHandle<()>, cluster_tasks: Vec<JoinHandle<()>>) {
    ctx.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, ctx.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = ctx.tasks.len(),
            "connections still closing after the shutdown grace"
        );
    }
    let _ = server.await;
    for t in cluster_tasks {
        t.abort();
        let _ = t.await;
    }
}

/// `router.id`, or a new `router-xxxxxxxx`.
fn router_id(cfg: &Config) -> String {
    if cfg.router.id.is_empty() {
        format!("router-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
    } else {
        cfg.router.id.clone()
    }
}

/// The REST and WebSocket bases clients are told: from `router.public_url`, else
/// the listening address (`127.0.0.1` for an unspecified one).
fn public_bases(cfg: &Config, addr: std::net::SocketAddr, tls: bool) -> (String, String) {
    if cfg.router.public_url.is_empty() {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let (h, w) = if tls {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        (
            format!("{h}://{host}:{}", addr.port()),
            format!("{w}://{host}:{}", addr.port()),
        )
    } else {
        let base = cfg.router.public_url.trim_end_matches('/').to_string();
        let ws = base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        (base, ws)
    }
}

/// Loads the token keys, connects to Redis and NATS, joins the cluster, and builds
/// the router's shared state.
async fn connect(
    cfg: &Config,
    id: &str,
    http_base: String,
    ws_base: String,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<RouterCtx>, Vec<JoinHandle<()>>)> {
    let auth = Authority::load(&cfg.auth).map_err(|e| anyhow::anyhow!("auth: {e}"))?;
    if let Some(keys) = auth.public_keys() {
        tracing::info!(kids = ?keys.kids(), "external token issuers' public keys loaded");
    }
    let redis = gs_shared::connect::primary_redis(cfg).await?;
    let nats = gs_shared::connect::nats(cfg, id).await?;
    let subjects = Subjects::new(&cfg.nats.subject_prefix);
    let (cluster, cluster_tasks) = ClusterView::start(
        nats.clone(),
        subjects.clone(),
        &cfg.membership,
        id.to_string(),
        MemberKind::Router,
        Some(http_base.clone()),
    )
    .await?;
    let forwarder = gs_shared::forward::Forwarder::new(
        subjects.clone(),
        cluster.clone(),
        cfg.nats.request_timeout_ms,
        cfg.router.request_deadline_ms,
    );
    let hubs = hub::Hubs::new(
        nats.clone(),
        subjects,
        forwarder.clone(),
        cfg.router.recent_events,
    );
    let limiter = limits::Limiter::new(
        redis.clone(),
        Keys::for_config(&cfg.redis),
        ms(cfg.redis.op_timeout_ms),
    );
    let ctx = Arc::new(RouterCtx {
        auth,
        cfg: cfg.clone(),
        id: id.to_string(),
        cluster,
        forwarder,
        hubs,
        limiter,
        sockets: limits::SocketSlots::new(
            cfg.router.max_sockets_per_user,
            cfg.router.max_sockets_per_ip,
        ),
        http_base,
        ws_base,
        nats,
        redis,
        connections: AtomicUsize::new(0),
        shutdown,
        tasks: TaskTracker::new(),
        metrics: gs_shared::telemetry::metrics_recorder(),
    });
    Ok((ctx, cluster_tasks))
}

/// Every endpoint: the WebSocket, REST, the static files, and warp's rejections as
/// JSON errors.
fn filters(
    ctx: Arc<RouterCtx>,
) -> impl Filter<Extract: warp::Reply> + Clone + Send + Sync + 'static {
    ws::route(ctx.clone())
        .or(api::routes(ctx.clone()))
        .unify()
        .or(web::routes(ctx))
        .unify()
        .recover(api::recover)
        .unify()
        .with(warp::trace::request())
}
