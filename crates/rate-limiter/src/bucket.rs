//! One token bucket with exact continuous refill, and the clock it reads.

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Parameters of one bucket (serialisable: control socket, CLI, snapshots). A `size` or
/// `refill_time_ms` of 0 means the bucket does not limit anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full, and refills every `refill_time_ms`.
    pub size: u64,
    /// Extra tokens spent before the bucket's own and never refilled.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Time to refill `size` tokens, in milliseconds.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// True when this bucket would limit anything.
    pub fn is_limiting(&self) -> bool {
        self.size > 0 && self.refill_time_ms > 0
    }
}

/// A source of monotonic nanoseconds, injectable so tests control time.
pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed origin; never decreases.
    fn now_ns(&self) -> u64;
}

/// The real clock (`Instant`).
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A token bucket: refills `size` tokens per `refill_time_ms`, continuously and without
/// rounding loss; a request larger than `size` passes when the bucket is full and leaves
/// a debt repaid by later refills.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    cfg: BucketConfig,
    budget: u64,
    burst: u64,
    debt: u64,
    /// Refill accumulated below one token, in token·ns units (divide by the period).
    frac: u128,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket for `cfg` at time `now_ns`.
    pub fn new(cfg: BucketConfig, now_ns: u64) -> Self {
        TokenBucket {
            cfg,
            budget: cfg.size,
            burst: cfg.one_time_burst,
            debt: 0,
            frac: 0,
            last_ns: now_ns,
        }
    }

    /// The bucket's parameters.
    pub fn config(&self) -> BucketConfig {
        self.cfg
    }

    /// Tokens available now (not counting the one-time burst).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// One-time burst tokens left.
    pub fn burst_left(&self) -> u64 {
        self.burst
    }

    fn period_ns(&self) -> u128 {
        u128::from(self.cfg.refill_time_ms) * 1_000_000
    }

    fn refill(&mut self, now_ns: u64) {
        if !self.cfg.is_limiting() {
            return;
        }
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let period = self.period_ns();
        self.frac = self
            .frac
            .saturating_add(u128::from(elapsed) * u128::from(self.cfg.size));
        let whole = self.frac / period;
        self.frac %= period;
        let mut tokens = u64::try_from(whole).unwrap_or(u64::MAX);
        let paid = tokens.min(self.debt);
        self.debt -= paid;
        tokens -= paid;
        self.budget = self.budget.saturating_add(tokens).min(self.cfg.size);
        if self.budget == self.cfg.size {
            self.frac = 0;
        }
    }

    /// Takes `tokens` at `now_ns`. `Err(ns)` = refused; retry in about `ns` nanoseconds.
    pub fn consume(&mut self, tokens: u64, now_ns: u64) -> Result<(), u64> {
        if !self.cfg.is_limiting() {
            return Ok(());
        }
        self.refill(now_ns);
        let from_burst = tokens.min(self.burst);
        let rest = tokens - from_burst;
        if rest <= self.budget && self.debt == 0 {
            self.burst -= from_burst;
            self.budget -= rest;
            return Ok(());
        }
        if rest > self.cfg.size && self.budget == self.cfg.size && self.debt == 0 {
            // Oversized request: allow it on a full bucket and carry the excess as debt.
            self.burst -= from_burst;
            self.debt = rest - self.cfg.size;
            self.budget = 0;
            return Ok(());
        }
        let target = rest.min(self.cfg.size);
        let needed = u128::from(self.debt) + u128::from(target.saturating_sub(self.budget));
        let needed_units = (needed * self.period_ns()).saturating_sub(self.frac);
        let size = u128::from(self.cfg.size);
        let wait = needed_units.div_ceil(size);
        Err(u64::try_from(wait).unwrap_or(u64::MAX).max(1))
    }

    /// Gives back `tokens` (a request refused by the other bucket), up to a full bucket.
    pub fn replenish(&mut self, tokens: u64) {
        let paid = tokens.min(self.debt);
        self.debt -= paid;
        self.budget = self.budget.saturating_add(tokens - paid).min(self.cfg.size);
    }
}
