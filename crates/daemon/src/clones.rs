//! Clones of a snapshot: `POST /v1/vms/{name}/snapshots/{snapshot}/clone` defines N new VMs
//! named `<prefix>-<i>`, each the source's definition with its own identity (a random MAC per
//! NIC on a new TAP, the next free vsock CID with a socket in its run directory, a qcow2
//! overlay per disk under `<state>/disks/<clone>/` backed by the snapshot's image), and starts
//! each from the snapshot (`ferrite run --restore DIR --clone-identity FILE`). The guest gets a
//! new VM generation ID. Later starts of a clone boot its own definition (its overlays).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::{ApiError, CloneOrigin, CloneRequest, VmInfo, VmSpec, MAX_CLONES};
use vmm::clone::{CloneIdentity, DiskIdentity, NetIdentity};
use vmm::config::VsockConfig;

use crate::app::{Daemon, Runtime, VmSlot};
use crate::error::{conflict, internal, store_error};
use crate::supervisor::RestoreFrom;

/// Lowest guest CID a clone is given.
const FIRST_CLONE_CID: u64 = 3;

/// One clone being made: its definition and its first start's identity.
struct Planned {
    spec: VmSpec,
    identity: CloneIdentity,
}

fn bad(field: &str, message: String) -> ApiError {
    ApiError::bad_field(field, message)
}

/// `PATH[,options]` of a disk definition with PATH replaced by `overlay` and the format qcow2.
fn overlay_disk(spec: &str, overlay: &Path) -> String {
    let options: String = spec
        .split(',')
        .skip(1)
        .filter(|o| !o.starts_with("format="))
        .map(|o| format!(",{o}"))
        .collect();
    format!("{},format=qcow2{options}", overlay.display())
}

/// A NIC definition without its TAP and MAC, with `mac` instead (a new TAP per run).
fn clone_net(spec: &str, mac: net::MacAddr) -> String {
    let options: String = spec
        .split(',')
        .filter(|o| !o.is_empty() && !o.starts_with("tap=") && !o.starts_with("mac="))
        .map(|o| format!(",{o}"))
        .collect();
    format!("mac={mac}{options}")
}

impl Daemon {
    /// Guest CIDs of every defined VM.
    fn cids_in_use(&self) -> BTreeSet<u64> {
        self.slots()
            .iter()
            .filter_map(|s| s.spec().vsock)
            .filter_map(|v| VsockConfig::parse(&v).ok())
            .map(|v| v.cid)
            .collect()
    }

    /// `count` free names `<prefix>-<i>`, lowest numbers first.
    fn clone_names(&self, prefix: &str, count: u32) -> Result<Vec<String>, ApiError> {
        let mut names = Vec::new();
        let mut i = 1u32;
        while names.len() < count as usize {
            let name = format!("{prefix}-{i}");
            if !api::valid_vm_name(&name) {
                return Err(bad(
                    "prefix",
                    format!(
                        "prefix {prefix:?} gives the VM name {name:?}: use letters, digits, '-', '_' or '.', at most 55 characters"
                    ),
                ));
            }
            if self.slot(&name).is_err() {
                names.push(name);
            }
            i += 1;
        }
        Ok(names)
    }

    fn plan_clones(
        &self,
        source: &VmSlot,
        snapshot: &str,
        req: &CloneRequest,
    ) -> Result<Vec<Planned>, ApiError> {
        if !(1..=MAX_CLONES).contains(&req.count) {
            return Err(bad(
                "count",
                format!("count {}: use 1 to {MAX_CLONES}", req.count),
            ));
        }
        let prefix = req
            .prefix
            .clone()
            .unwrap_or_else(|| format!("{}-clone", source.name));
        let src = source.spec();
        let mut cids = self.cids_in_use();
        let mut next_cid = FIRST_CLONE_CID;
        let mut planned = Vec::new();
        for name in self.clone_names(&prefix, req.count)? {
            let paths = crate::paths::VmPaths::new(&self.args.run_dir, &self.args.state_dir, &name);
            let mut spec = src.clone();
            spec.name = name.clone();
            spec.autostart = false;
            spec.clone_of = Some(CloneOrigin {
                vm: source.name.clone(),
                snapshot: snapshot.to_string(),
            });
            let mut identity = CloneIdentity::default();
            for (i, disk) in src.disks.iter().enumerate() {
                let overlay = paths.disks.join(format!("disk{i}.qcow2"));
                if overlay.to_string_lossy().contains(',') {
                    return Err(ApiError::new(
                        api::ErrorCode::Internal,
                        format!(
                            "The state directory path {} has a comma, which disk definitions cannot hold: start ferrited with another --state-dir",
                            paths.disks.display()
                        ),
                    ));
                }
                spec.disks[i] = overlay_disk(disk, &overlay);
                identity.disks.push(DiskIdentity { overlay });
            }
            for (i, n) in src.nets.iter().enumerate() {
                let mac = vmm::clone::random_mac().map_err(internal)?;
                spec.nets[i] = clone_net(n, mac);
                identity.nets.push(NetIdentity {
                    tap: None,
                    mac: Some(mac),
                });
            }
            if src.vsock.is_some() {
                while cids.contains(&next_cid) {
                    next_cid += 1;
                }
                cids.insert(next_cid);
                let socket = paths.dir.join("vsock.sock");
                spec.vsock = Some(format!("cid={next_cid},socket={}", socket.display()));
                identity.vsock = Some(VsockConfig {
                    cid: next_cid,
                    socket,
                });
            }
            planned.push(Planned { spec, identity });
        }
        Ok(planned)
    }

