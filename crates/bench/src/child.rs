//! One VMM child process: spawned with a hard watchdog, its console read unbuffered into
//! timestamped lines, and always killed when the harness is done with it (or dies).

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// Keep at most this much of a child's stderr for error messages.
const STDERR_KEEP: usize = 2048;

/// The program and arguments that start one VMM with one guest.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Executable to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

impl CommandSpec {
    /// The command as a shell-like line, for reports.
    pub fn display(&self) -> String {
        let mut out = self.program.display().to_string();
        for arg in &self.args {
            out.push(' ');
            if arg.is_empty() {
                out.push_str("''");
            } else if arg.contains([' ', '"', ';']) {
                out.push('\'');
                out.push_str(arg);
                out.push('\'');
            } else {
                out.push_str(arg);
            }
        }
        out
    }
}

/// One complete console line and when its last byte arrived.
#[derive(Debug, Clone)]
pub struct Line {
    /// Arrival time of the chunk that completed the line.
    pub at: Instant,
    /// The line without its `\r\n`.
    pub text: String,
}

/// How the child ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// When the process became a zombie (pidfd readable).
    pub at: Instant,
    /// Human-readable wait status.
    pub status: String,
    /// True if the watchdog or the harness killed it.
    pub killed: bool,
}

enum Event {
    Chunk(Instant, Vec<u8>),
    Eof,
    Exited(Exit),
}

/// A running VMM whose serial console is the child's stdout.
pub struct VmmProcess {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    start: Instant,
    events: Receiver<Event>,
    partial: Vec<u8>,
    lines: VecDeque<Line>,
    first_byte: Option<Instant>,
    eof: bool,
    exit: Option<Exit>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Closed (disconnected) by the stderr reader once it has read everything the VMM wrote.
    stderr_done: Option<Receiver<()>>,
}

/// How long an exited VMM's stderr may take to drain before its tail is reported anyway
/// (a grandchild could keep the pipe open).
const STDERR_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

impl VmmProcess {
    /// Start `spec`; the watchdog SIGKILLs it `hard_timeout` after spawn whatever happens.
    pub fn spawn(spec: &CommandSpec, hard_timeout: Duration) -> Result<Self> {
        Self::spawn_inner(spec, hard_timeout, false).map(|(p, _)| p)
    }

    /// Like [`VmmProcess::spawn`], with the VMM's stdin (the guest's console input) a pipe
    /// whose write end is returned.
    pub fn spawn_with_stdin(
        spec: &CommandSpec,
        hard_timeout: Duration,
    ) -> Result<(Self, std::process::ChildStdin)> {
        let (p, stdin) = Self::spawn_inner(spec, hard_timeout, true)?;
        match stdin {
            Some(stdin) => Ok((p, stdin)),
            None => Err(BenchError::Spawn {
                program: spec.program.display().to_string(),
                source: std::io::Error::other("no stdin pipe"),
            }),
        }
    }

