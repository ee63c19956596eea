//! Live migration on one host of a guest whose devices hold host resources by name: its
//! vsock device's Unix socket path and its NIC's TAP (multiqueue). The source hands both over
//! after its pause (the socket file renamed aside, the TAP queue detached); the destination
//! opens them when it builds the VM; a migration that fails before the commit gives them back
//! to the source.
//!
//! Runs in a network namespace of its own (see `common::netns`); needs root, `ip` and `ping`.

mod common;
mod testguest_common;

use std::io::Write;
use std::path::Path;

use common::netns::{ip, ping, wait_up, Netns};
use testguest_common::control::Vm;
use testguest_common::migrate::*;
use testguest_common::vsock::{assert_ok_line, echo_through, hybrid_connect, SockDir};
use testguest_common::WATCHDOG;

/// A multiqueue TAP (with vnet header support) holding `host_cidr`, up: the kind a migration
/// on one host can hand over.
fn multiqueue_tap(name: &str, host_cidr: &str) {
    ip(&[
        "tuntap",
        "add",
        "dev",
        name,
        "mode",
        "tap",
        "vnet_hdr",
        "multi_queue",
    ]);
    ip(&["addr", "add", host_cidr, "dev", name]);
    ip(&["link", "set", name, "up"]);
}

/// `ferrite run` arguments for the test guest with a NIC on `tap` and a vsock at `socket`.
fn guest_args(tap: &str, socket: &Path, cmds: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        common::asset("testguest.elf").display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--net".into(),
        format!("tap={tap},mac=52:54:00:00:06:02"),
        "--vsock".into(),
        format!("cid=7,socket={}", socket.display()),
        "--cmdline".into(),
        format!("cmds=\"{cmds}\""),
    ]
}

#[test]
fn test_guest_migrated_on_one_host_answers_on_vsock_and_net_at_the_destination() {
    // Arrange: a guest with its NIC up on a multiqueue TAP, listening on vsock port 1234
    // with one host connection open; a destination on loopback in the same namespace.
    let ns = Netns::enter();
    multiqueue_tap("fmig0", "10.0.6.1/24");
    let socks = SockDir::new("migdev");
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::spawn(
        "mig-devices",
        &guest_args("fmig0", &socks.vm_socket(), "net-up 0 10.0.6.2/24"),
    );
    src.wait_line("OK net-up");
    src.send("vsock-listen 1234 1");
    src.wait_line("vsock listening port=1234");
    let (mut before, before_ok) = hybrid_connect(&socks.vm_socket(), 1234);
    assert_ok_line(&before_ok);
    before.write_all(b"open across the migration").unwrap();
    let mut dst = Vm::spawn(
        "mig-devices-d",
        &["--incoming".to_string(), endpoint.clone()],
    );

    // Act: migrate; once the source is gone, the guest (told of the transport reset) listens
    // again and a new host connection reaches it; the NIC serves pings through the TAP.
    migrate(&mut src, serde_json::json!({"to": endpoint}));
    let (status, _) = wait_migration(&mut src);
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    let ended = dst.wait_line("OK vsock-listen");
    dst.send("vsock");
    let info = dst.wait_line("OK vsock ");
    dst.send("vsock-listen 1234 1");
    dst.wait_line("vsock listening port=1234");
    let (mut after, after_ok) = hybrid_connect(&socks.vm_socket(), 1234);
    let echoed = echo_through(&mut after, b"hello after the migration");
    let listen = dst.wait_line("OK vsock-listen");
    dst.send("net-serve 60");
    dst.wait_line("OK net-serve started");
    wait_up("10.0.6.2");
    let answered = ping("10.0.6.2", 3);
    let leftovers: Vec<_> = std::fs::read_dir(&socks.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    // Assert: the source handed over and exited without removing the destination's socket;
    // the old connection ended by the reset, the new one echoed, the NIC answers.
    assert_eq!(src_exit.code(), Some(MIGRATED), "{status} {src_err}");
    assert!(
        ended.contains("conns=1") && ended.contains("resets=1"),
        "the connection open before the migration should end by the transport reset: {ended}"
    );
    assert!(
        info.contains("cid=7") && info.contains("transport_resets=1"),
        "{info}"
    );
    assert_ok_line(&after_ok);
    assert_eq!(echoed, b"hello after the migration");
    assert!(
        listen.contains("conns=1") && listen.contains("resets=0"),
        "{listen}"
    );
    assert!(
        answered,
        "the guest does not answer pings on the destination"
    );
    assert_eq!(leftovers, vec![std::ffi::OsString::from("vm.sock")]);
    drop(before);
    drop(dst);
    drop(ns);
}

#[test]
fn test_migration_failed_before_the_commit_on_one_host_gives_vsock_and_net_back_to_the_source() {
    // Arrange: as above, with a proxy that cuts the connection once the destination has
    // built the VM (and opened the socket path and the TAP), before the commit.
    let ns = Netns::enter();
    multiqueue_tap("fmig1", "10.0.7.1/24");
    let socks = SockDir::new("migdevfail");
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::spawn(
        "mig-devices-f",
        &guest_args("fmig1", &socks.vm_socket(), "net-up 0 10.0.7.2/24"),
    );
    src.wait_line("OK net-up");
    src.send("vsock-listen 1234 1");
    src.wait_line("vsock listening port=1234");
    let (mut before, before_ok) = hybrid_connect(&socks.vm_socket(), 1234);
    assert_ok_line(&before_ok);
    before
        .write_all(b"open across the failed migration")
        .unwrap();
    let mut dst = Vm::spawn(
        "mig-devices-fd",
        &["--incoming".to_string(), endpoint.clone()],
    );
    let proxy = cutting_proxy(&endpoint, Cut::ReplyByte(2));

    // Act: the migration fails; once the destination has exited, the connection open
    // before goes on, a new one reaches the guest, and the NIC serves pings.
    migrate(&mut src, serde_json::json!({"to": proxy}));
    let (status, _) = wait_migration(&mut src);
    let dst_exit = dst.wait_exit(WATCHDOG);
    let dst_err = stderr_of(&mut dst);
    before.write_all(b" and after it").unwrap();
    let old_echo = echo_through(&mut before, b"");
    let old_listen = src.wait_line("OK vsock-listen");
    src.send("vsock-listen 1234 1");
    src.wait_line("vsock listening port=1234");
    let (mut after, after_ok) = hybrid_connect(&socks.vm_socket(), 1234);
    let new_echo = echo_through(&mut after, b"new connection");
    let listen = src.wait_line("OK vsock-listen");
    src.send("net-serve 60");
    src.wait_line("OK net-serve started");
    wait_up("10.0.7.2");
    let answered = ping("10.0.7.2", 3);
    let leftovers: Vec<_> = std::fs::read_dir(&socks.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    // Assert: the destination failed (having opened the devices); the source kept its
    // guest's connection, took its socket path and TAP queue back, and serves both.
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(!dst_exit.success(), "{dst_err}");
    assert_eq!(old_echo, b"open across the failed migration and after it");
    assert_ok_line(&after_ok);
    assert_eq!(new_echo, b"new connection");
    assert!(
        old_listen.contains("conns=1") && old_listen.contains("resets=0"),
        "{old_listen}"
    );
    assert!(
        listen.contains("conns=1") && listen.contains("resets=0"),
        "{listen}"
    );
    assert!(answered, "the guest does not answer pings on the source");
    assert_eq!(leftovers, vec![std::ffi::OsString::from("vm.sock")]);
    drop(src);
    drop(ns);
}
