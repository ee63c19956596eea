//! The test guest's `hostile` mode against every device kind Ferrite has, all in one VM:
//! virtio-blk, virtio-net (on a TAP in a network namespace of the test's own), virtio-vsock,
//! virtio-rng, virtio-console and, once it is built, virtio-balloon. The guest sends garbage
//! notifications, bad descriptor addresses, loops, avail-index jumps, rings outside RAM,
//! out-of-order status writes, MSI-X table garbage and malformed requests (see
//! docs/testguest.md). The VMM must stay up, each device must break (DEVICE_NEEDS_RESET),
//! answer or ignore each attack, read back what the virtio spec fixes, come back after a
//! reset and then do real work again: the disk still holds what was written before, rng
//! gives bytes, hvc0 output reaches the host file, a vsock echo round-trips, the NIC answers
//! pings and UDP, and the VM powers off cleanly.
//!
//! Needs root, `ip` (iproute2) and `ping` (iputils-ping), like testguest_net.rs.

mod common;

use common::netns::Netns;
mod testguest_common;

use std::io::{ErrorKind, Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use testguest_common::{num, Guest, GuestRun, ScratchDisk};

/// Hang guard for host-side waits (not a performance threshold).
const HANG: Duration = Duration::from_secs(110);
/// Host port the guest's vsock echo connects to.
const VSOCK_PORT: u32 = 5000;
/// Bytes of that echo.
const VSOCK_BYTES: u32 = 64 << 10;
/// UDP datagrams echoed by the guest after the attacks.
const UDP_COUNT: usize = 50;

/// A private directory for the VM's sockets and console file, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("fhostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Accept one connection on `listener` (within the hang guard) and echo it until the guest
/// half-closes; returns the bytes echoed.
fn vsock_echo_server(listener: UnixListener) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let end = Instant::now() + HANG;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return 0,
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(HANG)).unwrap();
        let mut buf = [0u8; 8192];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    total += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        total
    })
}

fn ping(addr: &str, count: u32) -> bool {
    Command::new("ping")
        .args(["-c", &count.to_string(), "-W", "1", "-i", "0.2", addr])
        .stdout(Stdio::null())
        .status()
        .expect("run ping (iputils-ping)")
        .success()
}

/// After the guest answers its first ping (it does only once the attacks are over and its
/// NIC is up again): three more pings and [`UDP_COUNT`] UDP echoes. Returns (first ping
/// answered, ping -c 3 succeeded, datagrams echoed intact).
fn exercise_nic(addr: &'static str) -> JoinHandle<(bool, bool, usize)> {
    std::thread::spawn(move || {
        let end = Instant::now() + HANG;
        let mut up = false;
        while !up && Instant::now() < end {
            up = ping(addr, 1);
        }
        if !up {
            return (false, false, 0);
        }
        let pinged = ping(addr, 3);
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.connect((addr, 7)).unwrap();
        let mut echoed = 0;
        let mut buf = [0u8; 2048];
        for i in 0..UDP_COUNT {
            let msg: Vec<u8> = (0..64 + i).map(|b| (b ^ i) as u8).collect();
            sock.send(&msg).unwrap();
            if let Ok(n) = sock.recv(&mut buf) {
                echoed += usize::from(buf[..n] == msg[..]);
            }
        }
        (up, pinged, echoed)
    })
}

/// Whether this build has `--balloon` (another device being built in parallel).
fn balloon_available() -> bool {
    let probe = GuestRun {
        extra: &["--balloon"],
        ..GuestRun::new(&["poweroff"])
    }
    .run();
    probe.out.code == Some(0)
}

/// Boots the guest with every device kind (on a thread that inherits the caller's network
/// namespace) and runs `cmds`.
fn boot_all(disk: String, extra: Vec<String>, cmds: &'static [&'static str]) -> JoinHandle<Guest> {
    std::thread::spawn(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        GuestRun {
            disks: vec![disk],
            extra: &extra,
            ..GuestRun::new(cmds)
        }
        .run()
    })
}

