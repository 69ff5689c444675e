//! The membership runtime: publishes this process's heartbeat, feeds every heartbeat
//! and leave it hears into the sans-IO [`Membership`] table, expires silent members, and
//! tells subscribers when the ring changes and when a member departs. Nodes and routers
//! run the same code, so they keep the same member table.
//!
//! Fast failure detection: a node killed outright (SIGKILL, crash) loses its NATS
//! connection, and NATS answers requests to it with "no responders" at once. A router
//! that sees that publishes a *suspect* notice; every member then probes the node
//! itself (a `ping` request) and drops it only if it too gets "no responders". So one
//! confused member cannot remove a healthy node, and a dead one leaves the ring in
//! milliseconds instead of `failure_timeout_ms`. Pauses and partitions (the socket
//! stays open) are still detected by the heartbeat timeout.

use crate::config::MembershipConfig;
use crate::membership::{Heartbeat, Leave, MemberKind, MemberState, MemberView, Membership};
use crate::ring::Ring;
use crate::rpc::{Caller, NodeRequest, RequestBody, Subjects};
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A shared, live view of the cluster.
#[derive(Clone)]
pub struct ClusterView {
    inner: Arc<Inner>,
}

struct Inner {
    me: String,
    kind: MemberKind,
    incarnation: u64,
    http: Option<String>,
    table: RwLock<Membership>,
    state: RwLock<MemberState>,
    load: AtomicU64,
    ring_tx: watch::Sender<u64>,
    /// Bumped whenever a member leaves, is declared dead or restarts
    /// ([`ClusterView::departures`]).
    departed_tx: watch::Sender<u64>,
    nats: async_nats::Client,
    /// The process's requests (probes', and every forwarder's on this view): one
    /// reply subscription, whose waiters end with their requests.
    replies: Arc<crate::replies::Replies>,
    subjects: Subjects,
    heartbeat_every: Duration,
    /// When this member last raised or probed each suspect (rate limit).
    suspected: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

/// Heartbeat intervals a member listens before announcing itself.
const WARM_UP_BEATS: u32 = 2;

/// A member raises (and probes) the same suspect at most this often.
const SUSPECT_EVERY: Duration = Duration::from_millis(250);
/// How long a probe waits for the suspect's answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Milliseconds since the epoch: the incarnation of this process.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ClusterView {
    /// Starts heartbeating as `me` and listening to the others. The returned tasks run
    /// until the NATS client is closed or they are aborted.
    pub async fn start(
        nats: async_nats::Client,
        subjects: Subjects,
        cfg: &MembershipConfig,
        me: String,
        kind: MemberKind,
        http: Option<String>,
    ) -> Result<(ClusterView, Vec<JoinHandle<()>>), async_nats::SubscribeError> {
        let (ring_tx, _) = watch::channel(0);
        let (departed_tx, _) = watch::channel(0);
        let view = ClusterView {
            inner: Arc::new(Inner {
                me,
                kind,
                incarnation: now_ms(),
                http,
                table: RwLock::new(Membership::new(
                    Duration::from_millis(cfg.failure_timeout_ms),
                    cfg.vnodes,
                )),
                state: RwLock::new(MemberState::Alive),
                load: AtomicU64::new(0),
                ring_tx,
                departed_tx,
                nats: nats.clone(),
                replies: Arc::new(crate::replies::Replies::new(nats.clone())),
                subjects: subjects.clone(),
                heartbeat_every: Duration::from_millis(cfg.heartbeat_ms),
                suspected: Default::default(),
            }),
        };
        let heartbeats = nats.subscribe(subjects.heartbeat()).await?;
        let leaves = nats.subscribe(subjects.leave()).await?;
        let suspects = nats.subscribe(subjects.suspect()).await?;
        let tasks = vec![
            tokio::spawn(view.clone().hear_heartbeats(heartbeats)),
            tokio::spawn(view.clone().hear_leaves(leaves)),
            tokio::spawn(view.clone().hear_suspects(suspects)),
            tokio::spawn(view.clone().beat()),
        ];
        Ok((view, tasks))
    }

