//! Authentication and live authorisation (issue 10), against real routers and nodes:
//!
//! * access tokens: `nbf` in the future refused; `iss`/`aud` checked when configured;
//!   RS256 tokens verified with a JWKS file (and ES256 with a PEM key), a token of
//!   another key refused, and a JWKS file rotated while the router runs picked up
//!   without a restart;
//! * `/metrics` and the cluster view need an admin token;
//! * an open socket is closed (`connection_error` `token_expired`, 4401) when its
//!   access or its connection token expires, and (`not_member`, 4403) when its user
//!   leaves the session, on every router, receiving nothing of the session after it.
//!
//! The keys are the test-only fixtures of `tests/fixtures/auth` (see its README).

use anyhow::{bail, Context, Result};
use cluster::client::{ws_connect, ws_open, TokenStyle, TrackedClient};
use cluster::harness::ClusterSpec;
use gs_shared::auth::{now_secs, Authority, Claims, Role};
use gs_tests::{finish, set, state_path, Fixture, WAIT};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

const ISSUER: &str = "https://auth.example.test";
const AUDIENCE: &str = "game-session-service";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/auth")
        .join(name)
}

/// A token signed with a fixture's private key.
fn sign(alg: Algorithm, kid: &str, private_pem: &str, claims: &Claims) -> Result<String> {
    let pem = std::fs::read(fixture(private_pem))?;
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem)?,
        _ => EncodingKey::from_rsa_pem(&pem)?,
    };
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_string());
    Ok(encode(&h, claims, &key)?)
}

/// Claims an external Auth Service would issue for `user`.
fn external(user: Uuid, role: Role) -> Claims {
    let mut c = Claims::new(user, role, now_secs() + 3600);
    c.iat = Some(now_secs());
    c.iss = Some(ISSUER.into());
    c.aud = Some(json!(AUDIENCE));
    c
}

/// Status and error code of `GET /state` of the fixture's session with `token`.
async fn get_state(f: &Fixture, token: &str) -> Result<(u16, String)> {
    let r = f.get(token, &state_path(&f.session)).await?;
    Ok((r.status, r.code))
}

/// A private directory for key files the test rewrites.
struct KeyDir(PathBuf);

