//! Bad input (issue 2): each kind is a case with a specific error code, leaves the
//! connection usable where that is safe, and changes nothing (same version, same
//! stored events).
//!
//! The cases share one cluster and run side by side, each on a session (and DM) of
//! its own ([`CASES`]); only the rate-limit case needs a cluster configured for it.

use anyhow::{bail, Context, Result};
use cluster::client::{ws_open, Api, TokenStyle, TrackedClient};
use cluster::harness::ClusterSpec;
use futures::future::LocalBoxFuture;
use gs_shared::auth::{now_secs, Authority, Role};
use gs_tests::{finish, set, state_path, Fixture, Table, WAIT};
use serde_json::{json, Value};
use std::ops::Deref;
use uuid::Uuid;

/// One case: its own session on the shared cluster.
struct Case<'a> {
    f: &'a Fixture,
    table: Table,
}

impl Deref for Case<'_> {
    type Target = Table;
    fn deref(&self) -> &Table {
        &self.table
    }
}

impl Case<'_> {
    /// REST as `token` through router 0.
    fn api(&self, token: &str) -> Api {
        self.f.api(0, token)
    }

    /// What must not change: the session's version and its stored events.
    async fn snapshot(&self) -> Result<(Value, i64)> {
        let s = self.api(&self.dm_token).get_state(&self.session).await?;
        let stored = self.f.stored_event_count_of(&self.session).await?;
        Ok((s["version"].clone(), stored))
    }

    async fn dm_client(&self) -> Result<TrackedClient> {
        let (f, s) = (self.f, &self.session);
        f.connect_to(0, "dm", s, &self.dm_token, &self.session_token)
            .await
    }

    /// Sends `text`, expects an error with `code` (and the message id when it had
    /// one), then proves the connection still works and that nothing changed.
    async fn refused_then_usable(&self, text: String, id: Option<Uuid>, code: &str) -> Result<()> {
        let before = self.snapshot().await?;
        let mut c = self.dm_client().await?;
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
            self.snapshot().await?,
            before,
            "a refused message changed the session"
        );
        // Still usable.
        let ok = c.send("state_update", set("/after", json!(true))).await?;
        assert!(c.wait_answer(ok, WAIT).await?.is_ok());
        assert!(c.view().closed.is_none());
        Ok(())
    }

    /// The close code and error code of a refused WebSocket handshake: refused in
    /// band, as the ICD says (`connection_error`, then a 4xxx close).
    async fn handshake(
        &self,
        session: &str,
        token: &str,
        session_token: &str,
    ) -> Result<(u16, String)> {
        match ws_open(
            "refused",
            &self.f.ws(0),
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
}

type CaseFn = for<'a> fn(&'a Case<'a>) -> LocalBoxFuture<'a, Result<()>>;

/// Every case that can share the cluster: (name, case).
const CASES: &[(&str, CaseFn)] = &[
    ("missing_jwt_is_401_and_opens_no_connection", |c| {
        Box::pin(missing_jwt(c))
    }),
    ("expired_jwt_is_401", |c| Box::pin(expired_jwt(c))),
    ("forged_jwt_is_401", |c| Box::pin(forged_jwt(c))),
    ("session_token_for_another_session_is_403", |c| {
        Box::pin(token_for_another_session(c))
    }),
    (
        "malformed_json_is_refused_and_the_connection_stays_usable",
        |c| Box::pin(malformed_json(c)),
    ),
    (
        "messages_with_an_unreadable_id_or_in_binary_are_invalid",
        |c| Box::pin(unreadable_id_or_binary(c)),
    ),
    ("unknown_type_is_refused", |c| Box::pin(unknown_type(c))),
    ("message_over_the_size_limit_is_refused", |c| {
        Box::pin(over_the_size_limit(c))
    }),
    ("bad_json_pointer_is_refused", |c| {
        Box::pin(bad_json_pointer(c))
    }),
    ("stale_previous_is_a_conflict_and_changes_nothing", |c| {
        Box::pin(stale_previous(c))
    }),
    ("a_replayed_command_id_takes_effect_once", |c| {
        Box::pin(replayed_command_id(c))
    }),
    ("malformed_and_oversized_rest_bodies_are_refused", |c| {
        Box::pin(bad_rest_bodies(c))
    }),
    ("presence_refuses_outsiders_and_bad_ids", |c| {
        Box::pin(presence_refusals(c))
    }),
    ("service_requests_refuse_players_and_bad_payloads", |c| {
        Box::pin(service_request_refusals(c))
    }),
];

/// Runs every case of [`CASES`] at once on one cluster, each on its own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let runs = CASES.iter().map(|(name, case)| async move {
            let c = Case {
                f,
                table: f.table().await?,
            };
            case(&c).await.with_context(|| format!("case {name}"))
        });
        let failed: Vec<String> = futures::future::join_all(runs)
            .await
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        anyhow::ensure!(
            failed.is_empty(),
            "{} of {} cases failed:\n{}",
            failed.len(),
            CASES.len(),
            failed.join("\n")
        );
        Ok(())
    }
    .await;
    finish(fx, r).await
}

