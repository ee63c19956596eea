//! The bandwidth limit of a migration stream.

use std::time::{Duration, Instant};

/// Keeps a sender at or under a byte rate: after each chunk, [`Pacer::sent`] sleeps as long as
/// the bytes so far are ahead of the rate. Also measures the achieved rate, which the source
/// uses to predict how long the final, paused transfer will take.
#[derive(Debug)]
pub struct Pacer {
    limit_bytes_per_s: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    /// A pacer for `limit_bytes_per_s` (None or 0: unlimited).
    pub fn new(limit_bytes_per_s: Option<u64>) -> Self {
        Self {
            limit_bytes_per_s: limit_bytes_per_s.filter(|&l| l > 0),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Count `n` bytes sent and wait if they went out faster than the limit.
    pub fn sent(&mut self, n: u64) {
        self.bytes += n;
        if let Some(limit) = self.limit_bytes_per_s {
            let due = Duration::from_secs_f64(self.bytes as f64 / limit as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }

    /// Bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The rate achieved so far, bytes/s (None until something was sent).
    pub fn rate(&self) -> Option<f64> {
        let secs = self.start.elapsed().as_secs_f64();
        (self.bytes > 0 && secs > 0.0).then(|| self.bytes as f64 / secs)
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit_bytes_per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pacer_holds_the_sender_to_the_limit() {
        let mut pacer = Pacer::new(Some(10 << 20));
        let start = Instant::now();

        for _ in 0..4 {
            pacer.sent(256 << 10);
        }

        // 1 MiB at 10 MiB/s takes at least 100 ms.
        assert!(start.elapsed() >= Duration::from_millis(95));
        assert_eq!(pacer.bytes(), 1 << 20);
    }

    #[test]
    fn test_unlimited_pacer_never_waits() {
        let mut pacer = Pacer::new(Some(0));

        pacer.sent(1 << 30);

        assert_eq!(pacer.limit(), None);
        assert_eq!(pacer.bytes(), 1 << 30);
    }
}
