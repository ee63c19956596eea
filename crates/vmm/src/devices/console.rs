//! virtio-console (hvc0), a second console next to the serial port: configuration, per-run
//! resources and wiring.
//!
//! `--virtio-console file:PATH` appends the guest's output to PATH (no input);
//! `--virtio-console socket:PATH` listens on a Unix socket at PATH, and one host client at a
//! time (`socat - UNIX-CONNECT:PATH`) reads the output and types the input;
//! `--virtio-console pty` allocates a pseudo-terminal and prints its path on stderr.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio::{Console, ConsoleBackend, ConsoleMetrics, ConsoleSize, VirtioPciDevice};

use super::AttachContext;
use crate::config::{ConfigError, VmConfig};
use crate::error::VmmError;

const FLAG: &str = "--virtio-console";
const DEVICE: &str = "virtio-console";
/// Longest path a Unix socket address holds (sun_path minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where the console's host side is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleSink {
    /// Output appended to a file.
    File(PathBuf),
    /// A listening Unix socket.
    Socket(PathBuf),
    /// A new pseudo-terminal.
    Pty,
}

/// `--virtio-console` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// The host side.
    pub sink: ConsoleSink,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            sink: ConsoleSink::Pty,
        }
    }
}

fn device_error(message: impl Into<String>) -> ConfigError {
    ConfigError::Device {
        flag: FLAG,
        message: message.into(),
    }
}

impl ConsoleConfig {
    /// Parse the `--virtio-console` syntax: `file:PATH`, `socket:PATH` or `pty`. The path is
    /// everything after the colon (it may contain commas).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let sink = if let Some(p) = spec.strip_prefix("file:") {
            ConsoleSink::File(PathBuf::from(p))
        } else if let Some(p) = spec.strip_prefix("socket:") {
            ConsoleSink::Socket(PathBuf::from(p))
        } else if spec == "pty" {
            ConsoleSink::Pty
        } else {
            return Err(device_error(format!(
                "unknown value {spec:?}: use file:PATH, socket:PATH or pty"
            )));
        };
        if let ConsoleSink::File(p) | ConsoleSink::Socket(p) = &sink {
            if p.as_os_str().is_empty() {
                return Err(device_error(
                    "the path is empty: use file:PATH or socket:PATH",
                ));
            }
        }
        Ok(Self { sink })
    }

    /// Check what can be checked before opening anything.
    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ConfigError> {
        if let ConsoleSink::Socket(p) = &self.sink {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(device_error(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter path",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

/// Host resources of the device, opened once per run.
pub struct OpenConsole {
    /// The host endpoint, shared by every VM instance of the run.
    pub backend: Arc<ConsoleBackend>,
    /// Counters, kept across guest reboots.
    pub metrics: Arc<ConsoleMetrics>,
    /// The socket file we created (removed when the run ends).
    socket_path: Option<PathBuf>,
}

impl Drop for OpenConsole {
    fn drop(&mut self) {
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn open_error(reason: String, source: std::io::Error) -> VmmError {
    VmmError::DeviceOpen {
        device: DEVICE.to_string(),
        reason,
        source: Some(source),
    }
}

/// Bind `path`, replacing a stale socket file nobody listens on.
fn bind_socket(path: &Path) -> Result<UnixListener, VmmError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VmmError::DeviceOpen {
                device: DEVICE.to_string(),
                reason: format!(
                    "{} exists and is not a socket: choose another path",
                    path.display()
                ),
                source: None,
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(VmmError::DeviceOpen {
                device: DEVICE.to_string(),
                reason: format!(
                    "{} is in use by another process: choose another path",
                    path.display()
                ),
                source: None,
            });
        }
        std::fs::remove_file(path).map_err(|e| {
            open_error(
                format!("cannot remove the stale socket {}", path.display()),
                e,
            )
        })?;
    }
    UnixListener::bind(path).map_err(|e| {
        open_error(
            format!(
                "cannot listen on {}: check that the directory exists and is writable",
                path.display()
            ),
            e,
        )
    })
}

/// Open the host side.
pub fn open(cfg: &ConsoleConfig) -> Result<OpenConsole, VmmError> {
    let mut socket_path = None;
    let backend = match &cfg.sink {
        ConsoleSink::File(p) => {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(|e| {
                    open_error(
                        format!(
                            "cannot open output file {}: check that the directory exists and is writable",
                            p.display()
                        ),
                        e,
                    )
                })?;
            ConsoleBackend::file(f)
        }
        ConsoleSink::Socket(p) => {
            let listener = bind_socket(p)?;
            socket_path = Some(p.clone());
            ConsoleBackend::socket(listener)
                .map_err(|e| open_error(format!("cannot set up {}", p.display()), e))?
        }
        ConsoleSink::Pty => {
            let (backend, path) = ConsoleBackend::pty().map_err(|e| {
                open_error(
                    "cannot allocate a pseudo-terminal: check /dev/pts".to_string(),
                    e,
                )
            })?;
            eprintln!("ferrite: virtio-console (hvc0) on {}", path.display());
            backend
        }
    };
    Ok(OpenConsole {
        backend,
        metrics: Arc::new(ConsoleMetrics::default()),
        socket_path,
    })
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenConsole,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let dev = Console::new(open.backend.clone(), ConsoleSize::default())
        .with_metrics(open.metrics.clone());
    ctx.plug(DEVICE, Box::new(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_console_parse_kinds_are_recognised() {
        let cases = [
            ("file:/tmp/a,b", ConsoleSink::File("/tmp/a,b".into())),
            (
                "socket:/run/c.sock",
                ConsoleSink::Socket("/run/c.sock".into()),
            ),
            ("pty", ConsoleSink::Pty),
        ];
        for (spec, want) in cases {
            let cfg = ConsoleConfig::parse(spec).unwrap();

            assert_eq!(cfg.sink, want, "{spec}");
        }
    }

    #[test]
    fn test_console_parse_bad_values_name_the_fix() {
        for spec in ["", "tty", "file:", "socket:"] {
            let err = ConsoleConfig::parse(spec).unwrap_err().to_string();

            assert!(err.contains("--virtio-console"), "{spec}: {err}");
        }
    }

    #[test]
    fn test_console_open_socket_replaces_stale_file_and_cleans_up() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("c.sock");
        drop(UnixListener::bind(&path).unwrap());
        let cfg = ConsoleConfig {
            sink: ConsoleSink::Socket(path.clone()),
        };

        let open = open(&cfg).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        drop(open);

        assert!(!path.exists());
    }

    #[test]
    fn test_console_open_socket_on_regular_file_is_refused() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let cfg = ConsoleConfig {
            sink: ConsoleSink::Socket(file.as_path().to_path_buf()),
        };

        let err = open(&cfg).err().unwrap().to_string();

        assert!(err.contains("not a socket"), "{err}");
    }
}