    fn spawn_inner(
        spec: &CommandSpec,
        hard_timeout: Duration,
        pipe_stdin: bool,
    ) -> Result<(Self, Option<std::process::ChildStdin>)> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(if pipe_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it makes the kernel SIGKILL the VMM if we die.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
            program: spec.program.display().to_string(),
            source,
        })?;
        let pid = child.id();
        // Nobody reaps the child but our watchdog thread, so the pid is still ours here.
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let stdin = child.stdin.take();
        let (tx, events) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            spawn_stdout_reader(out, tx.clone());
        }
        let stderr_done = child
            .stderr
            .take()
            .map(|err| spawn_stderr_reader(err, Arc::clone(&stderr)));
        // The std handle is dropped without waiting: the watchdog thread reaps the pid.
        drop(child);
        spawn_watchdog(pid, Arc::clone(&pidfd), start + hard_timeout, tx);
        Ok((
            Self {
                pid,
                pidfd,
                start,
                events,
                partial: Vec::new(),
                lines: VecDeque::new(),
                first_byte: None,
                eof: false,
                exit: None,
                stderr,
                stderr_done,
            },
            stdin,
        ))
    }

    /// Process id of the VMM.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Timestamp taken just before spawning.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// When the first console byte arrived, if any has.
    pub fn first_byte(&self) -> Option<Instant> {
        self.first_byte
    }

    /// The tail of what the VMM wrote on stderr.
    pub fn stderr_tail(&self) -> String {
        let buf = self.stderr.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&buf).trim().replace('\n', " | ")
    }

    /// The whole stderr tail of a VMM that has exited, once its stderr is drained (bounded
    /// wait); call after [`VmmProcess::wait_exit`] returned.
    pub fn stderr_after_exit(&mut self) -> String {
        if let Some(done) = self.stderr_done.take() {
            let _ = done.recv_timeout(STDERR_DRAIN_TIMEOUT);
        }
        self.stderr_tail()
    }

    /// The next complete console line, waiting at most until `deadline`.
    pub fn next_line(&mut self, deadline: Instant, waiting_for: &str) -> Result<Line> {
        loop {
            if let Some(line) = self.lines.pop_front() {
                return Ok(line);
            }
            if self.eof && self.exit.is_some() {
                self.flush_partial();
                if let Some(line) = self.lines.pop_front() {
                    return Ok(line);
                }
                let status = self
                    .exit
                    .as_ref()
                    .map(|e| e.status.clone())
                    .unwrap_or_default();
                // The VMM has exited: let its last words reach us before quoting them.
                if let Some(done) = self.stderr_done.take() {
                    let _ = done.recv_timeout(STDERR_DRAIN_TIMEOUT);
                }
                return Err(BenchError::EarlyExit {
                    status,
                    waiting_for: waiting_for.to_string(),
                    stderr: self.stderr_tail(),
                });
            }
            self.pump(deadline, waiting_for)?;
        }
    }

    /// Skip lines until one satisfies `pred`; return it and the arrival time of the line before it.
    pub fn wait_line(
        &mut self,
        deadline: Instant,
        waiting_for: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<(Line, Option<Instant>)> {
        let mut previous = None;
        loop {
            let line = self.next_line(deadline, waiting_for)?;
            if pred(&line.text) {
                return Ok((line, previous));
            }
            previous = Some(line.at);
        }
    }

    /// Wait for the process to end on its own; `None` if it is still running at `deadline`.
    pub fn wait_exit(&mut self, deadline: Instant) -> Option<Exit> {
        while self.exit.is_none() {
            if self.pump(deadline, "exit").is_err() {
                return None;
            }
        }
        self.exit.clone()
    }

    /// SIGKILL the VMM and wait (bounded) until it is gone.
    pub fn kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        pidfd_kill(self.pidfd.as_raw_fd());
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.exit.is_none() && Instant::now() < deadline {
            let _ = self.pump(deadline, "exit after kill");
        }
    }

    fn pump(&mut self, deadline: Instant, waiting_for: &str) -> Result<()> {
        let now = Instant::now();
        let timeout = deadline.saturating_duration_since(now);
        match self.events.recv_timeout(timeout) {
            Ok(Event::Chunk(at, bytes)) => {
                self.first_byte.get_or_insert(at);
                self.push_bytes(at, &bytes);
                Ok(())
            }
            Ok(Event::Eof) => {
                self.eof = true;
                Ok(())
            }
            Ok(Event::Exited(exit)) => {
                self.exit = Some(exit);
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => Err(BenchError::Timeout {
                after: deadline.saturating_duration_since(self.start),
                waiting_for: waiting_for.to_string(),
                stderr: self.stderr_tail(),
            }),
            Err(RecvTimeoutError::Disconnected) => {
                // All senders are gone: stdout closed and the watchdog reaped the child.
                self.eof = true;
                if self.exit.is_none() {
                    self.exit = Some(Exit {
                        at: Instant::now(),
                        status: "unknown".to_string(),
                        killed: false,
                    });
                }
                Ok(())
            }
        }
    }

    fn push_bytes(&mut self, at: Instant, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                self.lines.push_back(Line { at, text });
            } else {
                self.partial.push(b);
            }
        }
    }

    fn flush_partial(&mut self) {
        if !self.partial.is_empty() {
            let text = String::from_utf8_lossy(&self.partial)
                .trim_end()
                .to_string();
            self.partial.clear();
            let at = self
                .exit
                .as_ref()
                .map(|e| e.at)
                .unwrap_or_else(Instant::now);
            self.lines.push_back(Line { at, text });
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_stdout_reader(mut out: std::process::ChildStdout, tx: Sender<Event>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let at = Instant::now();
                    if tx.send(Event::Chunk(at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = tx.send(Event::Eof);
    });
}

/// Collect the VMM's stderr tail; the returned receiver disconnects once stderr is drained.
fn spawn_stderr_reader(
    mut err: std::process::ChildStderr,
    keep: Arc<Mutex<Vec<u8>>>,
) -> Receiver<()> {
    let (done_tx, done) = mpsc::channel::<()>();
    thread::spawn(move || {
        let _done_tx = done_tx;
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut kept) = keep.lock() {
                kept.extend_from_slice(&buf[..n]);
                let excess = kept.len().saturating_sub(STDERR_KEEP);
                kept.drain(..excess);
            }
        }
    });
    done
}

