//! The per-VM control socket (`--api-socket`): a running test guest with a disk answers
//! `info`/`stats`, takes a live `rate-limit` change, survives garbage lines, and the socket
//! file is gone after the guest powers off.

mod common;
mod testguest_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use testguest_common::{ScratchDisk, READY, WATCHDOG};

fn request(conn: &mut BufReader<UnixStream>, line: &str) -> serde_json::Value {
    conn.get_mut().write_all(line.as_bytes()).unwrap();
    conn.get_mut().write_all(b"\n").unwrap();
    let mut reply = String::new();
    conn.read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn test_control_socket_rate_limit_info_garbage_and_cleanup() {
    common::require_kvm();
    let disk = ScratchDisk::with_pattern("ctl", 1 << 20, 3);
    let sock = std::env::temp_dir().join(format!("ferrite-ctl-{}.sock", std::process::id()));
    let kernel = common::asset("testguest.elf");
    let mut child = Command::new(common::ferrite_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args([
            "--memory",
            "128M",
            "--cmdline",
            "cmds=\"blk-sum 0 0 8\"",
            "--disk",
        ])
        .arg(disk.path())
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferrite");
    let rx = common::stdout_lines(&mut child);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.starts_with("OK blk-sum")) {
        match rx.recv_timeout(WATCHDOG) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("guest did not finish blk-sum: {seen:?}");
            }
        }
    }
    assert!(seen.iter().any(|l| l.contains(READY)));
    let mut conn = BufReader::new(UnixStream::connect(&sock).expect("connect api socket"));

    let stats = request(&mut conn, r#"{"op":"stats"}"#);
    let garbage = request(&mut conn, "this is not json");
    let unknown = request(
        &mut conn,
        r#"{"op":"rate-limit","device":"disk7","bytes_per_s":1}"#,
    );
    let set = request(
        &mut conn,
        r#"{"op":"rate-limit","device":"disk0","bytes_per_s":1048576,"ops_per_s":100}"#,
    );
    let info = request(&mut conn, r#"{"op":"info"}"#);
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"poweroff\n")
        .unwrap();
    let status = child.wait().unwrap();

    assert_eq!(stats["ok"], true, "{stats}");
    assert!(stats["uptime_ms"].is_u64());
    assert_eq!(garbage["error"], "bad-json");
    assert_eq!(unknown["error"], "unknown-device");
    assert_eq!(set["ok"], true, "{set}");
    assert_eq!(info["rate_limits"]["disk0"]["bandwidth"]["size"], 1048576);
    assert_eq!(info["rate_limits"]["disk0"]["ops"]["size"], 100);
    assert!(status.success(), "ferrite exited with {status}");
    assert!(!sock.exists(), "socket file left behind");
}

/// Waits (within the watchdog) for a console line starting with `prefix`.
fn wait_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, prefix: &str) -> String {
    loop {
        match rx.recv_timeout(WATCHDOG) {
            Ok(l) => {
                let l = l.trim_end_matches('\r').to_string();
                seen.push(l.clone());
                if l.starts_with(prefix) {
                    return l;
                }
            }
            Err(_) => panic!("no {prefix:?} line: {seen:?}"),
        }
    }
}

/// The `ms=` field of a guest answer.
fn ms_of(line: &str) -> u64 {
    line.split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ms= in {line:?}"))
}

#[test]
fn test_control_socket_rng_limit_set_and_lifted_while_running() {
    // Arrange: an unlimited rng; commands are typed on the console after boot.
    common::require_kvm();
    let sock = std::env::temp_dir().join(format!("ferrite-ctl-rng-{}.sock", std::process::id()));
    let kernel = common::asset("testguest.elf");
    let mut child = Command::new(common::ferrite_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", "128M", "--cmdline", "cmds=\"rng 64\"", "--rng"])
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferrite");
    let rx = common::stdout_lines(&mut child);
    let mut seen = Vec::new();
    wait_line(&rx, &mut seen, "OK rng");
    let mut conn = BufReader::new(UnixStream::connect(&sock).expect("connect api socket"));
    let type_line = |child: &mut std::process::Child, l: &str| {
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(l.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
    };

    // Act: limit to 32 KiB/s and read 64 KiB (about 1 s: a full bucket, then 32 KiB more);
    // lift the limit and read 64 KiB again.
    let set = request(
        &mut conn,
        r#"{"op":"rate-limit","device":"rng","bytes_per_s":32768}"#,
    );
    let info = request(&mut conn, r#"{"op":"info"}"#);
    type_line(&mut child, "rng 65536");
    let limited = wait_line(&rx, &mut seen, "OK rng");
    let lifted = request(
        &mut conn,
        r#"{"op":"rate-limit","device":"rng","bytes_per_s":0}"#,
    );
    type_line(&mut child, "rng 65536");
    let unlimited = wait_line(&rx, &mut seen, "OK rng");
    type_line(&mut child, "poweroff");
    let status = child.wait().unwrap();

    // Assert
    assert_eq!(set["ok"], true, "{set}");
    assert_eq!(
        info["rate_limits"]["rng"]["bandwidth"]["size"], 32768,
        "{info}"
    );
    assert_eq!(lifted["ok"], true, "{lifted}");
    let (limited_ms, unlimited_ms) = (ms_of(&limited), ms_of(&unlimited));
    assert!(
        (500..=3000).contains(&limited_ms),
        "64 KiB at 32 KiB/s with a full bucket should take about 1000 ms: {limited}"
    );
    assert!(
        unlimited_ms * 2 < limited_ms,
        "lifting the limit did not speed reads up: {limited} / {unlimited}"
    );
    assert!(status.success(), "ferrite exited with {status}");
}
