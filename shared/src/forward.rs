//! Forwarding to session owners, with retry across failovers (routers forward client
//! requests; nodes forward Message Hub events to the owners of affected sessions).
//!
//! A request goes to the node the ring names (or the owner a node named in its
//! `not_owner` answer). On no responders, a timeout, `not_owner`, `overloaded` or
//! `service_unavailable` the router waits a little, re-resolves the owner and tries
//! again with the *same* request (so a command keeps its id and takes effect once),
//! until `router.request_deadline_ms`; then it answers `service_unavailable`.
//!
//! Every decision is the pure [`RetryPolicy`]'s ([`RetryPolicy::poll`]: attempt,
//! pause or give up; [`RetryPolicy::target`]: where; [`RetryPolicy::observe`]: what an
//! attempt's result means); [`Forwarder::request_until`] only executes them, so whole
//! sequences are tested with a fake clock and no services (the `seq_*` tests).

use crate::cluster_view::ClusterView;
use crate::config::ms;
use crate::protocol::{codes, WireError};
use crate::replies::{Replies, RequestFailed};
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
    /// Requests and their answers, shared with the cluster view (not `send_request`: a
    /// command acknowledged by its event gets no answer, and the client's multiplexer
    /// would keep its waiter).
    replies: std::sync::Arc<Replies>,
    subjects: Subjects,
    cluster: ClusterView,
    attempt_timeout: Duration,
    deadline: Duration,
}

impl Forwarder {
    pub fn new(
        subjects: Subjects,
        cluster: ClusterView,
        attempt_timeout_ms: u64,
        deadline_ms: u64,
    ) -> Self {
        Self {
            replies: cluster.replies(),
            subjects,
            cluster,
            attempt_timeout: ms(attempt_timeout_ms),
            deadline: ms(deadline_ms),
        }
    }

    /// The process's requests sent and not yet answered, timed out or given up (a
    /// gauge: it must not grow with the number of requests ever sent).
    pub fn requests_waiting(&self) -> usize {
        self.replies.waiting()
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

    /// Sends `body` about `session` to its owner, retrying until `deadline`. A thin
    /// loop over [`RetryPolicy`]: the policy decides every step (attempt where, pause
    /// how long, answer what, give up how); this executes them.
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
        let mut policy = RetryPolicy::default();
        loop {
            let redirect = match policy.poll(Instant::now(), deadline) {
                Poll::Attempt { redirect } => redirect,
                Poll::Pause(pause) => {
                    self.pause(pause).await;
                    continue;
                }
                Poll::GiveUp(error) => {
                    metrics::counter!("gs_router_forward_failed_total", "op" => op).increment(1);
                    return Err(error);
                }
            };
            let target = RetryPolicy::target(
                redirect,
                |n| self.cluster.is_alive(n),
                || self.cluster.owner(&session),
            );
            let next = match target {
                Some(node) => {
                    let attempt = self.attempt(session, op, &node, &payload, deadline).await;
                    tracing::debug!(%session, op, attempt = policy.attempts + 1, %node,
                        result = ?attempt.kind(), "forward attempt");
                    if matches!(attempt, Attempt::NoResponders) {
                        // Never delivered. The node's NATS connection is gone: have
                        // the cluster check.
                        self.cluster.suspect(&node).await;
                    }
                    policy.observe(&node, attempt)
                }
                None => policy.no_node(),
            };
            if let Next::Done(result) = next {
                if result.is_ok() {
                    metrics::histogram!("gs_router_forward_seconds", "op" => op)
                        .record(started.elapsed().as_secs_f64());
                    if policy.attempts > 1 {
                        metrics::counter!("gs_router_forward_retried_total", "op" => op)
                            .increment(1);
                    }
                }
                return result;
            }
        }
    }

