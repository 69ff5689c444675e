//! The Message Hub relay (RabbitMQ), see `docs/message-hub.md`.
//!
//! **Publishing** ([`publish`]). The event log is the outbox: every committed event is
//! published, and each session's cursor (`hub_cursor.published_seq`) says how far the
//! broker has confirmed. After a commit the actor hands the committed events to the
//! relay in memory; the relay publishes each session's new events (persistent,
//! mandatory; consecutive events of one routing key as one message, see
//! `crate::outbox`), waits for the broker's confirms, and only then moves the cursors
//! forward, all sessions of a pass in one statement. Whatever memory does not hold
//! (after a restart, a takeover, an overflow during a broker outage) is read back from
//! the log from the cursor. So after a crash or an outage the next pass (by the new
//! owner after activation, or by the sweeper of the node the ring names) republishes
//! from the cursor: delivery is at least once, first deliveries come in version order,
//! and consumers dedupe on the events' `event_id`.
//!
//! **Consuming** ([`consume`]). All nodes consume one durable queue (competing consumers, bounded
//! prefetch) bound to `character.state.changed` and `campaign.state.changed`. The
//! node that receives an event finds the affected sessions (the character index, or
//! the campaign's sessions) and forwards the event to each session's owner over NATS
//! (retried across failovers); the owner applies it with the event's id as command id,
//! so a redelivery is a no-op. The message is acked only when every owner applied it.
//! A failure goes to a retry queue whose per-message TTL sends it back after a backoff
//! (the main queue is never blocked); a message that cannot be parsed, or that failed
//! `rabbitmq.max_redeliveries` times, goes to the dead-letter queue with the reason.
//!
//! **Resilience.** A supervisor reconnects with backoff after any broker error or a
//! closed connection, redeclares the topology and resumes both directions.
//! `/health/ready` reports the hub down meanwhile; play goes on and the outbox drains
//! when the broker is back.

use crate::NodeCtx;
use futures::StreamExt;
use gs_shared::config::RabbitConfig;
use gs_shared::forward::Forwarder;
use gs_shared::rpc::RequestBody;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use uuid::Uuid;

/// Routing keys of the inbound events.
pub const CHARACTER_CHANGED: &str = "character.state.changed";
pub const CAMPAIGN_CHANGED: &str = "campaign.state.changed";

/// Header counting an inbound message's failed attempts.
const ATTEMPTS_HEADER: &str = "x-gs-attempts";
/// Headers of a dead-lettered message.
const REASON_HEADER: &str = "x-gs-reason";
const ORIGINAL_KEY_HEADER: &str = "x-gs-original-routing-key";

pub mod breaker;
pub mod brokers;
mod consume;
pub mod publish;
pub mod rpc;
pub mod topology;

pub use consume::command_for;

/// How long a committed event may stay unpublished before the sweeper looks at it.
const STALE_OUTBOX_MS: i64 = 3000;
/// How often the sweeper and the publisher's retry tick run.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How long relaying one inbound event to all its sessions may take per attempt.
const RELAY_DEADLINE: Duration = Duration::from_secs(10);

/// The relay's shared state.
pub struct Hub {
    cfg: RabbitConfig,
    /// The broker URLs, tried in turn on every (re)connection.
    brokers: brokers::Brokers,
    /// Settings of the request/response client started on every connection.
    service_opts: rpc::ClientOptions,
    /// The request/response client of the current connection (`None` while down).
    services: Mutex<Option<rpc::ServiceClient>>,
    /// Committed events waiting for the broker.
    outbound: Mutex<publish::Outbound>,
    wake: Notify,
    up: AtomicBool,
}

impl Hub {
    pub fn new(cfg: RabbitConfig, service_opts: rpc::ClientOptions) -> Arc<Hub> {
        Arc::new(Hub {
            brokers: brokers::Brokers::from_list(&cfg.url),
            cfg,
            service_opts,
            services: Mutex::new(None),
            outbound: Mutex::new(publish::Outbound::default()),
            wake: Notify::new(),
            up: AtomicBool::new(false),
        })
    }

    /// The client for requests to other services, while the hub is connected.
    pub fn services(&self) -> Option<rpc::ServiceClient> {
        self.services.lock().unwrap().clone()
    }

    /// Whether the relay is connected (always true when disabled).
    pub fn is_up(&self) -> bool {
        !self.cfg.enabled || self.up.load(Ordering::Relaxed)
    }

    /// Retry queue of the `attempt`-th failure (1-based). One queue per backoff level,
    /// each with its own TTL, so a long backoff never holds up a shorter one.
    fn retry_queue(&self, attempt: i64) -> String {
        format!(
            "{}.retry.{}",
            self.cfg.inbound_queue,
            self.retry_level(attempt)
        )
    }

