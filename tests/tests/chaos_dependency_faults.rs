//! Dependency faults (issue 3): with Redis or NATS briefly gone (private instances the
//! test stops and restarts, so the machine's shared ones are untouched), commands fail
//! with `service_unavailable` within the retry deadline, nothing is acknowledged that
//! was not stored, readiness reports the outage, and the cluster recovers by itself.

use anyhow::Result;
use cluster::client::TrackedClient;
use cluster::harness::ClusterSpec;
use gs_shared::membership::MemberKind;
use gs_tests::{finish, set, Fixture, PrivateServer, WAIT};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Longest a command may take to fail during an outage: the router's deadline (5 s)
/// plus one attempt and slack.
const FAIL_WITHIN: Duration = Duration::from_secs(10);

/// Sends changes one at a time until one is answered the way `stop` wants, recording
/// every answer. Bounded by `within`.
async fn send_until(
    c: &mut TrackedClient,
    tag: &str,
    within: Duration,
    answers: &mut BTreeMap<Uuid, Result<u64, String>>,
    stop: impl Fn(&Result<u64, String>) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + within;
    for n in 0.. {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no {tag} answer within {within:?}"
        );
        let id = c
            .send("state_update", set(&format!("/{tag}/n{n}"), json!(n)))
            .await?;
        let started = Instant::now();
        let answer = c.wait_answer(id, FAIL_WITHIN + WAIT).await?;
        let took = started.elapsed();
        let answer = answer.map_err(|e| e["code"].as_str().unwrap_or("").to_string());
        if let Err(code) = &answer {
            assert_eq!(
                code, "service_unavailable",
                "the only error an outage may cause"
            );
            assert!(took <= FAIL_WITHIN, "failing took {took:?}");
        }
        let done = stop(&answer);
        answers.insert(id, answer);
        if done {
            return Ok(());
        }
    }
    unreachable!()
}

/// Acknowledged ⇒ stored once at that version; refused ⇒ not stored.
async fn check_stored(f: &Fixture, answers: &BTreeMap<Uuid, Result<u64, String>>) -> Result<()> {
    let pg = f.cluster.pg().await?;
    let sid = Uuid::parse_str(&f.session)?;
    for (id, answer) in answers {
        let stored = gs_tests::stored_versions_of(&pg, sid, *id).await?;
        match answer {
            Ok(v) => assert_eq!(stored, vec![*v], "acknowledged {id} must be stored once"),
            Err(_) => {
                if !stored.is_empty() {
                    f.cluster.dump_logs(400);
                }
                assert!(
                    stored.is_empty(),
                    "refused {id} must not be stored (stored at {stored:?})"
                )
            }
        }
    }
    Ok(())
}

async fn node_ready(f: &Fixture) -> Result<Vec<u16>> {
    let mut out = Vec::new();
    for m in f
        .cluster
        .members
        .values()
        .filter(|m| m.kind == MemberKind::Node)
    {
        let r = f.http.get(format!("{}/health/ready", m.url)).send().await?;
        out.push(r.status().as_u16());
    }
    Ok(out)
}

/// Waits (bounded) until every node's readiness answers `status`.
async fn await_readiness(f: &Fixture, status: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = node_ready(f).await?;
        if now.iter().all(|s| *s == status) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: readiness is {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A dependency a test stops and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dependency {
    Redis,
    Nats,
}

/// The scenario both dependencies go through: serve, lose the dependency, fail fast
/// and honestly, get it back, recover alone; nothing refused is stored, everything
/// acknowledged is, and the client's stream stays whole.
async fn outage(dep: Dependency) -> Result<()> {
    let mut server = match dep {
        Dependency::Redis => PrivateServer::redis().await?,
        Dependency::Nats => PrivateServer::nats().await?,
    };
    let mut spec = ClusterSpec::test(2, 1);
    match dep {
        Dependency::Redis => spec.base.redis.url = server.url(),
        Dependency::Nats => spec.base.nats.url = server.url(),
    }
    let f = Fixture::with_spec(spec).await?;
    let r = async {
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let mut answers = BTreeMap::new();
        send_until(&mut dm, "before", WAIT, &mut answers, |a| a.is_ok()).await?;

        server.stop().await?;
        // Redis: the owner can no longer renew its lock and no node can take it.
        // NATS: routers cannot reach any node. Either way commands fail once the
        // router's retry deadline passes.
        let outage = Duration::from_secs(60);
        send_until(&mut dm, "during", outage, &mut answers, |a| a.is_err()).await?;
        await_readiness(&f, 503, &format!("readiness reports {dep:?} down")).await?;
        assert!(
            dm.view().closed.is_none(),
            "the client's connection survives"
        );
        if dep == Dependency::Redis {
            // Rate-limited REST calls fail fast too (the limiter is in Redis).
            let r = f
                .api(0, &f.dm_token)
                .call(
                    reqwest::Method::POST,
                    "/api/v2/sessions",
                    Some(&json!({"campaign_id": Uuid::new_v4(), "name": "x"})),
                )
                .await?;
            assert_eq!((r.status, r.code()), (503, "service_unavailable"));
        }

        server.start().await?;
        send_until(&mut dm, "after", outage, &mut answers, |a| a.is_ok()).await?;
        await_readiness(&f, 200, "readiness recovers").await?;
        check_stored(&f, &answers).await?;
        let last = answers
            .values()
            .filter_map(|a| a.as_ref().ok())
            .max()
            .copied()
            .unwrap();
        dm.wait_for("the last version", WAIT, |v| v.version >= last)
            .await?;
        let v = dm.view();
        assert_eq!((v.gaps, v.duplicates), (0, 0));
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        assert_eq!(v.doc, state["state"]);
        let refused = answers.values().filter(|a| a.is_err()).count();
        println!(
            "{dep:?} outage: {} commands, {refused} refused with service_unavailable",
            answers.len()
        );
        Ok(())
    }
    .await;
    finish(f, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_fast_and_the_cluster_recovers() -> Result<()> {
    outage(Dependency::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_fails_fast_and_the_cluster_recovers() -> Result<()> {
    outage(Dependency::Nats).await
}
