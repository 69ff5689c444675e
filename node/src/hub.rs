//! The Message Hub relay (RabbitMQ), see `docs/message-hub.md`.
//!
//! **Publishing.** Every committed session event has an outbox row (same transaction,
//! `crate::outbox`). After a commit the session's actor marks the session *dirty*; the
//! relay then reads that session's unpublished rows from PostgreSQL in version order,
//! publishes them (persistent, mandatory) and waits for the broker's confirms, and
//! marks them published only after the confirm. Every pass starts at the session's
//! oldest unconfirmed row, so after a crash or a broker outage the next pass (by the
//! new owner after activation, or by the sweeper of the node the ring names)
//! republishes from there: delivery is at least once, first deliveries come in
//! version order, and consumers dedupe on `event_id`.
//!
//! **Consuming.** All nodes consume one durable queue (competing consumers, bounded
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
use gs_shared::auth::Role;
use gs_shared::config::RabbitConfig;
use gs_shared::forward::Forwarder;
use gs_shared::rpc::{Caller, RequestBody};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
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

/// How long an outbox row may stay unpublished before the sweeper looks at it.
const STALE_OUTBOX_MS: i64 = 3000;
/// How often the sweeper and the publisher's retry tick run.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How long relaying one inbound event to all its sessions may take per attempt.
const RELAY_DEADLINE: Duration = Duration::from_secs(10);

/// The relay's shared state.
pub struct Hub {
    cfg: RabbitConfig,
    dirty: Mutex<BTreeSet<Uuid>>,
    wake: Notify,
    up: AtomicBool,
}

impl Hub {
    pub fn new(cfg: RabbitConfig) -> Arc<Hub> {
        Arc::new(Hub {
            cfg,
            dirty: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            up: AtomicBool::new(false),
        })
    }

