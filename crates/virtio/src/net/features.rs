//! virtio-net feature bits (virtio 1.2 §5.1.3).

/// The device handles packets with partial checksums (guest → host).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// The driver handles packets with partial checksums (host → guest).
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// The device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// The driver can receive TSOv4.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// The driver can receive TSOv6.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// The driver can receive TSO with ECN.
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
/// The device can receive TSOv4.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// The device can receive TSOv6.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// The device can receive TSO with ECN.
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
/// The driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// The config space has a link status field.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
