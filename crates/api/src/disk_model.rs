//! Request and response bodies of the live disk snapshot routes
//! (`/v1/vms/{name}/disk-snapshots...`, `/v1/vms/{name}/disks/{disk}/flatten`).

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/vms/{name}/disk-snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshotRequest {
    /// The snapshot's tag, unique per VM: 1-64 of `A-Z a-z 0-9 . _ -`, not starting with
    /// `.`. Each writable disk's new overlay is named `BASE@TAG.qcow2` next to its image.
    pub tag: String,
}

/// Where one disk went in a disk snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayer {
    /// The disk's position in the VM's `disks`.
    pub index: usize,
    /// The new top image (a qcow2 overlay) the disk writes to from the snapshot on.
    pub path: String,
    /// The image it froze (now read-only, the overlay's backing file).
    pub backing: String,
}

/// A stored disk snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshotInfo {
    /// The VM it was taken of.
    pub vm: String,
    /// Its tag.
    pub tag: String,
    /// When it was taken (ms since the Unix epoch).
    pub created_ms: u64,
    /// Every writable disk, all switched at one point.
    pub disks: Vec<DiskLayer>,
}

/// One image of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainImage {
    /// Its path on the daemon's host.
    pub path: String,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// A disk's chain, top image first, down to the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChain {
    /// The disk's position in the VM's `disks`.
    pub index: usize,
    /// The images.
    pub chain: Vec<ChainImage>,
}

/// `GET /v1/vms/{name}/disk-snapshots`: the stored disk snapshots and each disk's chain now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshotList {
    /// Oldest first.
    pub snapshots: Vec<DiskSnapshotInfo>,
    /// One per disk of the VM.
    pub disks: Vec<DiskChain>,
}

/// What a revert did to one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertedDisk {
    /// The disk's position in the VM's `disks`.
    pub index: usize,
    /// The new, empty top image the VM definition now uses.
    pub path: String,
    /// The image it sits on (the one the snapshot froze).
    pub base: String,
    /// Images no longer in the disk's chain; kept on the host (delete them when nothing uses
    /// them).
    pub detached: Vec<String>,
}

/// `POST /v1/vms/{name}/disk-snapshots/{tag}/revert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRevertInfo {
    /// The VM.
    pub vm: String,
    /// The snapshot it went back to.
    pub tag: String,
    /// Every disk the snapshot covered.
    pub disks: Vec<RevertedDisk>,
}

/// `POST /v1/vms/{name}/disks/{disk}/flatten`: the disk's top image is now standalone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlattenInfo {
    /// The VM.
    pub vm: String,
    /// The disk's position in the VM's `disks`.
    pub index: usize,
    /// The standalone image (same path as the top image before).
    pub path: String,
    /// The images that were below it, kept on the host.
    pub detached: Vec<String>,
}
