//! The primary Redis: where the rate-limit counters and the ICD's cache keys live.
//!
//! Either one instance (`redis.url`, a `ConnectionManager` that reconnects by itself)
//! or a Redis Cluster (`redis.cluster_urls`, the `redis` crate's async cluster client,
//! which follows `MOVED`/`ASK` redirections and refreshes its slot map when a master
//! changes). [`PrimaryRedis`] is a `ConnectionLike`, so commands, pipelines and
//! scripts are written once for both. What a cluster adds for callers:
//!
//! * every command of one pipeline (and every key of one script) must hash to one
//!   slot: session keys are hash-tagged ([`crate::keys::Keys::hash_tagged`]) and the
//!   cache sends one pipeline per session in cluster mode ([`PrimaryRedis::is_cluster`]);
//! * the client is bounded by the same `redis.op_timeout_ms` as the single instance.
//!
//! The ownership lock never lives here: it is on `redis.lock_urls` (Redlock).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to the primary Redis: one instance or a cluster. Cheap to clone.
#[derive(Clone)]
pub enum PrimaryRedis {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl PrimaryRedis {
    /// Whether this is a Redis Cluster (pipelines must then stay within one slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self, PrimaryRedis::Cluster(_))
    }
}

impl From<ConnectionManager> for PrimaryRedis {
    fn from(c: ConnectionManager) -> Self {
        PrimaryRedis::Single(c)
    }
}

impl From<ClusterConnection> for PrimaryRedis {
    fn from(c: ClusterConnection) -> Self {
        PrimaryRedis::Cluster(c)
    }
}

impl ConnectionLike for PrimaryRedis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            PrimaryRedis::Single(c) => c.req_packed_command(cmd),
            PrimaryRedis::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            PrimaryRedis::Single(c) => c.req_packed_commands(pipeline, offset, count),
            PrimaryRedis::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            PrimaryRedis::Single(c) => c.get_db(),
            PrimaryRedis::Cluster(c) => c.get_db(),
        }
    }
}
