//! Rate limits and the ICD cache keys on a Redis Cluster (issue 13): a private
//! 3-master cluster (`redis.cluster_urls`); a session is created, joined and played
//! through it, its ICD keys are written hash-tagged (`session:{<id>}:...`, one slot
//! per session) and the shared rate limits count on the cluster and refuse past
//! their limit.

use anyhow::Result;
use cluster::harness::ClusterSpec;
use gs_shared::keys::Keys;
use gs_tests::redis_cluster::RedisCluster;
use gs_tests::{finish, set, Fixture, WAIT};
use redis::AsyncCommands;
use reqwest::Method;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The session's state saves allowed per minute in this test.
const SAVES: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_rate_limits_run_on_a_redis_cluster() -> Result<()> {
    gs_tests::init_logging();
    let started = Instant::now();
    let redis = RedisCluster::start(3).await?;
    let cluster_up = started.elapsed();
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.redis.cluster_urls = redis.urls();
    // The lock stays on the machine's Redis (Redlock instances are never a cluster).
    spec.base.redis.lock_urls = vec![spec.base.redis.url.clone()];
    // The primary Redis itself is not used: point it at a closed port to prove it.
    spec.base.redis.url = format!("redis://127.0.0.1:{}", cluster::harness::free_port()?);
    spec.base.limits.state_updates_per_min_per_session = SAVES;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        let sid: Uuid = f.session.parse()?;
        let (user, token, st) = f
            .player(0, json!({"character_id": Uuid::new_v4(), "character": {"name": "Aria", "max_hp": 9, "ac": 12}}))
            .await?;
        let mut player = f.connect(0, "player", &token, &st).await?;
        let mut dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        // Commands over the WebSocket.
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(dm.send("state_update", set(&format!("/n{i}"), json!(i))).await?);
        }
        for id in &ids {
            anyhow::ensure!(dm.wait_answer(*id, WAIT).await?.is_ok(), "update {id} refused");
        }
        player
            .wait_for("the ten updates", WAIT, |v| v.version >= 10)
            .await?;

        // The ICD's keys, hash-tagged, on the cluster.
        let keys = Keys::hash_tagged(&f.cluster.base.redis.key_prefix);
        let mut conn = redis.connection().await?;
        let deadline = Instant::now() + WAIT;
        let (meta, players) = loop {
            let meta: HashMap<String, String> = conn.hgetall(keys.meta(&sid)).await?;
            let players: Vec<String> = conn.smembers(keys.players(&sid)).await?;
            if meta.contains_key("name") && players.contains(&user.to_string()) {
                break (meta, players);
            }
            anyhow::ensure!(Instant::now() < deadline, "cache keys not written: {meta:?} {players:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ttl: i64 = conn.ttl(keys.meta(&sid)).await?;
        anyhow::ensure!(ttl > 0, "meta has its TTL ({ttl})");
        let connections: HashMap<String, String> = conn.hgetall(keys.connections(&sid)).await?;
        anyhow::ensure!(connections.values().any(|u| *u == user.to_string()), "{connections:?}");

        // The per-session save limit counts on the cluster: SAVES pass, the next is refused.
        let path = format!("/api/v2/sessions/{}/state", f.session);
        for i in 0..SAVES {
            let r = f.rest(&f.dm_token, Method::POST, &path, Some(&json!({"state": {"save": i}}))).await?;
            anyhow::ensure!(r.status == 200, "save {i}: {r:?}");
        }
        let r = f.rest(&f.dm_token, Method::POST, &path, Some(&json!({"state": {"save": "over"}}))).await?;
        anyhow::ensure!(r == (429, "rate_limited"), "the save over the limit: {r:?}");
        let state = f.api(0, &f.dm_token).get_state(&f.session).await?;
        anyhow::ensure!(state["state"]["save"] == json!(SAVES - 1), "the refused save changed nothing");
        let limited: Vec<String> = conn
            .keys(format!("{}rl:state:*", f.cluster.base.redis.key_prefix))
            .await
            .unwrap_or_default();
        println!(
            "redis cluster: 3 masters up in {cluster_up:?}; 10 commands acked, meta {} fields, {} players, \
             {SAVES} saves then rate_limited; {} counter keys seen",
            meta.len(),
            players.len(),
            limited.len()
        );
        let _ = player.close().await;
        Ok(())
    }
    .await;
    finish(fx, r).await
}
