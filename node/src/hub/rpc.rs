//! Request/response over the Message Hub (RabbitMQ): [`ServiceClient`] asks another
//! service (`character.get`, `campaign.membership`, `llm.request`, …) and waits for
//! its answer, within a deadline. See `docs/message-hub.md`, "Requests to other
//! services".
//!
//! * A request is published to the requests exchange with routing key
//!   `<service>.<request_type>`, `reply_to` = this client's exclusive, auto-delete reply
//!   queue (server-named, one per client: one per node), `correlation_id` = the
//!   request's `request_id`, and `expiration` = the time left until the deadline (a
//!   request nobody picked up in time expires in the service's queue).
//! * Answers are matched by correlation id. An answer for a call that already has its
//!   answer is a **duplicate**; for a call that gave up, **late**; for an id this client
//!   never sent (or forgot: it remembers the last 4,096 finished calls), **unmatched**.
//!   All three are dropped and counted.
//! * **Retries** reuse the request's correlation id (= `request_id`): an answer to any
//!   attempt completes the call, so a slow answer to the first attempt is not wasted
//!   when the second is already out, and a responder can dedupe on `request_id`.
//!   An attempt waits `attempt_timeout`, doubled per attempt, at most until the
//!   deadline; a retryable error answer (`details.retryable: true`) is retried after
//!   `retry_backoff` (doubled per attempt); at most `max_attempts` publishes.
//! * A [`Breaker`] per service: a call that times out, cannot be published or ends on a
//!   retryable error is a failure; any other answer (including a definitive error such
//!   as `not_found`) is a success. While open, calls fail fast with
//!   `service_unavailable` (`{"service", "breaker": "open"}`).
//!
//! A client lives as long as the broker connection it was started on: when that
//! connection is lost, running calls end with [`CallError::Hub`] and new ones fail at
//! once; whoever owns the connection starts a new client after reconnecting.

use super::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

/// Finished calls remembered to tell late and duplicate answers from unmatched ones.
const REMEMBER_FINISHED: usize = 4096;

/// Settings of a [`ServiceClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Exchange requests are published to (topic; declared durable if missing).
    pub exchange: String,
    /// Default deadline of a call (from the moment it is made).
    pub deadline: Duration,
    /// How long the first attempt waits for an answer before the request is published
    /// again (doubled per attempt, never past the deadline).
    pub attempt_timeout: Duration,
    /// Pause before retrying after a retryable error answer (doubled per attempt).
    pub retry_backoff: Duration,
    /// Publishes of one call at most (at least 1).
    pub max_attempts: u32,
    pub breaker: BreakerConfig,
}

impl ClientOptions {
    /// Defaults for requests on `exchange`: a 400 ms deadline (the SRD's orchestration
    /// round trip is under 500 ms), attempts of 150 ms then 300 ms, 3 attempts, a
    /// breaker opening after 5 consecutive failures for 5 s.
    pub fn new(exchange: impl Into<String>) -> ClientOptions {
        ClientOptions {
            exchange: exchange.into(),
            deadline: Duration::from_millis(400),
            attempt_timeout: Duration::from_millis(150),
            retry_backoff: Duration::from_millis(20),
            max_attempts: 3,
            breaker: BreakerConfig::default(),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub request_id: Uuid,
    pub details: Value,
    pub timestamp: Value,
    /// Publishes it took.
    pub attempts: u32,
}

/// Why a call did not get an `ok` answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The breaker is open: not sent at all.
    #[error("service_unavailable: {service} (breaker: open, retry in {retry_in:?})")]
    Unavailable { service: String, retry_in: Duration },
    /// No answer before the deadline.
    #[error("timeout: {service} did not answer within the deadline ({attempts} attempts)")]
    Timeout { service: String, attempts: u32 },
    /// The service answered `status: "error"` (the answer's `details`).
    #[error("{service} answered an error: {details}")]
    Refused { service: String, details: Value },
    /// The request could not be published (the broker connection is gone).
    #[error("hub: {0}")]
    Hub(String),
}

impl CallError {
    /// The wire error code for a client: `service_unavailable`, `timeout`, or the
    /// service's own code (`details.code`, else `service_error`).
    pub fn code(&self) -> String {
        match self {
            CallError::Unavailable { .. } | CallError::Hub(_) => "service_unavailable".into(),
            CallError::Timeout { .. } => "timeout".into(),
            CallError::Refused { details, .. } => details
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("service_error")
                .to_string(),
        }
    }

