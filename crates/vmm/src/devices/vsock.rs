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
    pub fn validate(&self, vm: &VmConfig) -> Result<(), ConfigError> {
        self.validate_settings(vm)?;
        self.validate_path_free()
    }

    /// [`Self::validate`] without looking at who holds the socket path: for a migration
    /// destination, whose source (on the same host) keeps listening there until it hands
    /// the path over after its pause; the path is checked when the device opens.
    pub fn validate_settings(&self, _vm: &VmConfig) -> Result<(), ConfigError> {
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
        Ok(())
    }

    fn validate_path_free(&self) -> Result<(), ConfigError> {
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

/// [`VmConfig::validate`] for a migration destination: the vsock socket path may still be
/// the source's (on one host it hands the path over only after its pause), so who holds it
/// is checked only when the device opens, once the state has arrived.
pub fn validate_incoming(
    config: &VmConfig,
    host_max_vcpus: Option<u32>,
) -> Result<(), ConfigError> {
    let mut rest = config.clone();
    let vsock = rest.vsock.take();
    rest.validate(host_max_vcpus)?;
    vsock.map_or(Ok(()), |v| v.validate_settings(config))
}

/// Host resources of the device, opened once per run.
pub struct OpenVsock {
    /// The configuration it was opened from.
    pub config: VsockConfig,
    /// The listening socket at `config.socket`.
    pub listener: Arc<UnixListener>,
    /// Its file in the file system (removed when the last handle drops, if still ours).
    pub socket_file: Arc<SocketFile>,
    /// Counters of the device, kept across guest reboots (for the control socket).
    pub metrics: Arc<VsockMetrics>,
}

/// The file system name of the VM's listening socket, known by its identity (device and
/// inode) so that this process only ever renames or removes the file it bound — never one a
/// migration destination bound at the same path since.
///
/// A live migration on one host hands the path over without closing the listener: after the
/// source pauses, [`SocketFile::hand_over`] renames the file aside (new host clients then
/// find the path free for the destination to bind, and connections already open stay as
/// they are); if the migration fails, [`SocketFile::take_back`] renames it back (over a
/// destination's file, which that destination then leaves alone).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    aside: PathBuf,
    id: (u64, u64),
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| (m.dev(), m.ino()))
}

impl SocketFile {
    /// The socket just bound at `path`.
    pub fn bound(path: &Path) -> std::io::Result<Self> {
        let id = file_id(path).ok_or_else(|| {
            std::io::Error::new(ErrorKind::NotFound, "the bound socket file is not there")
        })?;
        let mut aside = path.as_os_str().to_owned();
        aside.push(format!(".migrating-{}", std::process::id()));
        Ok(Self {
            path: path.to_path_buf(),
            aside: PathBuf::from(aside),
            id,
        })
    }

    fn ours(&self, path: &Path) -> bool {
        file_id(path) == Some(self.id)
    }

    /// The path host clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the file is while handed over.
    pub fn aside(&self) -> &Path {
        &self.aside
    }

    /// Free the path for a migration destination on this host: rename our file aside.
    /// Nothing to do when the path no longer holds our file.
    pub fn hand_over(&self) -> std::io::Result<()> {
        if self.ours(&self.path) {
            std::fs::rename(&self.path, &self.aside)?;
        }
        Ok(())
    }

    /// After a failed migration: put our file back at the path (replacing a destination's,
    /// which is exiting).
    pub fn take_back(&self) -> std::io::Result<()> {
        if self.ours(&self.aside) {
            std::fs::rename(&self.aside, &self.path)?;
        }
        Ok(())
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        for p in [&self.path, &self.aside] {
            if self.ours(p) {
                let _ = std::fs::remove_file(p);
            }
        }
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
    let socket_file = SocketFile::bound(&cfg.socket).map_err(|e| {
        open_error(
            cfg,
            format!("cannot read back the socket {}", cfg.socket.display()),
            Some(e),
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| open_error(cfg, "cannot make the socket non-blocking".into(), Some(e)))?;
    Ok(OpenVsock {
        config: cfg.clone(),
        listener: Arc::new(listener),
        socket_file: Arc::new(socket_file),
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

    #[test]
    fn test_vsock_handover_frees_the_path_and_never_removes_the_next_owners_socket() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("vm.sock");
        let cfg = VsockConfig {
            cid: 3,
            socket: path.clone(),
        };
        let source = open(&cfg).unwrap();
        let open_before = UnixStream::connect(&path).unwrap();

        source.socket_file.hand_over().unwrap();
        let destination = open(&cfg).unwrap();
        let to_destination = UnixStream::connect(&path);
        let source_still_has = source.listener.accept().is_ok();
        drop(source);

        assert!(to_destination.is_ok());
        assert!(destination.listener.accept().is_ok());
        assert!(source_still_has, "the connection made before the handover");
        assert!(path.exists(), "the source removed the destination's socket");
        assert!(UnixStream::connect(&path).is_ok());
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 1);
        drop(open_before);
        drop(destination);
        assert!(!path.exists());
    }

    #[test]
    fn test_vsock_take_back_restores_the_path_over_a_failed_destinations_socket() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("vm.sock");
        let cfg = VsockConfig {
            cid: 3,
            socket: path.clone(),
        };
        let source = open(&cfg).unwrap();
        source.socket_file.hand_over().unwrap();
        let destination = open(&cfg).unwrap();

        source.socket_file.take_back().unwrap();
        drop(destination);
        let client = UnixStream::connect(&path);

        assert!(client.is_ok(), "the path leads to the source again");
        assert!(source.listener.accept().is_ok());
        assert!(!source.socket_file.aside().exists());
        drop(source);
        assert!(!path.exists());
    }
}
