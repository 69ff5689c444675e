//! Rate limits of the ICD.
//!
//! Limits shared by all routers (per user, per session, per IP) are fixed-window
//! counters in Redis (`INCR` + `EXPIRE`), so a client cannot multiply its allowance
//! by spreading over routers. The per-connection message limit is local to the
//! connection's task ([`LocalWindow`]). When Redis cannot be asked, a limited request
//! fails fast with `service_unavailable` rather than going unchecked.
//!
//! Open WebSockets per user and per IP are capped per router ([`SocketSlots`]): a
//! socket holds a [`SocketSlot`] for its whole life, an RAII guard that gives its place
//! back when the socket's task ends, however it ends.

use gs_shared::keys::Keys;
use gs_shared::primary::PrimaryRedis;
use gs_shared::protocol::{codes, WireError};
use serde_json::json;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Clone)]
pub struct Limiter {
    redis: PrimaryRedis,
    keys: Keys,
    timeout: Duration,
}

impl Limiter {
    pub fn new(redis: impl Into<PrimaryRedis>, keys: Keys, timeout: Duration) -> Self {
        Self {
            redis: redis.into(),
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

/// Open WebSockets per user and per IP on this router, with their caps (0 = no cap).
#[derive(Clone)]
pub struct SocketSlots {
    counts: Arc<Mutex<SlotCounts>>,
    max_per_user: usize,
    max_per_ip: usize,
}

#[derive(Default, Debug)]
struct SlotCounts {
    users: HashMap<Uuid, usize>,
    ips: HashMap<IpAddr, usize>,
}

/// One open WebSocket's place under the per-user and per-IP caps; given back on drop.
#[derive(Debug)]
pub struct SocketSlot {
    counts: Arc<Mutex<SlotCounts>>,
    user: Uuid,
    ip: Option<IpAddr>,
}

impl SocketSlots {
    pub fn new(max_per_user: usize, max_per_ip: usize) -> Self {
        Self {
            counts: Arc::default(),
            max_per_user,
            max_per_ip,
        }
    }

    /// Takes a place for a socket of `user` from `ip` (`None`: address unknown, only
    /// the user is counted), or refuses with `too_many_connections` (429) naming the
    /// cap. Nothing is counted when refused.
    pub fn acquire(&self, user: Uuid, ip: Option<IpAddr>) -> Result<SocketSlot, WireError> {
        let ip = ip.map(|a| a.to_canonical());
        let mut c = self.counts.lock().unwrap();
        let refuse = |scope: &str, limit: usize| {
            metrics::counter!("gs_router_socket_cap_refused_total", "scope" => scope.to_string())
                .increment(1);
            Err(WireError::new(
                codes::TOO_MANY_CONNECTIONS,
                format!("too many open connections for this {scope} (at most {limit})"),
            )
            .with_details(json!({"scope": scope, "limit": limit, "retry_after_secs": 1})))
        };
        if self.max_per_user > 0 && c.users.get(&user).copied().unwrap_or(0) >= self.max_per_user {
            return refuse("user", self.max_per_user);
        }
        if let Some(ip) = ip {
            if self.max_per_ip > 0 && c.ips.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
                return refuse("ip", self.max_per_ip);
            }
            *c.ips.entry(ip).or_default() += 1;
        }
        *c.users.entry(user).or_default() += 1;
        Ok(SocketSlot {
            counts: self.counts.clone(),
            user,
            ip,
        })
    }

    /// Sockets counted (per user, per IP): what is open now.
    pub fn open(&self) -> (usize, usize) {
        let c = self.counts.lock().unwrap();
        (c.users.values().sum(), c.ips.values().sum())
    }

    /// Entries in the maps (no entry stays behind for a user or IP with no socket).
    pub fn entries(&self) -> usize {
        let c = self.counts.lock().unwrap();
        c.users.len() + c.ips.len()
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap();
        fn give_back<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        give_back(&mut c.users, &self.user);
        if let Some(ip) = self.ip {
            give_back(&mut c.ips, &ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_caps_per_user_and_ip_are_given_back() {
        let slots = SocketSlots::new(2, 3);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.acquire(a, Some(ip1)).unwrap();
        let a2 = slots.acquire(a, Some(ip1)).unwrap();
        let e = slots.acquire(a, Some(ip2)).unwrap_err();
        assert_eq!(e.code, codes::TOO_MANY_CONNECTIONS);
        assert_eq!(e.details["scope"], "user");
        assert_eq!(e.http_status(), 429);
        let b1 = slots.acquire(b, Some(ip1)).unwrap();
        let e = slots.acquire(b, Some(ip1)).unwrap_err();
        assert_eq!(e.details["scope"], "ip", "ip1 holds 3");
        // The IPv4-mapped form of ip1 is the same address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            slots.acquire(b, Some(mapped)).unwrap_err().details["scope"],
            "ip"
        );
        let b2 = slots.acquire(b, Some(ip2)).unwrap();
        assert_eq!(slots.open(), (4, 4), "refusals counted nothing");
        drop(a1);
        let a3 = slots.acquire(a, Some(ip1)).unwrap();
        let unknown = slots.acquire(Uuid::from_u128(3), None).unwrap();
        drop((a2, a3, b1, b2, unknown));
        assert_eq!(slots.open(), (0, 0));
        assert_eq!(slots.entries(), 0, "no entry stays behind");
        let unlimited = SocketSlots::new(0, 0);
        let many: Vec<_> = (0..100)
            .map(|_| unlimited.acquire(a, Some(ip1)).unwrap())
            .collect();
        assert_eq!(unlimited.open(), (100, 100));
        drop(many);
        assert_eq!(unlimited.entries(), 0);
    }

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
