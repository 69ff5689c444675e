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
//! * [`run`]: start-up and shutdown (the node's own tasks are kept and joined, the
//!   actors drained by the registry); [`NodeCtx`]: what every task shares.
//! * [`registry`]: session → actor; spawning, routing, handoff on ring changes.
//! * [`actor`]: one session: activation (lock, epoch, recovery), batches, commit, publish.
//! * [`committer`]: group commit of many sessions' events in one transaction.
//! * [`store`]: PostgreSQL queries (sessions, events, snapshots, ownership epoch).
//! * [`ownership`]: Redis locks (rslock), renewal, breaking a dead owner's lock.
//! * [`cache`]: the ICD's Redis keys, written in the background.
//! * [`outbox`], [`hub`]: Message Hub (RabbitMQ) outbox and relay.
//! * [`services`]: the other services (Character, Campaign, LLM, Image) asked over
//!   the hub: checks before a create or join, requests after a commit, answers
//!   committed as events.
//! * [`health`]: `/health/live`, `/health/ready`, `/metrics`.

pub mod actor;
pub mod adopt;
pub mod cache;
pub mod committer;
pub mod error;
pub mod health;
pub mod history;
pub mod hub;
pub mod outbox;
pub mod ownership;
pub mod registry;
pub mod services;
pub mod store;

use crate::actor::{Envelope, Reply};
use futures::StreamExt;
use gs_shared::cluster_view::ClusterView;
use gs_shared::config::{ms, Config};
use gs_shared::keys::Keys;
use gs_shared::membership::MemberKind;
use gs_shared::protocol::{codes, WireError};
use gs_shared::request_batch;
use gs_shared::rpc::{NodeReply, NodeRequest, ReplyBody, RequestBody, Subjects};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
    /// The primary Redis (cache keys, readiness): one instance or a cluster.
    pub redis: gs_shared::primary::PrimaryRedis,
    pub hub: Arc<hub::Hub>,
}

impl NodeCtx {
    /// A forwarder for the node's own requests to sessions' owners (this node
    /// included: hub events, services' answers, adoption), each within `deadline`.
    pub fn forwarder(&self, deadline: std::time::Duration) -> gs_shared::forward::Forwarder {
        gs_shared::forward::Forwarder::new(
            self.subjects.clone(),
            self.cluster.clone(),
            self.cfg.nats.request_timeout_ms,
            deadline.as_millis() as u64,
        )
    }
}

/// The node acting as itself (as an admin, with no user).
pub const SYSTEM: gs_shared::rpc::Caller = gs_shared::rpc::Caller {
    user_id: uuid::Uuid::nil(),
    role: gs_shared::auth::Role::Admin,
};

/// Every this many snapshots one is kept for good (the others are pruned once a newer
/// one exists): a rollback to an old version replays at most this many snapshots'
/// worth of events.
pub const SNAPSHOT_ANCHOR_EVERY: u64 = 10;

/// How long a task that ends on the stop signal may take to end before it is
/// aborted.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A generated member id, when none is configured.
pub fn generated_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Runs a node until `shutdown` resolves, then drains: announces draining (off the
/// ring everywhere), hands every session off (unlock, redirect), leaves, and joins
/// its tasks.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    cfg.validate()?;
    gs_shared::telemetry::install_crypto_provider();
    let id = if cfg.node.id.is_empty() {
        generated_id("node")
    } else {
        cfg.node.id.clone()
    };
    log_start(&cfg, &id);
    let mut tasks = Tasks::new();
    let (ctx, http_addr) = start(cfg, id, &mut tasks).await?;
    tracing::info!(node = %ctx.id, http = %http_addr, "node ready");
    shutdown.await;

    drain(&ctx).await;
    tasks.join().await;
    let _ = ctx.nats.flush().await;
    tracing::info!(node = %ctx.id, "stopped");
    Ok(())
}

fn log_start(cfg: &Config, id: &str) {
    tracing::info!(
        node = %id,
        nats = %gs_shared::config::redact_url(&cfg.nats.url),
        redis = %gs_shared::config::redact_url(&cfg.redis.url),
        rabbitmq = %gs_shared::config::redact_url(&cfg.rabbitmq.url),
        postgres = %format!("{}@{}:{}/{}", cfg.postgres.user, cfg.postgres.host, cfg.postgres.port, cfg.postgres.dbname),
        "starting node"
    );
}

