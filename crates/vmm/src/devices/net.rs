//! virtio-net over a host TAP device: configuration, per-run resources and wiring.
//!
//! `--net tap=NAME[,mac=MAC]` opens the TAP `NAME`, creating it when it does not exist;
//! `--net` alone (or without `tap=`) creates `fe<pid>n<index>`. A TAP Ferrite creates is not
//! persistent, so the kernel deletes it when Ferrite exits. Without `mac=` the MAC is
//! derived from the TAP name ([`net::MacAddr::from_seed`]: FNV-1a hash, locally administered,
//! unicast), so a VM on a stable TAP name keeps a stable MAC.
//!
//! Rate limits per direction (`rx` = into the guest, `tx` = from the guest):
//! `rx-bw=`/`tx-bw=` bytes/s of Ethernet frames, `rx-pps=`/`tx-pps=` packets/s, and one-time
//! bursts `rx-bw-burst=`, `tx-bw-burst=`, `rx-pps-burst=`, `tx-pps-burst=` (numbers take
//! K/M/G binary suffixes; `_` may replace `-` in the keys). Both directions always get a
//! limiter (unlimited unless given), reachable as `net<i>.rx` / `net<i>.tx` on the control
//! socket and kept across guest reboots.

use std::sync::{Arc, Mutex};

use rate_limiter::{RateLimitConfig, SharedRateLimiter};
use serde::{Deserialize, Serialize};
use virtio::{Net, NetMetrics, VirtioPciDevice};

use super::AttachContext;
use crate::config::{ConfigError, VmConfig};
use crate::error::VmmError;

const FLAG: &str = "--net";

/// `--net` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetConfig {
    /// TAP interface to use or create (None: create `fe<pid>n<index>`).
    pub tap: Option<String>,
    /// The guest's MAC (None: derived from the TAP name).
    pub mac: Option<net::MacAddr>,
    /// Receive limit in bytes/s.
    pub rx_bw: Option<u64>,
    /// Transmit limit in bytes/s.
    pub tx_bw: Option<u64>,
    /// Receive limit in packets/s.
    pub rx_pps: Option<u64>,
    /// Transmit limit in packets/s.
    pub tx_pps: Option<u64>,
    /// One-time receive burst in bytes (needs `rx_bw`).
    #[serde(default)]
    pub rx_bw_burst: Option<u64>,
    /// One-time transmit burst in bytes (needs `tx_bw`).
    #[serde(default)]
    pub tx_bw_burst: Option<u64>,
    /// One-time receive burst in packets (needs `rx_pps`).
    #[serde(default)]
    pub rx_pps_burst: Option<u64>,
    /// One-time transmit burst in packets (needs `tx_pps`).
    #[serde(default)]
    pub tx_pps_burst: Option<u64>,
}

fn device_error(message: impl Into<String>) -> ConfigError {
    ConfigError::Device {
        flag: FLAG,
        message: message.into(),
    }
}

fn parse_rate(key: &str, v: &str) -> Result<u64, ConfigError> {
    match rate_limiter::parse_rate(v) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(device_error(format!(
            "{key}={v:?} is not a positive number: use e.g. {key}=1000000 or {key}=10M"
        ))),
    }
}

/// The limiter configuration of one direction.
fn limit(
    bw: Option<u64>,
    bw_burst: Option<u64>,
    pps: Option<u64>,
    pps_burst: Option<u64>,
) -> RateLimitConfig {
    RateLimitConfig {
        bandwidth: bw.map(|n| RateLimitConfig::parse_rate(n, bw_burst)),
        ops: pps.map(|n| RateLimitConfig::parse_rate(n, pps_burst)),
    }
}