async fn missing_jwt(c: &Case<'_>) -> Result<()> {
    assert_eq!(
        c.handshake(&c.session, "", &c.session_token).await?,
        (4401, "missing_token".into())
    );
    let r = c.f.get("", &state_path(&c.session)).await?;
    assert_eq!(r, (401, "missing_token"));
    Ok(())
}

async fn expired_jwt(c: &Case<'_>) -> Result<()> {
    let expired =
        c.f.cluster
            .auth
            .mint_access_with_exp(c.dm, Role::Dm, now_secs() - 600);
    assert_eq!(
        c.handshake(&c.session, &expired, &c.session_token).await?,
        (4401, "token_expired".into())
    );
    let r = c.f.get(&expired, &state_path(&c.session)).await?;
    assert_eq!(r, (401, "token_expired"));
    Ok(())
}

async fn forged_jwt(c: &Case<'_>) -> Result<()> {
    let forger = Authority::new("not-the-cluster-secret-at-all", 3600, 0);
    let forged = forger.mint_access(c.dm, Role::Admin, 600);
    assert_eq!(
        c.handshake(&c.session, &forged, &c.session_token).await?,
        (4401, "invalid_token".into())
    );
    // A forged session token with a valid access token is refused too.
    let forged_st = forger.mint_session(c.dm, Uuid::parse_str(&c.session)?);
    assert_eq!(
        c.handshake(&c.session, &c.dm_token, &forged_st).await?,
        (4401, "invalid_token".into())
    );
    let r = c.f.get(&forged, "/api/v2/cluster").await?;
    assert_eq!(r, (401, "invalid_token"));
    Ok(())
}

async fn token_for_another_session(c: &Case<'_>) -> Result<()> {
    // A second session B; the DM's token for A must not open B.
    let other = c.api(&c.dm_token).create_session("B").await?;
    let b = other["session_id"].as_str().unwrap();
    assert_eq!(
        c.handshake(b, &c.dm_token, &c.session_token).await?,
        (4403, "wrong_session".into())
    );
    // Nor may a stranger read A's state.
    let stranger = c.f.cluster.token(Uuid::new_v4(), Role::Player);
    let r = c.f.get(&stranger, &state_path(&c.session)).await?;
    assert_eq!(r, (403, "not_member"));
    // And an admin-only endpoint refuses a player.
    let r = c.f.get(&stranger, "/api/v2/cluster").await?;
    assert_eq!(r, (403, "forbidden"));
    Ok(())
}

async fn malformed_json(c: &Case<'_>) -> Result<()> {
    let text = "{\"id\": \"oops\", ".to_string();
    c.refused_then_usable(text, None, "malformed_json").await
}

async fn unreadable_id_or_binary(c: &Case<'_>) -> Result<()> {
    // (A message without an `id` is an ICD client's: accepted, issue 11.)
    let text = json!({"id": 5, "type": "state_update", "data": {}}).to_string();
    c.refused_then_usable(text, None, "invalid_message").await?;
    let before = c.snapshot().await?;
    let mut d = c.dm_client().await?;
    d.send_binary(vec![1, 2, 3]).await?;
    d.wait_for("an error", WAIT, |v| !v.anonymous_errors.is_empty())
        .await?;
    assert_eq!(d.view().anonymous_errors[0]["code"], "invalid_message");
    assert_eq!(c.snapshot().await?, before);
    Ok(())
}

async fn unknown_type(c: &Case<'_>) -> Result<()> {
    let id = Uuid::new_v4();
    let text = json!({"id": id, "type": "teleport", "data": {}}).to_string();
    c.refused_then_usable(text, Some(id), "unknown_type").await
}

async fn over_the_size_limit(c: &Case<'_>) -> Result<()> {
    let id = Uuid::new_v4();
    let big = "x".repeat(65 * 1024);
    let text = json!({"id": id, "type": "state_update", "data": {"changes": [{"path": "/big", "value": big}]}}).to_string();
    assert!(text.len() > 64 * 1024);
    // Too large to be read, so the error cannot name the message.
    c.refused_then_usable(text, None, "message_too_large").await
}

