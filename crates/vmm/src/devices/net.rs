//! virtio-net over a host TAP device: configuration, per-run resources and wiring.
//!
//! `--net tap=NAME[,mac=MAC]` opens the TAP `NAME`, creating it when it does not exist;
//! `--net` alone (or without `tap=`) creates `fe<pid>n<index>`. A TAP Ferrite creates is not
//! persistent, so the kernel deletes it when Ferrite exits. Without `mac=` the MAC is
//! derived from the TAP name ([`net::MacAddr::from_seed`]: FNV-1a hash, locally administered,
//! unicast), so a VM on a stable TAP name keeps a stable MAC.

use std::sync::{Arc, Mutex};

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
    /// Receive limit in bytes/s (needs the rate limiter).
    pub rx_bw: Option<u64>,
    /// Transmit limit in bytes/s (needs the rate limiter).
    pub tx_bw: Option<u64>,
    /// Receive limit in packets/s (needs the rate limiter).
    pub rx_pps: Option<u64>,
    /// Transmit limit in packets/s (needs the rate limiter).
    pub tx_pps: Option<u64>,
}

fn device_error(message: impl Into<String>) -> ConfigError {
    ConfigError::Device {
        flag: FLAG,
        message: message.into(),
    }
}

fn parse_rate(key: &str, v: &str) -> Result<u64, ConfigError> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(device_error(format!(
            "{key}={v:?} is not a positive number: use e.g. {key}=1000000"
        ))),
    }
}

impl NetConfig {
    /// Parse the `--net` syntax: `[tap=NAME][,mac=MAC][,rx-bw=N][,tx-bw=N][,rx-pps=N][,tx-pps=N]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            match item.split_once('=') {
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
                _ => {
                    return Err(device_error(format!(
                        "unknown option {item:?}: use tap=NAME,mac=MAC (both optional)"
                    )))
                }
            }
        }
        Ok(cfg)
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

    fn has_rate_limit(&self) -> bool {
        self.rx_bw.is_some()
            || self.tx_bw.is_some()
            || self.rx_pps.is_some()
            || self.tx_pps.is_some()
    }
}

/// Host resources of one NIC, opened once per run (the TAP survives guest reboots).
pub struct OpenNet {
    /// Device name, `net<index>`.
    pub device: String,
    /// The TAP queue; each VM instance's device works on a clone of it.
    pub tap: net::Tap,
    /// The guest's MAC.
    pub mac: net::MacAddr,
    /// Counters, kept across guest reboots.
    pub metrics: Arc<NetMetrics>,
}

/// Open (or create) the TAP.
pub fn open(cfg: &NetConfig, index: usize, vm: &VmConfig) -> Result<OpenNet, VmmError> {
    let _ = vm;
    let device = format!("net{index}");
    if cfg.has_rate_limit() {
        return Err(VmmError::NotSupported(
            "--net rx-bw/tx-bw/rx-pps/tx-pps need the rate-limiter crate, which this build \
             does not have yet",
        ));
    }
    let name = cfg
        .tap
        .clone()
        .unwrap_or_else(|| format!("fe{}n{index}", std::process::id()));
    let tap = net::Tap::open(&name, false).map_err(|e| {
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
    let dev = Net::new(Box::new(tap), open.mac).with_metrics(open.metrics.clone());
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
    fn test_net_open_rate_limit_is_not_supported_yet() {
        let cfg = NetConfig::parse("tx-bw=1000").unwrap();

        let err = open(&cfg, 0, &VmConfig::default()).err().unwrap();

        assert!(matches!(err, VmmError::NotSupported(_)));
    }
}
