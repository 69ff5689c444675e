//! The actors a node runs, by session: routing of requests to them, spawning on
//! first use, handoff when the ring moves a session elsewhere, and the drain at
//! shutdown.
//!
//! [`Registry::route`] decides where a request goes and does no I/O; [`dispatch`]
//! carries the decision out (sends the answer, or starts the actor task). The
//! registry keeps its own handles (node id, membership view), so it never takes the
//! [`NodeCtx`] it lives in. Actor tasks are kept in a `JoinSet`: finished ones are
//! reaped as new ones start, and [`Registry::drain`] signals every actor to stop and
//! joins them all.

use crate::actor::{self, Control, Envelope, Reply};
use crate::NodeCtx;
use gs_shared::cluster_view::ClusterView;
use gs_shared::protocol::{codes, WireError};
use gs_shared::rpc::{NodeReply, ReplyBody, RequestBody};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

struct Entry {
    gen: u64,
    tx: mpsc::Sender<Envelope>,
    control: watch::Sender<Control>,
}

/// The running actors and their tasks, under one lock with the draining flag: no
/// actor starts once the drain has signalled the others.
#[derive(Default)]
struct Actors {
    by_session: HashMap<Uuid, Entry>,
    tasks: JoinSet<()>,
    draining: bool,
}

pub struct Registry {
    node: String,
    cluster: ClusterView,
    inbox_capacity: usize,
    actors: Mutex<Actors>,
    next_gen: AtomicU64,
    /// Sessions whose stored data could not be loaded, with why and since when: their
    /// requests are refused at once (`session_quarantined`) instead of activating, and
    /// failing, again on every request.
    quarantined: Mutex<HashMap<Uuid, (String, Instant)>>,
}

/// How long a session whose data could not be loaded stays quarantined before the
/// next request tries again (an operator may have repaired it meanwhile).
pub const QUARANTINE: Duration = Duration::from_secs(300);

/// Where [`Registry::route`] sends a request.
pub enum Route {
    /// Queued in the inbox of the session's running actor.
    Queued,
    /// To be answered at once (another node's session, quarantined, busy, nothing to
    /// do).
    Answer(Reply, NodeReply),
    /// A new actor, its first request already in its inbox: start it.
    Start(NewActor),
}

/// What an actor task starts with.
pub struct NewActor {
    pub session: Uuid,
    pub gen: u64,
    pub inbox: mpsc::Receiver<Envelope>,
    pub control: watch::Receiver<Control>,
}

/// Routes a request to its session's actor, starting one if this node is the
/// session's place on the ring. Never blocks on the actor: a full inbox answers
/// `overloaded`.
pub async fn dispatch(ctx: &Arc<NodeCtx>, env: Envelope) {
    match ctx.registry.route(env) {
        Route::Queued => {}
        Route::Answer(reply, answer) => reply.send(ctx, answer).await,
        Route::Start(a) => ctx.registry.spawn(actor::run(
            ctx.clone(),
            a.session,
            a.gen,
            a.inbox,
            a.control,
        )),
    }
}

fn error(code: &str, message: &str) -> NodeReply {
    NodeReply::err(WireError::new(code, message))
}

impl Registry {
    pub fn new(node: String, cluster: ClusterView, inbox_capacity: usize) -> Registry {
        Registry {
            node,
            cluster,
            inbox_capacity: inbox_capacity.max(1),
            actors: Mutex::default(),
            next_gen: AtomicU64::new(0),
            quarantined: Mutex::default(),
        }
    }

    /// Sets a session aside: its stored data cannot be loaded (`reason`).
    pub fn quarantine(&self, session: Uuid, reason: String) {
        metrics::counter!("gs_node_sessions_quarantined_total").increment(1);
        tracing::error!(%session, %reason, "session quarantined: its stored data cannot be loaded");
        self.quarantined
            .lock()
            .unwrap()
            .insert(session, (reason, Instant::now()));
    }

    /// Why a session is quarantined, while it is.
    fn quarantine_reason(&self, session: &Uuid) -> Option<String> {
        let mut q = self.quarantined.lock().unwrap();
        if q.is_empty() {
            return None;
        }
        q.retain(|_, (_, since)| since.elapsed() < QUARANTINE);
        q.get(session).map(|(r, _)| r.clone())
    }

    /// Where a request goes; see [`Route`]. Expired requests still go to the actor:
    /// only it knows whether an expired command was already applied (then it answers
    /// with the original version).
    pub fn route(&self, env: Envelope) -> Route {
        let sid = env.req.session_id;
        if let Some(refusal) = self.not_here(&sid) {
            return Route::Answer(env.reply, refusal);
        }
        if let Some(reason) = self.quarantine_reason(&sid) {
            let error = WireError::new(
                codes::SESSION_QUARANTINED,
                "the session's stored data cannot be loaded; it is set aside for an operator",
            )
            .with_details(serde_json::json!({ "reason": reason }));
            return Route::Answer(env.reply, NodeReply::err(error));
        }
        // A connection leaving (or touching) a session that is not running has nothing
        // to undo or refresh: no activation for it.
        if matches!(
            env.req.body,
            RequestBody::Detach { .. } | RequestBody::Touch { .. }
        ) && !self.actors.lock().unwrap().by_session.contains_key(&sid)
        {
            let done = NodeReply::Ok {
                body: ReplyBody::Done,
            };
            return Route::Answer(env.reply, done);
        }
        self.enqueue(env)
    }

