//! What goes over the loopback wire: a packet socket (`AF_PACKET`, needs CAP_NET_RAW) on `lo`
//! records, per TCP destination port, the first bytes sent, the byte count and whether
//! given byte strings ever appeared in clear. For streams the test cannot route through a
//! proxy (one VMM connects to another on a port a daemon picked).
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What was seen of the TCP segments to one port.
#[derive(Debug, Clone, Default)]
pub struct Flow {
    /// The first payload bytes (up to 16) of the first segment with data.
    pub first: Vec<u8>,
    /// Payload bytes seen.
    pub bytes: u64,
    /// Per needle: whether it appeared inside one segment's payload.
    pub found: Vec<bool>,
}

/// A running capture on `lo`; stops when dropped.
pub struct LoopbackCapture {
    stop: Arc<AtomicBool>,
    flows: Arc<Mutex<HashMap<u16, Flow>>>,
    thread: Option<JoinHandle<()>>,
}

const ETH_HLEN: usize = 14;
const PACKET_OUTGOING: u8 = 4;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// (destination port, payload) of an IPv4 TCP frame.
fn tcp_payload(frame: &[u8]) -> Option<(u16, &[u8])> {
    let ip = frame.get(ETH_HLEN..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let ip = ip.get(..total.min(ip.len()))?;
    let tcp = ip.get(ihl..)?;
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let off = usize::from(tcp.get(12)? >> 4) * 4;
    Some((dport, tcp.get(off..)?))
}

impl LoopbackCapture {
    /// Start capturing; `needles` are looked for in every payload.
    pub fn start(needles: &[&[u8]]) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "a packet socket needs root (CAP_NET_RAW): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh, valid descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the name is a NUL-terminated C string.
        let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert!(ifindex > 0, "no lo interface");
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind to lo: {}", std::io::Error::last_os_error());
        let rcvbuf: libc::c_int = 64 << 20;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: the option values are valid for their sizes.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&rcvbuf as *const libc::c_int).cast(),
                4,
            );
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flows: Arc<Mutex<HashMap<u16, Flow>>> = Arc::default();
        let needles: Vec<Vec<u8>> = needles.iter().map(|n| n.to_vec()).collect();
        let (st, fl) = (stop.clone(), flows.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            while !st.load(Ordering::Relaxed) {
                // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: buf and from are valid for the lengths passed.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                // Each loopback segment shows up twice: keep the received copy.
                if n <= 0 || from.sll_pkttype == PACKET_OUTGOING {
                    continue;
                }
                let Some((dport, payload)) = tcp_payload(&buf[..n as usize]) else {
                    continue;
                };
                if payload.is_empty() {
                    continue;
                }
                let mut all = fl.lock().unwrap();
                let flow = all.entry(dport).or_insert_with(|| Flow {
                    found: vec![false; needles.len()],
                    ..Flow::default()
                });
                if flow.first.is_empty() {
                    flow.first = payload[..payload.len().min(16)].to_vec();
                }
                flow.bytes += payload.len() as u64;
                for (hit, needle) in flow.found.iter_mut().zip(&needles) {
                    *hit |= contains(payload, needle);
                }
            }
        });
        LoopbackCapture {
            stop,
            flows,
            thread: Some(thread),
        }
    }

    /// What was seen going to `port` so far.
    pub fn flow(&self, port: u16) -> Flow {
        self.flows
            .lock()
            .unwrap()
            .get(&port)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for LoopbackCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
