//! The engine's per-peer deadlines as a min-heap with lazy deletion: a wake
//! pops only the peers that are due, and moving a deadline pushes a new
//! entry instead of searching for the old one. An entry is current while
//! its peer's stored deadline still equals it; the engine says which with
//! the `current` closures, so the heap never holds peer state of its own.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::l2::PeerId;

#[derive(Debug, Default)]
pub struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, PeerId)>>,
}

impl Deadlines {
    pub fn push(&mut self, at: Instant, peer_id: PeerId) {
        self.heap.push(Reverse((at, peer_id)));
    }

    /// The earliest entry that is still current, dropping outdated ones
    /// on the way, so that the caller's next wake is a real deadline.
    pub fn earliest(&mut self, current: impl Fn(Instant, PeerId) -> bool) -> Option<Instant> {
        while let Some(Reverse((at, peer_id))) = self.heap.peek().copied() {
            if current(at, peer_id) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// The first entry at or before `now` that is still current, popped.
    pub fn pop_due(
        &mut self,
        now: Instant,
        current: impl Fn(Instant, PeerId) -> bool,
    ) -> Option<PeerId> {
        while let Some(Reverse((at, peer_id))) = self.heap.peek().copied() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if current(at, peer_id) {
                return Some(peer_id);
            }
        }
        None
    }

    /// The earliest entry without cleaning (for `&self` callers): may be
    /// an outdated one, which only costs an empty wake.
    pub fn peek(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Starts over from `live` (every peer's current deadline): bounds the
    /// heap when deadlines moved earlier many times without coming due.
    pub fn rebuild(&mut self, live: impl Iterator<Item = (Instant, PeerId)>) {
        self.heap.clear();
        self.heap.extend(live.map(Reverse));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_current_entries_come_due_in_time_order() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut d = Deadlines::default();
        // Peer 1 moved from 5 s to 2 s: the 5 s entry is outdated.
        let stored = [t0 + s(3), t0 + s(2), t0 + s(1)];
        d.push(t0 + s(5), 1);
        d.push(t0 + s(2), 1);
        d.push(t0 + s(3), 0);
        d.push(t0 + s(1), 2);
        let current = |at: Instant, peer_id: PeerId| stored[peer_id as usize] == at;
        assert_eq!(d.earliest(current), Some(t0 + s(1)));
        assert_eq!(d.pop_due(t0, current), None);
        let mut due = Vec::new();
        while let Some(p) = d.pop_due(t0 + s(10), current) {
            due.push(p);
        }
        assert_eq!(due, vec![2, 1, 0]);
        assert_eq!(d.len(), 0, "the outdated entry went on the way");
    }
}
