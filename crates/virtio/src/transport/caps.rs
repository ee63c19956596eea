//! The virtio vendor-specific PCI capabilities (virtio 1.2 §4.1.4) and the BAR layout they
//! describe.

/// PCI capability ID of vendor-specific capabilities.
const PCI_CAP_ID_VNDR: u8 = 0x09;

/// Common configuration structure.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Notifications (doorbells).
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// Alternative access to the BAR through configuration space.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// The one BAR every region lives in (64-bit memory BAR, so registers 0 and 1).
pub const VIRTIO_BAR: usize = 0;
/// Common configuration at the start of the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure (virtio 1.2, without the 1.3 extensions).
pub const COMMON_CFG_SIZE: u64 = 0x38;
/// ISR status byte.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Device configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Device configuration window size.
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Doorbells: queue N at NOTIFY_OFFSET + N * NOTIFY_OFF_MULTIPLIER.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' doorbells.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Notify window size (limits the queue count to 1024).
pub const NOTIFY_SIZE: u64 = 0x1000;
/// MSI-X vector table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X table window (256 vectors).
pub const MSIX_TABLE_SIZE: u64 = 0x1000;
/// MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// MSI-X PBA window.
pub const MSIX_PBA_SIZE: u64 = 0x1000;
/// Total BAR size (power of two).
pub const BAR_SIZE: u64 = 0x8000;

/// `struct virtio_pci_cap` (16 bytes), optionally followed by `extra` bytes, as
/// (body, write mask).
pub fn virtio_cap(cfg_type: u8, offset: u32, length: u32, extra: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut body = vec![
        PCI_CAP_ID_VNDR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        VIRTIO_BAR as u8,
        0,
        0,
        0,
    ];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    let mask = vec![0u8; body.len()];
    (body, mask)
}

/// `struct virtio_pci_notify_cap`: the generic cap plus notify_off_multiplier.
pub fn notify_cap(num_queues: usize) -> (Vec<u8>, Vec<u8>) {
    let len = (num_queues.max(1) as u32) * NOTIFY_OFF_MULTIPLIER;
    virtio_cap(
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        NOTIFY_OFFSET as u32,
        len,
        &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
    )
}

/// `struct virtio_pci_cfg_cap`: bar, offset, length and the 4-byte data window are writable.
pub fn pci_cfg_cap() -> (Vec<u8>, Vec<u8>) {
    let (body, mut mask) = virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]);
    mask[4] = 0xff;
    for m in &mut mask[8..20] {
        *m = 0xff;
    }
    (body, mask)
}
