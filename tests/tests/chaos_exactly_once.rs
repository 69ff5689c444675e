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
        let stored = gs_tests::stored_versions_of(&pg, sid, probe).await?;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0], version);
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

/// Exactly once beyond the node's memory: with a window of 4 command ids, a command
/// sent again after 10 newer ones (a client that reconnects late and resends what it
/// never saw answered) is not applied a second time, and the resend is answered with
/// the original version. The node does not look every batch up in the log; the
/// `UNIQUE(session_id, command_id)` constraint refuses the repeat, and the retry
/// under the same id is looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_resent_after_it_left_the_dedupe_window_takes_effect_once() -> Result<()> {
    let mut spec = cluster::harness::ClusterSpec::test(1, 1);
    spec.base.node.dedupe_window = 4;
    let f = Fixture::with_spec(spec).await?;
    let r = async {
        let sid = Uuid::parse_str(&f.session)?;
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let id = dm.send("state_update", set("/log", json!([]))).await?;
        assert!(dm.wait_answer(id, WAIT).await?.is_ok());
        let append = |n: u32| json!({"changes": [{"path": "/log/-", "value": n}]});
        let first = dm.send("state_update", append(0)).await?;
        let original = dm.wait_answer(first, WAIT).await?.expect("applied");
        let mut last = original;
        for n in 1..10 {
            let id = dm.send("state_update", append(n)).await?;
            last = dm.wait_answer(id, WAIT).await?.expect("applied");
        }

        // The same id again, from a new connection (the answer to the first copy
        // is what a reconnecting client has not seen).
        let mut again = f.connect(0, "again", &f.dm_token, &f.session_token).await?;
        again.send_with_id(first, "state_update", append(0)).await?;
        let answer = again.wait_answer(first, WAIT).await?;
        assert_eq!(answer, Ok(original), "answered with the original version");

        // Applied once: one row, ten entries, no event after the last append.
        let pg = f.cluster.pg().await?;
        let stored = gs_tests::stored_versions_of(&pg, sid, first).await?;
        assert_eq!(stored.len(), 1);
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        assert_eq!(state["state"]["log"], json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]));
        let newest: i64 = pg
            .query_one(
                "SELECT max(seq) FROM session_events WHERE session_id = $1",
                &[&sid],
            )
            .await?
            .get(0);
        assert_eq!(newest as u64, last, "nothing was appended by the resend");
        // It was the log's unique command id that refused the repeat (the node no
        // longer remembered it), not the node's memory.
        let node = &f.cluster.node_ids()[0];
        let log = std::fs::read_to_string(&f.cluster.members[node].log)?;
        assert!(
            log.contains("commit failed; reloading from the log"),
            "the repeat reached the log and was refused there"
        );

        // A later new command still goes through (the session recovered).
        let id = dm.send("state_update", append(10)).await?;
        assert_eq!(dm.wait_answer(id, WAIT).await?, Ok(last + 1));
        Ok(())
    }
    .await;
    finish(f, r).await
}
