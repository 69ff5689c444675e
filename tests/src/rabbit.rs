//! RabbitMQ from a test's side: publish inbound hub events as another service would,
//! bind a queue to the cluster's outbound exchange and read what was published, read
//! the dead-letter queue, and close the cluster's broker connections.

use anyhow::{Context, Result};
use gs_shared::config::RabbitConfig;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use std::time::{Duration, Instant};

pub struct Rabbit {
    pub cfg: RabbitConfig,
    _conn: Connection,
    pub ch: Channel,
}

/// One message read from a queue.
#[derive(Debug, Clone)]
pub struct Got {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: FieldTable,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

impl Rabbit {
    pub async fn connect(cfg: &RabbitConfig) -> Result<Rabbit> {
        let brokers = gs_node::hub::brokers::Brokers::from_list(&cfg.url);
        let (conn, _) = brokers
            .connect(ConnectionProperties::default().with_connection_name("gs-test".into()))
            .await
            .context("connecting to RabbitMQ")?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Rabbit {
            cfg: cfg.clone(),
            _conn: conn,
            ch,
        })
    }

    /// Publishes an inbound event (as the Character or Campaign Service would).
    pub async fn publish_inbound(&self, routing_key: &str, body: &[u8]) -> Result<()> {
        self.ch
            .basic_publish(
                self.cfg.inbound_exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        Ok(())
    }

    /// A fresh queue bound to the cluster's outbound exchange for `session.#`.
    pub async fn tap_outbound(&self) -> Result<String> {
        let name = format!(
            "{}.tap.{}",
            self.cfg.exchange,
            uuid::Uuid::new_v4().simple()
        );
        // Exclusive: deleted with this connection (it is read with basic.get, which
        // never counts as a consumer, so auto-delete alone would leave it behind).
        let opts = QueueDeclareOptions {
            durable: false,
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        self.ch
            .queue_declare(name.as_str().into(), opts, FieldTable::default())
            .await?;
        self.ch
            .queue_bind(
                name.as_str().into(),
                self.cfg.exchange.as_str().into(),
                "session.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(name)
    }

    /// Reads (and acks) everything currently in `queue`.
    pub async fn drain(&self, queue: &str) -> Result<Vec<Got>> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await?
        {
            let d = m.delivery;
            out.push(Got {
                routing_key: d.routing_key.to_string(),
                body: d.data.clone(),
                headers: d.properties.headers().clone().unwrap_or_default(),
            });
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok(out)
    }

    /// Reads `queue` until `enough` holds for everything read so far (bounded).
    pub async fn drain_until(
        &self,
        queue: &str,
        timeout: Duration,
        enough: impl Fn(&[Got]) -> bool,
    ) -> Result<Vec<Got>> {
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        loop {
            all.extend(self.drain(queue).await?);
            if enough(&all) {
                return Ok(all);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{queue}: only {} messages after {timeout:?}",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Closes every broker connection whose client properties mention `needle` (the
/// cluster's NATS prefix is in the nodes' connection names), through `rabbitmqctl`.
pub fn close_connections(needle: &str) -> Result<usize> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .context("running rabbitmqctl")?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(needle)) {
        let pid = line.split_whitespace().next().unwrap_or("");
        let ok = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                pid,
                "test: closing the cluster's connections",
            ])
            .status()?
            .success();
        if ok {
            closed += 1;
        }
    }
    Ok(closed)
}
