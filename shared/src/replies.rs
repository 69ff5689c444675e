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
//!
//! [`Replies::request_batched`] hands the request to the process's one batcher task
//! instead of publishing it: the requests to one subject that are queued when the task
//! runs go in one message ([`crate::request_batch`]), so under load NATS and the node
//! handle a few messages per wake-up instead of one per request.

use crate::request_batch::{self, Outgoing, Pending};
use async_nats::{Client, Message, StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OnceCell};

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
    /// The batcher task's queue: (subject, request), started on the first batched
    /// request.
    batcher: OnceLock<(Queue, tokio::task::JoinHandle<()>)>,
}

type Queue = mpsc::UnboundedSender<(Subject, Pending)>;

/// How many queued requests the batcher takes per wake-up at most.
const BATCHER_TAKE: usize = 1024;

impl Drop for Replies {
    fn drop(&mut self) {
        if let Some(task) = self.listener.get() {
            task.abort();
        }
        if let Some((_, task)) = self.batcher.get() {
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
            batcher: OnceLock::new(),
        }
    }

    /// The batcher task's queue, the task started on first use.
    fn batcher(&self) -> &Queue {
        &self
            .batcher
            .get_or_init(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, tokio::spawn(batcher(self.nats.clone(), rx)))
            })
            .0
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
        self.request_via(subject.into(), payload, timeout, false)
            .await
    }

    /// [`Replies::request`], but published by the batcher task, in one message with
    /// the other requests to `subject` queued at the time (the receiver must read
    /// [`crate::request_batch`]). A request the task cannot publish (the connection is
    /// closed) ends at its timeout.
    pub async fn request_batched(
        &self,
        subject: impl Into<Subject>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, RequestFailed> {
        self.request_via(subject.into(), payload, timeout, true)
            .await
    }

    async fn request_via(
        &self,
        subject: Subject,
        payload: Bytes,
        timeout: Duration,
        batched: bool,
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
        if batched {
            self.batcher()
                .send((subject, Pending { reply, payload }))
                .map_err(|_| RequestFailed::Other("the batcher stopped".into()))?;
        } else {
            self.nats
                .publish_with_reply(subject, reply, payload)
                .await
                .map_err(|e| RequestFailed::Other(e.to_string()))?;
        }
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

/// Publishes queued requests: whatever is queued when it runs, grouped by subject
/// ([`request_batch::by_destination`]), as few messages as [`request_batch::encode`]
/// makes of them.
async fn batcher(nats: Client, mut queue: mpsc::UnboundedReceiver<(Subject, Pending)>) {
    let mut taken = Vec::with_capacity(BATCHER_TAKE);
    while queue.recv_many(&mut taken, BATCHER_TAKE).await > 0 {
        // Woken by the first request, the task would run right after the task that
        // queued it (tokio's LIFO slot) and publish it alone. Yielding once lets the
        // tasks that are ready now (the connections the same poll of the sockets
        // woke) queue theirs first.
        tokio::task::yield_now().await;
        while taken.len() < BATCHER_TAKE {
            match queue.try_recv() {
                Ok(request) => taken.push(request),
                Err(_) => break,
            }
        }
        for (subject, group) in request_batch::by_destination(taken.drain(..)) {
            for message in request_batch::encode(group) {
                let published = match message {
                    Outgoing::Single(p) => {
                        nats.publish_with_reply(subject.clone(), p.reply, p.payload)
                            .await
                    }
                    Outgoing::Batch {
                        reply,
                        count,
                        payload,
                    } => {
                        metrics::histogram!("gs_request_batch_size").record(count as f64);
                        nats.publish_with_reply_and_headers(
                            subject.clone(),
                            reply,
                            Outgoing::headers(count),
                            payload,
                        )
                        .await
                    }
                };
                if let Err(e) = published {
                    // Only a closed connection refuses a publish: the waiters end at
                    // their timeouts, as for a request lost on the way.
                    tracing::debug!(error = %e, %subject, "requests not published");
                }
            }
        }
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