    /// A session has outbox rows to publish.
    pub fn dirty(&self, session: Uuid) {
        if !self.cfg.enabled {
            return;
        }
        self.dirty.lock().unwrap().insert(session);
        self.wake.notify_one();
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
                    self.up.store(true, Ordering::Relaxed);
                    tracing::info!("Message Hub connected");
                    // Publish whatever waited while we were away.
                    self.wake.notify_one();
                    let reason = session.serve(&self, &ctx).await;
                    self.up.store(false, Ordering::Relaxed);
                    tracing::warn!(%reason, "Message Hub connection lost; reconnecting");
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        session.conn.close(0, "reconnecting".into()),
                    )
                    .await;
                }
                Err(e) => {
                    self.up.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Message Hub unavailable");
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
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&self.cfg.url, props),
        )
        .await
        .map_err(|_| {
            lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Closed,
            ))
        })??;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.declare(&publish).await?;
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

    /// Exchanges and queues (idempotent).
    async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind) in [
            (&self.cfg.exchange, ExchangeKind::Topic),
            (&self.cfg.inbound_exchange, ExchangeKind::Topic),
            (&self.cfg.dead_letter_exchange, ExchangeKind::Fanout),
        ] {
            ch.exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
                .await?;
        }
        let queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(
            self.cfg.inbound_queue.as_str().into(),
            queue,
            FieldTable::default(),
        )
        .await?;
        for key in [CHARACTER_CHANGED, CAMPAIGN_CHANGED] {
            ch.queue_bind(
                self.cfg.inbound_queue.as_str().into(),
                self.cfg.inbound_exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        // Retry queues: after their TTL, messages go back to the main queue.
        for level in 1..=self.cfg.max_redeliveries.max(1) as i64 {
            let mut retry_args = FieldTable::default();
            retry_args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(self.retry_backoff_ms(level) as i64),
            );
            retry_args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            retry_args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(self.cfg.inbound_queue.as_str().into()),
            );
            ch.queue_declare(self.retry_queue(level).as_str().into(), queue, retry_args)
                .await?;
        }
        ch.queue_declare(
            self.cfg.dead_letter_queue.as_str().into(),
            queue,
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            self.cfg.dead_letter_queue.as_str().into(),
            self.cfg.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    /// Finds outbox rows left behind (a dead owner, a broker outage) for sessions the
    /// ring places on this node, and marks them dirty.
    async fn sweep(self: Arc<Self>, ctx: Arc<NodeCtx>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.is_up() {
                continue;
            }
            match ctx.store.stale_outbox_sessions(STALE_OUTBOX_MS, 1000).await {
                Ok(sessions) => {
                    for s in sessions {
                        if ctx.cluster.owner(&s).as_deref() == Some(ctx.id.as_str()) {
                            self.dirty(s);
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "outbox sweep failed"),
            }
        }
    }

    /// Publishes the dirty sessions' outbox rows until the connection fails.
    async fn publish_loop(&self, ctx: &NodeCtx, ch: &Channel) -> String {
        loop {
            let sessions: Vec<Uuid> = std::mem::take(&mut *self.dirty.lock().unwrap())
                .into_iter()
                .collect();
            for (i, s) in sessions.iter().enumerate() {
                if let Err(e) = self.publish_session(ctx, ch, *s).await {
                    // Keep it (and the ones not reached) for after the reconnect.
                    let mut d = self.dirty.lock().unwrap();
                    d.extend(sessions[i..].iter().copied());
                    return format!("publishing: {e}");
                }
            }
            if !ch.status().connected() {
                return "publish channel closed".into();
            }
            let _ = tokio::time::timeout(SWEEP_EVERY, self.wake.notified()).await;
        }
    }

    async fn publish_session(
        &self,
        ctx: &NodeCtx,
        ch: &Channel,
        session: Uuid,
    ) -> anyhow::Result<()> {
        loop {
            let rows = ctx
                .store
                .pending_outbox(session, self.cfg.outbox_batch.max(1))
                .await?;
            if rows.is_empty() {
                return Ok(());
            }
            let started = Instant::now();
            let mut confirms = Vec::with_capacity(rows.len());
            for (event_id, key, payload) in &rows {
                let props = BasicProperties::default()
                    .with_message_id(event_id.to_string().as_str().into())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2);
                let body = serde_json::to_vec(payload)?;
                let confirm = ch
                    .basic_publish(
                        self.cfg.exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        props,
                    )
                    .await?;
                confirms.push(confirm);
            }
            let mut done = Vec::with_capacity(rows.len());
            for ((event_id, key, _), confirm) in rows.iter().zip(confirms) {
                match confirm.await? {
                    Confirmation::Ack(returned) => {
                        if returned.is_some() {
                            // Nobody is bound to this key: the broker accepted it but
                            // had no queue to put it in.
                            metrics::counter!("gs_node_hub_unroutable_total").increment(1);
                            tracing::debug!(%event_id, %key, "published event had no route");
                        }
                        done.push(*event_id);
                    }
                    Confirmation::Nack(_) => anyhow::bail!("broker refused event {event_id}"),
                    Confirmation::NotRequested => anyhow::bail!("publisher confirms are off"),
                }
            }
            ctx.store.mark_published(&done).await?;
            metrics::counter!("gs_node_hub_published_total").increment(done.len() as u64);
            metrics::histogram!("gs_node_hub_publish_seconds")
                .record(started.elapsed().as_secs_f64());
            if (rows.len() as i64) < self.cfg.outbox_batch.max(1) {
                return Ok(());
            }
        }
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

    async fn consume_loop(&self, hub: &Arc<Hub>, ctx: &Arc<NodeCtx>) -> String {
        let tag = format!(
            "gs-node-{}-{}",
            ctx.id,
            &Uuid::new_v4().simple().to_string()[..6]
        );
        let mut consumer = match self
            .consume
            .basic_consume(
                hub.cfg.inbound_queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => return format!("consume: {e}"),
        };
        let permits = Arc::new(Semaphore::new(hub.cfg.prefetch.max(1) as usize));
        let forwarder = Forwarder::new(
            ctx.nats.clone(),
            ctx.subjects.clone(),
            ctx.cluster.clone(),
            ctx.cfg.nats.request_timeout_ms,
            RELAY_DEADLINE.as_millis() as u64,
        );
        while let Some(delivery) = consumer.next().await {
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => return format!("consumer: {e}"),
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return "consumer stopped".into();
            };
            let (hub, ctx, side, forwarder, broken) = (
                hub.clone(),
                ctx.clone(),
                self.side.clone(),
                forwarder.clone(),
                self.broken.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                if !handle_delivery(&hub, &ctx, &side, &forwarder, delivery).await {
                    broken.notify_one();
                }
            });
        }
        "consumer ended".into()
    }
}

/// What to do with an inbound message.
enum Verdict {
    /// Applied by every affected session (or none was affected): ack.
    Done,
    /// Cannot ever be applied: dead-letter with this reason.
    Poison(String),
    /// Failed for now: retry later.
    Failed(String),
}

