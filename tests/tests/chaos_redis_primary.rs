//! Chaos (issue 13): loss of the primary Redis (`redis.url`: rate-limit counters, the
//! ICD cache keys), a private `redis-server` killed with SIGKILL under load and
//! restarted empty. The ownership lock is elsewhere (`redis.lock_urls`: the machine's
//! Redis), as in a deployment with Redlock instances.
//!
//! The chosen behaviour (docs/architecture.md, "Loss of the primary Redis"): limits
//! **fail closed**. Requests whose limit is counted in Redis (REST state saves here)
//! are refused with `503 service_unavailable` and change nothing; play over the
//! WebSocket (limited per connection, in the router's memory) goes on without an
//! error; the cache keys are rewritten as sessions change. When Redis returns, the
//! limited requests pass again within seconds, by themselves.

use anyhow::{Context, Result};
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::load::{self, Target};
use gs_tests::{verify_workload, PrivateServer, Table};
use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};

const SESSIONS: usize = 4;
const CLIENTS_PER_SESSION: usize = 3;
const INTERVAL: Duration = Duration::from_millis(100);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
const PHASE_TIMEOUT: Duration = Duration::from_secs(20);
/// Limited requests pass again within this long after Redis returns.
const RECOVER_WITHIN: Duration = Duration::from_secs(5);
/// Pace of the REST probe.
const PROBE_EVERY: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_fail_closed_when_the_primary_redis_dies_and_nothing_acknowledged_is_lost(
) -> Result<()> {
    gs_tests::init_logging();
    let mut primary = PrivateServer::redis().await?;
    let mut spec = ClusterSpec::test(2, 1);
    spec.base.redis.lock_urls = vec![spec.base.redis.url.clone()];
    spec.base.redis.url = primary.url();
    let cluster = LocalCluster::start(spec).await?;
    let result = run(&cluster, &mut primary).await;
    gs_tests::finish_cluster(cluster, result).await
}

/// One REST state save of the probe session: (HTTP status, error code).
async fn save(cluster: &LocalCluster, t: &Table, n: u64) -> Result<(u16, String)> {
    let api = cluster::client::Api::new(cluster.http(), &cluster.router_urls()[0], &t.dm_token);
    let path = format!("/api/v2/sessions/{}/state", t.session);
    let a = api
        .call(Method::POST, &path, Some(&json!({"state": {"probe": n}})))
        .await?;
    Ok((a.status, a.code().to_string()))
}

/// The REST probe's saves: how many were sent, and which were accepted.
#[derive(Default)]
struct Probe {
    n: u64,
    accepted: Vec<u64>,
}

/// Saves until `until` holds for an answer; returns it.
async fn probe_until(
    cluster: &LocalCluster,
    t: &Table,
    p: &mut Probe,
    until: impl Fn(u16, &str) -> bool,
) -> Result<(u16, String)> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        p.n += 1;
        let (status, code) = save(cluster, t, p.n).await?;
        if status == 200 {
            p.accepted.push(p.n);
        } else {
            anyhow::ensure!(
                (status, code.as_str()) == (503, "service_unavailable"),
                "a save refused otherwise than honestly: {status} {code}"
            );
        }
        if until(status, &code) {
            return Ok((status, code));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "probe: last answer {status} {code}"
        );
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Events stored for the probe's session.
async fn events_of(cluster: &LocalCluster, t: &Table) -> Result<i64> {
    let sid: uuid::Uuid = t.session.parse()?;
    let row = cluster
        .pg()
        .await?
        .query_one(
            "SELECT count(*) FROM session_events WHERE session_id = $1",
            &[&sid],
        )
        .await?;
    Ok(row.get(0))
}

async fn router_ready(cluster: &LocalCluster) -> Result<u16> {
    let url = format!("{}/health/ready", cluster.router_urls()[0]);
    Ok(cluster.http().get(url).send().await?.status().as_u16())
}

