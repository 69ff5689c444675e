//! Connecting to NATS and Redis at start-up: retried until a deadline, after which the
//! clients reconnect by themselves (async-nats and redis' `ConnectionManager` both do).
//! URLs and the clients' error texts are logged and reported with their passwords
//! redacted ([`redact_url`]).

use crate::config::{ms, redact_secrets, redact_url, Config};
use crate::primary::PrimaryRedis;
use std::time::{Duration, Instant};

/// How long a process waits for a dependency at start-up.
pub const STARTUP_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NATS at {url}: {error}")]
    Nats { url: String, error: String },
    #[error("Redis at {url}: {error}")]
    Redis { url: String, error: String },
}

/// Connects to NATS: one server, or any of the seed URLs of a cluster (`nats.url`,
/// comma-separated). async-nats keeps every seed (and the servers the cluster
/// advertises) and, when the server in use goes away, reconnects to another at once.
pub async fn nats(cfg: &Config, name: &str) -> Result<async_nats::Client, ConnectError> {
    let seeds = cfg
        .nats
        .urls()
        .into_iter()
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Nats {
            url: redact_url(&cfg.nats.url),
            error: redact_secrets(&e.to_string()),
        })?;
    let deadline = Instant::now() + STARTUP_WAIT;
    loop {
        let opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(ms(cfg.nats.connect_timeout_ms))
            .request_timeout(Some(ms(cfg.nats.request_timeout_ms)));
        let error = match opts.connect(seeds.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => redact_secrets(&e.to_string()),
        };
        if Instant::now() >= deadline {
            return Err(ConnectError::Nats {
                url: redact_url(&cfg.nats.url),
                error,
            });
        }
        tracing::warn!(%error, url = %redact_url(&cfg.nats.url), "NATS not reachable yet; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Connects to the primary Redis: the cluster of `redis.cluster_urls` when set, else
/// `redis.url`.
pub async fn primary_redis(cfg: &Config) -> Result<PrimaryRedis, ConnectError> {
    if cfg.redis.cluster_urls.is_empty() {
        return Ok(redis(cfg).await?.into());
    }
    let shown = redact_url(&cfg.redis.cluster_urls.join(","));
    let err = |error: String| ConnectError::Redis {
        url: shown.clone(),
        error: redact_secrets(&error),
    };
    let client = redis::cluster::ClusterClient::builder(cfg.redis.cluster_urls.iter().cloned())
        .connection_timeout(ms(cfg.redis.op_timeout_ms.max(1000)))
        .response_timeout(ms(cfg.redis.op_timeout_ms))
        .retries(2)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let deadline = Instant::now() + STARTUP_WAIT;
    loop {
        let error = match client.get_async_connection().await {
            Ok(c) => return Ok(c.into()),
            Err(e) => redact_secrets(&e.to_string()),
        };
        if Instant::now() >= deadline {
            return Err(err(error));
        }
        tracing::warn!(%error, urls = %shown, "Redis Cluster not reachable yet; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Connects to the single Redis instance of `redis.url`.
pub async fn redis(cfg: &Config) -> Result<redis::aio::ConnectionManager, ConnectError> {
    let err = |error: String| ConnectError::Redis {
        url: redact_url(&cfg.redis.url),
        error: redact_secrets(&error),
    };
    let client = redis::Client::open(cfg.redis.url.as_str()).map_err(|e| err(e.to_string()))?;
    let mcfg = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(ms(cfg.redis.op_timeout_ms)))
        .set_connection_timeout(Some(ms(cfg.redis.op_timeout_ms.max(1000))))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let deadline = Instant::now() + STARTUP_WAIT;
    loop {
        let error = match client
            .get_connection_manager_with_config(mcfg.clone())
            .await
        {
            Ok(c) => return Ok(c),
            Err(e) => redact_secrets(&e.to_string()),
        };
        if Instant::now() >= deadline {
            return Err(err(error));
        }
        tracing::warn!(%error, url = %redact_url(&cfg.redis.url), "Redis not reachable yet; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
