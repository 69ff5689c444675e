//! Per-session fan-out on a router.
//!
//! The first client of session S on this router creates S's hub: one NATS
//! subscription to `gs.session.S.events`, a [`Sequencer`] that turns what arrives into
//! a gapless increasing stream (filling gaps from the owner), a buffer of the recent
//! events, and a broadcast channel to every client connection of S on this router.
//! The hub goes away with its last client.
//!
//! Each connection still tracks its own version: it may have joined after the hub's
//! first event, or lagged behind the broadcast; it catches up from the hub's buffer or
//! the owner (see `ws`).

use crate::sequencer::Sequencer;
use futures::StreamExt;
use gs_shared::auth::Role;
use gs_shared::event_batch;
use gs_shared::forward::Forwarder;
use gs_shared::protocol::SessionStatus;
use gs_shared::rpc::{Caller, RawEvent, ReplyBody, RequestBody, Subjects};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

/// Events a hub's broadcast holds for its slowest connection (allocated up front, per
/// session): a connection further behind catches up from the hub's recent-events
/// buffer (`router.recent_events`) instead.
const FANOUT_CAPACITY: usize = 128;

/// How long the hub waits for the owner to fill a gap per attempt.
const FILL_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often a persisting gap is asked for again.
const FILL_RETRY: Duration = Duration::from_millis(100);

/// Commands waiting for their ack from an event (`Gs-Ack`, see
/// `RequestBody::Command::ack_by_event`): command id → the waiting forwards. The same
/// id may be in flight more than once (a client resending it on a new connection while
/// the old one's forward still runs): the event answers every one of them, and each
/// forward, when it ends, takes away only its own waiter.
#[derive(Default)]
pub struct AckWaiters {
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    by_command: HashMap<Uuid, Vec<(u64, tokio::sync::oneshot::Sender<u64>)>>,
    next_token: u64,
}

impl AckWaiters {
    /// Waits for `command`'s ack; the guard stops waiting when dropped.
    pub fn wait(self: &Arc<Self>, command: Uuid) -> (AckWait, tokio::sync::oneshot::Receiver<u64>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut w = self.waiting.lock().unwrap();
        w.next_token += 1;
        let token = w.next_token;
        w.by_command.entry(command).or_default().push((token, tx));
        (
            AckWait {
                waiters: self.clone(),
                command,
                token,
            },
            rx,
        )
    }

