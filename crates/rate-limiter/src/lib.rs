//! Token-bucket rate limiting for device worker threads.
//!
//! No well-kept published crate offers a token-bucket limiter paired with a `timerfd` that an
//! epoll-driven device thread can watch (Firecracker's `rate_limiter` lives inside its
//! repository and is not published separately), so Ferrite has its own.
//!
//! A [`RateLimiter`] has up to two buckets: bandwidth (bytes) and operations. Tokens refill
//! continuously with elapsed time (`size` tokens per `refill_time_ms`); a `one_time_burst`
//! budget is spent first and never refilled. When a bucket refuses a request the limiter arms
//! its timer for the moment enough tokens will be there; the worker registers
//! [`RateLimiter::as_raw_fd`] (or [`SharedRateLimiter::timer_fd`]) in its epoll set and calls
//! [`RateLimiter::event_handler`] when it becomes readable, then retries.
//!
//! A request larger than a bucket's `size` can never fit; it is allowed when the bucket is
//! full and drives the bucket into debt (the budget goes to zero and the excess is paid back
//! by later refills before anything else passes), so the long-run rate is still respected.

mod bucket;
mod parse;

pub use bucket::{BucketConfig, Clock, MonotonicClock, TokenBucket};
pub use parse::{parse_rate, ParseError};

use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vmm_sys_util::timerfd::TimerFd;

/// The limits of one device (or one direction of one device); serialisable for the control
/// socket and snapshots. `Default` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitConfig {
    /// Bytes bucket; `None` = unlimited bandwidth.
    #[serde(default)]
    pub bandwidth: Option<BucketConfig>,
    /// Operations bucket; `None` = unlimited operations.
    #[serde(default)]
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// A bucket allowing `per_s` tokens per second, with an optional one-time burst; the
    /// helper the CLI options (`bw=`, `iops=`, `bw-burst=`) use.
    pub fn parse_rate(per_s: u64, burst: Option<u64>) -> BucketConfig {
        BucketConfig {
            size: per_s,
            one_time_burst: burst.unwrap_or(0),
            refill_time_ms: 1000,
        }
    }

    /// True when neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// Which bucket a request draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenType {
    /// The bandwidth bucket (bytes).
    Bytes,
    /// The operations bucket (requests, packets).
    Ops,
}

/// Shortest timer we arm: `timerfd` treats a zero duration as "disarm".
const MIN_TIMER: Duration = Duration::from_micros(100);