async fn bad_json_pointer(c: &Case<'_>) -> Result<()> {
    for path in ["no-slash", "/a~2b"] {
        let id = Uuid::new_v4();
        let text = json!({"id": id, "type": "state_update", "data": {"changes": [{"path": path, "value": 1}]}}).to_string();
        c.refused_then_usable(text, Some(id), "invalid_path")
            .await?;
    }
    Ok(())
}

async fn stale_previous(c: &Case<'_>) -> Result<()> {
    let mut d = c.dm_client().await?;
    let id = d.send("state_update", set("/hp", json!(10))).await?;
    assert!(d.wait_answer(id, WAIT).await?.is_ok());
    // Two changes, the second guarded by a stale value: neither applies.
    let id = Uuid::new_v4();
    let text = json!({"id": id, "type": "state_update", "data": {"changes": [
        {"path": "/mp", "value": 5},
        {"path": "/hp", "value": 7, "previous": 12}
    ]}})
    .to_string();
    c.refused_then_usable(text, Some(id), "conflict").await?;
    let state = c.api(&c.dm_token).get_state(&c.session).await?;
    assert_eq!(state["state"]["hp"], 10);
    assert!(state["state"].get("mp").is_none());
    // The right previous value is accepted.
    let id = d
        .send(
            "state_update",
            json!({"changes": [{"path": "/hp", "value": 7, "previous": 10}]}),
        )
        .await?;
    assert!(d.wait_answer(id, WAIT).await?.is_ok());
    Ok(())
}

async fn replayed_command_id(c: &Case<'_>) -> Result<()> {
    let mut d = c.dm_client().await?;
    let first = d.send("state_update", set("/log", json!([]))).await?;
    assert!(d.wait_answer(first, WAIT).await?.is_ok());
    let append = Uuid::new_v4();
    let msg = json!({"changes": [{"path": "/log/-", "value": "once"}]});
    d.send_with_id(append, "state_update", msg.clone()).await?;
    let v1 = d.wait_answer(append, WAIT).await?.expect("ack");
    let before = c.snapshot().await?;
    // Replayed on another connection: the original answer, no second effect.
    let mut e = c.dm_client().await?;
    e.send_with_id(append, "state_update", msg).await?;
    let v2 = e.wait_answer(append, WAIT).await?.expect("ack");
    assert_eq!(v1, v2, "the replay returns the original version");
    assert_eq!(c.snapshot().await?, before, "the replay changed nothing");
    let state = c.api(&c.dm_token).get_state(&c.session).await?;
    assert_eq!(state["state"]["log"], json!(["once"]));
    Ok(())
}

async fn bad_rest_bodies(c: &Case<'_>) -> Result<()> {
    let f = c.f;
    let before = c.snapshot().await?;
    let url = format!("{}{}", f.router(0), state_path(&c.session));
    let r = f
        .http
        .post(&url)
        .bearer_auth(&c.dm_token)
        .header("content-type", "application/json")
        .body("{\"state\": ")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().await?["error"]["code"], "malformed_json");
    // An oversized body is refused on its declared length, before it is read: the
    // router answers 413 and closes. (A client still writing the body may see that
    // close as a reset, so the request is written by hand, headers only.)
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        state_path(&c.session),
        c.dm_token,
        2 * 1024 * 1024
    );
    let (status, body) = raw_http(&f.router(0), &head).await?;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("message_too_large"), "{body}");
    let post = reqwest::Method::POST;
    let body = json!({"state": 5});
    let r = f
        .rest(&c.dm_token, post, &state_path(&c.session), Some(&body))
        .await?;
    assert_eq!(r, (400, "bad_request"));
    let r = f.get(&c.dm_token, &state_path("not-a-uuid")).await?;
    assert_eq!(r, (400, "bad_request"));
    let r = f
        .get(&c.dm_token, &state_path(&Uuid::new_v4().to_string()))
        .await?;
    assert_eq!(r, (404, "session_not_found"));
    assert_eq!(c.snapshot().await?, before);
    Ok(())
}

/// Writes `head` (a request without its body) to the router at `base` and reads the
/// answer: (status, headers and body as text).
async fn raw_http(base: &str, head: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if complete(&answer) {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .context("no answer to the raw request")?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    Ok((status, text))
}

/// Whether `answer` holds a whole HTTP response (headers and `content-length` bytes).
fn complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let length = text[..end]
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    answer.len() >= end + 4 + length
}

