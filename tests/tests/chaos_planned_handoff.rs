//! Planned handoff (design brief, "Cluster mechanics"): a node drained with SIGTERM
//! under load hands its sessions to their new owners (snapshot, unlock, redirect);
//! clients see no error and only a short pause, which the test reports.

use anyhow::Result;
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::load::{self, percentiles, Target};
use gs_tests::{owners, verify_workload, WAIT};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_hands_its_sessions_off_without_errors() -> Result<()> {
    gs_tests::init_logging();
    let mut cluster = LocalCluster::start(ClusterSpec::test(3, 1)).await?;
    let result = async {
        let target = Target::of(&cluster);
        let (ids, clients) = load::setup(&target, 12, 3, None).await?;
        // A light load (180 changes/s), so the pause is not hidden by queueing.
        let running = load::start(clients, Duration::from_millis(200), Duration::from_secs(15), None);
        let progress = running.progress.clone();
        let warm = Instant::now();
        progress
            .wait("every session served", WAIT, |p| (0..ids.len()).all(|s| p.acked_since(s, warm)))
            .await?;
        let by_owner = owners(&cluster, &ids).await?;
        let (victim, moved) = by_owner.iter().max_by_key(|(_, s)| s.len()).map(|(n, s)| (n.clone(), s.clone())).unwrap();
        let t_stop = Instant::now();
        cluster.stop(&victim).await?;
        let stopped = t_stop.elapsed();
        let after = Instant::now();
        progress
            .wait("the moved sessions served again", WAIT, |p| moved.iter().all(|s| p.acked_since(*s, after)))
            .await?;
        let (clients, records) = running.stop().await?;
        // The pause each moved session saw: its slowest acknowledgement among the
        // commands in flight during the drain (a command's wait for its ack).
        let mut pauses = Vec::new();
        for s in &moved {
            let slowest = records
                .iter()
                .filter(|r| r.session == *s && r.result.is_ok())
                .filter(|r| r.answered > t_stop && r.sent < t_stop + stopped)
                .map(|r| r.answered.duration_since(r.sent))
                .max();
            // Sessions with no command in flight during the drain saw no pause at all.
            if let Some(slowest) = slowest {
                pauses.push(slowest.as_secs_f64() * 1000.0);
            }
        }
        let p = percentiles(pauses);
        let baseline = percentiles(
            records
                .iter()
                .filter(|r| r.result.is_ok() && r.answered < t_stop)
                .map(|r| r.answered.duration_since(r.sent).as_secs_f64() * 1000.0)
                .collect(),
        );
        let errors: Vec<_> = records.iter().filter(|r| r.result.is_err()).collect();
        println!(
            "planned handoff of {} sessions from {victim} (drain took {:?}): {} commands, {} errors; \
             slowest in-flight ack per moved session p50 {:.0} ms, max {:.0} ms (acks before the drain: p50 {:.0} ms, p99 {:.0} ms)",
            moved.len(),
            stopped,
            records.len(),
            errors.len(),
            p.p50,
            p.max,
            baseline.p50,
            baseline.p99
        );
        assert!(errors.is_empty(), "clients saw errors: {:?}", &errors[..errors.len().min(5)]);

        verify_workload(&cluster, &ids, &clients, &records).await
    }
    .await;
    gs_tests::finish_cluster(cluster, result).await
}