    /// Details for an error message.
    pub fn details(&self) -> Value {
        match self {
            CallError::Unavailable { service, retry_in } => json!({
                "service": service, "breaker": "open", "retry_in_ms": retry_in.as_millis() as u64,
            }),
            CallError::Timeout { service, attempts } => {
                json!({"service": service, "attempts": attempts})
            }
            CallError::Refused { service, details } => {
                json!({"service": service, "answer": details})
            }
            CallError::Hub(reason) => json!({"reason": reason}),
        }
    }
}

/// Counts per service (or `"unknown"` for unmatched answers), besides the metrics; the
/// tests await them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub answered: u64,
    pub timeouts: u64,
    pub retries: u64,
    pub late: u64,
    pub duplicates: u64,
    pub unmatched: u64,
    pub malformed: u64,
    pub rejected: u64,
}

/// What a running call receives.
enum Reply {
    Ok { details: Value, timestamp: Value },
    Error { details: Value, retryable: bool },
}

struct Pending {
    service: String,
    tx: mpsc::UnboundedSender<Reply>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Finished {
    Answered,
    GaveUp,
}

#[derive(Default)]
struct Calls {
    pending: HashMap<String, Pending>,
    finished: HashMap<String, (String, Finished)>,
    order: VecDeque<String>,
}

impl Calls {
    fn finish(&mut self, id: &str, how: Finished) {
        if let Some(p) = self.pending.remove(id) {
            self.finished.insert(id.to_string(), (p.service, how));
            self.order.push_back(id.to_string());
            while self.order.len() > REMEMBER_FINISHED {
                if let Some(old) = self.order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }
}

struct Inner {
    channel: Channel,
    reply_to: String,
    opts: ClientOptions,
    calls: Mutex<Calls>,
    breakers: Mutex<HashMap<String, Breaker>>,
    stats: Mutex<HashMap<String, ServiceStats>>,
    /// Bumped on every change of `stats`.
    changed: watch::Sender<u64>,
    /// The reply consumer ended (the connection is gone): calls fail at once.
    closed: AtomicBool,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self.reader.get_mut().ok().and_then(|r| r.take()) {
            h.abort();
        }
    }
}

/// Request/response client over the hub; cheap to clone (one reply queue for all
/// clones). Dropping the last clone stops its reply consumer.
#[derive(Clone)]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

/// Marks a call finished however its future ends (answered, gave up, or dropped).
struct CallGuard<'a> {
    inner: &'a Inner,
    id: String,
    how: Finished,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut calls) = self.inner.calls.lock() {
            calls.finish(&self.id, self.how);
        }
    }
}

