//! The hub's queues as quorum queues (issue 13), against the real RabbitMQ: a classic
//! queue of an older release is migrated in place when empty and kept while it holds
//! messages; a holding queue left by an interrupted migration is emptied into the new
//! queue; a message delivered `rabbitmq.delivery_limit` times without an ack is
//! dead-lettered by the broker.

use anyhow::{Context, Result};
use futures::StreamExt;
use gs_node::hub::topology::{self, Declared, MIGRATING_SUFFIX};
use gs_shared::config::{Config, RabbitConfig};
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

/// A private namespace of hub names.
fn names() -> RabbitConfig {
    let n = format!("tq{}", &Uuid::new_v4().simple().to_string()[..10]);
    let mut c = Config::load(None).unwrap_or_default().rabbitmq;
    c.exchange = format!("{n}.sessions");
    c.inbound_exchange = format!("{n}.hub");
    c.inbound_queue = format!("{n}.inbound");
    c.dead_letter_exchange = format!("{n}.dead-letter");
    c.dead_letter_queue = format!("{n}.dead-letter");
    c.max_redeliveries = 1;
    c.delivery_limit = 2;
    c
}

fn retries(c: &RabbitConfig) -> Vec<(String, u64)> {
    vec![(format!("{}.retry.1", c.inbound_queue), 200)]
}

async fn connect(c: &RabbitConfig) -> Result<(Connection, Channel)> {
    let brokers = gs_node::hub::brokers::Brokers::from_list(&c.url);
    let (conn, _) = brokers
        .connect(ConnectionProperties::default().with_connection_name("gs-test hub_quorum".into()))
        .await
        .context("connecting to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

/// Whether `name` is a quorum queue with `args`: redeclaring it so succeeds.
async fn is_declared_as(conn: &Connection, name: &str, args: FieldTable) -> Result<bool> {
    let ch = conn.create_channel().await?;
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    Ok(ch.queue_declare(name.into(), opts, args).await.is_ok())
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) -> Result<()> {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    Ok(())
}

async fn classic(ch: &Channel, name: &str) -> Result<()> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), opts, FieldTable::default())
        .await?;
    Ok(())
}

async fn count(conn: &Connection, name: &str) -> Result<u32> {
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(name.into(), passive, FieldTable::default())
        .await?;
    Ok(q.message_count())
}

