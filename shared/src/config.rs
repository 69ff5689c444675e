//! Configuration of every process: defaults < file < environment.
//!
//! One [`Config`] struct serves nodes, routers and the `cluster` CLI; each reads the
//! sections it needs. Layering (lowest first):
//!
//! 1. the defaults in this file (every field has one, except the JWT secret),
//! 2. an optional TOML file (`--config path`, or `GS_CONFIG`),
//! 3. environment variables `GS_<SECTION>__<FIELD>`, e.g. `GS_POSTGRES__HOST`,
//!    `GS_ROUTER__LISTEN`, `GS_AUTH__JWT_SECRET`.
//!
//! `config/example.toml` is a commented sample with every field and its default.
//! Every address, secret, rate limit and operational timeout is a field here; finer
//! internal timings are named constants beside the code that uses them.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Errors loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The longest `node.commit_linger_us` accepted.
pub const MAX_COMMIT_LINGER_US: u64 = 1_000_000;

/// The whole configuration. See `config/example.toml` for documentation of each field.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Config {
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub postgres: PostgresConfig,
    pub rabbitmq: RabbitConfig,
    pub auth: AuthConfig,
    pub router: RouterConfig,
    pub node: NodeConfig,
    pub membership: MembershipConfig,
    pub limits: LimitsConfig,
    pub document: DocumentConfig,
    pub log: LogConfig,
    pub services: ServicesConfig,
    pub campaign: CampaignConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsConfig {
    /// One NATS server, or the seed URLs of a NATS cluster, comma-separated
    /// (`nats://127.0.0.1:4222,nats://127.0.0.1:4223`; `GS_NATS__URL` takes the same
    /// form). The client connects to any of them and reconnects across all of them
    /// (and the servers the cluster advertises) when the one it uses goes away.
    pub url: String,
    /// First token of every subject, so several clusters can share one NATS server.
    pub subject_prefix: String,
    /// Timeout of one router→node request attempt; the router retries until
    /// `router.request_deadline_ms`.
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
}

impl NatsConfig {
    /// The seed URLs of `url`, trimmed, empty entries dropped.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "gs".into(),
            request_timeout_ms: 1000,
            connect_timeout_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// The primary Redis: rate-limit counters, the ICD cache keys, readiness.
    pub url: String,
    /// Independent Redis masters for the session ownership lock (Redlock: acquired,
    /// extended and released on a majority of them; the lock-holder record lives
    /// beside the lock on each). Empty (the default): the lock is on `url` alone.
    pub lock_urls: Vec<String>,
    /// A Redis Cluster for the rate-limit counters and the ICD cache keys, instead of
    /// `url` (seed URLs of any of its masters). When set, the session keys carry a
    /// hash tag (`session:{<id>}:meta`) so every multi-key script of one session stays
    /// on one slot. Empty (the default): `url`.
    pub cluster_urls: Vec<String>,
    /// Prefix of every key (the ICD keys become `{prefix}session:{id}:meta`, ...).
    pub key_prefix: String,
    /// Bound on every Redis round trip; past it the operation fails fast.
    pub op_timeout_ms: u64,
}

