//! Stand-ins for the platform's other services (issue 12): the Character, Campaign,
//! LLM and Image services, answering the session service's requests over the real
//! RabbitMQ from a fixture directory. They are test doubles of *other teams'*
//! services, not of this project's infrastructure: the queues, the broker and the
//! session service's request/response client are all real.
//!
//! Each service is a consumer on its own queue (`<exchange>.stand-in.<service>`, bound
//! to `<service>.*` on the requests exchange, auto-deleted with the connection) that
//! answers to the request's `reply_to` with its `correlation_id`, as
//! `docs/message-hub.md` ("Implementing a responder") says:
//!
//! | routing key | details asked | answer `details` |
//! |---|---|---|
//! | `character.get` | `{character_id, user_id}` | `{character_id, owner_id, sheet}`, or error `not_found` |
//! | `campaign.membership` | `{campaign_id, user_id}` | `{member, role}` (`member: false` when not listed) |
//! | `llm.request` | `{request_type, prompt, character_id}` | `{text}` (and `action` for `monster_decide`) |
//! | `image.request` | `{description, grid}` | `{url, asset_id, grid}` |
//!
//! Each service's [`Behaviour`] (delay, error rate, silence) can be changed while it
//! runs ([`StandIns::set`]), and the fixture too ([`StandIns::fixture`]): a test sets
//! up its own characters and memberships and makes a service slow, failing or silent.
//! The error rate draws from a seeded generator.
//!
//! Fixture directory (`config/stand-ins/`): `characters.json` (`{"<character id>":
//! {"owner_id", "sheet"}}`), `memberships.json` (`{"<campaign id>": {"<user id>":
//! "player" | "dm"}}`), `narrations.json` (a list of texts), `monster_actions.json` (a
//! list of actions, `{"action_type", "targets", "details"}`), `maps.json` (a list of
//! `{"url", "asset_id"}`). A missing file is empty.

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The services stood in for.
pub const SERVICES: [&str; 4] = ["character", "campaign", "llm", "image"];

/// A character as the Character Service knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixtureCharacter {
    pub owner_id: Uuid,
    pub sheet: Value,
}

/// A map the Image Service hands out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixtureMap {
    pub url: String,
    #[serde(default)]
    pub asset_id: Option<String>,
}

/// What the stand-ins answer from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fixture {
    pub characters: BTreeMap<Uuid, FixtureCharacter>,
    /// campaign → user → `player` | `dm`.
    pub memberships: BTreeMap<Uuid, BTreeMap<Uuid, String>>,
    pub narrations: Vec<String>,
    pub monster_actions: Vec<Value>,
    pub maps: Vec<FixtureMap>,
}

fn read_json<T: serde::de::DeserializeOwned + Default>(dir: &Path, file: &str) -> Result<T> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(T::default());
    }
    let text = std::fs::read_to_string(&path)?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}

impl Fixture {
    /// Reads a fixture directory (see the module docs).
    pub fn load(dir: &Path) -> Result<Fixture> {
        Ok(Fixture {
            characters: read_json(dir, "characters.json")?,
            memberships: read_json(dir, "memberships.json")?,
            narrations: read_json(dir, "narrations.json")?,
            monster_actions: read_json(dir, "monster_actions.json")?,
            maps: read_json(dir, "maps.json")?,
        })
    }

    /// The committed default fixture (`config/stand-ins/`).
    pub fn default_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/stand-ins")
    }

    pub fn add_character(&mut self, id: Uuid, owner_id: Uuid, sheet: Value) {
        self.characters
            .insert(id, FixtureCharacter { owner_id, sheet });
    }

    pub fn add_member(&mut self, campaign: Uuid, user: Uuid, role: &str) {
        self.memberships
            .entry(campaign)
            .or_default()
            .insert(user, role.to_string());
    }
}

/// How one stand-in behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Behaviour {
    /// Waits this long before answering.
    pub delay: Duration,
    /// Share of requests answered with a retryable error (0.0–1.0, seeded draws).
    pub error_rate: f64,
    /// Takes requests and never answers.
    pub silent: bool,
}

struct Shared {
    fixture: RwLock<Fixture>,
    behaviour: Mutex<HashMap<String, Behaviour>>,
    rng: Mutex<StdRng>,
    /// Requests taken, per service.
    served: Mutex<HashMap<String, u64>>,
}

/// The running stand-ins; stopped when dropped (their queues go with the connection).
pub struct StandIns {
    shared: Arc<Shared>,
    conn: Connection,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for StandIns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StandIns {
    /// Connects to `url`, binds one queue per service on `exchange` (a topic exchange,
    /// declared durable if missing) and answers from `fixture`; `seed` drives the
    /// error draws.
    pub async fn start(url: &str, exchange: &str, fixture: Fixture, seed: u64) -> Result<StandIns> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("gs stand-ins {exchange}").into());
        // `rabbitmq.url` may list several brokers: the first one.
        let url = url.split(',').map(str::trim).next().unwrap_or(url);
        let conn = Connection::connect(url, props)
            .await
            .context("connecting the stand-ins to RabbitMQ")?;
        let shared = Arc::new(Shared {
            fixture: RwLock::new(fixture),
            behaviour: Mutex::new(HashMap::new()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            served: Mutex::new(HashMap::new()),
        });
        let mut tasks = Vec::new();
        for service in SERVICES {
            let ch = conn.create_channel().await?;
            let consumer = bind(&ch, exchange, service).await?;
            let shared = shared.clone();
            tasks.push(tokio::spawn(serve(shared, ch, consumer, service)));
        }
        Ok(StandIns {
            shared,
            conn,
            tasks,
        })
    }

