//! Live disk snapshots of VMs: taken by the VM's VMM through its control socket (a new qcow2
//! overlay on every writable disk at one point), recorded in the store together with the VM
//! definition now pointing at the overlays; reverting (new empty overlays over the images a
//! snapshot froze) and flattening (a disk's chain into one image) work on stopped VMs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use api::{
    ApiError, ChainImage, DiskChain, DiskLayer, DiskRevertInfo, DiskSnapshotInfo, DiskSnapshotList,
    ErrorCode, FlattenInfo, RevertedDisk, VmSpec, VmState,
};
use disk::ImageFormat;
use serde_json::{json, Value};

use crate::app::{now_ms, Daemon, VmSlot};
use crate::error::{conflict, internal, store_error};
use crate::vmm_link;

/// How long the VMM may take (flushing every disk, creating the overlays).
const DISK_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A `disks` entry (`PATH[,options]`) with its image replaced by `path` in `format`, every
/// other option kept.
pub fn with_image(entry: &str, path: &Path, format: ImageFormat) -> String {
    let mut parts = vec![path.display().to_string(), format!("format={format}")];
    parts.extend(
        entry
            .split(',')
            .skip(1)
            .filter(|o| !o.starts_with("format="))
            .map(str::to_string),
    );
    parts.join(",")
}

/// The image and format of a `disks` entry (format probed when the entry names none).
fn entry_image(spec: &VmSpec, index: usize) -> Result<(PathBuf, Option<ImageFormat>), ApiError> {
    let entry = spec.disks.get(index).ok_or_else(|| {
        ApiError::bad_field(
            "disk",
            format!(
                "disk {index}: VM {:?} has {} disks (numbered from 0)",
                spec.name,
                spec.disks.len()
            ),
        )
    })?;
    let d = vmm::DiskConfig::parse(entry)
        .map_err(|e| ApiError::bad_field("disks", format!("disks[{index}]: {e}")))?;
    Ok((d.path, d.format))
}