#[test]
fn test_hostile_guest_leaves_vmm_and_every_device_working() {
    // Arrange
    common::require_kvm();
    let with_balloon = balloon_available();
    let ns = Netns::enter();
    ns.tap("fh0", "10.0.0.1/24");
    let dir = TempDir::new();
    let disk = ScratchDisk::zeroed("hostile", 4 << 20);
    let vm_sock = dir.0.join("vm.sock");
    let hvc = dir.0.join("hvc0.txt");
    let listener = UnixListener::bind(dir.0.join(format!("vm.sock_{VSOCK_PORT}"))).unwrap();
    let mut extra: Vec<String> = vec![
        "--net".into(),
        "tap=fh0,mac=52:54:00:00:00:07".into(),
        "--vsock".into(),
        format!("cid=3,socket={}", vm_sock.display()),
        "--rng".into(),
        "--virtio-console".into(),
        format!("file:{}", hvc.display()),
    ];
    if with_balloon {
        extra.push("--balloon".into());
    }
    let cmds: &'static [&'static str] = &[
        "blk-write 0 0 64 9",
        "hostile",
        "blk-check 0 0 64 9",
        "rng 4096",
        "vcon-write still here after hostile",
        "vsock-connect 5000 65536",
        "net-up 0 10.0.0.2/24",
        "net-serve 10",
        "irqs",
        "poweroff",
    ];

    // Act
    let echo = vsock_echo_server(listener);
    let nic = exercise_nic("10.0.0.2");
    let guest = boot_all(disk.arg(), extra, cmds).join().unwrap();
    let (nic_up, pinged, udp_echoed) = nic.join().unwrap();
    let vsock_echoed = echo.join().unwrap();
    // The attacks' garbage went to hvc0 too: not UTF-8.
    let hvc_text = String::from_utf8_lossy(&std::fs::read(&hvc).unwrap_or_default()).into_owned();

    // Assert: the VMM stayed up to a clean poweroff, every device survived every attack.
    guest.assert_powered_off();
    assert!(
        guest.lines().any(|l| l == "hostile: done"),
        "{}",
        guest.context()
    );
    let kinds = if with_balloon { 6 } else { 5 };
    let summary = guest.ok("hostile", 0);
    assert_eq!(num(summary, "devices"), kinds, "{summary}");
    assert_eq!(num(summary, "reset_failed"), 0, "{summary}");
    assert_eq!(num(summary, "unrecovered"), 0, "{summary}");
    assert_eq!(num(summary, "anomalies"), 0, "{summary}");
    let devices = guest.details("hostile");
    assert_eq!(devices.len(), kinds as usize, "{}", guest.context());
    for id in [
        "1af4:1042",
        "1af4:1041",
        "1af4:1053",
        "1af4:1044",
        "1af4:1043",
    ] {
        assert!(
            devices.iter().any(|d| d.contains(id)),
            "{id} was not attacked: {}",
            guest.context()
        );
    }
    for d in &devices {
        assert_eq!(num(d, "recovered"), 1, "{d}");
        assert_eq!(num(d, "anomalies"), 0, "{d}");
        // Loops, bad indices, avail jumps and rings outside RAM must break every device.
        assert!(num(d, "broken") >= 10, "{d}");
        assert!(num(d, "attacks") >= 50, "{d}");
    }
    // MSI-X messages through a table entry with a garbage high address dword still arrive
    // as the plain vector (one per device that used a buffer meanwhile).
    assert!(
        num(guest.ok("irqs", 0), "other") >= 1,
        "{}",
        guest.context()
    );
    // Real work afterwards: disk contents from before the attacks, entropy, hvc0, vsock, net.
    guest.ok("blk-check", 0);
    assert_eq!(num(guest.ok("rng", 0), "bytes"), 4096);
    guest.ok("vcon-write", 0);
    assert!(
        hvc_text.contains("still here after hostile"),
        "hvc0 output did not reach the host: {hvc_text:?}"
    );
    let vsock = guest.ok("vsock-connect", 0);
    assert!(vsock.contains("result=match"), "{vsock}");
    assert_eq!(vsock_echoed, u64::from(VSOCK_BYTES));
    guest.ok("net-up", 0);
    assert!(nic_up, "the NIC never answered a ping: {}", guest.context());
    assert!(pinged, "ping -c 3 failed after the attacks");
    assert_eq!(udp_echoed, UDP_COUNT, "UDP echoes lost after the attacks");
    assert!(num(guest.ok("net-serve", 1), "udp") >= UDP_COUNT as u64);
    drop(ns);
}