    /// Waits out a backoff, or less if the ring changes meanwhile (a failed node just
    /// left, a new one joined): that is what a retry waits for.
    async fn pause(&self, pause: Duration) {
        let mut ring = self.cluster.ring_changes();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = ring.changed() => {}
        }
    }

    /// One attempt at `node`: what became of it.
    async fn attempt(
        &self,
        session: Uuid,
        op: &'static str,
        node: &str,
        payload: &bytes::Bytes,
        deadline: Instant,
    ) -> Attempt {
        // The last attempt may run into the grace period: its answer is still the
        // truth about the command.
        let remaining = (deadline + DEADLINE_GRACE).saturating_duration_since(Instant::now());
        let timeout = self
            .attempt_timeout
            .min(remaining)
            .max(Duration::from_millis(1));
        // A request in flight to a node that dies, leaves or restarts is never
        // answered: give up on it as soon as the member table drops the node (or a
        // new process takes its id), not at the timeout. (Not only on ring changes: a
        // draining node is off the ring before it leaves, and a stale `not_owner` may
        // still name it.) The node may have left between choosing it and listening
        // here: then nothing is sent.
        let mut departures = self.cluster.departures();
        let Some(sent_to) = self.cluster.incarnation(node) else {
            return Attempt::NotSent;
        };
        let node_gone = async {
            loop {
                if departures.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if self.cluster.incarnation(node) != Some(sent_to) {
                    return;
                }
            }
        };
        // An answer that is there is taken even if the node has left since (a draining
        // node answers, then leaves).
        let outcome = tokio::select! {
            biased;
            r = self.replies.request_batched(self.subjects.node_rpc(node), payload.clone(), timeout) => r,
            _ = node_gone => {
                metrics::counter!("gs_router_forward_abandoned_total").increment(1);
                tracing::debug!(%session, op, %node, "node left the cluster; retrying elsewhere");
                return Attempt::NodeGone;
            }
        };
        match outcome {
            Ok(msg) => match serde_json::from_slice::<NodeReply>(&msg.payload) {
                Ok(reply) => Attempt::Answered(reply),
                Err(e) => Attempt::BadReply(e.to_string()),
            },
            Err(RequestFailed::NoResponders) => Attempt::NoResponders,
            Err(e) => Attempt::Lost(e.to_string()),
        }
    }
}

/// What became of one attempt.
#[derive(Debug)]
pub enum Attempt {
    /// The node answered.
    Answered(NodeReply),
    /// No node listens on the subject: the request was never delivered.
    NoResponders,
    /// Timed out or lost in flight: the node may still apply it.
    Lost(String),
    /// The node left the cluster while the request was in flight: it may have
    /// committed before it died.
    NodeGone,
    /// The node had left the cluster before the request was sent: nothing was sent.
    NotSent,
    /// The answer could not be decoded.
    BadReply(String),
}

impl Attempt {
    fn kind(&self) -> &'static str {
        match self {
            Attempt::Answered(NodeReply::Ok { .. }) => "ok",
            Attempt::Answered(NodeReply::Err { .. }) => "refused",
            Attempt::NoResponders => "no_responders",
            Attempt::Lost(_) => "lost",
            Attempt::NodeGone => "node_gone",
            Attempt::NotSent => "not_sent",
            Attempt::BadReply(_) => "bad_reply",
        }
    }
}

/// What the forwarder does after an attempt.
#[derive(Debug)]
pub enum Next {
    /// Answer the caller with this.
    Done(Result<ReplyBody, WireError>),
    /// Try again at once (a node named the owner, or the target left).
    RetryNow,
    /// Try again after the backoff (or a ring change).
    Backoff,
}

/// What the forwarder does now ([`RetryPolicy::poll`]).
#[derive(Debug, PartialEq)]
pub enum Poll {
    /// Send an attempt: to the owner a `not_owner` answer named (`redirect`) if it is
    /// alive, else to the ring's owner ([`RetryPolicy::target`]).
    Attempt { redirect: Option<String> },
    /// Wait this long (or until the ring changes), then poll again.
    Pause(Duration),
    /// The deadline passed without an answer that ends the request: answer
    /// `service_unavailable` (`outcome` `not_applied` or `unknown`).
    GiveUp(WireError),
}

