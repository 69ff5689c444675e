//! The end-to-end session path (issue 2): REST create on one router, five wss clients
//! spread over two routers, 200 state changes from several clients, and every
//! property the service promises about them.

use anyhow::Result;
use cluster::client::TokenStyle;
use gs_tests::{finish, set, Fixture, WAIT};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use uuid::Uuid;

const CLIENTS: usize = 5;
const CHANGES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_two_routers_five_wss_clients_200_changes() -> Result<()> {
    let f = Fixture::start(2, 2, true).await?;
    let result = run(&f).await;
    finish(f, result).await
}

async fn run(f: &Fixture) -> Result<()> {
    assert!(f.router(0).starts_with("https://"), "routers serve TLS");
    assert!(f.ws(0).starts_with("wss://"));

    // The DM plus four players (joined over REST on alternating routers); clients
    // alternate between the two routers; one presents its tokens as query parameters.
    let mut clients = Vec::new();
    clients.push(f.connect(0, "dm", &f.dm_token, &f.session_token).await?);
    for i in 1..CLIENTS {
        let (_user, token, st) = f.player(i, json!({})).await?;
        let style = if i == 3 {
            TokenStyle::Query
        } else {
            TokenStyle::Headers
        };
        clients.push(
            f.connect_with(i, &format!("player-{i}"), &token, &st, style, None)
                .await?,
        );
    }

    // 200 changes, sent without waiting, from all five clients at once.
    let mut sent: Vec<(usize, Uuid)> = Vec::new();
    for k in 0..CHANGES {
        let c = k % CLIENTS;
        let path = format!("/clients/c{c}/k{k}");
        let id = clients[c]
            .send("state_update", set(&path, json!(k)))
            .await?;
        sent.push((c, id));
    }

    // Every change is acknowledged exactly once, with its own version.
    for (c, id) in &sent {
        let answer = clients[*c].wait_answer(*id, WAIT).await?;
        assert!(answer.is_ok(), "change {id} refused: {answer:?}");
    }
    let mut acked: BTreeMap<Uuid, u64> = BTreeMap::new();
    for c in &clients {
        let v = c.view();
        assert_eq!(v.duplicate_acks, 0, "{}: an ack arrived twice", c.name);
        assert!(v.errors.is_empty(), "{}: errors {:?}", c.name, v.errors);
        acked.extend(v.acks.iter().map(|(k, v)| (*k, *v)));
    }
    assert_eq!(acked.len(), CHANGES);
    let versions: HashSet<u64> = acked.values().copied().collect();
    assert_eq!(versions.len(), CHANGES, "each change has its own version");
    let last = *versions.iter().max().unwrap();

    // Every client receives every event once, in version order, without a gap.
    for c in &clients {
        c.wait_for(&format!("version {last}"), WAIT, |v| v.version >= last)
            .await?;
        let v = c.view();
        assert_eq!(
            (v.gaps, v.duplicates),
            (0, 0),
            "{}: gaps/duplicates",
            c.name
        );
        let first_event = v.events.first().map(|e| e.0).unwrap_or(0);
        for w in v.events.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "{}: events out of order", c.name);
        }
        // Everything after the client's initial sync arrived as events.
        let synced_at = first_event - 1;
        let updates: HashSet<u64> = v
            .events
            .iter()
            .filter(|(_, t)| t == "state_update")
            .map(|(ver, _)| *ver)
            .collect();
        for ver in versions.iter().filter(|ver| **ver > synced_at) {
            assert!(
                updates.contains(ver),
                "{}: missing the event of version {ver}",
                c.name
            );
        }
    }

    // All clients end with the same state, equal to GET /state (through both routers).
    let reference = clients[0].view().doc;
    for c in &clients {
        assert_eq!(c.view().doc, reference, "{}: state differs", c.name);
    }
    for r in 0..2 {
        let state = f.api(r, &f.dm_token).get_state(&f.session).await?;
        assert_eq!(state["state"], reference, "GET /state through router {r}");
        assert_eq!(state["version"], json!(last.to_string()));
        assert_eq!(state["version_number"], json!(last));
    }
    for k in 0..CHANGES {
        assert_eq!(
            reference["clients"][format!("c{}", k % CLIENTS)][format!("k{k}")],
            json!(k)
        );
    }

    println!(
        "{} changes acked, last version {last}, {} clients identical",
        acked.len(),
        clients.len()
    );
    // session_events holds exactly the acknowledged changes.
    let stored: BTreeMap<Uuid, u64> = f.stored_updates().await?.into_iter().collect();
    assert_eq!(
        stored, acked,
        "stored state_update events = acknowledged changes"
    );

    // Each router forgets every request once it has ended: commands acknowledged by
    // their events get no reply, and their waiters must not pile up. (A router's own
    // background requests, presence touches, may be in flight at any one reading: the
    // gauge must come down to 0, not stay at the 200 commands.)
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let waiting = f.router_metric("gs_router_requests_waiting").await?;
        if waiting == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} requests still waiting on the routers"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A client that reconnects (to the other router) with its last version receives
