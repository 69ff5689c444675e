//! Placement: which node owns a session, by consistent hashing.
//!
//! A pure, sans-IO module over `hashring`. `hashring` 0.3 has no virtual nodes, so each
//! node is inserted as `vnodes` entries `(node, replica)`; a session id hashes to the
//! first entry clockwise. Removing a node removes only its entries, so only its sessions
//! move (each to the next node on the ring); adding one takes about 1/N of the sessions
//! from the others and moves nothing else.
//!
//! `hashring`'s default hasher has fixed keys, so every process (routers and nodes)
//! computes the same placement from the same member set.
//!
//! Invariant: placement decides where commands are *sent*; it never decides who may
//! *write*. That is the ownership lock plus the fencing epoch (see `gs_node::ownership`).

use hashring::HashRing;
use std::collections::BTreeSet;
use uuid::Uuid;

/// One virtual node: a point of `node` on the ring.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VNode {
    node: String,
    replica: u32,
}

/// The ring over a set of node ids.
#[derive(Debug, Clone)]
pub struct Ring {
    ring: HashRing<VNode>,
    nodes: BTreeSet<String>,
    vnodes: u32,
}

impl Ring {
    pub fn new(vnodes: u32) -> Self {
        Self {
            ring: HashRing::new(),
            nodes: BTreeSet::new(),
            vnodes: vnodes.max(1),
        }
    }

    /// A ring over exactly `nodes`.
    pub fn with_nodes<I, S>(vnodes: u32, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut r = Ring::new(vnodes);
        for n in nodes {
            r.add(&n.into());
        }
        r
    }

    /// Adds a node; returns false if it was already there.
    pub fn add(&mut self, node: &str) -> bool {
        if !self.nodes.insert(node.to_string()) {
            return false;
        }
        let entries = (0..self.vnodes)
            .map(|replica| VNode {
                node: node.to_string(),
                replica,
            })
            .collect();
        self.ring.batch_add(entries);
        true
    }

    /// Removes a node; returns false if it was not there.
    pub fn remove(&mut self, node: &str) -> bool {
        if !self.nodes.remove(node) {
            return false;
        }
        for replica in 0..self.vnodes {
            self.ring.remove(&VNode {
                node: node.to_string(),
                replica,
            });
        }
        true
    }

    /// The node a session belongs on, or `None` with no nodes.
    pub fn owner(&self, session: &Uuid) -> Option<&str> {
        self.ring.get(session).map(|v| v.node.as_str())
    }

    pub fn nodes(&self) -> &BTreeSet<String> {
        &self.nodes
    }

    pub fn contains(&self, node: &str) -> bool {
        self.nodes.contains(node)
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A fingerprint of the member set: equal on every process that sees the same nodes.
    pub fn fingerprint(&self) -> u64 {
        // FNV-1a over the sorted node ids: stable across processes and builds.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for n in &self.nodes {
            for b in n.bytes().chain(std::iter::once(0u8)) {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Deterministic session ids (seeded), so the figures below are reproducible.
    fn sessions(n: usize) -> Vec<Uuid> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                // splitmix64
                let mut next = || {
                    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = x;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^ (z >> 31)
                };
                let (a, b) = (next(), next());
                Uuid::from_u64_pair(a, b)
            })
            .collect()
    }

    fn node_names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node-{i}")).collect()
    }

    fn placement(ring: &Ring, ids: &[Uuid]) -> Vec<String> {
        ids.iter()
            .map(|s| ring.owner(s).unwrap().to_string())
            .collect()
    }

    #[test]
    fn empty_ring_has_no_owner() {
        assert_eq!(Ring::new(16).owner(&Uuid::new_v4()), None);
    }

    #[test]
    fn balance_with_3_to_10_nodes() {
        let ids = sessions(10_000);
        for n in 3..=10 {
            let ring = Ring::with_nodes(256, node_names(n));
            let mut counts: HashMap<String, usize> = HashMap::new();
            for o in placement(&ring, &ids) {
                *counts.entry(o).or_default() += 1;
            }
            assert_eq!(counts.len(), n, "every node gets sessions");
            let mean = ids.len() as f64 / n as f64;
            let max = *counts.values().max().unwrap() as f64;
            assert!(
                max / mean < 1.25,
                "{n} nodes: max/mean = {:.3} (counts {counts:?})",
                max / mean
            );
        }
    }

    #[test]
    fn adding_a_node_moves_about_one_nth_and_only_to_it() {
        let ids = sessions(10_000);
        for n in 3..=9 {
            let before = Ring::with_nodes(256, node_names(n));
            let mut after = before.clone();
            let new = format!("node-{}", n + 1);
            after.add(&new);
            let (a, b) = (placement(&before, &ids), placement(&after, &ids));
            let moved: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).collect();
            // Every moved session moved to the new node, none between old nodes.
            assert!(moved.iter().all(|(_, y)| **y == new));
            let frac = moved.len() as f64 / ids.len() as f64;
            let ideal = 1.0 / (n + 1) as f64;
            assert!(
                (frac - ideal).abs() < ideal * 0.25,
                "{n}+1 nodes: moved {frac:.3}, ideal {ideal:.3}"
            );
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_sessions() {
        let ids = sessions(10_000);
        for n in 4..=10 {
            let before = Ring::with_nodes(256, node_names(n));
            let mut after = before.clone();
            let gone = "node-2";
            assert!(after.remove(gone));
            let (a, b) = (placement(&before, &ids), placement(&after, &ids));
            for (x, y) in a.iter().zip(&b) {
                if x != gone {
                    assert_eq!(x, y, "a session of a surviving node moved");
                } else {
                    assert_ne!(y, gone);
                }
            }
            let moved = a.iter().filter(|x| *x == gone).count() as f64 / ids.len() as f64;
            let ideal = 1.0 / n as f64;
            assert!(
                (moved - ideal).abs() < ideal * 0.25,
                "{n} nodes: {moved:.3}"
            );
        }
    }

    #[test]
    fn same_members_same_placement_and_fingerprint() {
        let ids = sessions(1000);
        let a = Ring::with_nodes(64, ["b", "a", "c"]);
        let b = Ring::with_nodes(64, ["c", "b", "a"]);
        assert_eq!(placement(&a, &ids), placement(&b, &ids));
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(
            a.fingerprint(),
            Ring::with_nodes(64, ["a", "b"]).fingerprint()
        );
    }
}