/// Waits for the child to exit, kills it at `deadline`, reaps it and reports the exit.
fn spawn_watchdog(pid: u32, pidfd: Arc<OwnedFd>, deadline: Instant, tx: Sender<Event>) {
    thread::spawn(move || {
        let mut killed = false;
        let at = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && !killed {
                pidfd_kill(pidfd.as_raw_fd());
                killed = true;
            }
            let timeout_ms = if killed {
                1000
            } else {
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            };
            if poll_readable(pidfd.as_raw_fd(), timeout_ms) {
                break Instant::now();
            }
        };
        let status = reap(pid);
        let _ = tx.send(Event::Exited(Exit { at, status, killed }));
    });
}

fn pidfd_open(pid: u32) -> Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| BenchError::PidfdOpen(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(BenchError::PidfdOpen(std::io::Error::last_os_error()));
    }
    let fd = RawFd::try_from(fd)
        .map_err(|_| BenchError::PidfdOpen(std::io::Error::from_raw_os_error(libc::EBADF)))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_kill(pidfd: RawFd) {
    // SAFETY: pidfd_send_signal on a pidfd we own; a null siginfo is allowed. Signalling
    // through the pidfd cannot hit a recycled pid. Errors (already exited) are ignored.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length 1 living across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && (pfd.revents & libc::POLLIN) != 0
}

fn reap(pid: u32) -> String {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return "unknown".to_string();
    };
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid pointer to a c_int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return "unknown".to_string();
        }
    }
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> CommandSpec {
        CommandSpec {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".to_string(), script.to_string()],
        }
    }

    #[test]
    fn test_vmm_process_lines_in_order_then_exit() {
        // Arrange
        let mut p = VmmProcess::spawn(&sh("printf 'a\\r\\nb\\n'; exit 3"), Duration::from_secs(10))
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);

        // Act
        let a = p.next_line(deadline, "a").expect("line a");
        let b = p.next_line(deadline, "b").expect("line b");
        let exit = p.wait_exit(deadline).expect("exit");

        // Assert
        assert_eq!(a.text, "a");
        assert_eq!(b.text, "b");
        assert!(p.first_byte().is_some());
        assert_eq!(exit.status, "exit code 3");
        assert!(!exit.killed);
    }

    #[test]
    fn test_vmm_process_hangs_watchdog_kills() {
        // Arrange
        let mut p =
            VmmProcess::spawn(&sh("exec sleep 100"), Duration::from_millis(200)).expect("spawn");

        // Act
        let exit = p.wait_exit(Instant::now() + Duration::from_secs(10));

        // Assert
        let exit = exit.expect("watchdog ended the child");
        assert!(exit.killed);
        assert_eq!(exit.status, "signal 9");
    }

    #[test]
    fn test_vmm_process_exits_early_next_line_errors() {
        // Arrange
        let mut p =
            VmmProcess::spawn(&sh("echo oops >&2"), Duration::from_secs(10)).expect("spawn");

        // Act
        let r = p.next_line(Instant::now() + Duration::from_secs(10), "READY");

        // Assert
        match r {
            Err(BenchError::EarlyExit { stderr, .. }) => assert_eq!(stderr, "oops"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn test_vmm_process_unterminated_last_line_is_returned() {
        // Arrange
        let mut p = VmmProcess::spawn(&sh("printf tail"), Duration::from_secs(10)).expect("spawn");

        // Act
        let line = p.next_line(Instant::now() + Duration::from_secs(10), "tail");

        // Assert
        assert_eq!(line.expect("line").text, "tail");
    }

    #[test]
    fn test_vmm_process_silent_deadline_times_out() {
        // Arrange
        let mut p =
            VmmProcess::spawn(&sh("exec sleep 100"), Duration::from_secs(30)).expect("spawn");

        // Act
        let r = p.next_line(Instant::now() + Duration::from_millis(100), "READY");
        p.kill();

        // Assert
        assert!(matches!(r, Err(BenchError::Timeout { .. })));
    }

    #[test]
    fn test_command_spec_display_quotes_spaces() {
        // Arrange
        let spec = CommandSpec {
            program: PathBuf::from("/bin/x"),
            args: vec!["-a".into(), "cmds=\"a;b\"".into()],
        };

        // Act
        let s = spec.display();

        // Assert
        assert_eq!(s, "/bin/x -a 'cmds=\"a;b\"'");
    }
}
