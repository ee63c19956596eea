//! Helpers for the tests that boot the Ferrite test guest (`testguest.elf`, see
//! docs/testguest.md): run it with a command list, find its answer lines, scratch disks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::common::{self, pattern, RunOutput};

pub mod control;
pub mod migrate;
pub mod vsock;

/// Marker the guest prints once it takes commands.
pub const READY: &str = "FERRITE-TESTGUEST READY";

/// Watchdog for one guest run (a hang guard, not a performance threshold).
pub const WATCHDOG: Duration = Duration::from_secs(120);

/// How to start one test-guest VM.
pub struct GuestRun<'a> {
    /// `--cpus`.
    pub cpus: u32,
    /// `--memory`.
    pub memory: &'a str,
    /// `--disk` values (`PATH[,readonly][,id=SERIAL]`).
    pub disks: Vec<String>,
    /// Commands, joined with `;` into `cmds="..."`.
    pub cmds: &'a [&'a str],
    /// Extra `ferrite run` flags.
    pub extra: &'a [&'a str],
}

impl<'a> GuestRun<'a> {
    /// 1 vCPU, 128 MiB, no disks, no commands.
    pub fn new(cmds: &'a [&'a str]) -> Self {
        GuestRun {
            cpus: 1,
            memory: "128M",
            disks: Vec::new(),
            cmds,
            extra: &[],
        }
    }

    /// Boots the guest and waits for `ferrite` to exit (or the watchdog).
    pub fn run(&self) -> Guest {
        let kernel = common::asset("testguest.elf");
        let cmdline = format!("cmds=\"{}\"", self.cmds.join(";"));
        let cpus = self.cpus.to_string();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--cpus".into(),
            cpus,
            "--memory".into(),
            self.memory.into(),
            "--cmdline".into(),
            cmdline,
        ];
        for d in &self.disks {
            args.push("--disk".into());
            args.push(d.clone());
        }
        args.extend(self.extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        Guest {
            out: common::run_ferrite(&argv, WATCHDOG),
        }
    }
}

/// A finished guest run and its console.
pub struct Guest {
    /// What `ferrite` left behind.
    pub out: RunOutput,
}

impl Guest {
    /// Console lines without line endings.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.out.stdout.lines().map(|l| l.trim_end_matches('\r'))
    }

    /// Console and stderr for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "exit code {:?}, timed out {}\n--- console ---\n{}\n--- ferrite stderr ---\n{}",
            self.out.code, self.out.timed_out, self.out.stdout, self.out.stderr
        )
    }

    /// Asserts the guest booted, reached READY and never reported a crash.
    pub fn assert_healthy(&self) {
        assert!(
            !self.out.timed_out,
            "ferrite did not exit in time: {}",
            self.context()
        );
        assert!(
            self.lines().any(|l| l == READY),
            "no READY line: {}",
            self.context()
        );
        assert!(
            !self
                .lines()
                .any(|l| l.contains("FERRITE-TESTGUEST FATAL")
                    || l.contains("FERRITE-TESTGUEST PANIC")),
            "the guest crashed: {}",
            self.context()
        );
    }

    /// Asserts the run ended with `poweroff` (exit status 0).
    pub fn assert_powered_off(&self) {
        self.assert_healthy();
        assert!(
            self.lines().any(|l| l == "OK poweroff"),
            "no OK poweroff: {}",
            self.context()
        );
        assert_eq!(
            self.out.code,
            Some(0),
            "poweroff must exit with 0: {}",
            self.context()
        );
    }

    /// The answer lines (`OK `/`ERR `) in order.
    pub fn answers(&self) -> Vec<&str> {
        self.lines()
            .filter(|l| l.starts_with("OK ") || l.starts_with("ERR "))
            .collect()
    }

    /// The `n`-th (0-based) answer line for `cmd`, panicking with context if absent.
    pub fn answer(&self, cmd: &str, n: usize) -> &str {
        let ok = format!("OK {cmd} ");
        let ok_bare = format!("OK {cmd}");
        let err = format!("ERR {cmd} ");
        self.lines()
            .filter(|l| l.starts_with(&ok) || *l == ok_bare || l.starts_with(&err))
            .nth(n)
            .unwrap_or_else(|| panic!("no answer #{n} for {cmd:?}: {}", self.context()))
    }

    /// The `n`-th answer for `cmd`, which must be `OK`.
    pub fn ok(&self, cmd: &str, n: usize) -> &str {
        let line = self.answer(cmd, n);
        assert!(
            line.starts_with("OK "),
            "{cmd:?} #{n} failed: {line}\n{}",
            self.context()
        );
        line
    }

    /// The `n`-th answer for `cmd`, which must be `ERR`.
    pub fn err(&self, cmd: &str, n: usize) -> &str {
        let line = self.answer(cmd, n);
        assert!(
            line.starts_with("ERR "),
            "{cmd:?} #{n} should fail: {line}\n{}",
            self.context()
        );
        line
    }

    /// Detail lines starting with `prefix ` (e.g. "pci", "blk").
    pub fn details(&self, prefix: &str) -> Vec<&str> {
        let p = format!("{prefix} ");
        self.lines().filter(|l| l.starts_with(&p)).collect()
    }
}

