//! A tiny IPv4 stack for the net tests: answers ARP requests for our address, ICMP echo
//! requests and UDP datagrams to the echo port (7), on plain Ethernet frames. Every header
//! checksum is checked on receive and computed on transmit (IPv4, ICMP, UDP).

/// UDP port whose datagrams are echoed back.
pub const UDP_ECHO_PORT: u16 = 7;
const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;

/// One interface's addresses.
#[derive(Clone, Copy)]
pub struct Iface {
    /// Our MAC.
    pub mac: [u8; 6],
    /// Our IPv4 address.
    pub ip: [u8; 4],
}

/// What a received frame turned out to be.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An ARP request for our address (answered).
    Arp,
    /// An ICMP echo request to us (answered).
    Icmp,
    /// A UDP datagram to the echo port (answered).
    Udp,
    /// A frame with a bad checksum or truncated header (dropped).
    Bad,
    /// Anything else (ignored).
    Other,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum's folded one's-complement sum of `data` (RFC 1071), seeded with
/// `sum`.
pub fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !(ones_sum(0, data) as u16)
}

fn udp_checksum(src: &[u8], dst: &[u8], udp: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(src);
    pseudo[4..8].copy_from_slice(dst);
    pseudo[9] = PROTO_UDP;
    put16(&mut pseudo, 10, udp.len() as u16);
    let c = !(ones_sum(ones_sum(0, &pseudo), udp) as u16);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// Handle one received frame; writes the reply into `out` and returns its length (0: no
/// reply).
pub fn handle(ifc: &Iface, frame: &[u8], out: &mut [u8]) -> (Kind, usize) {
    if frame.len() < ETH_HDR {
        return (Kind::Bad, 0);
    }
    match be16(frame, 12) {
        ETHERTYPE_ARP => arp(ifc, frame, out),
        ETHERTYPE_IPV4 => ipv4(ifc, frame, out),
        _ => (Kind::Other, 0),
    }
}

fn eth_reply(ifc: &Iface, frame: &[u8], out: &mut [u8], ethertype: u16) {
    out[..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&ifc.mac);
    put16(out, 12, ethertype);
}

fn arp(ifc: &Iface, frame: &[u8], out: &mut [u8]) -> (Kind, usize) {
    let a = &frame[ETH_HDR..];
    if a.len() < 28 {
        return (Kind::Bad, 0);
    }
    // Ethernet/IPv4 request for our address.
    if be16(a, 0) != 1 || be16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
        return (Kind::Other, 0);
    }
    if be16(a, 6) != 1 || a[24..28] != ifc.ip {
        return (Kind::Other, 0);
    }
    let len = ETH_HDR + 28;
    if out.len() < len {
        return (Kind::Bad, 0);
    }
    eth_reply(ifc, frame, out, ETHERTYPE_ARP);
    let r = &mut out[ETH_HDR..len];
    r[..6].copy_from_slice(&a[..6]);
    put16(r, 6, 2);
    r[8..14].copy_from_slice(&ifc.mac);
    r[14..18].copy_from_slice(&ifc.ip);
    r[18..24].copy_from_slice(&a[8..14]);
    r[24..28].copy_from_slice(&a[14..18]);
    (Kind::Arp, len)
}

fn ipv4(ifc: &Iface, frame: &[u8], out: &mut [u8]) -> (Kind, usize) {
    let ip = &frame[ETH_HDR..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return (Kind::Bad, 0);
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(be16(ip, 2));
    if ihl < 20 || total < ihl || total > ip.len() {
        return (Kind::Bad, 0);
    }
    if ones_sum(0, &ip[..ihl]) != 0xffff {
        return (Kind::Bad, 0);
    }
    if ip[16..20] != ifc.ip {
        return (Kind::Other, 0);
    }
    // Fragments are not reassembled.
    if be16(ip, 6) & 0x3fff != 0 {
        return (Kind::Other, 0);
    }
    let payload = &ip[ihl..total];
    let (src, proto) = (&ip[12..16], ip[9]);
    let len = ETH_HDR + 20 + payload.len();
    if out.len() < len {
        return (Kind::Bad, 0);
    }
    let kind = match proto {
        PROTO_ICMP => {
            if payload.len() < 8 || payload[0] != 8 || ones_sum(0, payload) != 0xffff {
                return (Kind::Bad, 0);
            }
            let r = &mut out[ETH_HDR + 20..len];
            r.copy_from_slice(payload);
            r[0] = 0;
            put16(r, 2, 0);
            let c = checksum(r);
            put16(r, 2, c);
            Kind::Icmp
        }
        PROTO_UDP => {
            if payload.len() < 8 || usize::from(be16(payload, 4)) != payload.len() {
                return (Kind::Bad, 0);
            }
            if be16(payload, 6) != 0 && udp_checksum(src, &ifc.ip, payload) != 0xffff {
                // A valid datagram sums to 0xffff including its own checksum field, which
                // makes our complemented result 0 and thus reported as 0xffff.
                return (Kind::Bad, 0);
            }
            if be16(payload, 2) != UDP_ECHO_PORT {
                return (Kind::Other, 0);
            }
            let r = &mut out[ETH_HDR + 20..len];
            r.copy_from_slice(payload);
            put16(r, 0, be16(payload, 2));
            put16(r, 2, be16(payload, 0));
            put16(r, 6, 0);
            let c = udp_checksum(&ifc.ip, src, r);
            put16(r, 6, c);
            Kind::Udp
        }
        _ => return (Kind::Other, 0),
    };
    eth_reply(ifc, frame, out, ETHERTYPE_IPV4);
    let h = &mut out[ETH_HDR..ETH_HDR + 20];
    h[0] = 0x45;
    h[1] = 0;
    put16(h, 2, (20 + payload.len()) as u16);
    put16(h, 4, be16(ip, 4));
    put16(h, 6, 0);
    h[8] = 64;
    h[9] = proto;
    put16(h, 10, 0);
    h[12..16].copy_from_slice(&ifc.ip);
    h[16..20].copy_from_slice(src);
    let c = checksum(h);
    put16(h, 10, c);
    (kind, len)
}
