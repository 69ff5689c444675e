//! What an autoscaler and an orchestrator read (issue 13): a new node's
//! `/health/ready` stays 503 until it is on the ring, and every member's `/metrics`
//! carries the signals to scale on under stable names (docs/architecture.md,
//! "Metrics to scale on").

use anyhow::{Context, Result};
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::load::{self, Target};
use gs_tests::{node_counter, WAIT};
use serde_json::Value;
use std::time::{Duration, Instant};

/// How often the test asks the new node whether it is ready.
const POLL: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_is_ready_only_once_on_the_ring_and_exports_the_scaling_signals() -> Result<()> {
    gs_tests::init_logging();
    let mut spec = ClusterSpec::test(1, 1);
    // A slow heartbeat makes the membership warm-up (two intervals) long enough that
    // the node's health server answers well before the node joins the ring.
    spec.base.membership.heartbeat_ms = 1000;
    spec.base.membership.failure_timeout_ms = 5000;
    let mut cluster = LocalCluster::start(spec).await?;
    let result = run(&mut cluster).await;
    gs_tests::finish_cluster(cluster, result).await
}

async fn run(cluster: &mut LocalCluster) -> Result<()> {
    let http = cluster.http();
    let id = cluster.spawn_node().await?;
    let url = cluster.members[&id].url.clone();
    // Every answer of the new node's /health/ready until the first 200.
    let mut answers: Vec<(u16, Value)> = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{id} not ready within {WAIT:?}: {answers:?}"
        );
        if let Ok(r) = http.get(format!("{url}/health/ready")).send().await {
            let status = r.status().as_u16();
            answers.push((status, r.json().await.unwrap_or_default()));
            if status == 200 {
                break;
            }
        }
        // Polling an HTTP endpoint: nothing to await but the next look.
        tokio::time::sleep(POLL).await;
    }
    let (_, ready) = answers.last().unwrap();
    anyhow::ensure!(
        ready["checks"]["membership"] == "up",
        "ready while not on the ring: {ready}"
    );
    let warming: Vec<_> = answers
        .iter()
        .filter(|(s, b)| *s == 503 && b["checks"]["membership"] == "down: warming up")
        .collect();
    anyhow::ensure!(
        !warming.is_empty(),
        "the new node was never seen not ready while warming up: {answers:?}"
    );
    println!(
        "{id}: {} answers 503 (of them {} 'warming up') before the first 200",
        answers.len() - 1,
        warming.len()
    );
    // Ready means on the ring: the node counts itself, and the routers follow.
    anyhow::ensure!(metric(&http, &url, None, "gs_node_on_ring").await? == 1.0);
    cluster.wait_ready(std::slice::from_ref(&id)).await?;

    // Some traffic, so every signal has a value.
    let target = Target::of(cluster);
    let (_, clients) = load::setup(&target, 4, 2, None).await?;
    let running = load::start(
        clients,
        Duration::from_millis(100),
        Duration::from_secs(15),
        None,
    );
    running
        .progress
        .wait("some acknowledgements", WAIT, |p| p.acks() >= 40)
        .await?;
    let owned = node_counter(cluster, "gs_node_sessions_owned").await?;
    anyhow::ensure!(owned >= 1.0, "sessions owned over the nodes: {owned}");
    for node in cluster.node_ids() {
        let url = cluster.members[&node].url.clone();
        let text = http
            .get(format!("{url}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        for name in [
            "gs_node_sessions_owned ",
            "gs_node_inbox_depth ",
            "gs_node_on_ring ",
            "process_cpu_seconds_total ",
        ] {
            anyhow::ensure!(text.contains(name), "{node}: no `{name}` in /metrics");
        }
        anyhow::ensure!(metric(&http, &url, None, "process_cpu_seconds_total").await? > 0.0);
    }
    // The commit latency is a histogram (aggregatable over nodes) on the nodes that
    // committed something.
    let buckets = node_counter(cluster, "gs_node_commit_seconds_bucket{le=\"+Inf\"}").await?;
    anyhow::ensure!(buckets >= 1.0, "commit histogram count: {buckets}");
    let router = cluster.router_urls()[0].clone();
    let admin = cluster.admin_token();
    let connections = metric(&http, &router, Some(&admin), "gs_router_connections").await?;
    anyhow::ensure!(connections >= 1.0, "router connections: {connections}");
    anyhow::ensure!(metric(&http, &router, Some(&admin), "process_cpu_seconds_total").await? > 0.0);
    running.stop().await?;
    Ok(())
}

/// The value of an unlabelled metric on a member's `/metrics`.
async fn metric(http: &reqwest::Client, url: &str, token: Option<&str>, name: &str) -> Result<f64> {
    let mut req = http.get(format!("{url}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let text = req.send().await?.text().await?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse::<f64>().ok()).flatten()
        })
        .with_context(|| format!("{url}: no {name} in /metrics"))
}
