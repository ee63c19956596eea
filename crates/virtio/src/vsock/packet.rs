//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and the checks every header from the
//! guest must pass before the device acts on it.

use serde::{Deserialize, Serialize};

/// Bytes in `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;
/// Largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// `type`: stream socket (the only type offered: VIRTIO_VSOCK_F_SEQPACKET is not).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`op`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// The sender stops receiving and/or sending (flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's buf_alloc / fwd_cnt changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
}

/// A decoded `virtio_vsock_hdr` (all fields little-endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes following the header.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn u64_at(b: &[u8; HDR_LEN], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8; HDR_LEN], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u16_at(b: &[u8; HDR_LEN], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

impl Header {
    /// Decode the wire format.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encode to the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a guest packet is not acted on as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Dropped silently: the addressing is wrong (not from this guest or not to the host), so
    /// there is nobody a reset could be addressed to.
    Drop,
    /// Answered with RST (unless it is itself a RST): a well-addressed packet the device
    /// cannot accept (wrong type, unknown op, bad length).
    Reset,
}

/// Check a header read from the TX queue. `payload_avail` is how many readable bytes follow
/// the header in the chain.
pub fn validate_tx(hdr: &Header, guest_cid: u64, payload_avail: usize) -> Result<(), Reject> {
    if hdr.src_cid != guest_cid || hdr.dst_cid != HOST_CID {
        return Err(Reject::Drop);
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(Reject::Reset);
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
        return Err(Reject::Reset);
    }
    if hdr.len > MAX_PKT_PAYLOAD || hdr.len as usize > payload_avail {
        return Err(Reject::Reset);
    }
    if hdr.op != op::RW && hdr.len != 0 {
        return Err(Reject::Reset);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 5000,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn test_header_roundtrip_bytes_equal() {
        let h = good();

        let back = Header::from_bytes(&h.to_bytes());

        assert_eq!(back, h);
    }

    #[test]
    fn test_validate_good_header_accepted() {
        assert_eq!(validate_tx(&good(), 3, 10), Ok(()));
    }

    #[test]
    fn test_validate_wrong_src_cid_dropped() {
        let h = Header {
            src_cid: 4,
            ..good()
        };

        assert_eq!(validate_tx(&h, 3, 10), Err(Reject::Drop));
    }

    #[test]
    fn test_validate_wrong_dst_cid_dropped() {
        let h = Header {
            dst_cid: 3,
            ..good()
        };

        assert_eq!(validate_tx(&h, 3, 10), Err(Reject::Drop));
    }

    #[test]
    fn test_validate_bad_type_op_len_reset() {
        let seqpacket = Header { type_: 2, ..good() };
        let bad_op = Header { op: 9, ..good() };
        let zero_op = Header { op: 0, ..good() };
        let too_long = Header { len: 11, ..good() };
        let huge = Header {
            len: u32::MAX,
            ..good()
        };
        let ctl_with_payload = Header {
            op: op::REQUEST,
            ..good()
        };

        for h in [seqpacket, bad_op, zero_op, too_long, huge, ctl_with_payload] {
            assert_eq!(validate_tx(&h, 3, 10), Err(Reject::Reset), "{h:?}");
        }
    }
}
