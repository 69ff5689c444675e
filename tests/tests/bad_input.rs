//! Bad input (issue 2): each kind gets its own test, a specific error code, leaves the
//! connection usable where that is safe, and changes nothing (same version, same
//! stored events).

use anyhow::{bail, Result};
use cluster::client::{ws_open, TokenStyle, TrackedClient};
use cluster::harness::ClusterSpec;
use gs_shared::auth::{now_secs, Authority, Role};
use gs_tests::{finish, set, Fixture, WAIT};
use serde_json::{json, Value};
use uuid::Uuid;

/// What must not change: the session's version and its stored events.
async fn snapshot(f: &Fixture) -> Result<(Value, i64)> {
    let s = f.api(0, &f.dm_token).get_state(&f.session).await?;
    Ok((s["version"].clone(), f.stored_event_count().await?))
}

async fn dm_client(f: &Fixture) -> Result<TrackedClient> {
    f.connect(0, "dm", &f.dm_token, &f.session_token).await
}

/// Sends `text`, expects an error with `code` (and the message id when it had one),
/// then proves the connection still works and that nothing changed.
async fn refused_then_usable(
    f: &Fixture,
    text: String,
    id: Option<Uuid>,
    code: &str,
) -> Result<()> {
    let before = snapshot(f).await?;
    let mut c = dm_client(f).await?;
    c.send_raw(text).await?;
    match id {
        Some(id) => {
            let answer = c.wait_answer(id, WAIT).await?;
            let err = answer.expect_err("refused");
            assert_eq!(err["code"], code, "{err}");
        }
        None => {
            c.wait_for(code, WAIT, |v| !v.anonymous_errors.is_empty())
                .await?;
            assert_eq!(c.view().anonymous_errors[0]["code"], code);
        }
    }
    assert_eq!(
        snapshot(f).await?,
        before,
        "a refused message changed the session"
    );
    // Still usable.
    let ok = c.send("state_update", set("/after", json!(true))).await?;
    assert!(c.wait_answer(ok, WAIT).await?.is_ok());
    assert!(c.view().closed.is_none());
    Ok(())
}