/// Handles one inbound message; false when it could not be requeued (the connection
/// should be replaced).
async fn handle_delivery(
    hub: &Hub,
    ctx: &NodeCtx,
    side: &Channel,
    forwarder: &Forwarder,
    delivery: lapin::message::Delivery,
) -> bool {
    let key = original_key(&delivery);
    let attempts = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(n),
            AMQPValue::LongInt(n) => Some(n as i64),
            _ => None,
        })
        .unwrap_or(0);
    let verdict = relay(ctx, forwarder, &key, &delivery).await;
    let outcome = finish_delivery(hub, side, &delivery, &key, attempts, verdict).await;
    handled(delivery, outcome).await
}

/// Applies a verdict: counts it, or requeues/dead-letters the message.
async fn finish_delivery(
    hub: &Hub,
    side: &Channel,
    delivery: &lapin::message::Delivery,
    key: &str,
    attempts: i64,
    verdict: Verdict,
) -> lapin::Result<()> {
    match verdict {
        Verdict::Done => {
            metrics::counter!("gs_node_hub_applied_total").increment(1);
            Ok(())
        }
        Verdict::Poison(reason) => dead_letter(hub, side, delivery, key, &reason).await,
        Verdict::Failed(reason) if attempts + 1 >= hub.cfg.max_redeliveries as i64 => {
            let reason = format!("failed {} times: {reason}", attempts + 1);
            dead_letter(hub, side, delivery, key, &reason).await
        }
        Verdict::Failed(reason) => {
            tracing::info!(%key, attempts = attempts + 1, %reason, "inbound event failed; retrying later");
            metrics::counter!("gs_node_hub_retried_total").increment(1);
            retry_later(hub, side, delivery, key, attempts + 1).await
        }
    }
}

/// Acks a message that is safe elsewhere, or gives it back; false when it had to be
/// given back.
async fn handled(delivery: lapin::message::Delivery, outcome: lapin::Result<()>) -> bool {
    match outcome {
        // Only now is the message safe elsewhere (applied, requeued or dead-lettered).
        Ok(()) => {
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                tracing::debug!(error = %e, "ack failed; the broker will redeliver");
            }
            true
        }
        // Give it back to the broker now (another consumer, or this one after the
        // reconnect, gets it again).
        Err(e) => {
            tracing::warn!(error = %e, "could not requeue an inbound event; returning it to the queue");
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            false
        }
    }
}

/// The routing key the event was published with: a message coming back from a retry
/// queue carries it in a header (its delivery key is then the queue's name).
fn original_key(d: &lapin::message::Delivery) -> String {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get(ORIGINAL_KEY_HEADER) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        })
        .unwrap_or_else(|| d.routing_key.to_string())
}

/// Parses an inbound event and relays it to the owner of every affected session.
async fn relay(
    ctx: &NodeCtx,
    forwarder: &Forwarder,
    key: &str,
    delivery: &lapin::message::Delivery,
) -> Verdict {
    let payload: Value = match serde_json::from_slice(&delivery.data) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Verdict::Poison("the payload is not a JSON object".into()),
        Err(e) => return Verdict::Poison(format!("the payload is not JSON: {e}")),
    };
    // The event id: the payload's, else the message id, else one derived from the
    // bytes (a redelivery carries the same bytes).
    let event_id = payload["event_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|m| Uuid::parse_str(m.as_str()).ok())
        })
        .unwrap_or_else(|| Uuid::new_v5(&Uuid::NAMESPACE_OID, &delivery.data));
    let sessions = match key {
        CHARACTER_CHANGED => {
            let Some(c) = payload["character_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                return Verdict::Poison("`character_id` (a UUID) is missing".into());
            };
            if !payload["details"].is_object() {
                return Verdict::Poison("`details` (an object) is missing".into());
            }
            ctx.store.character_sessions(c).await
        }
        CAMPAIGN_CHANGED => {
            let Some(c) = payload["campaign_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                return Verdict::Poison("`campaign_id` (a UUID) is missing".into());
            };
            ctx.store.campaign_sessions(c).await
        }
        other => return Verdict::Poison(format!("unexpected routing key {other:?}")),
    };
    let sessions = match sessions {
        Ok(s) => s,
        Err(e) => return Verdict::Failed(format!("session index: {e}")),
    };
    let caller = Caller {
        user_id: Uuid::nil(),
        role: Role::Admin,
    };
    let results = futures::future::join_all(sessions.iter().map(|s| {
        forwarder.request(
            *s,
            caller,
            RequestBody::HubEvent {
                event_id,
                kind: key.to_string(),
                payload: payload.clone(),
            },
        )
    }))
    .await;
    let mut failed = Vec::new();
    for (s, r) in sessions.iter().zip(results) {
        match r {
            Ok(_) => {}
            // Malformed details: no session will ever accept it.
            Err(e) if e.code == "invalid_payload" || e.code == "invalid_character" => {
                return Verdict::Poison(format!(
                    "session {s} refused it: {}: {}",
                    e.code, e.message
                ));
            }
            // Refusals that mean there is nothing to apply in that session.
            Err(e) if NOT_APPLICABLE.contains(&e.code.as_str()) => {
                tracing::debug!(session = %s, code = %e.code, "inbound event not applicable");
            }
            Err(e) => failed.push(format!("session {s}: {}", e.code)),
        }
    }
    if failed.is_empty() {
        Verdict::Done
    } else {
        Verdict::Failed(failed.join(", "))
    }
}

