//! The test guest's virtio-console (hvc0) driver against Ferrite's virtio-console: guest
//! output reaches the host file or socket client, host input over the socket reaches the
//! guest (which echoes it back and reports it on the serial console).

mod common;
mod testguest_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use testguest_common::{num, GuestRun, WATCHDOG};

fn temp_path(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ferrite-vcon-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn test_vconsole_guest_line_appears_in_host_file() {
    // Arrange
    let out = temp_path("out.txt");
    let spec = format!("file:{}", out.display());
    let extra = ["--virtio-console", spec.as_str()];
    let cmds = ["vcon", "vcon-write hello from hvc0", "poweroff"];

    // Act
    let guest = GuestRun {
        extra: &extra,
        ..GuestRun::new(&cmds)
    }
    .run();

    // Assert
    guest.assert_powered_off();
    let info = guest.ok("vcon", 0);
    assert_eq!((num(info, "cols"), num(info, "rows")), (80, 24), "{info}");
    assert_eq!(num(guest.ok("vcon-write", 0), "bytes"), 16);
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(text, "hello from hvc0\n");
}

/// Reads `ferrite`'s stdout lines into a channel.
fn line_pump(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a console line starting with `prefix`, collecting everything seen.
fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.starts_with(prefix);
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no {prefix:?} line; console so far:\n{}", seen.join("\n")),
        }
    }
}

#[test]
fn test_vconsole_socket_output_buffered_then_host_input_echoed() {
    // Arrange
    common::require_kvm();
    let sock = temp_path("con.sock");
    let spec = format!("socket:{}", sock.display());
    let kernel = common::asset("testguest.elf").display().to_string();
    let cmdline = "cmds=\"vcon-write early bird;vcon-echo 2;poweroff\"";
    let mut child = common::spawn_ferrite(&[
        "run",
        "--kernel",
        &kernel,
        "--memory",
        "128M",
        "--virtio-console",
        &spec,
        "--cmdline",
        cmdline,
    ]);
    let lines = line_pump(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let mut seen = Vec::new();

    // Act: connect only after the guest wrote, so its output waited in the device.
    wait_line(&lines, "OK vcon-write", &mut seen);
    let mut client = UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(WATCHDOG)).unwrap();
    let mut early = [0u8; 11];
    client.read_exact(&mut early).unwrap();
    client.write_all(b"ping from host\r\nsecond").unwrap();
    client.write_all(b" line\n").unwrap();
    let mut echo = [0u8; 27];
    client.read_exact(&mut echo).unwrap();
    wait_line(&lines, "OK poweroff", &mut seen);
    let code = wait_exit(&mut child, &seen);

    // Assert
    assert_eq!(&early, b"early bird\n");
    assert_eq!(&echo, b"ping from host\nsecond line\n");
    let console = seen.join("\n");
    assert!(
        seen.iter().any(|l| l == "vcon-line 0 ping from host"),
        "{console}"
    );
    assert!(
        seen.iter().any(|l| l == "vcon-line 1 second line"),
        "{console}"
    );
    assert!(
        seen.iter().any(|l| l == "OK vcon-echo lines=2 bytes=27"),
        "{console}"
    );
    assert_eq!(code, Some(0), "{console}");
    assert!(!sock.exists(), "the socket file must be removed at exit");
}

/// Waits for the process to exit (hang guard only) and returns its exit code.
fn wait_exit(child: &mut std::process::Child, seen: &[String]) -> Option<i32> {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ferrite did not exit; console:\n{}", seen.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_vconsole_pty_path_is_printed_and_carries_both_directions() {
    // Arrange
    common::require_kvm();
    let kernel = common::asset("testguest.elf").display().to_string();
    let cmdline = "cmds=\"vcon-write via pty;vcon-echo 1;poweroff\"";
    let mut child = common::spawn_ferrite(&[
        "run",
        "--kernel",
        &kernel,
        "--memory",
        "128M",
        "--virtio-console",
        "pty",
        "--cmdline",
        cmdline,
    ]);
    let lines = line_pump(child.stdout.take().unwrap());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut path = None;
    let mut stderr_seen = String::new();
    while path.is_none() {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("no pty announcement on stderr: {stderr_seen}");
        }
        path = line
            .trim()
            .strip_prefix("ferrite: virtio-console (hvc0) on ")
            .map(str::to_string);
        stderr_seen.push_str(&line);
    }
    let path = path.unwrap();
    // Keep draining stderr so ferrite never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let mut seen = Vec::new();

    // Act
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut first = [0u8; 8];
    pty.read_exact(&mut first).unwrap();
    pty.write_all(b"typed\n").unwrap();
    let mut echo = [0u8; 6];
    pty.read_exact(&mut echo).unwrap();
    wait_line(&lines, "OK poweroff", &mut seen);
    let code = wait_exit(&mut child, &seen);

    // Assert
    assert_eq!(&first, b"via pty\n");
    assert_eq!(&echo, b"typed\n");
    assert!(
        seen.iter().any(|l| l == "vcon-line 0 typed"),
        "{}",
        seen.join("\n")
    );
    assert_eq!(code, Some(0), "{}", seen.join("\n"));
}

#[test]
fn test_vconsole_bad_spec_is_refused_before_boot() {
    // Arrange
    let extra = ["--virtio-console", "tty"];
    let cmds = ["poweroff"];

    // Act
    let guest = GuestRun {
        extra: &extra,
        ..GuestRun::new(&cmds)
    }
    .run();

    // Assert
    assert_eq!(guest.out.code, Some(2), "{}", guest.context());
    assert!(
        guest.out.stderr.contains("--virtio-console"),
        "{}",
        guest.context()
    );
}

#[test]
fn test_vconsole_without_device_reports_no_device() {
    // Arrange
    let cmds = ["vcon-write x", "poweroff"];

    // Act
    let guest = GuestRun::new(&cmds).run();

    // Assert
    guest.assert_powered_off();
    assert_eq!(guest.err("vcon-write", 0), "ERR vcon-write no-device");
}