    fn retry_level(&self, attempt: i64) -> i64 {
        attempt.clamp(1, self.cfg.max_redeliveries.max(1) as i64)
    }

    /// Backoff of a retry level: `reconnect_min_ms` (at least 100 ms) doubled per
    /// level, at most 30 s.
    fn retry_backoff_ms(&self, level: i64) -> u64 {
        (self.cfg.reconnect_min_ms.max(100) << level.clamp(0, 16)).min(30_000)
    }

    /// Starts the supervisor and the sweeper.
    pub fn start(self: &Arc<Self>, ctx: Arc<NodeCtx>) -> Vec<tokio::task::JoinHandle<()>> {
        if !self.cfg.enabled {
            return vec![];
        }
        let hub = self.clone();
        let c = ctx.clone();
        let supervisor = tokio::spawn(async move { hub.supervise(c).await });
        let hub = self.clone();
        let sweeper = tokio::spawn(async move { hub.sweep(ctx).await });
        vec![supervisor, sweeper]
    }

    /// Connects, serves until the connection fails, reconnects with backoff.
    async fn supervise(self: Arc<Self>, ctx: Arc<NodeCtx>) {
        let min = Duration::from_millis(self.cfg.reconnect_min_ms.max(10));
        let max = Duration::from_millis(self.cfg.reconnect_max_ms.max(self.cfg.reconnect_min_ms));
        let mut backoff = min;
        loop {
            match self.connect(&ctx).await {
                Ok(session) => {
                    backoff = min;
                    // A new request/response client on each connection (the old one's
                    // reply queue died with its connection).
                    match rpc::ServiceClient::start(&session.conn, self.service_opts.clone()).await
                    {
                        Ok(client) => *self.services.lock().unwrap() = Some(client),
                        Err(e) => tracing::warn!(error = %e, "service client not started"),
                    }
                    self.up.store(true, Ordering::Relaxed);
                    tracing::info!("Message Hub connected");
                    // Publish whatever waited while we were away.
                    self.wake.notify_one();
                    let reason = session.serve(&self, &ctx).await;
                    self.up.store(false, Ordering::Relaxed);
                    self.services.lock().unwrap().take();
                    tracing::warn!(%reason, "Message Hub connection lost; reconnecting");
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        session.conn.close(0, "reconnecting".into()),
                    )
                    .await;
                }
                Err(e) => {
                    self.up.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        error = %gs_shared::config::redact_secrets(&e.to_string()),
                        url = %gs_shared::config::redact_url(&self.cfg.url),
                        retry_in_ms = backoff.as_millis() as u64,
                        "Message Hub unavailable"
                    );
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max);
        }
    }

    async fn connect(&self, ctx: &NodeCtx) -> lapin::Result<HubConnection> {
        let props = ConnectionProperties::default().with_connection_name(
            format!("gs-node {} {}", ctx.id, ctx.cfg.nats.subject_prefix).into(),
        );
        let (conn, i) = self.brokers.connect(props).await?;
        tracing::info!(
            broker = %gs_shared::config::redact_url(&self.brokers.urls()[i]),
            "Message Hub broker chosen"
        );
        self.declare(&conn).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let side = conn.create_channel().await?;
        side.confirm_select(ConfirmSelectOptions::default()).await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(self.cfg.prefetch.max(1), BasicQosOptions::default())
            .await?;
        Ok(HubConnection {
            conn,
            publish,
            side,
            consume,
            broken: Arc::new(Notify::new()),
        })
    }

    /// Exchanges and queues (idempotent; quorum queues, see [`topology`]).
    async fn declare(&self, conn: &Connection) -> lapin::Result<()> {
        let retries: Vec<(String, u64)> = (1..=self.cfg.max_redeliveries.max(1) as i64)
            .map(|level| (self.retry_queue(level), self.retry_backoff_ms(level)))
            .collect();
        topology::declare_all(conn, &self.cfg, &retries).await
    }
}

/// One live broker connection and its channels.
struct HubConnection {
    conn: Connection,
    /// Outbox publishing (confirms).
    publish: Channel,
    /// Retries and dead letters (confirms).
    side: Channel,
    consume: Channel,
    /// Signalled when a consumer task cannot requeue a message: reconnect.
    broken: Arc<Notify>,
}

impl HubConnection {
    /// Runs publisher and consumer until either fails; returns why.
    async fn serve(&self, hub: &Arc<Hub>, ctx: &Arc<NodeCtx>) -> String {
        tokio::select! {
            reason = hub.publish_loop(ctx, &self.publish) => reason,
            reason = self.consume_loop(hub, ctx) => reason,
            _ = self.broken.notified() => "the retry/dead-letter channel failed".into(),
        }
    }
}