/// Start-up: storage, Redis, NATS, membership, then the servers. Returns the shared
/// context and the health server's address.
async fn start(
    cfg: Config,
    id: String,
    tasks: &mut Tasks,
) -> anyhow::Result<(Arc<NodeCtx>, SocketAddr)> {
    let store = open_store(&cfg).await?;
    let (committer, workers) = committer::Committer::start(
        store.clone(),
        committer::CommitterConfig {
            workers: cfg.node.committers,
            max_events: cfg.node.commit_batch_max,
            linger: std::time::Duration::from_micros(cfg.node.commit_linger_us),
            anchor_every: cfg.node.snapshot_every.max(1) * SNAPSHOT_ANCHOR_EVERY,
        },
    );
    tasks.service("committer", workers);

    let redis = gs_shared::connect::primary_redis(&cfg).await?;
    let keys = Keys::for_config(&cfg.redis);
    let ownership = ownership::Ownership::new(
        id.clone(),
        keys.clone(),
        &cfg.redis.lock_instances(),
        ms(cfg.node.lock_ttl_ms),
        ms(cfg.node.lock_renew_ms),
        ms(cfg.redis.op_timeout_ms),
    )?;
    let (cache, writer) =
        cache::Cache::start(redis.clone(), keys.clone(), ms(cfg.redis.op_timeout_ms));
    tasks.service("cache writer", [writer]);

    let nats = gs_shared::connect::nats(&cfg, &id).await?;
    let subjects = Subjects::new(&cfg.nats.subject_prefix);
    let listener = tokio::net::TcpListener::bind(&cfg.node.http_listen).await?;
    let http_addr: SocketAddr = listener.local_addr()?;
    // Listen for requests before announcing ourselves: a member that is on the ring
    // must answer (an unanswered ping would get it dropped as dead).
    let rpc = nats.subscribe(subjects.node_rpc(&id)).await?;
    let (cluster, listeners) = ClusterView::start(
        nats.clone(),
        subjects.clone(),
        &cfg.membership,
        id.clone(),
        MemberKind::Node,
        Some(format!("http://{http_addr}")),
    )
    .await?;
    tasks.service("membership", listeners);

    let ctx = Arc::new(NodeCtx {
        registry: registry::Registry::new(id.clone(), cluster.clone(), cfg.node.inbox_capacity),
        hub: hub::Hub::new(cfg.rabbitmq.clone(), services::client_options(&cfg)),
        cfg,
        id,
        subjects,
        keys,
        nats,
        store,
        committer,
        ownership,
        cluster,
        cache,
        redis,
    });
    tasks.service("hub relay", ctx.hub.start(ctx.clone()));
    serve(&ctx, listener, rpc, tasks);
    Ok((ctx, http_addr))
}

/// Connections opened and prepared before the node joins the ring (see
/// [`store::Store::warm`]): enough for the burst of activations a join brings, few
/// enough that many nodes on one PostgreSQL stay far from `max_connections`.
const WARM_CONNECTIONS: usize = 4;

/// Creates the database if needed, applies migrations, opens the pool and warms it.
async fn open_store(cfg: &Config) -> anyhow::Result<store::Store> {
    let applied = gs_shared::db::migrate(&cfg.postgres).await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "migrations applied");
    }
    let pool = gs_shared::db::pool(&cfg.postgres, true)?;
    let store = store::Store::new(pool);
    store.warm(WARM_CONNECTIONS).await?;
    Ok(store)
}

/// Starts the tasks that end on the stop signal: health and metrics, requests from
/// routers, handoff when the ring moves sessions elsewhere.
fn serve(
    ctx: &Arc<NodeCtx>,
    listener: tokio::net::TcpListener,
    rpc: async_nats::Subscriber,
    tasks: &mut Tasks,
) {
    let metrics = gs_shared::telemetry::metrics_recorder();
    let stop = tasks.stop_signal();
    let health = health::serve(ctx.clone(), listener, metrics, stopped(stop));
    tasks.stoppable("health", tokio::spawn(health));
    let stop = tasks.stop_signal();
    tasks.stoppable("requests", tokio::spawn(requests(ctx.clone(), rpc, stop)));
    let stop = tasks.stop_signal();
    tasks.stoppable("rebalance", tokio::spawn(follow_ring(ctx.clone(), stop)));
}

/// Resolves once the stop signal is raised (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves requests from routers until the stop signal.
async fn requests(ctx: Arc<NodeCtx>, mut rpc: async_nats::Subscriber, stop: watch::Receiver<bool>) {
    loop {
        let msg = tokio::select! {
            msg = rpc.next() => msg,
            _ = stopped(stop.clone()) => None,
        };
        let Some(msg) = msg else { break };
        request(&ctx, msg).await;
    }
}

/// One message: a request, or several in a batch (`gs_shared::request_batch`), each
/// served as if it had come alone.
async fn request(ctx: &Arc<NodeCtx>, msg: async_nats::Message) {
    match request_batch::decode(msg.headers.as_ref(), &msg.payload) {
        None => {
            if let Some(reply) = msg.reply {
                request_one(ctx, reply, &msg.payload).await
            }
        }
        Some(Ok(batch)) => {
            for r in batch {
                request_one(ctx, r.reply.into(), &r.payload).await
            }
        }
        Some(Err(e)) => {
            // Its requests cannot be answered (their reply subjects are unknown): the
            // sender's waiters time out and it tries again.
            metrics::counter!("gs_node_bad_request_batches_total").increment(1);
            tracing::warn!(error = %e, "malformed request batch dropped");
        }
    }
}

