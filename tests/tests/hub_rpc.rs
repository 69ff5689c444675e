//! Request/response over the Message Hub (issue 12, first slice), against the real
//! RabbitMQ: `gs_node::hub::rpc::ServiceClient` asks a stand-in responder (a lapin
//! consumer in the test answering to `reply_to` with the correlation id) on a private
//! exchange. Answers in time, timeouts, late, duplicate and unmatched answers, retries
//! under one correlation id, and the circuit breaker opening, failing fast and closing
//! after a successful probe.

use anyhow::{Context, Result};
use futures::StreamExt;
use gs_node::hub::breaker::{BreakerConfig, BreakerState};
use gs_node::hub::rpc::{CallError, ClientOptions, ServiceClient};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Bound of every wait for something that should happen quickly.
const WAIT: Duration = Duration::from_secs(5);

/// A request as the responder saw it.
#[derive(Debug, Clone)]
struct Seen {
    routing_key: String,
    correlation_id: String,
    reply_to: String,
    expiration: Option<String>,
    body: Value,
}

/// What the responder sends for the `n`-th request (0-based): answers after delays.
type Behaviour = Arc<dyn Fn(u32, &Value) -> Vec<(Duration, Value)> + Send + Sync>;

fn answer_ok(req: &Value, details: Value) -> Value {
    json!({
        "request_id": req["request_id"], "status": "ok",
        "details": details, "timestamp": gs_shared::protocol::timestamp_now(),
    })
}

fn answer_error(req: &Value, code: &str, retryable: bool) -> Value {
    json!({
        "request_id": req["request_id"], "status": "error",
        "details": {"code": code, "message": "stand-in failure", "retryable": retryable},
        "timestamp": gs_shared::protocol::timestamp_now(),
    })
}

/// A private exchange, a client on it, and a connection for stand-ins.
struct Setup {
    conn: Connection,
    exchange: String,
    client: ServiceClient,
}

impl Setup {
    async fn new(tune: impl FnOnce(&mut ClientOptions)) -> Result<Setup> {
        let url = gs_shared::config::Config::load(None)?.rabbitmq.url;
        let conn = Connection::connect(
            &url,
            ConnectionProperties::default().with_connection_name("gs-test hub_rpc".into()),
        )
        .await
        .context("connecting to RabbitMQ")?;
        let exchange = format!("t{}.hub", &Uuid::new_v4().simple().to_string()[..10]);
        let mut opts = ClientOptions::new(exchange.clone());
        tune(&mut opts);
        let client = ServiceClient::start(&conn, opts).await?;
        Ok(Setup {
            conn,
            exchange,
            client,
        })
    }

    /// Starts a responder for `service.*`: every request is reported on the returned
    /// channel and answered as `behaviour` says.
    async fn responder(
        &self,
        service: &str,
        behaviour: Behaviour,
    ) -> Result<mpsc::UnboundedReceiver<Seen>> {
        let ch = self.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            self.exchange.as_str().into(),
            format!("{service}.*").into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "stand-in".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let n = AtomicU32::new(0);
            while let Some(Ok(d)) = consumer.next().await {
                let p = &d.properties;
                let s = |v: &Option<lapin::types::ShortString>| {
                    v.as_ref().map(|x| x.as_str().to_string())
                };
                let seen = Seen {
                    routing_key: d.routing_key.as_str().to_string(),
                    correlation_id: s(p.correlation_id()).unwrap_or_default(),
                    reply_to: s(p.reply_to()).unwrap_or_default(),
                    expiration: s(p.expiration()),
                    body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
                };
                let answers = behaviour(n.fetch_add(1, Ordering::SeqCst), &seen.body);
                for (delay, answer) in answers {
                    let (ch, seen) = (ch.clone(), seen.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = reply(&ch, &seen.reply_to, &seen.correlation_id, &answer).await;
                    });
                }
                let _ = tx.send(seen);
            }
        });
        Ok(rx)
    }

    async fn finish(self) {
        if let Ok(ch) = self.conn.create_channel().await {
            let _ = ch
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = self.conn.close(0, "done".into()).await;
    }
}

/// Publishes an answer to `reply_to` (the default exchange) with `correlation_id`.
async fn reply(ch: &Channel, reply_to: &str, correlation_id: &str, answer: &Value) -> Result<()> {
    ch.basic_publish(
        "".into(),
        reply_to.into(),
        BasicPublishOptions::default(),
        answer.to_string().as_bytes(),
        BasicProperties::default()
            .with_correlation_id(correlation_id.into())
            .with_content_type("application/json".into()),
    )
    .await?;
    Ok(())
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Result<Seen> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .context("no request reached the stand-in")?
        .context("the stand-in stopped")
}