    /// Define and start `req.count` clones of snapshot `snapshot` of VM `source` (caller holds
    /// the source's op lock). All or nothing: if one cannot be started, every clone made here
    /// is killed and deleted again (overlays included).
    pub async fn clone_snapshot_locked(
        self: &Arc<Self>,
        source: &Arc<VmSlot>,
        snapshot: &str,
        req: &CloneRequest,
    ) -> Result<Vec<VmInfo>, ApiError> {
        let snap = self.stored_snapshot(source, snapshot)?;
        let dir = PathBuf::from(&snap.path);
        let spec = source.spec();
        let state = source.runtime().state;
        if state.is_active() && !spec.disks.is_empty() {
            return Err(conflict(format!(
                "VM {:?} is {}: its disks would keep changing under the clones' overlays; stop it first",
                source.name,
                state.as_str()
            )));
        }
        let planned = self.plan_clones(source, snapshot, req)?;
        // Admission control for all of them at once (each start checks again).
        self.check_capacity(
            &planned[0].spec.name,
            spec.vcpus.saturating_mul(req.count),
            spec.memory_mib.saturating_mul(u64::from(req.count)),
        )?;
        let mut made: Vec<Arc<VmSlot>> = Vec::new();
        for plan in planned {
            match self.define_and_start_clone(&dir, plan).await {
                Ok(slot) => made.push(slot),
                Err((slot, e)) => {
                    made.extend(slot);
                    for slot in &made {
                        self.discard_clone(slot).await;
                    }
                    return Err(e);
                }
            }
        }
        for slot in &made {
            self.event(
                &slot.name,
                "cloned",
                format!("from snapshot {snapshot} of {}", source.name),
            );
        }
        Ok(made.iter().map(|s| s.info()).collect())
    }

    /// Define one clone and start it from the snapshot in `dir`; on error, the slot (if it
    /// was defined) comes back with the error so the caller can discard it.
    async fn define_and_start_clone(
        self: &Arc<Self>,
        dir: &Path,
        plan: Planned,
    ) -> Result<Arc<VmSlot>, (Option<Arc<VmSlot>>, ApiError)> {
        let name = plan.spec.name.clone();
        let value = serde_json::to_value(&plan.spec).map_err(|e| (None, internal(e)))?;
        self.store
            .create_vm(&name, &value)
            .map_err(|e| (None, store_error(e)))?;
        let slot = self.insert_slot(plan.spec, Runtime::default());
        self.event(&name, "defined", "clone");
        let fail = |e: ApiError| (Some(slot.clone()), e);
        let _guard = slot.op_lock.clone().lock_owned().await;
        for d in [&slot.paths.dir, &slot.paths.disks] {
            std::fs::create_dir_all(d).map_err(|e| fail(internal(e)))?;
        }
        let identity_file = slot.paths.dir.join("clone-identity.json");
        let json = serde_json::to_vec_pretty(&plan.identity).map_err(|e| fail(internal(e)))?;
        std::fs::write(&identity_file, json).map_err(|e| fail(internal(e)))?;
        let from = RestoreFrom {
            dir,
            clone_identity: Some(&identity_file),
        };
        self.start_locked(&slot, true, Some(from))
            .await
            .map_err(fail)?;
        Ok(slot)
    }

    /// Kill and delete a clone made by a failed request, with its files.
    async fn discard_clone(&self, slot: &Arc<VmSlot>) {
        let _guard = slot.op_lock.clone().lock_owned().await;
        if slot.runtime().state.is_active() {
            let _ = self.kill_locked(slot).await;
        }
        let _ = self.store.delete_vm(&slot.name);
        self.remove_slot(&slot.name);
        let _ = std::fs::remove_dir_all(&slot.paths.dir);
        crate::snapshots::remove_dir(&slot.paths.disks);
        self.event(&slot.name, "deleted", "clone request failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_overlay_disk_keeps_options_and_forces_qcow2() {
        let s = overlay_disk(
            "/img/base.raw,format=raw,id=d0,bw=1M",
            Path::new("/st/disks/c-1/disk0.qcow2"),
        );

        assert_eq!(s, "/st/disks/c-1/disk0.qcow2,format=qcow2,id=d0,bw=1M");
    }

    #[test]
    fn test_clone_net_drops_tap_and_mac_and_keeps_limits() {
        let mac: net::MacAddr = "02:00:00:00:00:01".parse().unwrap();

        assert_eq!(
            clone_net("tap=tap0,mac=52:54:00:00:00:01,rx-bw=1M", mac),
            "mac=02:00:00:00:00:01,rx-bw=1M"
        );
        assert_eq!(clone_net("", mac), "mac=02:00:00:00:00:01");
    }
}
