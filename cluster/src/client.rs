//! Clients of the service, as tests, `cluster bench` and `cluster up`'s demo use it:
//! a REST wrapper ([`Api`]) and a WebSocket client ([`TrackedClient`]) that keeps a
//! local copy of the state document and counts what a correct stream must never
//! contain: gaps, duplicates, versions going backwards.

use crate::tls::DevCert;
use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An HTTP client trusting `cert` (or the public roots when `None`).
pub fn http_client(cert: Option<&DevCert>) -> reqwest::Client {
    gs_shared::telemetry::install_crypto_provider();
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(c) = cert {
        if let Ok(cfg) = c.client_config() {
            b = b.use_preconfigured_tls(cfg);
        }
    }
    b.build().expect("an HTTP client can be built")
}

/// `GET /api/v2/cluster` with an admin token.
pub async fn cluster_info(http: &reqwest::Client, base: &str, admin: &str) -> Result<Value> {
    let r = http
        .get(format!("{base}/api/v2/cluster"))
        .bearer_auth(admin)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("GET /api/v2/cluster: {}", r.status());
    }
    Ok(r.json().await?)
}

/// REST calls as one user.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

/// Status and JSON body of a response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok(self) -> Result<Value> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            Err(anyhow!("HTTP {}: {}", self.status, self.body))
        }
    }

    /// The error code of an error answer.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    pub fn new(http: reqwest::Client, base: &str, token: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("request to {path}"))?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
    }

    pub async fn create_session(&self, name: &str) -> Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/api/v2/sessions",
            Some(&json!({"campaign_id": Uuid::new_v4(), "name": name, "settings": {}})),
        )
        .await?
        .ok()
    }

    pub async fn join(&self, session: &str, body: Value) -> Result<Value> {
        self.call(
            reqwest::Method::POST,
            &format!("/api/v2/sessions/{session}/join"),
            Some(&body),
        )
        .await?
        .ok()
    }

    pub async fn get_state(&self, session: &str) -> Result<Value> {
        self.call(
            reqwest::Method::GET,
            &format!("/api/v2/sessions/{session}/state"),
            None,
        )
        .await?
        .ok()
    }
}

/// What a tracked client has seen.
#[derive(Debug, Clone, Default)]
pub struct ClientView {
    pub established: Option<Value>,
    pub connection_error: Option<Value>,
    /// Version of the newest event applied (or of the last full sync).
    pub version: u64,
    /// The client's copy of the state document.
    pub doc: Value,
    /// Every event received, in arrival order: (version, type).
    pub events: Vec<(u64, String)>,
    /// Events whose version was more than one past the previous.
    pub gaps: u64,
    /// Events at or below the version already held (duplicates, or going backwards).
    pub duplicates: u64,
    pub acks: HashMap<Uuid, u64>,
    pub duplicate_acks: u64,
    pub errors: HashMap<Uuid, Value>,
    /// Errors without a message id (framing errors).
    pub anonymous_errors: Vec<Value>,
    pub syncs: u64,
    pub closed: Option<(u16, String)>,
    /// Every text frame received, when recording is on.
    pub frames: Vec<Value>,
}

/// Called for every session event a client receives (bench latency probes).
pub type EventHook = Arc<dyn Fn(&Value, Instant) + Send + Sync>;

/// A WebSocket client that applies events to its own copy of the state and counts
/// anomalies. A reader task consumes the socket; [`TrackedClient::wait_for`] waits
/// (bounded) for a condition on what it has seen.
pub struct TrackedClient {
    pub name: String,
    sink: SplitSink<WsStream, Message>,
    view: Arc<Mutex<ClientView>>,
    changed: watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<()>,
    record: bool,
    hook: Option<EventHook>,
}

impl Drop for TrackedClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How a client presents its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStyle {
    Headers,
    Query,
}

/// The WebSocket settings of every client here. tungstenite's default 128 KiB read
/// buffer is zero-filled on every read (snapview/tungstenite-rs#547), which made the
/// load generator spend a large share of its CPU in `memset`; small frames need little.
pub fn client_ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

/// Opens a WebSocket to `ws_base` for `session`.
pub async fn ws_connect(
    ws_base: &str,
    session: &str,
    token: &str,
    session_token: &str,
    last_version: Option<u64>,
    style: TokenStyle,
    cert: Option<&DevCert>,
) -> Result<WsStream> {
    let mut url = format!(
        "{}/api/v2/sessions/{session}/ws",
        ws_base.trim_end_matches('/')
    );
    let mut params = vec![];
    if style == TokenStyle::Query {
        params.push(format!("token={token}"));
        params.push(format!("session_token={session_token}"));
    }
    if let Some(v) = last_version {
        params.push(format!("last_version={v}"));
    }
    if !params.is_empty() {
        url = format!("{url}?{}", params.join("&"));
    }
    let mut req = url.as_str().into_client_request()?;
    if style == TokenStyle::Headers {
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        req.headers_mut()
            .insert("x-session-token", session_token.parse()?);
    }
    let connector = match cert {
        Some(c) => Some(tokio_tungstenite::Connector::Rustls(Arc::new(
            c.client_config()?,
        ))),
        None => None,
    };
    let (ws, _resp) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::connect_async_tls_with_config(
            req,
            Some(client_ws_config()),
            true,
            connector,
        ),
    )
    .await
    .context("websocket connect timed out")??;
    Ok(ws)
}

