//! Image formats: probing (raw or qcow2), opening with backing chains, and the operations
//! behind `ferrite disk create|info|convert`.
//!
//! Security note on probing: a raw image is probed by its first bytes, and a guest can write
//! anything there, including a qcow2 header naming a host file (say `/etc/shadow`) as its
//! backing file. If such a disk is later opened by probing, it is treated as qcow2 and the
//! guest reads that host file. Probing changes nothing about a raw image itself (only the
//! magic decides), but users must give `format=raw` for every raw disk a guest can write to.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::DiskBackend;
use crate::qcow2::{self, CreateOptions, Qcow2Disk, QCOW_MAGIC};
use crate::raw::RawDisk;
use crate::{DiskError, Result};

/// Longest backing chain followed (a longer one is treated as a loop).
pub const MAX_CHAIN_DEPTH: usize = 16;
/// Writes one piece of a converted image at an offset.
type ChunkWriter = dyn Fn(u64, &[u8]) -> Result<()>;
/// Convert copies in pieces of this size and skips pieces that are all zeroes.
const CONVERT_CHUNK: usize = 64 * 1024;

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Guest sector N is file byte N * 512.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// The name used on the command line and in qcow2 headers.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(DiskError::InvalidArgument(format!(
                "unknown image format '{other}' (expected raw or qcow2)"
            ))),
        }
    }
}

fn open_err(path: &Path, source: std::io::Error) -> DiskError {
    DiskError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Guess the format of `path` from its first bytes: the qcow2 magic means qcow2, anything
/// else raw. See the module comment for why a guest-writable raw disk needs `format=raw`.
pub fn probe_format(path: &Path) -> Result<ImageFormat> {
    let mut f = File::open(path).map_err(|e| open_err(path, e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DiskError::Io(e)),
        }
    }
    Ok(if got == 4 && magic == QCOW_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Where the backing file named `name` in the image at `image` is: relative names resolve
/// against the image's directory (as QEMU does).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn backing_format(image: &Path, recorded: Option<&str>, backing: &Path) -> Result<ImageFormat> {
    match recorded {
        None => probe_format(backing),
        Some(name) => name.parse().map_err(|_| DiskError::UnsupportedFeature {
            path: image.to_path_buf(),
            feature: format!("backing file format '{name}'"),
        }),
    }
}

/// Open a disk image read-write (exclusive lock) or read-only (shared lock). `format` forces
/// the format; `None` probes the qcow2 magic. A qcow2 image's backing chain is opened
/// read-only (shared locks), relative names resolved against each image's directory.
pub fn open_image(
    path: impl AsRef<Path>,
    read_only: bool,
    format: Option<ImageFormat>,
) -> Result<Arc<dyn DiskBackend>> {
    let mut visited = Vec::new();
    open_chain(path.as_ref(), read_only, format, &mut visited)
}

fn open_chain(
    path: &Path,
    read_only: bool,
    format: Option<ImageFormat>,
    visited: &mut Vec<PathBuf>,
) -> Result<Arc<dyn DiskBackend>> {
    let canonical = path.canonicalize().map_err(|e| open_err(path, e))?;
    if visited.contains(&canonical) {
        return Err(DiskError::BackingChain {
            path: path.to_path_buf(),
            reason: "the backing chain loops back to this image".into(),
        });
    }
    if visited.len() >= MAX_CHAIN_DEPTH {
        return Err(DiskError::BackingChain {
            path: path.to_path_buf(),
            reason: format!("more than {MAX_CHAIN_DEPTH} images in the chain"),
        });
    }
    visited.push(canonical);
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    match format {
        ImageFormat::Raw => Ok(Arc::new(RawDisk::open(path, read_only)?)),
        ImageFormat::Qcow2 => {
            let f = File::open(path).map_err(|e| open_err(path, e))?;
            let header = qcow2::read_header(&f, path)?;
            drop(f);
            let backing = match &header.backing_file {
                None => None,
                Some(name) => {
                    let bpath = resolve_backing(path, name);
                    if !bpath.exists() {
                        return Err(DiskError::BackingChain {
                            path: path.to_path_buf(),
                            reason: format!("backing file {} not found", bpath.display()),
                        });
                    }
                    let bfmt = backing_format(path, header.backing_format.as_deref(), &bpath)?;
                    Some(open_chain(&bpath, true, Some(bfmt), visited)?)
                }
            };
            Ok(Arc::new(Qcow2Disk::open(path, read_only, backing)?))
        }
    }
}

/// One image of a backing chain, for `disk info`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainEntry {
    /// The resolved path.
    pub path: PathBuf,
    /// Its format (recorded or probed).
    pub format: ImageFormat,
}