impl ServiceClient {
    /// Opens a channel on `conn`, declares the requests exchange and an exclusive,
    /// auto-delete reply queue, and starts consuming answers.
    pub async fn start(conn: &Connection, opts: ClientOptions) -> lapin::Result<ServiceClient> {
        let channel = conn.create_channel().await?;
        channel
            .exchange_declare(
                opts.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue = channel
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
        let reply_to = queue.name().as_str().to_string();
        let consumer = channel
            .basic_consume(
                reply_to.as_str().into(),
                format!("gs-rpc-{}", Uuid::new_v4().simple()).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let inner = Arc::new(Inner {
            channel,
            reply_to,
            opts,
            calls: Mutex::new(Calls::default()),
            breakers: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            closed: AtomicBool::new(false),
            reader: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let reader = tokio::spawn(read_answers(weak, consumer));
        if let Ok(mut r) = inner.reader.lock() {
            *r = Some(reader);
        }
        Ok(ServiceClient { inner })
    }

    /// The reply queue's name (the `reply_to` of every request).
    pub fn reply_to(&self) -> &str {
        &self.inner.reply_to
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// Calls with the default deadline.
    pub async fn call(
        &self,
        service: &str,
        request_type: &str,
        session_id: Option<Uuid>,
        details: Value,
    ) -> Result<Answer, CallError> {
        let deadline = Instant::now() + self.inner.opts.deadline;
        self.call_until(service, request_type, session_id, details, deadline)
            .await
    }

    /// Sends `<service>.<request_type>` and waits for the answer until `deadline`.
    pub async fn call_until(
        &self,
        service: &str,
        request_type: &str,
        session_id: Option<Uuid>,
        details: Value,
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        let inner = &*self.inner;
        let started = Instant::now();
        if inner.closed.load(Ordering::Acquire) {
            return Err(CallError::Hub("the reply consumer stopped".into()));
        }
        let probe = self.admit_or_refuse(service, started)?;
        let request_id = Uuid::new_v4();
        let (mut rx, mut guard) = self.register(service, request_id);
        let request = Request {
            service,
            key: format!("{service}.{request_type}"),
            id: guard.id.clone(),
            request_id,
            body: request_body(request_id, request_type, session_id, details),
            deadline,
        };
        let outcome = self.exchange(&request, &mut rx).await;
        let now = Instant::now();
        if record(inner, service, started, now, &outcome) {
            guard.how = Finished::Answered;
        }
        // Done with the call before the breaker hears of it; answers that came in
        // after the one taken (or after giving up) are dropped and counted.
        let how = guard.how;
        drop(guard);
        rx.close();
        let extra = if how == Finished::Answered {
            "duplicate"
        } else {
            "late"
        };
        while let Ok(_extra) = rx.try_recv() {
            inner.drop_answer(service, extra);
        }
        match outcome {
            Ok(a) => {
                self.report(service, now, probe, true);
                Ok(a)
            }
            Err((e, failure)) => {
                self.report(service, now, probe, !failure);
                Err(e)
            }
        }
    }

    /// The breaker's admission (`Ok(probe?)`), or the fast refusal while it is open.
    fn admit_or_refuse(&self, service: &str, now: Instant) -> Result<bool, CallError> {
        self.admit(service, now).map_err(|retry_in| {
            self.inner.count(service, |s| s.rejected += 1);
            metrics::counter!("gs_node_rpc_rejected_total", "service" => service.to_string())
                .increment(1);
            CallError::Unavailable {
                service: service.to_string(),
                retry_in,
            }
        })
    }

    /// Registers a call: where its answers go, and a guard that files it as finished.
    fn register(
        &self,
        service: &str,
        request_id: Uuid,
    ) -> (mpsc::UnboundedReceiver<Reply>, CallGuard<'_>) {
        let id = request_id.to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut calls) = self.inner.calls.lock() {
            let service = service.to_string();
            calls.pending.insert(id.clone(), Pending { service, tx });
        }
        let guard = CallGuard {
            inner: &self.inner,
            id,
            how: Finished::GaveUp,
        };
        (rx, guard)
    }

    /// Publishes the request and waits for an answer, again (same correlation id) after
    /// a silent attempt or a retryable error, within the deadline. The outcome: the
    /// answer, or the error and whether it counts as a failure for the breaker.
    async fn exchange(
        &self,
        r: &Request<'_>,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
    ) -> Result<Answer, (CallError, bool)> {
        let inner = &*self.inner;
        let mut a = Attempts::new(&inner.opts);
        loop {
            let now = Instant::now();
            if now >= r.deadline {
                return Err((timeout(r.service, a.made), true));
            }
            if a.made >= 1 {
                inner.count(r.service, |s| s.retries += 1);
                metrics::counter!("gs_node_rpc_retries_total", "service" => r.service.to_string())
                    .increment(1);
            }
            a.made += 1;
            if let Err(e) = inner
                .publish(&r.key, &r.id, &r.body, r.deadline - now)
                .await
            {
                if a.last() {
                    return Err((CallError::Hub(e.to_string()), true));
                }
                tokio::time::sleep_until(a.backoff(r.deadline).into()).await;
                continue;
            }
            // Wait for an answer to this (or an earlier) attempt.
            let until = a.wait_until(r.deadline);
            match tokio::time::timeout_at(until.into(), rx.recv()).await {
                Ok(Some(Reply::Ok { details, timestamp })) => {
                    return Ok(r.answer(details, timestamp, a.made));
                }
                Ok(Some(Reply::Error { details, retryable })) => {
                    let err = CallError::Refused {
                        service: r.service.to_string(),
                        details,
                    };
                    if !retryable {
                        return Err((err, false));
                    }
                    if a.last() {
                        return Err((err, true));
                    }
                    // Back off, still taking an answer to an earlier attempt.
                    let pause = a.backoff(r.deadline);
                    if let Ok(Some(Reply::Ok { details, timestamp })) =
                        tokio::time::timeout_at(pause.into(), rx.recv()).await
                    {
                        return Ok(r.answer(details, timestamp, a.made));
                    }
                    if Instant::now() >= r.deadline {
                        return Err((err, true));
                    }
                }
                Ok(None) => {
                    return Err((CallError::Hub("the reply consumer stopped".into()), true));
                }
                Err(_) if a.last() || Instant::now() >= r.deadline => {
                    return Err((timeout(r.service, a.made), true));
                }
                Err(_) => {}
            }
        }
    }

    /// The breaker's admission; Ok(probe?) or Err(retry_in).
    fn admit(&self, service: &str, now: Instant) -> Result<bool, Duration> {
        let mut breakers = self.inner.breakers.lock().map_err(|_| Duration::ZERO)?;
        let b = breakers
            .entry(service.to_string())
            .or_insert_with(|| Breaker::new(self.inner.opts.breaker));
        let before = b.state();
        let admission = b.admit(now);
        gauge(service, before, b.state());
        match admission {
            Admission::Pass => Ok(false),
            Admission::Probe => Ok(true),
            Admission::Reject { retry_in } => Err(retry_in),
        }
    }

    fn report(&self, service: &str, now: Instant, probe: bool, success: bool) {
        let Ok(mut breakers) = self.inner.breakers.lock() else {
            return;
        };
        let Some(b) = breakers.get_mut(service) else {
            return;
        };
        let before = b.state();
        if success {
            b.success(probe);
        } else {
            b.failure(now, probe);
        }
        gauge(service, before, b.state());
        drop(breakers);
        self.inner.count(service, |_| {});
    }

    /// The breaker's state for `service` (closed if never called).
    pub fn breaker_state(&self, service: &str) -> BreakerState {
        self.inner
            .breakers
            .lock()
            .ok()
            .and_then(|b| b.get(service).map(Breaker::state))
            .unwrap_or(BreakerState::Closed)
    }

    /// The counts of `service` (`"unknown"`: answers that matched no call).
    pub fn stats(&self, service: &str) -> ServiceStats {
        self.inner
            .stats
            .lock()
            .ok()
            .and_then(|s| s.get(service).cloned())
            .unwrap_or_default()
    }

    /// Waits until `pred` holds for `service`'s counts, at most `timeout`; returns
    /// whether it did.
    pub async fn wait_stats(
        &self,
        service: &str,
        timeout: Duration,
        pred: impl Fn(&ServiceStats) -> bool,
    ) -> bool {
        let mut rx = self.inner.changed.subscribe();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.stats(service)) {
                return true;
            }
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return pred(&self.stats(service)),
            }
        }
    }
}

/// `now + d`, at most `deadline`.
/// One call's request, as every attempt sends it.
struct Request<'a> {
    service: &'a str,
    /// The routing key, `<service>.<request_type>`.
    key: String,
    /// The correlation id (the request id as text).
    id: String,
    request_id: Uuid,
    body: String,
    deadline: Instant,
}

