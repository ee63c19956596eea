//! Snapshots of VMs: taken by the VM's own VMM through its control socket into
//! `<state>/snapshots/<vm>/<name>`, recorded in the store, restored by starting the VM's VMM
//! with `ferrite run --restore`, and deleted with their VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use api::{valid_vm_name, ApiError, SnapshotInfo, SnapshotRequest, VmState};
use serde_json::{json, Value};

use crate::app::{now_ms, Daemon, VmSlot};
use crate::error::{conflict, internal, no_snapshot, store_error};
use crate::vmm_link;

/// How long the VMM may take to write a snapshot (all of guest memory, worst case).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Refuse a snapshot name that could not be a directory name (`field` names where it came
/// from: `name` in a body, `snapshot` in a path).
pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if valid_vm_name(name) {
        return Ok(());
    }
    Err(ApiError::bad_field(
        field,
        format!(
            "{field} {name:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ),
    ))
}

fn to_info(s: store::Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        vm: s.vm,
        name: s.name,
        path: s.path,
        created_ms: u64::try_from(s.created_ms).unwrap_or(0),
        memory_bytes: u64::try_from(s.memory_bytes).unwrap_or(0),
        state_bytes: u64::try_from(s.state_bytes).unwrap_or(0),
    }
}

fn field_u64(reply: &Value, key: &str) -> u64 {
    reply["snapshot"][key].as_u64().unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Daemon {
    /// The snapshots of VM `slot`, oldest first.
    pub fn list_snapshots(&self, slot: &VmSlot) -> Result<Vec<SnapshotInfo>, ApiError> {
        let list = self.store.list_snapshots(&slot.name).map_err(store_error)?;
        Ok(list.into_iter().map(to_info).collect())
    }

    pub(crate) fn stored_snapshot(
        &self,
        slot: &VmSlot,
        name: &str,
    ) -> Result<store::Snapshot, ApiError> {
        check_name("snapshot", name)?;
        self.store
            .get_snapshot(&slot.name, name)
            .map_err(store_error)?
            .ok_or_else(|| no_snapshot(&slot.name, name))
    }

    /// Snapshot a running or paused VM (caller holds its op lock).
    pub async fn snapshot_locked(
        &self,
        slot: &Arc<VmSlot>,
        req: &SnapshotRequest,
    ) -> Result<SnapshotInfo, ApiError> {
        check_name("name", &req.name)?;
        let state = slot.runtime().state;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(conflict(format!(
                "VM {:?} is {}: only a running or paused VM can be snapshotted",
                slot.name,
                state.as_str()
            )));
        }
        if self
            .store
            .get_snapshot(&slot.name, &req.name)
            .map_err(store_error)?
            .is_some()
        {
            return Err(store_error(store::StoreError::SnapshotExists {
                vm: slot.name.clone(),
                name: req.name.clone(),
            }));
        }
        let dir = slot.paths.snapshots.join(&req.name);
        std::fs::create_dir_all(&slot.paths.snapshots).map_err(internal)?;
        // Not in the store, so a leftover of an interrupted snapshot: the VMM wants a new path.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(internal)?;
        }
        let request = json!({"op": "snapshot", "path": dir, "stay_paused": req.stay_paused});
        let reply =
            match vmm_link::call_within(&slot.paths.control, &request, SNAPSHOT_TIMEOUT).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            };
        let now = match reply.get("state").and_then(Value::as_str) {
            Some("paused") => VmState::Paused,
            _ => VmState::Running,
        };
        if now != state {
            slot.update_runtime(|rt| rt.state = now);
            let _ = self.persist_runtime(slot);
        }
        let record = store::Snapshot {
            vm: slot.name.clone(),
            name: req.name.clone(),
            path: dir.display().to_string(),
            created_ms: to_i64(now_ms()),
            memory_bytes: to_i64(field_u64(&reply, "memory_bytes_written")),
            state_bytes: to_i64(field_u64(&reply, "state_bytes")),
        };
        if let Err(e) = self.store.add_snapshot(&record) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(store_error(e));
        }
        let info = to_info(record);
        self.event(
            &slot.name,
            "snapshot-created",
            format!(
                "{} ({} bytes of memory, {} ms)",
                info.name,
                info.memory_bytes,
                field_u64(&reply, "write_ms")
            ),
        );
        Ok(info)
    }

    /// Start a stopped or crashed VM from snapshot `name` (caller holds its op lock).
    pub async fn restore_locked(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        name: &str,
    ) -> Result<(), ApiError> {
        let snap = self.stored_snapshot(slot, name)?;
        require_stopped(slot, "restoring a snapshot")?;
        let dir = PathBuf::from(&snap.path);
        if !dir.is_dir() {
            return Err(ApiError::new(
                api::ErrorCode::NotFound,
                format!(
                    "The directory {} of snapshot {name:?} of VM {:?} is gone: delete the snapshot",
                    dir.display(),
                    slot.name
                ),
            ));
        }
        let from = crate::supervisor::RestoreFrom {
            dir: &dir,
            clone_identity: None,
        };
        self.start_locked(slot, true, Some(from)).await?;
        // A snapshot taken with `stay_paused` (or of a paused VM) may come back paused.
        if self.vmm_state(slot).await == Some(VmState::Paused) {
            slot.update_runtime(|rt| {
                if rt.state == VmState::Running {
                    rt.state = VmState::Paused;
                }
            });
            let _ = self.persist_runtime(slot);
        }
        self.event(&slot.name, "restored", name.to_string());
        Ok(())
    }

    /// The run state the VMM reports once its VM is built (None if it does not say).
    async fn vmm_state(&self, slot: &VmSlot) -> Option<VmState> {
        for _ in 0..100 {
            let stats = vmm_link::call(&slot.paths.control, &json!({"op": "stats"}))
                .await
                .ok()?;
            match stats.get("state").and_then(Value::as_str) {
                Some("paused") => return Some(VmState::Paused),
                Some("running") => return Some(VmState::Running),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        None
    }

    /// Delete snapshot `name` of VM `slot` and its directory (caller holds its op lock).
    pub fn delete_snapshot_locked(&self, slot: &VmSlot, name: &str) -> Result<(), ApiError> {
        let snap = self.stored_snapshot(slot, name)?;
        self.store
            .delete_snapshot(&slot.name, name)
            .map_err(store_error)?;
        remove_dir(Path::new(&snap.path));
        self.event(&slot.name, "snapshot-deleted", name.to_string());
        Ok(())
    }
}

/// Refuse (409) what needs the VM stopped while it is active; `what` names the request.
pub fn require_stopped(slot: &VmSlot, what: &str) -> Result<(), ApiError> {
    let state = slot.runtime().state;
    if state.is_active() {
        return Err(conflict(format!(
            "VM {:?} is {}: stop or kill it before {what}",
            slot.name,
            state.as_str()
        )));
    }
    Ok(())
}

/// Remove a snapshot directory, logging (not failing) when that is impossible: the record is
/// already gone.
pub fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove snapshot directory {}: {e}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_check_name_refuses_paths_and_names_the_field() {
        let err = check_name("name", "../x").unwrap_err();

        assert_eq!(err.code, api::ErrorCode::BadRequest);
        assert_eq!(err.field.as_deref(), Some("name"));
        assert!(check_name("snapshot", "s1.before-upgrade").is_ok());
        assert!(check_name("snapshot", "").is_err());
    }

    #[test]
    fn test_to_info_clamps_negative_sizes() {
        let info = to_info(store::Snapshot {
            vm: "a".into(),
            name: "s".into(),
            path: "/p".into(),
            created_ms: -1,
            memory_bytes: 4096,
            state_bytes: 10,
        });

        assert_eq!(info.created_ms, 0);
        assert_eq!(info.memory_bytes, 4096);
    }
}
