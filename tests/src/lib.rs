//! Shared fixtures of the integration and chaos tests.
//!
//! Every test starts its own [`LocalCluster`] of real `gs-node` / `gs-router`
//! processes in a private namespace (database, NATS subjects, Redis keys, RabbitMQ
//! names), against the machine's real PostgreSQL, Redis, NATS and RabbitMQ. Tests
//! wait on events with bounded timeouts ([`WAIT`]), never on sleeps.

use anyhow::{Context, Result};
use cluster::client::{ws_connect, Api, TokenStyle, TrackedClient};
use cluster::harness::{ClusterSpec, LocalCluster};
use gs_shared::auth::Role;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

pub use cluster;

/// Upper bound of any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A cluster with one session created by a DM.
pub struct Fixture {
    pub cluster: LocalCluster,
    pub http: reqwest::Client,
    pub dm: Uuid,
    pub dm_token: String,
    pub session: String,
    pub session_token: String,
}

impl Fixture {
    /// Starts `nodes` nodes and `routers` routers (wss when `tls`) and creates a
    /// session through router 0.
    pub async fn start(nodes: usize, routers: usize, tls: bool) -> Result<Fixture> {
        let mut spec = ClusterSpec::test(nodes, routers);
        spec.tls = tls;
        Self::with_spec(spec).await
    }

    pub async fn with_spec(spec: ClusterSpec) -> Result<Fixture> {
        init_logging();
        let cluster = LocalCluster::start(spec).await?;
        let http = cluster.http();
        let dm = Uuid::new_v4();
        let dm_token = cluster.token(dm, Role::Dm);
        let api = Api::new(http.clone(), &cluster.router_urls()[0], &dm_token);
        let created = api.create_session("integration test").await?;
        let session = created["session_id"]
            .as_str()
            .context("session_id")?
            .to_string();
        let session_token = created["connection_token"]
            .as_str()
            .context("connection_token")?
            .to_string();
        Ok(Fixture {
            cluster,
            http,
            dm,
            dm_token,
            session,
            session_token,
        })
    }

    pub fn router(&self, i: usize) -> String {
        let r = self.cluster.router_urls();
        r[i % r.len()].clone()
    }

    pub fn ws(&self, i: usize) -> String {
        let r = self.cluster.router_ws_urls();
        r[i % r.len()].clone()
    }

    /// REST as `token` through router `i`.
    pub fn api(&self, i: usize, token: &str) -> Api {
        Api::new(self.http.clone(), &self.router(i), token)
    }

    /// A new player who joined the session (through router `i`): (user, token,
    /// session token).
    pub async fn player(&self, i: usize, body: Value) -> Result<(Uuid, String, String)> {
        let user = Uuid::new_v4();
        let token = self.cluster.token(user, Role::Player);
        let joined = self.api(i, &token).join(&self.session, body).await?;
        let st = joined["connection_token"]
            .as_str()
            .context("connection_token")?
            .to_string();
        Ok((user, token, st))
    }

    /// Connects a tracked WebSocket client through router `i` and waits for its
    /// first full sync.
    pub async fn connect(
        &self,
        i: usize,
        name: &str,
        token: &str,
        session_token: &str,
    ) -> Result<TrackedClient> {
        self.connect_with(i, name, token, session_token, TokenStyle::Headers, None)
            .await
    }

    pub async fn connect_with(
        &self,
        i: usize,
        name: &str,
        token: &str,
        session_token: &str,
        style: TokenStyle,
        last_version: Option<u64>,
    ) -> Result<TrackedClient> {
        let ws = ws_connect(
            &self.ws(i),
            &self.session,
            token,
            session_token,
            last_version,
            style,
            self.cluster.cert.as_ref(),
        )
        .await
        .with_context(|| format!("{name}: connecting"))?;
        let c = TrackedClient::new(name, ws, true, None);
        c.wait_for("connection_established and initial state", WAIT, |v| {
            v.established.is_some() && (v.syncs > 0 || last_version.is_some())
        })
        .await?;
        Ok(c)
    }

    /// The session's `state_update` events as stored: command id → version.
    pub async fn stored_updates(&self) -> Result<Vec<(Uuid, u64)>> {
        let pg = self.cluster.pg().await?;
        let sid = Uuid::parse_str(&self.session)?;
        let rows = pg
            .query(
                "SELECT command_id, seq FROM session_events \
                 WHERE session_id = $1 AND event_type = 'state_update' ORDER BY seq",
                &[&sid],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, Uuid>(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    /// Number of events stored for the session.
    pub async fn stored_event_count(&self) -> Result<i64> {
        let pg = self.cluster.pg().await?;
        let sid = Uuid::parse_str(&self.session)?;
        Ok(pg
            .query_one(
                "SELECT count(*) FROM session_events WHERE session_id = $1",
                &[&sid],
            )
            .await?
            .get(0))
    }

    pub async fn shutdown(self) {
        self.cluster.shutdown().await;
    }
}

/// Ends a test: dumps the members' logs when it failed, stops the cluster and drops
/// its database, and returns the test's result.
pub async fn finish(f: Fixture, result: Result<()>) -> Result<()> {
    if result.is_err() {
        f.cluster.dump_logs(40);
    }
    f.shutdown().await;
    result
}

/// A `state_update` setting one path.
pub fn set(path: &str, value: Value) -> Value {
    json!({ "changes": [{ "path": path, "value": value }] })
}
