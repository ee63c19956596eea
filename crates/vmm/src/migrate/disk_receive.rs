//! Block migration, destination side: the images the received disk contents go into. They
//! are created in the destination's own directory (`--incoming-disk-dir`), never at a path
//! the source chose; every write is checked against the announced size; and until the
//! source commits they are removed again whatever ends the migration.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::{DiskBackend, ImageFormat};
use migration::wire::{self, DiskInfo, DISK_SECTOR};

use crate::config::VmConfig;

/// One image being received.
struct Image {
    path: PathBuf,
    /// Open while blocks arrive; closed (flushed, unlocked) before the VM opens it.
    backend: Option<Arc<dyn DiskBackend>>,
}

/// The images of a block migration on the destination. Dropped before [`Self::keep`], it
/// removes them: nothing half-received stays behind.
pub struct ReceivedDisks {
    announced: Vec<DiskInfo>,
    images: Vec<Image>,
    kept: bool,
}

impl ReceivedDisks {
    /// Check the disks the source announces against its configuration, create an empty
    /// image of the announced format and size for each as `dir/<its file name>` (refusing
    /// a name that exists there), and point the configuration's disks at them. The error
    /// says what to fix; whatever was created is removed again.
    pub fn create(
        dir: Option<&Path>,
        announced: &[DiskInfo],
        config: &mut VmConfig,
    ) -> Result<Self, String> {
        let mut out = Self {
            announced: announced.to_vec(),
            images: Vec::new(),
            kept: false,
        };
        if announced.is_empty() {
            return Ok(out);
        }
        let dir = dir.ok_or_else(|| {
            "the source copies its disks, but this destination has no place for them: start \
             it with --incoming-disk-dir DIR"
                .to_string()
        })?;
        let mut planned: Vec<(usize, PathBuf, ImageFormat, u64)> = Vec::new();
        for d in announced {
            let index = d.index as usize;
            let disk = config.disks.get(index).ok_or_else(|| {
                format!(
                    "the source announces disk {index}, but its configuration has {} disks",
                    config.disks.len()
                )
            })?;
            if disk.readonly || planned.iter().any(|p| p.0 == index) {
                return Err(format!(
                    "disk {index} is announced twice or is read-only (not copied)"
                ));
            }
            if d.virtual_size == 0 || !d.virtual_size.is_multiple_of(DISK_SECTOR) {
                return Err(format!(
                    "disk {index} has a size of {} bytes, not a positive multiple of 512",
                    d.virtual_size
                ));
            }
            let format: ImageFormat = d.format.parse().map_err(|e| format!("disk {index}: {e}"))?;
            let name = disk.path.file_name().ok_or_else(|| {
                format!("disk {index} ({}) has no file name", disk.path.display())
            })?;
            let path = dir.join(name);
            if planned.iter().any(|p| p.1 == path) {
                return Err(format!(
                    "two disks would both be {} here: give the source's disks distinct file names",
                    path.display()
                ));
            }
            if path.symlink_metadata().is_ok() {
                return Err(format!(
                    "{} already exists on the destination: remove it or give another \
                     --incoming-disk-dir",
                    path.display()
                ));
            }
            planned.push((index, path, format, d.virtual_size));
        }
        for (index, path, format, size) in planned {
            let backend = create_image(&path, format, size)
                .map_err(|e| format!("cannot create disk {index} as {}: {e}", path.display()));
            // Created files are recorded before anything else can fail, so drop removes them.
            let created = path.symlink_metadata().is_ok();
            if created {
                out.images.push(Image {
                    path: path.clone(),
                    backend: None,
                });
            }
            let backend = backend?;
            if let Some(img) = out.images.last_mut() {
                img.backend = Some(backend);
            }
            let disk = &mut config.disks[index];
            disk.path = path;
            disk.format = Some(format);
        }
        Ok(out)
    }

    fn target(&self, disk: u32, offset: u64, len: u64) -> Result<&Arc<dyn DiskBackend>, String> {
        wire::disk_bounds(&self.announced, disk, offset, len).map_err(|e| e.to_string())?;
        self.images
            .get(disk as usize)
            .and_then(|i| i.backend.as_ref())
            .ok_or_else(|| format!("disk data for disk {disk}, which is not open here"))
    }

    /// Write `data` at `offset` of disk `disk` (position in the hello's list), checked
    /// against its announced size first.
    pub fn write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        self.target(disk, offset, data.len() as u64)?
            .write_at(offset, data)
            .map_err(|e| format!("cannot write disk {disk} at {offset:#x}: {e}"))
    }

    /// Make `len` bytes at `offset` of disk `disk` read as zeroes.
    pub fn zero(&self, disk: u32, offset: u64, len: u64) -> Result<(), String> {
        self.target(disk, offset, len)?
            .write_zeroes(offset, len)
            .map_err(|e| format!("cannot zero disk {disk} at {offset:#x}: {e}"))
    }

    /// Make what was written so far durable.
    pub fn flush(&self) -> Result<(), String> {
        for img in &self.images {
            if let Some(b) = &img.backend {
                b.flush()
                    .map_err(|e| format!("cannot flush {}: {e}", img.path.display()))?;
            }
        }
        Ok(())
    }

    /// All blocks arrived: flush the images and close them (the VM opens them next).
    pub fn close(&mut self) -> Result<(), String> {
        for img in &mut self.images {
            if let Some(b) = img.backend.take() {
                b.flush()
                    .map_err(|e| format!("cannot flush {}: {e}", img.path.display()))?;
            }
        }
        Ok(())
    }

    /// The source committed: the images are this destination's from now on.
    pub fn keep(mut self) {
        self.kept = true;
        let paths: Vec<String> = self
            .images
            .iter()
            .map(|i| i.path.display().to_string())
            .collect();
        if !paths.is_empty() {
            tracing::info!(disks = ?paths, "received disks kept");
        }
    }
}