/// The forwarder's decisions, without I/O: which answers end a request, which are
/// retried and how soon, and — across every attempt — whether the command may have
/// taken effect, so that a request that finally fails says `outcome: "unknown"` if any
/// attempt might have applied it (and `"not_applied"` only if none could have).
#[derive(Debug, Default)]
pub struct RetryPolicy {
    /// Attempts made so far.
    pub attempts: u32,
    /// Whether some earlier attempt may still take (or have taken) effect: it timed
    /// out, its node died with it, or the node could not tell whether its commit
    /// landed. Once set it stays set: a later refusal says nothing about an earlier
    /// attempt.
    maybe_pending: bool,
    /// The owner a `not_owner` answer named, for the next attempt.
    hint: Option<String>,
    /// Redirects followed without a pause, in a row.
    redirects: u32,
    last_error: Option<String>,
    /// The last attempt asked for a pause before the next.
    must_pause: bool,
    /// The next pause ([`FIRST_BACKOFF`] when zero, before the first); doubles up to
    /// [`MAX_BACKOFF`] and starts again after an attempt retried at once.
    backoff: Duration,
}

impl RetryPolicy {
    /// What to do now, at `now`, for a request due by `deadline`: attempt (at once
    /// after a redirect or a node that left), pause after a refusal or a lost attempt
    /// (never past the deadline), or give up once the deadline has passed. The last
    /// attempt may start just before the deadline and run into [`DEADLINE_GRACE`].
    pub fn poll(&mut self, now: Instant, deadline: Instant) -> Poll {
        if now >= deadline {
            return Poll::GiveUp(self.deadline_passed());
        }
        if std::mem::take(&mut self.must_pause) {
            let backoff = self.backoff.max(FIRST_BACKOFF);
            self.backoff = (backoff * 2).min(MAX_BACKOFF);
            return Poll::Pause(backoff.min(deadline - now));
        }
        Poll::Attempt {
            redirect: self.hint.take(),
        }
    }

    /// The node to attempt: the one an answer named, if the member table has it alive
    /// (a redirect is followed), else the ring's owner.
    pub fn target(
        redirect: Option<String>,
        is_alive: impl Fn(&str) -> bool,
        ring_owner: impl FnOnce() -> Option<String>,
    ) -> Option<String> {
        redirect.filter(|n| is_alive(n)).or_else(ring_owner)
    }

    /// Records the decision for [`poll`](Self::poll): a pause before the next attempt,
    /// or none (and the backoff starts again).
    fn decided(&mut self, next: Next) -> Next {
        match next {
            Next::Backoff => self.must_pause = true,
            Next::RetryNow => {
                self.must_pause = false;
                self.backoff = FIRST_BACKOFF;
            }
            Next::Done(_) => {}
        }
        next
    }

    /// The node to try next, if an answer named one.
    pub fn take_hint(&mut self) -> Option<String> {
        self.hint.take()
    }

    /// Whether a command sent so far may have taken effect.
    pub fn maybe_pending(&self) -> bool {
        self.maybe_pending
    }

    /// No node could be chosen (none alive).
    pub fn no_node(&mut self) -> Next {
        self.attempts += 1;
        if self.last_error.is_none() {
            self.last_error = Some("no node available".into());
        }
        self.redirects = 0;
        self.decided(Next::Backoff)
    }

    /// Decides what follows `attempt` at `node`.
    pub fn observe(&mut self, node: &str, attempt: Attempt) -> Next {
        self.attempts += 1;
        let next = self.decide(node, attempt);
        self.decided(next)
    }

