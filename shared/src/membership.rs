//! Membership: the live-member table every router and node keeps.
//!
//! Sans-IO: the caller feeds it heartbeats and leaves as they arrive over NATS
//! (`{prefix}.cluster.heartbeat`, `{prefix}.cluster.leave`) and calls [`Membership::tick`]
//! with the current time; the table never reads a clock itself. A member not heard from
//! for `failure_timeout` is dead; a graceful leave removes it at once. The placement
//! [`Ring`] is rebuilt from the live, non-draining nodes whenever that set changes, and
//! `ring_version` counts those changes.

use crate::ring::Ring;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    Node,
    Router,
}

impl MemberKind {
    /// The kind as heartbeats and the cluster tool's state file spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberKind::Node => "node",
            MemberKind::Router => "router",
        }
    }
}

impl std::fmt::Display for MemberKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`: widths and alignment (`{:<7}`) apply.
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Serving; nodes in this state are on the ring.
    Alive,
    /// Handing its sessions off before leaving; off the ring, still answering.
    Draining,
}

/// What a member announces every `membership.heartbeat_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: String,
    pub kind: MemberKind,
    pub state: MemberState,
    /// Start time of the process (ms since the epoch); a restart with the same id has a
    /// larger one, and older messages are ignored.
    pub incarnation: u64,
    /// Sessions the member owns (nodes) or connections it serves (routers).
    pub load: u64,
    /// Health/metrics URL of the member, for operators.
    #[serde(default)]
    pub http: Option<String>,
}

/// A graceful leave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    pub id: String,
    pub incarnation: u64,
}

/// One row of the member table, as `GET /api/v2/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: String,
    pub kind: MemberKind,
    pub state: MemberState,
    pub incarnation: u64,
    pub load: u64,
    pub http: Option<String>,
    pub last_seen_ms: u64,
    pub on_ring: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    hb: Heartbeat,
    last_seen: Instant,
}

/// The member table plus the ring derived from it.
#[derive(Debug, Clone)]
pub struct Membership {
    members: BTreeMap<String, Entry>,
    /// Incarnations that left gracefully, so a late heartbeat does not resurrect them.
    left: BTreeMap<String, u64>,
    failure_timeout: Duration,
    ring: Ring,
    ring_version: u64,
    /// The previous tick, to notice when this process itself was paused.
    last_tick: Option<Instant>,
}

impl Membership {
    pub fn new(failure_timeout: Duration, vnodes: u32) -> Self {
        Self {
            members: BTreeMap::new(),
            left: BTreeMap::new(),
            failure_timeout,
            ring: Ring::new(vnodes),
            ring_version: 0,
            last_tick: None,
        }
    }

    /// Records a heartbeat. Returns true when the ring changed.
    pub fn observe(&mut self, hb: Heartbeat, now: Instant) -> bool {
        if let Some(&gone) = self.left.get(&hb.id) {
            if hb.incarnation <= gone {
                return false;
            }
            self.left.remove(&hb.id);
        }
        if let Some(e) = self.members.get(&hb.id) {
            if hb.incarnation < e.hb.incarnation {
                return false; // a stale message from an earlier life
            }
        }
        self.members
            .insert(hb.id.clone(), Entry { hb, last_seen: now });
        self.rebuild()
    }

    /// Records a graceful leave. Returns true when the ring changed.
    pub fn leave(&mut self, leave: &Leave) -> bool {
        match self.members.get(&leave.id) {
            Some(e) if e.hb.incarnation <= leave.incarnation => {
                self.members.remove(&leave.id);
            }
            Some(_) => return false,
            None => {}
        }
        self.left.insert(leave.id.clone(), leave.incarnation);
        self.rebuild()
    }

    /// Removes a member known to be gone before its timeout (it no longer listens on
    /// NATS). A later heartbeat of a member that is in fact alive adds it back.
    /// Returns true when the ring changed.
    pub fn mark_dead(&mut self, id: &str) -> bool {
        if self.members.remove(id).is_some() {
            self.rebuild()
        } else {
            false
        }
    }

    /// Expires members not heard from for the failure timeout. Returns the ids that
    /// died; the ring is rebuilt when any of them was on it.
    ///
    /// A tick that comes much later than the previous one means this process was not
    /// running (SIGSTOP, a long GC-like stall): it heard nothing meanwhile, which says
    /// nothing about the others. Their silence during our own pause is forgiven (their
    /// last-seen times move forward by the gap) instead of declaring them all dead.
    pub fn tick(&mut self, now: Instant) -> Vec<String> {
        let timeout = self.failure_timeout;
        if let Some(prev) = self.last_tick.replace(now) {
            let gap = now.saturating_duration_since(prev);
            if gap > timeout / 2 {
                for e in self.members.values_mut() {
                    e.last_seen += gap;
                }
            }
        }
        let dead: Vec<String> = self
            .members
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dead {
            self.members.remove(id);
        }
        if !dead.is_empty() {
            self.rebuild();
        }
        dead
    }