impl RedisConfig {
    /// The Redis instances of the ownership lock: `lock_urls`, or `url` when empty.
    pub fn lock_instances(&self) -> Vec<String> {
        if self.lock_urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.lock_urls.clone()
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            lock_urls: Vec::new(),
            cluster_urls: Vec::new(),
            key_prefix: String::new(),
            op_timeout_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PostgresConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The session_db of the ICD. Created if missing (see `db::ensure_database`).
    pub dbname: String,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    /// Server-side bound on any statement of a node.
    pub statement_timeout_ms: u64,
    /// A node stopped (SIGSTOP) inside a transaction must not hold row locks that a
    /// takeover waits on: PostgreSQL ends such a transaction after this long.
    pub idle_in_transaction_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: String::new(),
            dbname: "session_db".into(),
            pool_size: 16,
            connect_timeout_ms: 2000,
            statement_timeout_ms: 5000,
            idle_in_transaction_timeout_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RabbitConfig {
    /// One broker, or several brokers' URLs, comma-separated
    /// (`amqp://h1:5672/%2f,amqp://h2:5672/%2f`; `GS_RABBITMQ__URL` takes the same
    /// form). The hub connects to the first that answers, trying them in turn from the
    /// one that worked last, and does the same on every reconnect.
    pub url: String,
    /// Durable topic exchange the node publishes session events to.
    pub exchange: String,
    /// Durable queue shared by all nodes for inbound character/campaign events.
    pub inbound_queue: String,
    /// Exchange the hub's other services publish character/campaign events to.
    pub inbound_exchange: String,
    /// Dead-letter exchange and queue for inbound messages that cannot be applied.
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub prefetch: u16,
    /// Failed attempts of one inbound message (counted by the node in `x-gs-attempts`)
    /// before it is dead-lettered.
    pub max_redeliveries: u32,
    /// Broker-side poison limit of the inbound (quorum) queue, `x-delivery-limit`:
    /// a message delivered this many times without being acked (its consumers died or
    /// nacked it) is dead-lettered by the broker to `dead_letter_exchange`.
    pub delivery_limit: u32,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Events read back from the log per session and relay pass (after a restart, a
    /// takeover or an outage).
    pub outbox_batch: i64,
    /// Shortest time between two publishing passes of a node's relay: events committed
    /// meanwhile go out together (one message per session and routing key), at the
    /// price of at most this much extra delay on the hub.
    pub publish_interval_ms: u64,
    /// Messages a second a node's relay aims to stay under (0: no cap): a pass that
    /// published `m` messages waits at least `m / this` seconds (at most 1 s) before
    /// the next, so under load each session's events go out in fewer, larger
    /// batches; under light load `publish_interval_ms` alone applies.
    pub publish_max_messages_per_sec: u64,
    /// Whether the node runs the hub relay at all.
    pub enabled: bool,
}

impl RabbitConfig {
    /// The broker URLs of `url`, trimmed, empty entries dropped.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "gs.sessions".into(),
            inbound_queue: "gs.session-service.inbound".into(),
            inbound_exchange: "gs.hub".into(),
            dead_letter_exchange: "gs.dead-letter".into(),
            dead_letter_queue: "gs.session-service.dead-letter".into(),
            prefetch: 32,
            max_redeliveries: 5,
            delivery_limit: 10,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
            outbox_batch: 256,
            publish_interval_ms: 50,
            publish_max_messages_per_sec: 200,
            enabled: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    /// HS256 secret of access tokens and of session (connection) tokens. No default:
    /// a process refuses to start without one.
    pub jwt_secret: String,
    /// Lifetime of the connection tokens handed out by create and join.
    pub session_token_ttl_secs: u64,
    /// Clock skew tolerated when checking `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Required `iss` of access tokens; empty = not checked.
    pub issuer: String,
    /// Required `aud` of access tokens (one of the token's audiences); empty = not
    /// checked.
    pub audience: String,
    /// PEM public keys (RSA for RS256, EC P-256 for ES256) of external token issuers;
    /// a key's `kid` is its file name up to the first dot.
    pub public_keys_pem: Vec<String>,
    /// A JWKS file (`{"keys": [...]}`) of external token issuers' public keys; empty =
    /// none.
    pub jwks_file: String,
    /// How often (at most) routers check whether the key files changed (and re-read
    /// them); a token with an unknown `kid` triggers a check at once (at most once a
    /// second).
    pub keys_check_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            session_token_ttl_secs: 24 * 3600,
            leeway_secs: 5,
            issuer: String::new(),
            audience: String::new(),
            public_keys_pem: Vec::new(),
            jwks_file: String::new(),
            keys_check_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    /// Member id; empty = generated at start-up.
    pub id: String,
    pub listen: String,
    /// URL clients are told to use (`websocket_url`); empty = derived from `listen`.
    pub public_url: String,
    /// PEM certificate chain and key; when both are set the router serves https/wss only.
    pub tls_cert: String,
    pub tls_key: String,
    /// Largest client message accepted; larger ones get `message_too_large`.
    pub max_message_bytes: usize,
    /// Frames above this close the connection (protects memory before parsing).
    pub max_frame_bytes: usize,
    /// Interval of the server→client `heartbeat` event.
    pub heartbeat_interval_ms: u64,
    /// How long the router keeps retrying a command (same id) across failovers.
    pub request_deadline_ms: u64,
    /// Largest REST request body.
    pub max_body_bytes: u64,
    /// Open TCP connections per router, HTTP and WebSocket together; a WebSocket holds
    /// its place for its whole life. Beyond it: `503 too_many_connections`.
    pub max_connections: usize,
    /// Open WebSockets of one user on this router (0 = no cap); beyond it the
    /// handshake is refused with `429 too_many_connections`.
    pub max_sockets_per_user: usize,
    /// Open WebSockets from one IP address on this router (0 = no cap); beyond it
    /// `429 too_many_connections`.
    pub max_sockets_per_ip: usize,
    /// An HTTP/1 connection must send a request's whole header within this long, also
    /// while it sits idle between requests (keep-alive); otherwise it is closed
    /// (0 = no limit).
    pub header_read_timeout_ms: u64,
    /// An HTTP connection (before any WebSocket upgrade) on which no byte moves for
    /// this long is closed (0 = never).
    pub http_idle_timeout_ms: u64,
    /// A WebSocket whose client sends no message (pings and pongs do not count) for
    /// this long is closed (4408, `idle_timeout`); also the longest a write to a client
    /// that does not read may block (0 = never).
    pub ws_idle_timeout_ms: u64,
    /// A WebSocket from which nothing at all arrives (no message, no pong to the
    /// router's pings, no ping) for this long is closed (4408, `silence_timeout`) and
    /// its presence removed. 0 = three missed heartbeats
    /// (3 × `heartbeat_interval_ms`).
    pub client_silence_timeout_ms: u64,
    /// Session events a WebSocket may fall behind the router's newest event of its
    /// session (its outbound backlog); a client that does not read and falls further
    /// behind is closed (4008, `slow_consumer`).
    pub max_outbound_queue: u64,
    /// Commands of one connection waiting for their ack at once.
    pub max_inflight_per_connection: usize,
    /// A resuming client missing more events than this gets a full sync instead.
    pub replay_limit: u64,
    /// Events of one session kept by the router for gap filling.
    pub recent_events: usize,
}

impl RouterConfig {
    /// Heartbeats a client may miss before it counts as silent (when
    /// `client_silence_timeout_ms` is 0).
    pub const SILENT_AFTER_HEARTBEATS: u64 = 3;

    /// The interval of the server's heartbeats (and pings).
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(100))
    }

    /// How long a WebSocket may stay silent (not even a pong) before it is closed.
    pub fn client_silence_timeout(&self) -> Duration {
        match self.client_silence_timeout_ms {
            0 => self.heartbeat_interval() * Self::SILENT_AFTER_HEARTBEATS as u32,
            ms => Duration::from_millis(ms),
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            listen: "127.0.0.1:8080".into(),
            public_url: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 1024 * 1024,
            heartbeat_interval_ms: 30_000,
            request_deadline_ms: 5_000,
            max_body_bytes: 1024 * 1024,
            max_connections: 10_000,
            max_sockets_per_user: 20,
            max_sockets_per_ip: 200,
            header_read_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
            ws_idle_timeout_ms: 300_000,
            client_silence_timeout_ms: 0,
            max_outbound_queue: 1024,
            max_inflight_per_connection: 64,
            replay_limit: 1000,
            recent_events: 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Member id; empty = generated at start-up.
    pub id: String,
    /// Address of the node's health and metrics endpoint.
    pub http_listen: String,
    /// Requests queued for one session actor; beyond it requests get `overloaded`.
    pub inbox_capacity: usize,
    /// Requests one actor takes into one commit.
    pub actor_batch_max: usize,
    /// Events one group commit writes at most (across sessions).
    pub commit_batch_max: usize,
    /// Threads of the node's async runtime; 0 = one per CPU the process may use (a
    /// container's CPU limit counts). Where several nodes share a machine's cores (a
    /// local cluster, `cluster bench --node-workers 1`), one thread each carries more
    /// load at saturation (fewer wake-ups of parked threads) but adds latency at light
    /// load (BENCHMARKS.md, stop 27). `TOKIO_WORKER_THREADS` in the environment applies
    /// when this is 0.
    pub worker_threads: usize,
    /// Group commits in flight at once (each on its own connection, disjoint sessions).
    pub committers: usize,
    /// A committer that finds another group commit in flight waits up to this long
    /// (µs) for more items before it starts its own, so that under load transactions
    /// are fewer and larger (PostgreSQL's cost is largely per transaction). A
    /// committer with none in flight beside it never waits. 0 = never wait.
    pub commit_linger_us: u64,
    /// A snapshot is written every this many events, so recovery reads a bounded tail.
    pub snapshot_every: u64,
    /// Events of each session kept in memory for gap fills.
    pub recent_events: usize,
    /// Command ids of each session kept in memory for exact-once answers.
    pub dedupe_window: usize,
    pub lock_ttl_ms: u64,
    pub lock_renew_ms: u64,
    /// How long activation may take (lock wait + recovery) before requests are refused.
    pub activation_timeout_ms: u64,
    /// An actor idle this long hands its session back (snapshot, unlock).
    pub idle_passivate_ms: u64,
    /// Interval at which an owner refreshes the ICD's Redis TTLs of its sessions.
    pub redis_refresh_ms: u64,
    /// Drain deadline on SIGTERM.
    pub shutdown_timeout_ms: u64,
    /// The `fault_*` settings act only in a gs-node built with its `fault-injection`
    /// feature (the test builds); other builds ignore them.
    /// Fault injection for tests (empty = off): the node aborts right after committing
    /// an event whose JSON contains this text, before publishing or acknowledging it.
    pub fault_crash_after_commit: String,
    /// Fault injection for tests (empty = off): a batch holding an event whose JSON
    /// contains this text waits `fault_delay_commit_ms` before its commit, after
    /// announcing it on `{subject_prefix}.fault.delaying`.
    pub fault_delay_commit: String,
    pub fault_delay_commit_ms: u64,
    /// Fault injection for tests (empty = off): the owner fails, once, an inbound hub
    /// event whose JSON contains this text (`internal_error`), so the relay must
    /// requeue it through its retry queue.
    pub fault_hub_fail_once: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            http_listen: "127.0.0.1:0".into(),
            inbox_capacity: 1024,
            actor_batch_max: 256,
            commit_batch_max: 2048,
            worker_threads: 0,
            committers: 2,
            commit_linger_us: 5000,
            snapshot_every: 1000,
            recent_events: 1024,
            dedupe_window: 10_000,
            lock_ttl_ms: 2000,
            lock_renew_ms: 500,
            activation_timeout_ms: 4000,
            idle_passivate_ms: 15 * 60 * 1000,
            redis_refresh_ms: 60_000,
            shutdown_timeout_ms: 10_000,
            fault_crash_after_commit: String::new(),
            fault_delay_commit: String::new(),
            fault_delay_commit_ms: 3000,
            fault_hub_fail_once: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MembershipConfig {
    pub heartbeat_ms: u64,
    /// A member not heard from for this long is dead.
    pub failure_timeout_ms: u64,
    /// Virtual nodes per node on the ring.
    pub vnodes: u32,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 250,
            failure_timeout_ms: 1500,
            vnodes: 256,
        }
    }
}

/// Rate limits of the ICD; 0 disables a limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    pub ws_connects_per_min_per_ip: u32,
    pub ws_messages_per_min_per_conn: u32,
    pub combat_actions_per_min_per_player: u32,
    /// The DM's own budget (it acts for every monster).
    pub combat_actions_per_min_per_dm: u32,
    pub sessions_created_per_hour_per_user: u32,
    pub state_updates_per_min_per_session: u32,
    pub joins_per_min_per_session: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            ws_connects_per_min_per_ip: 10,
            ws_messages_per_min_per_conn: 100,
            combat_actions_per_min_per_player: 20,
            combat_actions_per_min_per_dm: 200,
            sessions_created_per_hour_per_user: 10,
            state_updates_per_min_per_session: 60,
            joins_per_min_per_session: 30,
        }
    }
}