impl Request<'_> {
    fn answer(&self, details: Value, timestamp: Value, attempts: u32) -> Answer {
        Answer {
            request_id: self.request_id,
            details,
            timestamp,
            attempts,
        }
    }
}

/// The attempts of one call: how many were made, how long the next waits for its
/// answer (doubling), how long the next pause is (doubling).
struct Attempts {
    made: u32,
    max: u32,
    wait: Duration,
    backoff: Duration,
}

impl Attempts {
    fn new(opts: &ClientOptions) -> Attempts {
        Attempts {
            made: 0,
            max: opts.max_attempts.max(1),
            wait: opts.attempt_timeout.max(Duration::from_millis(1)),
            backoff: opts.retry_backoff,
        }
    }

    fn last(&self) -> bool {
        self.made >= self.max
    }

    /// Until when the attempt just made waits for an answer (the last: the deadline).
    fn wait_until(&mut self, deadline: Instant) -> Instant {
        let until = if self.last() {
            deadline
        } else {
            later(self.wait, deadline)
        };
        self.wait = self.wait.saturating_mul(2);
        until
    }

    /// The end of the next pause between attempts.
    fn backoff(&mut self, deadline: Instant) -> Instant {
        let until = later(self.backoff, deadline);
        self.backoff = self.backoff.saturating_mul(2);
        until
    }
}

