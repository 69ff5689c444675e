//! Group commit: one PostgreSQL transaction for the pending writes of many sessions.
//!
//! Session actors hand a [`CommitItem`] (their events, maybe a snapshot) to
//! [`Committer::commit`] and wait. A few committer tasks (`node.committers`) each take
//! everything queued (up to `node.commit_batch_max` events) and write it in one
//! transaction ([`Store::write_batch`]: one multi-row insert per table, one fencing
//! check per session). A committer that takes items while another group commit is
//! in flight lingers (`node.commit_linger_us`) for more before it starts its own:
//! PostgreSQL's cost is largely per transaction (its round trips, the fence, the WAL
//! flush), so under load fewer and larger transactions cost less, while a lone
//! commit (light load) never waits. Nothing is acknowledged to a client before its
//! item's transaction has committed (invariant 2), and an actor never has two items in
//! flight, so per-session order is kept even with several committers.
//!
//! A fenced session is left out of its group and answered `Fenced`; its neighbours'
//! writes go on. If a group fails for a reason that one item can cause (a constraint,
//! or data PostgreSQL refuses), the group is retried one item per transaction, so one
//! session's bad write never fails its neighbours' writes.

use crate::store::{CommitError, CommitItem, Store};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    /// How long a committer waits for more items while another commit is in flight.
    pub linger: Duration,
}

impl Committer {
    /// Starts the committer tasks on `store`.
    pub fn start(store: Store, cfg: CommitterConfig) -> (Committer, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel::<Job>(8192);
        let rx = Arc::new(Mutex::new(rx));
        let writing = Arc::new(AtomicUsize::new(0));
        let tasks = (0..cfg.workers.max(1))
            .map(|_| {
                let (rx, writing) = (rx.clone(), writing.clone());
                let store = store.clone();
                tokio::spawn(async move { worker(store, rx, writing, cfg).await })
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
/// to `max_events` events; while another committer is writing (`writing > 0`), waits
/// up to `linger` for more.
async fn take_batch(
    rx: &Mutex<mpsc::Receiver<Job>>,
    max_events: usize,
    linger: Duration,
    writing: &AtomicUsize,
) -> Option<Vec<Job>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut events = first.0.events.len();
    let mut jobs = vec![first];
    let until = tokio::time::Instant::now() + linger;
    while events < max_events {
        let job = match rx.try_recv() {
            Ok(job) => job,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                if linger.is_zero() || writing.load(Ordering::Acquire) == 0 {
                    break;
                }
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(job)) => job,
                    _ => break,
                }
            }
        };
        events += job.0.events.len();
        jobs.push(job);
    }
    Some(jobs)
}

/// Counts its committer as writing (see [`take_batch`]) until dropped.
struct Writing<'a>(&'a AtomicUsize);

impl<'a> Writing<'a> {
    fn start(n: &'a AtomicUsize) -> Writing<'a> {
        n.fetch_add(1, Ordering::AcqRel);
        Writing(n)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn worker(
    store: Store,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    writing: Arc<AtomicUsize>,
    cfg: CommitterConfig,
) {
    let max_events = cfg.max_events.max(1);
    while let Some(jobs) = take_batch(&rx, max_events, cfg.linger, &writing).await {
        let started = Instant::now();
        let items: Vec<&CommitItem> = jobs.iter().map(|(i, _)| i).collect();
        // Counted as writing until the transaction ends, before anyone is answered: an
        // actor answered here sends its next item at once, and that item must not wait
        // for a commit that is already over.
        let writing_now = Writing::start(&writing);
        let result = store.write_batch(&items, cfg.anchor_every).await;
        drop(writing_now);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A job of one event; its outcome channel is dropped (nobody waits here).
    fn job() -> Job {
        let item = CommitItem {
            events: vec![crate::store::EventRow {
                id: uuid::Uuid::new_v4(),
                seq: 1,
                kind: "state_update".into(),
                data_json: "{}".into(),
                command_id: None,
                user_id: None,
                created_at: chrono::Utc::now().naive_utc(),
                correlation: None,
                combat_id: None,
            }],
            ..CommitItem::default()
        };
        (item, oneshot::channel().0)
    }

    /// A committers' queue holding one job.
    async fn queue_of_one() -> (mpsc::Sender<Job>, Mutex<mpsc::Receiver<Job>>) {
        let (tx, rx) = mpsc::channel(8);
        tx.send(job()).await.unwrap();
        (tx, Mutex::new(rx))
    }

    const FOREVER: Duration = Duration::from_secs(3600);
    const BOUND: Duration = Duration::from_secs(10);

    /// The batch `take` returns, which it must within [`BOUND`] (`why` it must).
    async fn taken(
        take: impl std::future::Future<Output = Option<Vec<Job>>>,
        why: &str,
    ) -> Vec<Job> {
        tokio::time::timeout(BOUND, take)
            .await
            .expect(why)
            .expect("the queue holds a job")
    }

    #[tokio::test]
    async fn a_lone_committer_never_lingers() {
        let (_tx, rx) = queue_of_one().await;
        let writing = AtomicUsize::new(0);
        let jobs = taken(
            take_batch(&rx, 100, FOREVER, &writing),
            "no other commit in flight: taken at once, not after the linger",
        )
        .await;
        assert_eq!(jobs.len(), 1);
    }

    #[tokio::test]
    async fn beside_a_commit_in_flight_later_items_join_the_batch() {
        let (tx, rx) = queue_of_one().await;
        let writing = AtomicUsize::new(1);
        let take = take_batch(&rx, 2, FOREVER, &writing);
        tokio::pin!(take);
        // It took the first job, found nothing else, and waits for more.
        assert!(futures::poll!(take.as_mut()).is_pending());
        tx.send(job()).await.unwrap();
        let jobs = taken(
            take,
            "full at max_events: taken without waiting out the linger",
        )
        .await;
        assert_eq!(
            jobs.len(),
            2,
            "the job sent while it lingered joined the batch"
        );
    }

    #[tokio::test]
    async fn the_linger_is_bounded() {
        let (tx, rx) = queue_of_one().await;
        let writing = AtomicUsize::new(1);
        let linger = Duration::from_millis(1);
        let jobs = taken(
            take_batch(&rx, 100, linger, &writing),
            "taken once the linger is over",
        )
        .await;
        assert_eq!(jobs.len(), 1);
        // A closed queue ends the linger too.
        tx.send(job()).await.unwrap();
        let take = take_batch(&rx, 100, FOREVER, &writing);
        tokio::pin!(take);
        assert!(futures::poll!(take.as_mut()).is_pending());
        drop(tx);
        let jobs = taken(take, "a closed queue ends the linger").await;
        assert_eq!(jobs.len(), 1);
    }
}