/// The presence endpoint (issue 11) refuses what `GET /state` refuses: no token,
/// a forged one, an outsider (cross-session), a bad or unknown session id.
async fn presence_refusals(c: &Case<'_>) -> Result<()> {
    let f = c.f;
    let path = format!("/api/v2/sessions/{}/presence", c.session);
    let r = f.http.get(format!("{}{path}", f.router(0))).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    let forged = Authority::new("not-the-cluster-secret-at-all", 3600, 0).mint_access(
        c.dm,
        Role::Admin,
        600,
    );
    assert_eq!(f.get(&forged, &path).await?, (401, "invalid_token"));
    let outsider = f.cluster.token(Uuid::new_v4(), Role::Player);
    assert_eq!(f.get(&outsider, &path).await?, (403, "not_member"));
    let r = f.get(&c.dm_token, "/api/v2/sessions/nope/presence").await?;
    assert_eq!(r, (400, "bad_request"));
    let unknown = format!("/api/v2/sessions/{}/presence", Uuid::new_v4());
    assert_eq!(
        f.get(&c.dm_token, &unknown).await?,
        (404, "session_not_found")
    );
    assert_eq!(f.get(&c.dm_token, &path).await?.status, 200);
    Ok(())
}

/// `narrate`, `monster_decide` and `map_request` (issue 12): bad payloads and a
/// player's request are refused with their codes, and nothing is asked of the other
/// services (no event, so no request).
async fn service_request_refusals(c: &Case<'_>) -> Result<()> {
    let bad = [
        ("narrate", json!({"prompt": ""}), "invalid_payload"),
        (
            "narrate",
            json!({"prompt": "x".repeat(2001)}),
            "invalid_payload",
        ),
        ("narrate", json!({}), "invalid_payload"),
        (
            "monster_decide",
            json!({"character_id": Uuid::new_v4()}),
            "unknown_character",
        ),
        (
            "map_request",
            json!({"description": "a field", "grid": {"width": 0, "height": 20}}),
            "invalid_payload",
        ),
        (
            "map_request",
            json!({"description": "a field", "grid": {"width": 30, "height": 201}}),
            "invalid_payload",
        ),
    ];
    for (kind, data, code) in bad {
        let id = Uuid::new_v4();
        let text = json!({"id": id, "type": kind, "data": data}).to_string();
        c.refused_then_usable(text, Some(id), code)
            .await
            .with_context(|| kind.to_string())?;
    }
    // A player may not ask for narration or maps.
    let user = Uuid::new_v4();
    let token = c.f.cluster.token(user, Role::Player);
    let joined = c.api(&token).join(&c.session, json!({})).await?;
    let st = joined["connection_token"]
        .as_str()
        .context("connection_token")?;
    let mut p = c.f.connect_to(0, "player", &c.session, &token, st).await?;
    let before_requests = c.snapshot().await?;
    for (kind, data) in [
        ("narrate", json!({"prompt": "the end"})),
        (
            "map_request",
            json!({"description": "a field", "grid": {"width": 3, "height": 3}}),
        ),
    ] {
        let id = p.send(kind, data).await?;
        let err = p.wait_answer(id, WAIT).await?.expect_err("refused");
        assert_eq!(err["code"], "forbidden_for_role", "{kind}: {err}");
    }
    assert_eq!(c.snapshot().await?, before_requests);
    Ok(())
}

/// The one case that needs its own cluster: a low per-connection message limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_rate_limit_are_refused() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.limits.ws_messages_per_min_per_conn = 5;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let table = Table {
            dm: f.dm,
            dm_token: f.dm_token.clone(),
            session: f.session.clone(),
            session_token: f.session_token.clone(),
        };
        let c = Case { f, table };
        let mut d = c.dm_client().await?;
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(
                d.send("state_update", set(&format!("/n{i}"), json!(i)))
                    .await?,
            );
        }
        for id in &ids[..5] {
            assert!(d.wait_answer(*id, WAIT).await?.is_ok());
        }
        let before = c.snapshot().await?;
        let err = d.wait_answer(ids[5], WAIT).await?.expect_err("limited");
        assert_eq!(err["code"], "rate_limited");
        assert!(err["details"]["retry_after_secs"].as_u64().is_some());
        assert_eq!(c.snapshot().await?, before);
        let state = c.api(&c.dm_token).get_state(&c.session).await?;
        assert!(state["state"].get("n5").is_none());
        Ok(())
    }
    .await;
    finish(fx, r).await
}
