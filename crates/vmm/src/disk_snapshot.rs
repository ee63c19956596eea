//! Live external disk snapshots: with the VM paused and every block device idle, each
//! writable disk gets a new qcow2 overlay over its current image and switches to it; the old
//! image becomes a read-only backing file. All disks switch or none does.

use std::sync::Arc;

use disk::{CurrentImage, ImageFormat, LockMode, SwappableDisk};
use serde_json::{json, Value};

/// Longest snapshot tag.
pub const MAX_TAG_LEN: usize = 64;

/// One disk of a running VM as the snapshot code sees it.
#[derive(Clone)]
pub struct LiveDisk {
    /// The device's image, switchable.
    pub disk: Arc<SwappableDisk>,
    /// Attached read-only (never snapshotted: it does not change).
    pub readonly: bool,
}

/// Check a snapshot tag: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && !tag.starts_with('.')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "Snapshot tag {tag:?} is not valid: use 1 to {MAX_TAG_LEN} letters, digits, '.', '_' \
             or '-' (not starting with '.')"
        ))
    }
}

/// A disk whose overlay is created and opened but not yet switched to.
struct Prepared {
    index: usize,
    disk: Arc<SwappableDisk>,
    old: CurrentImage,
    new: CurrentImage,
}

impl Prepared {
    /// Undo everything but the switch: close the overlay, make the old image writable again,
    /// delete the overlay file.
    fn roll_back(self) -> Option<String> {
        let Prepared { old, new, .. } = self;
        let overlay = new.path.clone();
        drop(new);
        let relock = old.backend.relock(LockMode::Write).err();
        let _ = std::fs::remove_file(&overlay);
        relock.map(|e| {
            format!(
                "{} could not be made writable again ({e}); restart the VM",
                old.path.display()
            )
        })
    }
}

fn prepare(index: usize, disk: &Arc<SwappableDisk>, tag: &str) -> Result<Prepared, String> {
    let old = disk.current();
    let name = |e: disk::DiskError| format!("disk{index} ({}): {e}", old.path.display());
    old.backend.flush().map_err(name)?;
    let overlay = disk::overlay_path(&old.path, tag);
    if overlay.symlink_metadata().is_ok() {
        return Err(format!(
            "disk{index}: {} already exists: choose another tag",
            overlay.display()
        ));
    }
    let size = old.backend.size();
    disk::create_overlay(&overlay, &old.path, old.format, size).map_err(name)?;
    let opened = old.backend.relock(LockMode::Read).and_then(|()| {
        let backend = disk::open_image(&overlay, false, Some(ImageFormat::Qcow2))?;
        if backend.size() != size {
            return Err(disk::DiskError::InvalidArgument(format!(
                "the overlay has {} bytes, the disk {size}",
                backend.size()
            )));
        }
        Ok(backend)
    });
    match opened {
        Ok(backend) => Ok(Prepared {
            index,
            disk: disk.clone(),
            old,
            new: CurrentImage {
                backend,
                path: overlay,
                format: ImageFormat::Qcow2,
            },
        }),
        Err(e) => {
            let _ = old.backend.relock(LockMode::Write);
            let _ = std::fs::remove_file(&overlay);
            Err(name(e))
        }
    }
}

/// Put a new overlay tagged `tag` on every writable disk and switch to it, all or nothing.
/// The caller has paused the vCPUs and every block device (no request in flight). Returns the
/// reply's `disks` list (index, new image, its backing file).
pub fn take(disks: &[LiveDisk], tag: &str) -> Result<Value, (&'static str, String)> {
    check_tag(tag).map_err(|m| ("bad-request", m))?;
    if disks.iter().all(|d| d.readonly) {
        return Err((
            "not-supported",
            "This VM has no writable disk to snapshot".to_string(),
        ));
    }
    let mut prepared = Vec::new();
    for (index, d) in disks.iter().enumerate().filter(|(_, d)| !d.readonly) {
        match prepare(index, &d.disk, tag) {
            Ok(p) => prepared.push(p),
            Err(message) => {
                let mut message = format!("Disk snapshot failed, no disk changed: {message}");
                for p in prepared {
                    if let Some(e) = p.roll_back() {
                        message.push_str("; ");
                        message.push_str(&e);
                    }
                }
                return Err(("disk-snapshot-failed", message));
            }
        }
    }
    // Switching cannot fail: from here every disk moves to its overlay.
    let report = prepared
        .into_iter()
        .map(|p| {
            let old = p.disk.swap(p.new.clone());
            json!({"index": p.index, "path": p.new.path, "backing": old.path})
        })
        .collect::<Vec<_>>();
    Ok(Value::Array(report))
}

/// Each disk's chain, top image first (`index`, `readonly`, `chain`: path and format).
pub fn chains(disks: &[LiveDisk]) -> Result<Value, (&'static str, String)> {
    disks
        .iter()
        .enumerate()
        .map(|(index, d)| {
            let cur = d.disk.current();
            let chain = disk::image_chain(&cur.path, Some(cur.format))
                .map_err(|e| ("disk-error", format!("disk{index}: {e}")))?;
            Ok(json!({"index": index, "readonly": d.readonly, "chain": chain}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `config` with every disk pointing at the image it uses now.
pub fn current_config(config: &crate::VmConfig, disks: &[LiveDisk]) -> crate::VmConfig {
    let mut config = config.clone();
    for (d, live) in config.disks.iter_mut().zip(disks) {
        let cur = live.disk.current();
        d.path = cur.path;
        d.format = Some(cur.format);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_check_tag_refuses_path_characters() {
        assert!(check_tag("before-upgrade_1.0").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }
}