    fn rebuild(&mut self) -> bool {
        let want: Vec<&str> = self
            .members
            .values()
            .filter(|e| e.hb.kind == MemberKind::Node && e.hb.state == MemberState::Alive)
            .map(|e| e.hb.id.as_str())
            .collect();
        let have: Vec<String> = self.ring.nodes().iter().cloned().collect();
        let mut changed = false;
        for n in &have {
            if !want.contains(&n.as_str()) {
                changed |= self.ring.remove(n);
            }
        }
        for n in want {
            changed |= self.ring.add(n);
        }
        if changed {
            self.ring_version += 1;
        }
        changed
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn ring_version(&self) -> u64 {
        self.ring_version
    }

    /// Whether `id` is a live member (in any state).
    pub fn is_alive(&self, id: &str) -> bool {
        self.members.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&Heartbeat> {
        self.members.get(id).map(|e| &e.hb)
    }

    pub fn members(&self, now: Instant) -> Vec<MemberView> {
        self.members
            .values()
            .map(|e| MemberView {
                id: e.hb.id.clone(),
                kind: e.hb.kind,
                state: e.hb.state,
                incarnation: e.hb.incarnation,
                load: e.hb.load,
                http: e.hb.http.clone(),
                last_seen_ms: now.saturating_duration_since(e.last_seen).as_millis() as u64,
                on_ring: self.ring.contains(&e.hb.id),
            })
            .collect()
    }

    pub fn node_count(&self) -> usize {
        self.ring.nodes().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_is_displayed_as_it_is_serialised() {
        for kind in [MemberKind::Node, MemberKind::Router] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(format!("{kind:<7}|"), format!("{:<7}|", kind.as_str()));
        }
    }

    fn hb(id: &str, kind: MemberKind, state: MemberState, inc: u64) -> Heartbeat {
        Heartbeat {
            id: id.into(),
            kind,
            state,
            incarnation: inc,
            load: 0,
            http: None,
        }
    }

    #[test]
    fn nodes_join_die_and_leave() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_millis(1500), 8);
        assert!(m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), t0));
        assert!(m.observe(hb("n2", MemberKind::Node, MemberState::Alive, 1), t0));
        // Routers are members but not on the ring.
        assert!(!m.observe(hb("r1", MemberKind::Router, MemberState::Alive, 1), t0));
        assert_eq!(m.node_count(), 2);
        assert_eq!(m.ring_version(), 2);
        // A repeated heartbeat changes nothing.
        assert!(!m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), t0));

        // n2 stays silent past the timeout; n1 and r1 keep beating.
        let t1 = t0 + Duration::from_millis(1000);
        m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), t1);
        m.observe(hb("r1", MemberKind::Router, MemberState::Alive, 1), t1);
        assert!(m.tick(t0 + Duration::from_millis(1400)).is_empty());
        assert_eq!(
            m.tick(t0 + Duration::from_millis(1600)),
            vec!["n2".to_string()]
        );
        assert_eq!(m.node_count(), 1);

        // Graceful leave is immediate, and a late heartbeat of that life is ignored.
        assert!(m.leave(&Leave {
            id: "n1".into(),
            incarnation: 1
        }));
        assert_eq!(m.node_count(), 0);
        assert!(!m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), t1));
        // A restart (new incarnation) joins again.
        assert!(m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 2), t1));
    }

    #[test]
    fn a_member_marked_dead_leaves_at_once_and_can_return() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_millis(1500), 8);
        m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), t0);
        m.observe(hb("n2", MemberKind::Node, MemberState::Alive, 1), t0);
        assert!(m.mark_dead("n2"));
        assert!(!m.ring().contains("n2"));
        assert!(!m.mark_dead("n2"));
        assert!(m.observe(hb("n2", MemberKind::Node, MemberState::Alive, 1), t0));
    }

    #[test]
    fn our_own_pause_does_not_kill_the_others() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_millis(1500), 8);
        m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), t0);
        m.observe(hb("n2", MemberKind::Node, MemberState::Alive, 1), t0);
        assert!(m.tick(t0 + Duration::from_millis(250)).is_empty());
        // We were stopped for 10 s: nobody is expired on the first tick after.
        let resumed = t0 + Duration::from_secs(10);
        assert!(m.tick(resumed).is_empty());
        assert_eq!(m.node_count(), 2);
        // But a member that stays silent after we resumed does die, on ticks at the
        // normal pace.
        let mut died = Vec::new();
        for i in 1..=8 {
            let now = resumed + Duration::from_millis(250 * i);
            m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), now);
            died.extend(m.tick(now));
        }
        assert_eq!(died, vec!["n2".to_string()]);
        assert_eq!(m.node_count(), 1);
    }

    #[test]
    fn draining_nodes_leave_the_ring_but_stay_members() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_millis(1500), 8);
        m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 1), t0);
        m.observe(hb("n2", MemberKind::Node, MemberState::Alive, 1), t0);
        assert!(m.observe(hb("n2", MemberKind::Node, MemberState::Draining, 1), t0));
        assert!(m.is_alive("n2"));
        assert!(!m.ring().contains("n2"));
        let views = m.members(t0);
        assert_eq!(views.len(), 2);
        assert!(!views.iter().find(|v| v.id == "n2").unwrap().on_ring);
    }

    #[test]
    fn stale_incarnations_are_ignored() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_millis(1500), 8);
        m.observe(hb("n1", MemberKind::Node, MemberState::Alive, 5), t0);
        assert!(!m.observe(hb("n1", MemberKind::Node, MemberState::Draining, 4), t0));
        assert!(m.ring().contains("n1"));
        assert!(!m.leave(&Leave {
            id: "n1".into(),
            incarnation: 4
        }));
        assert!(m.ring().contains("n1"));
    }
}
