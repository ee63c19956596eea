//! virtio-balloon with statistics, deflate-on-OOM and free page reporting: configuration,
//! per-run resources and wiring.
//!
//! `--balloon` uses the defaults (target 0, every feature on, statistics every second);
//! `--balloon size=SIZE,deflate-on-oom=on|off,stats=SECONDS|off,reporting=on|off` changes
//! them. `size` is the initial target (how much memory the guest should give back); the
//! control socket changes it at run time (`balloon-set`) and reports the guest's statistics
//! (`balloon-status`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use virtio::balloon::stat_name;
use virtio::{Balloon, BalloonOptions, BalloonShared, VirtioPciDevice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::AttachContext;
use crate::config::{parse_memory_size, ConfigError, VmConfig};
use crate::control::BalloonControl;
use crate::error::VmmError;

const FLAG: &str = "--balloon";
const DEVICE: &str = "balloon";
/// 4 KiB balloon pages per MiB.
const PAGES_PER_MIB: u64 = 256;
const USAGE: &str = "use size=SIZE,deflate-on-oom=on|off,stats=SECONDS|off,reporting=on|off";

/// `--balloon` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Initial target in MiB: memory the guest is asked to give back from boot on.
    pub size_mib: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer the statistics queue.
    pub stats: bool,
    /// Seconds between statistics requests (0: only when the host asks).
    pub stats_period_s: u64,
    /// Offer free page reporting.
    pub reporting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            size_mib: 0,
            deflate_on_oom: true,
            stats: true,
            stats_period_s: 1,
            reporting: true,
        }
    }
}

fn device_error(message: impl Into<String>) -> ConfigError {
    ConfigError::Device {
        flag: FLAG,
        message: message.into(),
    }
}

fn on_off(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(device_error(format!(
            "{key}={v:?}: use {key}=on or {key}=off"
        ))),
    }
}

fn parse_size_mib(v: &str) -> Result<u64, ConfigError> {
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if !digits.is_empty() && digits.bytes().all(|b| b == b'0') {
        return Ok(0);
    }
    parse_memory_size(v)
        .map(|bytes| bytes >> 20)
        .map_err(|_| device_error(format!("size={v:?} is not a size: use e.g. size=256M")))
}

impl BalloonConfig {
    /// Parse the `--balloon` syntax: empty, or comma-separated `key=value` options.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("size", v)) => cfg.size_mib = parse_size_mib(v)?,
                Some(("deflate-on-oom", v)) => cfg.deflate_on_oom = on_off("deflate-on-oom", v)?,
                Some(("reporting", v)) => cfg.reporting = on_off("reporting", v)?,
                Some(("stats", "off")) => cfg.stats = false,
                Some(("stats", v)) => {
                    cfg.stats = true;
                    cfg.stats_period_s = v.parse().map_err(|_| {
                        device_error(format!(
                            "stats={v:?}: use stats=SECONDS (0: only on request) or stats=off"
                        ))
                    })?;
                }
                _ => return Err(device_error(format!("unknown option {item:?}: {USAGE}"))),
            }
        }
        Ok(cfg)
    }

    /// Check what can be checked before opening anything.
    pub fn validate(&self, vm: &VmConfig) -> Result<(), ConfigError> {
        let guest_mib = vm.memory_bytes >> 20;
        if self.size_mib > guest_mib {
            return Err(device_error(format!(
                "size={}M is larger than the guest's {guest_mib} MiB of memory: use at most size={guest_mib}M",
                self.size_mib
            )));
        }
        if self.stats_period_s > 24 * 3600 {
            return Err(device_error(
                "stats= is longer than a day: use fewer seconds, 0 or off",
            ));
        }
        Ok(())
    }

    fn options(&self) -> BalloonOptions {
        BalloonOptions {
            stats: self.stats,
            stats_period: (self.stats && self.stats_period_s > 0)
                .then(|| Duration::from_secs(self.stats_period_s)),
            deflate_on_oom: self.deflate_on_oom,
            reporting: self.reporting,
        }
    }
}

/// The control socket's handle on the balloon; lives for the whole run.
pub struct BalloonHandle {
    shared: Arc<BalloonShared>,
    /// Guest RAM in bytes (0 until the first VM instance is built).
    guest_bytes: AtomicU64,
}

impl BalloonHandle {
    fn stats_json(&self) -> (Value, Value) {
        match self.shared.stats() {
            None => (Value::Null, Value::Null),
            Some(s) => {
                let map: serde_json::Map<String, Value> = s
                    .entries
                    .iter()
                    .map(|(tag, v)| (stat_name(*tag), json!(v)))
                    .collect();
                let age = u64::try_from(s.received.elapsed().as_millis()).unwrap_or(u64::MAX);
                (Value::Object(map), json!(age))
            }
        }
    }
}