    fn decide(&mut self, node: &str, attempt: Attempt) -> Next {
        match attempt {
            Attempt::Answered(NodeReply::Ok { body }) => Next::Done(Ok(body)),
            Attempt::Answered(NodeReply::Err { error, owner }) if error.is_retryable() => {
                self.last_error = Some(format!("{node}: {}", error.message));
                self.maybe_pending |= error.details["outcome"] == "unknown";
                self.hint = owner;
                self.after_retryable()
            }
            // The node refused it as too late after looking for it among the commands
            // it had applied: this attempt did not apply it; an earlier one may have.
            Attempt::Answered(NodeReply::Err { error, .. })
                if error.code == codes::DEADLINE_EXCEEDED =>
            {
                let (message, outcome) = if self.maybe_pending {
                    (
                        "the session's owner could not be reached in time",
                        "unknown",
                    )
                } else {
                    (
                        "the session's owner could not apply the command in time",
                        "not_applied",
                    )
                };
                Next::Done(Err(WireError::new(codes::SERVICE_UNAVAILABLE, message)
                    .with_details(
                        serde_json::json!({"attempts": self.attempts, "outcome": outcome}),
                    )))
            }
            Attempt::Answered(NodeReply::Err { error, .. }) => Next::Done(Err(error)),
            Attempt::BadReply(e) => Next::Done(Err(WireError::new(
                codes::INTERNAL,
                format!("bad reply from {node}: {e}"),
            ))),
            Attempt::NoResponders => {
                self.last_error = Some(format!("{node}: no responders"));
                self.after_retryable()
            }
            Attempt::Lost(e) => {
                self.maybe_pending = true;
                self.last_error = Some(format!("{node}: {e}"));
                self.after_retryable()
            }
            Attempt::NodeGone => {
                self.maybe_pending = true;
                self.last_error = Some(format!("{node}: left the cluster"));
                Next::RetryNow
            }
            // The next target is a live member (a redirect only to one, else the
            // ring's owner), so this cannot repeat without another departure.
            Attempt::NotSent => {
                self.last_error = Some(format!("{node}: left the cluster"));
                Next::RetryNow
            }
        }
    }

    /// A node that named the owner (a planned handoff, a ring change) is taken at its
    /// word at once; only a few times in a row, so two nodes that disagree about the
    /// ring cannot bounce a request between them.
    fn after_retryable(&mut self) -> Next {
        if self.hint.is_some() && self.redirects < MAX_IMMEDIATE_REDIRECTS {
            self.redirects += 1;
            return Next::RetryNow;
        }
        self.redirects = 0;
        Next::Backoff
    }

