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
use gs_shared::membership::MemberKind;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

pub use cluster;
pub use cluster::nats_cluster::NatsCluster;

pub mod cdp;
pub mod rabbit;
pub mod redis_cluster;

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
        let table = Table::create(&cluster, &http).await?;
        Ok(Fixture {
            cluster,
            http,
            dm: table.dm,
            dm_token: table.dm_token,
            session: table.session,
            session_token: table.session_token,
        })
    }

    /// Another session on the fixture's cluster, created by a DM of its own: cases
    /// that each need a fresh session can share one cluster.
    pub async fn table(&self) -> Result<Table> {
        Table::create(&self.cluster, &self.http).await
    }

    /// `method path` (with `body`) as `token` through router 0: the answer's status and
    /// error code.
    pub async fn rest(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Status> {
        self.rest_via(0, token, method, path, body).await
    }

    /// [`Fixture::rest`] through router `i`.
    pub async fn rest_via(
        &self,
        i: usize,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Status> {
        let r = self.api(i, token).call(method, path, body).await?;
        Ok(Status {
            status: r.status,
            code: r.code().to_string(),
        })
    }

    /// `GET path` as `token` through router 0: the answer's status and error code.
    pub async fn get(&self, token: &str, path: &str) -> Result<Status> {
        self.rest(token, reqwest::Method::GET, path, None).await
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

    /// Connects to another session than the fixture's.
    pub async fn connect_to(
        &self,
        i: usize,
        name: &str,
        session: &str,
        token: &str,
        session_token: &str,
    ) -> Result<TrackedClient> {
        self.connect_session(
            i,
            name,
            session,
            token,
            session_token,
            TokenStyle::Headers,
            None,
        )
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
        self.connect_session(
            i,
            name,
            &self.session,
            token,
            session_token,
            style,
            last_version,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn connect_session(
        &self,
        i: usize,
        name: &str,
        session: &str,
        token: &str,
        session_token: &str,
        style: TokenStyle,
        last_version: Option<u64>,
    ) -> Result<TrackedClient> {
        let ws = ws_connect(
            &self.ws(i),
            session,
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
        self.stored_event_count_of(&self.session).await
    }

    /// Number of events stored for `session`.
    pub async fn stored_event_count_of(&self, session: &str) -> Result<i64> {
        let pg = self.cluster.pg().await?;
        let sid = Uuid::parse_str(session)?;
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

    /// Sum of a counter over the nodes' `/metrics`.
    pub async fn node_counter(&self, name: &str) -> Result<f64> {
        node_counter(&self.cluster, name).await
    }

    /// Sum of a metric over the routers' `/metrics` (an operator's token).
    pub async fn router_metric(&self, name: &str) -> Result<f64> {
        let token = self.cluster.token(Uuid::new_v4(), Role::Admin);
        let mut total = 0.0;
        for url in self.cluster.router_urls() {
            let text = self
                .http
                .get(format!("{url}/metrics"))
                .bearer_auth(&token)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            anyhow::ensure!(text.contains(name), "{url}/metrics has no {name}");
            total += metric_sum(&text, name);
        }
        Ok(total)
    }
}

/// A session and its DM, as a fixture creates them.
pub struct Table {
    pub dm: Uuid,
    pub dm_token: String,
    pub session: String,
    pub session_token: String,
}

impl Table {
    /// A new DM creates a session through router 0.
    pub async fn create(cluster: &LocalCluster, http: &reqwest::Client) -> Result<Table> {
        let dm = Uuid::new_v4();
        let dm_token = cluster.token(dm, Role::Dm);
        let api = Api::new(http.clone(), &cluster.router_urls()[0], &dm_token);
        let created = api.create_session("integration test").await?;
        let field = |name: &str| {
            created[name]
                .as_str()
                .map(str::to_string)
                .with_context(|| name.to_string())
        };
        Ok(Table {
            dm,
            session: field("session_id")?,
            session_token: field("connection_token")?,
            dm_token,
        })
    }
}

/// A REST answer's HTTP status and error code (`""` when it has none); compares with
/// `(401, "missing_token")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub status: u16,
    pub code: String,
}

impl PartialEq<(u16, &str)> for Status {
    fn eq(&self, (status, code): &(u16, &str)) -> bool {
        self.status == *status && self.code == *code
    }
}

/// The REST path of a session's state.
pub fn state_path(session: &str) -> String {
    format!("/api/v2/sessions/{session}/state")
}

/// Sum of a counter over the running nodes' `/metrics`.
pub async fn node_counter(cluster: &LocalCluster, name: &str) -> Result<f64> {
    let http = cluster.http();
    let mut total = 0.0;
    for m in cluster
        .members
        .values()
        .filter(|m| m.kind == MemberKind::Node && m.child.is_some())
    {
        let text = http
            .get(format!("{}/metrics", m.url))
            .send()
            .await?
            .text()
            .await?;
        total += metric_sum(&text, name);
    }
    Ok(total)
}

/// Sum of `name`'s samples in a Prometheus text page.
fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Ends a test: dumps the members' logs when it failed, stops the cluster and drops
/// its database, and returns the test's result.
pub async fn finish(f: Fixture, result: Result<()>) -> Result<()> {
    finish_cluster(f.cluster, result).await
}

/// [`finish`] for tests that run a bare [`LocalCluster`].
pub async fn finish_cluster(cluster: LocalCluster, result: Result<()>) -> Result<()> {
    if result.is_err() {
        cluster.dump_logs(40);
    }
    cluster.shutdown().await;
    result
}

/// A `state_update` setting one path.
pub fn set(path: &str, value: Value) -> Value {
    json!({ "changes": [{ "path": path, "value": value }] })
}

/// Which node owns each session (by `sessions.owner_node`): node → session indexes.
pub async fn owners(
    c: &cluster::harness::LocalCluster,
    ids: &[String],
) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
    let pg = c.pg().await?;
    let uuids: Vec<Uuid> = ids
        .iter()
        .map(|s| Uuid::parse_str(s))
        .collect::<Result<_, _>>()?;
    let rows = pg
        .query(
            "SELECT id, owner_node FROM sessions WHERE id = ANY($1)",
            &[&uuids],
        )
        .await?;
    let mut out: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for r in rows {
        let id: Uuid = r.get(0);
        let owner: Option<String> = r.get(1);
        let idx = uuids.iter().position(|u| *u == id).unwrap();
        out.entry(owner.unwrap_or_default()).or_default().push(idx);
    }
    Ok(out)
}

/// Everything a workload must leave behind, whatever happened to the nodes:
///
/// * every client of a session reaches the session's newest acknowledged version with
///   no gap and no duplicate, and all of them hold the same state, equal to
///   `GET /state`;
/// * that state holds every acknowledged change;
/// * each acknowledged command is stored exactly once, at its acknowledged version,
///   and the stored versions have no hole.
pub async fn verify_workload(
    c: &cluster::harness::LocalCluster,
    ids: &[String],
    clients: &[cluster::load::LoadClient],
    records: &[cluster::load::Record],
) -> Result<()> {
    use std::collections::{BTreeMap, HashMap};
    let pg = c.pg().await?;
    let http = c.http();
    for (s, sid) in ids.iter().enumerate() {
        let session_clients: Vec<&cluster::load::LoadClient> =
            clients.iter().filter(|x| x.session == s).collect();
        let api = Api::new(http.clone(), &c.router_urls()[0], &session_clients[0].token);
        let state = api.get_state(sid).await?;
        let version = state["version_number"].as_u64().context("version")?;
        for lc in &session_clients {
            lc.client
                .wait_for(&format!("session {s} version {version}"), WAIT, |v| {
                    v.version >= version
                })
                .await?;
            let v = lc.client.view();
            anyhow::ensure!(
                v.gaps == 0 && v.duplicates == 0,
                "{}: {} gaps, {} duplicates",
                lc.client.name,
                v.gaps,
                v.duplicates
            );
            for w in v.events.windows(2) {
                anyhow::ensure!(
                    w[1].0 == w[0].0 + 1,
                    "{}: events out of order {:?}",
                    lc.client.name,
                    w
                );
            }
            anyhow::ensure!(
                v.doc == state["state"],
                "{}: state differs from GET /state",
                lc.client.name
            );
        }
        let missing = cluster::load::missing_changes(&state["state"], records, s);
        anyhow::ensure!(
            missing.is_empty(),
            "session {s}: acknowledged changes missing: {missing:?}"
        );

        let uuid = Uuid::parse_str(sid)?;
        let rows = pg
            .query(
                "SELECT seq, command_id FROM session_events WHERE session_id = $1 ORDER BY seq",
                &[&uuid],
            )
            .await?;
        let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        for (i, seq) in seqs.iter().enumerate() {
            anyhow::ensure!(
                *seq == i as i64 + 1,
                "session {s}: stored versions have a hole at {}",
                i + 1
            );
        }
        let mut stored: HashMap<Uuid, Vec<u64>> = HashMap::new();
        for r in &rows {
            if let Some(cmd) = r.get::<_, Option<Uuid>>(1) {
                stored
                    .entry(cmd)
                    .or_default()
                    .push(r.get::<_, i64>(0) as u64);
            }
        }
        let acked: BTreeMap<Uuid, u64> = records
            .iter()
            .filter(|r| r.session == s)
            .filter_map(|r| r.result.as_ref().ok().map(|v| (r.id, *v)))
            .collect();
        for (id, v) in &acked {
            anyhow::ensure!(
                stored.get(id) == Some(&vec![*v]),
                "session {s}: command {id} acked at {v} is stored as {:?}",
                stored.get(id)
            );
        }
    }
    Ok(())
}

/// A private `redis-server` or `nats-server` on a free port, for tests that stop a
/// dependency without disturbing the machine's shared instance. Killed on drop.
pub struct PrivateServer {
    pub kind: &'static str,
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

impl PrivateServer {
    pub async fn redis() -> Result<PrivateServer> {
        Self::start_new("redis").await
    }

    pub async fn nats() -> Result<PrivateServer> {
        Self::start_new("nats").await
    }

    async fn start_new(kind: &'static str) -> Result<PrivateServer> {
        let mut s = PrivateServer {
            kind,
            port: cluster::harness::free_port()?,
            dir: tempfile::tempdir()?,
            child: None,
        };
        s.start().await?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        match self.kind {
            "redis" => format!("redis://127.0.0.1:{}", self.port),
            _ => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    pub async fn start(&mut self) -> Result<()> {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            "redis" => {
                let mut c = tokio::process::Command::new("redis-server");
                c.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(self.dir.path());
                c
            }
            _ => {
                let mut c = tokio::process::Command::new("nats-server");
                c.args(["-a", "127.0.0.1", "-p", &port]);
                c
            }
        };
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {}-server (scripts/services.sh installs it)",
                    self.kind
                )
            })?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{}-server did not start",
                self.kind
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills it (SIGKILL) and waits until the port is closed.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }
}

/// The versions at which `command` of `session` is stored in the log (exactly one for an
/// applied command, none for a refused one).
pub async fn stored_versions_of(
    pg: &tokio_postgres::Client,
    session: Uuid,
    command: Uuid,
) -> Result<Vec<u64>> {
    let rows = pg
        .query(
            "SELECT seq FROM session_events WHERE session_id = $1 AND command_id = $2",
            &[&session, &command],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
}
