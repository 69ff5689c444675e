//! The node's operator endpoints: `/health/live` (the process runs), `/health/ready`
//! (PostgreSQL, Redis, a majority of the lock's Redis instances, NATS answer and the
//! Message Hub is connected; 503 otherwise,
//! with each dependency's state; also 503 until the node is on the ring, and again
//! once it drains) and `/metrics` (Prometheus, with the gauges an autoscaler reads
//! refreshed at each scrape).

use crate::NodeCtx;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use warp::Filter;

/// Bound on each dependency probe of `/health/ready`.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Probes each dependency; `(all_up, details)`.
pub async fn readiness(ctx: &NodeCtx) -> (bool, serde_json::Value) {
    let pg = async {
        let client = ctx.store.pool().get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let redis = async {
        let mut c = ctx.redis.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let (pg, redis) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, pg),
        tokio::time::timeout(PROBE_TIMEOUT, redis)
    );
    let flat = |r: Result<Result<(), String>, _>| match r {
        Ok(Ok(())) => "up".to_string(),
        Ok(Err(e)) => format!("down: {e}"),
        Err(_) => "down: timeout".to_string(),
    };
    let nats = if ctx.nats.connection_state() == async_nats::connection::State::Connected {
        "up".to_string()
    } else {
        "down: disconnected".to_string()
    };
    let hub = if !ctx.cfg.rabbitmq.enabled {
        "disabled".to_string()
    } else if ctx.hub.is_up() {
        "up".to_string()
    } else {
        "down: reconnecting".to_string()
    };
    // A node is ready once it is on the ring (its own view: past its membership
    // warm-up, announced, not draining), so a new node reports ready only once it
    // takes sessions, and a draining one stops being ready at once.
    let membership = if ctx.cluster.on_ring(&ctx.id) {
        "up".to_string()
    } else if ctx.cluster.announced() {
        "down: draining".to_string()
    } else {
        "down: warming up".to_string()
    };
    // The lock's own instances, when they are not the primary Redis (checked above).
    let redis_lock = if ctx.cfg.redis.lock_urls.is_empty() {
        "disabled".to_string()
    } else {
        let (up, of) = ctx.ownership.instances_up();
        if up > of / 2 {
            "up".to_string()
        } else {
            format!("down: {up} of {of} lock instances answer")
        }
    };
    let checks = json!({ "postgres": flat(pg), "redis": flat(redis), "nats": nats,
        "rabbitmq": hub, "membership": membership, "redis_lock": redis_lock });
    let up = checks
        .as_object()
        .map(|m| m.values().all(|v| v == "up" || v == "disabled"))
        .unwrap_or(false);
    (up, checks)
}

/// The autoscaler's signals that are states rather than events, refreshed at each
/// scrape (docs/architecture.md, "Metrics to scale on"): sessions owned, requests
/// queued in the actors' inboxes, whether the node is on the ring, process CPU time.
fn record_gauges(ctx: &NodeCtx) {
    metrics::gauge!("gs_node_sessions_owned").set(ctx.registry.len() as f64);
    metrics::gauge!("gs_node_inbox_depth").set(ctx.registry.inbox_depth() as f64);
    let on_ring = ctx.cluster.on_ring(&ctx.id);
    metrics::gauge!("gs_node_on_ring").set(if on_ring { 1.0 } else { 0.0 });
    gs_shared::telemetry::record_process_metrics();
}

/// Serves `/health/live`, `/health/ready` and `/metrics` until `stop` resolves (then
/// finishes the requests in flight).
pub async fn serve(
    ctx: Arc<NodeCtx>,
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let live = warp::path!("health" / "live").map(|| warp::reply::json(&json!({"status": "live"})));
    let ready_ctx = ctx.clone();
    let ready = warp::path!("health" / "ready").then(move || {
        let ctx = ready_ctx.clone();
        async move {
            let (up, checks) = readiness(&ctx).await;
            let body = json!({
                "status": if up { "ready" } else { "not_ready" },
                "node": ctx.id,
                "sessions": ctx.registry.len(),
                "checks": checks,
            });
            let status = if up {
                warp::http::StatusCode::OK
            } else {
                warp::http::StatusCode::SERVICE_UNAVAILABLE
            };
            warp::reply::with_status(warp::reply::json(&body), status)
        }
    });
    let metrics_ctx = ctx.clone();
    let metrics_route = warp::path!("metrics").map(move || {
        record_gauges(&metrics_ctx);
        metrics.render()
    });
    let routes = warp::get().and(live.or(ready).or(metrics_route));
    warp::serve(routes)
        .incoming(listener)
        .graceful(stop)
        .run()
        .await;
}
