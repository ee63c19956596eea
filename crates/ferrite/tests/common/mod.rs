//! Shared helpers for tests that boot real guests with the `ferrite` binary.
//!
//! Assets come from `$FERRITE_ASSETS` (set by `.ci/run`) or `<repo>/assets`, built by
//! `scripts/guest-assets.sh`. A test that needs KVM or an asset fails loudly when it is missing.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod netns;
/// The test guest's own disk pattern and checksum code, compiled into the host tests too so
/// both sides always agree (one source, no copy).
#[path = "../../../../testguest/src/pattern.rs"]
pub mod pattern;
pub mod stream;

/// Fail the test (never skip) when `/dev/kvm` is unusable.
pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok,
        "/dev/kvm is missing or not accessible: these tests boot real guests and need KVM"
    );
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory holding guest assets.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("FERRITE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("assets"))
}

/// Path of one asset; panics with the fix if it is missing.
pub fn asset(name: &str) -> PathBuf {
    let path = assets_dir().join(name);
    assert!(
        path.exists(),
        "guest asset {} is missing: run `scripts/guest-assets.sh {}`",
        path.display(),
        assets_dir().display()
    );
    path
}

/// The `ferrite` binary built for this test run.
pub fn ferrite_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrite"))
}

/// What a finished `ferrite` process left behind.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit code (None if killed by a signal or by the watchdog).
    pub code: Option<i32>,
    /// Everything the guest and Ferrite printed on stdout (the serial console).
    pub stdout: String,
    /// Ferrite's own diagnostics.
    pub stderr: String,
    /// True if the watchdog had to kill the process.
    pub timed_out: bool,
    /// Wall-clock run time.
    pub elapsed: Duration,
}

/// Spawn `ferrite` with `args`, no stdin and both output streams piped; every runner starts so.
pub fn spawn_ferrite(args: &[&str]) -> Child {
    Command::new(ferrite_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrite")
}

/// Run `ferrite` with `args` and no stdin, killing it after `timeout`.
pub fn run_ferrite(args: &[&str], timeout: Duration) -> RunOutput {
    require_kvm();
    let start = Instant::now();
    let mut child = spawn_ferrite(args);
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait ferrite") {
            break status;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait killed ferrite");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_thread.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_thread.join().unwrap_or_default()).into_owned();
    RunOutput {
        code: status.code(),
        stdout,
        stderr,
        timed_out,
        elapsed: start.elapsed(),
    }
}

/// The child's stdout as a channel of lines (`\r` trimmed), read by a thread until EOF.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    rx
}