/// A bandwidth bucket, an ops bucket and the timer that wakes a blocked worker.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config())
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `cfg` using the monotonic clock.
    pub fn new(cfg: &RateLimitConfig) -> io::Result<Self> {
        Self::with_clock(cfg, Arc::new(MonotonicClock::new()))
    }

    /// A limiter with an injected clock (tests drive time by hand).
    pub fn with_clock(cfg: &RateLimitConfig, clock: Arc<dyn Clock>) -> io::Result<Self> {
        let timer = TimerFd::new().map_err(io::Error::from)?;
        // The worker only reads the timer after epoll says it is readable, but a spurious
        // call must not block the device thread.
        let fd = timer.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; only flags change, return values checked.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let now = clock.now_ns();
        Ok(RateLimiter {
            bandwidth: cfg.bandwidth.map(|b| TokenBucket::new(b, now)),
            ops: cfg.ops.map(|b| TokenBucket::new(b, now)),
            timer,
            blocked: false,
            clock,
        })
    }

    fn bucket(&mut self, kind: TokenType) -> Option<&mut TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Takes `tokens` from the `kind` bucket. `false` means the request must wait: the limiter
    /// is blocked and its timer fires when the tokens should be there.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let now = self.clock.now_ns();
        let wait = match self.bucket(kind) {
            None => return true,
            Some(b) => match b.consume(tokens, now) {
                Ok(()) => return true,
                Err(wait_ns) => wait_ns,
            },
        };
        self.block_for(Duration::from_nanos(wait_ns_or_min(wait)));
        false
    }

    fn block_for(&mut self, dur: Duration) {
        self.blocked = true;
        let dur = dur.max(MIN_TIMER);
        if self.timer.reset(dur, None).is_err() {
            // Without a timer the worker would never retry; stay unblocked so the next
            // queue notification retries instead (rate limiting degrades, the device works).
            self.blocked = false;
        }
    }

    /// Takes `ops` operations and `bytes` bytes for one request, all or nothing: when either
    /// bucket refuses, the other gets its tokens back and the limiter blocks until its timer
    /// fires. Zero counts are not charged.
    pub fn consume_request(&mut self, bytes: u64, ops: u64) -> bool {
        if self.blocked {
            return false;
        }
        if ops > 0 && !self.consume(ops, TokenType::Ops) {
            return false;
        }
        if bytes > 0 && !self.consume(bytes, TokenType::Bytes) {
            if ops > 0 {
                self.manual_replenish(ops, TokenType::Ops);
            }
            return false;
        }
        true
    }

    /// Gives back tokens taken by [`consume`](Self::consume) when the other bucket refused
    /// the same request.
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        if let Some(b) = self.bucket(kind) {
            b.replenish(tokens);
        }
    }

    /// True while a refused request waits for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Call when the timer fd is readable: clears it and unblocks the limiter.
    pub fn event_handler(&mut self) -> io::Result<()> {
        self.blocked = false;
        match self.timer.wait() {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Replaces the limits; buckets start full. The timer fires at once so a blocked worker
    /// retries under the new limits.
    pub fn update(&mut self, cfg: &RateLimitConfig) {
        let now = self.clock.now_ns();
        self.bandwidth = cfg.bandwidth.map(|b| TokenBucket::new(b, now));
        self.ops = cfg.ops.map(|b| TokenBucket::new(b, now));
        self.block_for(MIN_TIMER);
    }

    /// The current limits.
    pub fn config(&self) -> RateLimitConfig {
        RateLimitConfig {
            bandwidth: self.bandwidth.as_ref().map(|b| b.config()),
            ops: self.ops.as_ref().map(|b| b.config()),
        }
    }
}

fn wait_ns_or_min(wait: u64) -> u64 {
    wait.max(MIN_TIMER.as_nanos() as u64)
}

impl AsRawFd for RateLimiter {
    /// The timer to register (readable) in the worker's epoll set.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// A limiter shared between a device worker and the control socket; `update` changes the
/// limits live and wakes the worker through the timer.
#[derive(Clone, Debug)]
pub struct SharedRateLimiter(Arc<Mutex<RateLimiter>>);

impl SharedRateLimiter {
    /// A shared limiter for `cfg`.
    pub fn new(cfg: &RateLimitConfig) -> io::Result<Self> {
        Ok(SharedRateLimiter(Arc::new(Mutex::new(RateLimiter::new(
            cfg,
        )?))))
    }

    /// Locks the limiter (a poisoned lock is recovered: the limiter has no invariants a
    /// panic could break).
    pub fn lock(&self) -> MutexGuard<'_, RateLimiter> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the limits and wakes the worker.
    pub fn update(&self, cfg: &RateLimitConfig) {
        self.lock().update(cfg);
    }

    /// See [`RateLimiter::consume_request`].
    pub fn consume_request(&self, bytes: u64, ops: u64) -> bool {
        self.lock().consume_request(bytes, ops)
    }

    /// True while a refused request waits for the timer.
    pub fn is_blocked(&self) -> bool {
        self.lock().is_blocked()
    }

    /// The timer fd became readable: clear it and unblock (see
    /// [`RateLimiter::event_handler`]).
    pub fn timer_event(&self) -> io::Result<()> {
        self.lock().event_handler()
    }

    /// The timer fd the worker registers in its epoll set.
    pub fn timer_fd(&self) -> RawFd {
        self.lock().as_raw_fd()
    }

    /// The current limits.
    pub fn config(&self) -> RateLimitConfig {
        self.lock().config()
    }
}

#[cfg(test)]
mod tests;
