//! `cluster bench`: the load generator and its report.
//!
//! P WebSocket clients on each of S sessions (spread over the routers) send
//! `state_update`s at a fixed rate. Closed loop (the default): each client waits for
//! the answer to one change before sending the next; latency starts at the send.
//! Open loop (`--open-loop`): each client sends on its schedule whatever the answers
//! do, as players do, and latency starts at the *scheduled* time, so a stalled server
//! cannot hide its queueing (no coordinated omission).
//!
//! Each change sets `/c{client}/k{n mod keys}` to `{"n": n, "t": µs}` where `t` is the
//! send time on the generator's clock, so every client computes the fan-out latency
//! of every event it receives without shared bookkeeping, and the state document
//! stays bounded however long the run.
//!
//! Reported over the measured window (after `--warmup`): acknowledged and failed
//! commands, ack latency (send → ack at the sender), fan-out latency (send → event at
//! each client of the session, the sender included), events delivered per second,
//! per-client gaps, duplicates and out-of-order events and answers to commands not
//! awaited (a second answer, or one after its timeout; all must be zero), and the
//! CPU time of every process group (read from `/proc`) with the CPU per
//! acknowledged update.
//!
//! `--idle N` measures instead what an idle connection costs: N WebSockets held open on
//! one router, and the router's resident memory per connection.

use crate::client::{ws_connect, Api, TokenStyle, WsStream};
use crate::load::{percentiles, Percentiles, Target};
use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use gs_shared::auth::Role;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize)]
pub struct BenchSpec {
    pub sessions: usize,
    pub clients_per_session: usize,
    /// Changes per second each client sends.
    pub rate: f64,
    /// Seconds measured (after the warm-up).
    pub duration_secs: f64,
    /// Seconds of load before the measured window (excluded from every figure).
    pub warmup_secs: f64,
    /// Send on schedule without waiting for answers.
    pub open_loop: bool,
    /// Keys each client cycles through.
    pub keys: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientAnomalies {
    pub clients: usize,
    pub gaps: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Answers (`ack` or `error`) to a command not awaited: a second answer to one
    /// message, or one after its timeout (every message is answered exactly once).
    pub stray_answers: u64,
    pub clients_with_anomalies: usize,
}

/// CPU seconds of one process group over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct GroupCpu {
    pub group: String,
    pub cpu_secs: f64,
    /// Share of one core over the window.
    pub cores: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub spec: BenchSpec,
    pub cores: usize,
    /// The kernel's `sched_autogroup_enabled` during the run (`None`: not Linux, or
    /// not readable). With it on, every process started in its own session (the
    /// system's PostgreSQL, NATS, Redis and RabbitMQ daemons) is a scheduling group of
    /// its own, as large as the whole bench: it runs at once on every wake-up and
    /// batches less, which moves CPU between the groups (BENCHMARKS.md, stop 29).
    pub sched_autogroup: Option<bool>,
    /// Length of the measured window.
    pub window_secs: f64,
    /// Commands scheduled in the window (what was offered).
    pub offered: usize,
    pub offered_per_sec: f64,
    pub commands: usize,
    pub acked: usize,
    pub failed: usize,
    pub failures_by_code: BTreeMap<String, usize>,
    pub acked_per_sec: f64,
    pub ack_latency_ms: Percentiles,
    pub fanout_latency_ms: Percentiles,
    pub events_delivered: u64,
    pub events_per_sec: f64,
    pub anomalies: ClientAnomalies,
    /// The measured window minute by minute (ack latency from a shared histogram:
    /// bucket edges, 0.1 ms below 10 ms, 1 ms above), to show whether a long run
    /// stays flat.
    pub minutes: Vec<WindowStats>,
    pub cpu: Vec<GroupCpu>,
    /// CPU of every service process (all groups but the load generator) per
    /// acknowledged update.
    pub cpu_us_per_update: f64,
    /// The same with the load generator's own CPU included.
    pub cpu_us_per_update_with_generator: f64,
}

/// Shared counters for the progress line and the per-minute windows.
struct Progress {
    acked: AtomicU64,
    failed: AtomicU64,
    events: AtomicU64,
    /// Ack latencies of measured commands, by [`Hist`] bucket.
    ack_hist: Hist,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress {
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            events: AtomicU64::new(0),
            ack_hist: Hist::new(),
        }
    }
}