/// Waits until `name` holds `n` messages (quorum queue counts settle asynchronously).
async fn wait_count(conn: &Connection, name: &str, n: u32) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = count(conn, name).await?;
        if c == n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{name}: {c} messages, not {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes the namespace's queues and exchanges, on a connection of its own (a
/// failed test may have left its connection closed by the broker).
async fn clean(c: &RabbitConfig) {
    let Ok((conn, ch)) = connect(c).await else {
        return;
    };
    let holding = format!("{}{MIGRATING_SUFFIX}", c.inbound_queue);
    for q in [&c.inbound_queue, &c.dead_letter_queue, &holding]
        .into_iter()
        .cloned()
        .chain(retries(c).into_iter().map(|(n, _)| n))
    {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [&c.exchange, &c.inbound_exchange, &c.dead_letter_exchange] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(0, "clean-up".into()).await;
}

#[tokio::test]
async fn classic_queues_are_migrated_when_empty_and_kept_while_not() -> Result<()> {
    let c = names();
    let (conn, ch) = connect(&c).await?;
    let r = async {
        // An older release's topology: both queues classic, the dead-letter queue
        // holding a poison message somebody has not looked at yet.
        topology::declare_exchanges(&ch, &c).await?;
        classic(&ch, &c.inbound_queue).await?;
        classic(&ch, &c.dead_letter_queue).await?;
        publish(&ch, "", &c.dead_letter_queue, "old poison").await?;

        topology::declare_all(&conn, &c, &retries(&c)).await?;
        let inbound = topology::inbound_spec(&c);
        assert!(
            is_declared_as(&conn, &c.inbound_queue, inbound.args.clone()).await?,
            "the empty classic inbound queue became a quorum queue"
        );
        let dead = topology::dead_letter_spec(&c);
        assert!(
            !is_declared_as(&conn, &c.dead_letter_queue, dead.args.clone()).await?,
            "the non-empty dead-letter queue is kept classic"
        );
        assert_eq!(count(&conn, &c.dead_letter_queue).await?, 1, "nothing lost");
        // The migrated inbound queue is bound: an event published to the hub lands.
        publish(&ch, &c.inbound_exchange, "character.state.changed", "{}").await?;
        wait_count(&conn, &c.inbound_queue, 1).await?;

        // Once the dead-letter queue is empty, the next connection migrates it.
        ch.queue_purge(c.dead_letter_queue.as_str().into(), Default::default())
            .await?;
        assert_eq!(topology::declare_queue(&conn, &dead).await?, Declared::AsAsked);
        assert!(is_declared_as(&conn, &c.dead_letter_queue, dead.args.clone()).await?);
        // Still bound to the dead-letter exchange.
        publish(&ch, &c.dead_letter_exchange, "", "x").await?;
        wait_count(&conn, &c.dead_letter_queue, 1).await?;
        println!("classic → quorum: empty inbound migrated, non-empty dead-letter kept, then migrated once empty");
        anyhow::Ok(())
    }
    .await;
    clean(&c).await;
    r
}

#[tokio::test]
async fn a_holding_queue_left_by_an_interrupted_migration_is_emptied() -> Result<()> {
    let c = names();
    let (conn, ch) = connect(&c).await?;
    let r = async {
        topology::declare_all(&conn, &c, &retries(&c)).await?;
        // A node died after creating the holding queue: it holds two events.
        let holding = format!("{}{MIGRATING_SUFFIX}", c.inbound_queue);
        ch.queue_declare(
            holding.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            topology::quorum_args(),
        )
        .await?;
        ch.queue_bind(
            holding.as_str().into(),
            c.inbound_exchange.as_str().into(),
            "character.state.changed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        publish(&ch, "", &holding, "held 1").await?;
        publish(&ch, "", &holding, "held 2").await?;
        topology::declare_all(&conn, &c, &retries(&c)).await?;
        wait_count(&conn, &c.inbound_queue, 2).await?;
        let gone = conn
            .create_channel()
            .await?
            .queue_declare(
                holding.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_err();
        assert!(gone, "the holding queue was deleted");
        anyhow::Ok(())
    }
    .await;
    clean(&c).await;
    r
}

#[tokio::test]
async fn a_message_nobody_acks_is_dead_lettered_at_the_delivery_limit() -> Result<()> {
    let c = names();
    let (conn, ch) = connect(&c).await?;
    let r = async {
        topology::declare_all(&conn, &c, &retries(&c)).await?;
        publish(&ch, &c.inbound_exchange, "character.state.changed", "crashes nodes").await?;
        // A consumer that "dies" with it every time: nack with requeue.
        let cons = conn.create_channel().await?;
        let mut consumer = cons
            .basic_consume(
                c.inbound_queue.as_str().into(),
                "poisoned".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut deliveries = 0;
        let started = Instant::now();
        while count(&conn, &c.dead_letter_queue).await? == 0 {
            anyhow::ensure!(started.elapsed() < WAIT, "not dead-lettered after {deliveries}");
            let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
            else {
                continue;
            };
            deliveries += 1;
            d?.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
        }
        println!(
            "poison dead-lettered by the broker after {deliveries} deliveries (x-delivery-limit {})",
            c.delivery_limit
        );
        assert!(deliveries as u32 > c.delivery_limit, "{deliveries}");
        assert_eq!(count(&conn, &c.inbound_queue).await?, 0);
        anyhow::Ok(())
    }
    .await;
    clean(&c).await;
    r
}

/// A cluster whose `rabbitmq.url` names a dead broker first (a closed port) and the
/// real one second: the nodes' relay connects past it, declares quorum queues,
/// publishes session events and applies inbound ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_works_past_a_dead_first_broker() -> Result<()> {
    use gs_tests::rabbit::Rabbit;
    let mut spec = cluster::harness::ClusterSpec::test(1, 1);
    let real = spec.base.rabbitmq.url.clone();
    let dead = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        cluster::harness::free_port()?
    );
    spec.base.rabbitmq.url = format!("{dead},{real}");
    let started = Instant::now();
    let f = gs_tests::Fixture::with_spec(spec).await?;
    let ready_in = started.elapsed();
    let r = async {
        let c = &f.cluster.base.rabbitmq;
        let rabbit = Rabbit::connect(c).await?;
        let inbound = topology::inbound_spec(c);
        let (conn, _) = connect(c).await?;
        assert!(
            is_declared_as(&conn, &c.inbound_queue, inbound.args).await?,
            "inbound is quorum"
        );
        let tap = rabbit.tap_outbound().await?;
        let table = f.table().await?;
        let got = rabbit
            .drain_until(&tap, WAIT, |all| {
                all.iter()
                    .any(|g| g.json()["session_id"] == table.session.as_str())
            })
            .await?;
        println!(
            "relay past a dead broker: cluster ready in {ready_in:?}, {} messages published",
            got.len()
        );
        let _ = conn.close(0, "done".into()).await;
        anyhow::Ok(())
    }
    .await;
    gs_tests::finish(f, r).await
}

/// A TCP relay standing in for a second broker: forwards to the real one until
/// stopped, then refuses (listener closed) and cuts every relayed connection.
struct Relay {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: u16) -> Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut a, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                conns.spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
            // Dropping `conns` aborts (and closes) every relayed connection.
        });
        Ok(Relay {
            port,
            accepted,
            task,
        })
    }

    /// Stops: the port refuses, relayed connections are cut.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The versions of `session` among published messages (batches unpacked).
