//! `cluster`: run a local cluster and operate it.
//!
//! ```text
//! cluster up [--nodes N] [--routers R] [--tls]   start services' schema, N nodes, R routers
//!            [--redis-lock-quorum K]              (and K local redis-servers for the lock)
//! cluster token --user UUID --role ROLE           mint an access token
//! cluster status                                  members, owners, health
//! cluster kill ID | pause ID | resume ID          SIGKILL / SIGSTOP / SIGCONT a member
//! cluster add-node                                start one more node
//! cluster scale [--nodes N] [--routers M]         grow (start, wait ready) or shrink
//!                                                 (drain, largest index first)
//! cluster restart --rolling                       replace every node, then every router
//! cluster migrate                                 create the database, apply migrations
//! cluster bench [...]                             load generator (see --help)
//! ```

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cluster::client::{cluster_info, http_client, Api};
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::scale::{self, Members, StateCluster};
use cluster::stand_ins::{Behaviour, Fixture, StandIns};
use cluster::state::{pid_alive, ClusterState, MemberState};
use cluster::tls::DevCert;
use gs_shared::auth::{Authority, Role};
use gs_shared::config::Config;
use gs_shared::membership::MemberKind;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// mimalloc instead of glibc's malloc: the services allocate many small, short-lived
/// buffers per message (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cluster",
    about = "Local Game Session Service cluster: launcher and operator CLI"
)]
struct Cli {
    /// Base configuration file (defaults < file < GS_* environment).
    #[arg(long, global = true, env = "GS_CONFIG")]
    config: Option<PathBuf>,
    /// Working directory of `up` (configs, logs, state, certificate).
    #[arg(long, global = true, default_value = ".cluster")]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster and keep it running until Ctrl-C.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        routers: usize,
        /// Serve https/wss with a generated self-signed certificate.
        #[arg(long)]
        tls: bool,
        /// Start this many local redis-servers (free ports) as the ownership lock's
        /// independent masters (`redis.lock_urls`, Redlock); 0: the lock is on
        /// `redis.url`.
        #[arg(long, default_value_t = 0)]
        redis_lock_quorum: usize,
        /// Start this many local nats-servers (free ports) joined by routes as a NATS
        /// cluster, and give every process all their URLs (`nats.url`); 0: `nats.url`
        /// as configured.
        #[arg(long, default_value_t = 0)]
        nats_cluster: usize,
        /// Do not start the stand-ins of the Character, Campaign, LLM and Image
        /// services (character lookups are then off too).
        #[arg(long)]
        no_stand_ins: bool,
        /// Fixture directory of the stand-ins (default: the repository's
        /// `config/stand-ins`).
        #[arg(long)]
        fixtures: Option<PathBuf>,
    },
    /// Run only the stand-ins of the Character, Campaign, LLM and Image services on
    /// the configured RabbitMQ (requests exchange: `services.exchange`, else
    /// `rabbitmq.inbound_exchange`), until Ctrl-C.
    StandIns {
        /// Fixture directory (default: the repository's `config/stand-ins`).
        #[arg(long)]
        fixtures: Option<PathBuf>,
        /// Milliseconds every stand-in waits before answering.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Share of requests answered with a retryable error (0.0–1.0).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// Take requests and never answer.
        #[arg(long)]
        silent: bool,
        /// Seed of the error draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Mint an access token with the configured secret.
    Token {
        #[arg(long)]
        user: Option<Uuid>,
        #[arg(long, default_value = "player")]
        role: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl: u64,
    },
    /// Show the running cluster: members, health, ring, sessions per node.
    Status,
    /// SIGKILL a member.
    Kill { id: String },
    /// SIGSTOP a member.
    Pause { id: String },
    /// SIGCONT a member.
    Resume { id: String },
    /// Start one more node in the running cluster.
    AddNode,
    /// Change the running cluster's size: new members are started and waited for
    /// (ready, on every router's ring); removed ones are drained (SIGTERM: planned
    /// handoff of a node's sessions, 1001 to a router's clients), largest index first.
    Scale {
        /// Nodes the cluster should have.
        #[arg(long)]
        nodes: Option<usize>,
        /// Routers the cluster should have.
        #[arg(long)]
        routers: Option<usize>,
    },
    /// Replace members one at a time: start a replacement, wait until it is ready,
    /// drain the old one; every node first, then every router.
    Restart {
        /// One at a time (the only mode).
        #[arg(long)]
        rolling: bool,
    },
    /// Create the database if needed and apply migrations.
    Migrate,
    /// Load generator: P clients on each of S sessions send changes at a rate for a
    /// duration; reports ack and fan-out latency, throughput and stream anomalies.
    Bench {
        /// Sessions.
        #[arg(long, default_value_t = 20)]
        sessions: usize,
        /// WebSocket clients per session (the DM and players).
        #[arg(long, default_value_t = 5)]
        clients: usize,
        /// Changes per second each client sends.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Seconds of load measured (after the warm-up).
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Seconds of load before the measured window, excluded from every figure.
        #[arg(long, default_value_t = 5.0)]
        warmup: f64,
        /// Open loop: every client sends on its schedule without waiting for answers;
        /// latency starts at the scheduled time.
        #[arg(long)]
        open_loop: bool,
        /// Keys each client cycles through (`/c{client}/k{n mod keys}`), so the state
        /// document stays bounded.
        #[arg(long, default_value_t = 64)]
        keys: usize,
        /// Instead of the workload: hold this many idle WebSocket connections on
        /// router 0 and report its resident memory per connection.
        #[arg(long)]
        idle: Option<usize>,
        /// Nodes of the cluster the bench starts (ignored with --attach).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Routers of the cluster the bench starts (ignored with --attach).
        #[arg(long, default_value_t = 2)]
        routers: usize,
        /// Serve wss in the cluster the bench starts.
        #[arg(long)]
        tls: bool,
        /// Runtime threads of each node the bench starts (`node.worker_threads`; 0 =
        /// one per core). Where the nodes outnumber the cores, 1 carries more load at
        /// saturation and adds latency at light load (BENCHMARKS.md, stop 27).
        #[arg(long)]
        node_workers: Option<usize>,
        /// Load the cluster `cluster up` runs (in --dir) instead of starting one; its
        /// rate limits apply.
        #[arg(long)]
        attach: bool,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    gs_shared::alloc::keep_freed_memory();
    let cli = Cli::parse();
    gs_shared::telemetry::init(&gs_shared::config::LogConfig {
        filter: "warn".into(),
        format: "text".into(),
    });
    gs_shared::telemetry::install_crypto_provider();
    match cli.cmd {
        Cmd::Up {
            nodes,
            routers,
            tls,
            redis_lock_quorum,
            nats_cluster,
            no_stand_ins,
            fixtures,
        } => {
            let stand_ins = (!no_stand_ins).then(|| fixtures.unwrap_or_else(Fixture::default_dir));
            let spec = UpSpec {
                nodes,
                routers,
                tls,
                redis_lock_quorum,
                nats_cluster,
                stand_ins,
            };
            up(&cli.dir, cli.config.as_deref(), spec).await
        }
        Cmd::StandIns {
            fixtures,
            delay_ms,
            error_rate,
            silent,
            seed,
        } => {
            let behaviour = Behaviour {
                delay: Duration::from_millis(delay_ms),
                error_rate,
                silent,
            };
            let dir = fixtures.unwrap_or_else(Fixture::default_dir);
            run_stand_ins(cli.config.as_deref(), &dir, behaviour, seed).await
        }
        Cmd::Token { user, role, ttl } => {
            let cfg = load_config(&cli.dir, cli.config.as_deref())?;
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let auth = Authority::from_config(&cfg.auth);
            println!(
                "{}",
                auth.mint_access(user.unwrap_or_else(Uuid::new_v4), role, ttl)
            );
            Ok(())
        }
        Cmd::Status => status(&cli.dir).await,
        Cmd::Kill { id } => signal(&cli.dir, &id, libc::SIGKILL, "killed"),
        Cmd::Pause { id } => signal(&cli.dir, &id, libc::SIGSTOP, "paused"),
        Cmd::Resume { id } => signal(&cli.dir, &id, libc::SIGCONT, "resumed"),
        Cmd::AddNode => add_node(&cli.dir).await,
        Cmd::Scale { nodes, routers } => scale_to(&cli.dir, nodes, routers).await,
        Cmd::Restart { rolling } => restart(&cli.dir, rolling).await,
        Cmd::Bench {
            sessions,
            clients,
            rate,
            duration,
            warmup,
            open_loop,
            keys,
            idle,
            nodes,
            routers,
            tls,
            node_workers,
            attach,
            json,
        } => {
            let spec = cluster::bench::BenchSpec {
                sessions,
                clients_per_session: clients,
                rate,
                duration_secs: duration,
                warmup_secs: warmup,
                open_loop,
                keys,
            };
            bench(
                &cli.dir,
                cli.config.as_deref(),
                spec,
                idle,
                nodes,
                routers,
                tls,
                node_workers,
                attach,
                json,
            )
            .await
        }
        Cmd::Migrate => {
            let cfg = Config::load(cli.config.as_deref())?;
            let applied = gs_shared::db::migrate(&cfg.postgres).await?;
            println!(
                "database {} at {}:{} is up to date (applied now: {:?})",
                cfg.postgres.dbname, cfg.postgres.host, cfg.postgres.port, applied
            );
            Ok(())
        }
    }
}

/// `cluster stand-ins`: the other services' stand-ins, all with `behaviour`, until
/// Ctrl-C.
async fn run_stand_ins(
    config: Option<&std::path::Path>,
    fixtures: &std::path::Path,
    behaviour: Behaviour,
    seed: u64,
) -> Result<()> {
    let cfg = Config::load(config)?;
    let s = start_stand_ins(&cfg, fixtures, seed).await?;
    for service in cluster::stand_ins::SERVICES {
        s.set(service, behaviour);
    }
    gs_shared::telemetry::shutdown_signal().await;
    s.stop().await;
    Ok(())
}

/// `cluster scale`: the running cluster of `dir` to `nodes` nodes and `routers` routers.
async fn scale_to(
    dir: &std::path::Path,
    nodes: Option<usize>,
    routers: Option<usize>,
) -> Result<()> {
    if nodes.is_none() && routers.is_none() {
        bail!("nothing to do: give --nodes and/or --routers");
    }
    let mut c = StateCluster::open(dir)?;
    scale::scale(&mut c, nodes, routers, print_step).await?;
    println!(
        "cluster has {} nodes and {} routers",
        c.running(MemberKind::Node).len(),
        c.running(MemberKind::Router).len()
    );
    Ok(())
}

/// `cluster restart --rolling`: every node, then every router, replaced in turn.
async fn restart(dir: &std::path::Path, rolling: bool) -> Result<()> {
    if !rolling {
        bail!("only rolling restarts are supported: `cluster restart --rolling`");
    }
    let mut c = StateCluster::open(dir)?;
    let done = scale::restart_rolling(&mut c, print_step).await?;
    println!("rolling restart done: {} steps", done.len());
    Ok(())
}

/// The configuration `up` runs with: the given file, else the one a previous `up`
/// wrote, else defaults; a JWT secret is generated (and kept) when none is set.
fn load_config(dir: &Path, file: Option<&Path>) -> Result<Config> {
    let saved = dir.join("cluster.toml");
    let file = file
        .map(Path::to_path_buf)
        .or_else(|| saved.exists().then_some(saved));
    let cfg = Config::load(file.as_deref())?;
    if cfg.auth.jwt_secret.is_empty() {
        bail!("no JWT secret configured: pass --config, set GS_AUTH__JWT_SECRET, or run `cluster up` once");
    }
    Ok(cfg)
}

/// What `cluster up` starts.
struct UpSpec {
    nodes: usize,
    routers: usize,
    tls: bool,
    redis_lock_quorum: usize,
    nats_cluster: usize,
    /// The stand-ins' fixture directory; `None`: no stand-ins.
    stand_ins: Option<PathBuf>,
}

async fn up(dir: &Path, file: Option<&Path>, spec: UpSpec) -> Result<()> {
    let UpSpec {
        nodes,
        routers,
        tls,
        redis_lock_quorum,
        nats_cluster,
        stand_ins,
    } = spec;
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    refuse_if_running(&dir)?;
    let (mut base, saved) = dev_config(&dir, file)?;
    // Without stand-ins nobody answers character.get: a player's sheet is taken as sent.
    base.services.character_lookup = stand_ins.is_some();
    // Killed when `up` ends (kill_on_drop).
    let mut lock_servers = Vec::new();
    let mut lock_urls = Vec::new();
    for i in 0..redis_lock_quorum {
        let (child, url) = start_lock_redis(&dir, i).await?;
        println!("lock Redis {i}: {url}");
        lock_servers.push(child);
        lock_urls.push(url);
    }
    if !lock_urls.is_empty() {
        base.redis.lock_urls = lock_urls;
    }
    // Killed when `up` ends (kill_on_drop).
    let nats = match nats_cluster {
        0 => None,
        n => {
            let c = cluster::nats_cluster::NatsCluster::start_logging(n, Some(&dir)).await?;
            println!("NATS cluster {} of {n}: {}", c.name, c.url());
            base.nats.url = c.url();
            Some(c)
        }
    };
    println!(
        "starting {nodes} nodes and {routers} routers (logs in {}) ...",
        dir.display()
    );
    let spec = ClusterSpec {
        nodes,
        routers,
        tls,
        name: Some("dev".into()),
        dir: Some(dir.clone()),
        base,
        drop_database: false,
        node_patch: None,
    };
    let mut cluster = LocalCluster::start(spec).await?;
    // Stopped (their queues deleted) when `up` ends.
    let stand_ins = match &stand_ins {
        Some(fixtures) => {
            let s = start_stand_ins(&cluster.base, fixtures, 1).await?;
            println!(
                "stand-ins of the Character, Campaign, LLM and Image services: fixtures in {}",
                fixtures.display()
            );
            Some(s)
        }
        None => None,
    };
    let state = ClusterState {
        name: cluster.name.clone(),
        config: saved,
        cert: cluster.cert.as_ref().map(|c| c.cert_path.clone()),
        members: cluster
            .members
            .values()
            .map(|m| MemberState {
                id: m.id.clone(),
                kind: m.kind,
                pid: m.pid.unwrap_or(0),
                url: m.url.clone(),
                log: m.log.clone(),
                config: m.config.clone(),
            })
            .collect(),
    };
    state.save(&dir)?;
    let demo = Demo::create(&cluster).await?;
    print_banner(&cluster, &demo, tls);

    gs_shared::telemetry::shutdown_signal().await;
    println!("stopping ...");
    // Members started later by `add-node` are in the state file too.
    stop_members(&mut cluster, &ClusterState::load(&dir).unwrap_or(state)).await;
    cluster.shutdown().await;
    if let Some(s) = stand_ins {
        s.stop().await;
    }
    let _ = std::fs::remove_file(ClusterState::path(&dir));
    for mut c in lock_servers {
        let _ = c.kill().await;
    }
    if let Some(mut c) = nats {
        for i in 0..c.servers.len() {
            let _ = c.kill(i).await;
        }
    }
    println!("stopped");
    Ok(())
}

/// The stand-ins on `cfg`'s RabbitMQ and requests exchange, answering from `fixtures`.
async fn start_stand_ins(cfg: &Config, fixtures: &Path, seed: u64) -> Result<StandIns> {
    let fixture = Fixture::load(fixtures)?;
    let exchange = if cfg.services.exchange.is_empty() {
        &cfg.rabbitmq.inbound_exchange
    } else {
        &cfg.services.exchange
    };
    StandIns::start(&cfg.rabbitmq.url, exchange, fixture, seed).await
}

/// Starts a `redis-server` (no persistence) on a free local port for the ownership
/// lock and waits until it accepts connections; its URL.
async fn start_lock_redis(dir: &Path, i: usize) -> Result<(tokio::process::Child, String)> {
    let port = cluster::harness::free_port()?;
    let data = dir.join(format!("redis-lock-{i}"));
    std::fs::create_dir_all(&data)?;
    let log = std::fs::File::create(dir.join(format!("redis-lock-{i}.log")))?;
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&data)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting redis-server (scripts/services.sh installs it)")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if std::time::Instant::now() >= deadline {
            bail!("redis-server on port {port} did not start");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok((child, format!("redis://127.0.0.1:{port}")))
}