fn disk_error(index: usize, e: disk::DiskError) -> ApiError {
    let code = match e {
        disk::DiskError::InUse(_) | disk::DiskError::Locked { .. } => ErrorCode::Conflict,
        disk::DiskError::InvalidArgument(_) | disk::DiskError::Exists(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, format!("disk {index}: {e}"))
}

fn paths(list: &[PathBuf]) -> Vec<String> {
    list.iter().map(|p| p.display().to_string()).collect()
}

fn to_info(s: store::DiskSnapshot) -> DiskSnapshotInfo {
    DiskSnapshotInfo {
        vm: s.vm,
        tag: s.tag,
        created_ms: u64::try_from(s.created_ms).unwrap_or(0),
        disks: serde_json::from_value(s.disks).unwrap_or_default(),
    }
}

impl Daemon {
    /// The stored disk snapshots of VM `slot` and each disk's chain now.
    pub fn list_disk_snapshots(&self, slot: &VmSlot) -> Result<DiskSnapshotList, ApiError> {
        let snapshots = self
            .store
            .list_disk_snapshots(&slot.name)
            .map_err(store_error)?
            .into_iter()
            .map(to_info)
            .collect();
        let spec = slot.spec();
        let disks = (0..spec.disks.len())
            .map(|index| {
                let (path, format) = entry_image(&spec, index)?;
                let chain = disk::image_chain(&path, format).map_err(|e| disk_error(index, e))?;
                Ok(DiskChain {
                    index,
                    chain: chain
                        .into_iter()
                        .map(|e| ChainImage {
                            path: e.path.display().to_string(),
                            format: e.format.name().to_string(),
                        })
                        .collect(),
                })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(DiskSnapshotList { snapshots, disks })
    }

    /// Snapshot every writable disk of a running or paused VM (caller holds its op lock).
    pub async fn disk_snapshot_locked(
        &self,
        slot: &Arc<VmSlot>,
        tag: &str,
    ) -> Result<DiskSnapshotInfo, ApiError> {
        vmm::disk_snapshot::check_tag(tag).map_err(|m| ApiError::bad_field("tag", m))?;
        let state = slot.runtime().state;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(conflict(format!(
                "VM {:?} is {}: only a running or paused VM's disks can be snapshotted live \
                 (for a stopped VM use `ferrite disk create -b`)",
                slot.name,
                state.as_str()
            )));
        }
        if self
            .store
            .get_disk_snapshot(&slot.name, tag)
            .map_err(store_error)?
            .is_some()
        {
            return Err(conflict(format!(
                "VM {:?} already has a disk snapshot tagged {tag:?}: choose another tag",
                slot.name
            )));
        }
        let request = json!({"op": "disk-snapshot", "tag": tag});
        let reply =
            vmm_link::call_within(&slot.paths.control, &request, DISK_SNAPSHOT_TIMEOUT).await?;
        let layers: Vec<DiskLayer> =
            serde_json::from_value(reply.get("disks").cloned().unwrap_or(Value::Null))
                .map_err(internal)?;
        let mut spec = slot.spec();
        for layer in &layers {
            if let Some(entry) = spec.disks.get_mut(layer.index) {
                *entry = with_image(entry, Path::new(&layer.path), ImageFormat::Qcow2);
            }
        }
        let record = store::DiskSnapshot {
            vm: slot.name.clone(),
            tag: tag.to_string(),
            created_ms: i64::try_from(now_ms()).unwrap_or(i64::MAX),
            disks: serde_json::to_value(&layers).map_err(internal)?,
        };
        let spec_value = serde_json::to_value(&spec).map_err(internal)?;
        // The VMM already writes to the overlays: the definition must follow even if the
        // record cannot be written, or a restart would go back to the frozen images.
        if let Err(e) = self.store.add_disk_snapshot(&record, &spec_value) {
            slot.set_spec(spec);
            let _ = self.persist_spec(slot);
            return Err(store_error(e));
        }
        slot.set_spec(spec);
        self.event(
            &slot.name,
            "disk-snapshot-created",
            format!("{tag} ({} disks)", layers.len()),
        );
        Ok(to_info(record))
    }

    /// Put every disk of snapshot `tag` back to the point it was taken: a new empty overlay
    /// over the image the snapshot froze; the images above it are kept but unused (caller
    /// holds the op lock; the VM must be stopped).
    pub fn revert_disk_snapshot_locked(
        &self,
        slot: &VmSlot,
        tag: &str,
    ) -> Result<DiskRevertInfo, ApiError> {
        vmm::disk_snapshot::check_tag(tag).map_err(|m| ApiError::bad_field("tag", m))?;
        let snap = self
            .store
            .get_disk_snapshot(&slot.name, tag)
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "VM {:?} has no disk snapshot tagged {tag:?} (see GET /v1/vms/{}/disk-snapshots)",
                        slot.name, slot.name
                    ),
                )
            })?;
        crate::snapshots::require_stopped(slot, "reverting its disks")?;
        let info = to_info(snap);
        let mut spec = slot.spec();
        let stamp = now_ms();
        let mut done: Vec<RevertedDisk> = Vec::new();
        let result = info.disks.iter().try_for_each(|layer| {
            let (top, format) = entry_image(&spec, layer.index)?;
            let overlay = disk::overlay_path(
                Path::new(&layer.backing),
                &format!("{tag}-reverted-{stamp}"),
            );
            let outcome = disk::revert(&top, format, &layer.backing, &overlay)
                .map_err(|e| disk_error(layer.index, e))?;
            done.push(RevertedDisk {
                index: layer.index,
                path: outcome.overlay.display().to_string(),
                base: outcome.base.display().to_string(),
                detached: paths(&outcome.detached),
            });
            Ok::<_, ApiError>(())
        });
        if let Err(e) = result {
            // Nothing of this revert is in the definition yet: drop the new overlays.
            for d in &done {
                let _ = std::fs::remove_file(&d.path);
            }
            return Err(e);
        }
        for d in &done {
            if let Some(entry) = spec.disks.get_mut(d.index) {
                *entry = with_image(entry, Path::new(&d.path), ImageFormat::Qcow2);
            }
        }
        slot.set_spec(spec);
        self.persist_spec(slot)?;
        self.event(&slot.name, "disk-snapshot-reverted", tag.to_string());
        Ok(DiskRevertInfo {
            vm: slot.name.clone(),
            tag: tag.to_string(),
            disks: done,
        })
    }

    /// Make disk `index`'s top image standalone (its chain merged into it, in place; the
    /// images below are kept). The caller holds the op lock; the VM must be stopped.
    pub fn flatten_disk_locked(
        &self,
        slot: &VmSlot,
        index: usize,
    ) -> Result<FlattenInfo, ApiError> {
        crate::snapshots::require_stopped(slot, "flattening its disks")?;
        let spec = slot.spec();
        let (top, format) = entry_image(&spec, index)?;
        let chain = disk::image_chain(&top, format).map_err(|e| disk_error(index, e))?;
        let top_format = chain[0].format;
        disk::flatten(&top, Some(top_format), None, Some(top_format), false)
            .map_err(|e| disk_error(index, e))?;
        let below: Vec<PathBuf> = chain[1..].iter().map(|e| e.path.clone()).collect();
        self.event(
            &slot.name,
            "disk-flattened",
            format!("disk {index}: {}", top.display()),
        );
        Ok(FlattenInfo {
            vm: slot.name.clone(),
            index,
            path: top.display().to_string(),
            detached: paths(&below),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_with_image_replaces_path_and_format_and_keeps_options() {
        let entry = "/d/disk0.img,format=raw,id=root,bw=20M";

        let moved = with_image(entry, Path::new("/d/disk0@s1.qcow2"), ImageFormat::Qcow2);

        assert_eq!(moved, "/d/disk0@s1.qcow2,format=qcow2,id=root,bw=20M");
    }
}
