//! virtio-vsock with host AF_UNIX sockets (Firecracker's hybrid vsock): configuration, per-run resources and wiring.
//!
//! `--vsock cid=N,socket=PATH`: the VMM listens on PATH (host clients write
//! `CONNECT <port>\n` to reach a guest port) and connects guest connections to host port P
//! to `PATH_P`. The listener is opened once per run and survives guest reboots.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio::vsock::{MAX_GUEST_CID, MIN_GUEST_CID};
use virtio::{VirtioPciDevice, Vsock, VsockMetrics};

use super::AttachContext;
use crate::config::{ConfigError, VmConfig};
use crate::error::VmmError;

const FLAG: &str = "--vsock";
/// Bytes available in `sockaddr_un.sun_path` for a path (107 + NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Room `<path>_<port>` needs beyond the path ("_4294967295").
const PORT_SUFFIX_LEN: usize = 11;

/// `--vsock` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The VM's listening socket; guest connections to host port P go to `<socket>_<P>`.
    pub socket: PathBuf,
}

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError::Device {
        flag: FLAG,
        message: message.into(),
    }
}

/// What is at the socket path.
enum PathState {
    Free,
    /// A socket file nobody listens on (left by a VMM that died): safe to replace.
    Stale,
    InUse,
    NotASocket,
}

fn path_state(path: &Path) -> PathState {
    match std::fs::symlink_metadata(path) {
        Err(_) => PathState::Free,
        Ok(m) if !m.file_type().is_socket() => PathState::NotASocket,
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => PathState::InUse,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => PathState::Stale,
            Err(_) => PathState::InUse,
        },
    }
}

impl VsockConfig {
    /// Parse the `--vsock` syntax: `cid=N,socket=PATH` (keys in any order).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut cid = None;
        let mut socket = None;
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("{part:?} is not KEY=VALUE: use cid=N,socket=PATH")))?;
            match key {
                "cid" => {
                    let n = value.parse::<u64>().map_err(|_| {
                        err(format!("cid {value:?} is not a number: use e.g. cid=3"))
                    })?;
                    cid = Some(n);
                }
                "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
                "socket" => {
                    return Err(err(
                        "socket= is empty: give a path, e.g. socket=/run/vm1.vsock",
                    ))
                }
                other => return Err(err(format!("unknown key {other:?}: use cid=N,socket=PATH"))),
            }
        }
        Ok(Self {
            cid: cid.ok_or_else(|| err("cid= is missing: use cid=N,socket=PATH with N >= 3"))?,
            socket: socket.ok_or_else(|| err("socket= is missing: use cid=N,socket=PATH"))?,
        })
    }

    /// Check what can be checked before opening anything.
    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ConfigError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.cid) {
            return Err(err(format!(
                "cid {} is reserved (0-2 are the hypervisor, local and host; {} and up are invalid): use cid=3 or more",
                self.cid,
                MAX_GUEST_CID + 1
            )));
        }
        let len = self.socket.as_os_str().len();
        if len + PORT_SUFFIX_LEN > MAX_SOCKET_PATH {
            return Err(err(format!(
                "socket path {} is {len} bytes; with the _<port> suffix it must fit {MAX_SOCKET_PATH}: use a path of at most {} bytes",
                self.socket.display(),
                MAX_SOCKET_PATH - PORT_SUFFIX_LEN
            )));
        }
        if let Some(dir) = self.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(err(format!(
                    "directory {} does not exist: create it or choose another socket path",
                    dir.display()
                )));
            }
        }
        match path_state(&self.socket) {
            PathState::Free | PathState::Stale => Ok(()),
            PathState::InUse => Err(err(format!(
                "socket {} is in use by another process: stop it or choose another socket path",
                self.socket.display()
            ))),
            PathState::NotASocket => Err(err(format!(
                "{} exists and is not a socket: remove it or choose another socket path",
                self.socket.display()
            ))),
        }
    }
}

/// Host resources of the device, opened once per run.
pub struct OpenVsock {
    /// The configuration it was opened from.
    pub config: VsockConfig,
    /// The listening socket at `config.socket` (removed from the file system on drop).
    pub listener: Arc<UnixListener>,
    /// Counters of the device, kept across guest reboots (for the control socket).
    pub metrics: Arc<VsockMetrics>,
}