/// The request's payload, in the ICD's event style.
fn request_body(
    request_id: Uuid,
    request_type: &str,
    session_id: Option<Uuid>,
    details: Value,
) -> String {
    json!({
        "request_id": request_id,
        "request_type": request_type,
        "session_id": session_id,
        "details": details,
        "timestamp": gs_shared::protocol::timestamp_now(),
    })
    .to_string()
}

/// Counts a finished call in the metrics; `true` when the service answered (ok or an
/// error of its own).
fn record(
    inner: &Inner,
    service: &str,
    started: Instant,
    now: Instant,
    outcome: &Result<Answer, (CallError, bool)>,
) -> bool {
    let label = service.to_string();
    let answered = matches!(outcome, Ok(_) | Err((CallError::Refused { .. }, _)));
    if answered {
        inner.count(service, |s| s.answered += 1);
        metrics::histogram!("gs_node_rpc_seconds", "service" => label.clone())
            .record(now.duration_since(started).as_secs_f64());
    } else if let Err((CallError::Timeout { .. }, _)) = outcome {
        inner.count(service, |s| s.timeouts += 1);
        metrics::counter!("gs_node_rpc_timeouts_total", "service" => label.clone()).increment(1);
    }
    let result = match outcome {
        Ok(_) => "ok",
        Err((CallError::Refused { .. }, false)) => "error",
        Err((CallError::Refused { .. }, true)) => "failed",
        Err((CallError::Timeout { .. }, _)) => "timeout",
        Err(_) => "hub_error",
    };
    metrics::counter!("gs_node_rpc_requests_total", "service" => label, "result" => result)
        .increment(1);
    answered
}

fn later(d: Duration, deadline: Instant) -> Instant {
    Instant::now()
        .checked_add(d)
        .map_or(deadline, |t| t.min(deadline))
}

fn timeout(service: &str, attempts: u32) -> CallError {
    CallError::Timeout {
        service: service.to_string(),
        attempts,
    }
}

fn gauge(service: &str, before: BreakerState, after: BreakerState) {
    if before != after {
        tracing::info!(
            service,
            from = before.name(),
            to = after.name(),
            "service breaker"
        );
    }
    metrics::gauge!("gs_node_rpc_breaker_state", "service" => service.to_string())
        .set(after.gauge());
}

impl Inner {
    fn count(&self, service: &str, f: impl FnOnce(&mut ServiceStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(s.entry(service.to_string()).or_default());
        }
        self.changed.send_modify(|n| *n += 1);
    }

    async fn publish(&self, key: &str, id: &str, body: &str, left: Duration) -> lapin::Result<()> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(id.into())
            .with_message_id(id.into())
            .with_reply_to(self.reply_to.as_str().into())
            .with_expiration(left.as_millis().max(1).to_string().into());
        // Not confirmed: the deadline covers a request the broker lost, and a confirm
        // would add a round trip to every call.
        self.channel
            .basic_publish(
                self.opts.exchange.as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?;
        Ok(())
    }

