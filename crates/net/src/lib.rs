//! Host networking for Ferrite's virtio-net: TAP devices opened over `TUNSETIFF` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (optionally `IFF_MULTI_QUEUE`), their offload and
//! vnet-header settings, and the MAC address type.

#![warn(missing_docs)]

pub mod mac;
pub mod tap;

pub use mac::MacAddr;
pub use tap::{Tap, TapOffloads};

/// Errors of the host networking layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A MAC address string that does not parse.
    #[error("Invalid MAC address {0:?}: use six hex bytes like 52:54:00:12:34:56")]
    InvalidMac(String),
    /// An interface name that the kernel would refuse.
    #[error("Invalid interface name {0:?}: use 1 to 15 characters without '/', ':' or spaces")]
    InvalidName(String),
    /// Opening /dev/net/tun failed.
    #[error("Cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl on the TAP failed.
    #[error("TAP ioctl {op} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, NetError>;
