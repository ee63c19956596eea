//! Restoring a snapshot as a clone: a new VM that continues the snapshot's guest with its own
//! identity, so any number of clones of one snapshot can run side by side (and next to the
//! VM the snapshot was taken of).
//!
//! What a clone changes ([`CloneIdentity`], given as JSON to `ferrite run --restore DIR
//! --clone-identity FILE`):
//! - every NIC gets a new TAP (given, or created per process) and a new MAC (given, or random);
//! - the vsock device gets a new guest CID and its own host socket;
//! - every disk becomes a new qcow2 overlay whose backing file is the image the snapshot's
//!   configuration names, created here (so a clone's writes never reach the base or a sibling);
//! - the VM generation ID (`crate::vmgenid`) is replaced and the guest notified.
//!
//! Guest RAM needs no change: a restore maps `memory.bin` privately, so clones share the
//! snapshot's pages until they write them.
//!
//! The base images must not change while clones use them: the source VM must be stopped (or
//! its disks frozen by a disk snapshot). An image some VM holds open read-write is refused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::vsock::VsockConfig;
use crate::vm_snapshot::LoadedSnapshot;

/// Why a snapshot cannot be restored as a clone with the given identity.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The snapshot's guest booted without the VM generation ID device.
    #[error(
        "Snapshot {0} has no VM generation ID (its VM was booted by an older Ferrite): boot the \
         source VM with this Ferrite and take a new snapshot to clone it"
    )]
    NoGenerationId(PathBuf),
    /// The identity lists a different number of NICs or disks than the snapshot has.
    #[error("The clone identity gives {given} {what} but the snapshot's VM has {expected}: give one entry per {what_one}, in order")]
    CountMismatch {
        /// "nets" or "disks".
        what: &'static str,
        /// Singular, for the fix.
        what_one: &'static str,
        /// Entries in the identity.
        given: usize,
        /// Devices in the snapshot.
        expected: usize,
    },
    /// The snapshot's VM has vsock but the identity gives no new CID and socket.
    #[error("The snapshot's VM has vsock (cid {0}): give the clone its own \"vsock\": {{\"cid\": N, \"socket\": PATH}}")]
    VsockMissing(u64),
    /// The identity gives vsock to a VM without it.
    #[error("The clone identity gives vsock but the snapshot's VM has none: remove \"vsock\"")]
    VsockUnexpected,
    /// The identity reuses the source's CID or MAC.
    #[error("The clone identity reuses the source VM's {0}: give the clone its own")]
    SameAsSource(&'static str),
    /// The overlay path is taken.
    #[error("Overlay {0} already exists: give each clone disk a new path")]
    OverlayExists(PathBuf),
    /// The base image is open read-write (the source VM still runs on it).
    #[error(
        "Disk image {0} is open read-write by a running VM: a clone's base image must not \
         change, so stop the source VM (or take a disk snapshot and clone that) first"
    )]
    BaseInUse(PathBuf),
    /// The base image cannot be resolved.
    #[error("Cannot find the snapshot's disk image {path}: {source}")]
    BaseMissing {
        /// The path in the snapshot's configuration.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Creating the overlay failed.
    #[error("Cannot create the clone overlay {path}")]
    Overlay {
        /// The overlay path.
        path: PathBuf,
        /// The disk crate's error.
        #[source]
        source: disk::DiskError,
    },
    /// A random MAC could not be chosen.
    #[error("Cannot read random bytes for a MAC address: {0}")]
    Random(#[source] std::io::Error),
    /// The clone's configuration is invalid (e.g. its vsock socket path).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The identity file cannot be read or parsed.
    #[error("Cannot read the clone identity {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        reason: String,
    },
}

/// One NIC of a clone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetIdentity {
    /// TAP to use or create (None: create `fe<pid>n<index>`, removed on exit).
    #[serde(default)]
    pub tap: Option<String>,
    /// The clone's MAC, as text `02:aa:00:00:00:01` (None: a random locally administered
    /// unicast address).
    #[serde(default, with = "mac_text")]
    pub mac: Option<net::MacAddr>,
}

/// An optional MAC address as `xx:xx:xx:xx:xx:xx` text in JSON.
mod mac_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &Option<net::MacAddr>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(m) => s.serialize_str(&m.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<net::MacAddr>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let mac: net::MacAddr = text.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "mac {text:?} is not a MAC address: use e.g. \"02:aa:00:00:00:01\""
            ))
        })?;
        if mac.is_multicast() {
            return Err(serde::de::Error::custom(format!(
                "mac {text} is a multicast address: clear the low bit of the first byte"
            )));
        }
        Ok(Some(mac))
    }
}

/// One disk of a clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskIdentity {
    /// Where to create the clone's qcow2 overlay (must not exist yet).
    pub overlay: PathBuf,
}

/// What makes a clone distinct from its snapshot's VM and its sibling clones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneIdentity {
    /// One entry per NIC of the snapshot's VM, in order.
    #[serde(default)]
    pub nets: Vec<NetIdentity>,
    /// New guest CID and host socket; required exactly when the snapshot's VM has vsock.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// One entry per disk of the snapshot's VM, in order.
    #[serde(default)]
    pub disks: Vec<DiskIdentity>,
}

impl CloneIdentity {
    /// Read an identity from a JSON file.
    pub fn from_file(path: &Path) -> Result<Self, CloneError> {
        let file_err = |reason: String| CloneError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))
    }
}

fn count_check(
    what: &'static str,
    what_one: &'static str,
    given: usize,
    expected: usize,
) -> Result<(), CloneError> {
    if given == expected {
        return Ok(());
    }
    Err(CloneError::CountMismatch {
        what,
        what_one,
        given,
        expected,
    })
}

