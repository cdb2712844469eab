//! Bounded per-key state for the detectors: per-second counters over a
//! short ring, and maps with a cap (what does not fit is counted, not kept).

use std::{borrow::Borrow, hash::Hash, sync::Arc};

use rustc_hash::FxHashMap;

use crate::workload::Workload;

/// Per-second values of the last `len` seconds (a ring indexed by the
/// second): constant memory, and old seconds fall out on their own.
#[derive(Clone, Debug)]
pub struct SecondRing<T> {
    /// (second, value); a slot holds the newest second that mapped to it.
    slots: Box<[(u64, T)]>,
}

impl<T: Copy + Default> SecondRing<T> {
    pub fn new(seconds: usize) -> Self {
        Self {
            slots: vec![(u64::MAX, T::default()); seconds.max(1)].into_boxed_slice(),
        }
    }

    /// The value of `second`, to update; `None` when the ring has moved past
    /// it (a record that arrived too late to count).
    pub fn at(&mut self, second: u64) -> Option<&mut T> {
        let len = self.slots.len() as u64;
        let slot = &mut self.slots[(second % len) as usize];
        if slot.0 == u64::MAX || slot.0 < second {
            *slot = (second, T::default());
        } else if slot.0 > second {
            return None;
        }
        Some(&mut slot.1)
    }

    /// The value of `second` (default when not held).
    pub fn get(&self, second: u64) -> T {
        let slot = self.slots[(second % self.slots.len() as u64) as usize];
        if slot.0 == second {
            slot.1
        } else {
            T::default()
        }
    }

    /// Values of the seconds `from..to`.
    pub fn range(&self, from: u64, to: u64) -> impl Iterator<Item = T> + '_ {
        (from..to).map(|second| self.get(second))
    }
}

/// A hash map that holds at most `cap` keys; observations of keys that do
/// not fit are counted in `untracked`.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    map: FxHashMap<K, V>,
    cap: usize,
    untracked: u64,
}

impl<K: Eq + Hash, V> BoundedMap<K, V> {
    pub fn new(cap: usize) -> Self {
        Self {
            map: FxHashMap::default(),
            cap,
            untracked: 0,
        }
    }

    /// The value of `key`, created by `new` (with the owned key from
    /// `owned`) if there is room.
    pub fn get_or_insert<Q>(
        &mut self,
        key: &Q,
        owned: impl FnOnce() -> K,
        new: impl FnOnce() -> V,
    ) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        if !self.map.contains_key(key) {
            if self.map.len() >= self.cap {
                self.untracked += 1;
                return None;
            }
            self.map.insert(owned(), new());
        }
        self.map.get_mut(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.map.get_mut(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.map.iter_mut()
    }

    pub fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn untracked(&self) -> u64 {
        self.untracked
    }
}

/// Workloads kept per `WorkloadCounts` (the rest are counted only).
pub const MAX_COUNTED_WORKLOADS: usize = 64;

/// How much each workload contributed to an endpoint's alert, and when it
/// last did: the alert's `workloads` and `workloads_affected`.
#[derive(Debug, Default)]
pub struct WorkloadCounts {
    counts: FxHashMap<Arc<str>, (Workload, u64, u64)>,
    untracked: u64,
}

impl WorkloadCounts {
    pub fn add(&mut self, workload: &Workload, n: u64, ts_ns: u64) {
        if let Some((_, count, last_ns)) = self.counts.get_mut(&workload.key) {
            *count += n;
            *last_ns = (*last_ns).max(ts_ns);
        } else if self.counts.len() < MAX_COUNTED_WORKLOADS {
            self.counts
                .insert(workload.key.clone(), (workload.clone(), n, ts_ns));
        } else {
            self.untracked += 1;
        }
    }

    /// Forgets the workloads that contributed nothing since `since_ns`.
    pub fn forget_before(&mut self, since_ns: u64) {
        self.counts
            .retain(|_, (_, _, last_ns)| *last_ns >= since_ns);
    }

    /// The workloads to name, most counted first.
    pub fn top(&self) -> Vec<Workload> {
        super::top_workloads(self.counts.values().map(|(w, n, _)| (w, *n)))
    }

    /// Workloads that contributed (beyond the cap too).
    pub fn affected(&self) -> u64 {
        self.counts.len() as u64 + self.untracked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_ring_keeps_the_last_seconds_only() {
        let mut ring = SecondRing::<u64>::new(3);
        for second in 10..15 {
            *ring.at(second).unwrap() += second;
        }
        assert_eq!(
            ring.range(10, 15).collect::<Vec<_>>(),
            vec![0, 0, 12, 13, 14]
        );
        assert!(ring.at(11).is_none(), "too late for second 11");
        *ring.at(14).unwrap() += 1;
        assert_eq!(ring.get(14), 15);
    }

    #[test]
    fn a_bounded_map_counts_what_does_not_fit() {
        let mut map = BoundedMap::<u32, u32>::new(2);
        for key in [1, 2, 3, 1, 4] {
            if let Some(value) = map.get_or_insert(&key, || key, || 0) {
                *value += 1;
            }
        }
        assert_eq!(map.len(), 2);
        assert_eq!(map.untracked(), 2);
        assert_eq!(map.get_mut(&1), Some(&mut 2));
    }
}
