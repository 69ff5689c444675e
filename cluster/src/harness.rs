//! A local cluster of real processes: `gs-node` and `gs-router` children with
//! generated configs, used by `cluster up`, the integration and chaos tests, and
//! `cluster bench`.
//!
//! Every cluster gets its own namespace, so clusters (and tests running in parallel)
//! share the machine's PostgreSQL, Redis, NATS and RabbitMQ without seeing each other:
//! a NATS subject prefix, a Redis key prefix, a PostgreSQL database and RabbitMQ
//! exchange/queue names, all derived from the cluster's name.
//!
//! Children are killed when the [`LocalCluster`] is dropped; their output goes to
//! log files in the cluster's directory (printed by [`LocalCluster::dump_logs`]).

use crate::tls::DevCert;
use anyhow::{bail, Context, Result};
use gs_shared::auth::{Authority, Role};
use gs_shared::config::Config;
use gs_shared::membership::MemberKind;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// How long a process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub routers: usize,
    pub tls: bool,
    /// Namespace; generated when `None`.
    pub name: Option<String>,
    /// Working directory (configs, logs, certificate); a temp dir when `None`.
    pub dir: Option<PathBuf>,
    /// The base configuration every process starts from (services, limits, timings).
    pub base: Config,
    /// Whether the PostgreSQL database is dropped with the cluster (tests).
    pub drop_database: bool,
    /// Changes one node's configuration (by node id), e.g. a fault hook on one node.
    pub node_patch: Option<fn(&str, &mut Config)>,
}

impl ClusterSpec {
    /// A test cluster: private namespace and database, generous rate limits, fast
    /// timings, the services at their standard local addresses (or `GS_*` env).
    pub fn test(nodes: usize, routers: usize) -> ClusterSpec {
        let mut base = Config::load(None).unwrap_or_default();
        base.auth.jwt_secret = format!("test-secret-{}", Uuid::new_v4().simple());
        base.limits.ws_connects_per_min_per_ip = 100_000;
        base.limits.ws_messages_per_min_per_conn = 100_000;
        base.limits.combat_actions_per_min_per_player = 100_000;
        base.limits.combat_actions_per_min_per_dm = 100_000;
        base.limits.sessions_created_per_hour_per_user = 100_000;
        base.limits.state_updates_per_min_per_session = 100_000;
        base.limits.joins_per_min_per_session = 100_000;
        // Every test client connects from 127.0.0.1.
        base.router.max_sockets_per_ip = 0;
        // No Campaign or Character Service unless a test starts the stand-ins
        // (`tests/orchestration.rs` turns these back on): sessions are open and a
        // player's join sheet is taken as sent.
        base.campaign.require_membership = false;
        base.services.character_lookup = false;
        ClusterSpec {
            nodes,
            routers,
            tls: false,
            name: None,
            dir: None,
            base,
            drop_database: true,
            node_patch: None,
        }
    }
}

/// One child process.
pub struct Member {
    pub id: String,
    pub kind: MemberKind,
    pub child: Option<Child>,
    pub pid: Option<u32>,
    /// Router: REST base (`http(s)://…`); node: health base (`http://…`).
    pub url: String,
    pub log: PathBuf,
    pub config: PathBuf,
}

pub struct LocalCluster {
    pub name: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub base: Config,
    pub cert: Option<DevCert>,
    pub members: BTreeMap<String, Member>,
    pub auth: Authority,
    bin_dir: PathBuf,
    next_node: usize,
    drop_database: bool,
    node_patch: Option<fn(&str, &mut Config)>,
    /// The routers' front door, once [`LocalCluster::open_front`] has opened it; kept
    /// pointing at the live routers.
    pub front: Option<crate::front::Front>,
}

/// A free TCP port on loopback (bound and released; the OS does not hand it out again
/// at once).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where `gs-node` and `gs-router` are: `GS_BIN_DIR`, else beside the current
/// executable, else its parent (test binaries live in `target/<profile>/deps`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("GS_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d.join("gs-node").exists() && d.join("gs-router").exists() {
            return Ok(d);
        }
        dir = d.parent().map(Path::to_path_buf);
        if dir.as_ref().is_some_and(|d| d.ends_with("target")) {
            break;
        }
    }
    bail!(
        "gs-node and gs-router binaries not found next to {} — build them first \
         (`cargo build --bins`, which scripts/test.sh and scripts/up.sh do) or set GS_BIN_DIR",
        exe.display()
    )
}