    /// An event carried `command`'s ack at `version`.
    fn acked(&self, command: Uuid, version: u64) {
        let waiting = self.waiting.lock().unwrap().by_command.remove(&command);
        for (_, tx) in waiting.into_iter().flatten() {
            let _ = tx.send(version);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting
            .lock()
            .unwrap()
            .by_command
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// Removes its waiter when dropped.
pub struct AckWait {
    waiters: Arc<AckWaiters>,
    command: Uuid,
    token: u64,
}

impl Drop for AckWait {
    fn drop(&mut self) {
        let mut w = self.waiters.waiting.lock().unwrap();
        if let Some(list) = w.by_command.get_mut(&self.command) {
            list.retain(|(t, _)| *t != self.token);
            if list.is_empty() {
                w.by_command.remove(&self.command);
            }
        }
    }
}

/// One event as delivered to clients: the owner's rendering, shared by every
/// connection that sends it (a clone is a reference count, not a copy).
#[derive(Debug, Clone)]
pub struct Ev {
    pub version: u64,
    pub json: Utf8Bytes,
    /// The session ended with this event: connections close after sending it.
    pub is_final: bool,
    /// A `player_left` event: the user who is no longer a member. Their connections
    /// close after sending it.
    pub left: Option<Uuid>,
    /// The command this event answers (`Gs-Acks`): its sender's connection writes
    /// the ack right behind it (`answers`). Events from a gap fill carry none.
    pub ack: Option<Uuid>,
}

impl Ev {
    pub fn new(version: u64, json: Utf8Bytes) -> Ev {
        let is_final = is_final_event(json.as_str());
        let left = left_member(json.as_str());
        Ev {
            version,
            json,
            is_final,
            left,
            ack: None,
        }
    }

    /// An event from a node's reply.
    pub fn from_raw(raw: RawEvent) -> Ev {
        let json = Utf8Bytes::try_from(raw.json.bytes()).expect("SharedJson holds UTF-8");
        Ev::new(raw.version, json)
    }
}

/// Whether a rendered event ends the session (`session_status_changed` to `ended`).
pub fn is_final_event(json: &str) -> bool {
    SessionStatus::changed_by(json).is_some_and(SessionStatus::is_final)
}

/// The user a `player_left` event removes from the session (whether they left or were
/// removed), if `json` is one.
pub fn left_member(json: &str) -> Option<Uuid> {
    if !json.contains("\"player_left\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    if v["type"] != "player_left" {
        return None;
    }
    Uuid::parse_str(v["data"]["user_id"].as_str()?).ok()
}

struct HubState {
    seq: Sequencer<Ev>,
    recent: VecDeque<Ev>,
}

pub struct Hub {
    pub session: Uuid,
    tx: broadcast::Sender<Ev>,
    /// The newest version delivered: a connection blocked writing to a client that
    /// does not read watches it to know how far behind it falls (slow consumers).
    newest: watch::Sender<u64>,
    state: Mutex<HubState>,
    recent_cap: usize,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<Ev> {
        self.tx.subscribe()
    }

    /// The newest version delivered, as it changes.
    pub fn watch_newest(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// A client synced at `version`. A hub that has not seen an event yet starts its
    /// stream after it (so it can fill gaps from there); a hub already following the
    /// stream is left alone: moving it forward would skip events it has not yet
    /// delivered to its other clients.
    pub fn seed(&self, version: u64) {
        let mut st = self.state.lock().unwrap();
        if st.seq.next().is_none() {
            let ready = st.seq.seed(version);
            self.deliver(&mut st, ready);
        }
    }

    fn offer(&self, version: u64, ev: Ev) {
        let mut st = self.state.lock().unwrap();
        let ready = st.seq.push(version, ev);
        self.deliver(&mut st, ready);
    }

    /// Offers the events of one message from the owner (one commit), then answers the
    /// commands they carry acks for.
    fn offer_all(&self, events: Vec<event_batch::Received>, acks: &AckWaiters) {
        let mut carried = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            for r in events {
                let Ok(json) = Utf8Bytes::try_from(r.json) else {
                    continue;
                };
                if let Some(command) = r.ack {
                    carried.push((command, r.version));
                }
                let ev = Ev {
                    ack: r.ack,
                    ..Ev::new(r.version, json)
                };
                let ready = st.seq.push(r.version, ev);
                self.deliver(&mut st, ready);
            }
        }
        for (command, version) in carried {
            acks.acked(command, version);
        }
    }

    /// Buffers and broadcasts in one critical section, so the buffer and every
    /// receiver see events in the same (version) order.
    fn deliver(&self, st: &mut HubState, ready: Vec<(u64, Ev)>) {
        let mut newest = None;
        for (_, ev) in ready {
            newest = Some(ev.version);
            st.recent.push_back(ev.clone());
            let _ = self.tx.send(ev);
        }
        if let Some(v) = newest {
            self.newest.send_replace(v);
        }
        while st.recent.len() > self.recent_cap {
            st.recent.pop_front();
        }
    }

    fn gap(&self) -> Option<(u64, u64)> {
        self.state.lock().unwrap().seq.gap()
    }

    /// Events `after+1 ..= up_to` from the buffer, only if it holds every one of them
    /// (otherwise the caller asks the owner).
    pub fn recent_range(&self, after: u64, up_to: u64) -> Option<Vec<Ev>> {
        let st = self.state.lock().unwrap();
        let out: Vec<Ev> = st
            .recent
            .iter()
            .filter(|e| e.version > after && e.version <= up_to)
            .cloned()
            .collect();
        let contiguous = out.len() as u64 == up_to.saturating_sub(after)
            && out
                .iter()
                .enumerate()
                .all(|(i, e)| e.version == after + 1 + i as u64);
        contiguous.then_some(out)
    }

    /// The newest version the hub has delivered.
    pub fn last_version(&self) -> Option<u64> {
        self.state.lock().unwrap().seq.next().map(|n| n - 1)
    }
}

/// All hubs of this router.
pub struct Hubs {
    hubs: Mutex<HashMap<Uuid, Weak<Hub>>>,
    nats: async_nats::Client,
    subjects: Subjects,
    forwarder: Forwarder,
    recent_cap: usize,
    pub acks: Arc<AckWaiters>,
}

impl Hubs {
    pub fn new(
        nats: async_nats::Client,
        subjects: Subjects,
        forwarder: Forwarder,
        recent_cap: usize,
    ) -> Self {
        Self {
            hubs: Mutex::new(HashMap::new()),
            nats,
            subjects,
            forwarder,
            recent_cap: recent_cap.max(16),
            acks: Arc::new(AckWaiters::default()),
        }
    }

    /// The hub of `session`, subscribed before this returns (so nothing published
    /// after it is missed).
    pub async fn join(&self, session: Uuid) -> Result<Arc<Hub>, async_nats::SubscribeError> {
        if let Some(h) = self
            .hubs
            .lock()
            .unwrap()
            .get(&session)
            .and_then(Weak::upgrade)
        {
            return Ok(h);
        }
        let sub = self
            .nats
            .subscribe(self.subjects.session_events(&session))
            .await?;
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        let hub = Arc::new(Hub {
            session,
            tx,
            newest: watch::channel(0).0,
            state: Mutex::new(HubState {
                seq: Sequencer::default(),
                recent: VecDeque::new(),
            }),
            recent_cap: self.recent_cap,
            task: Mutex::new(None),
        });
        let mut hubs = self.hubs.lock().unwrap();
        // Another connection may have created it meanwhile: keep one.
        if let Some(h) = hubs.get(&session).and_then(Weak::upgrade) {
            return Ok(h);
        }
        hubs.retain(|_, w| w.strong_count() > 0);
        hubs.insert(session, Arc::downgrade(&hub));
        let task = tokio::spawn(run_hub(
            Arc::downgrade(&hub),
            sub,
            self.forwarder.clone(),
            self.acks.clone(),
        ));
        *hub.task.lock().unwrap() = Some(task);
        Ok(hub)
    }

    pub fn count(&self) -> usize {
        self.hubs
            .lock()
            .unwrap()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// The router acts as itself when it fills gaps.
pub fn router_caller() -> Caller {
    Caller {
        user_id: Uuid::nil(),
        role: Role::Admin,
    }
}

async fn run_hub(
    hub: Weak<Hub>,
    mut sub: async_nats::Subscriber,
    forwarder: Forwarder,
    acks: Arc<AckWaiters>,
) {
    let mut retry = tokio::time::interval(FILL_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                let Some(hub) = hub.upgrade() else { return };
                let Some(events) = event_batch::decode(msg.headers.as_ref(), msg.payload) else {
                    continue;
                };
                hub.offer_all(events, &acks);
                if hub.gap().is_some() {
                    fill(&hub, &forwarder).await;
                }
            }
            _ = retry.tick() => {
                let Some(hub) = hub.upgrade() else { return };
                if hub.gap().is_some() {
                    fill(&hub, &forwarder).await;
                }
            }
        }
    }
}

/// Rounds of [`fill_once`] in one fill: an answer holds at most half a MiB of events,
/// so a long gap takes several.
const FILL_ROUNDS: usize = 16;

/// Asks the owner for the missing range and offers what comes back, again while the
/// answers make progress.
async fn fill(hub: &Hub, forwarder: &Forwarder) {
    for _ in 0..FILL_ROUNDS {
        let before = hub.gap();
        fill_once(hub, forwarder).await;
        let after = hub.gap();
        if after.is_none() || after == before {
            return;
        }
    }
}

async fn fill_once(hub: &Hub, forwarder: &Forwarder) {
    let Some((after, up_to)) = hub.gap() else {
        return;
    };
    metrics::counter!("gs_router_gap_fills_total").increment(1);
    let r = forwarder
        .request_until(
            hub.session,
            router_caller(),
            RequestBody::EventsSince {
                after,
                limit: up_to - after,
            },
            Instant::now() + FILL_TIMEOUT,
        )
        .await;
    match r {
        Ok(ReplyBody::Events { events, .. }) => {
            for raw in events {
                if raw.version <= up_to {
                    hub.offer(raw.version, Ev::from_raw(raw));
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(session = %hub.session, error = %e, "gap fill failed; will retry")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        let (tx, _) = broadcast::channel(16);
        Hub {
            session: Uuid::nil(),
            tx,
            newest: watch::channel(0).0,
            state: Mutex::new(HubState {
                seq: Sequencer::default(),
                recent: VecDeque::new(),
            }),
            recent_cap: 16,
            task: Mutex::new(None),
        }
    }

    #[test]
    fn an_ack_reaches_every_waiter_of_its_command_and_each_leaves_alone() {
        let acks = Arc::new(AckWaiters::default());
        let x = Uuid::from_u128(1);
        let (first, mut rx1) = acks.wait(x);
        let (second, mut rx2) = acks.wait(x);
        // The first forward ends (answered by reply): the second still waits.
        drop(first);
        assert_eq!(acks.len(), 1);
        acks.acked(x, 7);
        assert_eq!(rx2.try_recv().ok(), Some(7));
        assert!(rx1.try_recv().is_err(), "its waiter was gone");
        drop(second);
        assert_eq!(acks.len(), 0);
        // Both waiting: both answered.
        let (_a, mut ra) = acks.wait(x);
        let (_b, mut rb) = acks.wait(x);
        acks.acked(x, 8);
        assert_eq!((ra.try_recv().ok(), rb.try_recv().ok()), (Some(8), Some(8)));
    }

    #[test]
    fn the_buffer_answers_only_whole_ranges() {
        let h = hub();
        h.offer(5, Ev::new(5, "{}".into()));
        h.offer(7, Ev::new(7, "{}".into())); // held: 6 is missing
        h.offer(6, Ev::new(6, "{}".into()));
        assert_eq!(
            h.recent_range(4, 7).map(|v| v.len()),
            Some(3),
            "5, 6 and 7 are buffered"
        );
        assert!(h.recent_range(3, 7).is_none(), "4 is not in the buffer");
        assert!(h.recent_range(6, 8).is_none(), "8 is not in the buffer");
    }

    #[test]
    fn seeding_never_skips_what_the_hub_follows() {
        let h = hub();
        let mut rx = h.subscribe();
        h.offer(5, Ev::new(5, "{}".into()));
        // A client attached at version 6 before the hub saw event 6.
        h.seed(6);
        h.offer(6, Ev::new(6, "{}".into()));
        h.offer(7, Ev::new(7, "{}".into()));
        let got: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.version)
            .collect();
        assert_eq!(
            got,
            vec![5, 6, 7],
            "6 still reaches the hub's other clients"
        );
    }

    #[test]
    fn departures_are_recognised() {
        let u = Uuid::new_v4();
        let left = format!(
            r#"{{"type":"player_left","version":4,"data":{{"user_id":"{u}","timestamp":"t"}}}}"#
        );
        assert_eq!(left_member(&left), Some(u));
        assert_eq!(Ev::new(4, left.clone().into()).left, Some(u));
        // The words inside another event are not a departure.
        let update = format!(
            r#"{{"type":"state_update","version":5,"data":{{"changes":[{{"path":"/x","value":"player_left"}}],"user_id":"{u}"}}}}"#
        );
        assert_eq!(left_member(&update), None);
        assert_eq!(left_member(r#"{"type":"player_joined"}"#), None);
    }

    #[test]
    fn final_events_are_recognised() {
        let end = r#"{"data":{"status":"ended","previous":"active"},"type":"session_status_changed","version":9}"#;
        let pause = r#"{"data":{"status":"paused","previous":"active"},"type":"session_status_changed","version":9}"#;
        assert!(is_final_event(end));
        assert!(!is_final_event(pause));
        assert!(!is_final_event(
            r#"{"data":{"status":"ended"},"type":"state_update","version":1}"#
        ));
    }
}
