//! External snapshot chains: new qcow2 overlays on top of an image, the chain from the top
//! overlay down to the base, reverting to an element of the chain, and flattening a chain
//! into one standalone image.

use std::path::{Path, PathBuf};

use crate::image::{
    convert_image, copy_image, image_info, probe_format, ChainEntry, ImageFormat, TempOutput,
};
use crate::qcow2::{self, CreateOptions};
use crate::swap::backing_name;
use crate::{open_image, DiskError, Result};

/// Create the qcow2 overlay `overlay` (which must not exist) of `size` bytes over `backing`
/// of format `backing_format`, recording the backing file by bare name when both share a
/// directory. The backing image is not opened (a running VM may hold it locked).
pub fn create_overlay(
    overlay: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    size: u64,
) -> Result<()> {
    let mut opts = CreateOptions::new(size);
    opts.backing_file = Some(backing_name(overlay, backing)?);
    opts.backing_format = Some(backing_format.name().to_string());
    let out = TempOutput::new(overlay, false)?;
    qcow2::create_qcow2(out.file()?, &opts)?;
    out.commit()
}

/// The overlay a snapshot tagged `tag` puts over `current`: next to it, named after the
/// disk's base name (the part before any `@tag` of an earlier snapshot), e.g.
/// `disk0.img` then `disk0@s1.qcow2` then `disk0@s2.qcow2`.
pub fn overlay_path(current: &Path, tag: &str) -> PathBuf {
    let stem = current
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".to_string());
    let base = stem.split('@').next().unwrap_or(&stem).to_string();
    current.with_file_name(format!("{base}@{tag}.qcow2"))
}

/// The chain of the image at `top`: `top` itself first, then each backing file down to the
/// base.
pub fn image_chain(top: &Path, format: Option<ImageFormat>) -> Result<Vec<ChainEntry>> {
    let info = image_info(top, format)?;
    let mut chain = vec![ChainEntry {
        path: top.to_path_buf(),
        format: info.format,
    }];
    chain.extend(info.backing_chain);
    Ok(chain)
}

/// Fail with a message naming the fix when a VM (or another process) has `path` open.
fn ensure_not_in_use(path: &Path, format: ImageFormat) -> Result<()> {
    match open_image(path, false, Some(format)) {
        Ok(_) => Ok(()),
        Err(DiskError::Locked { path }) => Err(DiskError::InUse(path)),
        Err(other) => Err(other),
    }
}

/// Where an element is in a chain: its index, or its path (as listed or canonically equal).
fn find_in_chain(chain: &[ChainEntry], to: &str) -> Result<usize> {
    if let Ok(i) = to.parse::<usize>() {
        if i < chain.len() {
            return Ok(i);
        }
        return Err(DiskError::InvalidArgument(format!(
            "the chain has {} images (0 is the top): there is no image {i}",
            chain.len()
        )));
    }
    let want = Path::new(to);
    let canonical = want.canonicalize().ok();
    chain
        .iter()
        .position(|e| {
            e.path == want || (canonical.is_some() && e.path.canonicalize().ok() == canonical)
        })
        .ok_or_else(|| {
            DiskError::InvalidArgument(format!(
                "{to} is not in this disk's chain (see `ferrite disk chain`)"
            ))
        })
}

/// What [`revert`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RevertOutcome {
    /// The new, empty top overlay (use it as the disk from now on).
    pub overlay: PathBuf,
    /// The chain element it sits on.
    pub base: PathBuf,
    /// The images that were above `base`: no longer part of the disk, kept on the host (other
    /// chains may use them) for the user to delete.
    pub detached: Vec<PathBuf>,
}

/// Revert the disk whose top image is `top` to the chain element `to` (an index from the top,
/// 0 = `top`, or a path): a new empty overlay `overlay` is created over that element, so
/// everything written above it is no longer seen. Nothing is deleted. Refused while any VM
/// has `top` open.
pub fn revert(
    top: &Path,
    format: Option<ImageFormat>,
    to: &str,
    overlay: &Path,
) -> Result<RevertOutcome> {
    let chain = image_chain(top, format)?;
    ensure_not_in_use(top, chain[0].format)?;
    let index = find_in_chain(&chain, to)?;
    let base = &chain[index];
    let size = open_image(&base.path, true, Some(base.format))?.size();
    create_overlay(overlay, &base.path, base.format, size)?;
    Ok(RevertOutcome {
        overlay: overlay.to_path_buf(),
        base: base.path.clone(),
        detached: chain[..index].iter().map(|e| e.path.clone()).collect(),
    })
}

