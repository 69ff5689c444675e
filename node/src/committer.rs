//! Group commit: one PostgreSQL transaction for the pending writes of many sessions.
//!
//! Session actors hand a [`CommitItem`] (their events, maybe a snapshot) to
//! [`Committer::commit`] and wait. A few committer tasks (`node.committers`) each take
//! everything queued (up to `node.commit_batch_max` events) and write it in one
//! transaction ([`Store::write_batch`]: one multi-row insert per table, one fencing
//! check per session). Nothing is acknowledged to a client before its item's
//! transaction has committed (invariant 2), and an actor never has two items in
//! flight, so per-session order is kept even with several committers.
//!
//! A fenced session is left out of its group and answered `Fenced`; its neighbours'
//! writes go on. If a group fails for a reason that one item can cause (a constraint,
//! or data PostgreSQL refuses), the group is retried one item per transaction, so one
//! session's bad write never fails its neighbours' writes.

use crate::store::{CommitError, CommitItem, Store};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

/// An item and where its outcome goes (with the item, given back).
type Job = (
    CommitItem,
    oneshot::Sender<(CommitItem, Result<(), CommitError>)>,
);

/// Handle to the committer tasks.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

/// How the committer tasks batch.
#[derive(Debug, Clone, Copy)]
pub struct CommitterConfig {
    pub workers: usize,
    /// Events one transaction takes before it stops taking more.
    pub max_events: usize,
    /// Snapshots at multiples of this survive pruning.
    pub anchor_every: u64,
}

impl Committer {
    /// Starts the committer tasks on `store`.
    pub fn start(store: Store, cfg: CommitterConfig) -> (Committer, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel::<Job>(8192);
        let rx = Arc::new(Mutex::new(rx));
        let tasks = (0..cfg.workers.max(1))
            .map(|_| {
                let rx = rx.clone();
                let store = store.clone();
                tokio::spawn(async move { worker(store, rx, cfg).await })
            })
            .collect();
        (Committer { tx }, tasks)
    }

    /// Commits `item`; returns once it is durable (or refused), with the item (its
    /// rows go on to the hub relay), or `None` in its place when the committer is gone.
    pub async fn commit(&self, item: CommitItem) -> (CommitItem, Result<(), CommitError>) {
        let stopped = || CommitError::Failed("committer stopped".into());
        let (done, wait) = oneshot::channel();
        if let Err(mpsc::error::SendError((item, _))) = self.tx.send((item, done)).await {
            return (item, Err(stopped()));
        }
        match wait.await {
            Ok(r) => r,
            Err(_) => (CommitItem::default(), Err(stopped())),
        }
    }
}

/// Takes the first queued job (waiting for one) and then whatever else is queued, up
/// to `max_events` events.
async fn take_batch(rx: &Mutex<mpsc::Receiver<Job>>, max_events: usize) -> Option<Vec<Job>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut events = first.0.events.len();
    let mut jobs = vec![first];
    while events < max_events {
        match rx.try_recv() {
            Ok(job) => {
                events += job.0.events.len();
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    Some(jobs)
}

async fn worker(store: Store, rx: Arc<Mutex<mpsc::Receiver<Job>>>, cfg: CommitterConfig) {
    while let Some(jobs) = take_batch(&rx, cfg.max_events.max(1)).await {
        let started = Instant::now();
        let items: Vec<&CommitItem> = jobs.iter().map(|(i, _)| i).collect();
        let result = store.write_batch(&items, cfg.anchor_every).await;
        metrics::histogram!("gs_node_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("gs_node_commit_items").record(items.len() as f64);
        match result {
            Ok(outcomes) => {
                for ((item, done), r) in jobs.into_iter().zip(outcomes) {
                    let _ = done.send((item, r));
                }
            }
            Err(e) if jobs.len() > 1 && e.is_per_item() => {
                // Isolate the refused item(s): one transaction each.
                for (item, done) in jobs {
                    let r = write_one(&store, &item, cfg.anchor_every).await;
                    let _ = done.send((item, r));
                }
            }
            Err(e) => {
                let err = e.into_commit_error();
                tracing::warn!(error = %err, items = jobs.len(), "group commit failed");
                for (item, done) in jobs {
                    let _ = done.send((item, Err(err.clone())));
                }
            }
        }
    }
}

async fn write_one(store: &Store, item: &CommitItem, anchor_every: u64) -> Result<(), CommitError> {
    match store.write_batch(&[item], anchor_every).await {
        Ok(mut r) => r.pop().unwrap_or(Ok(())),
        Err(e) => Err(e.into_commit_error()),
    }
}