#[tokio::test]
async fn a_request_is_answered_in_time() -> Result<()> {
    let s = Setup::new(|_| {}).await?;
    let mut seen = s
        .responder(
            "character",
            Arc::new(|_, req| {
                vec![(
                    Duration::ZERO,
                    answer_ok(req, json!({"owner_id": "u1", "sheet": {"max_hp": 12}})),
                )]
            }),
        )
        .await?;
    let session = Uuid::new_v4();
    let started = Instant::now();
    let answer = s
        .client
        .call(
            "character",
            "get",
            Some(session),
            json!({"character_id": "c1"}),
        )
        .await?;
    let took = started.elapsed();
    println!("character.get answered in {took:?}");
    assert!(took < s.client.options().deadline, "{took:?}");
    assert_eq!(answer.details["owner_id"], "u1");
    assert_eq!(answer.details["sheet"]["max_hp"], 12);
    assert_eq!(answer.attempts, 1);

    let req = next(&mut seen).await?;
    assert_eq!(req.routing_key, "character.get");
    assert_eq!(req.reply_to, s.client.reply_to());
    assert_eq!(req.correlation_id, answer.request_id.to_string());
    let ms: u64 = req.expiration.context("no expiration")?.parse()?;
    assert!(ms > 0 && ms <= 400, "expiration {ms}");
    let b = &req.body;
    assert_eq!(b["request_id"], answer.request_id.to_string());
    assert_eq!(b["request_type"], "get");
    assert_eq!(b["session_id"], session.to_string());
    assert_eq!(b["details"]["character_id"], "c1");
    assert!(b["timestamp"].is_string());

    let st = s.client.stats("character");
    assert_eq!(
        (st.answered, st.timeouts, st.late, st.duplicates),
        (1, 0, 0, 0)
    );
    assert_eq!(s.client.breaker_state("character"), BreakerState::Closed);

    // A definitive error answer is an answer: returned, not retried, breaker closed.
    let _rx = s
        .responder(
            "campaign",
            Arc::new(|_, req| vec![(Duration::ZERO, answer_error(req, "not_found", false))]),
        )
        .await?;
    let err = s
        .client
        .call("campaign", "membership", None, json!({}))
        .await
        .expect_err("an error answer");
    assert_eq!(err.code(), "not_found");
    assert_eq!(err.details()["service"], "campaign");
    assert_eq!(s.client.stats("campaign").retries, 0);
    assert_eq!(s.client.breaker_state("campaign"), BreakerState::Closed);
    s.finish().await;
    Ok(())
}