impl Drop for ReceivedDisks {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for img in self.images.drain(..) {
            drop(img.backend);
            match std::fs::remove_file(&img.path) {
                Ok(()) => tracing::info!(
                    path = %img.path.display(),
                    "migration did not complete: removed the received disk"
                ),
                Err(e) => tracing::warn!(
                    "cannot remove the half-received disk {}: {e}",
                    img.path.display()
                ),
            }
        }
    }
}

/// Create an empty standalone image (a sparse raw file, or a qcow2 image without a backing
/// file) and open it for writing. Never overwrites: the file must not exist.
fn create_image(
    path: &Path,
    format: ImageFormat,
    size: u64,
) -> Result<Arc<dyn DiskBackend>, disk::DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => disk::DiskError::Exists(path.to_path_buf()),
            _ => disk::DiskError::Open {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    match format {
        ImageFormat::Raw => file.set_len(size)?,
        ImageFormat::Qcow2 => {
            disk::qcow2::create_qcow2(&file, &disk::qcow2::CreateOptions::new(size))?
        }
    }
    drop(file);
    disk::open_image(path, false, Some(format))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;
    use vmm_sys_util::tempdir::TempDir;

    fn config_with(disks: &[&str]) -> VmConfig {
        VmConfig {
            disks: disks
                .iter()
                .map(|d| DiskConfig::parse(d).unwrap())
                .collect(),
            ..VmConfig::default()
        }
    }

    fn announced(index: u32, format: &str) -> DiskInfo {
        DiskInfo {
            index,
            virtual_size: 1 << 20,
            format: format.into(),
        }
    }

    #[test]
    fn test_images_are_created_in_the_dir_and_removed_unless_kept() {
        // Arrange
        let dir = TempDir::new().unwrap();
        let mut config = config_with(&["/src/a.img", "/src/b.qcow2", "/src/iso,readonly"]);
        let list = [announced(0, "raw"), announced(1, "qcow2")];

        // Act
        let disks = ReceivedDisks::create(Some(dir.as_path()), &list, &mut config).unwrap();
        disks.write(0, 512, &[7; 512]).unwrap();
        let outside = disks.write(0, 1 << 20, &[7; 512]).unwrap_err();
        let created: Vec<bool> = ["a.img", "b.qcow2"]
            .iter()
            .map(|n| dir.as_path().join(n).exists())
            .collect();
        drop(disks);

        // Assert
        assert_eq!(created, [true, true]);
        assert_eq!(config.disks[0].path, dir.as_path().join("a.img"));
        assert_eq!(config.disks[1].format, Some(ImageFormat::Qcow2));
        assert_eq!(config.disks[2].path, Path::new("/src/iso"));
        assert!(outside.contains("outside disk 0"), "{outside}");
        assert!(!dir.as_path().join("a.img").exists());
        assert!(!dir.as_path().join("b.qcow2").exists());
    }

    #[test]
    fn test_kept_images_stay() {
        let dir = TempDir::new().unwrap();
        let mut config = config_with(&["/src/a.img"]);

        let disks = ReceivedDisks::create(Some(dir.as_path()), &[announced(0, "raw")], &mut config)
            .unwrap();
        disks.keep();

        assert!(dir.as_path().join("a.img").exists());
    }

    #[test]
    fn test_impossible_requests_are_refused_and_leave_nothing() {
        // Arrange: a file in the way of the second disk.
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.as_path().join("b.img"), b"keep").unwrap();
        let two = ["/src/a.img", "/src/b.img"];
        let list = [announced(0, "raw"), announced(1, "raw")];

        // Act
        let exists =
            ReceivedDisks::create(Some(dir.as_path()), &list, &mut config_with(&two)).err();
        let no_dir = ReceivedDisks::create(None, &list, &mut config_with(&two)).err();
        let ro = ReceivedDisks::create(
            Some(dir.as_path()),
            &[announced(0, "raw")],
            &mut config_with(&["/src/c.img,readonly"]),
        )
        .err();
        let beyond = ReceivedDisks::create(
            Some(dir.as_path()),
            &[announced(5, "raw")],
            &mut config_with(&two),
        )
        .err();

        // Assert
        assert!(exists.unwrap().contains("already exists"));
        assert!(no_dir.unwrap().contains("--incoming-disk-dir"));
        assert!(ro.unwrap().contains("read-only"));
        assert!(beyond.unwrap().contains("2 disks"));
        assert!(!dir.as_path().join("a.img").exists());
        assert_eq!(std::fs::read(dir.as_path().join("b.img")).unwrap(), b"keep");
    }
}
