//! Records of live disk snapshots: which overlay each disk of a VM moved to, and over which
//! image, so a stopped VM can be reverted to that point.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use crate::{is_extended, Store, StoreError, Tx};

/// One stored disk snapshot of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSnapshot {
    /// The VM it was taken of.
    pub vm: String,
    /// Its tag (unique per VM).
    pub tag: String,
    /// When it was taken (ms since the epoch).
    pub created_ms: i64,
    /// Per disk: `index`, the new top image `path`, the `backing` image it froze.
    pub disks: Value,
}

const COLUMNS: &str = "SELECT vm, tag, created_ms, disks FROM disk_snapshots";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, String)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn parse(row: (String, String, i64, String)) -> Result<DiskSnapshot, StoreError> {
    let (vm, tag, created_ms, disks) = row;
    let disks = serde_json::from_str(&disks).map_err(|source| StoreError::Json {
        vm: vm.clone(),
        field: "disk snapshot disks",
        source,
    })?;
    Ok(DiskSnapshot {
        vm,
        tag,
        created_ms,
        disks,
    })
}

impl Store {
    /// Records a disk snapshot and the VM's new definition (its disks on the new overlays)
    /// in one transaction; [`StoreError::SnapshotExists`] if the tag is taken,
    /// [`StoreError::NotFound`] if the VM does not exist.
    pub fn add_disk_snapshot(&self, snap: &DiskSnapshot, spec: &Value) -> Result<(), StoreError> {
        self.transaction(|tx| {
            tx.update_spec(&snap.vm, spec)?;
            tx.add_disk_snapshot(snap)
        })
    }

    /// The disk snapshots of VM `vm`, oldest first.
    pub fn list_disk_snapshots(&self, vm: &str) -> Result<Vec<DiskSnapshot>, StoreError> {
        self.transaction(|tx| tx.list_disk_snapshots(vm))
    }

    /// Disk snapshot `tag` of VM `vm`, if it exists.
    pub fn get_disk_snapshot(
        &self,
        vm: &str,
        tag: &str,
    ) -> Result<Option<DiskSnapshot>, StoreError> {
        self.transaction(|tx| tx.get_disk_snapshot(vm, tag))
    }
}

impl Tx<'_> {
    /// See [`Store::add_disk_snapshot`] (the record only).
    pub fn add_disk_snapshot(&self, snap: &DiskSnapshot) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO disk_snapshots (vm, tag, created_ms, disks) VALUES (?1, ?2, ?3, ?4)",
                params![snap.vm, snap.tag, snap.created_ms, snap.disks.to_string()],
            )
            .map_err(|e| {
                if is_extended(&e, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) {
                    StoreError::SnapshotExists {
                        vm: snap.vm.clone(),
                        name: snap.tag.clone(),
                    }
                } else if is_extended(&e, rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY) {
                    StoreError::NotFound(snap.vm.clone())
                } else {
                    self.sql(e)
                }
            })?;
        Ok(())
    }

    /// See [`Store::list_disk_snapshots`].
    pub fn list_disk_snapshots(&self, vm: &str) -> Result<Vec<DiskSnapshot>, StoreError> {
        let mut stmt = self
            .tx
            .prepare(&format!("{COLUMNS} WHERE vm = ?1 ORDER BY created_ms, tag"))
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([vm], from_row)
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        rows.into_iter().map(parse).collect()
    }

    /// See [`Store::get_disk_snapshot`].
    pub fn get_disk_snapshot(
        &self,
        vm: &str,
        tag: &str,
    ) -> Result<Option<DiskSnapshot>, StoreError> {
        self.tx
            .query_row(
                &format!("{COLUMNS} WHERE vm = ?1 AND tag = ?2"),
                [vm, tag],
                from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))?
            .map(parse)
            .transpose()
    }
}
