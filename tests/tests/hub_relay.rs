//! The Message Hub relay (issue 5), against the real RabbitMQ: inbound events reach
//! every affected session once, every committed event is published (in per-session
//! order, surviving a node's death and the broker dropping connections), and poison
//! messages are dead-lettered without blocking the rest.

use anyhow::{Context, Result};
use cluster::harness::ClusterSpec;
use cluster::load::{self, Target};
use gs_shared::auth::Role;
use gs_tests::rabbit::{close_connections, Got, Rabbit};
use gs_tests::{finish, owners, Fixture, WAIT};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use uuid::Uuid;

fn sheet(max_hp: i64) -> Value {
    json!({"name": "Aria", "max_hp": max_hp, "ac": 15})
}

/// Waits until the nodes together have handled `n` more inbound events than `before`.
async fn handled(f: &Fixture, before: f64, n: f64) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = f.node_counter("gs_node_hub_applied_total").await?
            + f.node_counter("gs_node_hub_dead_lettered_total").await?;
        if now >= before + n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "inbound events not handled ({now} of {})",
            before + n
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn counters(f: &Fixture) -> Result<f64> {
    Ok(f.node_counter("gs_node_hub_applied_total").await?
        + f.node_counter("gs_node_hub_dead_lettered_total").await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_change_reaches_its_sessions_on_two_nodes_once() -> Result<()> {
    let f = Fixture::start(2, 1, false).await?;
    let r = async {
        // Two sessions owned by different nodes, the same character playing in both.
        let ring = gs_shared::ring::Ring::with_nodes(
            f.cluster.base.membership.vnodes,
            f.cluster.node_ids(),
        );
        let dm_api = f.api(0, &f.dm_token);
        let mut by_node: BTreeMap<String, (String, String)> = BTreeMap::new();
        for _ in 0..100 {
            let c = dm_api.create_session("hub").await?;
            let id = c["session_id"].as_str().context("id")?.to_string();
            let owner = ring
                .owner(&Uuid::parse_str(&id)?)
                .context("owner")?
                .to_string();
            by_node
                .entry(owner)
                .or_insert((id, c["connection_token"].as_str().unwrap_or("").to_string()));
            if by_node.len() == 2 {
                break;
            }
        }
        anyhow::ensure!(by_node.len() == 2, "no sessions on two nodes");
        let character = Uuid::new_v4();
        let player = Uuid::new_v4();
        let token = f.cluster.token(player, Role::Player);
        let mut clients = Vec::new();
        for (node, (sid, _)) in &by_node {
            let joined = f
                .api(0, &token)
                .join(
                    sid,
                    json!({"character_id": character, "character": sheet(20)}),
                )
                .await?;
            let st = joined["connection_token"].as_str().context("token")?;
            clients.push((sid.clone(), f.connect_to(0, node, sid, &token, st).await?));
        }

        let rabbit = Rabbit::connect(&f.cluster.base.rabbitmq).await?;
        let event_id = Uuid::new_v4();
        let event = json!({
            "event_id": event_id,
            "character_id": character,
            "change_type": "level_up",
            "details": {"max_hp": 31, "hp": 31},
            "timestamp": gs_shared::protocol::timestamp_now(),
        });
        let before = counters(&f).await?;
        let sent = Instant::now();
        rabbit
            .publish_inbound("character.state.changed", event.to_string().as_bytes())
            .await?;
        for (_, c) in &clients {
            c.wait_for("character_updated", WAIT, |v| {
                v.events.iter().any(|e| e.1 == "character_updated")
            })
            .await?;
        }
        println!(
            "character.state.changed reached both sessions in {:?}",
            sent.elapsed()
        );
        handled(&f, before, 1.0).await?;
        let mut versions = Vec::new();
        for (sid, c) in &clients {
            let state = f.api(0, &token).get_state(sid).await?;
            let hp = &state["game"]["play"]["characters"][character.to_string()];
            assert_eq!(hp["max_hp"], 31, "{sid}: {hp}");
            versions.push(state["version"].clone());
            assert_eq!(c.view().doc, state["state"]);
        }

        // The same event again (a redelivery): nothing changes anywhere.
        let before = counters(&f).await?;
        rabbit
            .publish_inbound("character.state.changed", event.to_string().as_bytes())
            .await?;
        handled(&f, before, 1.0).await?;
        for ((sid, c), v) in clients.iter().zip(&versions) {
            let state = f.api(0, &token).get_state(sid).await?;
            assert_eq!(
                &state["version"], v,
                "{sid}: a redelivered event changed the session"
            );
            let updates = c
                .view()
                .events
                .iter()
                .filter(|e| e.1 == "character_updated")
                .count();
            assert_eq!(updates, 1);
        }
        Ok(())
    }
    .await;
    finish(f, r).await
}

/// The events the messages carry, with their routing keys: a message is one event,
/// or a batch (`change_type` "batch") of consecutive events of one session.
fn events_in(got: &[Got]) -> Vec<(String, Value)> {
    got.iter()
        .flat_map(|g| {
            let m = g.json();
            if m["change_type"] == "batch" {
                m["details"]["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| (g.routing_key.clone(), e))
                    .collect::<Vec<_>>()
            } else {
                vec![(g.routing_key.clone(), m)]
            }
        })
        .collect()
}

/// Per session: the first delivery of each event, by version, must be 1, 2, 3, ...
fn check_order(got: &[Got]) -> Result<BTreeMap<Uuid, u64>> {
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut last: BTreeMap<Uuid, u64> = BTreeMap::new();
    for (routing_key, m) in events_in(got) {
        let id: Uuid = serde_json::from_value(m["event_id"].clone())?;
        if !seen.insert(id) {
            continue; // a duplicate: consumers dedupe by event_id
        }
        let session: Uuid = serde_json::from_value(m["session_id"].clone())?;
        let version = m["version"].as_u64().context("version")?;
        let expected = last.get(&session).copied().unwrap_or(0) + 1;
        anyhow::ensure!(
            version == expected,
            "session {session}: got version {version}, expected {expected}"
        );
        anyhow::ensure!(
            routing_key
                == m["change_type"]
                    .as_str()
                    .map(gs_node_key)
                    .unwrap_or_default(),
            "routing key {} for {}",
            routing_key,
            m["change_type"]
        );
        last.insert(session, version);
    }
    Ok(last)
}

fn gs_node_key(change_type: &str) -> String {
    gs_node::outbox::routing_key(change_type).to_string()
}

/// Distinct events among the messages (consumers dedupe on `event_id`).
fn distinct(got: &[Got]) -> usize {
    events_in(got)
        .into_iter()
        .map(|(_, e)| e["event_id"].clone())
        .collect::<HashSet<Value>>()
        .len()
}

/// Every stored event is published: each session's hub cursor (the newest version
/// the broker confirmed) reaches its newest stored event. Returns the events stored.
async fn check_outbox(c: &cluster::harness::LocalCluster) -> Result<i64> {
    let pg = c.pg().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let pending: i64 = pg
            .query_one(
                "SELECT count(*) FROM session_events e \
                 LEFT JOIN hub_cursor c ON c.session_id = e.session_id \
                 WHERE c.session_id IS NULL OR e.seq > c.published_seq",
                &[],
            )
            .await?
            .get(0);
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{pending} events never published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events: i64 = pg
        .query_one("SELECT count(*) FROM session_events", &[])
        .await?
        .get(0);
    Ok(events)
}

/// Stored versions per session.
async fn stored_versions(c: &cluster::harness::LocalCluster) -> Result<BTreeMap<Uuid, u64>> {
    let pg = c.pg().await?;
    let rows = pg
        .query(
            "SELECT session_id, max(seq) FROM session_events GROUP BY session_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_published_in_order_across_a_node_kill() -> Result<()> {
    gs_tests::init_logging();
    let mut cluster = cluster::harness::LocalCluster::start(ClusterSpec::test(3, 1)).await?;
    let r = async {
        // Nodes are ready only once their hub declared the topology: the exchange exists.
        let rabbit = Rabbit::connect(&cluster.base.rabbitmq).await?;
        let tap = rabbit.tap_outbound().await?;
        let target = Target::of(&cluster);
        let (ids, clients) = load::setup(&target, 6, 2, None).await?;
        let running = load::start(clients, Duration::from_millis(20), Duration::from_secs(15), None);
        let progress = running.progress.clone();
        let t = Instant::now();
        progress.wait("a burst under way", WAIT, |p| p.acks() >= 200).await?;
        // Kill the node publishing the most sessions, mid-burst.
        let by_owner = owners(&cluster, &ids).await?;
        let victim = by_owner.iter().max_by_key(|(_, s)| s.len()).map(|(n, _)| n.clone()).unwrap();
        cluster.kill(&victim).await?;
        let killed = Instant::now();
        progress
            .wait("every session served after the kill", WAIT, |p| (0..ids.len()).all(|s| p.acked_since(s, killed)))
            .await?;
        let (_clients, records) = running.stop().await?;
        assert!(records.iter().all(|r| r.result.is_ok()), "all commands acknowledged");
        let events = check_outbox(&cluster).await?;
        let stored = stored_versions(&cluster).await?;
        let got = rabbit.drain_until(&tap, WAIT, |all| distinct(all) as i64 >= events).await?;
        let last = check_order(&got)?;
        let ours: BTreeMap<Uuid, u64> = ids
            .iter()
            .map(|s| Uuid::parse_str(s).unwrap())
            .filter_map(|s| last.get(&s).map(|v| (s, *v)))
            .collect();
        for (s, v) in &stored {
            if ids.contains(&s.to_string()) {
                assert_eq!(ours.get(s), Some(v), "session {s}: every stored event was published");
            }
        }
        let delivered = events_in(&got).len();
        println!(
            "hub publish: {} events in {} messages, {} deliveries ({} duplicates after the kill of {victim}), {:?}",
            events,
            got.len(),
            delivered,
            delivered - distinct(&got),
            t.elapsed()
        );
        Ok(())
    }
    .await;
    gs_tests::finish_cluster(cluster, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_closing_connections_loses_nothing() -> Result<()> {
    gs_tests::init_logging();
    let cluster = cluster::harness::LocalCluster::start(ClusterSpec::test(2, 1)).await?;
    let r = async {
        let rabbit = Rabbit::connect(&cluster.base.rabbitmq).await?;
        let tap = rabbit.tap_outbound().await?;
        let target = Target::of(&cluster);
        let (ids, clients) = load::setup(&target, 4, 2, None).await?;
        let running = load::start(
            clients,
            Duration::from_millis(20),
            Duration::from_secs(15),
            None,
        );
        let progress = running.progress.clone();
        progress
            .wait("a burst under way", WAIT, |p| p.acks() >= 100)
            .await?;
        let closed = close_connections(&cluster.base.nats.subject_prefix)?;
        assert!(closed >= 2, "closed {closed} broker connections");
        let after = Instant::now();
        // Play goes on while the relay reconnects.
        progress
            .wait("play continues", WAIT, |p| {
                (0..ids.len()).all(|s| p.acked_since(s, after))
            })
            .await?;
        let (_c, records) = running.stop().await?;
        assert!(records.iter().all(|r| r.result.is_ok()));
        let events = check_outbox(&cluster).await?;
        let got = rabbit
            .drain_until(&tap, WAIT, |all| distinct(all) as i64 >= events)
            .await?;
        check_order(&got)?;
        println!(
            "broker dropped {closed} connections: {events} events, all published once or more"
        );
        Ok(())
    }
    .await;
    gs_tests::finish_cluster(cluster, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_and_the_rest_flows() -> Result<()> {
    let f = Fixture::start(1, 1, false).await?;
    let r = async {
        let character = Uuid::new_v4();
        let (_u, token, st) = f.player(0, json!({"character_id": character, "character": sheet(12)})).await?;
        let client = f.connect(0, "player", &token, &st).await?;
        let rabbit = Rabbit::connect(&f.cluster.base.rabbitmq).await?;
        let before = counters(&f).await?;
        rabbit.publish_inbound("character.state.changed", b"{ this is not json").await?;
        rabbit
            .publish_inbound(
                "character.state.changed",
                json!({"character_id": "not-a-uuid", "details": {}}).to_string().as_bytes(),
            )
            .await?;
        let good = json!({"event_id": Uuid::new_v4(), "character_id": character, "change_type": "ac",
                          "details": {"ac": 17}, "timestamp": gs_shared::protocol::timestamp_now()});
        rabbit.publish_inbound("character.state.changed", good.to_string().as_bytes()).await?;
        client
            .wait_for("the good event applied", WAIT, |v| v.events.iter().any(|e| e.1 == "character_updated"))
            .await?;
        handled(&f, before, 3.0).await?;
        let dead = rabbit
            .drain_until(&f.cluster.base.rabbitmq.dead_letter_queue, WAIT, |all| all.len() >= 2)
            .await?;
        assert_eq!(dead.len(), 2);
        for d in &dead {
            let reason = d.header("x-gs-reason").unwrap_or_default();
            assert!(!reason.is_empty(), "a dead letter carries its reason");
            println!("dead-lettered: {reason}");
        }
        // Each bad message dead-lettered with its own reason (in either order: the
        // relay handles the messages it has prefetched concurrently).
        let reasons: Vec<String> = dead.iter().map(|d| d.header("x-gs-reason").unwrap_or_default()).collect();
        assert!(reasons.iter().any(|r| r.contains("not JSON")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("character_id")), "{reasons:?}");
        let state = f.api(0, &token).get_state(&f.session).await?;
        assert_eq!(state["game"]["play"]["characters"][character.to_string()]["ac"], 17);
        Ok(())
    }
    .await;
    finish(f, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_inbound_event_is_retried_and_applied() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.node.fault_hub_fail_once = "retry-probe".into();
    let f = Fixture::with_spec(spec).await?;
    let r = async {
        let character = Uuid::new_v4();
        let (_u, token, st) = f
            .player(
                0,
                json!({"character_id": character, "character": sheet(12)}),
            )
            .await?;
        let client = f.connect(0, "player", &token, &st).await?;
        let rabbit = Rabbit::connect(&f.cluster.base.rabbitmq).await?;
        let event = json!({"event_id": Uuid::new_v4(), "character_id": character,
                           "change_type": "retry-probe", "details": {"ac": 18},
                           "timestamp": gs_shared::protocol::timestamp_now()});
        rabbit
            .publish_inbound("character.state.changed", event.to_string().as_bytes())
            .await?;
        // Refused once by the owner, it waits in a retry queue, comes back with its
        // routing key, and is applied.
        client
            .wait_for("the retried event applied", WAIT, |v| {
                v.events.iter().any(|e| e.1 == "character_updated")
            })
            .await?;
        assert!(
            f.node_counter("gs_node_hub_retried_total").await? >= 1.0,
            "it went through a retry"
        );
        assert_eq!(
            f.node_counter("gs_node_hub_dead_lettered_total").await?,
            0.0
        );
        let state = f.api(0, &token).get_state(&f.session).await?;
        assert_eq!(
            state["game"]["play"]["characters"][character.to_string()]["ac"],
            18
        );
        Ok(())
    }
    .await;
    finish(f, r).await
}