impl Drop for OpenVsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config.socket);
    }
}

fn open_error(cfg: &VsockConfig, reason: String, source: Option<std::io::Error>) -> VmmError {
    let _ = cfg;
    VmmError::DeviceOpen {
        device: "vsock".to_string(),
        reason,
        source,
    }
}

/// Open the host side: bind the listening socket (replacing a stale one).
pub fn open(cfg: &VsockConfig) -> Result<OpenVsock, VmmError> {
    match path_state(&cfg.socket) {
        PathState::Free => {}
        PathState::Stale => {
            std::fs::remove_file(&cfg.socket).map_err(|e| {
                open_error(
                    cfg,
                    format!(
                        "cannot remove the stale socket {}: remove it by hand",
                        cfg.socket.display()
                    ),
                    Some(e),
                )
            })?;
        }
        PathState::InUse => {
            return Err(open_error(
                cfg,
                format!(
                    "socket {} is in use by another process: stop it or choose another socket path",
                    cfg.socket.display()
                ),
                None,
            ))
        }
        PathState::NotASocket => {
            return Err(open_error(
                cfg,
                format!(
                    "{} exists and is not a socket: remove it or choose another socket path",
                    cfg.socket.display()
                ),
                None,
            ))
        }
    }
    let listener = UnixListener::bind(&cfg.socket).map_err(|e| {
        open_error(
            cfg,
            format!(
                "cannot listen on {}: check the directory exists and is writable",
                cfg.socket.display()
            ),
            Some(e),
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| open_error(cfg, "cannot make the socket non-blocking".into(), Some(e)))?;
    Ok(OpenVsock {
        config: cfg.clone(),
        listener: Arc::new(listener),
        metrics: Arc::new(VsockMetrics::default()),
    })
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenVsock,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let dev = Vsock::new(
        open.config.cid,
        open.listener.clone(),
        &open.config.socket,
        open.metrics.clone(),
    )
    .map_err(|source| VmmError::DeviceSetup {
        device: "vsock".to_string(),
        source,
    })?;
    ctx.plug("vsock", Box::new(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vsock_parse_good_spec_gives_fields() {
        let c = VsockConfig::parse("cid=3,socket=/tmp/v.sock").unwrap();

        assert_eq!(c.cid, 3);
        assert_eq!(c.socket, PathBuf::from("/tmp/v.sock"));
    }

    #[test]
    fn test_vsock_parse_bad_specs_rejected() {
        for bad in [
            "",
            "cid=3",
            "socket=/tmp/x",
            "cid=x,socket=/tmp/x",
            "cid=3,socket=",
            "cid=3,socket=/tmp/x,color=red",
            "3,/tmp/x",
        ] {
            assert!(VsockConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_vsock_validate_reserved_cid_rejected() {
        let vm = VmConfig::default();
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let c = VsockConfig {
                cid,
                socket: PathBuf::from("/tmp/ferrite-vsock-unit-cid"),
            };

            let e = c.validate(&vm).unwrap_err().to_string();

            assert!(e.contains("cid=3 or more"), "{e}");
        }
    }

    #[test]
    fn test_vsock_validate_regular_file_rejected() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let c = VsockConfig {
            cid: 3,
            socket: f.as_path().to_path_buf(),
        };

        let e = c.validate(&VmConfig::default()).unwrap_err().to_string();

        assert!(e.contains("not a socket"), "{e}");
    }

    #[test]
    fn test_vsock_open_replaces_stale_socket_and_refuses_live_one() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("vm.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a stale socket file
        let cfg = VsockConfig {
            cid: 3,
            socket: path.clone(),
        };
        cfg.validate(&VmConfig::default()).unwrap();

        let first = open(&cfg).unwrap();
        let second = open(&cfg);

        assert!(matches!(second, Err(VmmError::DeviceOpen { .. })));
        assert!(cfg.validate(&VmConfig::default()).is_err());
        drop(first);
        assert!(!path.exists());
    }
}
