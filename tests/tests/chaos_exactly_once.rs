//! Exactly once under retry (issue 3): the owner commits a command and dies before
//! acknowledging it (an injected crash); the router retries the same command id on
//! the next owner, which answers with the original version instead of applying it
//! again.

use anyhow::Result;
use gs_tests::{finish, set, Fixture, WAIT};
use serde_json::json;
use uuid::Uuid;

const MARKER: &str = "crash-probe";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_ack_died_with_the_owner_takes_effect_once() -> Result<()> {
    let mut spec = cluster::harness::ClusterSpec::test(2, 1);
    spec.base.node.fault_crash_after_commit = MARKER.into();
    let f = Fixture::with_spec(spec).await?;
    let r = async {
        let sid = Uuid::parse_str(&f.session)?;
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let id = dm.send("state_update", set("/log", json!([]))).await?;
        assert!(dm.wait_answer(id, WAIT).await?.is_ok());
        let pg = f.cluster.pg().await?;
        let owner: String = pg
            .query_one("SELECT owner_node FROM sessions WHERE id = $1", &[&sid])
            .await?
            .get(0);

        // The owner commits this append, then aborts before it can answer.
        let probe = dm
            .send(
                "state_update",
                json!({"changes": [{"path": "/log/-", "value": MARKER}]}),
            )
            .await?;
        let version = dm
            .wait_answer(probe, WAIT)
            .await?
            .expect("acknowledged after the retry");

        let new_owner: String = pg
            .query_one("SELECT owner_node FROM sessions WHERE id = $1", &[&sid])
            .await?
            .get(0);
        assert_ne!(new_owner, owner, "the first owner died");
        let log = std::fs::read_to_string(&f.cluster.members[&owner].log)?;
        assert!(
            log.contains("aborting after commit"),
            "the crash happened after the commit"
        );

        // Stored once, at the acknowledged version; applied once.
        let rows = pg
            .query(
                "SELECT seq FROM session_events WHERE session_id = $1 AND command_id = $2",
                &[&sid, &probe],
            )
            .await?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i64>(0) as u64, version);
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        assert_eq!(state["state"]["log"], json!([MARKER]));

        // The client still gets the event (its broadcast died with the owner: the
        // new owner republishes it, or the router fills the gap) and nothing twice.
        dm.wait_for("the probe's event", WAIT, |v| v.version >= version)
            .await?;
        let v = dm.view();
        assert_eq!((v.gaps, v.duplicates), (0, 0));
        assert_eq!(v.doc, state["state"]);
        Ok(())
    }
    .await;
    finish(f, r).await
}