/// The close code and error code of a refused WebSocket handshake: refused in band,
/// as the ICD says (`connection_error`, then a 4xxx close).
async fn handshake(
    f: &Fixture,
    session: &str,
    token: &str,
    session_token: &str,
) -> Result<(u16, String)> {
    match ws_open(
        "refused",
        &f.ws(0),
        session,
        token,
        session_token,
        None,
        TokenStyle::Headers,
        None,
    )
    .await?
    {
        Ok(_) => bail!("the handshake was accepted"),
        Err(r) if r.in_band => Ok((r.code, r.error_code().to_string())),
        Err(r) => bail!("refused over HTTP, not in band: {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_jwt_is_401_and_opens_no_connection() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        assert_eq!(
            handshake(f, &f.session, "", &f.session_token).await?,
            (4401, "missing_token".into())
        );
        let r = f
            .api(0, "")
            .call(
                reqwest::Method::GET,
                &format!("/api/v2/sessions/{}/state", f.session),
                None,
            )
            .await?;
        assert_eq!((r.status, r.code()), (401, "missing_token"));
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jwt_is_401() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let expired = f
            .cluster
            .auth
            .mint_access_with_exp(f.dm, Role::Dm, now_secs() - 600);
        assert_eq!(
            handshake(f, &f.session, &expired, &f.session_token).await?,
            (4401, "token_expired".into())
        );
        let r = f
            .api(0, &expired)
            .call(
                reqwest::Method::GET,
                &format!("/api/v2/sessions/{}/state", f.session),
                None,
            )
            .await?;
        assert_eq!((r.status, r.code()), (401, "token_expired"));
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_jwt_is_401() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let forger = Authority::new("not-the-cluster-secret-at-all", 3600, 0);
        let forged = forger.mint_access(f.dm, Role::Admin, 600);
        assert_eq!(
            handshake(f, &f.session, &forged, &f.session_token).await?,
            (4401, "invalid_token".into())
        );
        // A forged session token with a valid access token is refused too.
        let forged_st = forger.mint_session(f.dm, Uuid::parse_str(&f.session)?);
        assert_eq!(
            handshake(f, &f.session, &f.dm_token, &forged_st).await?,
            (4401, "invalid_token".into())
        );
        let r = f
            .api(0, &forged)
            .call(reqwest::Method::GET, "/api/v2/cluster", None)
            .await?;
        assert_eq!((r.status, r.code()), (401, "invalid_token"));
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_token_for_another_session_is_403() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        // A second session B; the DM's token for A must not open B.
        let other = f.api(0, &f.dm_token).create_session("B").await?;
        let b = other["session_id"].as_str().unwrap();
        assert_eq!(
            handshake(f, b, &f.dm_token, &f.session_token).await?,
            (4403, "wrong_session".into())
        );
        // Nor may a stranger read A's state.
        let stranger = f.cluster.token(Uuid::new_v4(), Role::Player);
        let r = f
            .api(0, &stranger)
            .call(
                reqwest::Method::GET,
                &format!("/api/v2/sessions/{}/state", f.session),
                None,
            )
            .await?;
        assert_eq!((r.status, r.code()), (403, "not_member"));
        // And an admin-only endpoint refuses a player.
        let r = f
            .api(0, &stranger)
            .call(reqwest::Method::GET, "/api/v2/cluster", None)
            .await?;
        assert_eq!((r.status, r.code()), (403, "forbidden"));
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_refused_and_the_connection_stays_usable() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        refused_then_usable(f, "{\"id\": \"oops\", ".into(), None, "malformed_json").await
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_an_unreadable_id_or_in_binary_are_invalid() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        // (A message without an `id` is an ICD client's: accepted, issue 11.)
        refused_then_usable(
            f,
            json!({"id": 5, "type": "state_update", "data": {}}).to_string(),
            None,
            "invalid_message",
        )
        .await?;
        let before = snapshot(f).await?;
        let mut c = dm_client(f).await?;
        c.send_binary(vec![1, 2, 3]).await?;
        c.wait_for("an error", WAIT, |v| !v.anonymous_errors.is_empty())
            .await?;
        assert_eq!(c.view().anonymous_errors[0]["code"], "invalid_message");
        assert_eq!(snapshot(f).await?, before);
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_is_refused() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let id = Uuid::new_v4();
        let text = json!({"id": id, "type": "teleport", "data": {}}).to_string();
        refused_then_usable(f, text, Some(id), "unknown_type").await
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_the_size_limit_is_refused() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let id = Uuid::new_v4();
        let big = "x".repeat(65 * 1024);
        let text = json!({"id": id, "type": "state_update", "data": {"changes": [{"path": "/big", "value": big}]}}).to_string();
        assert!(text.len() > 64 * 1024);
        // Too large to be read, so the error cannot name the message.
        refused_then_usable(f, text, None, "message_too_large").await
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_pointer_is_refused() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        for path in ["no-slash", "/a~2b"] {
            let id = Uuid::new_v4();
            let text = json!({"id": id, "type": "state_update", "data": {"changes": [{"path": path, "value": 1}]}}).to_string();
            refused_then_usable(f, text, Some(id), "invalid_path").await?;
        }
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_previous_is_a_conflict_and_changes_nothing() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let mut c = dm_client(f).await?;
        let id = c.send("state_update", set("/hp", json!(10))).await?;
        assert!(c.wait_answer(id, WAIT).await?.is_ok());
        // Two changes, the second guarded by a stale value: neither applies.
        let id = Uuid::new_v4();
        let text = json!({"id": id, "type": "state_update", "data": {"changes": [
            {"path": "/mp", "value": 5},
            {"path": "/hp", "value": 7, "previous": 12}
        ]}})
        .to_string();
        refused_then_usable(f, text, Some(id), "conflict").await?;
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        assert_eq!(state["state"]["hp"], 10);
        assert!(state["state"].get("mp").is_none());
        // The right previous value is accepted.
        let id = c
            .send(
                "state_update",
                json!({"changes": [{"path": "/hp", "value": 7, "previous": 10}]}),
            )
            .await?;
        assert!(c.wait_answer(id, WAIT).await?.is_ok());
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_command_id_takes_effect_once() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let mut d = dm_client(f).await?;
        let first = d.send("state_update", set("/log", json!([]))).await?;
        assert!(d.wait_answer(first, WAIT).await?.is_ok());
        let append = Uuid::new_v4();
        let msg = json!({"changes": [{"path": "/log/-", "value": "once"}]});
        d.send_with_id(append, "state_update", msg.clone()).await?;
        let v1 = d.wait_answer(append, WAIT).await?.expect("ack");
        let before = snapshot(f).await?;
        // Replayed on another connection: the original answer, no second effect.
        let mut e = dm_client(f).await?;
        e.send_with_id(append, "state_update", msg).await?;
        let v2 = e.wait_answer(append, WAIT).await?.expect("ack");
        assert_eq!(v1, v2, "the replay returns the original version");
        assert_eq!(snapshot(f).await?, before, "the replay changed nothing");
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        assert_eq!(state["state"]["log"], json!(["once"]));
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_rest_bodies_are_refused() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let before = snapshot(f).await?;
        let url = format!("{}/api/v2/sessions/{}/state", f.router(0), f.session);
        let r = f
            .http
            .post(&url)
            .bearer_auth(&f.dm_token)
            .header("content-type", "application/json")
            .body("{\"state\": ")
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 400);
        assert_eq!(r.json::<Value>().await?["error"]["code"], "malformed_json");
        let big = json!({"state": {"blob": "y".repeat(2 * 1024 * 1024)}}).to_string();
        let r = f
            .http
            .post(&url)
            .bearer_auth(&f.dm_token)
            .body(big)
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 413);
        let r = f
            .api(0, &f.dm_token)
            .call(
                reqwest::Method::POST,
                &format!("/api/v2/sessions/{}/state", f.session),
                Some(&json!({"state": 5})),
            )
            .await?;
        assert_eq!((r.status, r.code()), (400, "bad_request"));
        let r = f
            .api(0, &f.dm_token)
            .call(
                reqwest::Method::GET,
                "/api/v2/sessions/not-a-uuid/state",
                None,
            )
            .await?;
        assert_eq!((r.status, r.code()), (400, "bad_request"));
        let r = f
            .api(0, &f.dm_token)
            .call(
                reqwest::Method::GET,
                &format!("/api/v2/sessions/{}/state", Uuid::new_v4()),
                None,
            )
            .await?;
        assert_eq!((r.status, r.code()), (404, "session_not_found"));
        assert_eq!(snapshot(f).await?, before);
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_rate_limit_are_refused() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.limits.ws_messages_per_min_per_conn = 5;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let mut c = dm_client(f).await?;
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(
                c.send("state_update", set(&format!("/n{i}"), json!(i)))
                    .await?,
            );
        }
        for id in &ids[..5] {
            assert!(c.wait_answer(*id, WAIT).await?.is_ok());
        }
        let before = snapshot(f).await?;
        let err = c.wait_answer(ids[5], WAIT).await?.expect_err("limited");
        assert_eq!(err["code"], "rate_limited");
        assert!(err["details"]["retry_after_secs"].as_u64().is_some());
        assert_eq!(snapshot(f).await?, before);
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        assert!(state["state"].get("n5").is_none());
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// The presence endpoint (issue 11) refuses what `GET /state` refuses: no token,
/// a forged one, an outsider (cross-session), a bad or unknown session id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_refuses_outsiders_and_bad_ids() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let path = format!("/api/v2/sessions/{}/presence", f.session);
        let r = f.http.get(format!("{}{path}", f.router(0))).send().await?;
        assert_eq!(r.status().as_u16(), 401);
        let forged = Authority::new("not-the-cluster-secret-at-all", 3600, 0).mint_access(
            f.dm,
            Role::Admin,
            600,
        );
        let r = f
            .api(0, &forged)
            .call(reqwest::Method::GET, &path, None)
            .await?;
        assert_eq!((r.status, r.code()), (401, "invalid_token"));
        let outsider = f.cluster.token(Uuid::new_v4(), Role::Player);
        let r = f
            .api(0, &outsider)
            .call(reqwest::Method::GET, &path, None)
            .await?;
        assert_eq!((r.status, r.code()), (403, "not_member"));
        let r = f
            .api(0, &f.dm_token)
            .call(reqwest::Method::GET, "/api/v2/sessions/nope/presence", None)
            .await?;
        assert_eq!((r.status, r.code()), (400, "bad_request"));
        let r = f
            .api(0, &f.dm_token)
            .call(
                reqwest::Method::GET,
                &format!("/api/v2/sessions/{}/presence", Uuid::new_v4()),
                None,
            )
            .await?;
        assert_eq!((r.status, r.code()), (404, "session_not_found"));
        let r = f
            .api(0, &f.dm_token)
            .call(reqwest::Method::GET, &path, None)
            .await?;
        assert_eq!(r.status, 200);
        Ok(())
    }
    .await;
    finish(fx, r).await
}