    /// Changes how `service` behaves from its next request on.
    pub fn set(&self, service: &str, b: Behaviour) {
        self.shared
            .behaviour
            .lock()
            .unwrap()
            .insert(service.to_string(), b);
    }

    /// Changes the fixture (characters, memberships, …).
    pub fn fixture<T>(&self, f: impl FnOnce(&mut Fixture) -> T) -> T {
        f(&mut self.shared.fixture.write().unwrap())
    }

    /// Requests `service` has taken so far.
    pub fn served(&self, service: &str) -> u64 {
        let served = self.shared.served.lock().unwrap();
        served.get(service).copied().unwrap_or(0)
    }

    /// Stops answering and closes the connection.
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let _ = self.conn.close(0, "stand-ins stopping".into()).await;
    }
}

/// The service's queue, bound to `<service>.*`, and its consumer.
async fn bind(ch: &Channel, exchange: &str, service: &str) -> Result<lapin::Consumer> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let queue = format!("{exchange}.stand-in.{service}");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.into(),
        format!("{service}.*").as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(ch
        .basic_consume(
            queue.as_str().into(),
            format!("stand-in-{service}").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

async fn serve(shared: Arc<Shared>, ch: Channel, mut consumer: lapin::Consumer, service: &str) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let props = &delivery.properties;
        let (Some(reply_to), Some(correlation)) = (props.reply_to(), props.correlation_id()) else {
            continue;
        };
        let (reply_to, correlation) = (reply_to.to_string(), correlation.to_string());
        let Ok(request) = serde_json::from_slice::<Value>(&delivery.data) else {
            continue;
        };
        *shared
            .served
            .lock()
            .unwrap()
            .entry(service.to_string())
            .or_default() += 1;
        let b = shared
            .behaviour
            .lock()
            .unwrap()
            .get(service)
            .copied()
            .unwrap_or_default();
        if b.silent {
            continue;
        }
        let fails = b.error_rate > 0.0 && shared.rng.lock().unwrap().random::<f64>() < b.error_rate;
        let answer = if fails {
            error(&request, "stand_in_failure", true)
        } else {
            answer(&shared, service, &request)
        };
        let ch = ch.clone();
        tokio::spawn(async move {
            if !b.delay.is_zero() {
                tokio::time::sleep(b.delay).await;
            }
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_correlation_id(correlation.as_str().into());
            let _ = ch
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    answer.to_string().as_bytes(),
                    props,
                )
                .await;
        });
    }
}

fn ok(request: &Value, details: Value) -> Value {
    json!({"request_id": request["request_id"], "status": "ok", "details": details,
        "timestamp": gs_shared::protocol::timestamp_now()})
}

fn error(request: &Value, code: &str, retryable: bool) -> Value {
    json!({"request_id": request["request_id"], "status": "error",
        "details": {"code": code, "message": "stand-in", "retryable": retryable},
        "timestamp": gs_shared::protocol::timestamp_now()})
}

fn uuid_of(v: &Value) -> Option<Uuid> {
    v.as_str()?.parse().ok()
}

/// The stand-in's answer to one request (from the fixture).
fn answer(shared: &Shared, service: &str, request: &Value) -> Value {
    let d = &request["details"];
    let f = shared.fixture.read().unwrap();
    // A stable pick per request, so a retried request gets the same answer.
    let pick = |n: usize| {
        let id = request["request_id"].as_str().unwrap_or_default();
        id.bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % n.max(1)
    };
    match service {
        "character" => {
            match uuid_of(&d["character_id"]).and_then(|c| f.characters.get(&c).map(|x| (c, x))) {
                Some((c, x)) => ok(
                    request,
                    json!({"character_id": c, "owner_id": x.owner_id, "sheet": x.sheet}),
                ),
                None => error(request, "not_found", false),
            }
        }
        "campaign" => {
            let role = uuid_of(&d["campaign_id"])
                .zip(uuid_of(&d["user_id"]))
                .and_then(|(c, u)| f.memberships.get(&c)?.get(&u).cloned());
            ok(request, json!({"member": role.is_some(), "role": role}))
        }
        "llm" => {
            let text = f
                .narrations
                .get(pick(f.narrations.len()))
                .cloned()
                .unwrap_or_else(|| "The story goes on.".into());
            let mut details = json!({"text": text, "model": "stand-in"});
            if d["request_type"] == "monster_decide" {
                let action = f
                    .monster_actions
                    .get(pick(f.monster_actions.len()))
                    .cloned()
                    .unwrap_or_else(|| json!({"action_type": "dodge"}));
                details["action"] = action;
            }
            ok(request, details)
        }
        _ => {
            let m = f
                .maps
                .get(pick(f.maps.len()))
                .cloned()
                .unwrap_or(FixtureMap {
                    url: "https://maps.example/stand-in.png".into(),
                    asset_id: None,
                });
            ok(
                request,
                json!({"url": m.url, "asset_id": m.asset_id, "grid": d["grid"]}),
            )
        }
    }
}
