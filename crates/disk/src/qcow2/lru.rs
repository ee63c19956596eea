//! A tiny least-recently-used cache for metadata tables (L2 tables, refcount blocks), keyed by
//! their file offset. Small capacities (tens of entries) make a linear scan the cheapest choice.

/// A fixed-capacity LRU map from file offsets to decoded tables.
#[derive(Debug)]
pub struct Lru<V> {
    entries: Vec<(u64, V, u64)>,
    capacity: usize,
    clock: u64,
}

impl<V> Lru<V> {
    /// An empty cache holding at most `capacity` (at least 1) tables.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// The table stored under `key`, marked as most recently used.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.iter_mut().find(|e| e.0 == key).map(|e| {
            e.2 = clock;
            &mut e.1
        })
    }

    /// Store `value` under `key`, evicting the least recently used table when full.
    pub fn insert(&mut self, key: u64, value: V) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == key) {
            e.1 = value;
            e.2 = self.clock;
            return;
        }
        if self.entries.len() >= self.capacity {
            if let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.2)
                .map(|(i, _)| i)
            {
                self.entries.swap_remove(oldest);
            }
        }
        self.entries.push((key, value, self.clock));
    }

    /// Number of cached tables.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lru_full_cache_evicts_least_recently_used() {
        // Arrange
        let mut lru = Lru::new(2);
        lru.insert(1, "a");
        lru.insert(2, "b");
        lru.get_mut(1);
        // Act
        lru.insert(3, "c");
        // Assert
        assert_eq!(lru.len(), 2);
        assert!(lru.get_mut(2).is_none());
        assert_eq!(lru.get_mut(1).copied(), Some("a"));
        assert_eq!(lru.get_mut(3).copied(), Some("c"));
    }
}
