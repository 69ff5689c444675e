//! A workload of many sessions with several WebSocket clients each, every client
//! sending `state_update`s at a steady pace and waiting for each answer. Used by the
//! chaos tests and by `cluster bench`.
//!
//! Each change sets `/c{client}/k{n}` to `n`, so the final state shows exactly which
//! changes took effect, and every command's send and answer times are recorded.

use crate::client::{ws_connect, Api, EventHook, TokenStyle, TrackedClient};
use crate::harness::LocalCluster;
use crate::tls::DevCert;
use anyhow::{Context, Result};
use gs_shared::auth::{Authority, Role};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use uuid::Uuid;

/// Where the load goes.
#[derive(Clone)]
pub struct Target {
    pub routers_http: Vec<String>,
    pub routers_ws: Vec<String>,
    pub cert: Option<DevCert>,
    pub auth: Authority,
    pub http: reqwest::Client,
}

impl Target {
    pub fn of(c: &LocalCluster) -> Target {
        Target {
            routers_http: c.router_urls(),
            routers_ws: c.router_ws_urls(),
            cert: c.cert.clone(),
            auth: c.auth.clone(),
            http: c.http(),
        }
    }
}

/// One client of the workload.
pub struct LoadClient {
    pub session: usize,
    pub session_id: String,
    pub index: usize,
    pub user: Uuid,
    pub token: String,
    pub session_token: String,
    /// The router the client is connected through (it changes on a reconnect).
    pub router: usize,
    pub client: TrackedClient,
    /// Times the client lost its connection and resumed through a router.
    pub reconnects: u32,
}

/// The answer to one command.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: Uuid,
    pub session: usize,
    pub client: usize,
    pub sent: Instant,
    pub answered: Instant,
    /// The acknowledged version, or the error code.
    pub result: Result<u64, String>,
    /// The path and value the change set.
    pub path: String,
    pub value: u64,
}

