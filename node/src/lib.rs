//! Worker node of the Game Session Service.
//!
//! A node owns sessions. For each owned session it runs one actor ([`actor`]) that is
//! the only writer of that session's state; it commits every change to PostgreSQL
//! before acknowledging it ([`committer`]), publishes the events on NATS for routers,
//! and keeps the ICD's Redis keys as a cache ([`cache`]). Which sessions a node serves
//! is decided by the ring (placement, `gs_shared::ring`); whether it may write them is
//! decided by the ownership lock plus fencing epoch ([`ownership`], [`store`]).
//!
//! # Layout
//!
//! * [`run`]: start-up and shutdown; [`NodeCtx`]: what every task shares.
//! * [`registry`]: session → actor; spawning, routing, handoff on ring changes.
//! * [`actor`]: one session: activation (lock, epoch, recovery), batches, commit, publish.
//! * [`committer`]: group commit of many sessions' events in one transaction.
//! * [`store`]: PostgreSQL queries (sessions, events, snapshots, ownership epoch).
//! * [`ownership`]: Redis locks (rslock), renewal, breaking a dead owner's lock.
//! * [`cache`]: the ICD's Redis keys, written in the background.
//! * [`outbox`], [`hub`]: Message Hub (RabbitMQ) outbox and relay.
//! * [`health`]: `/health/live`, `/health/ready`, `/metrics`.

pub mod actor;
pub mod cache;
pub mod committer;
pub mod error;
pub mod health;
pub mod history;
pub mod hub;
pub mod outbox;
pub mod ownership;
pub mod registry;
pub mod store;

use crate::actor::{Envelope, Reply};
use futures::StreamExt;
use gs_shared::cluster_view::ClusterView;
use gs_shared::config::{ms, Config};
use gs_shared::keys::Keys;
use gs_shared::membership::MemberKind;
use gs_shared::protocol::{codes, WireError};
use gs_shared::rpc::{NodeReply, NodeRequest, ReplyBody, RequestBody, Subjects};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything a node's tasks share.
pub struct NodeCtx {
    pub cfg: Config,
    pub id: String,
    pub subjects: Subjects,
    pub keys: Keys,
    pub nats: async_nats::Client,
    pub store: store::Store,
    pub committer: committer::Committer,
    pub ownership: ownership::Ownership,
    pub cluster: ClusterView,
    pub cache: cache::Cache,
    pub registry: registry::Registry,
    pub redis: redis::aio::ConnectionManager,
    pub hub: Arc<hub::Hub>,
}

/// Every this many snapshots one is kept for good (the others are pruned once a newer
/// one exists): a rollback to an old version replays at most this many snapshots'
/// worth of events.
pub const SNAPSHOT_ANCHOR_EVERY: u64 = 10;