/// Bounds on what clients send and on each session's state document (the node's
/// rules enforce the document's; the router checks `max_json_depth` and the
/// characters PostgreSQL refuses at the edge). Documented in `docs/security.md`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DocumentConfig {
    /// Nesting of any client message or Message Hub payload (serde_json's own limit
    /// is 128; the document's `max_depth` plus the envelope must stay below this).
    pub max_json_depth: usize,
    /// Tokens in one JSON Pointer.
    pub max_path_depth: usize,
    /// Bytes of one JSON Pointer.
    pub max_path_bytes: usize,
    /// Nesting of the state document (the root object is 1).
    pub max_depth: usize,
    /// Serialised bytes of one change's value (and of `POST /state`'s metadata).
    pub max_value_bytes: usize,
    /// Serialised bytes of the whole state document (well under NATS's 1 MiB).
    pub max_document_bytes: usize,
    /// Members of any one object in the document.
    pub max_keys_per_object: usize,
}

impl Default for DocumentConfig {
    fn default() -> Self {
        Self {
            max_json_depth: 64,
            max_path_depth: 32,
            max_path_bytes: 1024,
            max_depth: 48,
            max_value_bytes: 64 * 1024,
            max_document_bytes: 256 * 1024,
            max_keys_per_object: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info,gs_node=debug`. `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            // lapin logs every unroutable publish (a returned message) as a warning
            // with the whole message; the relay counts them instead.
            filter: "info,lapin::returned_messages=error".into(),
            format: "text".into(),
        }
    }
}