impl BalloonControl for BalloonHandle {
    fn set_target_mib(&self, target_mib: u64) -> Result<Value, String> {
        let guest_mib = self.guest_bytes.load(Ordering::Acquire) >> 20;
        if guest_mib == 0 {
            return Err("The VM is still being built: try again".to_string());
        }
        if target_mib > guest_mib {
            return Err(format!(
                "Target {target_mib} MiB is larger than the guest's {guest_mib} MiB of memory"
            ));
        }
        // target_mib <= guest memory <= 1 TiB, so the page count fits in u32.
        let pages = u32::try_from(target_mib * PAGES_PER_MIB)
            .map_err(|_| format!("Target {target_mib} MiB is too large"))?;
        self.shared.set_target_pages(pages);
        Ok(self.status())
    }

    fn status(&self) -> Value {
        // Ask for fresher numbers for the next status; these are the latest ones.
        self.shared.request_stats();
        let target = u64::from(self.shared.target_pages());
        let actual = u64::from(self.shared.actual_pages());
        let (stats, age) = self.stats_json();
        let o = self.shared.options();
        json!({
            "target_mib": target / PAGES_PER_MIB,
            "target_pages": target,
            "actual_mib": actual / PAGES_PER_MIB,
            "actual_pages": actual,
            "guest_memory_mib": self.guest_bytes.load(Ordering::Acquire) >> 20,
            "stats": stats,
            "stats_age_ms": age,
            "features": {
                "stats": o.stats,
                "deflate_on_oom": o.deflate_on_oom,
                "reporting": o.reporting,
            },
            "counters": self.shared.metrics().snapshot(),
        })
    }
}

/// Host resources of the device, opened once per run.
pub struct OpenBalloon {
    handle: Arc<BalloonHandle>,
}

/// Open the host side: the shared state that outlives guest reboots, with the initial target.
pub fn open(cfg: &BalloonConfig) -> Result<OpenBalloon, VmmError> {
    let shared = BalloonShared::new(cfg.options()).map_err(|source| VmmError::DeviceSetup {
        device: DEVICE.to_string(),
        source,
    })?;
    let pages = u32::try_from(cfg.size_mib.saturating_mul(PAGES_PER_MIB)).map_err(|_| {
        VmmError::DeviceOpen {
            device: DEVICE.to_string(),
            reason: format!("size={}M is too large", cfg.size_mib),
            source: None,
        }
    })?;
    shared.set_target_pages(pages);
    Ok(OpenBalloon {
        handle: Arc::new(BalloonHandle {
            shared,
            guest_bytes: AtomicU64::new(0),
        }),
    })
}

/// The control socket's handle on the balloon (`balloon-set`, `balloon-status`).
pub fn control(open: &OpenBalloon) -> Option<Arc<dyn BalloonControl>> {
    Some(open.handle.clone())
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenBalloon,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let bytes: u64 = ctx.mem.iter().map(|r| r.len()).sum();
    open.handle.guest_bytes.store(bytes, Ordering::Release);
    let dev = Balloon::new(open.handle.shared.clone());
    ctx.plug(DEVICE, Box::new(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_balloon_parse_empty_gives_defaults() {
        let cfg = BalloonConfig::parse("").unwrap();

        assert_eq!(cfg, BalloonConfig::default());
    }

    #[test]
    fn test_balloon_parse_every_option_is_read() {
        let cfg = BalloonConfig::parse("size=0M,deflate-on-oom=off,stats=5,reporting=off").unwrap();
        let sized = BalloonConfig::parse("size=1G,stats=off").unwrap();

        assert_eq!(
            cfg,
            BalloonConfig {
                size_mib: 0,
                deflate_on_oom: false,
                stats: true,
                stats_period_s: 5,
                reporting: false,
            }
        );
        assert_eq!((sized.size_mib, sized.stats), (1024, false));
    }

    #[test]
    fn test_balloon_parse_bad_options_name_the_flag() {
        for spec in [
            "size=lots",
            "stats=often",
            "reporting=yes",
            "colour=red",
            "size",
        ] {
            let err = BalloonConfig::parse(spec).unwrap_err().to_string();

            assert!(err.contains("--balloon"), "{spec}: {err}");
        }
    }

    #[test]
    fn test_balloon_validate_target_above_memory_is_refused() {
        let vm = VmConfig {
            memory_bytes: 256 << 20,
            ..VmConfig::default()
        };
        let cfg = BalloonConfig {
            size_mib: 512,
            ..BalloonConfig::default()
        };

        let err = cfg.validate(&vm).unwrap_err().to_string();

        assert!(err.contains("larger than the guest's 256 MiB"), "{err}");
    }

    #[test]
    fn test_balloon_handle_refuses_target_above_memory_and_reports_status() {
        let open = open(&BalloonConfig::default()).unwrap();
        open.handle.guest_bytes.store(512 << 20, Ordering::Release);
        let ctl = control(&open).unwrap();

        let refused = ctl.set_target_mib(513).unwrap_err();
        let status = ctl.set_target_mib(128).unwrap();

        assert!(
            refused.contains("larger than the guest's 512 MiB"),
            "{refused}"
        );
        assert_eq!(status["target_mib"], 128);
        assert_eq!(status["target_pages"], 128 * 256);
        assert_eq!(status["actual_mib"], 0);
        assert!(status["stats"].is_null());
    }
}
