//! The hub's exchanges and queues, declared (idempotently) on every connection, and
//! the migration of a queue whose arguments changed (a classic queue of an older
//! release becoming a quorum queue).
//!
//! **Quorum queues.** The inbound queue and the dead-letter queue are
//! `x-queue-type: quorum` (replicated Raft logs on a broker cluster, durable, with a
//! broker-side delivery count). The inbound queue carries `x-delivery-limit`
//! (`rabbitmq.delivery_limit`) and dead-letters to `rabbitmq.dead_letter_exchange`: a
//! message whose consumers keep dying before they ack it (a poison that crashes
//! nodes) leaves the queue after that many deliveries instead of cycling forever. The
//! retry queues stay classic: they only hold a message for its TTL.
//!
//! **Migration.** Redeclaring a queue with other arguments fails with
//! `PRECONDITION_FAILED` (and closes the channel), so an existing classic queue of the
//! same name cannot simply be redeclared as a quorum queue. The choice: keep the names
//! and migrate in place when it is safe, never losing a message:
//!
//! 1. the quorum declaration fails, a passive declaration shows the queue exists;
//! 2. if it holds messages, it stays as it is (the node uses it, logs a warning, sets
//!    `gs_node_hub_queue_migration_pending`), and the migration is tried again at the
//!    next connection;
//! 3. if it is empty: a holding queue `<name>.migrating` (quorum) is bound like the
//!    queue, so nothing published from then on is missed; the old queue is counted
//!    again and deleted if still empty (a message that arrived in between: back to 2;
//!    not by `if-empty`, which quorum queues refuse by closing the connection); the
//!    quorum queue is declared and bound; the holding queue is unbound, its messages
//!    moved into the new queue (publisher confirms, then ack) and it is deleted. Messages that reached both the holding
//!    queue and the new one arrive twice, which the consumer's dedupe by event id
//!    absorbs. A holding queue left by a node that died mid-way is emptied the same
//!    way at the next connection.

use super::{CAMPAIGN_CHANGED, CHARACTER_CHANGED};
use gs_shared::config::RabbitConfig;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

/// Suffix of the holding queue of a migration.
pub const MIGRATING_SUFFIX: &str = ".migrating";

/// Most messages moved out of a holding queue in one pass (bounded; the rest wait
/// for the next connection).
const MOVE_MAX: usize = 100_000;

/// A queue the hub declares: its name, arguments and bindings (exchange, key).
pub struct QueueSpec {
    pub name: String,
    pub args: FieldTable,
    pub bindings: Vec<(String, String)>,
}

/// How a queue was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// With the arguments asked for (possibly after migrating the old queue).
    AsAsked,
    /// An existing queue with other arguments that is not empty: used as it is.
    Kept,
}

/// The arguments of a quorum queue.
pub fn quorum_args() -> FieldTable {
    let mut a = FieldTable::default();
    a.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    a
}

/// The inbound queue: quorum, poison messages dead-lettered by delivery count.
pub fn inbound_spec(cfg: &RabbitConfig) -> QueueSpec {
    let mut args = quorum_args();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(cfg.delivery_limit.max(1) as i64),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(cfg.dead_letter_exchange.as_str().into()),
    );
    QueueSpec {
        name: cfg.inbound_queue.clone(),
        args,
        bindings: [CHARACTER_CHANGED, CAMPAIGN_CHANGED]
            .iter()
            .map(|k| (cfg.inbound_exchange.clone(), k.to_string()))
            .collect(),
    }
}

/// The dead-letter queue: quorum, bound to the dead-letter (fanout) exchange.
pub fn dead_letter_spec(cfg: &RabbitConfig) -> QueueSpec {
    QueueSpec {
        name: cfg.dead_letter_queue.clone(),
        args: quorum_args(),
        bindings: vec![(cfg.dead_letter_exchange.clone(), String::new())],
    }
}

/// The three exchanges (durable; idempotent).
pub async fn declare_exchanges(ch: &Channel, cfg: &RabbitConfig) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (&cfg.exchange, ExchangeKind::Topic),
        (&cfg.inbound_exchange, ExchangeKind::Topic),
        (&cfg.dead_letter_exchange, ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await?;
    }
    Ok(())
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

