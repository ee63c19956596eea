//! Where the RTC reads the time from (the host's wall clock, or a fake one in tests).

use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait WallClock: Send {
    /// Nanoseconds since 1970-01-01T00:00:00Z (negative before it).
    fn now_ns(&self) -> i64;
}

/// The host's `CLOCK_REALTIME`, in UTC.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostClock;

impl WallClock for HostClock {
    fn now_ns(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_nanos())
                .map(|ns| -ns)
                .unwrap_or(i64::MIN),
        }
    }
}