/// What `ferrite disk info` shows about an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    /// The image path.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Host bytes allocated to the file.
    pub disk_size: u64,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2 version (2 or 3).
    pub qcow2_version: Option<u32>,
    /// qcow2 refcount width in bits.
    pub refcount_bits: Option<u32>,
    /// qcow2 dirty bit (lazy refcounts not written back).
    pub dirty: bool,
    /// qcow2 corrupt bit.
    pub corrupt: bool,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Backing file name as recorded.
    pub backing_file: Option<String>,
    /// Backing format as recorded.
    pub backing_format: Option<String>,
    /// The backing chain below this image, nearest first.
    pub backing_chain: Vec<ChainEntry>,
}

/// Describe the image at `path` (no lock taken: only metadata is read).
pub fn image_info(path: &Path, format: Option<ImageFormat>) -> Result<ImageInfo> {
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    let f = File::open(path).map_err(|e| open_err(path, e))?;
    let meta = f.metadata().map_err(|e| open_err(path, e))?;
    let mut info = ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size: meta.len(),
        disk_size: meta.blocks() * 512,
        cluster_size: None,
        qcow2_version: None,
        refcount_bits: None,
        dirty: false,
        corrupt: false,
        snapshots: 0,
        backing_file: None,
        backing_format: None,
        backing_chain: Vec::new(),
    };
    if format == ImageFormat::Raw {
        return Ok(info);
    }
    let h = qcow2::read_header_for_info(&f, path)?;
    info.virtual_size = h.size;
    info.cluster_size = Some(h.cluster_size());
    info.qcow2_version = Some(h.version);
    info.refcount_bits = Some(h.refcount_bits());
    info.dirty = h.incompatible_features & qcow2::INCOMPAT_DIRTY != 0;
    info.corrupt = h.incompatible_features & qcow2::INCOMPAT_CORRUPT != 0;
    info.snapshots = h.nb_snapshots;
    info.backing_file = h.backing_file.clone();
    info.backing_format = h.backing_format.clone();
    info.backing_chain = backing_chain(path, &h)?;
    Ok(info)
}

fn backing_chain(path: &Path, top: &qcow2::Header) -> Result<Vec<ChainEntry>> {
    let mut chain = Vec::new();
    let mut visited = vec![path.canonicalize().map_err(|e| open_err(path, e))?];
    let mut cur_path = path.to_path_buf();
    let mut cur = top.clone();
    while let Some(name) = cur.backing_file.clone() {
        let bpath = resolve_backing(&cur_path, &name);
        let canonical = bpath.canonicalize().map_err(|_| DiskError::BackingChain {
            path: cur_path.clone(),
            reason: format!("backing file {} not found", bpath.display()),
        })?;
        if visited.contains(&canonical) || visited.len() > MAX_CHAIN_DEPTH {
            return Err(DiskError::BackingChain {
                path: cur_path,
                reason: "the backing chain loops or is too deep".into(),
            });
        }
        visited.push(canonical);
        let fmt = backing_format(&cur_path, cur.backing_format.as_deref(), &bpath)?;
        chain.push(ChainEntry {
            path: bpath.clone(),
            format: fmt,
        });
        if fmt == ImageFormat::Raw {
            break;
        }
        let f = File::open(&bpath).map_err(|e| open_err(&bpath, e))?;
        cur = qcow2::read_header_for_info(&f, &bpath)?;
        cur_path = bpath;
    }
    Ok(chain)
}

/// What `ferrite disk create` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// Output format.
    pub format: ImageFormat,
    /// Virtual size; `None` takes the backing image's size.
    pub size: Option<u64>,
    /// Backing file as it is to be recorded (qcow2 only).
    pub backing: Option<String>,
    /// Backing format; `None` probes it (and records the result).
    pub backing_format: Option<ImageFormat>,
    /// Overwrite an existing file.
    pub force: bool,
}

/// A temporary file next to the destination that is renamed over it on success and removed
/// otherwise, so nothing half-written stays behind.
pub(crate) struct TempOutput {
    tmp: PathBuf,
    dst: PathBuf,
    file: Option<File>,
    done: bool,
}

