//! Errors of the benchmark harness.

use std::time::Duration;

/// Everything that can go wrong while benchmarking one VMM.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The guest printed an `ERR` answer (or another unexpected answer) to a command.
    #[error("Guest refused command `{cmd}`: {line}")]
    CommandRefused { cmd: String, line: String },
    /// The child exited before it printed what we waited for.
    #[error("VMM exited ({status}) before {waiting_for}; stderr: {stderr}")]
    EarlyExit {
        status: String,
        waiting_for: String,
        stderr: String,
    },
    /// An answer line could not be parsed.
    #[error("Malformed guest answer: {0}")]
    MalformedAnswer(String),
    /// The guest RAM mapping was not found in `/proc/PID/smaps`.
    #[error("No mapping of the guest RAM size ({0} bytes) in smaps")]
    NoGuestRamMapping(u64),
    /// Opening a pidfd for the child failed.
    #[error("pidfd_open failed")]
    PidfdOpen(#[source] std::io::Error),
    /// `/proc/PID/smaps` could not be read.
    #[error("Cannot read /proc/{pid}/smaps")]
    ReadSmaps {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// The VMM binary could not be started.
    #[error("Cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A watchdog deadline passed.
    #[error("Timed out after {after:?} waiting for {waiting_for}; stderr: {stderr}")]
    Timeout {
        after: Duration,
        waiting_for: String,
        stderr: String,
    },
    /// A benchmark disk image could not be prepared.
    #[error("Cannot prepare {0}")]
    Prepare(std::path::PathBuf, #[source] std::io::Error),
    /// A helper tool (qemu-img, fio) failed.
    #[error("{tool} failed: {message}")]
    Tool { tool: String, message: String },
    /// The scenario is not run by this runner.
    #[error("Scenario {0} runs separately")]
    Unsupported(&'static str),
    /// Writing the JSON report failed.
    #[error("Cannot write JSON")]
    Json(#[source] serde_json::Error),
}

/// Result alias of the harness.
pub type Result<T> = std::result::Result<T, BenchError>;
