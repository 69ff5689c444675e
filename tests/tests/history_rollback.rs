//! History and rollback through routers and a node (issue 4): the audit log pages
//! newest first, and a DM's rollback restores an earlier state as a new event, with
//! nothing erased.

use anyhow::Result;
use gs_tests::{finish, set, Fixture, WAIT};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_rollback_restores_without_erasing() -> Result<()> {
    let f = Fixture::start(1, 1, false).await?;
    let r = async {
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let (_u, token, st) = f.player(0, json!({})).await?;
        let mut player = f.connect(0, "player", &token, &st).await?;
        let mut versions = Vec::new();
        for hp in [10, 7, 3] {
            let id = dm.send("state_update", set("/hp", json!(hp))).await?;
            versions.push(dm.wait_answer(id, WAIT).await?.expect("ack"));
        }

        // Only the DM rolls back; the player is refused and nothing changes.
        let refused = player
            .send("rollback", json!({"to_version": versions[0]}))
            .await?;
        let err = player
            .wait_answer(refused, WAIT)
            .await?
            .expect_err("players cannot");
        assert_eq!(err["code"], "forbidden_for_role");
        let bad = dm.send("rollback", json!({"to_version": 10_000})).await?;
        let err = dm
            .wait_answer(bad, WAIT)
            .await?
            .expect_err("a future version");
        assert_eq!(err["code"], "invalid_version");

        let rb = dm
            .send("rollback", json!({"to_version": versions[0]}))
            .await?;
        let restored = dm.wait_answer(rb, WAIT).await?.expect("the DM may");
        assert_eq!(restored, versions[2] + 1, "a rollback is one more event");
        player
            .wait_for("the rollback", WAIT, |v| v.version >= restored)
            .await?;
        assert_eq!(
            player.view().events.last().map(|e| e.1.as_str()),
            Some("state_restored")
        );
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        assert_eq!(state["state"]["hp"], 10, "the state at the chosen version");
        assert_eq!(state["version_number"], json!(restored));
        assert_eq!(
            player.view().doc,
            state["state"],
            "clients follow the restore"
        );

        // The history keeps everything, newest first, in pages.
        let api = f.api(0, &f.dm_token);
        let path = format!("/api/v2/sessions/{}/history?limit=2", f.session);
        let page1 = api.call(reqwest::Method::GET, &path, None).await?.ok()?;
        let entries = page1["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["version"], json!(restored));
        assert_eq!(entries[0]["type"], "state_restored");
        assert!(entries[0]["summary"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        let next = page1["next_before"].as_u64().expect("more pages");
        let page2 = api
            .call(reqwest::Method::GET, &format!("{path}&before={next}"), None)
            .await?
            .ok()?;
        assert_eq!(page2["entries"][0]["version"], json!(next - 1));
        let mut all = Vec::new();
        let mut before: Option<u64> = None;
        loop {
            let url = match before {
                Some(b) => format!("/api/v2/sessions/{}/history?limit=3&before={b}", f.session),
                None => format!("/api/v2/sessions/{}/history?limit=3", f.session),
            };
            let page = api.call(reqwest::Method::GET, &url, None).await?.ok()?;
            all.extend(
                page["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["version"].as_u64().unwrap()),
            );
            match page["next_before"].as_u64() {
                Some(b) => before = Some(b),
                None => break,
            }
            assert!(all.len() < 100, "paging terminates");
        }
        let expected: Vec<u64> = (1..=restored).rev().collect();
        assert_eq!(all, expected, "every version, newest first, none erased");

        // Outsiders cannot read it.
        let stranger = f
            .cluster
            .token(uuid::Uuid::new_v4(), gs_shared::auth::Role::Player);
        let r = f
            .api(0, &stranger)
            .call(
                reqwest::Method::GET,
                &format!("/api/v2/sessions/{}/history", f.session),
                None,
            )
            .await?;
        assert_eq!((r.status, r.code()), (403, "not_member"));
        Ok(())
    }
    .await;
    finish(f, r).await
}