/// A random, locally administered unicast MAC address.
pub fn random_mac() -> Result<net::MacAddr, CloneError> {
    let mut seed = [0u8; 16];
    virtio::rng::fill::getrandom_fill(&mut seed).map_err(CloneError::Random)?;
    Ok(net::MacAddr::from_seed(&seed))
}

/// Turn `config` (the snapshot's configuration) into the clone's and mark `snap` to be
/// restored with a new VM generation ID. Creates the disk overlays; on error, none is left
/// behind and nothing is changed.
pub fn apply(
    snap: &mut LoadedSnapshot,
    config: &mut VmConfig,
    identity: &CloneIdentity,
) -> Result<(), CloneError> {
    if snap.vmgenid.is_none() {
        return Err(CloneError::NoGenerationId(
            snap.dir.clone().unwrap_or_default(),
        ));
    }
    count_check("nets", "NIC", identity.nets.len(), config.nets.len())?;
    count_check("disks", "disk", identity.disks.len(), config.disks.len())?;
    let mut next = config.clone();
    for (net, id) in next.nets.iter_mut().zip(&identity.nets) {
        if id.mac.is_some() && id.mac == net.mac {
            return Err(CloneError::SameAsSource("MAC address"));
        }
        net.tap = id.tap.clone();
        net.mac = Some(match id.mac {
            Some(mac) => mac,
            None => random_mac()?,
        });
    }
    next.vsock = match (&config.vsock, &identity.vsock) {
        (Some(old), Some(new)) if old.cid == new.cid => {
            return Err(CloneError::SameAsSource("vsock CID"))
        }
        (Some(_), Some(new)) => Some(new.clone()),
        (Some(old), None) => return Err(CloneError::VsockMissing(old.cid)),
        (None, Some(_)) => return Err(CloneError::VsockUnexpected),
        (None, None) => None,
    };
    // Everything but the overlays (which do not exist yet) is checked before any is created.
    next.validate(None)?;
    let mut created = Overlays::default();
    for (disk, id) in next.disks.iter_mut().zip(&identity.disks) {
        created.create(&disk.path, disk.format, &id.overlay)?;
        disk.path = id.overlay.clone();
        disk.format = Some(disk::ImageFormat::Qcow2);
    }
    created.keep();
    *config = next;
    snap.new_identity = true;
    Ok(())
}

/// Overlays created so far; removed again unless [`Overlays::keep`] is called.
#[derive(Default)]
struct Overlays {
    paths: Vec<PathBuf>,
}

impl Overlays {
    fn create(
        &mut self,
        base: &Path,
        base_format: Option<disk::ImageFormat>,
        overlay: &Path,
    ) -> Result<(), CloneError> {
        if overlay.exists() {
            return Err(CloneError::OverlayExists(overlay.to_path_buf()));
        }
        let base = base
            .canonicalize()
            .map_err(|source| CloneError::BaseMissing {
                path: base.to_path_buf(),
                source,
            })?;
        let spec = disk::CreateSpec {
            format: disk::ImageFormat::Qcow2,
            size: None,
            backing: Some(base.to_string_lossy().into_owned()),
            backing_format: base_format,
            force: false,
        };
        // Opening the base for the size takes a shared lock, which a writer's lock refuses.
        disk::create_image(overlay, &spec).map_err(|source| match source {
            disk::DiskError::Locked { path } => CloneError::BaseInUse(path),
            source => CloneError::Overlay {
                path: overlay.to_path_buf(),
                source,
            },
        })?;
        self.paths.push(overlay.to_path_buf());
        Ok(())
    }

    fn keep(mut self) {
        self.paths.clear();
    }
}

impl Drop for Overlays {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_identity(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "ferrite-clone-id-{name}-{}.json",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn test_identity_file_parses_nets_vsock_and_disks() {
        let path = write_identity(
            "ok",
            r#"{"nets":[{},{"tap":"t1","mac":"02:00:00:00:00:01"}],
                "vsock":{"cid":9,"socket":"/run/c.vsock"},
                "disks":[{"overlay":"/v/c.qcow2"}]}"#,
        );

        let id = CloneIdentity::from_file(&path).unwrap();

        assert_eq!(id.nets.len(), 2);
        assert_eq!(id.nets[1].tap.as_deref(), Some("t1"));
        assert_eq!(
            id.nets[1].mac.map(|m| m.to_string()).as_deref(),
            Some("02:00:00:00:00:01")
        );
        assert_eq!(id.vsock.as_ref().map(|v| v.cid), Some(9));
        assert_eq!(id.disks[0].overlay, PathBuf::from("/v/c.qcow2"));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn test_identity_file_with_unknown_field_names_it_and_the_file() {
        let path = write_identity("bad", r#"{"nics":[]}"#);

        let err = CloneIdentity::from_file(&path).unwrap_err().to_string();

        assert!(err.contains("nics"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn test_identity_file_with_multicast_mac_is_refused() {
        let path = write_identity("mcast", r#"{"nets":[{"mac":"01:00:5e:00:00:01"}]}"#);

        let err = CloneIdentity::from_file(&path).unwrap_err().to_string();

        assert!(err.contains("multicast"), "{err}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn test_random_macs_are_unicast_locally_administered_and_differ() {
        let a = random_mac().unwrap();
        let b = random_mac().unwrap();

        assert_ne!(a, b);
        assert!(!a.is_multicast());
        assert_eq!(a.bytes()[0] & 0x02, 0x02);
    }
}
