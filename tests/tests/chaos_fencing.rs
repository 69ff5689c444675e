//! Fencing (issue 3): a node stopped (SIGSTOP) in the middle of a write, while it owns
//! a session, loses the session to another node; when it resumes, its write is
//! refused by PostgreSQL (stale epoch), it stops serving the session, and the state
//! stays consistent: the command it was writing took effect once, through the new
//! owner.

use anyhow::{Context, Result};
use futures::StreamExt;
use gs_tests::{finish, set, Fixture, WAIT};
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

const MARKER: &str = "fence-probe";
const HOOKED: &str = "node-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_cannot_write_after_takeover() -> Result<()> {
    let mut spec = cluster::harness::ClusterSpec::test(3, 1);
    // Only node-1 holds its marked commits back.
    spec.node_patch = Some(|id, cfg| {
        if id == HOOKED {
            cfg.node.fault_delay_commit = MARKER.into();
            cfg.node.fault_delay_commit_ms = 3000;
        }
    });
    let f = Fixture::with_spec(spec).await?;
    let r = run(&f).await;
    finish(f, r).await
}

async fn run(f: &Fixture) -> Result<()> {
    // A session the ring places on the hooked node.
    let ring =
        gs_shared::ring::Ring::with_nodes(f.cluster.base.membership.vnodes, f.cluster.node_ids());
    let api = f.api(0, &f.dm_token);
    let (session, session_token) = loop {
        let created = api.create_session("fencing").await?;
        let id = created["session_id"].as_str().context("id")?.to_string();
        if ring.owner(&Uuid::parse_str(&id)?) == Some(HOOKED) {
            break (
                id,
                created["connection_token"]
                    .as_str()
                    .context("token")?
                    .to_string(),
            );
        }
    };
    let sid = Uuid::parse_str(&session)?;
    let pg = f.cluster.pg().await?;
    let mut dm = f
        .connect_to(0, "dm", &session, &f.dm_token, &session_token)
        .await?;
    let warm = dm.send("state_update", set("/warm", json!(1))).await?;
    assert!(dm.wait_answer(warm, WAIT).await?.is_ok());
    let row = pg
        .query_one(
            "SELECT owner_node, owner_epoch FROM sessions WHERE id = $1",
            &[&sid],
        )
        .await?;
    let (owner, old_epoch): (String, i64) = (row.get(0), row.get(1));
    assert_eq!(owner, HOOKED);

    // The owner stages the marked command and holds it before committing; it is
    // stopped right there, with the write in flight.
    let nats = async_nats::connect(&f.cluster.base.nats.url).await?;
    let mut delaying = nats
        .subscribe(format!(
            "{}.fault.delaying",
            f.cluster.base.nats.subject_prefix
        ))
        .await?;
    nats.flush().await?;
    let probe = dm
        .send(
            "state_update",
            json!({"changes": [{"path": "/log", "value": [MARKER]}]}),
        )
        .await?;
    tokio::time::timeout(WAIT, delaying.next())
        .await
        .context("the owner never reached the delayed commit")?;
    f.cluster.pause(&owner)?;
    let paused = Instant::now();

    // Another node takes over and serves: the router retries the same command there.
    let answer = dm.wait_answer(probe, WAIT).await?;
    let probe_version = answer.expect("the command is acknowledged by the new owner");
    let after = dm
        .send("state_update", set("/after_takeover", json!(true)))
        .await?;
    assert!(dm.wait_answer(after, WAIT).await?.is_ok());
    let row = pg
        .query_one(
            "SELECT owner_node, owner_epoch FROM sessions WHERE id = $1",
            &[&sid],
        )
        .await?;
    let (new_owner, new_epoch): (String, i64) = (row.get(0), row.get(1));
    assert_ne!(new_owner, owner);
    assert!(new_epoch > old_epoch);
    println!(
        "{owner} paused; {new_owner} took over in {:?}",
        paused.elapsed()
    );

    // Resume the old owner: its delayed write reaches PostgreSQL with the old epoch.
    f.cluster.resume(&owner)?;
    let log = f.cluster.members[&owner].log.clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("fenced: another node owns the session") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{owner} never reported its write as fenced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&log)?;
    assert!(
        text.contains("reason=Fenced"),
        "the old owner stopped serving the session"
    );

    // Nothing of the old owner's landed after the takeover, and the probe took effect
    // exactly once, through the new owner.
    let rows = pg
        .query(
            "SELECT seq, epoch, command_id FROM session_events WHERE session_id = $1 ORDER BY seq",
            &[&sid],
        )
        .await?;
    let first_new = rows
        .iter()
        .find(|r| r.get::<_, i64>(1) > old_epoch)
        .map(|r| r.get::<_, i64>(0))
        .expect("events of the new owner");
    for r in &rows {
        if r.get::<_, i64>(1) <= old_epoch {
            assert!(
                r.get::<_, i64>(0) < first_new,
                "an old-epoch event landed after the takeover"
            );
        }
    }
    let probes: Vec<_> = rows
        .iter()
        .filter(|r| r.get::<_, Option<Uuid>>(2) == Some(probe))
        .collect();
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].get::<_, i64>(0) as u64, probe_version);
    assert!(probes[0].get::<_, i64>(1) > old_epoch);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.get::<_, i64>(0), i as i64 + 1, "no hole in the log");
    }

    // State stays consistent everywhere, and the session keeps working.
    let more = dm
        .send("state_update", set("/after_resume", json!(true)))
        .await?;
    let last = dm.wait_answer(more, WAIT).await?.expect("ack");
    dm.wait_for("the newest version", WAIT, |v| v.version >= last)
        .await?;
    let state = f.api(0, &f.dm_token).get_state(&session).await?;
    let v = dm.view();
    assert_eq!((v.gaps, v.duplicates), (0, 0));
    assert_eq!(v.doc, state["state"]);
    assert_eq!(state["state"]["log"], json!([MARKER]));
    Ok(())
}

/// The trigger itself: a write carrying an older epoch than the session's is refused
/// by PostgreSQL, whoever sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_a_stale_epoch() -> Result<()> {
    let f = Fixture::start(1, 1, false).await?;
    let r = async {
        let pg = f.cluster.pg().await?;
        let sid = Uuid::parse_str(&f.session)?;
        let epoch: i64 = pg
            .query_one("SELECT owner_epoch FROM sessions WHERE id = $1", &[&sid])
            .await?
            .get(0);
        let insert = |e: i64| {
            let pg = &pg;
            async move {
                pg.execute(
                    "INSERT INTO session_events (id, session_id, event_type, event_data, created_at, seq, epoch) \
                     VALUES ($1, $2, 'state_update', '{}', now(), 1000, $3)",
                    &[&Uuid::new_v4(), &sid, &e],
                )
                .await
            }
        };
        let err = insert(epoch - 1).await.expect_err("a stale epoch is refused");
        assert!(gs_shared::db::is_fenced(&err), "{err}");
        let err = insert(epoch + 1).await.expect_err("a future epoch is refused too");
        assert!(gs_shared::db::is_fenced(&err), "{err}");
        Ok(())
    }
    .await;
    finish(f, r).await
}