/// A latency histogram shared by every client: 0.1 ms buckets below 10 ms, 1 ms
/// buckets from 10 ms to 60 s, one bucket above. Windows are differences of two
/// [`Hist::snapshot`]s, so the reporter reads percentiles of any interval without
/// stopping the clients.
struct Hist(Box<[AtomicU64]>);

const FINE_BUCKETS: usize = 100;
const COARSE_MAX_MS: usize = 60_000;

impl Hist {
    fn new() -> Hist {
        Hist(
            (0..FINE_BUCKETS + COARSE_MAX_MS + 1)
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    fn bucket(ms: f32) -> usize {
        if ms < 10.0 {
            ((ms.max(0.0) * 10.0) as usize).min(FINE_BUCKETS - 1)
        } else {
            (FINE_BUCKETS + ms as usize - 10).min(FINE_BUCKETS + COARSE_MAX_MS)
        }
    }

    /// The upper edge of a bucket, in ms.
    fn upper(i: usize) -> f64 {
        if i < FINE_BUCKETS {
            (i + 1) as f64 / 10.0
        } else {
            (i - FINE_BUCKETS + 11) as f64
        }
    }

    fn record(&self, ms: f32) {
        self.0[Self::bucket(ms)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<u64> {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// (count, p50, p99) of the samples between two snapshots, in ms (bucket edges).
    fn window(before: &[u64], after: &[u64]) -> (u64, f64, f64) {
        let diff: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        let n: u64 = diff.iter().sum();
        let at = |q: f64| {
            let rank = ((n as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in diff.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Self::upper(i);
                }
            }
            0.0
        };
        if n == 0 {
            (0, 0.0, 0.0)
        } else {
            (n, at(0.50), at(0.99))
        }
    }
}

/// One minute (or the last, shorter part) of the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowStats {
    /// Start of the window, seconds after the warm-up.
    pub start_secs: f64,
    pub secs: f64,
    pub acked_per_sec: f64,
    pub events_per_sec: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
}

/// What one client measured.
#[derive(Default)]
struct ClientResult {
    commands: usize,
    acked: Vec<f32>,
    fanout: Vec<f32>,
    failures: BTreeMap<String, usize>,
    events: u64,
    gaps: u64,
    duplicates: u64,
    out_of_order: u64,
    stray_answers: u64,
}

/// The measurement clock: microseconds since the run's start.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.0).as_micros() as u64
    }
    fn now(&self) -> u64 {
        self.us(Instant::now())
    }
}

/// A server message, read only as far as the bench needs.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    data: Option<IncomingData>,
    #[serde(default)]
    error: Option<IncomingError>,
}

#[derive(Deserialize)]
struct IncomingData {
    #[serde(default)]
    version: Option<serde_json::Value>,
    #[serde(default)]
    changes: Option<Vec<IncomingChange>>,
}

#[derive(Deserialize)]
struct IncomingChange {
    #[serde(default)]
    value: Option<Probe>,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    t: Option<u64>,
}

#[derive(Deserialize)]
struct IncomingError {
    code: String,
}

/// A version that may come as a number or as a decimal string.
fn version_of(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// One connected client of the workload.
struct BenchClient {
    index: usize,
    ws: WsStream,
}

/// Creates the sessions (each by its own DM), joins the players and connects every
/// client, spread round-robin over the routers.
async fn setup(t: &Target, sessions: usize, per_session: usize) -> Result<Vec<BenchClient>> {
    let routers = t.routers_http.len();
    let mut members = Vec::new();
    for s in 0..sessions {
        let dm = Uuid::new_v4();
        let dm_token = t.auth.mint_access(dm, Role::Dm, 24 * 3600);
        let api = Api::new(t.http.clone(), &t.routers_http[s % routers], &dm_token);
        let created = api.create_session(&format!("bench session {s}")).await?;
        let sid = created["session_id"]
            .as_str()
            .context("session_id")?
            .to_string();
        let st = created["connection_token"]
            .as_str()
            .unwrap_or("")
            .to_string();
        members.push((s, 0usize, sid.clone(), dm_token, st));
        for p in 1..per_session {
            let token = t.auth.mint_access(Uuid::new_v4(), Role::Player, 24 * 3600);
            let joined = Api::new(t.http.clone(), &t.routers_http[(s + p) % routers], &token)
                .join(&sid, json!({}))
                .await?;
            let st = joined["connection_token"]
                .as_str()
                .unwrap_or("")
                .to_string();
            members.push((s, p, sid.clone(), token, st));
        }
    }
    let connects = members.into_iter().map(|(s, i, sid, token, st)| {
        let url = t.routers_ws[(s + i) % routers].clone();
        let cert = t.cert.clone();
        async move {
            let ws = ws_connect(
                &url,
                &sid,
                &token,
                &st,
                None,
                TokenStyle::Headers,
                cert.as_ref(),
            )
            .await
            .with_context(|| format!("session {s} client {i}"))?;
            anyhow::Ok(BenchClient { index: i, ws })
        }
    });
    futures::stream::iter(connects)
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Runs the workload against `target`; `pids` are the cluster's own processes (so
/// another cluster on the machine is not counted), empty to count every gs process.
pub async fn run(target: &Target, spec: &BenchSpec, pids: &[u32]) -> Result<BenchReport> {
    let clients = setup(target, spec.sessions, spec.clients_per_session).await?;
    let clock = Clock(Instant::now());
    let warmup_end = Duration::from_secs_f64(spec.warmup_secs);
    let window = Duration::from_secs_f64(spec.duration_secs);
    let interval = Duration::from_secs_f64(1.0 / spec.rate.max(0.001));
    let progress = Arc::new(Progress::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let n = clients.len().max(1) as u32;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            let offset = interval * (k as u32) / n;
            let cfg = ClientCfg {
                clock,
                warmup_end_us: warmup_end.as_micros() as u64,
                window_end_us: (warmup_end + window).as_micros() as u64,
                interval,
                first: tokio::time::Instant::now() + offset,
                open_loop: spec.open_loop,
                keys: spec.keys.max(1) as u64,
            };
            tokio::spawn(client_loop(c, cfg, stop_rx.clone(), progress.clone()))
        })
        .collect();

    let reporter = tokio::spawn(report_progress(clock, progress.clone(), warmup_end));
    tokio::time::sleep(warmup_end).await;
    let cpu_start = cpu_snapshot();
    let started = Instant::now();
    let minutes = measure_minutes(&progress, started, window).await;
    let cpu_end = cpu_snapshot();
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    reporter.abort();

    let mut total = ClientResult::default();
    let mut anomalies = ClientAnomalies::default();
    let mut acked = Vec::new();
    let mut fanout = Vec::new();
    for t in tasks {
        let r = t.await?;
        anomalies.clients += 1;
        anomalies.gaps += r.gaps;
        anomalies.duplicates += r.duplicates;
        anomalies.out_of_order += r.out_of_order;
        anomalies.stray_answers += r.stray_answers;
        if r.gaps + r.duplicates + r.out_of_order + r.stray_answers > 0 {
            anomalies.clients_with_anomalies += 1;
        }
        total.commands += r.commands;
        total.events += r.events;
        for (k, v) in r.failures {
            *total.failures.entry(k).or_insert(0) += v;
        }
        acked.extend(r.acked.into_iter().map(f64::from));
        fanout.extend(r.fanout.into_iter().map(f64::from));
    }
    let cpu = cpu_delta(&cpu_start, &cpu_end, pids, elapsed);
    let generator: f64 = cpu
        .iter()
        .filter(|g| g.group == GENERATOR)
        .map(|g| g.cpu_secs)
        .sum();
    let all: f64 = cpu.iter().map(|g| g.cpu_secs).sum();
    let per = |secs: f64| {
        if acked.is_empty() {
            0.0
        } else {
            secs * 1e6 / acked.len() as f64
        }
    };
    let failed = total.failures.values().sum();
    // What the schedule offered: every client at its rate over the window.
    let offered = (anomalies.clients as f64 * spec.rate * elapsed).round() as usize;
    Ok(BenchReport {
        spec: spec.clone(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        sched_autogroup: std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
            .ok()
            .and_then(|s| autogroup_of(&s)),
        window_secs: elapsed,
        offered,
        offered_per_sec: offered as f64 / elapsed,
        commands: total.commands,
        acked: acked.len(),
        failed,
        failures_by_code: total.failures,
        acked_per_sec: acked.len() as f64 / elapsed,
        cpu_us_per_update: per(all - generator),
        cpu_us_per_update_with_generator: per(all),
        ack_latency_ms: percentiles(acked),
        fanout_latency_ms: percentiles(fanout),
        events_delivered: total.events,
        events_per_sec: total.events as f64 / elapsed,
        anomalies,
        minutes,
        cpu,
    })
}

/// Waits out the measured window, cutting it into minutes (the last may be shorter):
/// throughput and ack latency of each, from the shared counters.
async fn measure_minutes(p: &Progress, started: Instant, window: Duration) -> Vec<WindowStats> {
    const MINUTE: Duration = Duration::from_secs(60);
    let mut out = Vec::new();
    let mut from = Duration::ZERO;
    let mut hist = p.ack_hist.snapshot();
    let (mut acked, mut events) = (
        p.acked.load(Ordering::Relaxed),
        p.events.load(Ordering::Relaxed),
    );
    while from < window {
        let to = (from + MINUTE).min(window);
        tokio::time::sleep_until((started + to).into()).await;
        let now_hist = p.ack_hist.snapshot();
        let (a, e) = (
            p.acked.load(Ordering::Relaxed),
            p.events.load(Ordering::Relaxed),
        );
        let secs = (to - from).as_secs_f64();
        let (_, p50, p99) = Hist::window(&hist, &now_hist);
        out.push(WindowStats {
            start_secs: from.as_secs_f64(),
            secs,
            acked_per_sec: (a - acked) as f64 / secs,
            events_per_sec: (e - events) as f64 / secs,
            ack_p50_ms: p50,
            ack_p99_ms: p99,
        });
        (hist, acked, events, from) = (now_hist, a, e, to);
    }
    out
}

struct ClientCfg {
    clock: Clock,
    warmup_end_us: u64,
    window_end_us: u64,
    interval: Duration,
    first: tokio::time::Instant,
    open_loop: bool,
    keys: u64,
}

enum Step {
    Stop,
    Send(tokio::time::Instant),
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Timeout,
}

/// How long a client waits for an answer before recording `no_answer`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long clients wait for the answers still due after the window.
const DRAIN: Duration = Duration::from_secs(10);

/// One client: sends on its schedule, reads everything, measures.
async fn client_loop(
    mut c: BenchClient,
    cfg: ClientCfg,
    mut stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> ClientResult {
    let mut r = ClientResult::default();
    let mut tick = tokio::time::interval_at(cfg.first, cfg.interval);
    tick.set_missed_tick_behavior(if cfg.open_loop {
        tokio::time::MissedTickBehavior::Burst
    } else {
        tokio::time::MissedTickBehavior::Delay
    });
    // Command id → (start of its latency in µs, whether it is measured).
    let mut pending: HashMap<Uuid, (u64, bool)> = HashMap::new();
    let mut cv: Option<u64> = None;
    let mut n: u64 = 0;
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut oldest_deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    // The stop signal and the timer live across turns: made anew on each frame, they
    // would register with the watch and the timer wheel (and leave them) every time.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    let timer = tokio::time::sleep_until(oldest_deadline);
    tokio::pin!(timer);
    loop {
        if stopping.is_some() && pending.is_empty() {
            break;
        }
        let may_send = stopping.is_none() && (cfg.open_loop || pending.is_empty());
        // Nothing to time out while nothing is awaited (and the client is not stopping).
        let deadline = match stopping {
            Some(d) => Some(d),
            None if pending.is_empty() => None,
            None => Some(oldest_deadline),
        };
        if let Some(d) = deadline.filter(|d| *d != timer.deadline()) {
            timer.as_mut().reset(d);
        }
        let step = tokio::select! {
            biased;
            _ = &mut stopped, if stopping.is_none() => Step::Stop,
            f = c.ws.next() => Step::Frame(f),
            at = tick.tick(), if may_send => Step::Send(at),
            _ = &mut timer, if deadline.is_some() => Step::Timeout,
        };
        match step {
            Step::Stop => stopping = Some(tokio::time::Instant::now() + DRAIN),
            Step::Timeout => {
                if stopping.is_some() {
                    break;
                }
                // Answers overdue by ANSWER_TIMEOUT are recorded as missing.
                let now = cfg.clock.now();
                let limit = ANSWER_TIMEOUT.as_micros() as u64;
                pending.retain(|_, (start, measured)| {
                    let overdue = now.saturating_sub(*start) >= limit;
                    if overdue && *measured {
                        *r.failures.entry("no_answer".into()).or_insert(0) += 1;
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    !overdue
                });
                let oldest = pending.values().map(|(s, _)| *s).min().unwrap_or(now);
                oldest_deadline = tokio::time::Instant::now()
                    + (ANSWER_TIMEOUT
                        .saturating_sub(Duration::from_micros(now.saturating_sub(oldest))));
            }
            Step::Send(at) => {
                n += 1;
                let id = Uuid::new_v4();
                // Open loop: the schedule is the start; closed loop: the send.
                let start = if cfg.open_loop {
                    cfg.clock.us(at.into_std())
                } else {
                    cfg.clock.now()
                };
                let measured = start >= cfg.warmup_end_us && start < cfg.window_end_us;
                if measured {
                    r.commands += 1;
                }
                let path = format!("/c{}/k{}", c.index, n % cfg.keys);
                let msg = format!(
                    r#"{{"id":"{id}","type":"state_update","data":{{"changes":[{{"path":"{path}","value":{{"n":{n},"t":{start}}}}}]}}}}"#
                );
                if pending.is_empty() {
                    oldest_deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
                }
                pending.insert(id, (start, measured));
                if c.ws.send(Message::text(msg)).await.is_err() {
                    break;
                }
            }
            Step::Frame(None) | Step::Frame(Some(Err(_))) => break,
            Step::Frame(Some(Ok(Message::Text(text)))) => {
                let now = cfg.clock.now();
                let Ok(m) = serde_json::from_str::<Incoming>(text.as_str()) else {
                    continue;
                };
                handle_frame(&m, now, &cfg, &mut r, &mut pending, &mut cv, &progress);
            }
            Step::Frame(Some(Ok(Message::Close(_)))) => break,
            Step::Frame(Some(Ok(_))) => {}
        }
    }
    for (_, (_, measured)) in pending.drain() {
        if measured {
            *r.failures.entry("no_answer".into()).or_insert(0) += 1;
        }
    }
    let _ = c.ws.close(None).await;
    r
}

fn handle_frame(
    m: &Incoming,
    now: u64,
    cfg: &ClientCfg,
    r: &mut ClientResult,
    pending: &mut HashMap<Uuid, (u64, bool)>,
    cv: &mut Option<u64>,
    progress: &Progress,
) {
    let ms = |start: u64| (now.saturating_sub(start)) as f32 / 1000.0;
    match m.kind {
        "ack" | "error" => {
            let Some(id) = m.id.and_then(|s| Uuid::parse_str(s).ok()) else {
                return;
            };
            let Some((start, measured)) = pending.remove(&id) else {
                r.stray_answers += 1;
                return;
            };
            if !measured {
                return;
            }
            if m.kind == "ack" {
                r.acked.push(ms(start));
                progress.ack_hist.record(ms(start));
                progress.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                let code = m
                    .error
                    .as_ref()
                    .map(|e| e.code.clone())
                    .unwrap_or_else(|| "error".into());
                *r.failures.entry(code).or_insert(0) += 1;
                progress.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        "sync_response" => {
            if let Some(v) = m.data.as_ref().and_then(|d| d.version.as_ref()) {
                if let Some(v) = version_of(v) {
                    if cv.is_none_or(|c| v > c) {
                        *cv = Some(v);
                    }
                }
            }
        }
        _ => {
            let Some(v) = m.version else { return };
            if (cfg.warmup_end_us..cfg.window_end_us).contains(&now) {
                r.events += 1;
            }
            progress.events.fetch_add(1, Ordering::Relaxed);
            match *cv {
                Some(c) if v == c => r.duplicates += 1,
                Some(c) if v < c => r.out_of_order += 1,
                Some(c) if v > c + 1 => r.gaps += 1,
                _ => {}
            }
            if cv.is_none_or(|c| v > c) {
                *cv = Some(v);
            }
            if m.kind != "state_update" {
                return;
            }
            let t = m
                .data
                .as_ref()
                .and_then(|d| d.changes.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.value.as_ref())
                .and_then(|p| p.t);
            if let Some(t) = t.filter(|t| (cfg.warmup_end_us..cfg.window_end_us).contains(t)) {
                r.fanout.push(ms(t));
            }
        }
    }
}

/// Prints a line every 5 s: what was acknowledged, delivered and refused meanwhile.
async fn report_progress(clock: Clock, p: Arc<Progress>, warmup: Duration) {
    let every = Duration::from_secs(5);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let (mut a0, mut e0) = (0, 0);
    let mut h0 = p.ack_hist.snapshot();
    loop {
        tick.tick().await;
        let (a, e, f) = (
            p.acked.load(Ordering::Relaxed),
            p.events.load(Ordering::Relaxed),
            p.failed.load(Ordering::Relaxed),
        );
        let h = p.ack_hist.snapshot();
        let (_, p50, p99) = Hist::window(&h0, &h);
        h0 = h;
        let t = clock.now() as f64 / 1e6;
        let phase = if t < warmup.as_secs_f64() {
            "warm-up"
        } else {
            "measuring"
        };
        eprintln!(
            "[{t:6.1} s {phase}] acked {:>7.0}/s  events {:>8.0}/s  ack p50 {p50:>6.1} p99 {p99:>7.1} ms  failed {f}",
            (a - a0) as f64 / every.as_secs_f64(),
            (e - e0) as f64 / every.as_secs_f64(),
        );
        (a0, e0) = (a, e);
    }
}

/// The load generator's own group.
const GENERATOR: &str = "load generator";

/// The group a process belongs to, by its command name.
fn group_of(pid: u32, comm: &str, own: &[u32]) -> Option<&'static str> {
    if pid == std::process::id() {
        return Some(GENERATOR);
    }
    let ours = own.is_empty() || own.contains(&pid);
    match comm {
        "gs-node" if ours => Some("gs-node"),
        "gs-router" if ours => Some("gs-router"),
        "postgres" => Some("PostgreSQL"),
        "redis-server" => Some("Redis"),
        "nats-server" => Some("NATS"),
        "beam.smp" | "erl_child_setup" | "inet_gethost" | "epmd" => Some("RabbitMQ"),
        _ => None,
    }
}

/// CPU ticks (user + system, all threads) of every process, by pid.
type CpuSnapshot = HashMap<u32, (String, u64)>;

fn cpu_snapshot() -> CpuSnapshot {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(x) = read_stat(pid) {
            out.insert(pid, x);
        }
    }
    out
}

/// `(comm, utime + stime)` from `/proc/{pid}/stat`.
fn read_stat(pid: u32) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let rest: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // After the command: state is field 3 of the file, utime 14 and stime 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn cpu_delta(a: &CpuSnapshot, b: &CpuSnapshot, own: &[u32], secs: f64) -> Vec<GroupCpu> {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut groups: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (pid, (comm, end)) in b {
        let Some(g) = group_of(*pid, comm, own) else {
            continue;
        };
        // A process started during the window counts from zero.
        let start = a
            .get(pid)
            .filter(|(c, _)| c == comm)
            .map(|x| x.1)
            .unwrap_or(0);
        *groups.entry(g).or_insert(0) += end.saturating_sub(start);
    }
    let mut out: Vec<GroupCpu> = groups
        .into_iter()
        .map(|(g, ticks)| GroupCpu {
            group: g.to_string(),
            cpu_secs: ticks as f64 / hz,
            cores: ticks as f64 / hz / secs.max(1e-9),
        })
        .collect();
    out.sort_by(|x, y| y.cpu_secs.total_cmp(&x.cpu_secs));
    out
}

/// `/proc/sys/kernel/sched_autogroup_enabled` read as a flag.
fn autogroup_of(text: &str) -> Option<bool> {
    match text.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The report of `--idle`.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub connections: usize,
    pub router_pid: u32,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_connection: f64,
}

/// Members per session in the idle measurement (the SRD's table: a DM and up to nine
/// players).
const IDLE_PER_SESSION: usize = 10;

/// Opens `n` WebSockets on router 0 (sessions of [`IDLE_PER_SESSION`] members) and
/// measures the router's resident memory before and after.
pub async fn idle(target: &Target, n: usize, router_pid: u32) -> Result<IdleReport> {
    let mut tokens = Vec::with_capacity(n);
    let api_base = &target.routers_http[0];
    for s in 0..n.div_ceil(IDLE_PER_SESSION) {
        let dm_token = target.auth.mint_access(Uuid::new_v4(), Role::Dm, 24 * 3600);
        let created = Api::new(target.http.clone(), api_base, &dm_token)
            .create_session(&format!("idle session {s}"))
            .await?;
        let sid = created["session_id"]
            .as_str()
            .context("session_id")?
            .to_string();
        let st = created["connection_token"]
            .as_str()
            .unwrap_or("")
            .to_string();
        tokens.push((sid.clone(), dm_token, st));
        for _ in 1..IDLE_PER_SESSION.min(n - s * IDLE_PER_SESSION) {
            let token = target
                .auth
                .mint_access(Uuid::new_v4(), Role::Player, 24 * 3600);
            let joined = Api::new(target.http.clone(), api_base, &token)
                .join(&sid, json!({}))
                .await?;
            let st = joined["connection_token"]
                .as_str()
                .unwrap_or("")
                .to_string();
            tokens.push((sid.clone(), token, st));
        }
    }
    tokens.truncate(n);
    // Settled memory before: what the router holds without these connections.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(router_pid).context("router memory")?;
    let url = target.routers_ws[0].clone();
    let connects = tokens.into_iter().map(|(sid, token, st)| {
        let url = url.clone();
        let cert = target.cert.clone();
        async move {
            ws_connect(
                &url,
                &sid,
                &token,
                &st,
                None,
                TokenStyle::Headers,
                cert.as_ref(),
            )
            .await
        }
    });
    let sockets: Vec<WsStream> = futures::stream::iter(connects)
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    // Keep reading (heartbeats) as a live client does.
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { while ws.next().await.is_some() {} }))
        .collect();
    // Let every connection finish its start (attach, initial sync) before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib(router_pid).context("router memory")?;
    for r in readers {
        r.abort();
    }
    Ok(IdleReport {
        connections: n,
        router_pid,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_connection: after.saturating_sub(before) as f64 / n.max(1) as f64,
    })
}

impl IdleReport {
    pub fn table(&self) -> String {
        format!(
            "idle connections: {} on router pid {}\nrouter resident memory: {} KiB before, {} KiB after: {:.1} KiB per connection\n",
            self.connections,
            self.router_pid,
            self.rss_before_kib,
            self.rss_after_kib,
            self.kib_per_connection
        )
    }
}

impl BenchReport {
    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        let p = |x: &Percentiles| {
            format!(
                "{:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9}",
                x.p50, x.p95, x.p99, x.max, x.count
            )
        };
        let mut out = String::new();
        out += &format!(
            "workload: {} sessions x {} clients, {:.1} changes/s per client, {} loop, {:.0} s measured after {:.0} s warm-up ({} cores)\n",
            self.spec.sessions,
            self.spec.clients_per_session,
            self.spec.rate,
            if self.spec.open_loop { "open" } else { "closed" },
            self.window_secs,
            self.spec.warmup_secs,
            self.cores
        );
        out += &format!(
            "offered: {} ({:.0}/s); commands sent: {}; acknowledged: {} ({:.0}/s); failed: {} {:?}\n",
            self.offered,
            self.offered_per_sec,
            self.commands,
            self.acked,
            self.acked_per_sec,
            self.failed,
            self.failures_by_code
        );
        out += &format!(
            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            "latency (ms)", "p50", "p95", "p99", "max", "samples"
        );
        out += &format!("{:<24} {}\n", "ack (send -> ack)", p(&self.ack_latency_ms));
        out += &format!(
            "{:<24} {}\n",
            "fan-out (send -> event)",
            p(&self.fanout_latency_ms)
        );
        out += &format!(
            "events delivered: {} ({:.0}/s)\n",
            self.events_delivered, self.events_per_sec
        );
        out += &format!(
            "per-client anomalies over {} clients: gaps {}, duplicates {}, out-of-order {}, answers not awaited {} ({} clients affected)\n",
            self.anomalies.clients,
            self.anomalies.gaps,
            self.anomalies.duplicates,
            self.anomalies.out_of_order,
            self.anomalies.stray_answers,
            self.anomalies.clients_with_anomalies
        );
        if self.minutes.len() > 1 {
            out += "by minute (acked/s, ack p50 / p99 ms):";
            for m in &self.minutes {
                out += &format!(
                    "  [{:.0}+{:.0} s] {:.0}/s {:.1}/{:.1}",
                    m.start_secs, m.secs, m.acked_per_sec, m.ack_p50_ms, m.ack_p99_ms
                );
            }
            out += "\n";
        }
        out += "CPU over the window (seconds; cores):";
        for g in &self.cpu {
            out += &format!("  {} {:.1} s ({:.2})", g.group, g.cpu_secs, g.cores);
        }
        out += &format!(
            "\nCPU per acknowledged update: {:.0} µs for the service (gs-node, gs-router, PostgreSQL, Redis, NATS, RabbitMQ); {:.0} µs with the load generator\n",
            self.cpu_us_per_update, self.cpu_us_per_update_with_generator
        );
        if let Some(on) = self.sched_autogroup {
            out += &format!(
                "scheduler: kernel.sched_autogroup_enabled = {} (BENCHMARKS.md, stop 29)\n",
                u8::from(on)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_answer_to_one_message_is_an_anomaly() {
        let cfg = ClientCfg {
            clock: Clock(Instant::now()),
            warmup_end_us: 0,
            window_end_us: u64::MAX,
            interval: Duration::from_millis(100),
            first: tokio::time::Instant::now(),
            open_loop: false,
            keys: 1,
        };
        let (mut r, progress) = (ClientResult::default(), Progress::default());
        let (mut pending, mut cv) = (HashMap::new(), None);
        let id = Uuid::from_u128(7);
        pending.insert(id, (10, true));
        let ack = format!(r#"{{"type":"ack","id":"{id}","data":{{"version":3}}}}"#);
        let m: Incoming = serde_json::from_str(&ack).unwrap();
        handle_frame(&m, 20, &cfg, &mut r, &mut pending, &mut cv, &progress);
        assert_eq!((r.acked.len(), r.stray_answers), (1, 0));
        handle_frame(&m, 30, &cfg, &mut r, &mut pending, &mut cv, &progress);
        assert_eq!((r.acked.len(), r.stray_answers), (1, 1), "answered twice");
    }

    #[test]
    fn histogram_windows_give_percentiles_of_their_interval_only() {
        let h = Hist::new();
        for _ in 0..90 {
            h.record(1.25); // bucket (1.2, 1.3]
        }
        let before = h.snapshot();
        for _ in 0..98 {
            h.record(0.05);
        }
        h.record(42.5);
        h.record(70_000.0); // beyond the last edge: the overflow bucket
        let after = h.snapshot();
        let (n, p50, p99) = Hist::window(&before, &after);
        assert_eq!(n, 100);
        assert_eq!(p50, 0.1);
        assert_eq!(p99, 43.0);
        let (n, p50, p99) = Hist::window(&[0; FINE_BUCKETS + COARSE_MAX_MS + 1], &before);
        assert_eq!((n, p50, p99), (90, 1.3, 1.3));
        assert_eq!(Hist::window(&after, &after), (0, 0.0, 0.0));
    }

    #[test]
    fn reads_the_autogroup_flag() {
        assert_eq!(autogroup_of("1\n"), Some(true));
        assert_eq!(autogroup_of("0\n"), Some(false));
        assert_eq!(autogroup_of(""), None);
    }

    #[test]
    fn reads_its_own_stat_line() {
        let (comm, ticks) = read_stat(std::process::id()).expect("own /proc stat");
        assert!(!comm.is_empty());
        assert!(ticks < u64::MAX);
        assert_eq!(group_of(std::process::id(), &comm, &[]), Some(GENERATOR));
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn frames_are_read_as_far_as_needed() {
        let ev = r#"{"type":"state_update","version":7,"data":{"update_id":"x","changes":[{"path":"/c1/k2","value":{"n":2,"t":1500}}],"timestamp":"t"}}"#;
        let m: Incoming = serde_json::from_str(ev).unwrap();
        assert_eq!(m.version, Some(7));
        let t = m.data.unwrap().changes.unwrap()[0]
            .value
            .as_ref()
            .unwrap()
            .t;
        assert_eq!(t, Some(1500));
        let sync = r#"{"type":"sync_response","id":null,"data":{"state":{"a":[1,{"b":2}]},"version":"12"}}"#;
        let m: Incoming = serde_json::from_str(sync).unwrap();
        assert_eq!(
            version_of(m.data.unwrap().version.as_ref().unwrap()),
            Some(12)
        );
        let err = r#"{"type":"error","id":"00000000-0000-0000-0000-000000000000","error":{"code":"rate_limited","message":"m"}}"#;
        let m: Incoming = serde_json::from_str(err).unwrap();
        assert_eq!(m.error.unwrap().code, "rate_limited");
    }
}