#[tokio::test]
async fn nobody_answering_times_out_at_the_deadline() -> Result<()> {
    let s = Setup::new(|o| {
        o.deadline = Duration::from_millis(300);
        o.attempt_timeout = Duration::from_millis(100);
    })
    .await?;
    let started = Instant::now();
    let r = tokio::time::timeout(WAIT, s.client.call("nobody", "get", None, json!({}))).await?;
    let took = started.elapsed();
    match r {
        Err(CallError::Timeout { service, attempts }) => {
            assert_eq!(service, "nobody");
            assert!(attempts >= 2, "retried within the deadline: {attempts}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Bounded: at the deadline, not later than a scheduling delay after it.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(600),
        "timed out after {took:?}"
    );
    let st = s.client.stats("nobody");
    assert_eq!((st.timeouts, st.answered), (1, 0));
    assert!(st.retries >= 1);
    s.finish().await;
    Ok(())
}

#[tokio::test]
async fn a_retry_keeps_the_correlation_id_and_takes_the_answer() -> Result<()> {
    let s = Setup::new(|o| {
        o.deadline = Duration::from_millis(1000);
        o.attempt_timeout = Duration::from_millis(100);
    })
    .await?;
    // The first request is lost (not answered), the second is answered.
    let mut seen = s
        .responder(
            "character",
            Arc::new(|n, req| {
                if n == 0 {
                    vec![]
                } else {
                    vec![(Duration::ZERO, answer_ok(req, json!({"n": n})))]
                }
            }),
        )
        .await?;
    let answer = s.client.call("character", "get", None, json!({})).await?;
    assert_eq!(answer.attempts, 2);
    assert_eq!(answer.details["n"], 1);
    let (a, b) = (next(&mut seen).await?, next(&mut seen).await?);
    assert_eq!(a.correlation_id, b.correlation_id);
    assert_eq!(a.body["request_id"], b.body["request_id"]);
    assert_eq!(s.client.stats("character").retries, 1);

    // A retryable error is retried; the retry's answer wins.
    let _seen = s
        .responder(
            "image",
            Arc::new(|n, req| {
                let a = if n == 0 {
                    answer_error(req, "busy", true)
                } else {
                    answer_ok(req, json!({"url": "https://maps.example/1.png"}))
                };
                vec![(Duration::ZERO, a)]
            }),
        )
        .await?;
    let answer = s.client.call("image", "request", None, json!({})).await?;
    assert_eq!(answer.details["url"], "https://maps.example/1.png");
    assert_eq!(answer.attempts, 2);
    s.finish().await;
    Ok(())
}

#[tokio::test]
async fn a_late_answer_is_dropped_and_counted() -> Result<()> {
    let s = Setup::new(|o| {
        o.deadline = Duration::from_millis(150);
        o.max_attempts = 1;
    })
    .await?;
    let mut seen = s
        .responder(
            "llm",
            Arc::new(|_, req| {
                vec![(
                    Duration::from_millis(400),
                    answer_ok(req, json!({"text": "too late"})),
                )]
            }),
        )
        .await?;
    let r = s.client.call("llm", "request", None, json!({})).await;
    assert!(matches!(r, Err(CallError::Timeout { .. })), "{r:?}");
    next(&mut seen).await?;
    assert!(
        s.client.wait_stats("llm", WAIT, |st| st.late == 1).await,
        "late answer not counted: {:?}",
        s.client.stats("llm")
    );
    let st = s.client.stats("llm");
    assert_eq!((st.timeouts, st.answered, st.duplicates), (1, 0, 0));
    s.finish().await;
    Ok(())
}

#[tokio::test]
async fn duplicate_and_unmatched_answers_are_dropped_and_counted() -> Result<()> {
    let s = Setup::new(|_| {}).await?;
    let _seen = s
        .responder(
            "character",
            Arc::new(|_, req| {
                let a = answer_ok(req, json!({"first": true}));
                vec![(Duration::ZERO, a.clone()), (Duration::from_millis(30), a)]
            }),
        )
        .await?;
    let answer = s.client.call("character", "get", None, json!({})).await?;
    assert_eq!(answer.details["first"], true);
    assert!(
        s.client
            .wait_stats("character", WAIT, |st| st.duplicates == 1)
            .await,
        "duplicate not counted: {:?}",
        s.client.stats("character")
    );
    assert_eq!(s.client.stats("character").answered, 1);

    // An answer for a request this client never sent.
    let ch = s.conn.create_channel().await?;
    reply(
        &ch,
        s.client.reply_to(),
        &Uuid::new_v4().to_string(),
        &json!({"status": "ok", "details": {}}),
    )
    .await?;
    assert!(
        s.client
            .wait_stats("unknown", WAIT, |st| st.unmatched == 1)
            .await,
        "unmatched answer not counted"
    );
    s.finish().await;
    Ok(())
}

/// The breaker opens after `threshold` failed calls (`failing` answers them: silence
/// or a retryable error), fails fast while open, lets one probe through after the
/// cool-down and closes when it succeeds.
async fn breaker_opens_and_closes(fail_with_error: bool) -> Result<()> {
    let threshold = 3;
    let s = Setup::new(|o| {
        o.deadline = Duration::from_millis(100);
        o.max_attempts = 1;
        o.breaker = BreakerConfig {
            failure_threshold: threshold,
            cool_down: Duration::from_millis(300),
        };
    })
    .await?;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    let mut seen = s
        .responder(
            "campaign",
            Arc::new(move |_, req| {
                if h.load(Ordering::SeqCst) {
                    vec![(Duration::ZERO, answer_ok(req, json!({"member": true})))]
                } else if fail_with_error {
                    vec![(Duration::ZERO, answer_error(req, "unavailable", true))]
                } else {
                    vec![]
                }
            }),
        )
        .await?;
    for i in 0..threshold {
        assert_eq!(s.client.breaker_state("campaign"), BreakerState::Closed);
        let r = s
            .client
            .call("campaign", "membership", None, json!({}))
            .await;
        assert!(r.is_err(), "call {i}: {r:?}");
        next(&mut seen).await?;
    }
    assert_eq!(s.client.breaker_state("campaign"), BreakerState::Open);

    // Open: fails fast (no I/O, nothing is published, nothing awaited). The fastest of
    // three within 5 ms; none near the 100 ms deadline even on a loaded CI machine.
    let mut retry_in = Duration::ZERO;
    let mut fastest = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let r = s
            .client
            .call("campaign", "membership", None, json!({}))
            .await;
        let took = started.elapsed();
        fastest = fastest.min(took);
        assert!(
            took < Duration::from_millis(50),
            "failing fast took {took:?}"
        );
        let err = r.expect_err("breaker open");
        assert_eq!(err.code(), "service_unavailable");
        assert_eq!(err.details()["service"], "campaign");
        assert_eq!(err.details()["breaker"], "open");
        if let CallError::Unavailable { retry_in: r, .. } = err {
            retry_in = r;
        }
    }
    assert!(
        fastest <= Duration::from_millis(5),
        "failing fast took {fastest:?}"
    );
    assert_eq!(s.client.stats("campaign").rejected, 3);
    assert!(seen.try_recv().is_err(), "a request went out while open");

    // The service recovers; after the cool-down (a time, not an event) one probe goes
    // through, succeeds and closes the breaker.
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(retry_in + Duration::from_millis(5)).await;
    // The healthy calls get a generous deadline of their own: the 100 ms above is for
    // the failures, and a round trip through a loaded broker can take longer.
    let healthy_until = || Instant::now() + WAIT;
    let answer = s
        .client
        .call_until("campaign", "membership", None, json!({}), healthy_until())
        .await?;
    assert_eq!(answer.details["member"], true);
    assert_eq!(s.client.breaker_state("campaign"), BreakerState::Closed);
    s.client
        .call_until("campaign", "membership", None, json!({}), healthy_until())
        .await?;
    s.finish().await;
    Ok(())
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_timeouts_and_closes_after_a_probe() -> Result<()> {
    breaker_opens_and_closes(false).await
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_errors_and_closes_after_a_probe() -> Result<()> {
    breaker_opens_and_closes(true).await
}

#[tokio::test]
async fn calls_fail_at_once_when_the_connection_is_gone() -> Result<()> {
    let s = Setup::new(|o| o.deadline = Duration::from_secs(2)).await?;
    let Setup {
        conn,
        exchange,
        client,
    } = s;
    // Remove the private exchange first, then lose the connection.
    let ch = conn.create_channel().await?;
    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    conn.close(0, "gone".into()).await?;
    let started = Instant::now();
    let r = tokio::time::timeout(WAIT, client.call("character", "get", None, json!({}))).await?;
    let took = started.elapsed();
    let err = r.expect_err("no connection");
    assert!(matches!(err, CallError::Hub(_)), "{err:?}");
    assert_eq!(err.code(), "service_unavailable");
    assert!(took < Duration::from_secs(1), "failed after {took:?}");
    Ok(())
}

/// `rabbitmq.url` with several brokers, the first dead (a closed port): the client is
/// started on the connection `Brokers` opens to the next one, and is answered.
#[tokio::test]
async fn a_client_connects_past_a_dead_broker() -> Result<()> {
    let s = Setup::new(|_| {}).await?;
    let url = gs_shared::config::Config::load(None)?.rabbitmq.url;
    let dead = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        cluster::harness::free_port()?
    );
    let brokers = gs_node::hub::brokers::Brokers::from_list(&format!("{dead},{url}"));
    let started = Instant::now();
    let (conn, used) = brokers
        .connect(ConnectionProperties::default().with_connection_name("gs-test brokers".into()))
        .await?;
    let connect_took = started.elapsed();
    assert_eq!(used, 1, "the second broker");
    let client = ServiceClient::start(&conn, ClientOptions::new(s.exchange.clone())).await?;
    let _seen = s
        .responder(
            "character",
            Arc::new(|_, req| vec![(Duration::ZERO, answer_ok(req, json!({"ok": 1})))]),
        )
        .await?;
    let answer = client
        .call("character", "get", None, json!({"character_id": "c1"}))
        .await?;
    assert_eq!(answer.details["ok"], 1);
    // The next connection starts with the broker that worked.
    let (again, used) = brokers.connect(ConnectionProperties::default()).await?;
    assert_eq!(used, 1);
    println!("past a dead broker: connected in {connect_took:?}, answered");
    let _ = again.close(0, "done".into()).await;
    let _ = conn.close(0, "done".into()).await;
    s.finish().await;
    Ok(())
}
