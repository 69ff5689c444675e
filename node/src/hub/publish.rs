//! Outbound relay: committed session events to the broker, in version order, at least
//! once, nothing lost.
//!
//! The event log is the outbox. Each session has a cursor in PostgreSQL
//! (`hub_cursor.published_seq`): every event up to it has been confirmed by the
//! broker. Actors hand their committed events over in memory ([`Hub::committed`]); a
//! pass of the relay takes every session with news, publishes its events after the
//! cursor (from memory when memory holds them contiguously, else read back from the
//! log), waits for all the confirms, and then moves all those cursors forward in one
//! statement. A failure anywhere leaves the cursors where they were: the next pass
//! (here after the reconnect, or the new owner's, or the sweeper's) publishes again
//! from there.

use super::*;
use crate::outbox::{self, HubMessage};
use crate::store::{EventRow, HubRow};
use std::collections::{HashMap, VecDeque};

/// Events a session may hold in memory waiting for the broker; beyond it (a broker
/// outage) memory lets go and the relay reads the log instead.
const MAX_QUEUED: usize = 4096;
/// Events at most in one hub message.
const MAX_EVENTS_PER_MESSAGE: usize = 64;
/// The longest a pass is paced to by `rabbitmq.publish_max_messages_per_sec`: beyond
/// it, the broker gets more messages rather than the hub's consumers later events.
const MAX_PACE: Duration = Duration::from_secs(1);

/// How long a pass that published `messages` messages takes up before the next one:
/// `interval`, or as long as `max_rate` messages a second need for them (0: no cap),
/// at most [`MAX_PACE`]. A broker's (and the relay's) cost is per message: under load
/// a session's events then go out in fewer, larger batches; under light load nothing
/// waits longer than `interval`.
fn pace(interval: Duration, messages: usize, max_rate: u64) -> Duration {
    if max_rate == 0 {
        return interval;
    }
    let needed = Duration::from_secs_f64(messages as f64 / max_rate as f64);
    needed.min(MAX_PACE).max(interval)
}

/// What the relay knows per session.
#[derive(Default)]
struct SessionOut {
    /// Committed events not yet published, contiguous, in version order.
    events: VecDeque<HubRow>,
    /// The cursor, when known.
    published: Option<u64>,
    /// Memory does not hold everything after the cursor: read the log.
    from_log: bool,
    /// The owner stopped: `(epoch, version)` to mark the cursor inactive at once
    /// everything up to `version` is published (no epoch: just forget the session).
    stopped: Option<Option<(u64, u64)>>,
}

impl SessionOut {
    fn has_work(&self) -> bool {
        self.from_log || !self.events.is_empty() || self.stopped.is_some()
    }
}

/// The relay's queues: per session, and the sessions with news.
#[derive(Default)]
pub struct Outbound {
    sessions: HashMap<Uuid, SessionOut>,
    ready: Vec<Uuid>,
}

impl Outbound {
    fn mark(&mut self, session: Uuid) {
        if !self.ready.contains(&session) {
            self.ready.push(session);
        }
    }
}

/// One session's share of a pass.
struct Plan {
    session: Uuid,
    messages: Vec<HubMessage>,
    events: usize,
    /// Read from the log and the read was full: there may be more.
    more: bool,
}

impl Hub {
    /// A session committed these events (in version order).
    pub fn committed(&self, session: Uuid, rows: Vec<EventRow>) {
        if !self.cfg.enabled || rows.is_empty() {
            return;
        }
        let mut out = self.outbound.lock().unwrap();
        let so = out.sessions.entry(session).or_default();
        let contiguous = so
            .events
            .back()
            .is_none_or(|last| last.seq + 1 == rows[0].seq);
        if !contiguous || so.events.len() + rows.len() > MAX_QUEUED {
            // Memory would skip events or hold too many: the log has them all.
            so.events.clear();
            so.from_log = true;
        } else {
            so.events.extend(rows.into_iter().map(HubRow::from));
        }
        out.mark(session);
        drop(out);
        self.wake.notify_one();
    }

    /// A session may have events memory does not hold (a new owner, the sweeper):
    /// re-read its cursor and publish from the log.
    pub fn dirty(&self, session: Uuid) {
        if !self.cfg.enabled {
            return;
        }
        let mut out = self.outbound.lock().unwrap();
        let so = out.sessions.entry(session).or_default();
        so.from_log = true;
        so.published = None;
        so.stopped = None;
        out.mark(session);
        drop(out);
        self.wake.notify_one();
    }

    /// The session's actor stopped at `version`; with `epoch` when it stopped as the
    /// owner (not fenced), so its cursor may be marked inactive once all is published.
    pub fn stopped(&self, session: Uuid, epoch: Option<u64>, version: u64) {
        if !self.cfg.enabled {
            return;
        }
        let mut out = self.outbound.lock().unwrap();
        let so = out.sessions.entry(session).or_default();
        so.stopped = Some(epoch.map(|e| (e, version)));
        out.mark(session);
        drop(out);
        self.wake.notify_one();
    }

