//! TAP devices: open or create one by name over `/dev/net/tun`, with the 12-byte
//! `virtio_net_hdr_v1` as the vnet header and offloads chosen from the guest's features.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::{NetError, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// Size of `virtio_net_hdr_v1` (virtio 1.2 §5.1.6), used as the TAP's vnet header.
pub const VNET_HDR_LEN: usize = 12;

/// Offloads the TAP may use (`TUN_F_*` of linux/if_tun.h), derived from what the guest acked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// The guest accepts packets with partial checksums (`TUN_F_CSUM`).
    pub csum: bool,
    /// The guest accepts TSOv4 packets (`TUN_F_TSO4`).
    pub tso4: bool,
    /// The guest accepts TSOv6 packets (`TUN_F_TSO6`).
    pub tso6: bool,
    /// The guest accepts TSO with ECN (`TUN_F_TSO_ECN`).
    pub tso_ecn: bool,
    /// The guest accepts UFO packets (`TUN_F_UFO`).
    pub ufo: bool,
}

impl TapOffloads {
    /// The `TUNSETOFFLOAD` argument.
    pub fn bits(&self) -> libc::c_uint {
        let mut b = 0;
        if self.csum {
            b |= 0x01;
            // The kernel refuses segmentation offloads without checksum offload.
            if self.tso4 {
                b |= 0x02;
            }
            if self.tso6 {
                b |= 0x04;
            }
            if self.tso_ecn && (self.tso4 || self.tso6) {
                b |= 0x08;
            }
            if self.ufo {
                b |= 0x10;
            }
        }
        b
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One open queue of a TAP device (non-blocking, close-on-exec).
///
/// A TAP this process created is not persistent: the kernel deletes it when the last fd
/// closes, so nothing is left behind on exit.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
    multi_queue: bool,
}

/// Whether `name` is an interface name the kernel accepts.
pub fn valid_if_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// Whether interface `name` exists in this thread's network namespace (not /sys, which
/// shows the namespace it was mounted in).
pub fn if_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Open the TAP `name`, creating it if it does not exist. `multi_queue` sets
    /// `IFF_MULTI_QUEUE` (then every [`Tap::open`] with the same name adds a queue).
    pub fn open(name: &str, multi_queue: bool) -> Result<Self> {
        if !valid_if_name(name) {
            return Err(NetError::InvalidName(name.to_string()));
        }
        let existed = if_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `req` is a properly sized and initialised `struct ifreq` that lives for
        // the call; the kernel reads and writes only within it.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                op: "TUNSETIFF",
                source: io::Error::last_os_error(),
            });
        }
        let len = req.name.iter().position(|b| *b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        let tap = Self {
            file,
            name,
            created: !existed,
            multi_queue,
        };
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
        let rc = unsafe { libc::ioctl(tap.fd(), TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                op: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        tap.set_offloads(TapOffloads::default())?;
        Ok(tap)
    }

    /// Open the TAP `name` as [`Tap::open`] without `IFF_MULTI_QUEUE` does, but attach to
    /// an existing multiqueue TAP as one more queue (the kernel refuses a single-queue open
    /// of it).
    pub fn open_any(name: &str) -> Result<Self> {
        match Self::open(name, false) {
            Err(NetError::Ioctl {
                op: "TUNSETIFF",
                source,
            }) if source.raw_os_error() == Some(libc::EINVAL) && if_exists(name) => {
                Self::open(name, true).map_err(|_| NetError::Ioctl {
                    op: "TUNSETIFF",
                    source,
                })
            }
            other => other,
        }
    }

    /// Whether this is a queue of a multiqueue TAP (which can be detached and attached).
    pub fn multi_queue(&self) -> bool {
        self.multi_queue
    }

    fn set_queue(&self, flags: libc::c_short, op: &'static str) -> Result<()> {
        let mut req = IfReq {
            name: [0; 16],
            flags,
            _pad: [0; 22],
        };
        // SAFETY: `req` is a properly sized and initialised `struct ifreq` that lives for
        // the call; the kernel only reads its flags.
        let rc = unsafe { libc::ioctl(self.fd(), TUNSETQUEUE, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Take this queue off a multiqueue TAP while keeping the descriptor (and every
    /// duplicate of it) open: the TAP no longer delivers frames to it, and another process
    /// can attach a queue of its own. The interface stays.
    pub fn detach_queue(&self) -> Result<()> {
        self.set_queue(IFF_DETACH_QUEUE, "TUNSETQUEUE(IFF_DETACH_QUEUE)")
    }

    /// Put a queue taken off by [`Tap::detach_queue`] back on its TAP.
    pub fn attach_queue(&self) -> Result<()> {
        self.set_queue(IFF_ATTACH_QUEUE, "TUNSETQUEUE(IFF_ATTACH_QUEUE)")
    }

    /// Tell the kernel which offloaded packets it may hand us (TUNSETOFFLOAD).
    pub fn set_offloads(&self, offloads: TapOffloads) -> Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is touched.
        let rc = unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD, offloads.bits() as libc::c_ulong) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                op: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name the kernel gave (or confirmed).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process created the interface (it disappears when its fds close).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The fd, for epoll registration.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Read one frame (vnet header first); `WouldBlock` when none is queued.
    pub fn read_frame(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&self.file).read_vectored(bufs)
    }

    /// Write one frame (vnet header first); the TAP takes a whole frame per write.
    pub fn write_frame(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(bufs)
    }

    /// Another handle on the same queue (for a worker thread while the VMM keeps one).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
            created: self.created,
            multi_queue: self.multi_queue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_offloads_segmentation_without_csum_is_dropped() {
        let o = TapOffloads {
            csum: false,
            tso4: true,
            ..Default::default()
        };

        assert_eq!(o.bits(), 0);
    }

    #[test]
    fn test_offloads_all_set_gives_kernel_bits() {
        let o = TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            ufo: true,
        };

        assert_eq!(o.bits(), 0x1f);
    }

    #[test]
    fn test_if_name_bad_names_are_refused() {
        for n in ["", "a/b", "a:b", "a b", "0123456789abcdef"] {
            assert!(!valid_if_name(n), "{n}");
            assert!(matches!(Tap::open(n, false), Err(NetError::InvalidName(_))));
        }
    }

    #[test]
    fn test_tap_open_creates_and_removes_on_close() {
        // Needs CAP_NET_ADMIN; skipped quietly without it.
        let name = format!("fet{}", std::process::id() % 100_000);
        let tap = match Tap::open(&name, false) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        assert!(tap.created());
        assert_eq!(tap.name(), name);
        let offloads = TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            ..Default::default()
        };
        tap.set_offloads(offloads).unwrap();
        let mut buf = [0u8; 64];
        let err = tap
            .read_frame(&mut [IoSliceMut::new(&mut buf)])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        drop(tap);

        assert!(!if_exists(&name));
    }

    #[test]
    fn test_multiqueue_tap_queue_detached_lets_another_open_and_attaches_again() {
        // Needs CAP_NET_ADMIN; skipped quietly without it.
        let name = format!("feq{}", std::process::id() % 100_000);
        let first = match Tap::open(&name, true) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let keep = first.try_clone().unwrap();

        first.detach_queue().unwrap();
        let second = Tap::open_any(&name).unwrap();
        drop(second);
        keep.attach_queue().unwrap();
        let single = Tap::open(&name, false);

        assert!(first.multi_queue());
        assert!(matches!(single, Err(NetError::Ioctl { .. })));
        assert!(if_exists(&name));
        drop((first, keep));
        assert!(!if_exists(&name));
    }
}
