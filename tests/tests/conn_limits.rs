//! Connection limits that hold (issue 10): WebSockets count against
//! `router.max_connections` for their whole life; caps on open sockets per user and per
//! IP, given back on every exit path; the HTTP server's header-read timeout; the idle
//! WebSocket timeout; and the slow-reader policy (a client that does not read is
//! closed, the other clients of its session are not slowed).

use anyhow::{bail, Context, Result};
use cluster::client::{client_ws_config, ws_open, TokenStyle, TrackedClient, WsStream};
use cluster::harness::ClusterSpec;
use futures::StreamExt;
use gs_tests::{finish, set, state_path, Fixture, WAIT};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Opens a WebSocket through router `i`: a client on the open socket, or the
/// refusal's close code (in band, as the ICD says) and error.
async fn try_connect(
    f: &Fixture,
    i: usize,
    token: &str,
    session_token: &str,
) -> Result<std::result::Result<TrackedClient, (u16, Value)>> {
    let r = ws_open(
        "client",
        &f.ws(i),
        &f.session,
        token,
        session_token,
        None,
        TokenStyle::Headers,
        None,
    )
    .await?;
    Ok(match r {
        Ok(c) => Ok(c),
        Err(r) => {
            anyhow::ensure!(r.in_band, "refused over HTTP, not in band: {r:?}");
            Err((r.code, r.error))
        }
    })
}

/// Expects the handshake to be refused with `status` and `too_many_connections`
/// naming `scope`.
async fn expect_refused(
    f: &Fixture,
    i: usize,
    token: &str,
    session_token: &str,
    status: u16,
    scope: &str,
) -> Result<()> {
    match try_connect(f, i, token, session_token).await? {
        Ok(_) => bail!("a socket over the {scope} cap was accepted"),
        Err((s, err)) => {
            assert_eq!(s, status, "{err}");
            assert_eq!(err["code"], "too_many_connections", "{err}");
            assert_eq!(err["details"]["scope"], scope, "{err}");
        }
    }
    Ok(())
}

/// A tracked client on an open socket, after its first full sync.
async fn tracked(name: &str, c: TrackedClient) -> Result<TrackedClient> {
    let mut c = c;
    c.name = name.to_string();
    c.wait_for("connection_established and initial state", WAIT, |v| {
        v.established.is_some() && v.syncs > 0
    })
    .await?;
    Ok(c)
}