/// A WebSocket handshake the router refused. A valid upgrade request is refused in
/// band, as the ICD says: the socket opens, carries only
/// `{"type":"connection_error","error":{…}}` and closes with a 4xxx code (`code` is
/// that close code); a request that is not a valid upgrade gets a plain HTTP error
/// (`code` is the HTTP status, `in_band` false).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: u16,
    /// The error object (`{code, message, details?}`).
    pub error: Value,
    pub in_band: bool,
}

impl Refusal {
    /// The error's code (`invalid_token`, …).
    pub fn error_code(&self) -> &str {
        self.error["code"].as_str().unwrap_or("")
    }
}

/// Opens a WebSocket and waits (bounded) until it is either accepted
/// (`connection_established`: a recording [`TrackedClient`]) or refused.
#[allow(clippy::too_many_arguments)]
pub async fn ws_open(
    name: &str,
    ws_base: &str,
    session: &str,
    token: &str,
    session_token: &str,
    last_version: Option<u64>,
    style: TokenStyle,
    cert: Option<&DevCert>,
) -> Result<std::result::Result<TrackedClient, Refusal>> {
    let ws = match ws_connect(
        ws_base,
        session,
        token,
        session_token,
        last_version,
        style,
        cert,
    )
    .await
    {
        Ok(ws) => ws,
        Err(e) => {
            return match e.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
                Some(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    let body: Value = resp
                        .body()
                        .as_ref()
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or_default();
                    Ok(Err(Refusal {
                        code: resp.status().as_u16(),
                        error: body["error"].clone(),
                        in_band: false,
                    }))
                }
                _ => Err(e),
            }
        }
    };
    let c = TrackedClient::new(name, ws, true, None);
    c.wait_for(
        "connection_established or connection_error",
        Duration::from_secs(30),
        |v| v.established.is_some() || v.closed.is_some(),
    )
    .await?;
    let v = c.view();
    if v.established.is_some() {
        return Ok(Ok(c));
    }
    Ok(Err(Refusal {
        code: v.closed.map(|c| c.0).unwrap_or(1006),
        error: v.connection_error.unwrap_or(Value::Null),
        in_band: true,
    }))
}

impl TrackedClient {
    /// Wraps an open socket; `record` keeps every frame (for tests that inspect them).
    pub fn new(name: &str, ws: WsStream, record: bool, hook: Option<EventHook>) -> TrackedClient {
        let view = ClientView {
            doc: json!({}),
            ..Default::default()
        };
        Self::with_initial_view(name, ws, record, hook, view)
    }

    /// Continues this client on a new socket (opened with `last_version` after its
    /// connection was lost): the new stream is applied to, and checked against,
    /// everything the client had already seen (state, version, acks, anomalies).
    pub fn continue_on(&mut self, ws: WsStream) {
        let mut view = self.view();
        view.closed = None;
        view.established = None;
        view.connection_error = None;
        let next = Self::with_initial_view(&self.name, ws, self.record, self.hook.clone(), view);
        // Dropping the old client stops its reader.
        drop(std::mem::replace(self, next));
    }

    fn with_initial_view(
        name: &str,
        ws: WsStream,
        record: bool,
        hook: Option<EventHook>,
        view: ClientView,
    ) -> TrackedClient {
        let (sink, stream) = ws.split();
        let view = Arc::new(Mutex::new(view));
        let (tx, changed) = watch::channel(0u64);
        let reader = tokio::spawn(read_loop(stream, view.clone(), tx, record, hook.clone()));
        TrackedClient {
            name: name.to_string(),
            sink,
            view,
            changed,
            reader,
            record,
            hook,
        }
    }

    /// Sends a message with a fresh id; returns the id.
    pub async fn send(&mut self, kind: &str, data: Value) -> Result<Uuid> {
        let id = Uuid::new_v4();
        self.send_with_id(id, kind, data).await?;
        Ok(id)
    }

    pub async fn send_with_id(&mut self, id: Uuid, kind: &str, data: Value) -> Result<()> {
        let msg = json!({"id": id, "type": kind, "data": data});
        self.send_raw(msg.to_string()).await
    }

    pub async fn send_raw(&mut self, text: String) -> Result<()> {
        self.sink.send(Message::text(text)).await?;
        Ok(())
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.sink.send(Message::binary(bytes)).await?;
        Ok(())
    }

    pub async fn close(&mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
    }

