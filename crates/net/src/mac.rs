//! Ethernet MAC addresses: parsing, formatting and stable generation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::NetError;

/// A 48-bit Ethernet address, as given on the command line or generated per VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A unicast, locally administered address derived from `seed` (e.g. the TAP name).
    ///
    /// The same seed always gives the same address (FNV-1a 64-bit hash, low 48 bits), so a
    /// VM keeps its MAC across runs as long as its TAP name is stable. The first byte has
    /// the locally-administered bit (0x02) set and the multicast bit (0x01) cleared.
    pub fn from_seed(seed: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        let mut mac = [b[2], b[3], b[4], b[5], b[6], b[7]];
        mac[0] = (mac[0] & !0x01) | 0x02;
        Self(mac)
    }

    /// The raw bytes.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether this is a multicast (or broadcast) address, which a NIC cannot own.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mac_parse_and_format_round_trip() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();

        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
    }

    #[test]
    fn test_mac_parse_malformed_is_refused() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
    }

    #[test]
    fn test_mac_from_seed_is_stable_local_unicast() {
        let a = MacAddr::from_seed(b"fe123n0");
        let b = MacAddr::from_seed(b"fe123n0");
        let c = MacAddr::from_seed(b"fe123n1");

        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.0[0] & 0x03, 0x02);
        assert!(!a.is_multicast());
    }
}