/// Closes a client's socket and waits until the router has closed its side.
async fn close(c: &mut TrackedClient) -> Result<()> {
    c.close().await;
    c.wait_for("the socket to close", WAIT, |v| v.closed.is_some())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_hold_their_place_under_max_connections() -> Result<()> {
    const N: usize = 3;
    let mut spec = ClusterSpec::test(1, 2);
    spec.base.router.max_connections = N;
    // The session is made through router 0; router 1 serves only the sockets below.
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let mut open = vec![];
        for i in 0..N {
            let ws = try_connect(f, 1, &f.dm_token, &f.session_token)
                .await?
                .map_err(|e| anyhow::anyhow!("socket {i} refused: {e:?}"))?;
            open.push(tracked(&format!("dm-{i}"), ws).await?);
        }
        // N sockets are open (upgraded long ago): the next connection is over the
        // limit, and so is a plain HTTP request.
        expect_refused(f, 1, &f.dm_token, &f.session_token, 4503, "router").await?;
        let get = reqwest::Method::GET;
        let r = f
            .rest_via(1, &f.dm_token, get, &state_path(&f.session), None)
            .await?;
        assert_eq!(r, (503, "too_many_connections"));
        // One socket closes: its place is free again.
        close(&mut open[0]).await?;
        let ws = try_connect(f, 1, &f.dm_token, &f.session_token)
            .await?
            .map_err(|e| anyhow::anyhow!("refused after a socket closed: {e:?}"))?;
        let again = tracked("dm-again", ws).await?;
        assert!(again.view().closed.is_none());
        // The open sockets still work.
        let id = open[1].send("heartbeat", json!({})).await?;
        assert!(open[1].wait_answer(id, WAIT).await?.is_ok());
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sockets_are_capped_per_user_and_per_ip() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.router.max_sockets_per_user = 2;
    spec.base.router.max_sockets_per_ip = 4;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let (_, a_token, a_st) = f.player(0, json!({})).await?;
        let (_, b_token, b_st) = f.player(0, json!({})).await?;
        let connect = |name: &'static str, token: String, st: String| async move {
            let ws = try_connect(f, 0, &token, &st)
                .await?
                .map_err(|e| anyhow::anyhow!("{name} refused: {e:?}"))?;
            tracked(name, ws).await
        };
        let mut dm1 = connect("dm-1", f.dm_token.clone(), f.session_token.clone()).await?;
        let _dm2 = connect("dm-2", f.dm_token.clone(), f.session_token.clone()).await?;
        // The DM's third socket: over the per-user cap.
        expect_refused(f, 0, &f.dm_token, &f.session_token, 4429, "user").await?;
        let _a1 = connect("a-1", a_token.clone(), a_st.clone()).await?;
        let _a2 = connect("a-2", a_token.clone(), a_st.clone()).await?;
        // Four sockets from 127.0.0.1: B's first is over the per-IP cap.
        expect_refused(f, 0, &b_token, &b_st, 4429, "ip").await?;
        // A refused handshake took no place: the DM closes one socket, and B gets in.
        close(&mut dm1).await?;
        let mut b1 = connect("b-1", b_token.clone(), b_st.clone()).await?;
        expect_refused(f, 0, &f.dm_token, &f.session_token, 4429, "ip").await?;
        close(&mut b1).await?;

        // Sockets that fail after the upgrade give their place back too: B leaves the
        // session; each of its next sockets is refused by the owner (not_member).
        let mut b = connect("b-leaving", b_token.clone(), b_st.clone()).await?;
        let id = b.send("leave", json!({})).await?;
        assert!(b.wait_answer(id, WAIT).await?.is_ok());
        close(&mut b).await?;
        for i in 0..3 {
            match try_connect(f, 0, &b_token, &b_st).await? {
                Ok(_) => bail!("attempt {i}: a non-member's socket was accepted"),
                Err((code, e)) => {
                    assert_eq!((code, e["code"].clone()), (4403, json!("not_member")));
                }
            }
        }
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_cut_off_by_the_header_read_timeout() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.router.header_read_timeout_ms = 500;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let addr = f
            .router(0)
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        // Half a request line, then nothing.
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(b"GET /health/live HT").await?;
        let mut got = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
            .await
            .context("the router kept a half-sent request open")?;
        // Closed (EOF, or a reset): never answered.
        if let Ok(n) = read {
            assert_eq!(n, 0, "{}", String::from_utf8_lossy(&got));
        }
        // A keep-alive connection left idle after its answer is closed the same way.
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(b"GET /health/live HTTP/1.1\r\nHost: router\r\n\r\n")
            .await?;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
            .await
            .context("the router kept an idle keep-alive connection open")?;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        Ok(())
    }
    .await;
    finish(fx, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_is_closed_for_idleness() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.router.ws_idle_timeout_ms = 1500;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let (_, token, st) = f.player(0, json!({})).await?;
        let silent = f
            .connect(0, "silent", &f.dm_token, &f.session_token)
            .await?;
        let mut talker = f.connect(0, "talker", &token, &st).await?;
        // The talker sends a heartbeat every 300 ms (a fifth of the timeout) while the
        // silent client sends nothing.
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        let mut acks = vec![];
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                tick.tick().await;
                acks.push(talker.send("heartbeat", json!({})).await?);
                if silent.view().closed.is_some() {
                    return anyhow::Ok(());
                }
            }
        })
        .await;
        closed.context("the silent client was not closed")??;
        let v = silent.view();
        assert_eq!(v.closed, Some((4408, "idle_timeout".to_string())));
        assert_eq!(
            v.connection_error.as_ref().map(|e| e["code"].clone()),
            Some(json!("idle_timeout")),
            "{:?}",
            v.connection_error
        );
        // The talker stays open for two more idle periods.
        for _ in 0..10 {
            tick.tick().await;
            acks.push(talker.send("heartbeat", json!({})).await?);
        }
        for id in acks {
            assert!(talker.wait_answer(id, WAIT).await?.is_ok());
        }
        assert!(talker.view().closed.is_none(), "{:?}", talker.view().closed);
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// A raw client socket with a small receive buffer (so a client that stops reading
/// fills its TCP window quickly).
async fn slow_socket(f: &Fixture, token: &str, session_token: &str) -> Result<WsStream> {
    let base = f.ws(0);
    let addr = base.trim_start_matches("ws://").trim_end_matches('/');
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    let stream = sock.connect(addr.parse()?).await?;
    let mut req = format!("{base}/api/v2/sessions/{}/ws", f.session).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    req.headers_mut()
        .insert("x-session-token", session_token.parse()?);
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(
            req,
            tokio_tungstenite::MaybeTlsStream::Plain(stream),
            Some(client_ws_config()),
        ),
    )
    .await
    .context("slow client: connect timed out")??;
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_closed_and_slows_nobody() -> Result<()> {
    const MAX_BEHIND: u64 = 16;
    const ROUND: usize = 20;
    const MAX_ROUNDS: usize = 40;
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.router.max_outbound_queue = MAX_BEHIND;
    // One socket per user: the slow client's slot is visibly freed when it is closed.
    spec.base.router.max_sockets_per_user = 1;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let (_, obs_token, obs_st) = f.player(0, json!({})).await?;
        let (_, slow_token, slow_st) = f.player(0, json!({})).await?;
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let observer = f.connect(0, "observer", &obs_token, &obs_st).await?;
        let mut slow = slow_socket(f, &slow_token, &slow_st).await?;
        // The slow client reads its welcome, then stops reading.
        tokio::time::timeout(WAIT, async {
            while let Some(m) = slow.next().await {
                if let Message::Text(t) = m? {
                    if t.contains("\"sync_response\"") {
                        return anyhow::Ok(());
                    }
                }
            }
            bail!("slow client: closed before its first sync")
        })
        .await
        .context("slow client: no first sync")??;

        // The DM floods 4 KiB updates in rounds; after each round, the slow user tries a
        // second socket: refused while the slow socket holds the user's only slot.
        let blob = "x".repeat(4096);
        let mut last = 0;
        let mut freed = None;
        for round in 0..MAX_ROUNDS {
            let mut ids = vec![];
            for _ in 0..ROUND {
                ids.push(dm.send("state_update", set("/blob", json!(blob))).await?);
            }
            for id in ids {
                let v = dm
                    .wait_answer(id, WAIT)
                    .await?
                    .map_err(|e| anyhow::anyhow!("flood refused: {e}"))?;
                last = last.max(v);
            }
            match try_connect(f, 0, &slow_token, &slow_st).await? {
                Ok(ws) => {
                    freed = Some((round, ws));
                    break;
                }
                Err((4429, e)) if e["code"] == "too_many_connections" => {}
                Err(other) => bail!("unexpected refusal: {other:?}"),
            }
        }
        let (round, second) = freed.context("the slow client was never closed")?;
        tracing::info!(round, last, "slow client closed");
        drop(second);

        // The slow client reads again: what the kernel held, then the end of the
        // stream (a 4008 close frame if it fit, else the connection just ends).
        let mut newest = 0u64;
        let mut close_code = None;
        tokio::time::timeout(WAIT, async {
            while let Some(m) = slow.next().await {
                match m {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                        if let Some(ver) = v["version"].as_u64() {
                            newest = newest.max(ver);
                        }
                        if v["type"] == "connection_error" {
                            assert_eq!(v["error"]["code"], "slow_consumer", "{v}");
                        }
                    }
                    Ok(Message::Close(c)) => {
                        close_code = c.map(|c| u16::from(c.code));
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
        .await
        .context("the slow client's stream did not end")?;
        assert!(
            newest < last,
            "the slow client got everything (up to {newest}) though it was closed"
        );
        if let Some(code) = close_code {
            assert_eq!(code, 4008);
        }
        let _ = slow.close(None).await;

        // The other members were not slowed: the observer has every event, in order.
        observer
            .wait_for("the observer to reach the last version", WAIT, |v| {
                v.version >= last
            })
            .await?;
        let v = observer.view();
        assert_eq!((v.gaps, v.duplicates), (0, 0));
        assert!(v.closed.is_none());
        Ok(())
    }
    .await;
    finish(fx, r).await
}