/// A member process just started.
pub struct Launched {
    pub child: Child,
    /// Its configuration file and its log.
    pub config: PathBuf,
    pub log: PathBuf,
}

/// Starts a `gs-node` or `gs-router` (from `bin_dir`) with `cfg`, written to
/// `<dir>/<id>.toml`; its output is appended to `<dir>/<id>.log`. With `kill_on_drop`
/// it dies with its [`Child`] (the harness's own members); without, it outlives the
/// caller (`cluster add-node`).
pub fn launch(
    bin_dir: &Path,
    dir: &Path,
    id: &str,
    kind: MemberKind,
    cfg: &Config,
    kill_on_drop: bool,
) -> Result<Launched> {
    let config = dir.join(format!("{id}.toml"));
    std::fs::write(&config, toml::to_string(cfg)?)?;
    let log = dir.join(format!("{id}.log"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let bin = bin_dir.join(match kind {
        MemberKind::Node => "gs-node",
        MemberKind::Router => "gs-router",
    });
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .env_remove("GS_CONFIG")
        .env(
            "RUST_LOG",
            std::env::var("GS_CHILD_LOG").unwrap_or_else(|_| cfg.log.filter.clone()),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(kill_on_drop)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Launched { child, config, log })
}

/// A node's configuration: `base` with its id and health port.
pub fn node_config(base: &Config, id: &str, port: u16) -> Config {
    let mut cfg = base.clone();
    cfg.node.id = id.to_string();
    cfg.node.http_listen = format!("127.0.0.1:{port}");
    cfg
}

/// A router's configuration: `base` with its id and listen port.
pub fn router_config(base: &Config, id: &str, port: u16) -> Config {
    let mut cfg = base.clone();
    cfg.router.id = id.to_string();
    cfg.router.listen = format!("127.0.0.1:{port}");
    cfg
}

/// Whether a member's `/health/ready` answers 200.
pub async fn is_ready(http: &reqwest::Client, url: &str) -> bool {
    match http.get(format!("{url}/health/ready")).send().await {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

/// Waits until a member's `/health/ready` answers 200, at most [`READY_TIMEOUT`].
pub async fn wait_until_ready(http: &reqwest::Client, id: &str, url: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !is_ready(http, url).await {
        if Instant::now() > deadline {
            bail!("{id} did not become ready in {READY_TIMEOUT:?}; see its log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

impl LocalCluster {
    /// Prepares the namespace (database, migrations, certificate) and starts the
    /// processes, returning once every router is ready and sees every node.
    pub async fn start(spec: ClusterSpec) -> Result<LocalCluster> {
        gs_shared::telemetry::install_crypto_provider();
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("t{}", &Uuid::new_v4().simple().to_string()[..10]));
        let (dir, tmp) = match &spec.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("gs-{name}-"))
                    .tempdir()?;
                // GS_KEEP_LOGS=1 keeps the directory (the members' logs) for a look.
                if std::env::var_os("GS_KEEP_LOGS").is_some() {
                    (t.keep(), None)
                } else {
                    (t.path().to_path_buf(), Some(t))
                }
            }
        };
        let mut base = spec.base.clone();
        if spec.name.is_none() || spec.drop_database {
            // Private namespace for this cluster.
            base.nats.subject_prefix = format!("gs_{name}");
            base.redis.key_prefix = format!("{name}:");
            base.postgres.dbname = format!("gs_{name}");
            base.rabbitmq.exchange = format!("{name}.sessions");
            base.rabbitmq.inbound_exchange = format!("{name}.hub");
            base.rabbitmq.inbound_queue = format!("{name}.inbound");
            base.rabbitmq.dead_letter_exchange = format!("{name}.dead-letter");
            base.rabbitmq.dead_letter_queue = format!("{name}.dead-letter");
        }
        if base.auth.jwt_secret.is_empty() {
            bail!("auth.jwt_secret is not set");
        }
        gs_shared::db::migrate(&base.postgres)
            .await
            .context("creating the database and applying migrations")?;
        let cert = if spec.tls {
            Some(DevCert::generate(&dir)?)
        } else {
            None
        };
        let auth = Authority::from_config(&base.auth);
        let mut cluster = LocalCluster {
            name,
            dir,
            _tmp: tmp,
            base,
            cert,
            members: BTreeMap::new(),
            auth,
            bin_dir: bin_dir()?,
            next_node: 1,
            drop_database: spec.drop_database,
            node_patch: spec.node_patch,
            front: None,
        };
        for _ in 0..spec.nodes {
            cluster.spawn_node().await?;
        }
        for i in 1..=spec.routers {
            cluster.spawn_router(&format!("router-{i}")).await?;
        }
        let nodes = cluster.node_ids();
        cluster.wait_ready(&nodes).await?;
        Ok(cluster)
    }

    async fn spawn(&mut self, id: &str, kind: MemberKind, cfg: Config, url: String) -> Result<()> {
        let launched = launch(&self.bin_dir, &self.dir, id, kind, &cfg, true)?;
        let pid = launched.child.id();
        self.members.insert(
            id.to_string(),
            Member {
                id: id.to_string(),
                kind,
                child: Some(launched.child),
                pid,
                url,
                log: launched.log,
                config: launched.config,
            },
        );
        Ok(())
    }

    /// Starts one more node (`node-N`) and returns its id; it is not waited for.
    pub async fn spawn_node(&mut self) -> Result<String> {
        let id = format!("node-{}", self.next_node);
        self.next_node += 1;
        let port = free_port()?;
        let mut cfg = node_config(&self.base, &id, port);
        if let Some(patch) = self.node_patch {
            patch(&id, &mut cfg);
        }
        let url = format!("http://127.0.0.1:{port}");
        self.spawn(&id, MemberKind::Node, cfg, url).await?;
        Ok(id)
    }

    async fn spawn_router(&mut self, id: &str) -> Result<()> {
        let port = free_port()?;
        let mut cfg = router_config(&self.base, id, port);
        let scheme = if let Some(c) = &self.cert {
            cfg.router.tls_cert = c.cert_path.display().to_string();
            cfg.router.tls_key = c.key_path.display().to_string();
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://127.0.0.1:{port}");
        self.spawn(id, MemberKind::Router, cfg, url).await
    }

    /// Adds a node and waits until every router has it on its ring.
    pub async fn add_node(&mut self) -> Result<String> {
        let id = self.spawn_node().await?;
        self.wait_ready(std::slice::from_ref(&id)).await?;
        Ok(id)
    }

    /// Adds a router (the next free `router-N`), waits until it is ready and sees
    /// every node, and puts it behind the front door.
    pub async fn add_router(&mut self) -> Result<String> {
        let ids: Vec<String> = self.members.keys().cloned().collect();
        let id = crate::scale::next_id(MemberKind::Router, &ids);
        self.spawn_router(&id).await?;
        let nodes = self.node_ids();
        self.wait_ready(&nodes).await?;
        self.sync_front();
        Ok(id)
    }

    /// Drains a member: off the front door first (a router), then SIGTERM, then waits
    /// until it has exited (at most [`crate::scale::EXIT_TIMEOUT`]).
    pub async fn drain(&mut self, id: &str) -> Result<()> {
        if let Some(front) = &self.front {
            let url = self
                .members
                .get(id)
                .map(|m| m.url.clone())
                .unwrap_or_default();
            let gone = crate::front::host_port(&url);
            front.set_backends(
                front
                    .backends()
                    .into_iter()
                    .filter(|b| *b != gone)
                    .collect(),
            );
        }
        self.signal(id, libc::SIGTERM)?;
        let m = self.members.get_mut(id).context("no such member")?;
        if let Some(mut c) = m.child.take() {
            match tokio::time::timeout(crate::scale::EXIT_TIMEOUT, c.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    m.child = Some(c);
                    bail!(
                        "{id} did not exit within {:?} of SIGTERM",
                        crate::scale::EXIT_TIMEOUT
                    );
                }
            }
        }
        self.sync_front();
        Ok(())
    }

    /// Opens a front door for the routers (a local TCP forwarder, as a load balancer
    /// in front of them); returns its `host:port`. It follows the routers this
    /// cluster starts and drains.
    pub async fn open_front(&mut self) -> Result<String> {
        let front = crate::front::Front::start(self.router_backends()).await?;
        let addr = front.addr.clone();
        self.front = Some(front);
        Ok(addr)
    }

    fn router_backends(&self) -> Vec<String> {
        self.router_urls()
            .iter()
            .map(|u| crate::front::host_port(u))
            .collect()
    }

    /// Points the front door (if open) at the running routers.
    fn sync_front(&self) {
        if let Some(front) = &self.front {
            front.set_backends(self.router_backends());
        }
    }

    pub fn node_ids(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.kind == MemberKind::Node && m.child.is_some())
            .map(|m| m.id.clone())
            .collect()
    }

    pub fn router_urls(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.kind == MemberKind::Router && m.child.is_some())
            .map(|m| m.url.clone())
            .collect()
    }

    /// `wss://…`/`ws://…` bases of the routers.
    pub fn router_ws_urls(&self) -> Vec<String> {
        self.router_urls()
            .into_iter()
            .map(|u| {
                u.replacen("https://", "wss://", 1)
                    .replacen("http://", "ws://", 1)
            })
            .collect()
    }

    pub fn admin_token(&self) -> String {
        self.auth
            .mint_access(Uuid::new_v4(), Role::Admin, 24 * 3600)
    }

    pub fn token(&self, user: Uuid, role: Role) -> String {
        self.auth.mint_access(user, role, 24 * 3600)
    }

    /// An HTTP client that trusts the cluster's development certificate.
    pub fn http(&self) -> reqwest::Client {
        crate::client::http_client(self.cert.as_ref())
    }

    /// Waits until every process answers `/health/ready` and every router's ring
    /// holds `nodes`.
    pub async fn wait_ready(&mut self, nodes: &[String]) -> Result<()> {
        let http = self.http();
        let deadline = Instant::now() + READY_TIMEOUT;
        let admin = self.admin_token();
        // Members that were killed or stopped are not waited for.
        let ids: Vec<String> = self
            .members
            .values()
            .filter(|m| m.child.is_some())
            .map(|m| m.id.clone())
            .collect();
        for id in ids {
            let mut respawns = 0;
            loop {
                self.check_alive(&id, &mut respawns).await?;
                let m = &self.members[&id];
                let ok = is_ready(&http, &m.url).await
                    && match m.kind {
                        MemberKind::Router => {
                            let on_ring = crate::client::cluster_info(&http, &m.url, &admin)
                                .await
                                .map(|v| nodes_on_ring(&v))
                                .unwrap_or_default();
                            nodes.iter().all(|n| on_ring.contains(n))
                        }
                        MemberKind::Node => true,
                    };
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    self.dump_logs(40);
                    bail!("{id} did not become ready in {READY_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Fails if `id` exited during start-up, unless it only lost the race for its port
    /// ([`free_port`] releases the port before the process binds it; another process
    /// may take it meanwhile): then it is started again on another port, a few times.
    async fn check_alive(&mut self, id: &str, respawns: &mut u32) -> Result<()> {
        let m = self.members.get_mut(id).context("no such member")?;
        if let Some(child) = m.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                if log.contains("Address already in use") && *respawns < 3 {
                    *respawns += 1;
                    tracing::warn!(%id, "port taken by another process; starting again on another port");
                    return self.respawn_on_new_port(id).await;
                }
                bail!(
                    "{id} exited with {status} during start-up:\n{}",
                    tail(&log, 40)
                );
            }
        }
        Ok(())
    }

    /// Starts a member that exited again, with the same configuration on a new port.
    async fn respawn_on_new_port(&mut self, id: &str) -> Result<()> {
        let m = self.members.remove(id).context("no such member")?;
        let mut cfg: Config = toml::from_str(&std::fs::read_to_string(&m.config)?)?;
        let port = free_port()?;
        let url = if m.kind == MemberKind::Node {
            cfg.node.http_listen = format!("127.0.0.1:{port}");
            format!("http://127.0.0.1:{port}")
        } else {
            cfg.router.listen = format!("127.0.0.1:{port}");
            let scheme = if self.cert.is_some() { "https" } else { "http" };
            format!("{scheme}://127.0.0.1:{port}")
        };
        self.spawn(id, m.kind, cfg, url).await
    }

    fn signal(&self, id: &str, sig: i32) -> Result<()> {
        let m = self
            .members
            .get(id)
            .with_context(|| format!("no member {id}"))?;
        let pid = m.pid.with_context(|| format!("{id} has no pid"))?;
        // SAFETY: kill(2) with a pid we spawned and a standard signal number.
        let r = unsafe { libc::kill(pid as i32, sig) };
        if r != 0 {
            bail!(
                "kill({pid}, {sig}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILL, and reap.
    pub async fn kill(&mut self, id: &str) -> Result<()> {
        self.signal(id, libc::SIGKILL)?;
        if let Some(m) = self.members.get_mut(id) {
            if let Some(mut c) = m.child.take() {
                let _ = c.wait().await;
            }
        }
        self.sync_front();
        Ok(())
    }

    /// SIGTERM (graceful drain), and wait for the exit.
    pub async fn stop(&mut self, id: &str) -> Result<()> {
        self.signal(id, libc::SIGTERM)?;
        if let Some(m) = self.members.get_mut(id) {
            if let Some(mut c) = m.child.take() {
                let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
            }
        }
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<()> {
        self.signal(id, libc::SIGSTOP)
    }

    pub fn resume(&self, id: &str) -> Result<()> {
        self.signal(id, libc::SIGCONT)
    }

    /// Prints the last `lines` lines of every member's log (for failing tests).
    pub fn dump_logs(&self, lines: usize) {
        for m in self.members.values() {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            eprintln!(
                "----- {} ({}) -----\n{}",
                m.id,
                m.log.display(),
                tail(&log, lines)
            );
        }
    }

    /// A PostgreSQL client on the cluster's database.
    pub async fn pg(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) =
            gs_shared::db::pg_config(&self.base.postgres, &self.base.postgres.dbname, false)
                .connect(tokio_postgres::NoTls)
                .await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Stops every process (SIGKILL) and removes the private namespace: the database
    /// and the durable RabbitMQ queues and exchanges.
    pub async fn shutdown(mut self) {
        if let Ok(n) = std::env::var("GS_DUMP_LOGS") {
            // Debugging aid: the members' logs even when the test passed.
            self.dump_logs(n.parse().unwrap_or(2000));
        }
        self.kill_all().await;
        if self.drop_database {
            let _ =
                gs_shared::db::drop_database(&self.base.postgres, &self.base.postgres.dbname).await;
            delete_rabbit_topology(&self.base.rabbitmq).await;
        }
    }

    async fn kill_all(&mut self) {
        for m in self.members.values_mut() {
            if let Some(mut c) = m.child.take() {
                if let Some(pid) = m.pid {
                    // A paused process must be resumed to die cleanly.
                    // SAFETY: signals to a child we spawned.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGCONT);
                    }
                }
                let _ = c.kill().await;
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing assertion: the members' logs are the evidence.
            self.dump_logs(60);
        }
        for m in self.members.values_mut() {
            if let (Some(_), Some(pid)) = (m.child.as_ref(), m.pid) {
                // SAFETY: signals to children we spawned; kill_on_drop reaps them.
                unsafe {
                    libc::kill(pid as i32, libc::SIGCONT);
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
    }
}

/// Deletes a namespace's queues and exchanges (best effort).
async fn delete_rabbit_topology(c: &gs_shared::config::RabbitConfig) {
    let mut open = None;
    for url in c.urls() {
        if let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(5),
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
        )
        .await
        {
            open = Some(conn);
            break;
        }
    }
    let Some(conn) = open else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let retries =
            (1..=c.max_redeliveries.max(1)).map(|l| format!("{}.retry.{l}", c.inbound_queue));
        let holding = format!("{}.migrating", c.inbound_queue);
        for q in [
            c.inbound_queue.clone(),
            c.dead_letter_queue.clone(),
            holding,
        ]
        .into_iter()
        .chain(retries)
        {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
        for x in [&c.exchange, &c.inbound_exchange, &c.dead_letter_exchange] {
            let _ = ch
                .exchange_delete(x.as_str().into(), Default::default())
                .await;
        }
        let _ = ch.close(0, "clean-up".into()).await;
    }
    let _ = conn.close(0, "clean-up".into()).await;
}

/// The `nodes_on_ring` of a router's cluster view (`GET /api/v2/cluster`).
pub fn nodes_on_ring(v: &serde_json::Value) -> Vec<String> {
    v["nodes_on_ring"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
