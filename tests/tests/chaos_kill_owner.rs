//! Chaos (issue 3): SIGKILL the node owning the most sessions under load, start a
//! replacement, then SIGKILL another. Nothing acknowledged is lost or applied twice,
//! clients see no error, no gap, no duplicate, and every session is served again.
//! Failover times (kill → first acknowledgement on each moved session) are reported.

use anyhow::Result;
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::load::{self, percentiles, Target};
use gs_tests::{owners, verify_workload};
use std::time::{Duration, Instant};

const SESSIONS: usize = 20;
const CLIENTS_PER_SESSION: usize = 5;
/// Each client sends one change every this often (1,000 changes/s offered in all).
const INTERVAL: Duration = Duration::from_millis(100);
/// A client waits this long for an answer; the router's own deadline is 5 s, so an
/// answer always comes (ack, or an error the test then reports).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Acks within this long after a kill were already on their way: not failover.
const IN_FLIGHT: Duration = Duration::from_millis(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_owners_loses_nothing_and_sessions_fail_over() -> Result<()> {
    gs_tests::init_logging();
    let mut cluster = LocalCluster::start(ClusterSpec::test(3, 2)).await?;
    let result = run(&mut cluster).await;
    gs_tests::finish_cluster(cluster, result).await
}

async fn run(cluster: &mut LocalCluster) -> Result<()> {
    let target = Target::of(cluster);
    let (ids, clients) = load::setup(&target, SESSIONS, CLIENTS_PER_SESSION, None).await?;
    let running = load::start(clients, INTERVAL, ANSWER_TIMEOUT, None);
    let progress = running.progress.clone();
    let warm = Instant::now();
    progress
        .wait("every session served", RECOVERY_TIMEOUT, |p| {
            (0..SESSIONS).all(|s| p.acked_since(s, warm))
        })
        .await?;

    let mut failovers: Vec<f64> = Vec::new();
    let mut kills = Vec::new();
    for round in 0..2 {
        if round == 1 {
            // A replacement joins; some sessions move to it (planned handoff).
            let added = cluster.add_node().await?;
            let t = Instant::now();
            progress
                .wait("service after adding a node", RECOVERY_TIMEOUT, |p| {
                    (0..SESSIONS).all(|s| p.acked_since(s, t))
                })
                .await?;
            println!("added {added}");
        }
        let by_owner = owners(cluster, &ids).await?;
        let (victim, moved) = by_owner
            .iter()
            .filter(|(n, _)| cluster.node_ids().contains(n))
            .max_by_key(|(_, s)| s.len())
            .map(|(n, s)| (n.clone(), s.clone()))
            .expect("an owner");
        let t_kill = Instant::now();
        cluster.kill(&victim).await?;
        progress
            .wait(
                &format!("the sessions of {victim} served again"),
                RECOVERY_TIMEOUT,
                |p| moved.iter().all(|s| p.acked_since(*s, t_kill + IN_FLIGHT)),
            )
            .await?;
        println!("killed {victim} (owner of {} sessions)", moved.len());
        kills.push((t_kill, moved));
    }
    let last = Instant::now();
    progress
        .wait("service after the kills", RECOVERY_TIMEOUT, |p| {
            (0..SESSIONS).all(|s| p.acked_since(s, last))
        })
        .await?;
    let (clients, records) = running.stop().await?;

    for (t_kill, moved) in &kills {
        for s in moved {
            let first = records
                .iter()
                .filter(|r| r.session == *s && r.result.is_ok() && r.answered > *t_kill + IN_FLIGHT)
                .map(|r| r.answered)
                .min()
                .expect("an ack after the kill");
            failovers.push(first.duration_since(*t_kill).as_secs_f64() * 1000.0);
        }
    }
    let acked = records.iter().filter(|r| r.result.is_ok()).count();
    let errors: Vec<_> = records.iter().filter(|r| r.result.is_err()).collect();
    let f = percentiles(failovers);
    println!(
        "chaos kill-owner: {} commands, {acked} acked, {} errors; failover over {} moved sessions: \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        records.len(),
        errors.len(),
        f.count,
        f.p50,
        f.p99,
        f.max
    );
    assert!(
        errors.is_empty(),
        "clients saw errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    verify_workload(cluster, &ids, &clients, &records).await
}