/// exactly what it missed, and one whose gap is too long gets a full sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_last_version_resumes_exactly() -> Result<()> {
    let f = Fixture::start(1, 2, false).await?;
    let result = async {
        let mut writer = f
            .connect(0, "writer", &f.dm_token, &f.session_token)
            .await?;
        let (_u, token, st) = f.player(1, json!({})).await?;
        let reader = f.connect(1, "reader", &token, &st).await?;
        let id = writer.send("state_update", set("/a", json!(1))).await?;
        let v1 = writer.wait_answer(id, WAIT).await?.expect("ack");
        reader.wait_for("v1", WAIT, |v| v.version >= v1).await?;
        drop(reader);

        // Missed while away.
        let mut missed = Vec::new();
        for i in 0..5 {
            let id = writer
                .send("state_update", set(&format!("/b{i}"), json!(i)))
                .await?;
            missed.push(writer.wait_answer(id, WAIT).await?.expect("ack"));
        }
        let back = f
            .connect_with(
                0,
                "reader-again",
                &token,
                &st,
                TokenStyle::Headers,
                Some(v1),
            )
            .await?;
        let last = *missed.last().unwrap();
        back.wait_for("the missed events", WAIT, |v| v.version >= last)
            .await?;
        let v = back.view();
        assert_eq!(v.syncs, 0, "resumed from events, not a full sync");
        let got: Vec<u64> = v.events.iter().map(|e| e.0).collect();
        assert_eq!(got, missed, "exactly the missed events, in order");
        Ok(())
    }
    .await;
    finish(f, result).await
}

/// Ending a session closes its connections cleanly, after the final event, on every
/// router; afterwards it refuses changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_session_closes_its_connections_with_a_final_event() -> Result<()> {
    let f = Fixture::start(1, 2, false).await?;
    let result = async {
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let (_u, token, st) = f.player(1, json!({})).await?;
        let player = f.connect(1, "player", &token, &st).await?;
        let end = dm.send("session_end", json!({})).await?;
        let version = dm.wait_answer(end, WAIT).await?.expect("the DM may end it");
        for c in [&dm, &player] {
            c.wait_for("the close", WAIT, |v| v.closed.is_some())
                .await?;
            let v = c.view();
            assert_eq!(
                v.version, version,
                "{}: the final event arrived first",
                c.name
            );
            assert_eq!(
                v.events.last().map(|e| e.1.as_str()),
                Some("session_status_changed")
            );
            assert_eq!(
                v.closed.as_ref().map(|c| c.0),
                Some(1000),
                "{}: a normal close",
                c.name
            );
        }
        let r = f
            .api(0, &f.dm_token)
            .call(
                reqwest::Method::POST,
                &format!("/api/v2/sessions/{}/state", f.session),
                Some(&json!({"state": {"x": 1}})),
            )
            .await?;
        assert_eq!((r.status, r.code()), (422, "session_ended"));
        // Connecting afterwards gives the final state, then a normal close.
        let late = f.connect(0, "late", &f.dm_token, &f.session_token).await?;
        late.wait_for("the close", WAIT, |v| v.closed.is_some())
            .await?;
        let v = late.view();
        assert_eq!(v.version, version);
        assert_eq!(v.closed.as_ref().map(|c| c.0), Some(1000));
        Ok(())
    }
    .await;
    finish(f, result).await
}
