//! Requests over NATS whose waiters go away with them.
//!
//! `async_nats::Client::send_request` keeps each request's waiter in the client's reply
//! multiplexer until an answer arrives, and only an answer removes it. A request that
//! is never answered stays there for the life of the connection: a command whose ack
//! the router takes from the session's event (`RequestBody::Command::ack_by_event`: the
//! owner sends no reply), a request to a node that died with it in flight, a timeout.
//! At the SRD load that was 10,000 waiters a second, held for ever by the router's NATS
//! connection task.
//!
//! [`Replies`] subscribes once to `<inbox>.*` and keeps its own table of waiters; each
//! is removed when its answer arrives or when its request is dropped (answered another
//! way, timed out, cancelled).

use async_nats::{Client, Message, StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OnceCell};

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Message>>>;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailed {
    /// Nobody listens on the subject (the server said so): nothing was delivered.
    #[error("no responders")]
    NoResponders,
    #[error("timed out")]
    TimedOut,
    #[error("{0}")]
    Other(String),
}

/// One reply subscription and the requests waiting on it. Share it (`Arc`).
pub struct Replies {
    nats: Client,
    prefix: String,
    waiters: Arc<Waiters>,
    next: AtomicU64,
    listener: OnceCell<tokio::task::JoinHandle<()>>,
}

impl Drop for Replies {
    fn drop(&mut self) {
        if let Some(task) = self.listener.get() {
            task.abort();
        }
    }
}

impl Replies {
    /// An inbox on `nats`; it subscribes on its first request.
    pub fn new(nats: Client) -> Self {
        let prefix = nats.new_inbox();
        Self {
            nats,
            prefix,
            waiters: Arc::default(),
            next: AtomicU64::new(0),
            listener: OnceCell::new(),
        }
    }

    /// Requests waiting for an answer now.
    pub fn waiting(&self) -> usize {
        self.waiters.lock().unwrap().len()
    }

    /// Publishes `payload` to `subject` with a reply subject of this inbox and waits up
    /// to `timeout` for the answer. Dropping the future forgets the request.
    pub async fn request(
        &self,
        subject: impl Into<Subject>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, RequestFailed> {
        self.listen().await?;
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(token, tx);
        let _waiting = Waiting {
            waiters: &self.waiters,
            token,
        };
        let reply = format!("{}.{token}", self.prefix);
        self.nats
            .publish_with_reply(subject.into(), reply, payload)
            .await
            .map_err(|e| RequestFailed::Other(e.to_string()))?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(RequestFailed::TimedOut),
            Ok(Err(_)) => Err(RequestFailed::Other("the inbox closed".into())),
            Ok(Ok(msg)) if msg.status == Some(StatusCode::NO_RESPONDERS) => {
                Err(RequestFailed::NoResponders)
            }
            Ok(Ok(msg)) => Ok(msg),
        }
    }

    /// Subscribes to the inbox once; a task hands each answer to its waiter. The
    /// subscription is queued on the connection before any request is published on
    /// it, so no answer can arrive before it.
    async fn listen(&self) -> Result<(), RequestFailed> {
        self.listener
            .get_or_try_init(|| async {
                let mut sub = self
                    .nats
                    .subscribe(format!("{}.*", self.prefix))
                    .await
                    .map_err(|e| RequestFailed::Other(e.to_string()))?;
                let waiters = self.waiters.clone();
                Ok(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        let token = msg.subject.rsplit('.').next().and_then(|t| t.parse().ok());
                        let waiter = token.and_then(|t| waiters.lock().unwrap().remove(&t));
                        if let Some(tx) = waiter {
                            let _ = tx.send(msg);
                        }
                    }
                    // The connection is closed: nothing will answer the requests
                    // waiting now; they end at once ("the inbox closed").
                    waiters.lock().unwrap().clear();
                }))
            })
            .await
            .map(|_| ())
    }
}

/// Removes a request's waiter when the request ends, however it ends.
struct Waiting<'a> {
    waiters: &'a Waiters,
    token: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.waiters.lock().unwrap().remove(&self.token);
    }
}
