//! `ferrite run` on a real terminal: a pseudo-terminal from util-linux `script(1)` stands in for
//! the user's TTY. Raw mode (no local echo, CR passed through) and the Ctrl-A x escape are judged
//! by what appears on the terminal and by the exit status.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long to wait for any one expected line before failing (a watchdog, not a timing check).
const LINE_WAIT: Duration = Duration::from_secs(60);

/// Kills the terminal session (and with it ferrite) if the test fails half-way.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn test_tty_console_is_raw_and_ctrl_a_x_quits_with_status_4() {
    // Arrange: ferrite on a pseudo-terminal, its output read line by line.
    common::require_kvm();
    let command = format!(
        "{} run --kernel {} --memory 256M",
        common::ferrite_bin().display(),
        common::asset("testguest.elf").display()
    );
    let child = Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn script(1) from util-linux");
    let mut session = KillOnDrop(child);
    let mut keys = session.0.stdin.take().expect("stdin");
    let stdout = session.0.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.trim_end_matches('\r').to_string());
        }
    });
    let mut seen = Vec::new();
    let wait_for = |needle: &str, seen: &mut Vec<String>| loop {
        match lines.recv_timeout(LINE_WAIT) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no line with {needle:?} on the terminal; saw {seen:#?}"),
        }
    };
    wait_for("FERRITE-TESTGUEST READY", &mut seen);

    // Act: type a command ended by CR (Enter in raw mode), then the escape sequence.
    keys.write_all(b"cpus\r").expect("type cpus");
    keys.flush().expect("flush");
    wait_for("OK cpus", &mut seen);
    keys.write_all(b"\x01x").expect("type Ctrl-A x");
    keys.flush().expect("flush");
    wait_for("stopped from the console", &mut seen);
    let status = session.0.wait().expect("wait for script(1)");

    // Assert
    assert_eq!(
        status.code(),
        Some(4),
        "Ctrl-A x must stop the VM with status 4: {seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("OK cpus madt=1 started=1")),
        "the guest must receive the typed command through the raw terminal: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| l == "cpus"),
        "raw mode must not echo typed keys locally: {seen:#?}"
    );
}