    /// The refusal of a request for a session this node does not serve (another
    /// node's on the ring, or this node is draining).
    fn not_here(&self, sid: &Uuid) -> Option<NodeReply> {
        let owner = self.cluster.owner(sid);
        let draining = self.actors.lock().unwrap().draining;
        if !draining && owner.as_deref() == Some(self.node.as_str()) {
            return None;
        }
        Some(match owner {
            None => error(
                codes::SERVICE_UNAVAILABLE,
                "no live node to place the session on",
            ),
            Some(o) => NodeReply::Err {
                error: WireError::new(codes::NOT_OWNER, "another node owns this session"),
                owner: (o != self.node).then_some(o),
            },
        })
    }

    /// Puts a request in its actor's inbox, or makes a new actor for it. An actor that
    /// stopped between lookup and send is forgotten and the request tried again.
    fn enqueue(&self, mut env: Envelope) -> Route {
        let sid = env.req.session_id;
        for _ in 0..3 {
            let (tx, gen) = {
                let mut actors = self.actors.lock().unwrap();
                match actors.by_session.get(&sid) {
                    Some(e) => (e.tx.clone(), e.gen),
                    None => return self.new_actor(&mut actors, env),
                }
            };
            match tx.try_send(env) {
                Ok(()) => return Route::Queued,
                Err(mpsc::error::TrySendError::Full(e)) => {
                    metrics::counter!("gs_node_overloaded_total").increment(1);
                    let busy = error(codes::OVERLOADED, "the session is busy; retry shortly");
                    return Route::Answer(e.reply, busy);
                }
                Err(mpsc::error::TrySendError::Closed(e)) => {
                    self.forget(&sid, gen);
                    env = e;
                }
            }
        }
        let restarting = error(codes::SERVICE_UNAVAILABLE, "session restarting");
        Route::Answer(env.reply, restarting)
    }

    /// Registers a new actor for `env`'s session with `env` in its inbox.
    fn new_actor(&self, actors: &mut Actors, env: Envelope) -> Route {
        let session = env.req.session_id;
        if actors.draining {
            let refusal = NodeReply::Err {
                error: WireError::new(codes::NOT_OWNER, "another node owns this session"),
                owner: self.cluster.owner(&session).filter(|o| o != &self.node),
            };
            return Route::Answer(env.reply, refusal);
        }
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let (tx, inbox) = mpsc::channel(self.inbox_capacity);
        let (control_tx, control) = watch::channel(Control::Run);
        // The request goes in before the task starts: activation reads the requests
        // already queued (a create must be among them, or the actor would look for a
        // session that does not exist yet). A fresh channel has room for one.
        if let Err(e) = tx.try_send(env) {
            unreachable!("a fresh inbox refused its first request: {e}");
        }
        let entry = Entry {
            gen,
            tx,
            control: control_tx,
        };
        actors.by_session.insert(session, entry);
        self.cluster.set_load(actors.by_session.len() as u64);
        Route::Start(NewActor {
            session,
            gen,
            inbox,
            control,
        })
    }

    /// Starts an actor task (kept for [`Registry::drain`]); reaps finished ones.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut actors = self.actors.lock().unwrap();
        while let Some(done) = actors.tasks.try_join_next() {
            report(done);
        }
        actors.tasks.spawn(task);
    }

    /// Called by a session task when it stops (only removes its own generation); keeps
    /// the session count the node announces current.
    pub fn remove(&self, sid: &Uuid, gen: u64) {
        self.forget(sid, gen);
    }

    fn forget(&self, sid: &Uuid, gen: u64) {
        let mut actors = self.actors.lock().unwrap();
        if actors.by_session.get(sid).map(|e| e.gen) == Some(gen) {
            actors.by_session.remove(sid);
        }
        self.cluster.set_load(actors.by_session.len() as u64);
    }

    pub fn len(&self) -> usize {
        self.actors.lock().unwrap().by_session.len()
    }

    /// Requests waiting in the inboxes of all running actors (an autoscaler's signal:
    /// a node whose actors cannot keep up queues here before it sheds `overloaded`).
    pub fn inbox_depth(&self) -> usize {
        let actors = self.actors.lock().unwrap();
        actors
            .by_session
            .values()
            .map(|e| e.tx.max_capacity() - e.tx.capacity())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sessions(&self) -> Vec<Uuid> {
        let actors = self.actors.lock().unwrap();
        actors.by_session.keys().copied().collect()
    }

    /// After a ring change: hands off every session the ring now places elsewhere.
    pub fn rebalance(&self) {
        let ring = self.cluster.ring();
        let actors = self.actors.lock().unwrap();
        for (sid, e) in actors.by_session.iter() {
            if ring.owner(sid) != Some(self.node.as_str()) {
                let _ = e.control.send(Control::Handoff);
            }
        }
    }

    /// Shutdown: refuses new work, tells every actor to stop (each hands its session
    /// off: lock released, queued requests redirected) and joins them. Actors still
    /// running after `within` are aborted; returns how many were.
    pub async fn drain(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        {
            let mut actors = self.actors.lock().unwrap();
            actors.draining = true;
            for e in actors.by_session.values() {
                let _ = e.control.send(Control::Shutdown);
            }
        }
        // An actor registered just before the drain may be spawned just after it took
        // the tasks: take them again until none is left.
        loop {
            let mut tasks = std::mem::take(&mut self.actors.lock().unwrap().tasks);
            if tasks.is_empty() {
                return 0;
            }
            let joined = tokio::time::timeout_at(deadline, async {
                while let Some(done) = tasks.join_next().await {
                    report(done);
                }
            })
            .await;
            if joined.is_err() {
                let left = tasks.len();
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return left;
            }
        }
    }
}

/// Logs an actor task that panicked.
fn report(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a session actor panicked");
        }
    }
}