/// Copy everything the guest sees through the chain of `top` into the standalone image
/// `out` of `out_format` (default: the top image's format), written as a temporary file and
/// renamed. Without `out`, `top`
/// itself is replaced by the standalone image (the images below it stay as they are).
/// Refused while any VM has `top` open.
pub fn flatten(
    top: &Path,
    format: Option<ImageFormat>,
    out: Option<&Path>,
    out_format: Option<ImageFormat>,
    force: bool,
) -> Result<PathBuf> {
    let format = match format {
        Some(f) => f,
        None => probe_format(top)?,
    };
    let out_format = out_format.unwrap_or(format);
    ensure_not_in_use(top, format)?;
    match out {
        Some(out) => {
            convert_image(top, Some(format), out, out_format, force)?;
            Ok(out.to_path_buf())
        }
        None => {
            copy_image(top, Some(format), top, out_format, true)?;
            Ok(top.to_path_buf())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create_image, CreateSpec};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrite-chain-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn raw_base(dir: &Path) -> PathBuf {
        let base = dir.join("base.img");
        let spec = CreateSpec {
            format: ImageFormat::Raw,
            size: Some(1 << 20),
            backing: None,
            backing_format: None,
            force: false,
        };
        create_image(&base, &spec).unwrap();
        base
    }

    #[test]
    fn test_overlay_path_replaces_an_earlier_tag() {
        assert_eq!(
            overlay_path(Path::new("/d/disk0.img"), "s1"),
            Path::new("/d/disk0@s1.qcow2")
        );
        assert_eq!(
            overlay_path(Path::new("/d/disk0@s1.qcow2"), "s2"),
            Path::new("/d/disk0@s2.qcow2")
        );
    }

    #[test]
    fn test_overlay_records_relative_backing_and_lists_chain_top_first() {
        // Arrange
        let dir = scratch("list");
        let base = raw_base(&dir);
        let top = dir.join("base@s1.qcow2");
        // Act
        create_overlay(&top, &base, ImageFormat::Raw, 1 << 20).unwrap();
        let chain = image_chain(&top, None).unwrap();
        // Assert
        let info = image_info(&top, None).unwrap();
        assert_eq!(info.backing_file.as_deref(), Some("base.img"));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        let paths: Vec<_> = chain.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, vec![top, base]);
    }

    #[test]
    fn test_revert_hides_writes_above_the_target_and_keeps_them_on_disk() {
        // Arrange
        let dir = scratch("revert");
        let base = raw_base(&dir);
        let top = dir.join("base@s1.qcow2");
        create_overlay(&top, &base, ImageFormat::Raw, 1 << 20).unwrap();
        open_image(&top, false, None)
            .unwrap()
            .write_at(0, &[7u8; 512])
            .unwrap();
        let new_top = dir.join("base@r1.qcow2");
        // Act
        let outcome = revert(&top, None, "1", &new_top).unwrap();
        // Assert
        let mut buf = [1u8; 512];
        open_image(&new_top, true, None)
            .unwrap()
            .read_at(0, &mut buf)
            .unwrap();
        assert_eq!(buf, [0u8; 512]);
        assert_eq!(outcome.detached, vec![top.clone()]);
        assert!(top.exists());
    }

    #[test]
    fn test_revert_refuses_an_image_in_use_and_names_it() {
        // Arrange
        let dir = scratch("busy");
        let base = raw_base(&dir);
        let top = dir.join("base@s1.qcow2");
        create_overlay(&top, &base, ImageFormat::Raw, 1 << 20).unwrap();
        let _running = open_image(&top, false, None).unwrap();
        // Act
        let err = revert(&top, None, "1", &dir.join("x.qcow2")).unwrap_err();
        // Assert
        assert!(matches!(err, DiskError::InUse(ref p) if p == &top), "{err}");
        assert!(!dir.join("x.qcow2").exists());
    }

    #[test]
    fn test_flatten_in_place_makes_a_standalone_image_with_the_same_data() {
        // Arrange
        let dir = scratch("flatten");
        let base = raw_base(&dir);
        open_image(&base, false, None)
            .unwrap()
            .write_at(4096, &[5u8; 512])
            .unwrap();
        let top = dir.join("base@s1.qcow2");
        create_overlay(&top, &base, ImageFormat::Raw, 1 << 20).unwrap();
        open_image(&top, false, None)
            .unwrap()
            .write_at(0, &[6u8; 512])
            .unwrap();
        // Act
        flatten(&top, None, None, None, false).unwrap();
        // Assert
        assert_eq!(image_chain(&top, None).unwrap().len(), 1);
        let disk = open_image(&top, true, None).unwrap();
        let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
        disk.read_at(0, &mut a).unwrap();
        disk.read_at(4096, &mut b).unwrap();
        assert_eq!((a, b), ([6u8; 512], [5u8; 512]));
    }
}