async fn bind(ch: &Channel, q: &QueueSpec, queue: &str) -> lapin::Result<()> {
    for (exchange, key) in &q.bindings {
        ch.queue_bind(
            queue.into(),
            exchange.as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// Declares `q` with its arguments and binds it, migrating an existing queue of the
/// same name whose arguments differ when it is empty (see the module docs). Each
/// attempt that the broker may refuse runs on a channel of its own (a refusal closes
/// the channel).
pub async fn declare_queue(conn: &Connection, q: &QueueSpec) -> lapin::Result<Declared> {
    let holding = format!("{}{MIGRATING_SUFFIX}", q.name);
    let ch = conn.create_channel().await?;
    let first = ch
        .queue_declare(q.name.as_str().into(), durable(), q.args.clone())
        .await;
    let declared = match first {
        Ok(_) => {
            bind(&ch, q, &q.name).await?;
            Declared::AsAsked
        }
        Err(refused) => migrate(conn, q, &holding, refused).await?,
    };
    let _ = ch.close(0, "declared".into()).await;
    if declared == Declared::AsAsked {
        // A holding queue of an earlier, interrupted migration.
        if exists(conn, &holding).await?.is_some() {
            drain_holding(conn, q, &holding).await?;
        }
    }
    metrics::gauge!("gs_node_hub_queue_migration_pending", "queue" => q.name.clone())
        .set(if declared == Declared::Kept { 1.0 } else { 0.0 });
    Ok(declared)
}

/// The message count of queue `name` if it exists (passive declaration).
async fn exists(conn: &Connection, name: &str) -> lapin::Result<Option<u32>> {
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match ch
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
    {
        Ok(queue) => {
            let _ = ch.close(0, "checked".into()).await;
            Ok(Some(queue.message_count()))
        }
        // 404: the channel is closed by the broker.
        Err(_) => Ok(None),
    }
}

/// The declaration was refused: migrate an empty queue of the same name, keep a
/// non-empty one, or give up with `refused` when there is no such queue.
async fn migrate(
    conn: &Connection,
    q: &QueueSpec,
    holding: &str,
    refused: lapin::Error,
) -> lapin::Result<Declared> {
    let Some(messages) = exists(conn, &q.name).await? else {
        return Err(refused);
    };
    if messages > 0 {
        return keep(conn, q, messages).await;
    }
    let ch = conn.create_channel().await?;
    ch.queue_declare(holding.into(), durable(), quorum_args())
        .await?;
    bind(&ch, q, holding).await?;
    // From here on everything published to the queue reaches the holding queue too,
    // so the queue may go once it is seen empty now. (Not with `if-empty`: quorum
    // queues refuse it, and a refusal closes the whole connection.)
    let messages = exists(conn, &q.name).await?.unwrap_or(0);
    if messages > 0 {
        // The holding queue only holds copies of what the old queue holds too.
        ch.queue_delete(holding.into(), QueueDeleteOptions::default())
            .await?;
        return keep(conn, q, messages).await;
    }
    ch.queue_delete(q.name.as_str().into(), QueueDeleteOptions::default())
        .await?;
    ch.queue_declare(q.name.as_str().into(), durable(), q.args.clone())
        .await?;
    bind(&ch, q, &q.name).await?;
    let _ = ch.close(0, "migrated".into()).await;
    tracing::info!(queue = %q.name, "queue redeclared with new arguments (quorum)");
    drain_holding(conn, q, holding).await?;
    Ok(Declared::AsAsked)
}

/// Uses an existing queue whose arguments differ, as it is.
async fn keep(conn: &Connection, q: &QueueSpec, messages: u32) -> lapin::Result<Declared> {
    tracing::warn!(
        queue = %q.name,
        messages,
        "queue exists with other arguments and is not empty: used as it is; it is \
         migrated to a quorum queue at a later connection once empty"
    );
    let ch = conn.create_channel().await?;
    bind(&ch, q, &q.name).await?;
    let _ = ch.close(0, "kept".into()).await;
    Ok(Declared::Kept)
}

/// Unbinds the holding queue, moves its messages into `q` (confirmed before each
/// ack) and deletes it.
async fn drain_holding(conn: &Connection, q: &QueueSpec, holding: &str) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for (exchange, key) in &q.bindings {
        ch.queue_unbind(
            holding.into(),
            exchange.as_str().into(),
            key.as_str().into(),
            FieldTable::default(),
        )
        .await?;
    }
    let mut moved = 0;
    while moved < MOVE_MAX {
        let Some(m) = ch
            .basic_get(holding.into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let d = m.delivery;
        ch.basic_publish(
            "".into(),
            q.name.as_str().into(),
            BasicPublishOptions::default(),
            &d.data,
            d.properties.clone(),
        )
        .await?
        .await?;
        d.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    if moved < MOVE_MAX {
        // Unbound and read to the end: nothing can reach it any more.
        ch.queue_delete(holding.into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = ch.close(0, "migrated".into()).await;
    tracing::info!(queue = %q.name, moved, "holding queue emptied and deleted");
    Ok(())
}

/// Everything: exchanges, the inbound queue, its retry queues, the dead-letter queue.
pub async fn declare_all(
    conn: &Connection,
    cfg: &RabbitConfig,
    retry_queues: &[(String, u64)],
) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    declare_exchanges(&ch, cfg).await?;
    // Retry queues (classic): after their TTL, messages go back to the main queue.
    for (name, ttl_ms) in retry_queues {
        let mut retry_args = FieldTable::default();
        retry_args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(*ttl_ms as i64),
        );
        retry_args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        retry_args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(cfg.inbound_queue.as_str().into()),
        );
        ch.queue_declare(name.as_str().into(), durable(), retry_args)
            .await?;
    }
    let _ = ch.close(0, "declared".into()).await;
    declare_queue(conn, &dead_letter_spec(cfg)).await?;
    declare_queue(conn, &inbound_spec(cfg)).await?;
    Ok(())
}