/// Session answers to an inbound event that mean "nothing to apply there" (the
/// message is then done for that session). Any other refusal is retried.
const NOT_APPLICABLE: &[&str] = &[
    "unknown_character",
    "session_ended",
    "session_not_found",
    "not_member",
];

/// Requeues a message through the retry queue of its attempt, back after that
/// queue's TTL.
async fn retry_later(
    hub: &Hub,
    side: &Channel,
    d: &lapin::message::Delivery,
    key: &str,
    attempts: i64,
) -> lapin::Result<()> {
    let queue = hub.retry_queue(attempts);
    let attempts = (ATTEMPTS_HEADER, AMQPValue::LongLongInt(attempts));
    republish(side, d, "", &queue, key, attempts).await
}

/// Moves a message to the dead-letter queue, with the reason.
async fn dead_letter(
    hub: &Hub,
    side: &Channel,
    d: &lapin::message::Delivery,
    key: &str,
    reason: &str,
) -> lapin::Result<()> {
    tracing::warn!(routing_key = %key, %reason, "inbound event dead-lettered");
    metrics::counter!("gs_node_hub_dead_lettered_total").increment(1);
    let reason = (REASON_HEADER, AMQPValue::LongString(reason.into()));
    republish(side, d, &hub.cfg.dead_letter_exchange, key, key, reason).await
}

/// Publishes a copy of `d` (confirmed) to `exchange` with `routing_key`, its headers
/// plus `extra` and the original routing key `key`.
async fn republish(
    side: &Channel,
    d: &lapin::message::Delivery,
    exchange: &str,
    routing_key: &str,
    key: &str,
    extra: (&str, AMQPValue),
) -> lapin::Result<()> {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(extra.0.into(), extra.1);
    headers.insert(
        ORIGINAL_KEY_HEADER.into(),
        AMQPValue::LongString(key.into()),
    );
    let props = d.properties.clone().with_headers(headers);
    let confirm = side
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            &d.data,
            props,
        )
        .await?
        .await?;
    confirmed(confirm)
}

fn confirmed(c: Confirmation) -> lapin::Result<()> {
    match c {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Error,
            "the broker refused the message",
        ))),
    }
}

/// The command an inbound event becomes in a session (the owner's side).
pub fn command_for(kind: &str, payload: &Value) -> Result<gs_rules::Command, gs_rules::RuleError> {
    match kind {
        CHARACTER_CHANGED => {
            let character_id = payload["character_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| {
                    gs_rules::RuleError::new("invalid_payload", "`character_id` is missing")
                })?;
            let changes = gs_rules::character::CharacterChanges::from_hub(&payload["details"])?;
            Ok(gs_rules::Command::CharacterSync {
                character_id,
                changes,
            })
        }
        CAMPAIGN_CHANGED => {
            // The campaign's news lands in the state document under /campaign, where
            // every client sees it (a state_update event).
            let value = json!({
                "campaign_id": payload["campaign_id"],
                "change_type": payload["change_type"],
                "details": payload["details"],
                "timestamp": payload["timestamp"],
            });
            Ok(gs_rules::Command::StateUpdate(
                gs_rules::command::StateUpdate {
                    changes: vec![gs_rules::command::Change {
                        path: "/campaign".into(),
                        value: Some(value),
                        previous: None,
                        op: Default::default(),
                    }],
                },
            ))
        }
        other => Err(gs_rules::RuleError::new(
            "invalid_payload",
            format!("unknown hub event {other:?}"),
        )),
    }
}
