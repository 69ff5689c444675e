//! `cluster bench`: a load generator and its report.
//!
//! P WebSocket clients on each of S sessions (spread over the routers) send
//! `state_update`s at a fixed rate for a fixed time, each waiting for its answer
//! before the next. Reported: acknowledged and failed commands, ack latency (send →
//! ack at the sender), fan-out latency (send → event at each client of the session),
//! events delivered per second, and per-client gaps, duplicates and out-of-order
//! events (all must be zero).

use crate::client::EventHook;
use crate::load::{self, percentiles, Percentiles, SentTimes, Target};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize)]
pub struct BenchSpec {
    pub sessions: usize,
    pub clients_per_session: usize,
    /// Changes per second each client sends.
    pub rate: f64,
    pub duration_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientAnomalies {
    pub clients: usize,
    pub gaps: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub clients_with_anomalies: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub spec: BenchSpec,
    pub cores: usize,
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
}

/// Runs the workload against `target` and measures it.
pub async fn run(target: &Target, spec: &BenchSpec) -> Result<BenchReport> {
    let sent: SentTimes = Arc::new(Mutex::new(Default::default()));
    let fanout: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let hook: EventHook = {
        let sent = sent.clone();
        let fanout = fanout.clone();
        Arc::new(move |msg, at| {
            let Some(id) = msg["data"]["update_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                return;
            };
            if let Some(t) = sent.lock().unwrap().get(&id) {
                fanout
                    .lock()
                    .unwrap()
                    .push(at.saturating_duration_since(*t).as_secs_f64() * 1000.0);
            }
        })
    };
    let (_ids, clients) =
        load::setup(target, spec.sessions, spec.clients_per_session, Some(hook)).await?;
    let interval = Duration::from_secs_f64(1.0 / spec.rate.max(0.001));
    let running = load::start(clients, interval, Duration::from_secs(30), Some(sent));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(spec.duration_secs)).await;
    let (clients, records) = running.stop().await?;
    let elapsed = started.elapsed().as_secs_f64();

    let acked: Vec<f64> = records
        .iter()
        .filter(|r| r.result.is_ok())
        .map(|r| r.answered.duration_since(r.sent).as_secs_f64() * 1000.0)
        .collect();
    let mut failures_by_code = BTreeMap::new();
    for r in records.iter().filter(|r| r.result.is_err()) {
        *failures_by_code
            .entry(r.result.clone().unwrap_err())
            .or_insert(0) += 1;
    }
    let mut anomalies = ClientAnomalies {
        clients: clients.len(),
        gaps: 0,
        duplicates: 0,
        out_of_order: 0,
        clients_with_anomalies: 0,
    };
    let mut events = 0u64;
    for c in &clients {
        c.client.with_view(|v| {
            events += v.events.len() as u64;
            let (mut g, mut d, mut o) = (0, 0, 0);
            for w in v.events.windows(2) {
                let (a, b) = (w[0].0, w[1].0);
                if b == a {
                    d += 1;
                } else if b < a {
                    o += 1;
                } else if b > a + 1 {
                    g += 1;
                }
            }
            anomalies.gaps += g;
            anomalies.duplicates += d;
            anomalies.out_of_order += o;
            if g + d + o > 0 {
                anomalies.clients_with_anomalies += 1;
            }
        });
    }
    let fanout = std::mem::take(&mut *fanout.lock().unwrap());
    Ok(BenchReport {
        spec: spec.clone(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        commands: records.len(),
        acked: acked.len(),
        failed: records.len() - acked.len(),
        failures_by_code,
        acked_per_sec: acked.len() as f64 / elapsed,
        ack_latency_ms: percentiles(acked),
        fanout_latency_ms: percentiles(fanout),
        events_delivered: events,
        events_per_sec: events as f64 / elapsed,
        anomalies,
    })
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
            "workload: {} sessions x {} clients, {:.1} changes/s per client, {:.0} s ({} cores)\n",
            self.spec.sessions,
            self.spec.clients_per_session,
            self.spec.rate,
            self.spec.duration_secs,
            self.cores
        );
        out += &format!(
            "commands: {} sent, {} acknowledged ({:.0}/s), {} failed {:?}\n",
            self.commands, self.acked, self.acked_per_sec, self.failed, self.failures_by_code
        );
        out += &format!(
            "{:<22} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            "latency (ms)", "p50", "p95", "p99", "max", "samples"
        );
        out += &format!("{:<22} {}\n", "ack (send -> ack)", p(&self.ack_latency_ms));
        out += &format!(
            "{:<22} {}\n",
            "fan-out (send -> event)",
            p(&self.fanout_latency_ms)
        );
        out += &format!(
            "events delivered: {} ({:.0}/s)\n",
            self.events_delivered, self.events_per_sec
        );
        out += &format!(
            "per-client anomalies over {} clients: gaps {}, duplicates {}, out-of-order {} ({} clients affected)\n",
            self.anomalies.clients,
            self.anomalies.gaps,
            self.anomalies.duplicates,
            self.anomalies.out_of_order,
            self.anomalies.clients_with_anomalies
        );
        out
    }
}
