//! Writing a new, empty qcow2 v3 image: header (with the backing file name and format),
//! refcount table sized for the fully allocated image, refcount blocks for the metadata, and
//! an empty L1 table.
//!
//! Layout: cluster 0 header | refcount table | refcount blocks | L1 table.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::header::{self, Header, V3_HEADER_LEN};
use super::refcount::set_entry;
use crate::{DiskError, Result};

/// Default cluster size: 64 KiB, as QEMU.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Refcount width we write: 16 bits, as QEMU.
const REFCOUNT_ORDER: u32 = 4;

/// What a new qcow2 image looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Backing file name as it is to be recorded (relative names resolve against the
    /// image's directory).
    pub backing_file: Option<String>,
    /// Backing file format ("raw" or "qcow2") to record.
    pub backing_format: Option<String>,
}

impl CreateOptions {
    /// An image of `size` bytes with 64 KiB clusters and no backing file.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_bits: DEFAULT_CLUSTER_BITS,
            backing_file: None,
            backing_format: None,
        }
    }
}

fn invalid(msg: String) -> DiskError {
    DiskError::InvalidArgument(msg)
}

/// Write an empty qcow2 image into `file` (which should be empty; it is resized).
pub fn create_qcow2(file: &File, opts: &CreateOptions) -> Result<()> {
    let cb = opts.cluster_bits;
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cb) {
        return Err(invalid(format!("cluster size 2^{cb} outside 512 B..2 MiB")));
    }
    if opts.size > header::MAX_VIRTUAL_SIZE {
        return Err(invalid(format!("size {} too large", opts.size)));
    }
    let cs = 1u64 << cb;
    let l2_entries = cs / 8;
    let l1_entries = opts.size.div_ceil(cs * l2_entries).max(1);
    if l1_entries * 8 > header::MAX_L1_BYTES {
        return Err(invalid(format!(
            "size {} needs an L1 table over 32 MiB; use larger clusters",
            opts.size
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let epb = cs * 8 / (1 << REFCOUNT_ORDER);

    // Refcount table big enough for the fully allocated image (data, L2 tables, metadata),
    // so that it never has to grow.
    let base = 1 + opts.size.div_ceil(cs) + l1_entries + l1_clusters;
    let mut table_clusters = 1u64;
    for _ in 0..8 {
        let total = base + table_clusters + (base + table_clusters).div_ceil(epb) + 16;
        let blocks = total.div_ceil(epb);
        table_clusters = (blocks * 8).div_ceil(cs).max(1);
    }
    if table_clusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(invalid(format!(
            "size {} needs a refcount table over 8 MiB; use larger clusters",
            opts.size
        )));
    }
    // Refcount blocks covering the initial metadata (which includes themselves).
    let mut blocks = 1u64;
    for _ in 0..8 {
        blocks = (1 + table_clusters + blocks + l1_clusters).div_ceil(epb);
    }
    let meta_clusters = 1 + table_clusters + blocks + l1_clusters;

    let table_off = cs;
    let blocks_off = table_off + table_clusters * cs;
    let l1_off = blocks_off + blocks * cs;

    let mut hdr = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size: opts.size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: table_off,
        refcount_table_clusters: table_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: V3_HEADER_LEN,
        compression_type: 0,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
    };
    if let Some(name) = &opts.backing_file {
        let ext = opts
            .backing_format
            .as_ref()
            .map(|f| 8 + f.len().div_ceil(8) * 8)
            .unwrap_or(0);
        let name_off = u64::from(V3_HEADER_LEN) + ext as u64 + 8;
        if name.is_empty() || name.len() > header::MAX_BACKING_NAME as usize {
            return Err(invalid("backing file name must be 1..1023 bytes".into()));
        }
        if name_off + name.len() as u64 > cs {
            return Err(invalid(
                "backing file name does not fit in the header cluster; use larger clusters".into(),
            ));
        }
        hdr.backing_file_offset = name_off;
        hdr.backing_file_size = name.len() as u32;
    }

    file.set_len(0)?;
    file.set_len(meta_clusters * cs)?;
    let mut first = vec![0u8; cs as usize];
    hdr.encode(&mut first);

    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for i in 0..blocks {
        header::put64(&mut table, i as usize * 8, blocks_off + i * cs);
    }
    let mut block_bytes = vec![0u8; (blocks * cs) as usize];
    for c in 0..meta_clusters {
        let b = (c / epb) as usize;
        let chunk = &mut block_bytes[b * cs as usize..(b + 1) * cs as usize];
        set_entry(chunk, c % epb, REFCOUNT_ORDER, 1);
    }
    // Tables first, header last: until the header is written the file is not a qcow2 image.
    file.write_all_at(&table, table_off)?;
    file.write_all_at(&block_bytes, blocks_off)?;
    file.write_all_at(&first, 0)?;
    file.sync_all()?;
    Ok(())
}