    /// Task: the others' heartbeats into the member table.
    async fn hear_heartbeats(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            match serde_json::from_slice::<Heartbeat>(&msg.payload) {
                Ok(hb) => self.observe(hb),
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed heartbeat"),
            }
        }
    }

    /// Task: graceful leaves out of the member table.
    async fn hear_leaves(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            if let Ok(leave) = serde_json::from_slice::<Leave>(&msg.payload) {
                if leave.id != self.inner.me {
                    let changed = self.inner.table.write().unwrap().leave(&leave);
                    tracing::info!(member = %leave.id, "member left");
                    if changed {
                        self.notify();
                    }
                    self.departed();
                }
            }
        }
    }

    /// Task: a suspect notice makes this member probe the suspect itself (once).
    async fn hear_suspects(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let Ok(id) = String::from_utf8(msg.payload.to_vec()) else {
                continue;
            };
            if id != self.inner.me && self.is_alive(&id) && self.first_time(&id) {
                let v = self.clone();
                tokio::spawn(async move { v.probe(&id).await });
            }
        }
    }

    /// Task: this member's heartbeats, and the others' timeouts.
    async fn beat(self) {
        // Listen before speaking: a member announces itself (and puts itself on its own
        // ring) only after it has heard the others' heartbeats, so it never acts on a
        // view in which the live members are missing.
        tokio::time::sleep(self.inner.heartbeat_every * WARM_UP_BEATS).await;
        let mut tick = tokio::time::interval(self.inner.heartbeat_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.publish_heartbeat().await;
            let dead = self.inner.table.write().unwrap().tick(Instant::now());
            if !dead.is_empty() {
                tracing::warn!(?dead, "members timed out");
                self.notify();
                self.departed();
            }
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            id: self.inner.me.clone(),
            kind: self.inner.kind,
            state: *self.inner.state.read().unwrap(),
            incarnation: self.inner.incarnation,
            load: self.inner.load.load(Ordering::Relaxed),
            http: self.inner.http.clone(),
        }
    }

    fn observe(&self, hb: Heartbeat) {
        let id = hb.id.clone();
        let incarnation = hb.incarnation;
        let (changed, restarted) = {
            let mut table = self.inner.table.write().unwrap();
            // A live member's higher incarnation is always taken.
            let restarted = table
                .get(&id)
                .is_some_and(|known| known.incarnation < incarnation);
            (table.observe(hb, Instant::now()), restarted)
        };
        if changed {
            tracing::info!(member = %id, "ring changed");
            self.notify();
        }
        if restarted {
            // The process that was `id` is gone (a new one took its id without a
            // leave): what was in flight to it will not be answered.
            tracing::info!(member = %id, incarnation, "member restarted");
            self.departed();
        }
    }

    fn departed(&self) {
        self.inner.departed_tx.send_modify(|n| *n += 1);
    }

    fn notify(&self) {
        let version = self.inner.table.read().unwrap().ring_version();
        self.inner.ring_tx.send_replace(version);
    }

    async fn publish_heartbeat(&self) {
        let hb = self.heartbeat();
        // Our own heartbeat is applied directly too: losing NATS must not make a member
        // think itself dead.
        self.observe(hb.clone());
        let payload = serde_json::to_vec(&hb).expect("heartbeat serialises");
        if let Err(e) = self
            .inner
            .nats
            .publish(self.inner.subjects.heartbeat(), payload.into())
            .await
        {
            tracing::debug!(error = %e, "heartbeat not published");
        }
    }

    /// Rate limit of suspicion per member: true if `id` was not raised or probed
    /// within [`SUSPECT_EVERY`].
    fn first_time(&self, id: &str) -> bool {
        let mut s = self.inner.suspected.lock().unwrap();
        let now = Instant::now();
        match s.get(id) {
            Some(t) if now.duration_since(*t) < SUSPECT_EVERY => false,
            _ => {
                s.insert(id.to_string(), now);
                true
            }
        }
    }

    /// Reports that a request to node `id` found no responders.
    pub async fn suspect(&self, id: &str) {
        if !self.is_alive(id) {
            return;
        }
        if let Err(e) = self
            .inner
            .nats
            .publish(self.inner.subjects.suspect(), id.to_string().into())
            .await
        {
            tracing::debug!(error = %e, "suspect notice not published");
        }
    }

    /// Asks `id` whether it is there; drops it when NATS says nobody listens.
    async fn probe(&self, id: &str) {
        let req = NodeRequest {
            session_id: Uuid::nil(),
            caller: Caller {
                user_id: Uuid::nil(),
                role: crate::auth::Role::Admin,
            },
            body: RequestBody::Ping,
            deadline_ms: None,
        };
        let payload = serde_json::to_vec(&req).expect("requests serialise");
        let r = self
            .inner
            .replies
            .request(
                self.inner.subjects.node_rpc(id),
                payload.into(),
                PROBE_TIMEOUT,
            )
            .await;
        if let Err(e) = r {
            if matches!(e, crate::replies::RequestFailed::NoResponders) {
                let changed = self.inner.table.write().unwrap().mark_dead(id);
                tracing::warn!(member = %id, "member confirmed gone (no responders)");
                if changed {
                    self.notify();
                }
                self.departed();
            }
        }
    }

    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// The node the ring places `session` on.
    pub fn owner(&self, session: &Uuid) -> Option<String> {
        self.inner
            .table
            .read()
            .unwrap()
            .ring()
            .owner(session)
            .map(str::to_string)
    }

    /// A copy of the current ring (for bulk placement, e.g. handoff after a change).
    pub fn ring(&self) -> Ring {
        self.inner.table.read().unwrap().ring().clone()
    }

    pub fn ring_version(&self) -> u64 {
        self.inner.table.read().unwrap().ring_version()
    }

    pub fn node_count(&self) -> usize {
        self.inner.table.read().unwrap().node_count()
    }

    pub fn is_alive(&self, id: &str) -> bool {
        self.inner.table.read().unwrap().is_alive(id)
    }

    /// The reply subscription this process's requests share.
    pub fn replies(&self) -> Arc<crate::replies::Replies> {
        self.inner.replies.clone()
    }

    /// The incarnation (process start) of live member `id`: a member restarted under
    /// the same id has a new one.
    pub fn incarnation(&self, id: &str) -> Option<u64> {
        self.inner
            .table
            .read()
            .unwrap()
            .get(id)
            .map(|hb| hb.incarnation)
    }

    /// Whether `id` is known to be dead: not a live member, by a view that is past its
    /// warm-up (it has listened to every live member's heartbeats), so a member that
    /// is merely not heard of yet, just after this process started, is not "dead".
    pub fn is_known_dead(&self, id: &str) -> bool {
        self.announced() && !self.is_alive(id)
    }

    /// Whether `node` is on this member's ring (it takes sessions here).
    pub fn on_ring(&self, node: &str) -> bool {
        self.inner.table.read().unwrap().ring().contains(node)
    }

    /// Whether this member has announced itself (it is past its warm-up).
    pub fn announced(&self) -> bool {
        self.is_alive(&self.inner.me)
    }

    pub fn members(&self) -> Vec<MemberView> {
        self.inner.table.read().unwrap().members(Instant::now())
    }

    /// Fires whenever the ring changes (the value is the ring version).
    pub fn ring_changes(&self) -> watch::Receiver<u64> {
        self.inner.ring_tx.subscribe()
    }

    /// Fires whenever a member leaves, is declared dead or restarts (a heartbeat of a
    /// higher incarnation), whether or not the ring changed: a draining node is off
    /// the ring already when it leaves, and a restart keeps the ring, so a request in
    /// flight to the old process learns of its end only here.
    pub fn departures(&self) -> watch::Receiver<u64> {
        self.inner.departed_tx.subscribe()
    }

    /// Sets the load figure carried by the next heartbeats.
    pub fn set_load(&self, load: u64) {
        self.inner.load.store(load, Ordering::Relaxed);
    }

    /// Announces draining: off the ring at once, on this process and (with the next
    /// heartbeat, published immediately) on every other.
    pub async fn set_draining(&self) {
        *self.inner.state.write().unwrap() = MemberState::Draining;
        self.publish_heartbeat().await;
        let _ = self.inner.nats.flush().await;
    }

    /// Announces a graceful leave.
    pub async fn leave(&self) {
        let leave = Leave {
            id: self.inner.me.clone(),
            incarnation: self.inner.incarnation,
        };
        let payload = serde_json::to_vec(&leave).expect("leave serialises");
        let _ = self
            .inner
            .nats
            .publish(self.inner.subjects.leave(), payload.into())
            .await;
        let _ = self.inner.nats.flush().await;
    }
}