    /// A copy of what the client has seen.
    pub fn view(&self) -> ClientView {
        self.view.lock().unwrap().clone()
    }

    /// Applies `f` to the view without copying it.
    pub fn with_view<R>(&self, f: impl FnOnce(&ClientView) -> R) -> R {
        f(&self.view.lock().unwrap())
    }

    /// Waits until `cond` holds, or fails after `timeout` with `what` in the error.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&ClientView) -> bool,
    ) -> Result<()> {
        let mut changed = self.changed.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&self.view.lock().unwrap()) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let v = self.view();
                bail!(
                    "{}: timed out after {timeout:?} waiting for {what} (version {}, {} acks, {} errors, closed {:?})",
                    self.name,
                    v.version,
                    v.acks.len(),
                    v.errors.len(),
                    v.closed
                );
            }
            if tokio::time::timeout(left, changed.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                // The reader stopped; one last look.
                if cond(&self.view.lock().unwrap()) {
                    return Ok(());
                }
                bail!("{}: connection ended while waiting for {what}", self.name);
            }
        }
    }

    /// Waits for the answer (ack or error) to message `id`.
    pub async fn wait_answer(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> Result<std::result::Result<u64, Value>> {
        self.wait_for(&format!("an answer to {id}"), timeout, |v| {
            v.acks.contains_key(&id) || v.errors.contains_key(&id)
        })
        .await?;
        let v = self.view.lock().unwrap();
        Ok(match v.acks.get(&id) {
            Some(ver) => Ok(*ver),
            None => Err(v.errors[&id].clone()),
        })
    }
}

async fn read_loop(
    mut stream: SplitStream<WsStream>,
    view: Arc<Mutex<ClientView>>,
    tx: watch::Sender<u64>,
    record: bool,
    hook: Option<EventHook>,
) {
    let mut n = 0u64;
    while let Some(frame) = stream.next().await {
        let now = Instant::now();
        let text = match frame {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Close(c)) => {
                let mut v = view.lock().unwrap();
                v.closed = Some(
                    c.map(|c| (u16::from(c.code), c.reason.to_string()))
                        .unwrap_or((1005, String::new())),
                );
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        };
        let Ok(msg) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let (Some(hook), Some(_)) = (&hook, msg.get("version")) {
            hook(&msg, now);
        }
        {
            let mut v = view.lock().unwrap();
            apply(&mut v, &msg);
            if record {
                v.frames.push(msg);
            }
        }
        n += 1;
        tx.send_replace(n);
    }
    {
        let mut v = view.lock().unwrap();
        if v.closed.is_none() {
            v.closed = Some((1006, "connection lost".into()));
        }
    }
    tx.send_replace(n + 1);
}

/// Applies one server message to a client's view.
pub fn apply(v: &mut ClientView, msg: &Value) {
    let kind = msg["type"].as_str().unwrap_or("");
    let id = msg["id"].as_str().and_then(|s| Uuid::parse_str(s).ok());
    match kind {
        "connection_established" => v.established = Some(msg["data"].clone()),
        "connection_error" => v.connection_error = Some(msg["error"].clone()),
        "heartbeat" => {}
        "ack" => {
            if let Some(id) = id {
                let ver = msg["data"]["version"].as_u64().unwrap_or(0);
                if v.acks.insert(id, ver).is_some() {
                    v.duplicate_acks += 1;
                }
            }
        }
        "error" => match id {
            Some(id) => {
                v.errors.insert(id, msg["error"].clone());
            }
            None => v.anonymous_errors.push(msg["error"].clone()),
        },
        "sync_response" => {
            let data = &msg["data"];
            let partial = msg["id"].is_string()
                && data["state"]
                    .as_object()
                    .is_some_and(|o| o.keys().all(|k| k.starts_with('/')) && !o.is_empty());
            if !partial {
                v.doc = data["state"].clone();
                v.version = data["version_number"]
                    .as_u64()
                    .or_else(|| gs_shared::rpc::version_number(&data["version"]))
                    .unwrap_or(v.version);
                v.syncs += 1;
            }
        }
        _ => {
            let Some(ver) = msg["version"].as_u64() else {
                return;
            };
            v.events.push((ver, kind.to_string()));
            if ver <= v.version {
                v.duplicates += 1;
                return;
            }
            if ver > v.version + 1 {
                v.gaps += 1;
            }
            v.version = ver;
            if kind == "state_restored" {
                // A rollback replaces the document with the one of the chosen version.
                v.doc = msg["data"]["doc"].clone();
            }
            if kind == "state_update" {
                for c in msg["data"]["changes"].as_array().into_iter().flatten() {
                    let path = c["path"].as_str().unwrap_or("");
                    if c["op"] == "remove" {
                        let _ = gs_wire::pointer::remove(&mut v.doc, path);
                    } else {
                        let _ = gs_wire::pointer::set(&mut v.doc, path, c["value"].clone());
                    }
                }
            }
        }
    }
}