/// Requests to the other services over the Message Hub (Character, Campaign, LLM,
/// Image; `docs/message-hub.md`, "Requests to other services").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ServicesConfig {
    /// Exchange requests are published to; empty: `rabbitmq.inbound_exchange`.
    pub exchange: String,
    /// Deadline of one call (the SRD's orchestration round trip is under 500 ms).
    pub deadline_ms: u64,
    /// How long the first attempt waits before the request is sent again (doubled).
    pub attempt_timeout_ms: u64,
    /// Pause before retrying after a retryable error answer (doubled).
    pub retry_backoff_ms: u64,
    /// Publishes of one call at most.
    pub max_attempts: u32,
    /// Consecutive failed calls that open a service's circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker fails calls fast before a probe goes out.
    pub breaker_cool_down_ms: u64,
    /// Joins with a `character_id` ask the Character Service (`character.get`) for the
    /// sheet and its owner, and players can no longer declare their own sheets (the DM
    /// still can). Off: a player's join sheet is taken as it is (local development
    /// without the Character Service).
    pub character_lookup: bool,
    /// How long a character left `pending` (the Character Service did not answer in
    /// time) keeps being asked for in the background.
    pub pending_retry_ms: u64,
    /// Deadline of an `llm.request` (narration, a monster's decision); past it the
    /// session gets `narration_failed` and play goes on.
    pub llm_deadline_ms: u64,
    /// Deadline of an `image.request` (a map); past it the session gets `map_failed`.
    pub image_deadline_ms: u64,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            exchange: String::new(),
            deadline_ms: 400,
            attempt_timeout_ms: 150,
            retry_backoff_ms: 20,
            max_attempts: 3,
            breaker_failure_threshold: 5,
            breaker_cool_down_ms: 5000,
            character_lookup: true,
            pending_retry_ms: 10_000,
            llm_deadline_ms: 400,
            image_deadline_ms: 400,
        }
    }
}

