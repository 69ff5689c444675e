//! The exactly-once memory of a session: the window of recent command ids.

use super::{command_id, expired, Envelope, Now};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Exactly-once memory: command id → the version its last event produced.
pub(super) struct Dedupe {
    pub(super) map: HashMap<Uuid, u64>,
    pub(super) order: VecDeque<Uuid>,
    pub(super) cap: usize,
    /// Whether every command the session ever committed is in `map` (so a miss means
    /// new).
    pub(super) complete: bool,
    /// Until when misses are checked against the log although the window is
    /// incomplete (see [`Dedupe::misses_to_verify`]).
    pub(super) verify_until: Option<Instant>,
}

/// How long misses are checked against the log after a commit failed: the router
/// retries the failed commands under the same ids well within this.
pub(super) const VERIFY_AFTER_FAILURE: Duration = Duration::from_secs(60);

impl Dedupe {
    pub(super) fn new(cap: usize, commands: Vec<(Uuid, u64)>, complete: bool) -> Dedupe {
        let mut d = Dedupe {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
            complete,
            verify_until: None,
        };
        d.reset(commands, complete);
        d
    }

    /// Replaces the window with `commands` (newest first).
    pub(super) fn reset(&mut self, commands: Vec<(Uuid, u64)>, complete: bool) {
        self.map.clear();
        self.order.clear();
        // Oldest first, so the newest stay when the window is full.
        for (c, v) in commands.into_iter().rev() {
            self.insert(c, v);
        }
        self.complete = complete;
    }

    /// The commands of a batch to look up in the log before deciding it.
    ///
    /// When the window covers the whole log, a miss is new. When it does not, a miss
    /// is almost always new too, and looking every batch up would cost a random
    /// index probe per command on a log that outgrew memory (throughput fell by
    /// a third over a 10-minute run). The `UNIQUE(session_id, command_id)` constraint
    /// keeps exactly-once without the look-up: a command older than the window that
    /// is sent again fails its commit instead of being applied twice; the failure
    /// ("outcome unknown") opens a verification period in which misses are looked up,
    /// so the router's retry under the same id finds the original version. Requests
    /// the router has given up on are always looked up: the answer "not applied" must
    /// never be given for a command that was.
    pub(super) fn misses_to_verify<R>(&self, batch: &[Envelope<R>], now: Now) -> Vec<Uuid> {
        if self.complete {
            return Vec::new();
        }
        let verifying = self.verify_until.is_some_and(|t| now.at < t);
        batch
            .iter()
            .filter(|e| verifying || expired(&e.req, now))
            .filter_map(|e| command_id(&e.req.body))
            .filter(|c| !self.map.contains_key(c))
            .collect()
    }

    pub(super) fn insert(&mut self, id: Uuid, version: u64) {
        if self.map.insert(id, version).is_none() {
            self.order.push_back(id);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                    self.complete = false;
                }
            }
        }
    }
}