    /// The deadline passed without an answer that ends the request.
    pub fn deadline_passed(&self) -> WireError {
        let outcome = if self.maybe_pending {
            "unknown"
        } else {
            "not_applied"
        };
        let last = self.last_error.as_deref().unwrap_or("no node available");
        WireError::new(
            codes::SERVICE_UNAVAILABLE,
            format!("the session's owner could not be reached in time ({last})"),
        )
        .with_details(serde_json::json!({"attempts": self.attempts, "outcome": outcome}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str, outcome: Option<&str>, owner: Option<&str>) -> Attempt {
        let mut error = WireError::new(code, "refused");
        if let Some(o) = outcome {
            error = error.with_details(serde_json::json!({ "outcome": o }));
        }
        Attempt::Answered(NodeReply::Err {
            error,
            owner: owner.map(str::to_string),
        })
    }

    fn ack() -> Attempt {
        Attempt::Answered(NodeReply::Ok {
            body: ReplyBody::Ack {
                version: 7,
                duplicate: false,
            },
        })
    }

    fn outcome_of(e: &WireError) -> &str {
        e.details["outcome"].as_str().unwrap()
    }

    /// The sequence: a timeout (the command may be pending), then `not_owner`,
    /// then `service_unavailable` with nothing said about the outcome: the failure must
    /// still say "unknown", never "not_applied" (a client would resend under a new id
    /// and apply it twice).
    #[test]
    fn pending_outcome_survives_later_refusals() {
        let mut p = RetryPolicy::default();
        assert!(matches!(
            p.observe("n1", Attempt::Lost("timed out".into())),
            Next::Backoff
        ));
        assert!(matches!(
            p.observe("n1", refused(codes::NOT_OWNER, None, Some("n2"))),
            Next::RetryNow
        ));
        assert_eq!(p.take_hint().as_deref(), Some("n2"));
        assert!(matches!(
            p.observe("n2", refused(codes::SERVICE_UNAVAILABLE, None, None)),
            Next::Backoff
        ));
        assert!(p.maybe_pending());
        let e = p.deadline_passed();
        assert_eq!(e.code, codes::SERVICE_UNAVAILABLE);
        assert_eq!(outcome_of(&e), "unknown");
        assert_eq!(e.details["attempts"], 3);
    }

    /// A node gone before anything was sent to it: retried at once, and nothing may
    /// have been applied by that attempt.
    #[test]
    fn not_sent_then_deadline_refusal_is_not_applied() {
        let mut p = RetryPolicy::default();
        assert!(matches!(p.observe("n1", Attempt::NotSent), Next::RetryNow));
        match p.observe("n2", refused(codes::DEADLINE_EXCEEDED, None, None)) {
            Next::Done(Err(e)) => assert_eq!(outcome_of(&e), "not_applied"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn node_gone_then_deadline_refusal_is_unknown() {
        let mut p = RetryPolicy::default();
        assert!(matches!(p.observe("n1", Attempt::NodeGone), Next::RetryNow));
        match p.observe("n2", refused(codes::DEADLINE_EXCEEDED, None, None)) {
            Next::Done(Err(e)) => assert_eq!(outcome_of(&e), "unknown"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_only_are_not_applied() {
        let mut p = RetryPolicy::default();
        p.observe("n1", Attempt::NoResponders);
        p.observe("n1", refused(codes::NOT_OWNER, None, None));
        p.observe("n2", refused(codes::OVERLOADED, None, None));
        assert!(!p.maybe_pending());
        assert_eq!(outcome_of(&p.deadline_passed()), "not_applied");
        match p.observe("n2", refused(codes::DEADLINE_EXCEEDED, None, None)) {
            Next::Done(Err(e)) => assert_eq!(outcome_of(&e), "not_applied"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_unsure_of_its_commit_makes_the_outcome_unknown() {
        let mut p = RetryPolicy::default();
        p.observe(
            "n1",
            refused(codes::SERVICE_UNAVAILABLE, Some("unknown"), None),
        );
        // A later refusal that knows nothing of it does not clear it.
        p.observe(
            "n1",
            refused(codes::SERVICE_UNAVAILABLE, Some("not_applied"), None),
        );
        assert_eq!(outcome_of(&p.deadline_passed()), "unknown");
    }

    #[test]
    fn success_and_final_refusals_end_the_request() {
        let mut p = RetryPolicy::default();
        p.observe("n1", Attempt::Lost("timed out".into()));
        assert!(matches!(p.observe("n1", ack()), Next::Done(Ok(_))));
        let mut p = RetryPolicy::default();
        match p.observe("n1", refused("conflict", None, None)) {
            Next::Done(Err(e)) => assert_eq!(e.code, "conflict"),
            other => panic!("{other:?}"),
        }
        let mut p = RetryPolicy::default();
        assert!(matches!(
            p.observe("n1", Attempt::BadReply("eof".into())),
            Next::Done(Err(_))
        ));
    }

    /// Redirects are followed at once only a few times in a row, so two nodes that
    /// disagree about the ring cannot bounce a request between them.
    #[test]
    fn immediate_redirects_are_bounded() {
        let mut p = RetryPolicy::default();
        let mut immediate = 0;
        for i in 0..10 {
            let other = if i % 2 == 0 { "n2" } else { "n1" };
            match p.observe("n", refused(codes::NOT_OWNER, None, Some(other))) {
                Next::RetryNow => immediate += 1,
                Next::Backoff => break,
                Next::Done(r) => panic!("{r:?}"),
            }
            p.take_hint();
        }
        assert_eq!(immediate, MAX_IMMEDIATE_REDIRECTS);
    }

    /// Seeded random sequences of attempts: once an attempt may have applied the
    /// command, every failure reported afterwards says "unknown".
    #[test]
    fn pending_is_monotone_over_random_sequences() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut p = RetryPolicy::default();
            let mut pending = false;
            for _ in 0..8 {
                let a = match next() % 6 {
                    0 => Attempt::Lost("timeout".into()),
                    1 => Attempt::NodeGone,
                    2 => Attempt::NoResponders,
                    3 => refused(codes::NOT_OWNER, None, Some("n2")),
                    4 => refused(codes::SERVICE_UNAVAILABLE, Some("unknown"), None),
                    _ => refused(codes::OVERLOADED, None, None),
                };
                pending |= matches!(a, Attempt::Lost(_) | Attempt::NodeGone)
                    || matches!(&a, Attempt::Answered(NodeReply::Err { error, .. })
                        if error.details["outcome"] == "unknown");
                p.observe("n1", a);
                p.take_hint();
                assert_eq!(p.maybe_pending(), pending);
            }
            let expected = if pending { "unknown" } else { "not_applied" };
            assert_eq!(outcome_of(&p.deadline_passed()), expected);
        }
    }

    /// One step of a scripted run: the ring has no node, or the attempt's result and
    /// how long it took.
    enum Step {
        NoNode,
        At(Attempt, u64),
    }
    use Step::{At, NoNode};

    fn lost() -> Attempt {
        Attempt::Lost("timed out".into())
    }

    fn to(owner: &str) -> Attempt {
        refused(codes::NOT_OWNER, None, Some(owner))
    }

    fn busy() -> Attempt {
        refused(codes::OVERLOADED, None, None)
    }

    /// Runs the forwarder's loop ([`Forwarder::request_until`]) over the policy against a
    /// script, with a fake clock: the ring's owner is `n1`, the nodes in `dead` are not
    /// alive, each attempt takes its scripted time and each pause its full length. The
    /// trace names each attempt's node, each pause, and the answer.
    fn run(deadline_ms: u64, dead: &[&str], script: Vec<Step>) -> Vec<String> {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(deadline_ms);
        let mut now = start;
        let mut p = RetryPolicy::default();
        let mut script = script.into_iter();
        let mut trace = vec![];
        loop {
            let redirect = match p.poll(now, deadline) {
                Poll::Attempt { redirect } => redirect,
                Poll::Pause(d) => {
                    trace.push(format!("pause {}", d.as_millis()));
                    now += d;
                    continue;
                }
                Poll::GiveUp(e) => {
                    assert_eq!(e.code, codes::SERVICE_UNAVAILABLE);
                    trace.push(format!(
                        "give up {} after {}",
                        outcome_of(&e),
                        e.details["attempts"]
                    ));
                    break;
                }
            };
            let step = script
                .next()
                .unwrap_or_else(|| panic!("another attempt past the script: {trace:?}"));
            let next = match step {
                NoNode => {
                    trace.push("no node".into());
                    p.no_node()
                }
                At(attempt, took) => {
                    let node =
                        RetryPolicy::target(redirect, |n| !dead.contains(&n), || Some("n1".into()))
                            .expect("n1 owns it");
                    trace.push(node.clone());
                    now += Duration::from_millis(took);
                    p.observe(&node, attempt)
                }
            };
            if let Next::Done(r) = next {
                trace.push(match r {
                    Ok(_) => "ok".into(),
                    Err(e) => match e.details["outcome"].as_str() {
                        Some(o) => format!("{} {o}", e.code),
                        None => e.code,
                    },
                });
                break;
            }
        }
        assert!(script.next().is_none(), "the run ended early: {trace:?}");
        trace
    }

    /// Table cases: each a deadline (ms), the dead nodes, the script, the trace.
    macro_rules! sequences {
        ($( $(#[$m:meta])* $name:ident: $deadline:expr, $dead:expr, [$($step:expr),* $(,)?] => [$($t:expr),* $(,)?]; )*) => {
            $( $(#[$m])* #[test] fn $name() {
                assert_eq!(run($deadline, &$dead, vec![$($step),*]), vec![$($t.to_string()),*]);
            } )*
        };
    }

    sequences! {
        /// The usual case.
        seq_first_attempt_answers: 5000, [], [At(ack(), 3)] => ["n1", "ok"];
        /// The sequence through the loop: timeout, then `not_owner` naming n2
        /// (followed at once), then `service_unavailable` until the deadline, which
        /// must say "unknown".
        seq_timeout_not_owner_unavailable_is_unknown: 100, [], [
            At(lost(), 50),
            At(to("n2"), 1),
            At(refused(codes::SERVICE_UNAVAILABLE, None, None), 1),
            At(refused(codes::SERVICE_UNAVAILABLE, None, None), 10),
        ] => ["n1", "pause 20", "n1", "n2", "pause 20", "n1", "give up unknown after 4"];
        /// A redirect to a live node is followed without a pause.
        seq_redirect_is_followed_at_once: 5000, [], [At(to("n2"), 1), At(ack(), 1)]
            => ["n1", "n2", "ok"];
        /// A redirect to a node the member table has dead goes to the ring's owner.
        seq_redirect_to_a_dead_node_goes_to_the_ring_owner: 5000, ["n3"],
            [At(to("n3"), 1), At(ack(), 1)] => ["n1", "n1", "ok"];
        /// Two nodes naming each other: three redirects at once, then a pause, then
        /// the named node again.
        seq_redirect_loop_pauses_after_three: 5000, [], [
            At(to("n2"), 1), At(to("n1"), 1), At(to("n2"), 1), At(to("n1"), 1), At(ack(), 1),
        ] => ["n1", "n2", "n1", "n2", "pause 20", "n1", "ok"];
        /// Pauses double up to the cap.
        seq_backoff_doubles_up_to_the_cap: 5000, [], [
            At(Attempt::NoResponders, 0), At(Attempt::NoResponders, 0),
            At(Attempt::NoResponders, 0), At(Attempt::NoResponders, 0),
            At(Attempt::NoResponders, 0), At(Attempt::NoResponders, 0), At(ack(), 0),
        ] => ["n1", "pause 20", "n1", "pause 40", "n1", "pause 80", "n1", "pause 160",
              "n1", "pause 200", "n1", "pause 200", "n1", "ok"];
        /// A redirect in between starts the backoff again.
        seq_a_redirect_resets_the_backoff: 5000, [], [
            At(busy(), 0), At(busy(), 0), At(to("n2"), 0), At(busy(), 0), At(ack(), 0),
        ] => ["n1", "pause 20", "n1", "pause 40", "n1", "n2", "pause 20", "n1", "ok"];
        /// The deadline falls inside a pause: the pause is cut short, then the request
        /// gives up; refusals only, so "not_applied".
        seq_deadline_during_backoff: 30, [], [
            At(Attempt::NoResponders, 0), At(Attempt::NoResponders, 0),
        ] => ["n1", "pause 20", "n1", "pause 10", "give up not_applied after 2"];
        /// A deadline already past: no attempt at all.
        seq_deadline_before_the_first_attempt: 0, [], [] => ["give up not_applied after 0"];
        /// The node refuses as too late after refusals only: not applied.
        seq_overloaded_then_too_late_is_not_applied: 5000, [], [
            At(busy(), 0), At(refused(codes::DEADLINE_EXCEEDED, None, None), 0),
        ] => ["n1", "pause 20", "n1", "service_unavailable not_applied"];
        /// A node unsure of its commit, then too late: unknown.
        seq_unsure_commit_then_too_late_is_unknown: 5000, [], [
            At(refused(codes::SERVICE_UNAVAILABLE, Some("unknown"), None), 0),
            At(refused(codes::DEADLINE_EXCEEDED, None, None), 0),
        ] => ["n1", "pause 20", "n1", "service_unavailable unknown"];
        /// No live node, then one: waits, then goes to it.
        seq_no_node_then_the_ring_owner: 5000, [], [NoNode, At(ack(), 0)]
            => ["no node", "pause 20", "n1", "ok"];
        /// No node until the deadline: nothing was sent, so "not_applied".
        seq_no_node_until_the_deadline: 50, [], [NoNode, NoNode]
            => ["no node", "pause 20", "no node", "pause 30", "give up not_applied after 2"];
        /// The node left with the request in flight: retried at once, and the command
        /// may have been applied, whatever follows.
        seq_node_gone_retries_at_once_and_is_unknown: 30, [], [
            At(Attempt::NodeGone, 5), At(Attempt::NoResponders, 0), At(Attempt::NoResponders, 0),
        ] => ["n1", "n1", "pause 20", "n1", "pause 5", "give up unknown after 3"];
        /// A refusal that is final ends the request with it, pending or not.
        seq_final_refusal_after_a_timeout_ends_it: 5000, [], [
            At(lost(), 10), At(refused(codes::CONFLICT, None, None), 0),
        ] => ["n1", "pause 20", "n1", "conflict"];
        /// An answer that cannot be read is an internal error, not retried.
        seq_bad_reply_ends_it: 5000, [], [At(Attempt::BadReply("eof".into()), 0)]
            => ["n1", "internal_error"];
        /// The last attempt may start just before the deadline; its answer counts.
        seq_an_answer_after_the_deadline_counts: 100, [], [
            At(busy(), 79), At(ack(), 300),
        ] => ["n1", "pause 20", "n1", "ok"];
    }
}