/// Send times of commands by id, for fan-out latency probes.
pub type SentTimes = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// Creates `sessions` sessions (each by its own DM) and connects `per_session`
/// clients to each (the DM and players), spread round-robin over the routers.
pub async fn setup(
    t: &Target,
    sessions: usize,
    per_session: usize,
    hook: Option<EventHook>,
) -> Result<(Vec<String>, Vec<LoadClient>)> {
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    let routers = t.routers_http.len();
    for s in 0..sessions {
        let dm = Uuid::new_v4();
        let dm_token = t.auth.mint_access(dm, Role::Dm, 24 * 3600);
        let api = Api::new(t.http.clone(), &t.routers_http[s % routers], &dm_token);
        let created = api.create_session(&format!("load session {s}")).await?;
        let sid = created["session_id"]
            .as_str()
            .context("session_id")?
            .to_string();
        let mut members = vec![(
            dm,
            dm_token.clone(),
            created["connection_token"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )];
        for p in 1..per_session {
            let user = Uuid::new_v4();
            let token = t.auth.mint_access(user, Role::Player, 24 * 3600);
            let joined = Api::new(t.http.clone(), &t.routers_http[(s + p) % routers], &token)
                .join(&sid, json!({}))
                .await?;
            members.push((
                user,
                token,
                joined["connection_token"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            ));
        }
        for (i, (user, token, st)) in members.into_iter().enumerate() {
            let router = (s + i) % routers;
            let ws = ws_connect(
                &t.routers_ws[router],
                &sid,
                &token,
                &st,
                None,
                TokenStyle::Headers,
                t.cert.as_ref(),
            )
            .await
            .with_context(|| format!("session {s} client {i}"))?;
            let client = TrackedClient::new(&format!("s{s}c{i}"), ws, false, hook.clone());
            clients.push(LoadClient {
                session: s,
                session_id: sid.clone(),
                index: i,
                user,
                token,
                session_token: st,
                router,
                client,
                reconnects: 0,
            });
        }
        ids.push(sid);
    }
    for c in &clients {
        c.client
            .wait_for("initial sync", Duration::from_secs(30), |v| {
                v.established.is_some() && v.syncs > 0
            })
            .await?;
    }
    Ok((ids, clients))
}

/// What a running workload has achieved so far, for tests to wait on.
pub struct Progress {
    /// Time of each session's latest acknowledgement.
    last_ack: Mutex<Vec<Option<Instant>>>,
    /// Time of each client's latest acknowledgement, by (session, client).
    last_client_ack: Mutex<HashMap<(usize, usize), Instant>>,
    acks: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
}

impl Progress {
    fn new(sessions: usize) -> Self {
        Progress {
            last_ack: Mutex::new(vec![None; sessions]),
            last_client_ack: Default::default(),
            acks: Default::default(),
            errors: Default::default(),
            notify: tokio::sync::Notify::new(),
        }
    }

    pub fn acks(&self) -> u64 {
        self.acks.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `session` has had an acknowledgement after `t`.
    pub fn acked_since(&self, session: usize, t: Instant) -> bool {
        self.last_ack.lock().unwrap()[session].is_some_and(|a| a > t)
    }

    /// Whether client `client` of `session` has had an acknowledgement after `t`.
    pub fn client_acked_since(&self, session: usize, client: usize, t: Instant) -> bool {
        self.last_client_ack
            .lock()
            .unwrap()
            .get(&(session, client))
            .is_some_and(|a| *a > t)
    }

    /// Waits (at most `timeout`) until `cond` holds; `what` names it in the error.
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Progress) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if cond(self) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!(
                    "timed out after {timeout:?} waiting for {what} ({} acks, {} errors)",
                    self.acks(),
                    self.errors()
                );
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    fn record(&self, r: &Record) {
        if r.result.is_ok() {
            self.acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.last_ack.lock().unwrap()[r.session] = Some(r.answered);
            self.last_client_ack
                .lock()
                .unwrap()
                .insert((r.session, r.client), r.answered);
        } else {
            self.errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.notify.notify_waiters();
    }
}

/// A running workload.
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<(LoadClient, Vec<Record>)>>,
    pub started: Instant,
    pub progress: Arc<Progress>,
}

/// Starts every client sending one change every `interval`, each waiting up to
/// `answer_timeout` for its answer before sending the next.
pub fn start(
    clients: Vec<LoadClient>,
    interval: Duration,
    answer_timeout: Duration,
    sent: Option<SentTimes>,
) -> Running {
    start_with(clients, interval, answer_timeout, sent, None)
}

/// Like [`start`], but a client whose connection is lost behaves as a real client
/// should: it reconnects through the next router of `target` that answers, with
/// `last_version` (so it receives what it missed), and sends its unanswered command
/// again under the same id (so it takes effect once, and the answer is the original
/// one).
pub fn start_reconnecting(
    clients: Vec<LoadClient>,
    interval: Duration,
    answer_timeout: Duration,
    target: Target,
) -> Running {
    start_with(clients, interval, answer_timeout, None, Some(target))
}

/// How long a client keeps trying to reconnect before it gives up.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(20);
/// Connection attempts per command before its answer is recorded as missing.
const MAX_RESENDS: u32 = 5;

/// Reconnects `c` through the routers after the one it used, in turn, until one
/// accepts it (bounded by [`RECONNECT_DEADLINE`]).
async fn reconnect(c: &mut LoadClient, t: &Target) -> Result<()> {
    let sid = c.session_id.clone();
    let deadline = Instant::now() + RECONNECT_DEADLINE;
    let n = t.routers_ws.len();
    let mut backoff = Duration::from_millis(20);
    for attempt in 1.. {
        let router = (c.router + attempt) % n;
        let last = c.client.with_view(|v| v.version);
        let opened = ws_connect(
            &t.routers_ws[router],
            &sid,
            &c.token,
            &c.session_token,
            Some(last),
            TokenStyle::Headers,
            t.cert.as_ref(),
        )
        .await;
        if let Ok(ws) = opened {
            c.client.continue_on(ws);
            let ready = c
                .client
                .wait_for("the resumed connection", RECONNECT_DEADLINE, |v| {
                    v.established.is_some() || v.closed.is_some()
                })
                .await;
            if ready.is_ok() && c.client.with_view(|v| v.closed.is_none()) {
                c.router = router;
                c.reconnects += 1;
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{}: could not reconnect through any router", c.client.name);
        }
        // Pacing between attempts, not synchronisation: nothing to wait on but time.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
    unreachable!()
}

fn start_with(
    clients: Vec<LoadClient>,
    interval: Duration,
    answer_timeout: Duration,
    sent: Option<SentTimes>,
    reconnecting: Option<Target>,
) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let n = clients.len().max(1) as u32;
    let sessions = clients.iter().map(|c| c.session + 1).max().unwrap_or(0);
    let progress = Arc::new(Progress::new(sessions));
    let tasks = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            let mut stop_rx = stop_rx.clone();
            let sent = sent.clone();
            let reconnecting = reconnecting.clone();
            let progress = progress.clone();
            // Spread the clients' first sends over one interval.
            let offset = interval * (k as u32) / n;
            tokio::spawn(async move {
                let mut records = Vec::new();
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n: u64 = 0;
                loop {
                    tokio::select! {
                        _ = stop_rx.changed() => break,
                        _ = tick.tick() => {}
                    }
                    n += 1;
                    let path = format!("/c{}/k{n}", c.index);
                    let id = Uuid::new_v4();
                    let now = Instant::now();
                    if let Some(s) = &sent {
                        s.lock().unwrap().insert(id, now);
                    }
                    let data = json!({"changes": [{"path": path, "value": n}]});
                    let mut sends = 0;
                    let answer = loop {
                        sends += 1;
                        let answer = match c
                            .client
                            .send_with_id(id, "state_update", data.clone())
                            .await
                        {
                            Ok(()) => Some(c.client.wait_answer(id, answer_timeout).await),
                            // Not sent: the connection is gone.
                            Err(_) => None,
                        };
                        if let Some(Ok(_)) = answer {
                            break answer;
                        }
                        let lost = c.client.with_view(|v| v.closed.is_some());
                        match &reconnecting {
                            Some(t) if lost && sends < MAX_RESENDS => {
                                if reconnect(&mut c, t).await.is_err() {
                                    break answer;
                                }
                            }
                            _ => break answer,
                        }
                    };
                    let Some(answer) = answer else { break };
                    let result = match answer {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => Err(e["code"].as_str().unwrap_or("error").to_string()),
                        Err(_) => Err("no_answer".to_string()),
                    };
                    let record = Record {
                        id,
                        session: c.session,
                        client: c.index,
                        sent: now,
                        answered: Instant::now(),
                        result,
                        path,
                        value: n,
                    };
                    progress.record(&record);
                    records.push(record);
                }
                (c, records)
            })
        })
        .collect();
    Running {
        stop,
        tasks,
        started,
        progress,
    }
}

impl Running {
    /// Stops sending and returns the clients and every record.
    pub async fn stop(self) -> Result<(Vec<LoadClient>, Vec<Record>)> {
        let _ = self.stop.send(true);
        let mut clients = Vec::new();
        let mut records = Vec::new();
        for t in self.tasks {
            let (c, r) = t.await?;
            clients.push(c);
            records.extend(r);
        }
        clients.sort_by_key(|c| (c.session, c.index));
        Ok((clients, records))
    }
}

/// Percentiles of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(mut xs: Vec<f64>) -> Percentiles {
    if xs.is_empty() {
        return Percentiles::default();
    }
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let at = |q: f64| xs[(((xs.len() - 1) as f64) * q).round() as usize];
    Percentiles {
        count: xs.len(),
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: *xs.last().unwrap(),
    }
}

/// The changes a session's acknowledged records say its state must hold:
/// `{"c0": {"k1": 1, ...}, ...}`.
pub fn expected_changes(records: &[Record], session: usize) -> Vec<(String, u64)> {
    records
        .iter()
        .filter(|r| r.session == session && r.result.is_ok())
        .map(|r| (r.path.clone(), r.value))
        .collect()
}

/// Checks that `doc` holds every acknowledged change of `session`.
pub fn missing_changes(doc: &Value, records: &[Record], session: usize) -> Vec<String> {
    expected_changes(records, session)
        .into_iter()
        .filter(|(path, v)| gs_wire::pointer::get(doc, path).ok().flatten() != Some(&json!(v)))
        .map(|(p, _)| p)
        .collect()
}
