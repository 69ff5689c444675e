//! Chaos: SIGKILL a router while its WebSocket clients are sending. Routers hold no
//! state, so a client that loses its connection reconnects through another router
//! with its `last_version`, receives exactly what it missed, and sends its
//! unanswered command again under the same id: the command takes effect once and
//! the answer is the original one. Nothing acknowledged is lost, nobody sees a gap
//! or a duplicate, and the clients on the surviving router notice nothing.

use anyhow::Result;
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::load::{self, percentiles, Target};
use gs_shared::membership::MemberKind;
use gs_tests::{node_counter, verify_workload, WAIT};
use std::time::{Duration, Instant};

const SESSIONS: usize = 8;
const CLIENTS_PER_SESSION: usize = 4;
const INTERVAL: Duration = Duration::from_millis(50);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Acknowledged commands before the kill, and again after it.
const TRAFFIC: u64 = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_router_loses_nothing_and_its_clients_resume_elsewhere() -> Result<()> {
    gs_tests::init_logging();
    let mut cluster = LocalCluster::start(ClusterSpec::test(2, 2)).await?;
    let result = run(&mut cluster).await;
    gs_tests::finish_cluster(cluster, result).await
}

async fn run(cluster: &mut LocalCluster) -> Result<()> {
    let target = Target::of(cluster);
    let (ids, clients) = load::setup(&target, SESSIONS, CLIENTS_PER_SESSION, None).await?;
    // setup spreads the clients round-robin over the routers: half are on router 0.
    let doomed: Vec<(usize, usize)> = clients
        .iter()
        .filter(|c| c.router == 0)
        .map(|c| (c.session, c.index))
        .collect();
    anyhow::ensure!(!doomed.is_empty(), "some clients on router 0");
    let running = load::start_reconnecting(clients, INTERVAL, ANSWER_TIMEOUT, target.clone());
    let progress = running.progress.clone();
    let warm = Instant::now();
    progress
        .wait("every session served, and some traffic", WAIT, |p| {
            (0..SESSIONS).all(|s| p.acked_since(s, warm)) && p.acks() >= TRAFFIC
        })
        .await?;

    let victim = cluster
        .members
        .values()
        .find(|m| m.kind == MemberKind::Router && m.url == target.routers_http[0])
        .map(|m| m.id.clone())
        .expect("router 0");
    let t_kill = Instant::now();
    cluster.kill(&victim).await?;
    progress
        .wait(
            "every client of the killed router acknowledged again",
            WAIT,
            |p| {
                doomed
                    .iter()
                    .all(|(s, c)| p.client_acked_since(*s, *c, t_kill))
            },
        )
        .await?;
    // As much traffic again through the surviving router only.
    let after = Instant::now();
    let acked = progress.acks();
    progress
        .wait("more traffic after the kill", WAIT, |p| {
            (0..SESSIONS).all(|s| p.acked_since(s, after)) && p.acks() >= acked + TRAFFIC
        })
        .await?;
    let (clients, records) = running.stop().await?;

    for c in &clients {
        let was_doomed = doomed.contains(&(c.session, c.index));
        anyhow::ensure!(
            (c.reconnects > 0) == was_doomed,
            "{}: {} reconnects (on the killed router: {was_doomed})",
            c.client.name,
            c.reconnects
        );
    }
    // The interruption each moved client saw: its slowest acknowledgement among the
    // commands answered after the kill (the one in flight waited for the reconnect).
    let mut pauses = Vec::new();
    for (s, i) in &doomed {
        let slowest = records
            .iter()
            .filter(|r| r.session == *s && r.client == *i && r.result.is_ok())
            .filter(|r| r.answered > t_kill)
            .map(|r| r.answered.duration_since(r.sent))
            .max()
            .expect("an ack after the kill");
        pauses.push(slowest.as_secs_f64() * 1000.0);
    }
    let p = percentiles(pauses);
    let errors: Vec<_> = records.iter().filter(|r| r.result.is_err()).collect();
    // Commands resent after the kill that had already been applied: answered with
    // their original version, not applied again.
    let deduplicated = node_counter(cluster, "gs_node_commands_deduplicated_total").await?;
    println!(
        "chaos kill-router: {} commands, {} errors; {} clients resumed through the other router, \
         {deduplicated} resent commands answered from the command-id record; \
         interruption per moved client p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        records.len(),
        errors.len(),
        doomed.len(),
        p.p50,
        p.p99,
        p.max
    );
    assert!(
        errors.is_empty(),
        "clients saw errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    verify_workload(cluster, &ids, &clients, &records).await
}
