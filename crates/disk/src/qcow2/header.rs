//! The qcow2 file header and its extensions: parsing with validation of every field (the image
//! is untrusted input) and encoding for newly created images.
//!
//! Layout from QEMU's `docs/interop/qcow2.txt` (all numbers big endian).

use std::path::Path;

use crate::{DiskError, Result};

/// "QFI\xfb": the first four bytes of every qcow image.
pub const QCOW_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest cluster size the spec allows (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size the spec allows (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Length of a v2 header (v3 adds fields up to `header_length`).
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the v3 header we write (with the compression type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limit on the L1 table (32 MiB); larger tables are refused before any allocation.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size we accept (QEMU's limit: 2^61 bytes minus a bit; we take 2^56).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// Incompatible feature bit 0: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension: end of the extension area.
const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: full disk encryption header.
const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The parsed and validated header of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method (0: none).
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Auto-clear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure (v3).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Backing file name as recorded (not resolved).
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if recorded.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

fn corrupt(path: &Path, reason: impl Into<String>) -> DiskError {
    DiskError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn unsupported(path: &Path, feature: impl Into<String>) -> DiskError {
    DiskError::UnsupportedFeature {
        path: path.to_path_buf(),
        feature: feature.into(),
    }
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parse and validate the header from the first cluster (or at least the first 4 KiB) of
    /// the image. `file_len` bounds every table offset. Unsupported incompatible features give
    /// [`DiskError::UnsupportedFeature`] naming the feature.
    pub fn parse(buf: &[u8], file_len: u64, path: &Path) -> Result<Self> {
        Self::parse_inner(buf, file_len, path, false)
    }

    /// Like [`Header::parse`] but accepts the dirty and corrupt bits, so that `disk info` can
    /// report them.
    pub fn parse_for_info(buf: &[u8], file_len: u64, path: &Path) -> Result<Self> {
        Self::parse_inner(buf, file_len, path, true)
    }

    fn parse_inner(buf: &[u8], file_len: u64, path: &Path, lenient: bool) -> Result<Self> {
        if buf.len() < V2_HEADER_LEN as usize || buf[..4] != QCOW_MAGIC {
            return Err(corrupt(path, "no qcow2 magic"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(path, format!("qcow version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(
                path,
                format!("cluster_bits {cluster_bits} outside 9..=21"),
            ));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
        };
        let cs = h.cluster_size();
        if buf.len() < (cs as usize).min(4096) {
            return Err(corrupt(path, "file shorter than one cluster"));
        }
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt(path, "truncated v3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104
                || u64::from(h.header_length) > cs
                || h.header_length as usize > buf.len()
            {
                return Err(corrupt(
                    path,
                    format!("header_length {} invalid", h.header_length),
                ));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        h.check_features(path, lenient)?;
        h.check_geometry(file_len, path)?;
        h.read_backing_name(buf, path)?;
        h.read_extensions(buf, path)?;
        Ok(h)
    }

    fn check_features(&self, path: &Path, lenient: bool) -> Result<()> {
        if self.crypt_method != 0 {
            return Err(unsupported(path, "encryption"));
        }
        let inc = self.incompatible_features;
        if inc & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(path, "external data file"));
        }
        if inc & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(path, "extended L2 entries (subclusters)"));
        }
        if inc & INCOMPAT_COMPRESSION != 0 || self.compression_type != 0 {
            let name = match self.compression_type {
                1 => "zstd compression".to_string(),
                t => format!("compression type {t}"),
            };
            return Err(unsupported(path, name));
        }
        if inc & INCOMPAT_CORRUPT != 0 && !lenient {
            return Err(corrupt(
                path,
                "the image is marked corrupt; repair it with `qemu-img check -r all`",
            ));
        }
        if inc & INCOMPAT_DIRTY != 0 && !lenient {
            // Lazy refcounts were in use and the image was not closed cleanly: its refcounts
            // may be stale. QEMU repairs this on open; we leave the repair to qemu-img.
            return Err(unsupported(
                path,
                "dirty bit (refcounts not up to date); repair with `qemu-img check -r all`",
            ));
        }
        let unknown = inc & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if unknown != 0 {
            return Err(unsupported(
                path,
                format!("unknown incompatible features {unknown:#x}"),
            ));
        }
        if self.refcount_order > 6 {
            return Err(corrupt(
                path,
                format!("refcount_order {} above 6", self.refcount_order),
            ));
        }
        Ok(())
    }

    fn check_geometry(&self, file_len: u64, path: &Path) -> Result<()> {
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(
                path,
                format!("virtual size {} too large", self.size),
            ));
        }
        let l2_entries = cs / 8;
        let needed_l1 = self.size.div_ceil(cs * l2_entries);
        if u64::from(self.l1_size) < needed_l1 {
            return Err(corrupt(
                path,
                format!(
                    "L1 table has {} entries, {needed_l1} needed for the size",
                    self.l1_size
                ),
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(
                path,
                format!("L1 table of {l1_bytes} bytes too large"),
            ));
        }
        check_table(
            "L1 table",
            self.l1_table_offset,
            l1_bytes,
            cs,
            file_len,
            path,
        )?;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(
                path,
                format!("refcount table of {rt_bytes} bytes invalid"),
            ));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
            path,
        )?;
        if overlaps(
            self.l1_table_offset,
            l1_bytes,
            self.refcount_table_offset,
            rt_bytes,
        ) {
            return Err(corrupt(path, "L1 table overlaps the refcount table"));
        }
        Ok(())
    }

    fn read_backing_name(&mut self, buf: &[u8], path: &Path) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = self.backing_file_size;
        if len == 0 || len > MAX_BACKING_NAME {
            return Err(corrupt(path, format!("backing file name length {len}")));
        }
        let start = self.backing_file_offset;
        let end = start + u64::from(len);
        if end > buf.len() as u64 || end > self.cluster_size() {
            return Err(corrupt(path, "backing file name outside the first cluster"));
        }
        let name = std::str::from_utf8(&buf[start as usize..end as usize])
            .map_err(|_| corrupt(path, "backing file name is not UTF-8"))?;
        self.backing_file = Some(name.to_string());
        Ok(())
    }

    fn read_extensions(&mut self, buf: &[u8], path: &Path) -> Result<()> {
        let mut off = self.header_length as usize;
        let limit = match self.backing_file_offset {
            0 => buf.len().min(self.cluster_size() as usize),
            b => (b as usize).min(buf.len()),
        };
        // Each extension takes at least 8 bytes, so this loop ends.
        while off + 8 <= limit {
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            let data = off + 8;
            if kind == EXT_END {
                return Ok(());
            }
            let Some(end) = data.checked_add(len).filter(|&e| e <= limit) else {
                return Err(corrupt(path, "header extension runs past the header area"));
            };
            match kind {
                EXT_BACKING_FORMAT => {
                    let fmt = std::str::from_utf8(&buf[data..end])
                        .map_err(|_| corrupt(path, "backing format is not UTF-8"))?;
                    self.backing_format = Some(fmt.to_string());
                }
                EXT_CRYPTO => return Err(unsupported(path, "encryption")),
                EXT_DATA_FILE => return Err(unsupported(path, "external data file")),
                _ => {}
            }
            off = end.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Encode a fresh v3 header with its extensions and backing file name into the first
    /// cluster (`buf.len()` = cluster size).
    pub fn encode(&self, buf: &mut [u8]) {
        buf.fill(0);
        buf[..4].copy_from_slice(&QCOW_MAGIC);
        put32(buf, 4, 3);
        put64(buf, 8, self.backing_file_offset);
        put32(buf, 16, self.backing_file_size);
        put32(buf, 20, self.cluster_bits);
        put64(buf, 24, self.size);
        put32(buf, 36, self.l1_size);
        put64(buf, 40, self.l1_table_offset);
        put64(buf, 48, self.refcount_table_offset);
        put32(buf, 56, self.refcount_table_clusters);
        put64(buf, 72, self.incompatible_features);
        put64(buf, 80, self.compatible_features);
        put64(buf, 88, self.autoclear_features);
        put32(buf, 96, self.refcount_order);
        put32(buf, 100, V3_HEADER_LEN);
        let mut off = V3_HEADER_LEN as usize;
        if let Some(fmt) = &self.backing_format {
            put32(buf, off, EXT_BACKING_FORMAT);
            put32(buf, off + 4, fmt.len() as u32);
            buf[off + 8..off + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
            off += 8 + fmt.len().div_ceil(8) * 8;
        }
        put32(buf, off, EXT_END);
        put32(buf, off + 4, 0);
        if let Some(name) = &self.backing_file {
            let start = self.backing_file_offset as usize;
            buf[start..start + name.len()].copy_from_slice(name.as_bytes());
        }
    }
}

fn check_table(what: &str, off: u64, len: u64, cs: u64, file_len: u64, path: &Path) -> Result<()> {
    if off == 0 || !off.is_multiple_of(cs) {
        return Err(corrupt(
            path,
            format!("{what} offset {off:#x} not cluster aligned or zero"),
        ));
    }
    match off.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(corrupt(
            path,
            format!("{what} at {off:#x} extends beyond the end of the file"),
        )),
    }
}

/// Whether `[a, a+alen)` and `[b, b+blen)` intersect.
pub fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Store `v` big endian at `off`.
pub fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Store `v` big endian at `off`.
pub fn put64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Read a big-endian u64 at `off` (callers guarantee the bounds).
pub fn get64(buf: &[u8], off: usize) -> u64 {
    be64(buf, off)
}
