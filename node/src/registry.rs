//! The actors a node runs, by session: routing of requests to them, spawning on
//! first use, and handoff when the ring moves a session elsewhere.

use crate::actor::{self, Control, Envelope};
use crate::NodeCtx;
use gs_shared::protocol::{codes, WireError};
use gs_shared::rpc::{NodeReply, ReplyBody, RequestBody};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

struct Entry {
    gen: u64,
    tx: mpsc::Sender<Envelope>,
    control: watch::Sender<Control>,
}

#[derive(Default)]
pub struct Registry {
    actors: Mutex<HashMap<Uuid, Entry>>,
    next_gen: AtomicU64,
    draining: AtomicBool,
    /// Sessions whose stored data could not be loaded, with why and since when: their
    /// requests are refused at once (`session_quarantined`) instead of activating, and
    /// failing, again on every request.
    quarantined: Mutex<HashMap<Uuid, (String, Instant)>>,
}

/// How long a session whose data could not be loaded stays quarantined before the
/// next request tries again (an operator may have repaired it meanwhile).
pub const QUARANTINE: Duration = Duration::from_secs(300);

impl Registry {
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

    /// Routes a request to its session's actor, starting one if this node is the
    /// session's place on the ring. Never blocks: a full inbox answers `overloaded`.
    pub async fn dispatch(&self, ctx: &Arc<NodeCtx>, env: Envelope) {
        let sid = env.req.session_id;
        // Expired requests still go to the actor: only it knows whether an expired
        // command was already applied (then it answers with the original version).
        let owner = ctx.cluster.owner(&sid);
        if self.draining.load(Ordering::SeqCst) || owner.as_deref() != Some(ctx.id.as_str()) {
            let reply = match owner {
                None => NodeReply::err(WireError::new(
                    codes::SERVICE_UNAVAILABLE,
                    "no live node to place the session on",
                )),
                Some(o) => NodeReply::Err {
                    error: WireError::new(codes::NOT_OWNER, "another node owns this session"),
                    owner: (o != ctx.id).then_some(o),
                },
            };
            env.reply.send(ctx, reply).await;
            return;
        }
        if let Some(reason) = self.quarantine_reason(&sid) {
            let error = WireError::new(
                codes::SESSION_QUARANTINED,
                "the session's stored data cannot be loaded; it is set aside for an operator",
            )
            .with_details(serde_json::json!({ "reason": reason }));
            env.reply.send(ctx, NodeReply::err(error)).await;
            return;
        }
        // A connection leaving (or touching) a session that is not running has nothing
        // to undo or refresh: no activation for it.
        if matches!(
            env.req.body,
            RequestBody::Detach { .. } | RequestBody::Touch { .. }
        ) && !self.actors.lock().unwrap().contains_key(&sid)
        {
            let done = NodeReply::Ok {
                body: ReplyBody::Done,
            };
            env.reply.send(ctx, done).await;
            return;
        }
        let mut env = env;
        for _ in 0..3 {
            let (tx, gen) = {
                let mut actors = self.actors.lock().unwrap();
                match actors.get(&sid) {
                    Some(e) => (e.tx.clone(), e.gen),
                    None => {
                        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
                        let (tx, rx) = mpsc::channel(ctx.cfg.node.inbox_capacity.max(1));
                        let (ctl_tx, ctl_rx) = watch::channel(Control::Run);
                        actors.insert(
                            sid,
                            Entry {
                                gen,
                                tx: tx.clone(),
                                control: ctl_tx,
                            },
                        );
                        ctx.cluster.set_load(actors.len() as u64);
                        // The request goes in before the task starts: activation reads
                        // the requests already queued (a create must be among them, or
                        // the actor would look for a session that does not exist yet).
                        // A fresh channel has room for one.
                        if let Err(e) = tx.try_send(env) {
                            unreachable!("a fresh inbox refused its first request: {e}");
                        }
                        tokio::spawn(actor::run(ctx.clone(), sid, gen, rx, ctl_rx));
                        return;
                    }
                }
            };
            match tx.try_send(env) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(e)) => {
                    metrics::counter!("gs_node_overloaded_total").increment(1);
                    e.reply
                        .send(
                            ctx,
                            NodeReply::err(WireError::new(
                                codes::OVERLOADED,
                                "the session is busy; retry shortly",
                            )),
                        )
                        .await;
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(e)) => {
                    // The actor stopped between lookup and send: forget it and retry.
                    self.remove(ctx, &sid, gen);
                    env = e;
                }
            }
        }
        env.reply
            .send(
                ctx,
                NodeReply::err(WireError::new(
                    codes::SERVICE_UNAVAILABLE,
                    "session restarting",
                )),
            )
            .await;
    }

    /// Called by an actor when it stops (only removes its own generation); keeps the
    /// session count the node announces current.
    pub fn remove(&self, ctx: &NodeCtx, sid: &Uuid, gen: u64) {
        let mut actors = self.actors.lock().unwrap();
        if actors.get(sid).map(|e| e.gen) == Some(gen) {
            actors.remove(sid);
        }
        ctx.cluster.set_load(actors.len() as u64);
    }

    pub fn len(&self) -> usize {
        self.actors.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sessions(&self) -> Vec<Uuid> {
        self.actors.lock().unwrap().keys().copied().collect()
    }

    /// After a ring change: hands off every session the ring now places elsewhere.
    pub fn rebalance(&self, ctx: &NodeCtx) {
        let ring = ctx.cluster.ring();
        let actors = self.actors.lock().unwrap();
        for (sid, e) in actors.iter() {
            if ring.owner(sid) != Some(ctx.id.as_str()) {
                let _ = e.control.send(Control::Handoff);
            }
        }
    }

    /// Shutdown: refuse new work and stop every actor.
    pub fn shutdown_all(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for e in self.actors.lock().unwrap().values() {
            let _ = e.control.send(Control::Shutdown);
        }
    }
}
