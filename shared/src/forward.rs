//! Forwarding to session owners, with retry across failovers (routers forward client
//! requests; nodes forward Message Hub events to the owners of affected sessions).
//!
//! A request goes to the node the ring names (or the owner a node named in its
//! `not_owner` answer). On no responders, a timeout, `not_owner`, `overloaded` or
//! `service_unavailable` the router waits a little, re-resolves the owner and tries
//! again with the *same* request (so a command keeps its id and takes effect once),
//! until `router.request_deadline_ms`; then it answers `service_unavailable`.

use crate::cluster_view::ClusterView;
use crate::config::ms;
use crate::protocol::{codes, WireError};
use crate::rpc::{Caller, NodeReply, NodeRequest, ReplyBody, RequestBody, Subjects};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long past its deadline the router still waits for the last attempt's answer.
/// Nodes refuse commands past the deadline, so a command the router reports as failed
/// has not taken effect (given clocks synchronised to well within this).
pub const DEADLINE_GRACE: Duration = Duration::from_millis(500);

/// First pause between attempts; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// Redirects (`not_owner` naming the owner) followed without a pause, in a row.
const MAX_IMMEDIATE_REDIRECTS: u32 = 3;

#[derive(Clone)]
pub struct Forwarder {
    nats: async_nats::Client,
    subjects: Subjects,
    cluster: ClusterView,
    attempt_timeout: Duration,
    deadline: Duration,
}

impl Forwarder {
    pub fn new(
        nats: async_nats::Client,
        subjects: Subjects,
        cluster: ClusterView,
        attempt_timeout_ms: u64,
        deadline_ms: u64,
    ) -> Self {
        Self {
            nats,
            subjects,
            cluster,
            attempt_timeout: ms(attempt_timeout_ms),
            deadline: ms(deadline_ms),
        }
    }

    /// Sends `body` about `session` to its owner, retrying until the deadline.
    pub async fn request(
        &self,
        session: Uuid,
        caller: Caller,
        body: RequestBody,
    ) -> Result<ReplyBody, WireError> {
        self.request_until(session, caller, body, Instant::now() + self.deadline)
            .await
    }

