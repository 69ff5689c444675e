//! Rate limits of the ICD.
//!
//! Limits shared by all routers (per user, per session, per IP) are fixed-window
//! counters in Redis (`INCR` + `EXPIRE`), so a client cannot multiply its allowance
//! by spreading over routers. The per-connection message limit is local to the
//! connection's task ([`LocalWindow`]). When Redis cannot be asked, a limited request
//! fails fast with `service_unavailable` rather than going unchecked.

use gs_shared::keys::Keys;
use gs_shared::protocol::{codes, WireError};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Limiter {
    redis: redis::aio::ConnectionManager,
    keys: Keys,
    timeout: Duration,
}

impl Limiter {
    pub fn new(redis: redis::aio::ConnectionManager, keys: Keys, timeout: Duration) -> Self {
        Self {
            redis,
            keys,
            timeout,
        }
    }

    /// Counts one use of `scope` by `subject`; refuses past `limit` per `window`.
    /// A limit of 0 is no limit.
    pub async fn check(
        &self,
        scope: &str,
        subject: &str,
        limit: u32,
        window: Duration,
    ) -> Result<(), WireError> {
        if limit == 0 {
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let w = window.as_secs().max(1);
        let slot = now / w;
        let key = self.keys.rate(scope, subject, slot);
        let mut conn = self.redis.clone();
        let r: Result<Result<(u64,), redis::RedisError>, _> = tokio::time::timeout(
            self.timeout,
            redis::pipe()
                .incr(&key, 1u64)
                .expire(&key, w as i64 + 1)
                .ignore()
                .query_async(&mut conn),
        )
        .await;
        match r {
            Ok(Ok((count,))) if count <= limit as u64 => Ok(()),
            Ok(Ok(_)) => {
                let retry_after = (slot + 1) * w - now;
                metrics::counter!("gs_router_rate_limited_total", "scope" => scope.to_string())
                    .increment(1);
                Err(WireError::new(
                    codes::RATE_LIMITED,
                    format!("rate limit of {limit} per {w} s exceeded for {scope}"),
                )
                .with_details(json!({"scope": scope, "limit": limit, "window_secs": w, "retry_after_secs": retry_after})))
            }
            Ok(Err(e)) => Err(WireError::new(
                codes::SERVICE_UNAVAILABLE,
                format!("rate limiter unavailable: {e}"),
            )),
            Err(_) => Err(WireError::new(
                codes::SERVICE_UNAVAILABLE,
                "rate limiter unavailable: timeout",
            )),
        }
    }
}

/// A fixed window counter owned by one task (per-connection message limit).
#[derive(Debug)]
pub struct LocalWindow {
    limit: u32,
    window: Duration,
    start: Instant,
    count: u32,
}

impl LocalWindow {
    pub fn new(limit: u32, window: Duration, now: Instant) -> Self {
        Self {
            limit,
            window,
            start: now,
            count: 0,
        }
    }

    /// Counts one message at `now`; `Err(retry_after)` past the limit.
    pub fn hit(&mut self, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        if now.duration_since(self.start) >= self.window {
            self.start = now;
            self.count = 0;
        }
        if self.count >= self.limit {
            return Err(self.window.saturating_sub(now.duration_since(self.start)));
        }
        self.count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_window_resets() {
        let t0 = Instant::now();
        let mut w = LocalWindow::new(2, Duration::from_secs(60), t0);
        assert!(w.hit(t0).is_ok());
        assert!(w.hit(t0).is_ok());
        let wait = w.hit(t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(w.hit(t0 + Duration::from_secs(60)).is_ok());
        assert!(LocalWindow::new(0, Duration::from_secs(1), t0)
            .hit(t0)
            .is_ok());
    }
}