fn versions_of(got: &[gs_tests::rabbit::Got], session: &str) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    for g in got {
        let m = g.json();
        let events = if m["change_type"] == "batch" {
            m["details"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        } else {
            vec![m]
        };
        for e in events.iter().filter(|e| e["session_id"] == session) {
            if let Some(v) = e["version"].as_u64() {
                out.insert(v);
            }
        }
    }
    out
}

/// `rabbitmq.url` = a relay to the broker, then the broker. The node connects through
/// the relay (first in the list); the relay dies under play: the hub reconnects to
/// the next URL and every committed event is published, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_moves_to_the_next_broker_when_its_broker_dies() -> Result<()> {
    use gs_tests::rabbit::Rabbit;
    let mut spec = cluster::harness::ClusterSpec::test(1, 1);
    let real = spec.base.rabbitmq.url.clone();
    // The broker's port, from its URL (`amqp://user:pw@host:PORT/vhost`).
    let real_port: u16 = real
        .rsplit_once(':')
        .and_then(|(_, tail)| tail.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(5672);
    let relay = Relay::start(real_port).await?;
    spec.base.rabbitmq.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f,{real}", relay.port);
    let f = gs_tests::Fixture::with_spec(spec).await?;
    let r = async {
        anyhow::ensure!(
            relay.accepted.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "the node connected through the first URL"
        );
        // The test reads the broker directly, not through the relay it cuts.
        let mut direct = f.cluster.base.rabbitmq.clone();
        direct.url = real.clone();
        let rabbit = Rabbit::connect(&direct).await?;
        let tap = rabbit.tap_outbound().await?;
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(
                dm.send("state_update", gs_tests::set(&format!("/a{i}"), json!(i)))
                    .await?,
            );
        }
        for id in &ids[..10] {
            anyhow::ensure!(dm.wait_answer(*id, WAIT).await?.is_ok(), "update refused");
        }
        relay.stop().await;
        let cut = Instant::now();
        let mut more = Vec::new();
        for i in 0..20 {
            more.push(
                dm.send("state_update", gs_tests::set(&format!("/b{i}"), json!(i)))
                    .await?,
            );
        }
        for id in ids[10..].iter().chain(&more) {
            anyhow::ensure!(dm.wait_answer(*id, WAIT).await?.is_ok(), "update refused");
        }
        let last = f.stored_event_count_of(&f.session).await? as u64;
        let session = f.session.clone();
        let got = rabbit
            .drain_until(&tap, WAIT, |all| {
                versions_of(all, &session).last().copied() >= Some(last)
            })
            .await?;
        let published_in = cut.elapsed();
        let versions = versions_of(&got, &f.session);
        let first = *versions.first().context("nothing published")?;
        let missing: Vec<u64> = (first..=last).filter(|v| !versions.contains(v)).collect();
        anyhow::ensure!(missing.is_empty(), "versions never published: {missing:?}");
        println!(
            "hub across brokers: the first broker (a relay) cut under play; every event up to \
             version {last} published through the second within {:.0} ms, none missing",
            published_in.as_secs_f64() * 1000.0
        );
        anyhow::Ok(())
    }
    .await;
    gs_tests::finish(f, r).await
}