/// Refuses to start over a cluster whose processes still run.
fn refuse_if_running(dir: &Path) -> Result<()> {
    if let Ok(old) = ClusterState::load(dir) {
        if old.members.iter().any(|m| pid_alive(m.pid)) {
            bail!(
                "a cluster from {} is still running; stop it first (Ctrl-C in its terminal)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The configuration of a development cluster (the given file, else the one a
/// previous `up` wrote, else defaults; a JWT secret generated when none is set;
/// limits raised for many clients on 127.0.0.1), saved as `<dir>/cluster.toml`
/// (owner-only: it holds the secret). Returns it and the saved file's path.
fn dev_config(dir: &Path, file: Option<&Path>) -> Result<(Config, PathBuf)> {
    let saved = dir.join("cluster.toml");
    let mut base = Config::load(file.or_else(|| saved.exists().then_some(saved.as_path())))?;
    if base.auth.jwt_secret.is_empty() {
        base.auth.jwt_secret =
            format!("dev-{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    }
    // Development limits: the ICD's per-IP connection limit (10/min) would stop a
    // local demo with several clients on 127.0.0.1.
    base.limits.ws_connects_per_min_per_ip = base.limits.ws_connects_per_min_per_ip.max(600);
    // Local development: anyone may create and join (the stand-ins' campaign fixture
    // lists only its demo users).
    base.campaign.require_membership = false;
    // Likewise the cap on open sockets per IP (0 = none stays none).
    if base.router.max_sockets_per_ip > 0 {
        base.router.max_sockets_per_ip = base.router.max_sockets_per_ip.max(10_000);
    }
    std::fs::write(&saved, toml::to_string(&base)?)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&saved, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((base, saved))
}

/// What `up` prepares for a demo: a DM, a session, and what a client needs.
struct Demo {
    dm: Uuid,
    dm_token: String,
    /// The answer to the session's creation.
    session: serde_json::Value,
    player_token: String,
}

impl Demo {
    async fn create(cluster: &LocalCluster) -> Result<Demo> {
        let dm = Uuid::new_v4();
        let dm_token = cluster.token(dm, Role::Dm);
        let api = Api::new(cluster.http(), &cluster.router_urls()[0], &dm_token);
        let session = api.create_session("Demo session").await?;
        Ok(Demo {
            dm,
            dm_token,
            session,
            player_token: cluster.token(Uuid::new_v4(), Role::Player),
        })
    }

    fn field(&self, name: &str) -> &str {
        self.session[name].as_str().unwrap_or("")
    }
}

/// The members, the routers' URLs, the demo's tokens and session, and how to try it.
fn print_banner(cluster: &LocalCluster, demo: &Demo, tls: bool) {
    let routers_http = cluster.router_urls();
    let routers_ws = cluster.router_ws_urls();
    let dm_token = &demo.dm_token;
    println!();
    println!("cluster is up:");
    for m in cluster.members.values() {
        println!(
            "  {:<10} {:<7} pid {:<8} {}",
            m.id,
            m.kind,
            m.pid.unwrap_or(0),
            m.url
        );
    }
    if let Some(c) = &cluster.cert {
        println!(
            "\nTLS: self-signed certificate (trust it in clients): {}",
            c.cert_path.display()
        );
    }
    println!("\nrouters:");
    for (h, w) in routers_http.iter().zip(&routers_ws) {
        println!("  {h}   (WebSocket: {w}/api/v2/sessions/{{id}}/ws)");
    }
    println!("\ndemo DM user:   {}", demo.dm);
    println!("demo DM token:  {dm_token}");
    println!("demo session:   {}", demo.field("session_id"));
    println!("session token:  {}", demo.field("connection_token"));
    println!("websocket url:  {}", demo.field("websocket_url"));
    println!(
        "\ntry:  curl {}-H 'Authorization: Bearer {dm_token}' {}/api/v2/sessions/{}/state",
        if tls {
            "--cacert .cluster/dev-cert.pem "
        } else {
            ""
        },
        routers_http[0],
        demo.field("session_id")
    );
    println!("more tokens:  cargo run -q -p cluster -- token --role player");
    // The play page (served by every router): the DM's token rides in the URL
    // fragment, which the browser never sends to a server.
    println!(
        "\nplay page (DM):  {}/play/#token={dm_token}",
        routers_http[0]
    );
    println!("player token:    {}", demo.player_token);
    println!(
        "                 (players open the join link the page shows, adding #token=<their token>)"
    );
    println!("\nCtrl-C stops the cluster.");
}

/// SIGTERM to every member (a paused one is resumed first), then waits up to 15 s for
/// them to exit. This process's children are reaped (a zombie still answers
/// `kill(pid, 0)`); the others (`add-node` starts some) are watched by pid.
async fn stop_members(cluster: &mut LocalCluster, state: &ClusterState) {
    for m in &state.members {
        if pid_alive(m.pid) {
            // SAFETY: signals to processes this cluster started.
            unsafe {
                libc::kill(m.pid as i32, libc::SIGCONT);
                libc::kill(m.pid as i32, libc::SIGTERM);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    for m in cluster.members.values_mut() {
        if let Some(mut child) = m.child.take() {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                // Still running: `LocalCluster::shutdown` kills it.
                m.child = Some(child);
            }
        }
    }
    let own: Vec<u32> = cluster.members.values().filter_map(|m| m.pid).collect();
    let others_alive = || {
        let mut others = state.members.iter().filter(|m| !own.contains(&m.pid));
        others.any(|m| pid_alive(m.pid))
    };
    while others_alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn signal(dir: &Path, id: &str, sig: i32, what: &str) -> Result<()> {
    let state = ClusterState::load(dir)?;
    let m = state.member(id)?;
    if !pid_alive(m.pid) {
        bail!("{id} (pid {}) is not running", m.pid);
    }
    // SAFETY: a signal to a process the cluster started.
    if unsafe { libc::kill(m.pid as i32, sig) } != 0 {
        bail!("signal failed: {}", std::io::Error::last_os_error());
    }
    println!("{what} {id} (pid {})", m.pid);
    Ok(())
}

/// Starts one more node with the configuration of the cluster's first node (its own
/// id and port), records it in the state file and waits until it is ready and on every
/// router's ring. The node outlives this command; `up` stops it with the others.
async fn add_node(dir: &Path) -> Result<()> {
    let mut c = StateCluster::open(dir)?;
    let id = c.start_member(MemberKind::Node).await?;
    let state = ClusterState::load(dir)?;
    let m = state.member(&id)?;
    println!("added {id} (pid {}) at {}", m.pid, m.url);
    Ok(())
}

/// Progress of `scale` and `restart`.
fn print_step(d: &scale::Done) {
    match &d.step {
        scale::Step::Start(kind) => println!("started {kind} {} (ready in {:.1?})", d.id, d.took),
        scale::Step::Drain(_) => println!("drained {} (exited in {:.1?})", d.id, d.took),
    }
}

async fn status(dir: &Path) -> Result<()> {
    let state = ClusterState::load(dir)?;
    let cfg = Config::load(Some(&state.config))?;
    let cert = match &state.cert {
        Some(p) => Some(DevCert::load(p)?),
        None => None,
    };
    let http = http_client(cert.as_ref());
    let admin = Authority::from_config(&cfg.auth).mint_access(Uuid::new_v4(), Role::Admin, 300);
    println!("cluster {:?} ({})", state.name, dir.display());
    println!(
        "{:<10} {:<7} {:<8} {:<8} {:<10} url",
        "member", "kind", "pid", "process", "ready"
    );
    for m in &state.members {
        let alive = pid_alive(m.pid);
        let ready = if alive {
            match http.get(format!("{}/health/ready", m.url)).send().await {
                Ok(r) if r.status().is_success() => "ready",
                Ok(_) => "not ready",
                Err(_) => "no answer",
            }
        } else {
            "-"
        };
        println!(
            "{:<10} {:<7} {:<8} {:<8} {:<10} {}",
            m.id,
            m.kind,
            m.pid,
            if alive { "running" } else { "gone" },
            ready,
            m.url
        );
    }
    for r in state
        .members
        .iter()
        .filter(|m| m.kind == MemberKind::Router && pid_alive(m.pid))
    {
        match cluster_info(&http, &r.url, &admin).await {
            Ok(v) => {
                println!(
                    "\nmembership as {} sees it: ring version {}, fingerprint {}",
                    r.id, v["ring_version"], v["ring_fingerprint"]
                );
                println!(
                    "{:<10} {:<7} {:<9} {:<8} {:<10} owns",
                    "member", "kind", "state", "on ring", "last seen"
                );
                for m in v["members"].as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<7} {:<9} {:<8} {:<10} {}",
                        m["id"].as_str().unwrap_or(""),
                        m["kind"].as_str().unwrap_or(""),
                        m["state"].as_str().unwrap_or(""),
                        m["on_ring"].to_string(),
                        format!("{}ms", m["last_seen_ms"]),
                        if m["kind"] == "node" {
                            format!("{} sessions", m["load"])
                        } else {
                            format!("{} connections", m["load"])
                        }
                    );
                }
                break;
            }
            Err(e) => println!("\n{}: {e}", r.id),
        }
    }
    Ok(())
}

/// The cluster `cluster up` runs in `dir`: how to reach it, and its live processes
/// (pid, kind).
fn attached(dir: &Path) -> Result<(cluster::load::Target, Vec<(u32, MemberKind)>)> {
    let state = ClusterState::load(dir)?;
    let cfg = Config::load(Some(&state.config))?;
    let cert = match &state.cert {
        Some(p) => Some(DevCert::load(p)?),
        None => None,
    };
    let live: Vec<_> = state.members.iter().filter(|m| pid_alive(m.pid)).collect();
    let routers_http: Vec<String> = live
        .iter()
        .filter(|m| m.kind == MemberKind::Router)
        .map(|m| m.url.clone())
        .collect();
    let routers_ws = routers_http
        .iter()
        .map(|u| {
            u.replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1)
        })
        .collect();
    let target = cluster::load::Target {
        routers_http,
        routers_ws,
        http: http_client(cert.as_ref()),
        cert,
        auth: Authority::from_config(&cfg.auth),
    };
    Ok((target, live.iter().map(|m| (m.pid, m.kind)).collect()))
}

/// The bench's own cluster: test settings (or `file`'s), quiet logs, room for `idle`
/// connections.
async fn bench_cluster(
    file: Option<&Path>,
    nodes: usize,
    routers: usize,
    tls: bool,
    node_workers: Option<usize>,
    idle: Option<usize>,
) -> Result<LocalCluster> {
    let mut cspec = ClusterSpec::test(nodes, routers);
    if let Some(f) = file {
        // The file's settings (limits, timings) instead of the test defaults.
        let secret = cspec.base.auth.jwt_secret.clone();
        cspec.base = Config::load(Some(f))?;
        if cspec.base.auth.jwt_secret.is_empty() {
            cspec.base.auth.jwt_secret = secret;
        }
    }
    cspec.tls = tls;
    // Warnings only; lapin warns on every returned (unroutable) hub message, and
    // nobody consumes the hub's events in a bench.
    cspec.base.log.filter = "warn,lapin::returned_messages=error".into();
    if let Some(n) = node_workers {
        cspec.base.node.worker_threads = n;
    }
    if let Some(n) = idle {
        cspec.base.router.max_connections = cspec.base.router.max_connections.max(n + 1000);
    }
    eprintln!("starting {nodes} nodes and {routers} routers ...");
    LocalCluster::start(cspec).await
}

#[allow(clippy::too_many_arguments)]
async fn bench(
    dir: &Path,
    file: Option<&Path>,
    spec: cluster::bench::BenchSpec,
    idle: Option<usize>,
    nodes: usize,
    routers: usize,
    tls: bool,
    node_workers: Option<usize>,
    attach: bool,
    json: Option<PathBuf>,
) -> Result<()> {
    // The cluster's processes: (pid, kind), routers in order.
    let (target, own, members) = if attach {
        let (target, members) = attached(dir)?;
        (target, None, members)
    } else {
        let c = bench_cluster(file, nodes, routers, tls, node_workers, idle).await?;
        let members: Vec<(u32, MemberKind)> = c
            .members
            .values()
            .filter_map(|m| m.pid.map(|p| (p, m.kind)))
            .collect();
        (cluster::load::Target::of(&c), Some(c), members)
    };
    let pids: Vec<u32> = members.iter().map(|(p, _)| *p).collect();
    let text = match idle {
        Some(n) => {
            let router = members
                .iter()
                .find(|(_, k)| *k == MemberKind::Router)
                .map(|(p, _)| *p)
                .context("no router")?;
            eprintln!("opening {n} idle connections on router 0 ...");
            let report = cluster::bench::idle(&target, n, router).await;
            if let Some(c) = own {
                c.shutdown().await;
            }
            let report = report?;
            print!("{}", report.table());
            serde_json::to_string_pretty(&report)?
        }
        None => {
            eprintln!(
                "running {} sessions x {} clients at {}/s each ({} loop): {} s warm-up, {} s measured ...",
                spec.sessions,
                spec.clients_per_session,
                spec.rate,
                if spec.open_loop { "open" } else { "closed" },
                spec.warmup_secs,
                spec.duration_secs
            );
            let report = cluster::bench::run(&target, &spec, &pids).await;
            if let Some(c) = own {
                c.shutdown().await;
            }
            let report = report?;
            print!("{}", report.table());
            serde_json::to_string_pretty(&report)?
        }
    };
    match json {
        Some(p) => std::fs::write(&p, text)?,
        None => println!("{text}"),
    }
    Ok(())
}