impl NetConfig {
    /// Parse the `--net` syntax: `[tap=NAME][,mac=MAC][,rx-bw=N][,tx-bw=N][,rx-pps=N]
    /// [,tx-pps=N][,rx-bw-burst=N][,tx-bw-burst=N][,rx-pps-burst=N][,tx-pps-burst=N]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let split = item.split_once('=').map(|(k, v)| (k.replace('_', "-"), v));
            match split.as_ref().map(|(k, v)| (k.as_str(), *v)) {
                Some(("tap", v)) => {
                    if !net::tap::valid_if_name(v) {
                        return Err(device_error(format!(
                            "tap={v:?} is not an interface name: use 1 to 15 characters \
                             without '/', ':' or spaces"
                        )));
                    }
                    cfg.tap = Some(v.to_string());
                }
                Some(("mac", v)) => {
                    let mac: net::MacAddr = v.parse().map_err(|_| {
                        device_error(format!(
                            "mac={v:?} is not a MAC address: use e.g. mac=52:54:00:12:34:56"
                        ))
                    })?;
                    if mac.is_multicast() {
                        return Err(device_error(format!(
                            "mac={v} is a multicast address: clear the low bit of the first byte"
                        )));
                    }
                    cfg.mac = Some(mac);
                }
                Some(("rx-bw", v)) => cfg.rx_bw = Some(parse_rate("rx-bw", v)?),
                Some(("tx-bw", v)) => cfg.tx_bw = Some(parse_rate("tx-bw", v)?),
                Some(("rx-pps", v)) => cfg.rx_pps = Some(parse_rate("rx-pps", v)?),
                Some(("tx-pps", v)) => cfg.tx_pps = Some(parse_rate("tx-pps", v)?),
                Some(("rx-bw-burst", v)) => cfg.rx_bw_burst = Some(parse_rate("rx-bw-burst", v)?),
                Some(("tx-bw-burst", v)) => cfg.tx_bw_burst = Some(parse_rate("tx-bw-burst", v)?),
                Some(("rx-pps-burst", v)) => {
                    cfg.rx_pps_burst = Some(parse_rate("rx-pps-burst", v)?)
                }
                Some(("tx-pps-burst", v)) => {
                    cfg.tx_pps_burst = Some(parse_rate("tx-pps-burst", v)?)
                }
                _ => {
                    return Err(device_error(format!(
                        "unknown option {item:?}: use tap=NAME,mac=MAC and the limits \
                         rx-bw=,tx-bw=,rx-pps=,tx-pps= (with -burst variants), all optional"
                    )))
                }
            }
        }
        for (burst, rate, what) in [
            (cfg.rx_bw_burst, cfg.rx_bw, "rx-bw-burst= needs rx-bw="),
            (cfg.tx_bw_burst, cfg.tx_bw, "tx-bw-burst= needs tx-bw="),
            (cfg.rx_pps_burst, cfg.rx_pps, "rx-pps-burst= needs rx-pps="),
            (cfg.tx_pps_burst, cfg.tx_pps, "tx-pps-burst= needs tx-pps="),
        ] {
            if burst.is_some() && rate.is_none() {
                return Err(device_error(what));
            }
        }
        Ok(cfg)
    }

    /// The receive limits (frames into the guest).
    pub fn rx_limit(&self) -> RateLimitConfig {
        limit(self.rx_bw, self.rx_bw_burst, self.rx_pps, self.rx_pps_burst)
    }

    /// The transmit limits (frames from the guest).
    pub fn tx_limit(&self) -> RateLimitConfig {
        limit(self.tx_bw, self.tx_bw_burst, self.tx_pps, self.tx_pps_burst)
    }

    /// Check what can be checked before opening anything: two NICs cannot share a TAP or
    /// a MAC.
    pub fn validate(&self, vm: &VmConfig) -> Result<(), ConfigError> {
        if let Some(tap) = &self.tap {
            if vm
                .nets
                .iter()
                .filter(|n| n.tap.as_ref() == Some(tap))
                .count()
                > 1
            {
                return Err(device_error(format!(
                    "tap={tap} is given twice: give each --net its own TAP"
                )));
            }
        }
        if let Some(mac) = &self.mac {
            if vm
                .nets
                .iter()
                .filter(|n| n.mac.as_ref() == Some(mac))
                .count()
                > 1
            {
                return Err(device_error(format!(
                    "mac={mac} is given twice: give each --net its own MAC"
                )));
            }
        }
        Ok(())
    }
}

/// Host resources of one NIC, opened once per run (the TAP survives guest reboots). A TAP
/// created multiqueue (`ip tuntap add ... multi_queue`) is opened as one queue of it, which a
/// live migration on one host hands over (see [`net::Tap::detach_queue`]).
pub struct OpenNet {
    /// Device name, `net<index>`.
    pub device: String,
    /// The TAP queue; each VM instance's device works on a clone of it.
    pub tap: net::Tap,
    /// The guest's MAC.
    pub mac: net::MacAddr,
    /// Counters, kept across guest reboots.
    pub metrics: Arc<NetMetrics>,
    /// Receive limiter (`net<i>.rx` on the control socket), kept across guest reboots.
    pub rx_limiter: SharedRateLimiter,
    /// Transmit limiter (`net<i>.tx` on the control socket), kept across guest reboots.
    pub tx_limiter: SharedRateLimiter,
}

fn limiter(device: &str, cfg: &RateLimitConfig) -> Result<SharedRateLimiter, VmmError> {
    SharedRateLimiter::new(cfg).map_err(|e| VmmError::DeviceOpen {
        device: device.to_string(),
        reason: "cannot create the rate limiter's timerfd".to_string(),
        source: Some(e),
    })
}