/// The value of `key=` in an answer line.
pub fn value<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    let k = format!("{key}=");
    line.split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(k.as_str()))
}

/// The value of `key=` parsed as a number (decimal, or hex with `0x`).
pub fn num(line: &str, key: &str) -> u64 {
    let v = value(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    }
    .unwrap_or_else(|e| panic!("bad {key}={v} in {line:?}: {e}"))
}

/// A sparse or pre-filled disk image in the temp directory, removed on drop.
pub struct ScratchDisk {
    path: PathBuf,
}

static SCRATCH_SEQ: AtomicU32 = AtomicU32::new(0);

impl ScratchDisk {
    /// A zero-filled (sparse) image of `bytes`.
    pub fn zeroed(name: &str, bytes: u64) -> Self {
        let seq = SCRATCH_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "ferrite-testguest-{}-{seq}-{name}.img",
            std::process::id()
        ));
        let f = std::fs::File::create(&path).expect("create scratch disk");
        f.set_len(bytes).expect("size scratch disk");
        ScratchDisk { path }
    }

    /// An image of `bytes` holding the test pattern of `seed` in every sector.
    pub fn with_pattern(name: &str, bytes: u64, seed: u64) -> Self {
        let disk = Self::zeroed(name, bytes);
        let data = pattern_bytes(seed, 0, bytes / pattern::SECTOR_SIZE as u64);
        std::fs::write(&disk.path, data).expect("write scratch disk");
        disk
    }

    /// Path of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path as a string, for `--disk`.
    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }

    /// The image's bytes.
    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read scratch disk")
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The bytes the guest's `blk-write D SECTOR COUNT SEED` writes.
pub fn pattern_bytes(seed: u64, sector: u64, count: u64) -> Vec<u8> {
    let mut out = vec![0u8; (count as usize) * pattern::SECTOR_SIZE];
    for (k, chunk) in out.chunks_exact_mut(pattern::SECTOR_SIZE).enumerate() {
        pattern::fill_sector(seed, sector + k as u64, chunk);
    }
    out
}

/// FNV-1a 64 of `bytes`, as printed by `blk-sum` (16 lowercase hex digits).
pub fn fnv_hex(bytes: &[u8]) -> String {
    format!("{:016x}", pattern::fnv1a64(pattern::FNV_OFFSET, bytes))
}

/// Pseudo input line for [`run_interactive`]: send nothing more until the guest prints
/// READY again (after a reboot).
pub const WAIT_READY: &str = "@wait-ready";

/// Boots the guest with no `cmds=`, waits for READY, then types `input` lines on its serial
/// console (ferrite's stdin), the next line after each answer (blank lines go out together
/// with the following line, since they get no answer; [`WAIT_READY`] waits for the next
/// READY line), and waits for the exit.
pub fn run_interactive<L: AsRef<[u8]>>(cpus: u32, input: &[L]) -> Guest {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Instant;

    common::require_kvm();
    let kernel = common::asset("testguest.elf");
    let start = Instant::now();
    let mut child = Command::new(common::ferrite_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args([
            "--cpus",
            &cpus.to_string(),
            "--memory",
            "128M",
            "--cmdline",
            "console=ttyS0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrite");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut console = String::new();
    let mut pending = input.iter();
    let mut timed_out = false;
    let mut wait_ready = false;
    loop {
        let Some(left) = WATCHDOG.checked_sub(start.elapsed()) else {
            timed_out = true;
            break;
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                let text = line.trim_end_matches('\r').to_string();
                console.push_str(&text);
                console.push('\n');
                let answered = text == READY || text.starts_with("OK ") || text.starts_with("ERR ");
                let trigger = if wait_ready { text == READY } else { answered };
                if trigger {
                    wait_ready = false;
                    // Blank lines get no answer: send them together with the next line.
                    for next in pending.by_ref() {
                        let next = next.as_ref();
                        if next == WAIT_READY.as_bytes() {
                            wait_ready = true;
                            break;
                        }
                        let _ = stdin.write_all(next);
                        let _ = stdin.write_all(b"\r\n");
                        let _ = stdin.flush();
                        if !next.iter().all(u8::is_ascii_whitespace) {
                            break;
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        let _ = child.kill();
    }
    drop(stdin);
    let status = child.wait().expect("wait ferrite");
    let _ = reader.join();
    let stderr = err_thread.join().unwrap_or_default();
    Guest {
        out: RunOutput {
            code: status.code(),
            stdout: console,
            stderr,
            timed_out,
            elapsed: start.elapsed(),
        },
    }
}