async fn run(cluster: &LocalCluster, primary: &mut PrivateServer) -> Result<()> {
    let probe = Table::create(cluster, &cluster.http()).await?;
    let target = Target::of(cluster);
    let (ids, clients) = load::setup(&target, SESSIONS, CLIENTS_PER_SESSION, None).await?;
    let running = load::start(clients, INTERVAL, ANSWER_TIMEOUT, None);
    let progress = running.progress.clone();
    let all_served_since =
        |t: Instant| move |p: &load::Progress| (0..SESSIONS).all(|s| p.acked_since(s, t));
    let warm = Instant::now();
    progress
        .wait(
            "every session served",
            PHASE_TIMEOUT,
            all_served_since(warm),
        )
        .await?;
    let mut p = Probe::default();
    let events_before = events_of(cluster, &probe).await?;
    probe_until(cluster, &probe, &mut p, |s, _| s == 200).await?;

    // SIGKILL the primary Redis.
    primary.stop().await?;
    let killed = Instant::now();
    probe_until(cluster, &probe, &mut p, |s, _| s == 503).await?;
    let closed_after = killed.elapsed();
    let acks_at = progress.acks();
    progress
        .wait(
            "play goes on without the primary Redis",
            PHASE_TIMEOUT,
            |p| {
                all_served_since(killed)(p)
                    && p.acks() >= acks_at + (SESSIONS * CLIENTS_PER_SESSION * 10) as u64
            },
        )
        .await?;
    let outage_acks = progress.acks() - acks_at;
    let errors_during = progress.errors();
    let ready_during = router_ready(cluster).await?;
    // Still closed after the load ran on.
    probe_until(cluster, &probe, &mut p, |s, _| s == 503).await?;
    let refused_saves = p.n - p.accepted.len() as u64;

    // Back, empty (no persistence): limited requests pass again.
    primary.start().await?;
    let back = Instant::now();
    probe_until(cluster, &probe, &mut p, |s, _| s == 200).await?;
    let recovered = back.elapsed();
    let acks_at = progress.acks();
    progress
        .wait("load after recovery", PHASE_TIMEOUT, |p| {
            p.acks() >= acks_at + (SESSIONS * CLIENTS_PER_SESSION * 3) as u64
        })
        .await?;
    let (clients, records) = running.stop().await?;

    // The refused saves changed nothing: the state is the last accepted save.
    let api = cluster::client::Api::new(cluster.http(), &cluster.router_urls()[0], &probe.dm_token);
    let state = api.get_state(&probe.session).await?;
    let last = *p.accepted.last().context("no save accepted")?;
    let stored = events_of(cluster, &probe).await? - events_before;
    let errors = records.iter().filter(|r| r.result.is_err()).count();
    println!(
        "chaos redis primary: {} commands over WebSocket, {errors} errors ({errors_during} while \
         Redis was down, {outage_acks} acked meanwhile); REST saves refused with 503 \
         service_unavailable {:.0} ms after the kill (fail closed), {refused_saves} refused, \
         router readiness {ready_during} meanwhile; saves accepted again {:.0} ms after Redis \
         returned",
        records.len(),
        closed_after.as_secs_f64() * 1000.0,
        recovered.as_secs_f64() * 1000.0
    );
    anyhow::ensure!(
        state["state"]["probe"] == json!(last),
        "the last accepted save ({last}) is the state: {}",
        state["state"]
    );
    anyhow::ensure!(
        stored == p.accepted.len() as i64,
        "{stored} saves stored, {} accepted: a refused save was stored",
        p.accepted.len()
    );
    anyhow::ensure!(errors == 0, "play over WebSocket saw {errors} errors");
    anyhow::ensure!(
        ready_during == 503,
        "router readiness while Redis is down: {ready_during}"
    );
    anyhow::ensure!(recovered <= RECOVER_WITHIN, "recovery took {recovered:?}");
    verify_workload(cluster, &ids, &clients, &records).await
}