/// The Campaign Service's say over sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CampaignConfig {
    /// Session creation and joins ask `campaign.membership` whether the user is in the
    /// session's campaign (as player or DM); non-members get `403 not_in_campaign`.
    /// Off for local development without the Campaign Service.
    pub require_membership: bool,
}

impl Default for CampaignConfig {
    fn default() -> Self {
        Self {
            require_membership: true,
        }
    }
}

/// Prefix of environment variables.
pub const ENV_PREFIX: &str = "GS";

/// Fields that are lists: their variables hold comma-separated items
/// (`GS_REDIS__LOCK_URLS=redis://a:6379,redis://b:6379,redis://c:6379`), as the
/// deployment manifests set them. Every other variable stays one string.
pub const ENV_LIST_FIELDS: &[&str] = &[
    "redis.lock_urls",
    "redis.cluster_urls",
    "auth.public_keys_pem",
];

/// The `GS_<SECTION>__<FIELD>` variables, read from `vars` (tests) or the process.
fn environment(vars: Option<config::Map<String, String>>) -> config::Environment {
    let env = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .source(vars);
    ENV_LIST_FIELDS
        .iter()
        .fold(env, |env, key| env.with_list_parse_key(key))
}

impl Config {
    /// Loads defaults, then the file (if any), then `GS_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let defaults = config::Config::try_from(&Config::default())?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path));
        }
        builder = builder.add_source(environment(None));
        let cfg: Config = builder.build()?.try_deserialize()?;
        Ok(cfg)
    }

    /// Checks what a process cannot run without.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth.jwt_secret.len() < 16 {
            return Err(ConfigError::Invalid(
                "auth.jwt_secret must be set (GS_AUTH__JWT_SECRET), at least 16 bytes".into(),
            ));
        }
        if self.node.lock_renew_ms * 2 > self.node.lock_ttl_ms {
            return Err(ConfigError::Invalid(
                "node.lock_renew_ms must be at most half of node.lock_ttl_ms".into(),
            ));
        }
        if self.node.commit_linger_us > MAX_COMMIT_LINGER_US {
            return Err(ConfigError::Invalid(format!(
                "node.commit_linger_us must be at most {MAX_COMMIT_LINGER_US} (1 s): it delays \
                 commits under load"
            )));
        }
        if self.membership.heartbeat_ms * 2 > self.membership.failure_timeout_ms {
            return Err(ConfigError::Invalid(
                "membership.heartbeat_ms must be at most half of membership.failure_timeout_ms"
                    .into(),
            ));
        }
        if self.router.tls_cert.is_empty() != self.router.tls_key.is_empty() {
            return Err(ConfigError::Invalid(
                "router.tls_cert and router.tls_key must be set together".into(),
            ));
        }
        if self.router.max_message_bytes > self.router.max_frame_bytes {
            return Err(ConfigError::Invalid(
                "router.max_message_bytes must not exceed router.max_frame_bytes".into(),
            ));
        }
        if self.router.max_outbound_queue == 0 {
            return Err(ConfigError::Invalid(
                "router.max_outbound_queue must be at least 1".into(),
            ));
        }
        if self.nats.subject_prefix.is_empty()
            || self
                .nats
                .subject_prefix
                .contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        {
            return Err(ConfigError::Invalid(
                "nats.subject_prefix must be a non-empty NATS token".into(),
            ));
        }
        if self.nats.urls().is_empty() {
            return Err(ConfigError::Invalid(
                "nats.url must name at least one server".into(),
            ));
        }
        if !self.redis.cluster_urls.is_empty() && self.redis.key_prefix.contains('{') {
            return Err(ConfigError::Invalid(
                "redis.key_prefix must not contain '{' with redis.cluster_urls (it would \
                 become the keys' hash tag)"
                    .into(),
            ));
        }
        if self.rabbitmq.enabled && self.rabbitmq.urls().is_empty() {
            return Err(ConfigError::Invalid(
                "rabbitmq.url must name at least one broker".into(),
            ));
        }
        Ok(())
    }
}