impl KeyDir {
    fn new() -> Result<KeyDir> {
        let d = std::env::temp_dir().join(format!("gs-auth-live-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d)?;
        Ok(KeyDir(d))
    }

    /// Replaces `name` by a copy of fixture `from` atomically (write, then rename).
    fn install(&self, from: &str, name: &str) -> Result<PathBuf> {
        let target = self.0.join(name);
        let tmp = self.0.join(format!("{name}.tmp"));
        std::fs::copy(fixture(from), &tmp)?;
        std::fs::rename(&tmp, &target)?;
        Ok(target)
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_are_checked_by_issuer_audience_nbf_and_key() -> Result<()> {
    let keys = KeyDir::new()?;
    let jwks = keys.install("jwks-1.json", "jwks.json")?;
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.auth.issuer = ISSUER.into();
    spec.base.auth.audience = AUDIENCE.into();
    spec.base.auth.jwks_file = jwks.display().to_string();
    spec.base.auth.public_keys_pem = vec![fixture("ec-1.pub.pem").display().to_string()];
    // The fixture's DM token is minted by the harness with the issuer and audience.
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let dm = f.dm;
        assert_eq!(get_state(f, &f.dm_token).await?, (200, String::new()));

        // nbf: in the future refused (beyond the 5 s leeway), in the past accepted.
        let mut c = external(dm, Role::Dm);
        c.nbf = Some(now_secs() + 120);
        let early = f.cluster.auth.mint_claims(c.clone());
        assert_eq!(get_state(f, &early).await?, (401, "invalid_token".into()));
        c.nbf = Some(now_secs() - 10);
        let ok = f.cluster.auth.mint_claims(c);
        assert_eq!(get_state(f, &ok).await?.0, 200);

        // aud and iss: wrong or missing refused.
        let mut c = external(dm, Role::Dm);
        c.aud = Some(json!("another-service"));
        let wrong_aud = f.cluster.auth.mint_claims(c.clone());
        assert_eq!(
            get_state(f, &wrong_aud).await?,
            (401, "invalid_token".into())
        );
        c.aud = Some(json!([]));
        let no_aud = f.cluster.auth.mint_claims(c);
        assert_eq!(get_state(f, &no_aud).await?, (401, "invalid_token".into()));
        let mut c = external(dm, Role::Dm);
        c.iss = Some("https://evil.example.test".into());
        let wrong_iss = f.cluster.auth.mint_claims(c);
        assert_eq!(
            get_state(f, &wrong_iss).await?,
            (401, "invalid_token".into())
        );

        // RS256 with the JWKS file's key; ES256 with the PEM key (kid = file name).
        let rs = sign(
            Algorithm::RS256,
            "test-rsa-1",
            "rsa-1.key.pem",
            &external(dm, Role::Dm),
        )?;
        assert_eq!(get_state(f, &rs).await?.0, 200);
        let es = sign(
            Algorithm::ES256,
            "ec-1",
            "ec-1.key.pem",
            &external(dm, Role::Dm),
        )?;
        assert_eq!(get_state(f, &es).await?.0, 200);
        // ... and it opens a WebSocket like any access token.
        let ws = ws_connect(
            &f.ws(0),
            &f.session,
            &rs,
            &f.session_token,
            None,
            TokenStyle::Headers,
            None,
        )
        .await?;
        let c = TrackedClient::new("rs256", ws, true, None);
        c.wait_for("established", WAIT, |v| v.established.is_some())
            .await?;
        // Refused: signed by a key that is not in the set (under a known kid), a kid
        // not in the set yet, and the RS256 token with the wrong audience.
        let forged = sign(
            Algorithm::RS256,
            "test-rsa-1",
            "rsa-other.key.pem",
            &external(dm, Role::Dm),
        )?;
        assert_eq!(get_state(f, &forged).await?, (401, "invalid_token".into()));
        let next = sign(
            Algorithm::RS256,
            "test-rsa-2",
            "rsa-2.key.pem",
            &external(dm, Role::Dm),
        )?;
        assert_eq!(get_state(f, &next).await?, (401, "invalid_token".into()));
        let mut c = external(dm, Role::Dm);
        c.aud = Some(json!("another-service"));
        let rs_wrong_aud = sign(Algorithm::RS256, "test-rsa-1", "rsa-1.key.pem", &c)?;
        assert_eq!(
            get_state(f, &rs_wrong_aud).await?,
            (401, "invalid_token".into())
        );

        // Rotation: the Auth Service publishes a set with a new key; the running
        // router accepts the new kid without a restart (bounded: it checks the file
        // at most every auth.keys_check_ms, and on an unknown kid at most once a
        // second).
        keys.install("jwks-2.json", "jwks.json")?;
        let deadline = Instant::now() + WAIT;
        loop {
            match get_state(f, &next).await? {
                (200, _) => break,
                (401, code) if code == "invalid_token" && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                other => bail!("the rotated key was not accepted: {other:?}"),
            }
        }
        // The old key still works; a key outside the set still does not.
        assert_eq!(get_state(f, &rs).await?.0, 200);
        assert_eq!(get_state(f, &forged).await?, (401, "invalid_token".into()));
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_cluster_view_need_an_admin_token() -> Result<()> {
    let fx = Fixture::start(1, 1, false).await?;
    let f = &fx;
    let r = async {
        let get = |path: &'static str, token: Option<String>| {
            let mut req = f.http.get(format!("{}{path}", f.router(0)));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            async move {
                let r = req.send().await?;
                let status = r.status().as_u16();
                let text = r.text().await?;
                Ok::<_, anyhow::Error>((status, text))
            }
        };
        let code = |text: &str| -> String {
            serde_json::from_str::<Value>(text).unwrap_or_default()["error"]["code"]
                .as_str()
                .unwrap_or("")
                .to_string()
        };
        let player = f.cluster.token(Uuid::new_v4(), Role::Player);
        for path in ["/metrics", "/api/v2/cluster"] {
            let (s, t) = get(path, None).await?;
            assert_eq!((s, code(&t).as_str()), (401, "missing_token"), "{path}");
            let (s, t) = get(path, Some("not-a-token".into())).await?;
            assert_eq!((s, code(&t).as_str()), (401, "invalid_token"), "{path}");
            let (s, t) = get(path, Some(player.clone())).await?;
            assert_eq!((s, code(&t).as_str()), (403, "forbidden"), "{path}");
        }
        let (s, t) = get("/metrics", Some(f.cluster.admin_token())).await?;
        assert_eq!(s, 200, "{t}");
        assert!(t.contains("gs_router_"), "Prometheus text expected: {t}");
        let (s, _) = get("/api/v2/cluster", Some(f.cluster.admin_token())).await?;
        assert_eq!(s, 200);
        // Health stays open (load balancers probe it).
        assert_eq!(get("/health/live", None).await?.0, 200);
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// Waits for the `connection_error` and the close of a socket whose authorisation
/// ended; returns (error code, close code).
async fn revoked(c: &TrackedClient) -> Result<(String, u16)> {
    c.wait_for("the close", WAIT, |v| v.closed.is_some())
        .await?;
    let v = c.view();
    let code = v
        .connection_error
        .as_ref()
        .and_then(|e| e["code"].as_str())
        .context("no connection_error before the close")?
        .to_string();
    // The connection_error is the last frame before the close.
    let last = v.frames.last().context("no frames")?;
    assert_eq!(last["type"], "connection_error", "{last}");
    Ok((code, v.closed.as_ref().map(|c| c.0).unwrap_or(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_closed_when_a_token_expires() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.auth.leeway_secs = 0;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        // An access token that expires in a few seconds (the connection token lasts).
        let short_access = f
            .cluster
            .auth
            .mint_access_with_exp(f.dm, Role::Dm, now_secs() + 4);
        let mut a = f
            .connect(0, "short-access", &short_access, &f.session_token)
            .await?;
        // A connection token that expires in a few seconds (the access token lasts).
        let short_ttl = Authority::new(&f.cluster.base.auth.jwt_secret, 4, 0);
        let sid = Uuid::parse_str(&f.session)?;
        let mut b = f
            .connect(
                0,
                "short-session",
                &f.dm_token,
                &short_ttl.mint_session(f.dm, sid),
            )
            .await?;
        // A socket with lasting tokens, to see that only the expired ones close.
        let mut c = f
            .connect(0, "lasting", &f.dm_token, &f.session_token)
            .await?;

        // While the tokens are valid the sockets work.
        for cl in [&mut a, &mut b] {
            let id = cl.send("state_update", set("/before", json!(true))).await?;
            assert!(cl.wait_answer(id, WAIT).await?.is_ok());
        }
        for cl in [&a, &b] {
            assert_eq!(revoked(cl).await?, ("token_expired".into(), 4401));
        }
        // Closed: nothing more can be sent through them; the lasting one still works.
        let id = c.send("state_update", set("/after", json!(true))).await?;
        let after = c.wait_answer(id, WAIT).await?.expect("acked");
        assert!(c.view().closed.is_none());
        for cl in [&a, &b] {
            assert!(
                cl.view().version < after,
                "{}: got an event after expiry",
                cl.name
            );
        }
        // A new socket with the expired token is refused at the handshake (in band:
        // `connection_error` `token_expired`, close 4401).
        let again = ws_open(
            "again",
            &f.ws(0),
            &f.session,
            &short_access,
            &f.session_token,
            None,
            TokenStyle::Headers,
            None,
        )
        .await?;
        match again {
            Ok(_) => anyhow::bail!("an expired token opened a socket"),
            Err(r) => assert_eq!(
                (r.in_band, r.code, r.error_code()),
                (true, 4401, "token_expired")
            ),
        }
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_leaves_is_disconnected_on_every_router() -> Result<()> {
    let fx = Fixture::start(1, 2, false).await?;
    let f = &fx;
    let r = async {
        let (player, token, st) = f.player(0, json!({})).await?;
        let mut p0 = f.connect(0, "player@router-1", &token, &st).await?;
        let p1 = f.connect(1, "player@router-2", &token, &st).await?;
        let mut dm = f.connect(1, "dm", &f.dm_token, &f.session_token).await?;
        // Everyone follows the session.
        let id = dm.send("state_update", set("/round", json!(1))).await?;
        let v1 = dm.wait_answer(id, WAIT).await?.expect("acked");
        for c in [&p0, &p1] {
            c.wait_for("the update", WAIT, |v| v.version >= v1).await?;
        }

        // The player leaves through router 1.
        let leave = p0.send("leave", json!({})).await?;
        let left_at = p0.wait_answer(leave, WAIT).await?.expect("leave acked");
        for c in [&p0, &p1] {
            assert_eq!(revoked(c).await?, ("not_member".into(), 4403), "{}", c.name);
            let v = c.view();
            // Their own departure is the last event they got.
            assert_eq!(
                v.events.last(),
                Some(&(left_at, "player_left".into())),
                "{}",
                c.name
            );
        }
        let left = p1
            .view()
            .frames
            .iter()
            .find(|m| m["type"] == "player_left")
            .cloned()
            .context("player_left")?;
        assert_eq!(left["data"]["user_id"], json!(player));

        // The session goes on without them: nothing after the departure reaches them.
        let id = dm.send("state_update", set("/round", json!(2))).await?;
        let v2 = dm.wait_answer(id, WAIT).await?.expect("acked");
        dm.wait_for("its own update", WAIT, |v| v.version >= v2)
            .await?;
        assert!(dm.view().closed.is_none(), "the DM stays connected");
        for c in [&p0, &p1] {
            let v = c.view();
            assert!(
                v.events.iter().all(|(ver, _)| *ver <= left_at),
                "{} received events after leaving: {:?}",
                c.name,
                v.events
            );
        }

        // Their old tokens no longer open the session.
        let ws = ws_connect(
            &f.ws(0),
            &f.session,
            &token,
            &st,
            None,
            TokenStyle::Headers,
            None,
        )
        .await?;
        let again = TrackedClient::new("again", ws, true, None);
        again
            .wait_for("the refusal", WAIT, |v| v.closed.is_some())
            .await?;
        let v = again.view();
        assert_eq!(
            v.connection_error.as_ref().map(|e| e["code"].clone()),
            Some(json!("not_member"))
        );
        assert!(v.events.is_empty());
        drop(dm);
        Ok(())
    }
    .await;
    finish(fx, r).await
}
