//! The test guest's virtio-net driver and tiny IP stack against Ferrite's virtio-net on a
//! TAP: ping, 10,000 checksummed UDP datagrams echoed intact, and two NICs on two subnets.
//!
//! Every test runs in a network namespace of its own (the host's network is never touched):
//! the test thread enters it with setns(2), creates the TAPs there, and Ferrite (spawned from
//! that thread) inherits it. Needs root, `ip` (iproute2) and `ping` (iputils-ping).

mod common;

use common::netns::{ping, wait_up, Netns};
mod testguest_common;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use testguest_common::{num, Guest, GuestRun};

/// Hang guard for one UDP answer.
const RECV_GUARD: Duration = Duration::from_secs(10);

/// Boot the guest with `nets` (`--net` values) running `cmds`, on a thread that inherits
/// the caller's network namespace.
fn boot(nets: &[&str], cmds: &[&str]) -> JoinHandle<Guest> {
    let mut extra: Vec<String> = Vec::new();
    for n in nets {
        extra.push("--net".into());
        extra.push(n.to_string());
    }
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        GuestRun {
            extra: &extra,
            ..GuestRun::new(&cmds)
        }
        .run()
    })
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Datagram `seq`: seq, length-varying body, and the FNV-1a hash of both at the end.
fn datagram(seq: u64) -> Vec<u8> {
    let len = 16 + (seq.wrapping_mul(7919) % 1400) as usize;
    let mut d = seq.to_le_bytes().to_vec();
    d.extend((0..len).map(|i| (seq as u8).wrapping_add(i as u8).wrapping_mul(31)));
    let h = fnv(&d);
    d.extend(h.to_le_bytes());
    d
}

/// The sequence number of an intact datagram.
fn check(d: &[u8]) -> Option<u64> {
    let (body, tail) = d.split_at(d.len().checked_sub(8)?);
    let h = u64::from_le_bytes(tail.try_into().ok()?);
    let seq = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    (fnv(body) == h && datagram(seq) == d).then_some(seq)
}

/// Send `total` datagrams to `addr`'s echo port in windows of `window`; returns the set of
/// sequence numbers echoed back intact and the number of corrupted answers.
fn udp_echo(addr: &str, total: u64, window: u64) -> (BTreeSet<u64>, u64) {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(RECV_GUARD)).unwrap();
    sock.connect((addr, 7)).unwrap();
    let mut got = BTreeSet::new();
    let mut corrupt = 0;
    let mut buf = vec![0u8; 2048];
    let mut seq = 0;
    while seq < total {
        let n = window.min(total - seq);
        for s in seq..seq + n {
            sock.send(&datagram(s)).unwrap();
        }
        for _ in 0..n {
            match sock.recv(&mut buf) {
                Ok(len) => match check(&buf[..len]) {
                    Some(s) => {
                        got.insert(s);
                    }
                    None => corrupt += 1,
                },
                Err(_) => break,
            }
        }
        seq += n;
    }
    (got, corrupt)
}

#[test]
fn test_net_ping_and_udp_echo_all_datagrams_intact() {
    // Arrange
    common::require_kvm();
    let ns = Netns::enter();
    ns.tap("ft0", "10.0.0.1/24");
    let vm = boot(
        &["tap=ft0,mac=52:54:00:00:00:02"],
        &["net-up 0 10.0.0.2/24", "net-serve 25", "poweroff"],
    );
    wait_up("10.0.0.2");

    // Act
    let pinged = ping("10.0.0.2", 3);
    let (got, corrupt) = udp_echo("10.0.0.2", 10_000, 32);
    let guest = vm.join().unwrap();

    // Assert
    guest.assert_powered_off();
    assert!(pinged, "ping -c 3 failed: {}", guest.context());
    assert_eq!(corrupt, 0, "corrupted echoes");
    assert_eq!(got.len(), 10_000, "lost {} datagrams", 10_000 - got.len());
    let up = guest.ok("net-up", 0);
    assert!(up.contains("mac=52:54:00:00:00:02"), "{up}");
    let served = guest.ok("net-serve", 1);
    assert_eq!(num(served, "udp"), 10_000, "{served}");
    assert_eq!(num(served, "bad"), 0, "{served}");
    assert!(num(served, "icmp") >= 4, "{served}");
}

#[test]
fn test_net_two_nics_on_two_subnets_both_answer() {
    // Arrange
    common::require_kvm();
    let ns = Netns::enter();
    ns.tap("ft0", "10.0.0.1/24");
    ns.tap("ft1", "10.0.1.1/24");
    let vm = boot(
        &["tap=ft0", "tap=ft1"],
        &[
            "net-up 0 10.0.0.2/24",
            "net-up 1 10.0.1.2/24",
            "net-serve 15",
            "poweroff",
        ],
    );
    wait_up("10.0.0.2");

    // Act
    let ping1 = ping("10.0.1.2", 3);
    let (a, _) = udp_echo("10.0.0.2", 500, 16);
    let (b, _) = udp_echo("10.0.1.2", 500, 16);
    let guest = vm.join().unwrap();

    // Assert
    guest.assert_powered_off();
    assert!(ping1, "second NIC did not answer: {}", guest.context());
    assert_eq!((a.len(), b.len()), (500, 500));
    let mac0 = guest.ok("net-up", 0).to_string();
    let mac1 = guest.ok("net-up", 1).to_string();
    assert_ne!(
        testguest_common::value(&mac0, "mac"),
        testguest_common::value(&mac1, "mac")
    );
    assert_eq!(num(guest.ok("net-serve", 1), "udp"), 1000);
}

#[test]
fn test_net_missing_tap_is_created_and_removed_on_exit() {
    // Arrange
    common::require_kvm();
    let _ns = Netns::enter();

    // Act
    let guest = boot(&["tap=ftnew"], &["net-up 0 10.0.0.2/24", "poweroff"])
        .join()
        .unwrap();

    // Assert
    guest.assert_powered_off();
    let up = guest.ok("net-up", 0);
    // The generated MAC is locally administered and unicast.
    let mac = testguest_common::value(up, "mac").unwrap();
    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(first & 3, 2, "{up}");
    let still_there = Command::new("ip")
        .args(["link", "show", "ftnew"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!still_there, "the TAP Ferrite created outlived it");
}
