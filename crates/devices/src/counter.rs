//! A lock-free metric counter shared between a device and whoever reports its metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing event count. Serialises as its current value so a metrics struct
/// made of counters can be dumped with serde directly.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl serde::Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_counter_add_and_inc_accumulate() {
        let counter = Counter::default();

        counter.inc();
        counter.add(4);

        assert_eq!(counter.get(), 5);
        assert_eq!(serde_json::to_string(&counter).unwrap(), "5");
    }
}
