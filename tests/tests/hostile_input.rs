//! Hostile input (issue 10): no message can break a session, crash a node or fail a
//! neighbour. Each refused message gets its specific code, changes nothing (same
//! version, same stored events), and leaves the connection usable; the session keeps
//! serving joins, syncs and full-state reads afterwards.

use anyhow::{ensure, Context, Result};
use cluster::client::TrackedClient;
use cluster::harness::ClusterSpec;
use gs_shared::auth::Role;
use gs_tests::{finish, set, state_path, Fixture, WAIT};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What must not change: the session's version and its stored events.
async fn snapshot(f: &Fixture) -> Result<(Value, i64)> {
    let s = f.api(0, &f.dm_token).get_state(&f.session).await?;
    Ok((s["version"].clone(), f.stored_event_count().await?))
}

/// Sends a `state_update` of `changes` as raw text (so any shape can be sent) and
/// expects it refused with `code` (and `details.limit == limit` when given).
async fn refused(
    c: &mut TrackedClient,
    changes: String,
    code: &str,
    limit: Option<&str>,
) -> Result<Value> {
    let id = Uuid::new_v4();
    let text = format!(r#"{{"id":"{id}","type":"state_update","data":{{"changes":{changes}}}}}"#);
    c.send_raw(text).await?;
    let answer = c.wait_answer(id, WAIT).await?;
    let err = answer.expect_err("refused");
    ensure!(err["code"] == code, "expected {code}, got {err}");
    if let Some(l) = limit {
        ensure!(
            err["details"]["limit"] == l,
            "expected limit {l}, got {err}"
        );
    }
    Ok(err)
}

/// The session still answers everything that reads the whole document.
async fn still_serves(f: &Fixture, c: &mut TrackedClient) -> Result<()> {
    let ok = c.send("state_update", set("/still", json!(true))).await?;
    ensure!(
        c.wait_answer(ok, WAIT).await?.is_ok(),
        "a normal update failed"
    );
    ensure!(c.view().closed.is_none(), "the connection was closed");
    // A full state read, a sync and a join (each sends the whole document).
    let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
    ensure!(state["state"]["still"] == true, "GET /state: {state}");
    let sync = c.send("sync_request", json!({})).await?;
    ensure!(c.wait_answer(sync, WAIT).await?.is_ok(), "sync failed");
    f.player(0, json!({}))
        .await
        .context("a join after the refusals")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_oversized_paths_and_values_are_refused_and_change_nothing() -> Result<()> {
    let fx = Fixture::start(2, 1, false).await?;
    let f = &fx;
    let r = async {
        let mut c = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let before = snapshot(f).await?;
        // 130 segments (260 bytes): past the path depth.
        let deep = "/a".repeat(130);
        refused(
            &mut c,
            format!(r#"[{{"path":"{deep}","value":1}}]"#),
            "limit_exceeded",
            Some("max_path_depth"),
        )
        .await?;
        // 30,000 segments (60 KB, under the frame limit): past the path's bytes.
        let huge = "/a".repeat(30_000);
        refused(
            &mut c,
            format!(r#"[{{"path":"{huge}","value":1}}]"#),
            "limit_exceeded",
            Some("max_path_bytes"),
        )
        .await?;
        // A value nested 70 deep: past the edge's JSON nesting bound (64).
        let deep_value = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        refused(
            &mut c,
            format!(r#"[{{"path":"/v","value":{deep_value}}}]"#),
            "limit_exceeded",
            Some("max_json_depth"),
        )
        .await?;
        // Within the edge's bound but past the document's depth at this path.
        let deep_value = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let path = "/p".repeat(10);
        refused(
            &mut c,
            format!(r#"[{{"path":"{path}","value":{deep_value}}}]"#),
            "limit_exceeded",
            Some("max_depth"),
        )
        .await?;
        ensure!(
            snapshot(f).await? == before,
            "a refused message changed the session"
        );
        still_serves(f, &mut c).await
    }
    .await;
    finish(fx, r).await
}

/// U+0000 is refused at the edge with its own code, in values, member names and
/// paths; another session writing at the same time sees every command succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_refused_and_neighbours_are_unaffected() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        // A neighbour session on the same node, writing steadily.
        let other = f.api(0, &f.dm_token).create_session("neighbour").await?;
        let other_id = other["session_id"]
            .as_str()
            .context("session_id")?
            .to_string();
        let other_st = other["connection_token"]
            .as_str()
            .context("token")?
            .to_string();
        let mut n = f
            .connect_to(0, "neighbour", &other_id, &f.dm_token, &other_st)
            .await?;
        let mut c = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let before = snapshot(f).await?;
        let mut neighbour_ids = Vec::new();
        for i in 0..20 {
            neighbour_ids.push(
                n.send("state_update", set(&format!("/n{i}"), json!(i)))
                    .await?,
            );
            let bad = match i % 3 {
                0 => r#"[{"path":"/x","value":"a\u0000b"}]"#,
                1 => r#"[{"path":"/x","value":{"k\u0000":1}}]"#,
                _ => r#"[{"path":"/x\u0000","value":1}]"#,
            };
            refused(&mut c, bad.to_string(), "unsupported_character", None).await?;
        }
        for id in neighbour_ids {
            ensure!(
                n.wait_answer(id, WAIT).await?.is_ok(),
                "a neighbour's command failed"
            );
        }
        ensure!(
            snapshot(f).await? == before,
            "a refused message changed the session"
        );
        // A REST save with U+0000 is refused the same way.
        let body = json!({"state": {"a": "x\u{0}y"}});
        let post = reqwest::Method::POST;
        let r = f
            .rest(&f.dm_token, post, &state_path(&f.session), Some(&body))
            .await?;
        ensure!(r == (400, "unsupported_character"), "REST save: {r:?}");
        still_serves(f, &mut c).await
    }
    .await;
    finish(fx, r).await
}

/// The document grows to its size bound: the change that would pass it is refused
/// (`max_document_bytes`), nothing changes, and joins, syncs and full reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_at_its_size_limit_refuses_growth_and_keeps_serving() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.document.max_document_bytes = 200 * 1024;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let mut c = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let chunk = "x".repeat(30_000);
        let mut refused_at = None;
        for i in 0..20 {
            let id = c
                .send("state_update", set(&format!("/big{i}"), json!(chunk)))
                .await?;
            match c.wait_answer(id, WAIT).await? {
                Ok(_) => {}
                Err(err) => {
                    ensure!(err["code"] == "limit_exceeded", "{err}");
                    ensure!(err["details"]["limit"] == "max_document_bytes", "{err}");
                    refused_at = Some(i);
                    break;
                }
            }
        }
        let at = refused_at.context("the document grew past its limit")?;
        ensure!(at == 6, "refused at chunk {at} (6 of 30 KB fit in 200 KiB)");
        let before = snapshot(f).await?;
        // Replacing a value by a smaller one is still allowed; growth is not.
        refused(
            &mut c,
            format!(r#"[{{"path":"/big{at}","value":"{chunk}"}}]"#),
            "limit_exceeded",
            Some("max_document_bytes"),
        )
        .await?;
        ensure!(
            snapshot(f).await? == before,
            "a refused message changed the session"
        );
        let shrink = c.send("state_update", set("/big0", json!("small"))).await?;
        ensure!(
            c.wait_answer(shrink, WAIT).await?.is_ok(),
            "shrinking failed"
        );
        still_serves(f, &mut c).await?;
        // A resume from the start replays more than one answer can hold: the client
        // gets the whole state instead and is current.
        let mut late = f
            .connect_with(
                0,
                "late",
                &f.dm_token,
                &f.session_token,
                cluster::client::TokenStyle::Headers,
                Some(1),
            )
            .await?;
        let version = gs_shared::rpc::version_number(&snapshot(f).await?.0).context("version")?;
        late.wait_for("caught up", WAIT, |v| v.version >= version)
            .await?;
        late.close().await;
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// A non-member cannot use up a session's quotas: its refused saves and joins are
/// not counted against the session, and the DM's own save still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_cannot_exhaust_a_sessions_quota() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.limits.state_updates_per_min_per_session = 5;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let outsider = f.cluster.token(Uuid::new_v4(), Role::Player);
        let path = format!("/api/v2/sessions/{}/state", f.session);
        let mut codes = Vec::new();
        let mine = json!({"state": {"mine": true}});
        for _ in 0..12 {
            let r = f.rest(&outsider, Method::POST, &path, Some(&mine)).await?;
            codes.push((r.status, r.code));
        }
        // Refused as a non-member at first, then by its own allowance (per user).
        ensure!(codes[0] == (403, "not_member".to_string()), "{codes:?}");
        ensure!(
            codes
                .iter()
                .all(|c| c.1 == "not_member" || c.1 == "rate_limited"),
            "{codes:?}"
        );
        // The DM is unaffected: its saves count, up to the session's quota.
        for i in 0..5 {
            let save = json!({"state": {"save": i}});
            let r = f
                .rest(&f.dm_token, Method::POST, &path, Some(&save))
                .await?;
            ensure!(r.status == 200, "DM save {i}: {r:?}");
        }
        let empty = json!({"state": {}});
        let r = f
            .rest(&f.dm_token, Method::POST, &path, Some(&empty))
            .await?;
        ensure!(r == (429, "rate_limited"), "the sixth save: {r:?}");
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// `settings.dice_seed` is the service's secret: `null` gets a secret seed, a chosen
/// seed is refused for a DM and accepted for an admin; clients never see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dice_seeds_are_secret_unless_an_admin_fixes_one() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let create = |token: String, seed: Value| {
            let api = f.api(0, &token);
            async move {
                api.call(
                    reqwest::Method::POST,
                    "/api/v2/sessions",
                    Some(&json!({"campaign_id": Uuid::new_v4(), "name": "seeded",
                                 "settings": {"dice_seed": seed}})),
                )
                .await
            }
        };
        let stored_seed = |id: String| async move {
            let pg = f.cluster.pg().await?;
            let row = pg
                .query_one(
                    "SELECT event_data FROM session_events WHERE session_id = $1 AND seq = 1",
                    &[&Uuid::parse_str(&id)?],
                )
                .await?;
            let data: Value = row.get(0);
            anyhow::Ok(data["settings"]["dice_seed"].clone())
        };
        // null: a secret seed is injected.
        let r = create(f.dm_token.clone(), Value::Null).await?;
        ensure!(
            r.status == 201,
            "create with null seed: {} {}",
            r.status,
            r.code()
        );
        let created = r.ok()?;
        let id = created["session_id"].as_str().context("id")?.to_string();
        ensure!(
            created["session_state"]["settings"]
                .get("dice_seed")
                .is_none(),
            "the seed was shown: {created}"
        );
        let seed = stored_seed(id.clone()).await?;
        ensure!(seed.is_u64(), "no secret seed stored: {seed}");
        // A DM's chosen seed is refused.
        let r = create(f.dm_token.clone(), json!(42)).await?;
        ensure!(
            (r.status, r.code()) == (403, "forbidden"),
            "a DM's seed: {} {}",
            r.status,
            r.code()
        );
        // An admin's is kept (a replayable test table).
        let admin = f.cluster.token(Uuid::new_v4(), Role::Admin);
        let created = create(admin, json!(42)).await?.ok()?;
        let id = created["session_id"].as_str().context("id")?.to_string();
        ensure!(
            stored_seed(id).await? == json!(42),
            "the admin's seed was not kept"
        );
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// A session whose stored data cannot be read (nesting past serde_json's limit,
/// written behind the service's back) is quarantined with a clear error; the node
/// stays up and serves other sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_stored_data_quarantines_the_session_not_the_node() -> Result<()> {
    let mut fx = Fixture::start(1, 1, false).await?;
    let r = quarantine(&mut fx).await;
    finish(fx, r).await
}

async fn quarantine(f: &mut Fixture) -> Result<()> {
    let bad = f
        .api(0, &f.dm_token)
        .create_session("to be damaged")
        .await?;
    let bad_id = Uuid::parse_str(bad["session_id"].as_str().context("id")?)?;
    // Damage it: an event whose data nests past serde_json's limit of 128, appended
    // behind the service's back (with the owner's epoch); then its owner dies and
    // another node must load it.
    let pg = f.cluster.pg().await?;
    let deep = format!("{}1{}", "[".repeat(140), "]".repeat(140));
    let data = format!(
        r#"{{"update_id":"{}","user_id":"{}","timestamp":"t","changes":[{{"path":"/d","value":{deep}}}]}}"#,
        Uuid::new_v4(),
        f.dm
    );
    pg.execute(
        "INSERT INTO session_events (id, session_id, seq, event_type, event_data, epoch, created_at) \
         SELECT gen_random_uuid(), id, 2, 'state_update', $2::text::jsonb, owner_epoch, now() \
         FROM sessions WHERE id = $1",
        &[&bad_id, &data],
    )
    .await
    .context("damaging the log")?;
    let first = f.cluster.node_ids()[0].clone();
    f.cluster.add_node().await?;
    f.cluster.kill(&first).await?;
    let deadline = Instant::now() + WAIT;
    let err = loop {
        let r = f.get(&f.dm_token, &state_path(&bad_id.to_string())).await?;
        if r.code == "session_quarantined" {
            break r;
        }
        ensure!(Instant::now() < deadline, "never quarantined: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(err.status == 500, "status {}", err.status);
    // The surviving node is up and serves the fixture's session.
    let mut c = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
    let ok = c.send("state_update", set("/fine", json!(1))).await?;
    ensure!(
        c.wait_answer(ok, WAIT).await?.is_ok(),
        "the node stopped serving"
    );
    ensure!(
        f.node_counter("gs_node_sessions_quarantined_total").await? >= 1.0,
        "no quarantine metric"
    );
    Ok(())
}

/// The combat-action limit counts a player's own actions; the DM (who acts for every
/// monster) has its own, larger budget, which players cannot use up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dm_has_its_own_combat_budget() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.limits.combat_actions_per_min_per_player = 3;
    spec.base.limits.combat_actions_per_min_per_dm = 6;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let (_, token, st) = f.player(0, json!({})).await?;
        let mut p = f.connect(0, "player", &token, &st).await?;
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        // Whatever the rules answer (no combat is running), the limit counts first.
        let player = combat_codes(&mut p, 4).await?;
        ensure!(
            player[..3].iter().all(|c| c != "rate_limited") && player[3] == "rate_limited",
            "player: {player:?}"
        );
        let dm_codes = combat_codes(&mut dm, 7).await?;
        ensure!(
            dm_codes[..6].iter().all(|c| c != "rate_limited") && dm_codes[6] == "rate_limited",
            "dm: {dm_codes:?}"
        );
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// Sends `n` combat actions one after another: the code each was answered with.
async fn combat_codes(c: &mut TrackedClient, n: usize) -> Result<Vec<String>> {
    let mut codes = Vec::new();
    for _ in 0..n {
        let id = c.send("end_turn", json!({})).await?;
        let code = match c.wait_answer(id, WAIT).await? {
            Ok(_) => "ok".to_string(),
            Err(e) => e["code"].as_str().unwrap_or("").to_string(),
        };
        codes.push(code);
    }
    Ok(codes)
}