/// A generated member id, when none is configured.
pub fn generated_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Runs a node until `shutdown` resolves, then drains: announces draining (off the
/// ring everywhere), hands every session off (unlock, redirect), and leaves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    cfg.validate()?;
    gs_shared::telemetry::install_crypto_provider();
    let id = if cfg.node.id.is_empty() {
        generated_id("node")
    } else {
        cfg.node.id.clone()
    };
    tracing::info!(
        node = %id,
        nats = %gs_shared::config::redact_url(&cfg.nats.url),
        redis = %gs_shared::config::redact_url(&cfg.redis.url),
        rabbitmq = %gs_shared::config::redact_url(&cfg.rabbitmq.url),
        postgres = %format!("{}@{}:{}/{}", cfg.postgres.user, cfg.postgres.host, cfg.postgres.port, cfg.postgres.dbname),
        "starting node"
    );

    let applied = gs_shared::db::migrate(&cfg.postgres).await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "migrations applied");
    }
    let pool = gs_shared::db::pool(&cfg.postgres, true)?;
    let store = store::Store::new(pool);
    let (committer, _commit_tasks) = committer::Committer::start(
        store.clone(),
        committer::CommitterConfig {
            workers: cfg.node.committers,
            max_events: cfg.node.commit_batch_max,
            anchor_every: cfg.node.snapshot_every.max(1) * SNAPSHOT_ANCHOR_EVERY,
        },
    );

    let redis = gs_shared::connect::redis(&cfg).await?;
    let keys = Keys::new(&cfg.redis.key_prefix);
    let ownership = ownership::Ownership::new(
        id.clone(),
        keys.clone(),
        &cfg.redis.url,
        redis.clone(),
        ms(cfg.node.lock_ttl_ms),
        ms(cfg.node.lock_renew_ms),
        ms(cfg.redis.op_timeout_ms),
    )?;
    let (cache, _cache_task) =
        cache::Cache::start(redis.clone(), keys.clone(), ms(cfg.redis.op_timeout_ms));

    let nats = gs_shared::connect::nats(&cfg, &id).await?;
    let subjects = Subjects::new(&cfg.nats.subject_prefix);

    let listener = tokio::net::TcpListener::bind(&cfg.node.http_listen).await?;
    let http_addr: SocketAddr = listener.local_addr()?;
    // Listen for requests before announcing ourselves: a member that is on the ring
    // must answer (an unanswered ping would get it dropped as dead).
    let mut rpc = nats.subscribe(subjects.node_rpc(&id)).await?;
    let (cluster, _cluster_tasks) = ClusterView::start(
        nats.clone(),
        subjects.clone(),
        &cfg.membership,
        id.clone(),
        MemberKind::Node,
        Some(format!("http://{http_addr}")),
    )
    .await?;

    let ctx = Arc::new(NodeCtx {
        cfg: cfg.clone(),
        id: id.clone(),
        subjects: subjects.clone(),
        keys,
        nats: nats.clone(),
        store,
        committer,
        ownership,
        cluster: cluster.clone(),
        cache,
        registry: registry::Registry::default(),
        redis,
        hub: hub::Hub::new(cfg.rabbitmq.clone()),
    });
    let _hub_tasks = ctx.hub.start(ctx.clone());

    let metrics = gs_shared::telemetry::metrics_recorder();
    let health_task = tokio::spawn(health::serve(ctx.clone(), listener, metrics));

    // Requests from routers.
    let rpc_ctx = ctx.clone();
    let rpc_task = tokio::spawn(async move {
        while let Some(msg) = rpc.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            match serde_json::from_slice::<NodeRequest>(&msg.payload) {
                Ok(NodeRequest {
                    body: RequestBody::Ping,
                    ..
                }) => {
                    Reply::Nats(reply)
                        .send(
                            &rpc_ctx,
                            NodeReply::Ok {
                                body: ReplyBody::Done,
                            },
                        )
                        .await
                }
                Ok(req) => {
                    rpc_ctx
                        .registry
                        .dispatch(
                            &rpc_ctx,
                            Envelope {
                                req,
                                reply: Reply::Nats(reply),
                            },
                        )
                        .await
                }
                Err(e) => {
                    Reply::Nats(reply)
                        .send(
                            &rpc_ctx,
                            NodeReply::err(WireError::new(
                                codes::BAD_REQUEST,
                                format!("bad request: {e}"),
                            )),
                        )
                        .await
                }
            }
        }
    });

    // Handoff when the ring moves sessions elsewhere.
    let mut ring_changes = cluster.ring_changes();
    let rb_ctx = ctx.clone();
    let rebalance_task = tokio::spawn(async move {
        while ring_changes.changed().await.is_ok() {
            rb_ctx.registry.rebalance(&rb_ctx);
        }
    });

    tracing::info!(node = %id, http = %http_addr, "node ready");
    shutdown.await;

    tracing::info!(node = %id, sessions = ctx.registry.len(), "draining");
    cluster.set_draining().await;
    ctx.registry.shutdown_all();
    let deadline = Instant::now() + ms(cfg.node.shutdown_timeout_ms);
    while !ctx.registry.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.leave().await;
    rpc_task.abort();
    rebalance_task.abort();
    health_task.abort();
    let _ = nats.flush().await;
    tracing::info!(node = %id, "stopped");
    Ok(())
}
