//! Inbound Message Hub events: competing consumers on one durable queue, relayed to
//! the owners of the affected sessions over NATS, acked only once applied (or safely
//! requeued through a retry queue, or dead-lettered with the reason).

use super::*;
use gs_shared::protocol::{self, codes, WireError};
use gs_shared::rpc::ReplyBody;

impl HubConnection {
    pub(super) async fn consume_loop(&self, hub: &Arc<Hub>, ctx: &Arc<NodeCtx>) -> String {
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
        let forwarder = ctx.forwarder(RELAY_DEADLINE);
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
    let payload = match parse(ctx, delivery) {
        Ok(p) => p,
        Err(poison) => return poison,
    };
    let event_id = event_id(&payload, delivery);
    let sessions = match affected_sessions(ctx, key, &payload).await {
        Ok(s) => s,
        Err(verdict) => return verdict,
    };
    let results = futures::future::join_all(sessions.iter().map(|s| {
        forwarder.request(
            *s,
            crate::SYSTEM,
            RequestBody::HubEvent {
                event_id,
                kind: key.to_string(),
                payload: payload.clone(),
            },
        )
    }))
    .await;
    verdict(&sessions, results)
}

/// The payload, if the service can store and relay it: a JSON object, without what
/// nothing may carry (deep nesting, U+0000).
fn parse(ctx: &NodeCtx, delivery: &lapin::message::Delivery) -> Result<Value, Verdict> {
    if let Ok(text) = std::str::from_utf8(&delivery.data) {
        if let Err(e) = protocol::check_json_text(text, ctx.cfg.document.max_json_depth) {
            return Err(Verdict::Poison(format!("the payload is refused: {e}")));
        }
    }
    match serde_json::from_slice(&delivery.data) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(Verdict::Poison("the payload is not a JSON object".into())),
        Err(e) => Err(Verdict::Poison(format!("the payload is not JSON: {e}"))),
    }
}

/// The event id: the payload's, else the message id, else one derived from the bytes
/// (a redelivery carries the same bytes).
fn event_id(payload: &Value, delivery: &lapin::message::Delivery) -> Uuid {
    payload["event_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|m| Uuid::parse_str(m.as_str()).ok())
        })
        .unwrap_or_else(|| Uuid::new_v5(&Uuid::NAMESPACE_OID, &delivery.data))
}

/// The sessions an event concerns: the character's (by the character index) or the
/// campaign's.
async fn affected_sessions(
    ctx: &NodeCtx,
    key: &str,
    payload: &Value,
) -> Result<Vec<Uuid>, Verdict> {
    let uuid = |field: &str| {
        payload[field]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
    };
    let sessions = match key {
        CHARACTER_CHANGED => {
            let Some(c) = uuid("character_id") else {
                return Err(Verdict::Poison("`character_id` (a UUID) is missing".into()));
            };
            if !payload["details"].is_object() {
                return Err(Verdict::Poison("`details` (an object) is missing".into()));
            }
            ctx.store.character_sessions(c).await
        }
        CAMPAIGN_CHANGED => {
            let Some(c) = uuid("campaign_id") else {
                return Err(Verdict::Poison("`campaign_id` (a UUID) is missing".into()));
            };
            ctx.store.campaign_sessions(c).await
        }
        other => return Err(Verdict::Poison(format!("unexpected routing key {other:?}"))),
    };
    sessions.map_err(|e| Verdict::Failed(format!("session index: {e}")))
}

/// The verdict on the sessions' answers: poison when one says no session ever will
/// accept it, failed (retried) when one could not apply it for now.
fn verdict(sessions: &[Uuid], results: Vec<Result<ReplyBody, WireError>>) -> Verdict {
    let mut failed = Vec::new();
    for (s, r) in sessions.iter().zip(results) {
        match r {
            Ok(_) => {}
            // Malformed details: no session will ever accept it.
            Err(e) if e.code == codes::INVALID_PAYLOAD || e.code == codes::INVALID_CHARACTER => {
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
    codes::UNKNOWN_CHARACTER,
    codes::SESSION_ENDED,
    codes::SESSION_NOT_FOUND,
    codes::NOT_MEMBER,
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
                    gs_rules::RuleError::new(codes::INVALID_PAYLOAD, "`character_id` is missing")
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
                    update_id: None,
                    timestamp: None,
                },
            ))
        }
        // A service's answer, handed to the owner by `crate::services` as a command.
        crate::services::SERVICE_COMMAND => serde_json::from_value(payload.clone()).map_err(|e| {
            gs_rules::RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("unreadable service command: {e}"),
            )
        }),
        other => Err(gs_rules::RuleError::new(
            codes::INVALID_PAYLOAD,
            format!("unknown hub event {other:?}"),
        )),
    }
}
