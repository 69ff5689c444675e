//! The ICD's Redis keys are fenced by ownership epoch (issue 10): a deposed owner's
//! writes (an older epoch) are dropped by Redis, whatever order they arrive in, so a
//! paused ex-owner cannot overwrite what the new owner wrote. Against the real Redis
//! (`redis.url`, under a private key prefix).

use gs_node::cache::Cache;
use gs_shared::config::Config;
use gs_shared::keys::Keys;
use redis::AsyncCommands;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn a_deposed_owner_cannot_overwrite_the_cache() -> anyhow::Result<()> {
    let cfg = Config::load(None).unwrap_or_default();
    let client = redis::Client::open(cfg.redis.url.as_str())?;
    let mut redis = redis::aio::ConnectionManager::new(client).await?;
    let prefix = format!("test-{}:", Uuid::new_v4().simple());
    let keys = Keys::new(&prefix);
    let (cache, _task) = Cache::start(redis.clone(), keys.clone(), Duration::from_secs(2));
    let s = Uuid::new_v4();
    let (conn_new, conn_old, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let fields = |name: &str| vec![("name".to_string(), name.to_string())];

    // The new owner (epoch 2) writes first; then the old owner (epoch 1) writes late.
    cache.meta(s, 2, fields("new"));
    cache.attach(s, 2, conn_new, user);
    cache.combat(
        s,
        2,
        BTreeMap::from([("round".to_string(), "3".to_string())]),
    );
    cache.meta(s, 1, fields("old"));
    cache.attach(s, 1, conn_old, user);
    cache.detach(s, 1, conn_new, user);
    cache.combat(s, 1, BTreeMap::new());
    assert!(cache.flush().await, "the writer stopped");

    let meta: HashMap<String, String> = redis.hgetall(keys.meta(&s)).await?;
    assert_eq!(meta.get("name").map(String::as_str), Some("new"));
    let conns: HashMap<String, String> = redis.hgetall(keys.connections(&s)).await?;
    assert_eq!(
        conns.keys().cloned().collect::<Vec<_>>(),
        vec![conn_new.to_string()],
        "the old owner added or removed a connection"
    );
    let combat: HashMap<String, String> = redis.hgetall(keys.combat(&s)).await?;
    assert_eq!(combat.get("round").map(String::as_str), Some("3"));

    // A newer owner (epoch 3) takes over: its writes go through.
    cache.meta(s, 3, fields("newer"));
    cache.detach(s, 3, conn_new, user);
    cache.combat(s, 3, BTreeMap::new());
    assert!(cache.flush().await);
    let meta: HashMap<String, String> = redis.hgetall(keys.meta(&s)).await?;
    assert_eq!(meta.get("name").map(String::as_str), Some("newer"));
    let players: Vec<String> = redis.smembers(keys.players(&s)).await?;
    assert!(players.is_empty(), "the player's last connection left");
    let exists: bool = redis.exists(keys.combat(&s)).await?;
    assert!(!exists, "combat ended");

    let all = [
        keys.meta(&s),
        keys.connections(&s),
        keys.players(&s),
        keys.combat(&s),
        keys.cache_epoch(&s),
    ];
    let _: () = redis.del(&all[..]).await?;
    Ok(())
}