/// `url` with the password of its user-info replaced by `***`
/// (`redis://:pw@host` → `redis://:***@host`, `amqp://user:pw@host` →
/// `amqp://user:***@host`). Every URL that is logged or put in an error goes through
/// this (or [`redact_secrets`]). A URL without a password is returned as it is.
pub fn redact_url(url: &str) -> String {
    redact_secrets(url)
}

/// `text` with the password of every `scheme://user:password@` in it replaced by `***`
/// (for error messages of libraries that may quote a URL).
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or whitespace (or quote).
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | ',') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Milliseconds to a `Duration`: the config keeps plain integers for readability.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_file_then_env() {
        let dir = std::env::temp_dir().join(format!("gs-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[postgres]\nport = 6543\ndbname = \"from_file\"\n[auth]\njwt_secret = \"file-secret-0123456789\"\n",
        )
        .unwrap();
        // Environment overrides the file; a var unique to this test avoids races.
        std::env::set_var("GS_POSTGRES__DBNAME", "from_env");
        let cfg = Config::load(Some(&file)).unwrap();
        std::env::remove_var("GS_POSTGRES__DBNAME");
        assert_eq!(cfg.postgres.port, 6543);
        assert_eq!(cfg.postgres.dbname, "from_env");
        assert_eq!(cfg.postgres.host, "127.0.0.1");
        assert_eq!(cfg.router.max_message_bytes, 65536);
        cfg.validate().unwrap();
    }

    #[test]
    fn list_fields_take_comma_separated_variables() {
        let vars = [
            (
                "GS_REDIS__LOCK_URLS",
                "redis://a:6379,redis://b:6379,redis://c:6379",
            ),
            ("GS_AUTH__PUBLIC_KEYS_PEM", "/keys/one.pem"),
            ("GS_REDIS__CLUSTER_URLS", "redis://c1:7000,redis://c2:7000"),
            // Other fields stay single strings, commas and all.
            ("GS_NATS__URL", "nats://a:4222,nats://b:4222"),
            ("GS_POSTGRES__PASSWORD", "a,b"),
            ("GS_POSTGRES__PORT", "6543"),
        ];
        let vars = vars.map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg: Config = config::Config::builder()
            .add_source(config::Config::try_from(&Config::default()).unwrap())
            .add_source(environment(Some(vars.into_iter().collect())))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(
            cfg.redis.lock_urls,
            ["redis://a:6379", "redis://b:6379", "redis://c:6379"]
        );
        assert_eq!(cfg.auth.public_keys_pem, ["/keys/one.pem"]);
        assert_eq!(
            cfg.redis.cluster_urls,
            ["redis://c1:7000", "redis://c2:7000"]
        );
        assert_eq!(cfg.nats.url, "nats://a:4222,nats://b:4222");
        assert_eq!(cfg.postgres.password, "a,b");
        assert_eq!(cfg.postgres.port, 6543);
    }

    #[test]
    fn a_commit_linger_over_a_second_is_refused() {
        let mut cfg = Config::default();
        cfg.auth.jwt_secret = "0123456789abcdef".into();
        cfg.validate().unwrap();
        cfg.node.commit_linger_us = MAX_COMMIT_LINGER_US + 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("commit_linger_us"), "{err}");
    }

    #[test]
    fn missing_secret_is_refused() {
        let cfg = Config::default();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("jwt_secret"), "{err}");
    }

    #[test]
    fn the_lock_is_on_the_primary_redis_unless_lock_urls_are_given() {
        let mut r = RedisConfig::default();
        assert_eq!(r.lock_instances(), vec![r.url.clone()]);
        r.lock_urls = vec![
            "redis://a:1".into(),
            "redis://b:2".into(),
            "redis://c:3".into(),
        ];
        assert_eq!(r.lock_instances(), r.lock_urls);
    }

    #[test]
    fn nats_url_takes_the_seed_urls_of_a_cluster_comma_separated() {
        let mut n = NatsConfig::default();
        assert_eq!(n.urls(), vec!["nats://127.0.0.1:4222"]);
        n.url = "nats://a:1, nats://b:2,,nats://c:3".into();
        assert_eq!(n.urls(), vec!["nats://a:1", "nats://b:2", "nats://c:3"]);
        assert_eq!(
            redact_url("nats://u:pw@a:1,nats://u:pw2@b:2"),
            "nats://u:***@a:1,nats://u:***@b:2"
        );
        let mut cfg = Config::default();
        cfg.nats.url = " , ".into();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn rabbitmq_url_takes_several_brokers_comma_separated() {
        let mut r = RabbitConfig::default();
        assert_eq!(r.urls(), vec!["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        r.url = "amqp://u:pw@a:1/%2f, amqp://u:pw@b:2/%2f,".into();
        assert_eq!(r.urls(), vec!["amqp://u:pw@a:1/%2f", "amqp://u:pw@b:2/%2f"]);
        assert_eq!(
            redact_url(&r.url),
            "amqp://u:***@a:1/%2f, amqp://u:***@b:2/%2f,"
        );
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        // config/example.toml lists every field with its default; this keeps it true.
        let example: Config =
            toml::from_str(include_str!("../../config/example.toml")).expect("example parses");
        let defaults = serde_json::to_value(Config::default()).unwrap();
        assert_eq!(serde_json::to_value(example).unwrap(), defaults);
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        for (url, want) in [
            (
                "redis://:s3cret@10.0.0.1:6379/0",
                "redis://:***@10.0.0.1:6379/0",
            ),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            (
                "postgres://app:p%40ss:w@db:5432/session_db",
                "postgres://app:***@db:5432/session_db",
            ),
            ("nats://user:pw@nats:4222", "nats://user:***@nats:4222"),
            ("rediss://u:pw@h", "rediss://u:***@h"),
            // Nothing to hide.
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("amqp://guest@host/%2f", "amqp://guest@host/%2f"),
            ("redis://host?password=x", "redis://host?password=x"),
            ("not a url", "not a url"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
        // Inside any text, every URL.
        let e = "Redis at redis://:pw1@a:1: refused; NATS at nats://u:pw2@b:2 (\"amqp://x:pw3@c\")";
        let r = redact_secrets(e);
        assert!(
            !r.contains("pw1") && !r.contains("pw2") && !r.contains("pw3"),
            "{r}"
        );
        assert_eq!(
            r,
            "Redis at redis://:***@a:1: refused; NATS at nats://u:***@b:2 (\"amqp://x:***@c\")"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        assert!(Config::load(Some(Path::new("/nonexistent/gs.toml"))).is_err());
    }
}