    pub async fn request_until(
        &self,
        session: Uuid,
        caller: Caller,
        body: RequestBody,
        deadline: Instant,
    ) -> Result<ReplyBody, WireError> {
        let op = body.op();
        let left = deadline.saturating_duration_since(Instant::now());
        let payload: bytes::Bytes = serde_json::to_vec(&NodeRequest {
            session_id: session,
            caller,
            body,
            deadline_ms: Some(crate::rpc::wall_ms() + left.as_millis() as u64),
        })
        .expect("requests serialise")
        .into();
        let started = Instant::now();
        let mut hint: Option<String> = None;
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        let mut last_error = String::from("no node available");
        let mut redirects = 0u32;
        // Whether an earlier attempt may still take effect (it timed out, its node
        // died with it, or the node could not tell whether its commit landed).
        let mut maybe_pending = false;
        loop {
            if Instant::now() >= deadline {
                metrics::counter!("gs_router_forward_failed_total", "op" => op).increment(1);
                let outcome = if maybe_pending {
                    "unknown"
                } else {
                    "not_applied"
                };
                return Err(WireError::new(
                    codes::SERVICE_UNAVAILABLE,
                    format!("the session's owner could not be reached in time ({last_error})"),
                )
                .with_details(serde_json::json!({"attempts": attempts, "outcome": outcome})));
            }
            attempts += 1;
            let target = hint
                .take()
                .filter(|h| self.cluster.is_alive(h))
                .or_else(|| self.cluster.owner(&session));
            if let Some(node) = target {
                // The last attempt may run into the grace period: its answer is still
                // the truth about the command.
                let remaining =
                    (deadline + DEADLINE_GRACE).saturating_duration_since(Instant::now());
                let timeout = self
                    .attempt_timeout
                    .min(remaining)
                    .max(Duration::from_millis(1));
                let req = async_nats::Request::new()
                    .payload(payload.clone())
                    .timeout(Some(timeout));
                // A request in flight to a node that dies is never answered: give up on
                // it as soon as the member table drops the node, not at the timeout.
                let mut ring = self.cluster.ring_changes();
                let node_gone = async {
                    loop {
                        if ring.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        if !self.cluster.is_alive(&node) {
                            return;
                        }
                    }
                };
                let outcome = tokio::select! {
                    r = self.nats.send_request(self.subjects.node_rpc(&node), req) => r,
                    _ = node_gone => {
                        metrics::counter!("gs_router_forward_abandoned_total").increment(1);
                        tracing::debug!(%session, op, %node, "node left the cluster; retrying elsewhere");
                        // It may have committed before dying; a retry finds out.
                        maybe_pending = true;
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                };
                tracing::debug!(%session, op, attempt = attempts, %node, ok = outcome.is_ok(),
                    error = outcome.as_ref().err().map(|e| e.to_string()), "forward attempt");
                match outcome {
                    Ok(msg) => {
                        match serde_json::from_slice::<NodeReply>(&msg.payload) {
                            Ok(NodeReply::Ok { body }) => {
                                metrics::histogram!("gs_router_forward_seconds", "op" => op)
                                    .record(started.elapsed().as_secs_f64());
                                if attempts > 1 {
                                    metrics::counter!("gs_router_forward_retried_total", "op" => op)
                                    .increment(1);
                                }
                                return Ok(body);
                            }
                            Ok(NodeReply::Err { error, owner }) if error.is_retryable() => {
                                tracing::debug!(%session, op, %node, code = %error.code, "retryable answer");
                                last_error = format!("{node}: {}", error.message);
                                maybe_pending = error.details["outcome"] == "unknown";
                                hint = owner;
                            }
                            // The node refused it as too late (after looking for it among
                            // the commands it had applied): it was not applied.
                            Ok(NodeReply::Err { error, .. })
                                if error.code == codes::DEADLINE_EXCEEDED && !maybe_pending =>
                            {
                                return Err(WireError::new(
                                codes::SERVICE_UNAVAILABLE,
                                "the session's owner could not apply the command in time",
                            )
                            .with_details(serde_json::json!({"attempts": attempts, "outcome": "not_applied"})));
                            }
                            Ok(NodeReply::Err { error, .. })
                                if error.code == codes::DEADLINE_EXCEEDED =>
                            {
                                return Err(WireError::new(
                                    codes::SERVICE_UNAVAILABLE,
                                    "the session's owner could not be reached in time",
                                )
                                .with_details(
                                    serde_json::json!({"attempts": attempts, "outcome": "unknown"}),
                                ));
                            }
                            Ok(NodeReply::Err { error, .. }) => return Err(error),
                            Err(e) => {
                                return Err(WireError::new(
                                    codes::INTERNAL,
                                    format!("bad reply from {node}: {e}"),
                                ))
                            }
                        }
                    }
                    Err(e) => {
                        if e.kind() == async_nats::client::RequestErrorKind::NoResponders {
                            // Never delivered. The node's NATS connection is gone: have
                            // the cluster check.
                            self.cluster.suspect(&node).await;
                        } else {
                            // Timed out (or lost): the node may still apply it.
                            maybe_pending = true;
                        }
                        last_error = format!("{node}: {e}");
                    }
                }
            }
            // A node that named the owner (a planned handoff, a ring change) is taken
            // at its word at once; only a few times in a row, so two nodes that
            // disagree about the ring cannot bounce a request between them.
            if hint.is_some() && redirects < MAX_IMMEDIATE_REDIRECTS {
                redirects += 1;
                continue;
            }
            redirects = 0;
            // Wait out the backoff, or less if the ring changes meanwhile (a failed
            // node just left, a new one joined): that is what a retry waits for.
            // Attempts go on until the deadline itself; the last one may run into the
            // grace period.
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            let mut ring = self.cluster.ring_changes();
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = ring.changed() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
