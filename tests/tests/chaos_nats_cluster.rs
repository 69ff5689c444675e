//! Chaos (issue 13): the service on a private 3-server NATS cluster (routes on local
//! ports); nodes and routers are given all three seed URLs. Under load, the server
//! holding the most of their connections is killed with SIGKILL: its clients reconnect
//! to the others, and nothing acknowledged is lost, duplicated or skipped.

use anyhow::{Context, Result};
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::load::{self, Record, Target};
use gs_tests::{verify_workload, NatsCluster};
use std::time::{Duration, Instant};

const SESSIONS: usize = 20;
const CLIENTS_PER_SESSION: usize = 5;
/// Each client sends one change every this often.
const INTERVAL: Duration = Duration::from_millis(200);
/// A client waits this long for an answer; the router's own deadline is 5 s.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Issue 13: service fully back within 5 s, and the window over which client-visible
/// errors are counted.
const RECOVER_WITHIN: Duration = Duration::from_secs(5);
/// Issue 13: client-visible errors at most 1 % of the commands of the interruption.
const MAX_ERROR_RATE: f64 = 0.01;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_nats_server_of_three_loses_nothing() -> Result<()> {
    gs_tests::init_logging();
    let mut nats = NatsCluster::start(3).await?;
    let mut spec = ClusterSpec::test(2, 2);
    spec.base.nats.url = nats.url();
    let cluster = LocalCluster::start(spec).await?;
    let result = run(&cluster, &mut nats).await;
    gs_tests::finish_cluster(cluster, result).await
}

async fn run(cluster: &LocalCluster, nats: &mut NatsCluster) -> Result<()> {
    let target = Target::of(cluster);
    let (ids, clients) = load::setup(&target, SESSIONS, CLIENTS_PER_SESSION, None).await?;
    let running = load::start(clients, INTERVAL, ANSWER_TIMEOUT, None);
    let progress = running.progress.clone();
    let every_client_served_since = |t: Instant| {
        move |p: &load::Progress| {
            (0..SESSIONS).all(|s| (0..CLIENTS_PER_SESSION).all(|c| p.client_acked_since(s, c, t)))
        }
    };
    let warm = Instant::now();
    progress
        .wait(
            "every client served",
            PHASE_TIMEOUT,
            every_client_served_since(warm),
        )
        .await?;

    // Kill the server the service uses most (nodes and routers pick a seed at random).
    let conns = nats.connections().await?;
    let victim = (0..conns.len()).max_by_key(|i| conns[*i]).unwrap_or(0);
    anyhow::ensure!(
        conns[victim] > 0,
        "no service connection on any NATS server"
    );
    nats.kill(victim).await?;
    let killed = Instant::now();

    // Run on until every client has been served by commands sent after the window.
    progress
        .wait(
            "every client served after the interruption window",
            PHASE_TIMEOUT + RECOVER_WITHIN,
            every_client_served_since(killed + RECOVER_WITHIN),
        )
        .await?;
    nats.wait_routes().await?;
    let (clients, records) = running.stop().await?;

    // Recovery: per client, the first acknowledgement of a command sent after the kill.
    let recovery = (0..SESSIONS)
        .flat_map(|s| (0..CLIENTS_PER_SESSION).map(move |c| (s, c)))
        .map(|(s, c)| {
            records
                .iter()
                .filter(|r| r.session == s && r.client == c && r.result.is_ok())
                .filter(|r| r.sent >= killed)
                .map(|r| r.answered - killed)
                .min()
                .context("a client without an acknowledgement after the kill")
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or_default();
    // The interruption: commands in flight at the kill or sent within the window.
    let window: Vec<&Record> = records
        .iter()
        .filter(|r| r.answered >= killed && r.sent <= killed + RECOVER_WITHIN)
        .collect();
    let window_errors = window.iter().filter(|r| r.result.is_err()).count();
    let errors: Vec<&Record> = records.iter().filter(|r| r.result.is_err()).collect();
    let rate = window_errors as f64 / window.len().max(1) as f64;
    println!(
        "chaos nats cluster: {} commands, {} acked, {} errors; killed NATS server {victim} \
         of 3 (service connections per server {conns:?}); interruption window ({} s): \
         {window_errors} errors of {} commands ({:.2} %); every client served again {:.0} ms \
         after the kill",
        records.len(),
        records.len() - errors.len(),
        errors.len(),
        RECOVER_WITHIN.as_secs(),
        window.len(),
        rate * 100.0,
        recovery.as_secs_f64() * 1000.0
    );
    for r in errors.iter().take(5) {
        println!("error: {r:?}");
    }
    assert!(
        rate <= MAX_ERROR_RATE,
        "{window_errors} errors of {} commands in the interruption",
        window.len()
    );
    assert!(
        recovery <= RECOVER_WITHIN,
        "recovery took {recovery:?} (bound {RECOVER_WITHIN:?})"
    );
    verify_workload(cluster, &ids, &clients, &records).await
}