    /// Finds sessions whose committed events stayed unpublished (a dead owner, a
    /// broker outage) among those the ring places on this node, and publishes them.
    pub(super) async fn sweep(self: Arc<Self>, ctx: Arc<NodeCtx>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.is_up() {
                continue;
            }
            match ctx.store.lagging_sessions(STALE_OUTBOX_MS, 1000).await {
                Ok(sessions) => {
                    for s in sessions {
                        if ctx.cluster.owner(&s).as_deref() == Some(ctx.id.as_str()) {
                            self.dirty(s);
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "outbox sweep failed"),
            }
        }
    }

    /// Publishes until the connection fails; returns why.
    pub(super) async fn publish_loop(&self, ctx: &NodeCtx, ch: &Channel) -> String {
        let interval = Duration::from_millis(self.cfg.publish_interval_ms);
        let max_rate = self.cfg.publish_max_messages_per_sec;
        loop {
            let started = Instant::now();
            let ready = std::mem::take(&mut self.outbound.lock().unwrap().ready);
            if ready.is_empty() {
                if !ch.status().connected() {
                    return "publish channel closed".into();
                }
                let _ = tokio::time::timeout(SWEEP_EVERY, self.wake.notified()).await;
                continue;
            }
            let messages = match self.pass(ctx, ch, ready).await {
                Ok(m) => m,
                Err(e) => return e,
            };
            // What is committed meanwhile goes out together with the next pass.
            let rest = pace(interval, messages, max_rate).saturating_sub(started.elapsed());
            if !rest.is_zero() {
                tokio::time::sleep(rest).await;
            }
        }
    }

    /// One pass over the sessions with news; the messages it published.
    async fn pass(&self, ctx: &NodeCtx, ch: &Channel, ready: Vec<Uuid>) -> Result<usize, String> {
        let started = Instant::now();
        let mut plans = Vec::with_capacity(ready.len());
        for s in ready {
            match self.plan(ctx, s).await {
                Ok(Some(p)) => plans.push(p),
                Ok(None) => self.finish_session(ctx, s).await,
                Err(e) => {
                    // The log could not be read: try again on the next tick.
                    tracing::debug!(session = %s, error = %e, "hub: reading the log failed");
                    self.forget(&[s]);
                }
            }
        }
        if plans.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.publish(ch, &plans).await {
            self.forget(&plans.iter().map(|p| p.session).collect::<Vec<_>>());
            return Err(format!("publishing: {e}"));
        }
        let to: Vec<(Uuid, u64)> = plans
            .iter()
            .filter_map(|p| p.messages.last().map(|m| (p.session, m.last_seq)))
            .collect();
        if let Err(e) = ctx.store.advance_cursors(&to).await {
            // Published but not recorded: the next pass publishes them again.
            tracing::debug!(error = %e, "hub: moving cursors failed");
            self.forget(&plans.iter().map(|p| p.session).collect::<Vec<_>>());
            return Ok(0);
        }
        let events: usize = plans.iter().map(|p| p.events).sum();
        let messages: usize = plans.iter().map(|p| p.messages.len()).sum();
        metrics::counter!("gs_node_hub_published_total").increment(events as u64);
        metrics::counter!("gs_node_hub_messages_total").increment(messages as u64);
        metrics::histogram!("gs_node_hub_publish_seconds").record(started.elapsed().as_secs_f64());
        for (p, (s, last)) in plans.iter().zip(to) {
            self.confirmed(s, last, p.more);
            self.finish_session(ctx, s).await;
        }
        Ok(messages)
    }

    /// What a session publishes in this pass: its events after the cursor, from
    /// memory or from the log. `None`: nothing to publish.
    async fn plan(&self, ctx: &NodeCtx, session: Uuid) -> crate::error::Result<Option<Plan>> {
        let known = self
            .outbound
            .lock()
            .unwrap()
            .sessions
            .get(&session)
            .and_then(|so| so.published);
        let published = match known {
            Some(p) => p,
            None => match ctx.store.hub_cursor(session).await? {
                Some(p) => p,
                None => {
                    // No cursor: not a session of this database (any more).
                    self.outbound.lock().unwrap().sessions.remove(&session);
                    return Ok(None);
                }
            },
        };
        let from_memory = {
            let mut out = self.outbound.lock().unwrap();
            let so = out.sessions.entry(session).or_default();
            so.published = Some(published);
            while so.events.front().is_some_and(|e| e.seq <= published) {
                so.events.pop_front();
            }
            let usable = !so.from_log && so.events.front().is_some_and(|e| e.seq == published + 1);
            if !usable && !so.events.is_empty() {
                so.from_log = true;
            }
            usable.then(|| so.events.drain(..).collect::<Vec<_>>())
        };
        let (rows, more) = match from_memory {
            Some(rows) => (rows, false),
            None if self.needs_log(&session) => {
                let limit = self.cfg.outbox_batch.max(1) as u64;
                let rows = ctx.store.hub_events(session, published, limit).await?;
                let more = rows.len() as u64 == limit;
                (rows, more)
            }
            None => (vec![], false),
        };
        if rows.is_empty() {
            self.log_caught_up(&session, published);
            return Ok(None);
        }
        let messages = outbox::messages(session, &rows, MAX_EVENTS_PER_MESSAGE);
        Ok(Some(Plan {
            session,
            events: rows.len(),
            messages,
            more,
        }))
    }

    fn needs_log(&self, session: &Uuid) -> bool {
        self.outbound
            .lock()
            .unwrap()
            .sessions
            .get(session)
            .is_some_and(|so| so.from_log)
    }

    /// The log holds nothing after `published`: memory is complete again.
    fn log_caught_up(&self, session: &Uuid, published: u64) {
        if let Some(so) = self.outbound.lock().unwrap().sessions.get_mut(session) {
            if so.events.front().is_none_or(|e| e.seq == published + 1) {
                so.from_log = false;
            }
        }
    }

    /// Publishes every plan's messages, then waits for all the confirms.
    async fn publish(&self, ch: &Channel, plans: &[Plan]) -> anyhow::Result<()> {
        let mut confirms = Vec::new();
        for m in plans.iter().flat_map(|p| &p.messages) {
            let props = BasicProperties::default()
                .with_message_id(m.message_id.to_string().as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let confirm = ch
                .basic_publish(
                    self.cfg.exchange.as_str().into(),
                    m.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.body,
                    props,
                )
                .await?;
            confirms.push((m, confirm));
        }
        for (m, confirm) in confirms {
            match confirm.await? {
                Confirmation::Ack(returned) => {
                    if returned.is_some() {
                        // Nobody is bound to this key: the broker accepted it but had
                        // no queue to put it in.
                        metrics::counter!("gs_node_hub_unroutable_total").increment(1);
                    }
                }
                Confirmation::Nack(_) => {
                    anyhow::bail!("broker refused message {}", m.message_id)
                }
                Confirmation::NotRequested => anyhow::bail!("publisher confirms are off"),
            }
        }
        Ok(())
    }

    /// The broker confirmed everything up to `last` and the cursor says so.
    fn confirmed(&self, session: Uuid, last: u64, more: bool) {
        let mut out = self.outbound.lock().unwrap();
        let Some(so) = out.sessions.get_mut(&session) else {
            return;
        };
        so.published = Some(so.published.map_or(last, |p| p.max(last)));
        while so.events.front().is_some_and(|e| e.seq <= last) {
            so.events.pop_front();
        }
        if more || so.has_work() {
            out.mark(session);
        }
    }

    /// These sessions' state is uncertain (a failed pass): re-read their cursors and
    /// publish from the log.
    fn forget(&self, sessions: &[Uuid]) {
        let mut out = self.outbound.lock().unwrap();
        for s in sessions {
            if let Some(so) = out.sessions.get_mut(s) {
                so.events.clear();
                so.from_log = true;
                so.published = None;
            }
            out.mark(*s);
        }
    }

    /// A stopped session with nothing left to publish: mark its cursor inactive (the
    /// sweeper can pass it by) and forget it.
    async fn finish_session(&self, ctx: &NodeCtx, session: Uuid) {
        let done = {
            let out = self.outbound.lock().unwrap();
            match out.sessions.get(&session) {
                Some(so) if so.events.is_empty() && !so.from_log => {
                    so.stopped.map(|stop| (stop, so.published))
                }
                _ => None,
            }
        };
        let Some((stop, published)) = done else {
            return;
        };
        if let (Some((epoch, version)), Some(p)) = (stop, published) {
            if p < version {
                return;
            }
            if let Err(e) = ctx.store.deactivate_cursor(session, epoch, version).await {
                tracing::debug!(%session, error = %e, "hub: cursor not marked inactive");
                return;
            }
        }
        let mut out = self.outbound.lock().unwrap();
        if out
            .sessions
            .get(&session)
            .is_some_and(|so| so.stopped == Some(stop) && so.events.is_empty())
        {
            out.sessions.remove(&session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_paced_by_the_message_cap_between_the_interval_and_a_second() {
        let ms = Duration::from_millis;
        // Light load: the interval alone.
        assert_eq!(pace(ms(50), 3, 200), ms(50));
        assert_eq!(pace(ms(50), 0, 200), ms(50));
        // Under load: as long as the cap needs for what the pass published.
        assert_eq!(pace(ms(50), 40, 200), ms(200));
        // Never longer than a second, and no cap at all with 0.
        assert_eq!(pace(ms(50), 10_000, 200), MAX_PACE);
        assert_eq!(pace(ms(50), 10_000, 0), ms(50));
    }
}