/// Open (or create) the TAP.
pub fn open(cfg: &NetConfig, index: usize, vm: &VmConfig) -> Result<OpenNet, VmmError> {
    let _ = vm;
    let device = format!("net{index}");
    let rx_limiter = limiter(&device, &cfg.rx_limit())?;
    let tx_limiter = limiter(&device, &cfg.tx_limit())?;
    let name = cfg
        .tap
        .clone()
        .unwrap_or_else(|| format!("fe{}n{index}", std::process::id()));
    let tap = net::Tap::open_any(&name).map_err(|e| {
        let hint = "run as root (CAP_NET_ADMIN) or give an existing TAP owned by this user";
        match e {
            net::NetError::OpenTun(src) | net::NetError::Ioctl { source: src, .. } => {
                VmmError::DeviceOpen {
                    device: device.clone(),
                    reason: format!("TAP {name}: {hint}"),
                    source: Some(src),
                }
            }
            other => VmmError::DeviceOpen {
                device: device.clone(),
                reason: other.to_string(),
                source: None,
            },
        }
    })?;
    let mac = cfg
        .mac
        .unwrap_or_else(|| net::MacAddr::from_seed(tap.name().as_bytes()));
    if cfg.tap.is_none() {
        // The user could not know a generated name otherwise (the host side needs it).
        eprintln!(
            "ferrite: {device}: created TAP {} (MAC {mac}), removed on exit",
            tap.name()
        );
    }
    tracing::info!(
        "{device}: TAP {} ({}), MAC {mac}",
        tap.name(),
        if tap.created() {
            "created, removed on exit"
        } else {
            "existing"
        }
    );
    Ok(OpenNet {
        device,
        tap,
        mac,
        metrics: Arc::new(NetMetrics::default()),
        rx_limiter,
        tx_limiter,
    })
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenNet,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let tap = open.tap.try_clone().map_err(|e| VmmError::DeviceOpen {
        device: open.device.clone(),
        reason: "cannot duplicate the TAP descriptor".into(),
        source: Some(e),
    })?;
    let dev = Net::new(Box::new(tap), open.mac)
        .with_metrics(open.metrics.clone())
        .with_rate_limiters(Some(open.rx_limiter.clone()), Some(open.tx_limiter.clone()));
    ctx.plug(&open.device, Box::new(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_net_parse_empty_creates_tap_with_generated_mac() {
        let cfg = NetConfig::parse("").unwrap();

        assert_eq!(cfg, NetConfig::default());
    }

    #[test]
    fn test_net_parse_tap_and_mac_are_read() {
        let cfg = NetConfig::parse("tap=tap7,mac=52:54:00:00:00:07").unwrap();

        assert_eq!(cfg.tap.as_deref(), Some("tap7"));
        assert_eq!(cfg.mac.unwrap().to_string(), "52:54:00:00:00:07");
    }

    #[test]
    fn test_net_parse_bad_options_name_the_flag() {
        for spec in [
            "tap=",
            "tap=a/b",
            "tap=0123456789abcdef",
            "mac=52:54",
            "mac=01:00:5e:00:00:01",
            "speed=1",
            "rx-bw=0",
            "tap",
        ] {
            let err = NetConfig::parse(spec).unwrap_err().to_string();

            assert!(err.contains("--net"), "{spec}: {err}");
        }
    }

    #[test]
    fn test_net_validate_shared_tap_is_refused() {
        let a = NetConfig::parse("tap=t0").unwrap();
        let vm = VmConfig {
            nets: vec![a.clone(), a.clone()],
            ..Default::default()
        };

        assert!(a.validate(&vm).is_err());
    }

    #[test]
    fn test_net_parse_limits_per_direction_with_bursts() {
        let cfg =
            NetConfig::parse("tap=t0,rx-bw=10M,rx-bw-burst=1M,tx_pps=500,tx_pps_burst=50").unwrap();

        let rx = cfg.rx_limit();
        let tx = cfg.tx_limit();

        let rx_bw = rx.bandwidth.unwrap();
        assert_eq!((rx_bw.size, rx_bw.one_time_burst), (10 << 20, 1 << 20));
        assert!(rx.ops.is_none());
        let tx_ops = tx.ops.unwrap();
        assert_eq!((tx_ops.size, tx_ops.one_time_burst), (500, 50));
        assert!(tx.bandwidth.is_none());
    }

    #[test]
    fn test_net_parse_burst_without_rate_is_refused() {
        let err = NetConfig::parse("rx-pps-burst=10").unwrap_err().to_string();

        assert!(err.contains("rx-pps="), "{err}");
    }
}
