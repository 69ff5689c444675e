//! ICD acceptance (issue 11, part A): a client written from the ICD's field lists
//! alone works unmodified, and live connections are kept honest.
//!
//! The [`icd`] module holds strictly typed models of the ICD's messages: every field
//! the ICD lists, with the ICD's type (`version` a string of the decimal number, ids
//! UUIDs, timestamps ISO 8601); extra fields (the service's extensions) are allowed.
//! Every frame and REST body the ICD client receives must parse into them.

use anyhow::{bail, ensure, Context, Result};
use cluster::client::{ws_connect, ws_open, TokenStyle, TrackedClient, WsStream};
use cluster::harness::ClusterSpec;
use futures::{SinkExt, StreamExt};
use gs_shared::auth::{Authority, Role};
use gs_shared::keys::Keys;
use gs_tests::{finish, Fixture, WAIT};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// The ICD's messages, typed as the ICD types them. Some fields are never read: they
/// are there to be type-checked by parsing.
#[allow(dead_code)]
mod icd {
    use serde::Deserialize;
    use serde_json::{Map, Value};
    use uuid::Uuid;

    /// `"ISO8601"`.
    pub type Timestamp = chrono::DateTime<chrono::FixedOffset>;
    /// `{"object"}`.
    pub type Object = Map<String, Value>;

    /// A `version` as the ICD types it: `"string"`, here of the decimal number.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    #[serde(transparent)]
    pub struct Version(pub String);

    impl Version {
        pub fn number(&self) -> anyhow::Result<u64> {
            anyhow::ensure!(
                !self.0.is_empty() && self.0.bytes().all(|b| b.is_ascii_digit()),
                "version {:?} is not a decimal number",
                self.0
            );
            Ok(self.0.parse()?)
        }
    }

    // --- REST

    #[derive(Debug, Deserialize)]
    pub struct CreateResponse {
        pub session_id: Uuid,
        pub connection_token: String,
        pub websocket_url: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct JoinResponse {
        pub connection_token: String,
        pub websocket_url: String,
        /// `{"object"}`; the service gives it the `GET /state` shape.
        pub session_state: LoadStateResponse,
    }

    #[derive(Debug, Deserialize)]
    pub struct SaveStateResponse {
        pub version: Version,
        pub timestamp: Timestamp,
    }

    #[derive(Debug, Deserialize)]
    pub struct LoadStateResponse {
        pub state: Object,
        pub metadata: Object,
        pub version: Version,
        pub timestamp: Timestamp,
    }

    // --- WebSocket

    #[derive(Debug, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum Server {
        ConnectionEstablished {
            data: Established,
        },
        ConnectionError {
            error: ErrorBody,
        },
        Heartbeat {
            data: Heartbeat,
        },
        StateUpdate {
            data: StateUpdate,
        },
        SyncResponse {
            data: SyncResponse,
        },
        InitiativeRoll {
            data: InitiativeRoll,
        },
        TurnChange {
            data: TurnChange,
        },
        ActionDeclare {
            data: ActionDeclare,
        },
        ActionResolve {
            data: ActionResolve,
        },
        Error {
            error: ErrorBody,
        },
        /// Messages the ICD does not list (the service's other events): allowed.
        #[serde(other)]
        Other,
    }

    #[derive(Debug, Deserialize)]
    pub struct Established {
        pub session_id: Uuid,
        pub player_id: Uuid,
        pub timestamp: Timestamp,
    }

    #[derive(Debug, Deserialize)]
    pub struct ErrorBody {
        pub code: String,
        pub message: String,
        #[serde(default)]
        pub details: Option<Object>,
    }

    #[derive(Debug, Deserialize)]
    pub struct Heartbeat {
        pub timestamp: Timestamp,
    }

    #[derive(Debug, Deserialize)]
    pub struct StateUpdate {
        pub update_id: Uuid,
        pub changes: Vec<Change>,
        pub timestamp: Timestamp,
    }

    #[derive(Debug, Deserialize)]
    pub struct Change {
        pub path: String,
        /// `"any"`.
        #[serde(default)]
        pub value: Value,
        /// `"any"`.
        #[serde(default)]
        pub previous: Value,
    }