    /// Routes one answer to its call, or counts it as late, duplicate, unmatched or
    /// malformed.
    fn dispatch(&self, correlation_id: Option<&str>, body: &[u8]) {
        let parsed: Option<Reply> = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| parse_answer(&v));
        let calls = match self.calls.lock() {
            Ok(c) => c,
            Err(_) => return,
        };
        let Some(id) = correlation_id else {
            drop(calls);
            self.drop_answer("unknown", "unmatched");
            return;
        };
        if let Some(p) = calls.pending.get(id) {
            let service = p.service.clone();
            match parsed {
                Some(reply) => {
                    if p.tx.send(reply).is_err() {
                        // The call is ending (its future was dropped): late.
                        drop(calls);
                        self.drop_answer(&service, "late");
                    }
                }
                None => {
                    drop(calls);
                    self.drop_answer(&service, "malformed");
                }
            }
            return;
        }
        let known = calls.finished.get(id).cloned();
        drop(calls);
        match known {
            Some((service, Finished::Answered)) => self.drop_answer(&service, "duplicate"),
            Some((service, Finished::GaveUp)) => self.drop_answer(&service, "late"),
            None => self.drop_answer("unknown", "unmatched"),
        }
    }

    fn drop_answer(&self, service: &str, why: &'static str) {
        tracing::debug!(service, why, "answer dropped");
        self.count(service, |s| match why {
            "late" => s.late += 1,
            "duplicate" => s.duplicates += 1,
            "malformed" => s.malformed += 1,
            _ => s.unmatched += 1,
        });
        metrics::counter!("gs_node_rpc_dropped_answers_total", "service" => service.to_string(), "reason" => why)
            .increment(1);
    }
}

/// `{"request_id", "status": "ok"|"error", "details", "timestamp"}`.
fn parse_answer(v: &Value) -> Option<Reply> {
    let details = v.get("details").cloned().unwrap_or(Value::Null);
    match v.get("status")?.as_str()? {
        "ok" => Some(Reply::Ok {
            details,
            timestamp: v.get("timestamp").cloned().unwrap_or(Value::Null),
        }),
        "error" => Some(Reply::Error {
            retryable: details
                .get("retryable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            details,
        }),
        _ => None,
    }
}

async fn read_answers(inner: Weak<Inner>, mut consumer: lapin::Consumer) {
    while let Some(delivery) = consumer.next().await {
        let Ok(delivery) = delivery else {
            break;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_string());
        inner.dispatch(id.as_deref(), &delivery.data);
    }
    // The consumer ended (connection lost): running calls end now.
    if let Some(inner) = inner.upgrade() {
        inner.closed.store(true, Ordering::Release);
        if let Ok(mut calls) = inner.calls.lock() {
            calls.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        let ok = parse_answer(
            &json!({"request_id": "x", "status": "ok", "details": {"a": 1}, "timestamp": "t"}),
        );
        assert!(matches!(ok, Some(Reply::Ok { ref details, .. }) if details["a"] == 1));
        let err = parse_answer(
            &json!({"status": "error", "details": {"code": "busy", "retryable": true}}),
        );
        assert!(matches!(
            err,
            Some(Reply::Error {
                retryable: true,
                ..
            })
        ));
        let err = parse_answer(&json!({"status": "error", "details": {"code": "not_found"}}));
        assert!(matches!(
            err,
            Some(Reply::Error {
                retryable: false,
                ..
            })
        ));
        assert!(parse_answer(&json!({"status": "maybe"})).is_none());
        assert!(parse_answer(&json!({"details": {}})).is_none());
    }

    #[test]
    fn errors_name_the_service() {
        let e = CallError::Unavailable {
            service: "character".into(),
            retry_in: Duration::from_millis(5),
        };
        assert_eq!(e.code(), "service_unavailable");
        assert_eq!(e.details()["service"], "character");
        assert_eq!(e.details()["breaker"], "open");
        let e = CallError::Refused {
            service: "character".into(),
            details: json!({"code": "not_found"}),
        };
        assert_eq!(e.code(), "not_found");
        assert_eq!(
            CallError::Timeout {
                service: "llm".into(),
                attempts: 3
            }
            .code(),
            "timeout"
        );
    }

    #[test]
    fn finished_calls_are_remembered_within_bounds() {
        let mut calls = Calls::default();
        for i in 0..REMEMBER_FINISHED + 10 {
            let (tx, _rx) = mpsc::unbounded_channel();
            let id = i.to_string();
            calls.pending.insert(
                id.clone(),
                Pending {
                    service: "s".into(),
                    tx,
                },
            );
            calls.finish(&id, Finished::Answered);
        }
        assert!(calls.pending.is_empty());
        assert_eq!(calls.finished.len(), REMEMBER_FINISHED);
        assert!(!calls.finished.contains_key("0"));
        assert!(calls
            .finished
            .contains_key(&(REMEMBER_FINISHED + 9).to_string()));
    }
}
