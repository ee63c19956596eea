//! A `ferrite run` of the test guest driven through its control socket (`--api-socket`) and
//! its console, for the control and snapshot tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::WATCHDOG;
use crate::common;

/// A `ferrite run` of the test guest with a control socket, its console lines on a channel.
pub struct Vm {
    /// The `ferrite run` process.
    pub child: Child,
    /// Its control socket.
    pub sock: PathBuf,
    rx: mpsc::Receiver<String>,
    /// Console lines received so far.
    pub seen: Vec<String>,
    conn: Option<BufReader<UnixStream>>,
}

impl Vm {
    /// Boot the test guest (128 MiB) running `cmds`, with a control socket named after `name`.
    pub fn start(name: &str, cmds: &str) -> Vm {
        let mut extra: Vec<String> = Vec::new();
        if !cmds.is_empty() {
            extra.extend(["--cmdline".into(), format!("cmds=\"{cmds}\"")]);
        }
        Vm::boot(name, &extra)
    }

    /// Boot the test guest (128 MiB) with the `ferrite run` flags `extra` (devices,
    /// `--cmdline`), with a control socket named after `name`.
    pub fn boot(name: &str, extra: &[String]) -> Vm {
        let mut args: Vec<String> = vec![
            "--kernel".into(),
            common::asset("testguest.elf").display().to_string(),
            "--memory".into(),
            "128M".into(),
        ];
        args.extend_from_slice(extra);
        Vm::spawn(name, &args)
    }

    /// `ferrite run ARGS --api-socket <socket named after name>`, console on stdin/stdout.
    pub fn spawn(name: &str, args: &[String]) -> Vm {
        Vm::spawn_with_env(name, args, &[])
    }

    /// [`Vm::spawn`] with extra environment variables for the VMM (tuning knobs).
    pub fn spawn_with_env(name: &str, args: &[String], env: &[(&str, &str)]) -> Vm {
        common::require_kvm();
        let sock =
            std::env::temp_dir().join(format!("ferrite-tgctl-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut child = Command::new(common::ferrite_bin())
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .arg("--api-socket")
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrite");
        let rx = common::stdout_lines(&mut child);
        Vm {
            child,
            sock,
            rx,
            seen: Vec::new(),
            conn: None,
        }
    }

    /// Type `line` and Enter on the guest's console.
    pub fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\r").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits (within the watchdog) for a console line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        self.wait_any(&[prefix])
    }

    /// Waits (within the watchdog) for a console line starting with any of `prefixes` (e.g. a
    /// command's `OK` and `ERR` answers).
    pub fn wait_any(&mut self, prefixes: &[&str]) -> String {
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if prefixes.iter().any(|p| l.starts_with(p)) {
                        return l;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let mut stderr = String::new();
                    if let Some(mut err) = self.child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                    }
                    panic!(
                        "no {prefixes:?} line: {:?}\nVMM stderr:\n{stderr}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Console lines that arrive within `d`.
    pub fn lines_within(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(l) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(l.clone());
            got.push(l);
        }
        got
    }

    pub fn request(&mut self, line: &str) -> serde_json::Value {
        let sock = &self.sock;
        let conn = self
            .conn
            .get_or_insert_with(|| BufReader::new(connect_when_up(sock)));
        conn.get_mut().write_all(line.as_bytes()).unwrap();
        conn.get_mut().write_all(b"\n").unwrap();
        let mut reply = String::new();
        conn.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    /// Waits for ferrite to exit (within `limit`), killing it otherwise.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ferrite did not exit within {limit:?}: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Connect to a control socket, waiting (within the watchdog) for a just-spawned VMM to
/// create it.
fn connect_when_up(sock: &std::path::Path) -> UnixStream {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connect api socket {}: {e}", sock.display()),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