    #[derive(Debug, Deserialize)]
    pub struct SyncResponse {
        pub state: Object,
        pub version: Version,
    }

    #[derive(Debug, Deserialize)]
    pub struct InitiativeRoll {
        pub character_id: Uuid,
        pub roll: f64,
        pub modifiers: Object,
    }

    #[derive(Debug, Deserialize)]
    pub struct TurnChange {
        pub active_character: Uuid,
        pub round: f64,
        pub turn_number: f64,
    }

    #[derive(Debug, Deserialize)]
    pub struct ActionDeclare {
        pub action_id: Uuid,
        pub character_id: Uuid,
        pub action_type: String,
        pub targets: Vec<Uuid>,
        pub details: Object,
    }

    #[derive(Debug, Deserialize)]
    pub struct ActionResolve {
        pub action_id: Uuid,
        pub outcomes: Vec<Outcome>,
    }

    #[derive(Debug, Deserialize)]
    pub struct Outcome {
        pub target_id: Uuid,
        pub effects: Vec<String>,
        pub damage: Object,
        pub conditions: Vec<String>,
    }
}

use icd::Server;

/// Parses `v` into an ICD type, naming what failed.
fn strict<T: DeserializeOwned>(what: &str, v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).with_context(|| format!("{what} is not ICD-typed: {v}"))
}

/// Every frame a client received, each parsed into the ICD's types.
fn icd_frames(c: &TrackedClient) -> Result<Vec<Server>> {
    c.with_view(|v| v.frames.clone())
        .iter()
        .map(|f| strict::<Server>("a server message", f))
        .collect()
}

fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A REST call with an ICD body; the status and the JSON answer.
async fn rest(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut req = http.request(method, url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_icd_client_works_unmodified() -> Result<()> {
    let mut spec = ClusterSpec::test(1, 2);
    // Heartbeats often enough that the client sees some; silence far off.
    spec.base.router.heartbeat_interval_ms = 500;
    spec.base.router.client_silence_timeout_ms = 20_000;
    let fx = Fixture::with_spec(spec).await?;
    let r = strict_client_run(&fx).await;
    finish(fx, r).await
}

async fn strict_client_run(f: &Fixture) -> Result<()> {
    let http = f.cluster.http();
    let api = |i: usize, path: &str| format!("{}{path}", f.router(i));

    // Create: the ICD's request and response.
    let dm = Uuid::new_v4();
    let dm_token = f.cluster.token(dm, Role::Dm);
    let (status, body) = rest(
        &http,
        reqwest::Method::POST,
        api(0, "/api/v2/sessions"),
        &dm_token,
        Some(json!({"campaign_id": Uuid::new_v4(), "name": "ICD table", "settings": {}})),
    )
    .await?;
    ensure!(status == 201, "create: {status} {body}");
    let created: icd::CreateResponse = strict("the create response", &body)?;
    let sid = created.session_id;
    ensure!(
        created
            .websocket_url
            .ends_with(&format!("/api/v2/sessions/{sid}/ws")),
        "{}",
        created.websocket_url
    );

    // Join with the ICD's body (a character id only).
    let player = Uuid::new_v4();
    let token = f.cluster.token(player, Role::Player);
    let pc = Uuid::new_v4();
    let (status, body) = rest(
        &http,
        reqwest::Method::POST,
        api(0, &format!("/api/v2/sessions/{sid}/join")),
        &token,
        Some(json!({"character_id": pc})),
    )
    .await?;
    ensure!(status == 200, "join: {status} {body}");
    let joined: icd::JoinResponse = strict("the join response", &body)?;
    joined.session_state.version.number()?;
    ensure!(!joined.websocket_url.is_empty());

    // Connect with headers (Authorization + X-Session-Token): connection_established.
    let open = |name: &'static str, router: usize, token: String, st: String| {
        let ws = f.ws(router);
        async move {
            ws_open(
                name,
                &ws,
                &sid.to_string(),
                &token,
                &st,
                None,
                TokenStyle::Headers,
                None,
            )
            .await?
            .map_err(|r| anyhow::anyhow!("{name} refused: {r:?}"))
        }
    };
    let mut client = open(
        "icd client",
        0,
        token.clone(),
        joined.connection_token.clone(),
    )
    .await?;
    let mut dm_c = open("dm", 1, dm_token.clone(), created.connection_token.clone()).await?;
    dm_c.wait_for("the DM's first sync", WAIT, |v| v.syncs > 0)
        .await?;
    match icd_frames(&client)?.first() {
        Some(Server::ConnectionEstablished { data }) => {
            ensure!(
                data.session_id == sid && data.player_id == player,
                "{data:?}"
            );
        }
        other => bail!("first message: {other:?}"),
    }

    // An ICD state_update without an envelope id reaches the other client; a resend
    // with the same update_id is applied once.
    let before = dm_c.view().version;
    let update = Uuid::new_v4();
    let text = json!({"type": "state_update", "data": {
        "update_id": update,
        "changes": [{"path": "/icd", "value": 1, "previous": null}],
        "timestamp": now_iso()}})
    .to_string();
    client.send_raw(text.clone()).await?;
    dm_c.wait_for("the ICD update", WAIT, |v| v.doc["icd"] == 1)
        .await?;
    client
        .wait_for("its own update, as the event", WAIT, |v| v.doc["icd"] == 1)
        .await?;
    client.send_raw(text).await?;
    let barrier = dm_c
        .send("state_update", gs_tests::set("/barrier", json!(1)))
        .await?;
    let barrier_version = dm_c
        .wait_answer(barrier, WAIT)
        .await?
        .map_err(|e| anyhow::anyhow!("barrier refused: {e}"))?;
    ensure!(
        barrier_version == before + 2,
        "the resend moved the version: {before} → {barrier_version}"
    );
    client
        .wait_for("the barrier", WAIT, |v| v.version >= barrier_version)
        .await?;
    for c in [&client, &dm_c] {
        let seen = c.with_view(|v| {
            v.frames
                .iter()
                .filter(|m| m["type"] == "state_update" && m["data"]["update_id"] == json!(update))
                .count()
        });
        ensure!(seen == 1, "{}: saw the update {seen} times", c.name);
    }
    let mine = icd_frames(&client)?
        .into_iter()
        .find_map(|m| match m {
            Server::StateUpdate { data } if data.update_id == update => Some(data),
            _ => None,
        })
        .context("the ICD client's own update event")?;
    ensure!(mine.changes.len() == 1 && mine.changes[0].path == "/icd");

    // sync_request / sync_response, for some paths and for all.
    let syncs = |c: &TrackedClient| {
        c.with_view(|v| {
            v.frames
                .iter()
                .filter(|m| m["type"] == "sync_response")
                .count()
        })
    };
    let n = syncs(&client);
    client
        .send_raw(json!({"type": "sync_request", "data": {"paths": ["/icd"]}}).to_string())
        .await?;
    client
        .send_raw(json!({"type": "sync_request", "data": {"paths": []}}).to_string())
        .await?;
    client
        .wait_for("two sync responses", WAIT, |v| {
            v.frames
                .iter()
                .filter(|m| m["type"] == "sync_response")
                .count()
                >= n + 2
        })
        .await?;
    let responses: Vec<icd::SyncResponse> = icd_frames(&client)?
        .into_iter()
        .filter_map(|m| match m {
            Server::SyncResponse { data } => Some(data),
            _ => None,
        })
        .collect();
    let (partial, full) = (&responses[n], &responses[n + 1]);
    ensure!(partial.state.get("/icd") == Some(&json!(1)), "{partial:?}");
    ensure!(full.state.get("icd") == Some(&json!(1)), "{full:?}");
    ensure!(full.version.number()? == barrier_version, "{full:?}");

    // POST /state (the DM) and GET /state (the player): the ICD's shapes.
    let (status, body) = rest(
        &http,
        reqwest::Method::POST,
        api(1, &format!("/api/v2/sessions/{sid}/state")),
        &dm_token,
        Some(json!({"state": {"map": "cellar", "icd": 2}, "metadata": {"saved_by": "dm"}})),
    )
    .await?;
    ensure!(status == 200, "save: {status} {body}");
    let saved: icd::SaveStateResponse = strict("the save response", &body)?;
    ensure!(saved.version.number()? == barrier_version + 1);
    let (status, body) = rest(
        &http,
        reqwest::Method::GET,
        api(0, &format!("/api/v2/sessions/{sid}/state")),
        &token,
        None,
    )
    .await?;
    ensure!(status == 200, "load: {status} {body}");
    let loaded: icd::LoadStateResponse = strict("the load response", &body)?;
    ensure!(loaded.version == saved.version, "{loaded:?} vs {saved:?}");
    ensure!(loaded.state.get("map") == Some(&json!("cellar")));
    ensure!(loaded.metadata.get("saved_by") == Some(&json!("dm")));
    client
        .wait_for("the saved state", WAIT, |v| v.doc["map"] == "cellar")
        .await?;

    // Combat: every id in the ICD's combat events is a UUID. The DM puts the
    // player's character and a goblin in play and starts combat; the ICD client
    // declares an attack (no envelope id) on its turn.
    let goblin = Uuid::new_v4();
    for (id, sheet) in [
        (
            pc,
            json!({"name": "Aria", "max_hp": 40, "ac": 12, "player_character": true,
                   "abilities": {"str": 3, "dex": 2}}),
        ),
        (
            goblin,
            json!({"name": "Goblin", "max_hp": 500, "ac": 5, "abilities": {"dex": 1}}),
        ),
    ] {
        dm_ok(
            &mut dm_c,
            "spawn_character",
            json!({"character_id": id, "sheet": sheet}),
        )
        .await?;
    }
    dm_ok(&mut dm_c, "session_start", json!({})).await?;
    dm_ok(
        &mut dm_c,
        "combat_start",
        json!({"participants": [pc, goblin]}),
    )
    .await?;
    let turns = |c: &TrackedClient| -> Result<Vec<icd::TurnChange>> {
        Ok(icd_frames(c)?
            .into_iter()
            .filter_map(|m| match m {
                Server::TurnChange { data } => Some(data),
                _ => None,
            })
            .collect())
    };
    for _ in 0..4 {
        let seen = client
            .wait_for("a turn_change", WAIT, |v| {
                v.frames.iter().any(|m| m["type"] == "turn_change")
            })
            .await;
        seen?;
        let all = turns(&client)?;
        let turn = all.last().context("turn_change")?;
        if turn.active_character == pc {
            break;
        }
        ensure!(turn.active_character == goblin, "{turn:?}");
        let n = all.len();
        dm_ok(&mut dm_c, "end_turn", json!({})).await?;
        client
            .wait_for("the next turn", WAIT, |v| {
                v.frames
                    .iter()
                    .filter(|m| m["type"] == "turn_change")
                    .count()
                    > n
            })
            .await?;
    }
    ensure!(
        turns(&client)?.last().map(|t| t.active_character) == Some(pc),
        "the player's character never got its turn"
    );
    let action = Uuid::new_v4();
    client
        .send_raw(
            json!({"type": "action_declare", "data": {
                "action_id": action,
                "character_id": pc,
                "action_type": "attack",
                "targets": [goblin],
                "details": {"name": "shortsword", "attack_bonus": 5, "damage": "1d6+2",
                            "damage_type": "piercing"}}})
            .to_string(),
        )
        .await?;
    client
        .wait_for("the action's resolution", WAIT, |v| {
            v.frames
                .iter()
                .any(|m| m["type"] == "action_resolve" && m["data"]["action_id"] == json!(action))
        })
        .await?;
    let frames = icd_frames(&client)?;
    let rolls: Vec<Uuid> = frames
        .iter()
        .filter_map(|m| match m {
            Server::InitiativeRoll { data } => Some(data.character_id),
            _ => None,
        })
        .collect();
    ensure!(
        rolls.len() == 2 && rolls.contains(&pc) && rolls.contains(&goblin),
        "{rolls:?}"
    );
    let declared = frames
        .iter()
        .find_map(|m| match m {
            Server::ActionDeclare { data } if data.action_id == action => Some(data),
            _ => None,
        })
        .context("action_declare")?;
    ensure!(
        declared.character_id == pc
            && declared.targets == [goblin]
            && declared.action_type == "attack",
        "{declared:?}"
    );
    let resolved = frames
        .iter()
        .find_map(|m| match m {
            Server::ActionResolve { data } if data.action_id == action => Some(data),
            _ => None,
        })
        .context("action_resolve")?;
    ensure!(
        resolved.outcomes.len() == 1 && resolved.outcomes[0].target_id == goblin,
        "{resolved:?}"
    );
    let first_turn = turns(&client)?.first().map(|t| (t.round, t.turn_number));
    ensure!(first_turn == Some((1.0, 1.0)), "{first_turn:?}");

    // The client's own heartbeat needs no answer; the server's arrive, typed.
    client
        .send_raw(json!({"type": "heartbeat", "data": {"timestamp": now_iso()}}).to_string())
        .await?;
    client
        .wait_for("a server heartbeat", WAIT, |v| {
            v.frames.iter().any(|m| m["type"] == "heartbeat")
        })
        .await?;

    // A forged token: connection_error (ICD-typed) and close 4401, nothing else.
    let forger = Authority::new("not-the-cluster-secret-at-all", 3600, 0);
    let forged = forger.mint_access(player, Role::Player, 600);
    let ws = ws_connect(
        &f.ws(1),
        &sid.to_string(),
        &forged,
        &joined.connection_token,
        None,
        TokenStyle::Headers,
        None,
    )
    .await
    .context("a refused handshake is still upgraded")?;
    let refused = TrackedClient::new("forged", ws, true, None);
    refused
        .wait_for("the refusal", WAIT, |v| v.closed.is_some())
        .await?;
    let frames = icd_frames(&refused)?;
    match frames.as_slice() {
        [Server::ConnectionError { error }] => {
            ensure!(error.code == "invalid_token", "{error:?}");
            ensure!(!error.message.is_empty());
        }
        other => bail!("the forged client got {other:?}"),
    }
    ensure!(
        refused.view().closed.map(|c| c.0) == Some(4401),
        "{:?}",
        refused.view().closed
    );
    // A plain request (no upgrade) to the WebSocket path keeps its HTTP error.
    let (status, body) = rest(
        &http,
        reqwest::Method::GET,
        api(0, &format!("/api/v2/sessions/{sid}/ws")),
        &token,
        None,
    )
    .await?;
    ensure!(
        status == 400 && body["error"]["code"] == "bad_request",
        "{status} {body}"
    );

    // Every message the ICD client received parses into the ICD's types, and none is
    // an `ack` (the ICD has none; the client sent no ids).
    let frames = client.view().frames;
    icd_frames(&client)?;
    ensure!(
        frames.iter().all(|m| m["type"] != "ack"),
        "an ICD client got an ack"
    );
    let v = client.view();
    ensure!(
        v.closed.is_none() && v.errors.is_empty() && v.anonymous_errors.is_empty(),
        "{:?} {:?} {:?}",
        v.closed,
        v.errors,
        v.anonymous_errors
    );
    dm_c.close().await;
    client.close().await;
    Ok(())
}

/// A DM command (with an id) that must be accepted.
async fn dm_ok(dm: &mut TrackedClient, kind: &str, data: Value) -> Result<u64> {
    let id = dm.send(kind, data.clone()).await?;
    dm.wait_answer(id, WAIT)
        .await?
        .map_err(|e| anyhow::anyhow!("{kind} {data} refused: {e}"))
}

/// Redis: the connections hash of `sid` and its TTL.
struct Presence {
    redis: redis::aio::MultiplexedConnection,
    key: String,
}

impl Presence {
    async fn new(f: &Fixture, sid: &str) -> Result<Presence> {
        let client = redis::Client::open(f.cluster.base.redis.url.as_str())?;
        let redis = client.get_multiplexed_async_connection().await?;
        let key = Keys::new(&f.cluster.base.redis.key_prefix).connections(&sid.parse()?);
        Ok(Presence { redis, key })
    }

    async fn entry(&mut self, conn: &str) -> Result<Option<String>> {
        Ok(redis::cmd("HGET")
            .arg(&self.key)
            .arg(conn)
            .query_async(&mut self.redis)
            .await?)
    }

    async fn ttl(&mut self) -> Result<i64> {
        Ok(redis::cmd("TTL")
            .arg(&self.key)
            .query_async(&mut self.redis)
            .await?)
    }

    /// Polls (bounded by [`WAIT`]) until `cond` holds for the connection's entry and
    /// the hash's TTL.
    async fn until(
        &mut self,
        what: &str,
        conn: &str,
        cond: impl Fn(Option<&str>, i64) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let (e, ttl) = (self.entry(conn).await?, self.ttl().await?);
            if cond(e.as_deref(), ttl) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "Redis: {what}: entry {e:?}, ttl {ttl}"
            );
            // Polling an external store: there is no event to wait on.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `GET …/presence`: the connected users and their socket counts.
async fn presence(f: &Fixture, sid: &str, token: &str) -> Result<Vec<(Uuid, u64)>> {
    let (status, body) = rest(
        &f.cluster.http(),
        reqwest::Method::GET,
        format!("{}/api/v2/sessions/{sid}/presence", f.router(0)),
        token,
        None,
    )
    .await?;
    ensure!(status == 200, "presence: {status} {body}");
    body["players"]
        .as_array()
        .context("players")?
        .iter()
        .map(|p| {
            Ok((
                serde_json::from_value(p["player_id"].clone())?,
                p["connections"].as_u64().context("connections")?,
            ))
        })
        .collect()
}

/// Reads frames until `done` says so (the reads answer pings: only while this runs).
async fn read_until(ws: &mut WsStream, done: impl Fn(&Message) -> bool) -> Result<Vec<Message>> {
    let mut out = vec![];
    tokio::time::timeout(WAIT, async {
        while let Some(m) = ws.next().await {
            let Ok(m) = m else { break };
            let stop = done(&m);
            out.push(m);
            if stop {
                break;
            }
        }
    })
    .await
    .context("reading the socket timed out")?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_pings_is_closed_and_leaves_presence() -> Result<()> {
    const SILENCE: Duration = Duration::from_millis(1500);
    let mut spec = ClusterSpec::test(1, 1);
    spec.base.router.heartbeat_interval_ms = 200;
    spec.base.router.client_silence_timeout_ms = SILENCE.as_millis() as u64;
    let fx = Fixture::with_spec(spec).await?;
    let f = &fx;
    let r = async {
        // On the fixture's session, the DM only answers pings (its client reads, so
        // its WebSocket stack pongs) and sends no message: it is never silent.
        let dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;

        // A session of its own for the silent client (the DM's touches would refresh
        // the same hash's TTL).
        let created = f.api(0, &f.dm_token).create_session("silence").await?;
        let sid = created["session_id"]
            .as_str()
            .context("session_id")?
            .to_string();
        let player = Uuid::new_v4();
        let token = f.cluster.token(player, Role::Player);
        let joined = f.api(0, &token).join(&sid, json!({})).await?;
        let st = joined["connection_token"].as_str().context("token")?;
        let mut ws =
            ws_connect(&f.ws(0), &sid, &token, st, None, TokenStyle::Headers, None).await?;
        // Its welcome, then it stops reading (so it answers no ping from here on).
        let welcome = read_until(
            &mut ws,
            |m| matches!(m, Message::Text(t) if t.contains("\"sync_response\"")),
        )
        .await?;
        let established: Value = welcome
            .iter()
            .find_map(|m| match m {
                Message::Text(t) if t.contains("connection_established") => {
                    serde_json::from_str(t.as_str()).ok()
                }
                _ => None,
            })
            .context("connection_established")?;
        let conn = established["data"]["connection_id"]
            .as_str()
            .context("connection_id")?
            .to_string();

        // It is present: over REST and in Redis (5-minute TTL).
        ensure!(
            presence(f, &sid, &f.dm_token).await? == vec![(player, 1)],
            "presence after connecting"
        );
        let mut redis = Presence::new(f, &sid).await?;
        let me = player.to_string();
        redis
            .until("the entry after attach", &conn, |e, ttl| {
                e == Some(me.as_str()) && ttl > 0 && ttl <= 300
            })
            .await?;

        // A client heartbeat refreshes its entry and the hash's TTL: remove both, send
        // an ICD heartbeat (written without reading: still no pong), see them back.
        redis::cmd("DEL")
            .arg(&redis.key)
            .query_async::<()>(&mut redis.redis)
            .await?;
        ws.send(Message::text(
            json!({"type": "heartbeat", "data": {"timestamp": now_iso()}}).to_string(),
        ))
        .await?;
        let last_frame = Instant::now();
        redis
            .until("the entry after a heartbeat", &conn, |e, ttl| {
                e == Some(me.as_str()) && ttl > 250 && ttl <= 300
            })
            .await?;

        // Silent from now on: closed after the silence timeout, and gone from presence.
        let deadline = Instant::now() + WAIT;
        loop {
            let p = presence(f, &sid, &f.dm_token).await?;
            if p.is_empty() {
                break;
            }
            ensure!(Instant::now() < deadline, "still present: {p:?}");
            // Polling the REST view: no event reaches the test when a socket it does
            // not read is closed.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let gone_after = last_frame.elapsed();
        // (The router's clock starts when the heartbeat arrived, a moment before
        // `last_frame` was taken.)
        ensure!(
            gone_after + Duration::from_millis(100) >= SILENCE,
            "closed after {gone_after:?}, before the silence timeout {SILENCE:?}"
        );
        redis
            .until("the entry removed", &conn, |e, _| e.is_none())
            .await?;

        // What the router sent before closing: connection_error silence_timeout, then
        // a close frame with 4408. Read as raw bytes: tungstenite would first try to
        // answer the pings it finds, on a socket the router has closed.
        let mut raw = vec![];
        tokio::time::timeout(WAIT, ws.get_mut().read_to_end(&mut raw))
            .await
            .context("the router did not close the socket")?
            .ok();
        let text = String::from_utf8_lossy(&raw);
        ensure!(
            text.contains(r#""type":"connection_error""#) && text.contains("silence_timeout"),
            "no connection_error silence_timeout before the close: {text:?}"
        );
        // A server close frame: FIN + opcode 8, its length, then the code 4408 (0x1138).
        ensure!(
            raw.windows(4)
                .any(|w| w[0] == 0x88 && w[2..] == [0x11, 0x38]),
            "no close 4408: {text:?}"
        );

        // The DM, which only answered pings all along, is still connected.
        ensure!(dm.view().closed.is_none(), "{:?}", dm.view().closed);
        ensure!(
            presence(f, &f.session, &f.dm_token).await? == vec![(f.dm, 1)],
            "the DM's presence"
        );
        Ok(())
    }
    .await;
    finish(fx, r).await
}

/// Presence follows the session to its next owner: after the owner is killed, the
/// routers attach their open sockets to the new owner (`Reattach`), so `GET …/presence`
/// (answered by the new owner) lists the same clients, with no client doing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_survives_the_owner_dying() -> Result<()> {
    let mut fx = Fixture::start(2, 1, false).await?;
    let r = async {
        let f = &fx;
        let dm = f.connect(0, "dm", &f.dm_token, &f.session_token).await?;
        let (player, token, st) = f.player(0, json!({})).await?;
        let p = f.connect(0, "player", &token, &st).await?;
        let mut want = vec![(f.dm, 1), (player, 1)];
        want.sort();
        ensure!(
            presence(f, &f.session, &f.dm_token).await? == want,
            "presence before the kill"
        );
        // The clients stay connected (and answer pings) until the end.
        Ok::<_, anyhow::Error>((want, dm, p))
    }
    .await;
    let (want, _dm, _p) = match r {
        Ok(w) => w,
        Err(e) => return finish(fx, Err(e)).await,
    };
    let owners = gs_tests::owners(&fx.cluster, std::slice::from_ref(&fx.session)).await?;
    let owner = owners.keys().next().context("no owner")?.clone();
    let killed = Instant::now();
    if let Err(e) = fx.cluster.kill(&owner).await {
        return finish(fx, Err(e)).await;
    }
    let r = async {
        let f = &fx;
        let deadline = Instant::now() + WAIT;
        loop {
            // Polling the endpoint: there is no event that says the new owner knows.
            if let Ok(p) = presence(f, &f.session, &f.dm_token).await {
                if p == want {
                    break;
                }
                ensure!(Instant::now() < deadline, "presence after the kill: {p:?}");
            }
            ensure!(Instant::now() < deadline, "presence never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "owner {owner} killed: presence back on the new owner {} ms later",
            killed.elapsed().as_millis()
        );
        Ok(())
    }
    .await;
    finish(fx, r).await
}
