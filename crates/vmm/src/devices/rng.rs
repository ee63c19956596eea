//! virtio-rng fed from the host's getrandom: configuration, per-run resources and wiring.
//!
//! `--rng` gives an unlimited device; `--rng bw=BYTES_PER_S[,burst=BYTES]` limits it with a
//! token bucket holding one second's worth of bytes, plus an optional one-time `burst` spent
//! first (the same meaning as the disks' `bw-burst=`). The limiter always exists (unlimited
//! unless `bw=` is given): the control socket reaches it as `rng`, across guest reboots.

use std::sync::{Arc, Mutex};

use rate_limiter::{RateLimitConfig, SharedRateLimiter};
use serde::{Deserialize, Serialize};
use virtio::{Rng, RngMetrics, VirtioPciDevice};

use super::AttachContext;
use crate::config::{ConfigError, VmConfig};
use crate::error::VmmError;

const FLAG: &str = "--rng";
const DEVICE: &str = "rng";

/// `--rng` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RngConfig {
    /// Bytes per second the guest may read (None: unlimited).
    pub bw: Option<u64>,
    /// One-time burst in bytes, spent before the bucket (needs `bw`).
    pub burst: Option<u64>,
}

fn device_error(message: impl Into<String>) -> ConfigError {
    ConfigError::Device {
        flag: FLAG,
        message: message.into(),
    }
}

fn parse_bytes(key: &str, v: &str) -> Result<u64, ConfigError> {
    rate_limiter::parse_rate(v).map_err(|_| {
        device_error(format!(
            "{key}={v:?} is not a number of bytes: use e.g. {key}=10240 or {key}=64K"
        ))
    })
}

impl RngConfig {
    /// Parse the `--rng` syntax: empty, or `bw=N[,burst=N]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("bw", v)) => cfg.bw = Some(parse_bytes("bw", v)?),
                Some(("burst", v)) => cfg.burst = Some(parse_bytes("burst", v)?),
                _ => {
                    return Err(device_error(format!(
                        "unknown option {item:?}: use bw=BYTES_PER_S[,burst=BYTES]"
                    )))
                }
            }
        }
        Ok(cfg)
    }

    /// Check what can be checked before opening anything.
    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ConfigError> {
        if self.bw == Some(0) {
            return Err(device_error(
                "bw=0 would starve the guest: use a positive rate or leave bw out",
            ));
        }
        if self.burst == Some(0) {
            return Err(device_error("burst=0 is empty: use a positive size"));
        }
        if self.burst.is_some() && self.bw.is_none() {
            return Err(device_error("burst= needs bw=: use bw=N,burst=M"));
        }
        Ok(())
    }

    /// The limiter configuration (bytes only).
    pub fn limit(&self) -> RateLimitConfig {
        RateLimitConfig {
            bandwidth: self
                .bw
                .filter(|&n| n > 0)
                .map(|n| RateLimitConfig::parse_rate(n, self.burst)),
            ops: None,
        }
    }
}

/// Host resources of the device, opened once per run.
pub struct OpenRng {
    /// Counters, kept across guest reboots.
    pub metrics: Arc<RngMetrics>,
    /// The byte-rate limiter (`rng` on the control socket), kept across guest reboots.
    pub limiter: SharedRateLimiter,
}

/// Open the host side.
pub fn open(cfg: &RngConfig) -> Result<OpenRng, VmmError> {
    let limiter = SharedRateLimiter::new(&cfg.limit()).map_err(|e| VmmError::DeviceOpen {
        device: DEVICE.to_string(),
        reason: "cannot create the rate limiter's timerfd".to_string(),
        source: Some(e),
    })?;
    Ok(OpenRng {
        metrics: Arc::new(RngMetrics::default()),
        limiter,
    })
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenRng,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let dev = Rng::new()
        .with_metrics(open.metrics.clone())
        .with_rate_limiter(open.limiter.clone());
    ctx.plug(DEVICE, Box::new(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rng_parse_empty_is_unlimited() {
        let cfg = RngConfig::parse("").unwrap();

        assert_eq!(cfg, RngConfig::default());
    }

    #[test]
    fn test_rng_parse_bw_and_burst_are_read() {
        let cfg = RngConfig::parse("bw=10240,burst=4096").unwrap();

        assert_eq!((cfg.bw, cfg.burst), (Some(10240), Some(4096)));
    }

    #[test]
    fn test_rng_parse_bad_options_name_the_fix() {
        for spec in ["bw=fast", "speed=1", "bw"] {
            let err = RngConfig::parse(spec).unwrap_err().to_string();

            assert!(err.contains("--rng"), "{spec}: {err}");
        }
    }

    #[test]
    fn test_rng_limit_is_one_second_bucket_plus_burst() {
        let cfg = RngConfig::parse("bw=64K,burst=4096").unwrap();

        let b = cfg.limit().bandwidth.unwrap();

        assert_eq!(
            (b.size, b.one_time_burst, b.refill_time_ms),
            (65536, 4096, 1000)
        );
        assert!(RngConfig::default().limit().is_unlimited());
    }

    #[test]
    fn test_rng_validate_zero_rate_is_refused() {
        let vm = VmConfig::default();
        let cfg = RngConfig {
            bw: Some(0),
            burst: None,
        };

        assert!(cfg.validate(&vm).is_err());
    }
}
