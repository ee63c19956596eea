//! VM control over the per-VM control socket (`--api-socket`), judged by what a real test guest
//! prints and what the socket answers: `pause`/`resume` (a `spin` loop stops printing and
//! continues), per-vCPU `stats`, `power-button` (the guest sees PWRBTN_STS, prints
//! `OK power-button` and powers off), `reboot` (the guest boots twice), and a SIGTERM while
//! paused.

mod common;
mod testguest_common;

use testguest_common::control::Vm;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};
use testguest_common::READY;

fn spin_lines(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| l.starts_with("spin t=")).collect()
}

#[test]
fn test_pause_stops_spin_resume_continues_and_power_button_stops_it() {
    // Arrange: a guest spinning forever at CPL3.
    let mut vm = Vm::start("pause", "spin 0");
    vm.wait_line("spin t=1 ");

    // Act: pause, watch the console, read stats, resume.
    let paused = vm.request(r#"{"op":"pause"}"#);
    let again = vm.request(r#"{"op":"pause"}"#);
    vm.lines_within(Duration::from_millis(300)); // output already on its way
    let while_paused = vm.lines_within(Duration::from_millis(1500));
    let stats_paused = vm.request(r#"{"op":"stats"}"#);
    let resumed = vm.request(r#"{"op":"resume"}"#);
    let after = vm.lines_within(Duration::from_millis(2500));
    let stats_running = vm.request(r#"{"op":"stats"}"#);
    let button = vm.request(r#"{"op":"power-button"}"#);
    vm.wait_line("OK power-button");
    let status = vm.wait_exit(Duration::from_secs(30));

    // Assert
    assert_eq!(paused, serde_json::json!({"ok": true, "state": "paused"}));
    assert_eq!(again, serde_json::json!({"ok": true, "state": "paused"}));
    assert!(
        spin_lines(&while_paused).is_empty(),
        "spin lines while paused: {while_paused:?}"
    );
    assert_eq!(stats_paused["state"], "paused", "{stats_paused}");
    assert_eq!(resumed, serde_json::json!({"ok": true, "state": "running"}));
    assert!(
        !spin_lines(&after).is_empty(),
        "no spin lines after resume: {after:?}"
    );
    assert_eq!(stats_running["state"], "running");
    assert_eq!(stats_running["reboots"], 0);
    let vcpus = stats_running["vcpus"].as_array().expect("vcpus array");
    assert_eq!(vcpus.len(), 1, "{stats_running}");
    assert_eq!(vcpus[0]["id"], 0);
    assert!(vcpus[0]["tid"].as_i64().unwrap() > 0, "{stats_running}");
    assert!(vcpus[0]["cpu_ns"].as_u64().unwrap() > 0, "{stats_running}");
    assert!(
        vcpus[0]["exits"]["io_out"].as_u64().unwrap() > 0,
        "{stats_running}"
    );
    assert_eq!(
        button,
        serde_json::json!({"ok": true, "guest_enabled": true})
    );
    assert!(status.success(), "ferrite exited with {status}");
}

#[test]
fn test_power_button_at_idle_console_powers_off() {
    let mut vm = Vm::start("pwrbtn", "");
    vm.wait_line(READY);

    let button = vm.request(r#"{"op":"power-button"}"#);
    vm.wait_line("OK power-button");
    let status = vm.wait_exit(Duration::from_secs(30));

    assert_eq!(button["guest_enabled"], true, "{button}");
    assert!(status.success(), "ferrite exited with {status}");
    assert!(!vm.sock.exists(), "socket file left behind");
}

#[test]
fn test_reboot_boots_the_guest_again() {
    let mut vm = Vm::start("reboot", "");
    vm.wait_line(READY);

    let reply = vm.request(r#"{"op":"reboot"}"#);
    vm.wait_line(READY);
    let stats = vm.request(r#"{"op":"stats"}"#);
    vm.child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"poweroff\n")
        .unwrap();
    let status = vm.wait_exit(Duration::from_secs(30));

    assert_eq!(reply, serde_json::json!({"ok": true}));
    assert_eq!(stats["reboots"], 1, "{stats}");
    assert_eq!(stats["state"], "running", "{stats}");
    assert_eq!(
        vm.seen.iter().filter(|l| l.contains(READY)).count(),
        2,
        "{:?}",
        vm.seen
    );
    assert!(status.success(), "ferrite exited with {status}");
}

#[test]
fn test_sigterm_while_paused_exits_promptly() {
    let mut vm = Vm::start("term", "spin 0");
    vm.wait_line("spin t=1 ");
    let paused = vm.request(r#"{"op":"pause"}"#);

    let start = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &vm.child.id().to_string()])
        .status()
        .unwrap();
    let status = vm.wait_exit(Duration::from_secs(20));

    assert_eq!(paused["state"], "paused", "{paused}");
    assert!(killed.success());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        status.code().is_some(),
        "ferrite died by a signal: {status}"
    );
}
