use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
struct FakeClock(AtomicU64);

impl FakeClock {
    fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms * 1_000_000, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn bucket(size: u64, burst: u64, ms: u64) -> BucketConfig {
    BucketConfig {
        size,
        one_time_burst: burst,
        refill_time_ms: ms,
    }
}

fn limiter(cfg: RateLimitConfig) -> (RateLimiter, Arc<FakeClock>) {
    let clock = Arc::new(FakeClock::default());
    let rl = RateLimiter::with_clock(&cfg, clock.clone()).unwrap();
    (rl, clock)
}

#[test]
fn test_bucket_refill_half_period_gives_half_size() {
    let mut b = TokenBucket::new(bucket(1000, 0, 1000), 0);
    b.consume(1000, 0).unwrap();

    let ok = b.consume(500, 500_000_000);

    assert!(ok.is_ok());
    assert_eq!(b.budget(), 0);
}

#[test]
fn test_bucket_refill_tiny_steps_lose_nothing() {
    let mut b = TokenBucket::new(bucket(3, 0, 1000), 0);
    b.consume(3, 0).unwrap();

    for i in 1..=1000u64 {
        let _ = b.consume(0, i * 1_000_000);
    }

    assert_eq!(b.budget(), 3);
}

#[test]
fn test_bucket_empty_reports_exact_wait() {
    let mut b = TokenBucket::new(bucket(1000, 0, 1000), 0);
    b.consume(1000, 0).unwrap();

    let wait = b.consume(100, 0);

    assert_eq!(wait, Err(100_000_000));
}

#[test]
fn test_bucket_burst_spent_first_never_refilled() {
    let mut b = TokenBucket::new(bucket(100, 50, 1000), 0);

    b.consume(120, 0).unwrap();
    let after = (b.burst_left(), b.budget());
    let _ = b.consume(0, 10_000_000_000);

    assert_eq!(after, (0, 30));
    assert_eq!(b.burst_left(), 0);
    assert_eq!(b.budget(), 100);
}

#[test]
fn test_bucket_oversized_request_passes_when_full_then_debt() {
    let mut b = TokenBucket::new(bucket(100, 0, 1000), 0);

    let first = b.consume(250, 0);
    let second = b.consume(1, 1_000_000_000);
    let third = b.consume(1, 2_600_000_000);

    assert!(first.is_ok());
    assert!(second.is_err());
    assert!(third.is_ok());
}

#[test]
fn test_bucket_zero_size_is_unlimited() {
    let mut b = TokenBucket::new(bucket(0, 0, 1000), 0);

    let r = b.consume(u64::MAX, 0);

    assert!(r.is_ok());
}

#[test]
fn test_limiter_unlimited_always_passes() {
    let (mut rl, _c) = limiter(RateLimitConfig::default());

    let ok = rl.consume(u64::MAX, TokenType::Bytes) && rl.consume(u64::MAX, TokenType::Ops);

    assert!(ok);
    assert!(!rl.is_blocked());
}

#[test]
fn test_limiter_refused_blocks_until_event() {
    let cfg = RateLimitConfig {
        bandwidth: Some(bucket(1000, 0, 1000)),
        ops: None,
    };
    let (mut rl, clock) = limiter(cfg);
    assert!(rl.consume(1000, TokenType::Bytes));

    let refused = !rl.consume(1, TokenType::Bytes);
    clock.advance_ms(1000);
    let still_blocked = !rl.consume(1, TokenType::Bytes);
    rl.event_handler().unwrap();
    let after = rl.consume(1, TokenType::Bytes);

    assert!(refused && still_blocked && after);
}

#[test]
fn test_limiter_manual_replenish_restores_tokens() {
    let cfg = RateLimitConfig {
        bandwidth: None,
        ops: Some(bucket(10, 0, 1000)),
    };
    let (mut rl, _c) = limiter(cfg);
    assert!(rl.consume(10, TokenType::Ops));

    rl.manual_replenish(4, TokenType::Ops);

    assert!(rl.consume(4, TokenType::Ops));
}

#[test]
fn test_limiter_request_refused_by_bytes_gives_ops_back() {
    let cfg = RateLimitConfig {
        bandwidth: Some(bucket(1000, 0, 1000)),
        ops: Some(bucket(2, 0, 1000)),
    };
    let (mut rl, clock) = limiter(cfg);
    assert!(rl.consume_request(1000, 1));

    let refused = !rl.consume_request(10, 1);
    clock.advance_ms(1000);
    rl.event_handler().unwrap();
    let both_fit = rl.consume_request(1000, 2);

    assert!(refused);
    assert!(
        both_fit,
        "the refused request's op must have been given back"
    );
}

#[test]
fn test_limiter_timer_fd_becomes_readable_when_tokens_are_due() {
    let cfg = RateLimitConfig {
        bandwidth: None,
        ops: Some(bucket(100, 0, 1000)),
    };
    let rl = SharedRateLimiter::new(&cfg).unwrap();
    assert!(rl.consume_request(0, 100));

    let refused = !rl.consume_request(0, 1);
    let mut pfd = libc::pollfd {
        fd: rl.timer_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call. The 10 s bound is a hang
    // guard; the timer is due after about 10 ms.
    let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    rl.timer_event().unwrap();

    assert!(refused);
    assert_eq!(n, 1, "timer never fired");
    assert!(!rl.is_blocked());
    assert!(rl.consume_request(0, 1));
}

#[test]
fn test_limiter_update_changes_config_and_arms_timer() {
    let (mut rl, _c) = limiter(RateLimitConfig::default());
    let cfg = RateLimitConfig {
        bandwidth: Some(RateLimitConfig::parse_rate(1 << 20, Some(4096))),
        ops: None,
    };

    rl.update(&cfg);

    assert_eq!(rl.config(), cfg);
    assert!(rl.is_blocked());
    rl.event_handler().unwrap();
    assert!(!rl.is_blocked());
}

#[test]
fn test_limiter_spurious_event_does_not_block() {
    let (mut rl, _c) = limiter(RateLimitConfig::default());

    let r = rl.event_handler();

    assert!(r.is_ok());
}

#[test]
fn test_shared_limiter_update_is_seen_by_clones() {
    let a = SharedRateLimiter::new(&RateLimitConfig::default()).unwrap();
    let b = a.clone();
    let cfg = RateLimitConfig {
        bandwidth: None,
        ops: Some(bucket(100, 0, 1000)),
    };

    a.update(&cfg);

    assert_eq!(b.config(), cfg);
    assert_eq!(a.timer_fd(), b.timer_fd());
}

#[test]
fn test_config_json_roundtrip_and_defaults() {
    let json = r#"{"bandwidth":{"size":1000,"refill_time_ms":100}}"#;

    let cfg: RateLimitConfig = serde_json::from_str(json).unwrap();

    assert_eq!(cfg.bandwidth, Some(bucket(1000, 0, 100)));
    assert_eq!(cfg.ops, None);
}

#[test]
fn test_parse_rate_units_are_binary() {
    assert_eq!(parse_rate("10M"), Ok(10 << 20));
    assert_eq!(parse_rate("512k"), Ok(512 << 10));
    assert_eq!(parse_rate("1G"), Ok(1 << 30));
    assert_eq!(parse_rate("4096"), Ok(4096));
    assert_eq!(parse_rate("2MiB"), Ok(2 << 20));
}

#[test]
fn test_parse_rate_garbage_is_rejected() {
    assert_eq!(parse_rate(""), Err(ParseError::Empty));
    assert!(matches!(parse_rate("M"), Err(ParseError::Invalid(_))));
    assert!(matches!(parse_rate("-5"), Err(ParseError::Invalid(_))));
    assert!(matches!(
        parse_rate("99999999999999999999"),
        Err(ParseError::Overflow(_))
    ));
    assert!(matches!(
        parse_rate("17179869184G"),
        Err(ParseError::Overflow(_))
    ));
}