/// One request: a ping is answered here, the rest goes to the session's actor.
async fn request_one(ctx: &Arc<NodeCtx>, reply: async_nats::Subject, payload: &[u8]) {
    let reply = Reply::Nats(reply);
    match serde_json::from_slice::<NodeRequest>(payload) {
        Ok(NodeRequest {
            body: RequestBody::Ping,
            ..
        }) => {
            let pong = NodeReply::Ok {
                body: ReplyBody::Done,
            };
            reply.send(ctx, pong).await
        }
        Ok(req) if services::needs_admission(ctx, &req) => {
            // Asking other services takes up to their deadline: beside the request
            // loop, never in it (nor in the session's task).
            let ctx = ctx.clone();
            tokio::spawn(async move {
                match services::admit(&ctx, req).await {
                    Ok(req) => registry::dispatch(&ctx, Envelope { req, reply }).await,
                    Err(error) => reply.send(&ctx, NodeReply::err(error)).await,
                }
            });
        }
        Ok(req) => registry::dispatch(ctx, Envelope { req, reply }).await,
        Err(e) => {
            let error = WireError::new(codes::BAD_REQUEST, format!("bad request: {e}"));
            reply.send(ctx, NodeReply::err(error)).await
        }
    }
}

/// Hands sessions off when the ring moves them elsewhere, until the stop signal.
/// Members that left without a drain have their sessions adopted ([`adopt`]).
async fn follow_ring(ctx: Arc<NodeCtx>, stop: watch::Receiver<bool>) {
    let mut ring_changes = ctx.cluster.ring_changes();
    let mut ring = ctx.cluster.ring().nodes().clone();
    // Adoptions under way (aborted with this task at the stop signal).
    let mut adoptions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            changed = ring_changes.changed() => match changed {
                Ok(()) => {
                    ctx.registry.rebalance();
                    let dead = adopt::departed(&ctx, &ring);
                    ring = ctx.cluster.ring().nodes().clone();
                    while adoptions.try_join_next().is_some() {}
                    if !dead.is_empty() {
                        let ctx = ctx.clone();
                        adoptions.spawn(async move { adopt::adopt(&ctx, dead).await });
                    }
                }
                Err(_) => break,
            },
            _ = stopped(stop.clone()) => break,
        }
    }
}

/// The drain: off the ring everywhere, every session handed off (each actor joined,
/// within `node.shutdown_timeout_ms`), then the leave.
async fn drain(ctx: &NodeCtx) {
    tracing::info!(node = %ctx.id, sessions = ctx.registry.len(), "draining");
    ctx.cluster.set_draining().await;
    let aborted = ctx
        .registry
        .drain(ms(ctx.cfg.node.shutdown_timeout_ms))
        .await;
    if aborted > 0 {
        tracing::warn!(
            sessions = aborted,
            "session actors still running at the shutdown timeout were aborted"
        );
    }
    ctx.cluster.leave().await;
}

/// The node's own tasks (the actors are the registry's), kept to be joined at
/// shutdown: none is left detached. Dropped without [`Tasks::join`] (a failed
/// start-up), it aborts them.
struct Tasks {
    stop: watch::Sender<bool>,
    /// End by themselves once the stop signal is raised.
    stoppable: Vec<(&'static str, JoinHandle<()>)>,
    /// Run for the node's life (committers, cache writer, hub relay, membership
    /// listeners): aborted once the sessions are drained and the node has left, then
    /// joined. Nothing depends on them by then: no actor is left to commit, and the
    /// hub's outbox is the log (the next owner or the sweeper publishes the rest).
    services: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    fn new() -> Tasks {
        Tasks {
            stop: watch::channel(false).0,
            stoppable: Vec::new(),
            services: Vec::new(),
        }
    }

    fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    fn stoppable(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.stoppable.push((name, task));
    }

    fn service(&mut self, name: &'static str, tasks: impl IntoIterator<Item = JoinHandle<()>>) {
        self.services.extend(tasks.into_iter().map(|t| (name, t)));
    }

    /// Raises the stop signal and joins the stoppable tasks (aborting one that takes
    /// longer than [`STOP_GRACE`]), then aborts and joins the services.
    async fn join(mut self) {
        self.stop.send_replace(true);
        for (name, mut task) in std::mem::take(&mut self.stoppable) {
            let ended = match tokio::time::timeout(STOP_GRACE, &mut task).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::warn!(task = name, "task did not stop in time; aborting it");
                    task.abort();
                    task.await
                }
            };
            report(name, ended);
        }
        let services = std::mem::take(&mut self.services);
        for (_, task) in &services {
            task.abort();
        }
        for (name, task) in services {
            report(name, task.await);
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, task) in self.stoppable.iter().chain(&self.services) {
            task.abort();
        }
    }
}

/// Logs a task that panicked (an aborted one is expected).
fn report(name: &str, ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!(task = name, error = %e, "task panicked");
        }
    }
}
