//! Streaming runs of `ferrite`: watch the serial console line by line as it arrives, stop as
//! soon as a wanted line appears or a time budget runs out, and keep when each line came.
//!
//! Slow guests (Linux under emulation) need this: a test bounds its run with a budget and
//! then asserts on what the guest printed by then, and the arrival times are the boot profile.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{require_kvm, spawn_ferrite, RunOutput};

/// One console line (without its line ending) and when it arrived after `ferrite` started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedLine {
    /// Time since the process was spawned.
    pub at: Duration,
    /// The line's text, `\r` and `\n` removed.
    pub text: String,
}

/// Why a streaming run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `ferrite` exited (or closed its console) by itself.
    Exited,
    /// The stop predicate matched this line; the process was then killed.
    LineSeen(String),
    /// The budget ran out; the process was then killed.
    Budget,
}

/// Everything a streaming run collected.
#[derive(Debug)]
pub struct StreamedRun {
    /// Exit code, stdout (all lines joined), stderr, elapsed; `timed_out` means the budget ran out.
    pub output: RunOutput,
    /// Console lines with their arrival times, in order.
    pub lines: Vec<TimedLine>,
    /// Why the run ended.
    pub stop: StopReason,
}

impl StreamedRun {
    /// The first console line containing `needle`.
    pub fn first(&self, needle: &str) -> Option<&TimedLine> {
        self.lines.iter().find(|line| line.text.contains(needle))
    }

    /// All console lines containing `needle`, in order.
    pub fn all<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = &'a TimedLine> + 'a {
        self.lines
            .iter()
            .filter(move |line| line.text.contains(needle))
    }

    /// The last `n` console lines, one per line, for assertion messages.
    pub fn tail(&self, n: usize) -> String {
        let start = self.lines.len().saturating_sub(n);
        self.lines[start..]
            .iter()
            .map(|line| format!("[{:7.1}s] {}", line.at.as_secs_f64(), line.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// True when console lines should be echoed to the test's stderr as they arrive
/// (`FERRITE_TEST_ECHO=1`; `scripts/test.sh` sets it for the long Linux tests).
fn echo_enabled() -> bool {
    std::env::var_os("FERRITE_TEST_ECHO").is_some_and(|v| v == "1")
}

/// Run `ferrite` with `args` and no stdin; stop when `stop_on` returns true for a console
/// line, when the process exits, or when `budget` runs out, whichever comes first.
pub fn run_ferrite_until(
    args: &[&str],
    budget: Duration,
    mut stop_on: impl FnMut(&str) -> bool,
) -> StreamedRun {
    require_kvm();
    let echo = echo_enabled();
    let start = Instant::now();
    let mut child = spawn_ferrite(args);
    let out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<TimedLine>();
    let out_thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    let line = TimedLine {
                        at: start.elapsed(),
                        text,
                    };
                    if echo {
                        eprintln!("[{:7.1}s] {}", line.at.as_secs_f64(), line.text);
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });

    let mut lines = Vec::new();
    let stop = loop {
        let remaining = budget.saturating_sub(start.elapsed());
        if remaining.is_zero() {
            break StopReason::Budget;
        }
        match rx.recv_timeout(remaining.min(Duration::from_millis(200))) {
            Ok(line) => {
                let hit = stop_on(&line.text);
                let text = line.text.clone();
                lines.push(line);
                if hit {
                    break StopReason::LineSeen(text);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break StopReason::Exited,
        }
    };

    // After the console closed, give the process the rest of the budget to exit by itself.
    let mut stop = stop;
    let status = loop {
        if stop != StopReason::Exited {
            let _ = child.kill();
            break child.wait().expect("wait killed ferrite");
        }
        if let Some(status) = child.try_wait().expect("wait ferrite") {
            break status;
        }
        if start.elapsed() >= budget {
            stop = StopReason::Budget;
            continue;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let _ = out_thread.join();
    lines.extend(rx.try_iter());
    let stderr = String::from_utf8_lossy(&err_thread.join().unwrap_or_default()).into_owned();
    let stdout = lines
        .iter()
        .map(|line| line.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    StreamedRun {
        output: RunOutput {
            code: status.code(),
            stdout,
            stderr,
            timed_out: stop == StopReason::Budget,
            elapsed,
        },
        lines,
        stop,
    }
}