impl TempOutput {
    pub(crate) fn new(dst: &Path, force: bool) -> Result<Self> {
        if !force && dst.symlink_metadata().is_ok() {
            return Err(DiskError::Exists(dst.to_path_buf()));
        }
        let name = dst.file_name().ok_or_else(|| {
            DiskError::InvalidArgument(format!("{} is not a file name", dst.display()))
        })?;
        let tmp = dst.with_file_name(format!(
            ".{}.ferrite-tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| open_err(&tmp, e))?;
        Ok(Self {
            tmp,
            dst: dst.to_path_buf(),
            file: Some(file),
            done: false,
        })
    }

    pub(crate) fn file(&self) -> Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| DiskError::InvalidArgument("output already closed".into()))
    }

    pub(crate) fn commit(mut self) -> Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_all()?;
        }
        std::fs::rename(&self.tmp, &self.dst).map_err(|e| open_err(&self.dst, e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Create an empty image (see [`CreateSpec`]).
pub fn create_image(path: &Path, spec: &CreateSpec) -> Result<()> {
    if spec.format == ImageFormat::Raw && spec.backing.is_some() {
        return Err(DiskError::InvalidArgument(
            "a raw image cannot have a backing file (use --format qcow2)".into(),
        ));
    }
    let mut backing_format = None;
    let mut backing_size = None;
    if let Some(name) = &spec.backing {
        let bpath = resolve_backing(path, name);
        if !bpath.exists() {
            return Err(DiskError::BackingChain {
                path: path.to_path_buf(),
                reason: format!("backing file {} not found", bpath.display()),
            });
        }
        let fmt = match spec.backing_format {
            Some(f) => f,
            None => probe_format(&bpath)?,
        };
        // Opening the whole chain checks it (formats, loops) and gives the size.
        let b = open_image(&bpath, true, Some(fmt))?;
        backing_format = Some(fmt);
        backing_size = Some(b.size());
    }
    let size = match (spec.size, backing_size) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => {
            return Err(DiskError::InvalidArgument(
                "a size is needed when there is no backing file".into(),
            ))
        }
    };
    let size = size.div_ceil(512) * 512;
    let out = TempOutput::new(path, spec.force)?;
    match spec.format {
        ImageFormat::Raw => out.file()?.set_len(size)?,
        ImageFormat::Qcow2 => {
            let mut opts = CreateOptions::new(size);
            opts.backing_file = spec.backing.clone();
            opts.backing_format = backing_format.map(|f| f.name().to_string());
            qcow2::create_qcow2(out.file()?, &opts)?;
        }
    }
    out.commit()
}

/// Copy the guest-visible contents of `src` (any supported format, backing chain included)
/// into a new image `dst` of `out_format`, writing no all-zero pieces (sparse output).
pub fn convert_image(
    src: &Path,
    src_format: Option<ImageFormat>,
    dst: &Path,
    out_format: ImageFormat,
    force: bool,
) -> Result<()> {
    if dst.exists() && dst.canonicalize().ok() == src.canonicalize().ok() {
        return Err(DiskError::InvalidArgument(
            "source and destination are the same file".into(),
        ));
    }
    copy_image(src, src_format, dst, out_format, force)
}

/// The copy behind [`convert_image`] and flattening: the output goes to a temporary file
/// renamed over `dst` at the end, so `dst` may be `src` itself (replaced in place; the
/// input stays open across the rename).
pub(crate) fn copy_image(
    src: &Path,
    src_format: Option<ImageFormat>,
    dst: &Path,
    out_format: ImageFormat,
    force: bool,
) -> Result<()> {
    let input = open_image(src, true, src_format)?;
    let size = input.size();
    let out = TempOutput::new(dst, force)?;
    let writer: Box<ChunkWriter> = match out_format {
        ImageFormat::Raw => {
            let f = out.file()?.try_clone()?;
            f.set_len(size)?;
            Box::new(move |off, data| Ok(f.write_all_at(data, off)?))
        }
        ImageFormat::Qcow2 => {
            qcow2::create_qcow2(out.file()?, &CreateOptions::new(size))?;
            let disk = Qcow2Disk::open(&out.tmp, false, None)?;
            Box::new(move |off, data| disk.write_at(off, data))
        }
    };
    let mut buf = vec![0u8; CONVERT_CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CONVERT_CHUNK as u64) as usize;
        input.read_at(off, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            writer(off, &buf[..n])?;
        }
        off += n as u64;
    }
    drop(writer);
    out.commit()
}
