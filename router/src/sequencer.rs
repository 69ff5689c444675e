//! Ordering of a session's event stream (sans-IO).
//!
//! Events arrive over NATS in publish order from one owner, but around a failover an
//! event can be lost (the owner died after committing, before publishing) or repeated
//! (the new owner republishes its newest event). The sequencer turns what arrives
//! into a gapless, duplicate-free, increasing sequence: duplicates are dropped, early
//! events are held until the missing ones are filled in (from the owner's memory or
//! the log), and [`Sequencer::gap`] names what is missing.

use std::collections::BTreeMap;

/// Most events held while a gap is being filled; past it the oldest wait is given up
/// and the stream restarts at the held events (clients then catch up on their own).
pub const MAX_PENDING: usize = 4096;

#[derive(Debug)]
pub struct Sequencer<T> {
    next: Option<u64>,
    pending: BTreeMap<u64, T>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Self {
            next: None,
            pending: BTreeMap::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// The version expected next, once known.
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// Everything up to `last` has been delivered elsewhere (e.g. a client's sync).
    /// Only moves forward. Returns what became deliverable.
    pub fn seed(&mut self, last: u64) -> Vec<(u64, T)> {
        if self.next.is_none_or(|n| n <= last) {
            self.next = Some(last + 1);
        }
        self.drain()
    }

    /// Offers one event; returns the events now deliverable, in order.
    pub fn push(&mut self, version: u64, item: T) -> Vec<(u64, T)> {
        let next = *self.next.get_or_insert(version);
        if version < next {
            return vec![]; // a duplicate
        }
        self.pending.insert(version, item);
        if self.pending.len() > MAX_PENDING {
            // Give up on the oldest gap rather than grow without bound.
            if let Some((&first, _)) = self.pending.iter().next() {
                self.next = Some(first);
            }
        }
        self.drain()
    }

    fn drain(&mut self) -> Vec<(u64, T)> {
        let Some(mut next) = self.next else {
            return vec![];
        };
        // Drop anything already delivered.
        while let Some((&v, _)) = self.pending.iter().next() {
            if v < next {
                self.pending.remove(&v);
            } else {
                break;
            }
        }
        let mut out = Vec::new();
        while let Some(item) = self.pending.remove(&next) {
            out.push((next, item));
            next += 1;
        }
        self.next = Some(next);
        out
    }

    /// The missing range `(after, up_to)`: versions `after+1 ..= up_to` are needed
    /// before the held events can go out.
    pub fn gap(&self) -> Option<(u64, u64)> {
        let next = self.next?;
        let (&first, _) = self.pending.iter().next()?;
        (first > next).then(|| (next - 1, first - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(v: Vec<(u64, ())>) -> Vec<u64> {
        v.into_iter().map(|(v, _)| v).collect()
    }

    #[test]
    fn in_order_duplicates_and_gaps() {
        let mut s = Sequencer::default();
        assert_eq!(versions(s.push(5, ())), vec![5]);
        assert_eq!(versions(s.push(6, ())), vec![6]);
        assert!(s.push(6, ()).is_empty(), "duplicate dropped");
        assert!(s.push(9, ()).is_empty(), "held behind a gap");
        assert_eq!(s.gap(), Some((6, 8)));
        assert!(s.push(8, ()).is_empty());
        assert_eq!(s.gap(), Some((6, 7)));
        assert_eq!(versions(s.push(7, ())), vec![7, 8, 9]);
        assert_eq!(s.gap(), None);
        assert_eq!(s.next(), Some(10));
    }

    #[test]
    fn seeding_skips_what_was_delivered() {
        let mut s = Sequencer::default();
        assert!(s.push(12, ()).is_empty() || s.next() == Some(13));
        let mut s = Sequencer::default();
        assert_eq!(versions(s.seed(10)), Vec::<u64>::new());
        assert!(s.push(10, ()).is_empty());
        assert!(s.push(12, ()).is_empty());
        assert_eq!(s.gap(), Some((10, 11)));
        assert_eq!(versions(s.seed(11)), vec![12]);
        // Seeding never moves backwards.
        assert!(s.seed(3).is_empty());
        assert_eq!(s.next(), Some(13));
    }

    #[test]
    fn pending_is_bounded() {
        let mut s = Sequencer::default();
        s.push(1, ());
        for v in 3..(3 + MAX_PENDING as u64) {
            assert!(s.push(v, ()).is_empty());
        }
        let out = s.push(3 + MAX_PENDING as u64, ());
        assert_eq!(out.len(), MAX_PENDING + 1, "gave up on version 2");
        assert_eq!(s.gap(), None);
    }
}
