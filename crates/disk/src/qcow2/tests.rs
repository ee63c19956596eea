//! Unit tests: allocation arithmetic and hostile images (every bad field is a clear error,
//! never a panic or a huge allocation).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::tempdir::TempDir;

use super::create::{create_qcow2, CreateOptions};
use super::header::{put32, put64};
use super::*;
use crate::{open_image, DiskBackend, DiskError};

const CS: u64 = 65536;

fn new_image(dir: &Path, name: &str, opts: &CreateOptions) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    create_qcow2(&f, opts).unwrap();
    p
}

fn image(dir: &Path, size: u64) -> PathBuf {
    new_image(dir, "t.qcow2", &CreateOptions::new(size))
}

/// Overwrite header bytes.
fn patch(p: &Path, f: impl FnOnce(&mut [u8])) {
    let file = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut h = vec![0u8; 512];
    file.read_exact_at(&mut h, 0).unwrap();
    f(&mut h);
    file.write_all_at(&h, 0).unwrap();
}

fn open_err(p: &Path) -> DiskError {
    Qcow2Disk::open(p, true, None).unwrap_err()
}

fn header_of(p: &Path) -> Header {
    read_header(&File::open(p).unwrap(), p).unwrap()
}

#[test]
fn test_create_then_open_has_size_and_reads_zero() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 10 << 20);
    // Act
    let disk = Qcow2Disk::open(&p, true, None).unwrap();
    let mut buf = vec![1u8; 8192];
    disk.read_at((10 << 20) - 8192, &mut buf).unwrap();
    // Assert
    assert_eq!(disk.size(), 10 << 20);
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(disk.header().cluster_size(), CS);
}

#[test]
fn test_first_write_allocates_l2_and_data_cluster_only_once() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 4 << 20);
    let before = std::fs::metadata(&p).unwrap().len();
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    // Act
    disk.write_at(100, &[7u8; 200]).unwrap();
    let after_first = std::fs::metadata(&p).unwrap().len();
    disk.write_at(1000, &[8u8; 200]).unwrap();
    let after_second = std::fs::metadata(&p).unwrap().len();
    // Assert
    assert_eq!(after_first, before + 2 * CS);
    assert_eq!(after_second, after_first);
    let mut meta = disk.lock();
    let end = meta.refcounts.end_offset();
    for off in (0..end).step_by(CS as usize) {
        assert_eq!(
            meta.refcounts.get(&disk.file, off / CS).unwrap(),
            1,
            "{off:#x}"
        );
    }
}

#[test]
fn test_write_across_clusters_roundtrips() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 4 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    let data: Vec<u8> = (0..3 * CS as usize).map(|i| (i % 253) as u8).collect();
    // Act
    disk.write_at(CS - 512, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    disk.read_at(CS - 512, &mut back).unwrap();
    // Assert
    assert_eq!(back, data);
}

#[test]
fn test_discard_frees_cluster_refcount() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 4 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    disk.write_at(CS, &vec![9u8; CS as usize]).unwrap();
    let host = {
        let mut meta = disk.lock();
        let e = disk.l2_entry(&mut meta, CS).unwrap();
        e & L2_OFFSET_MASK
    };
    // Act
    disk.discard(CS, CS).unwrap();
    // Assert
    let mut meta = disk.lock();
    assert_eq!(meta.refcounts.get(&disk.file, host / CS).unwrap(), 0);
    assert_eq!(disk.l2_entry(&mut meta, CS).unwrap(), 0);
    drop(meta);
    let mut buf = vec![1u8; 512];
    disk.read_at(CS, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn test_small_clusters_grow_refcount_blocks() {
    // Arrange: 512-byte clusters, so one refcount block covers 256 clusters.
    let d = TempDir::new().unwrap();
    let opts = CreateOptions {
        cluster_bits: 9,
        ..CreateOptions::new(1 << 20)
    };
    let p = new_image(d.as_path(), "small.qcow2", &opts);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    let data: Vec<u8> = (0..(600 * 512)).map(|i| (i % 241) as u8).collect();
    // Act
    disk.write_at(4096, &data).unwrap();
    // Assert
    let mut back = vec![0u8; data.len()];
    disk.read_at(4096, &mut back).unwrap();
    assert_eq!(back, data);
    let mut meta = disk.lock();
    let end = meta.refcounts.end_offset();
    for c in 0..end / 512 {
        assert_eq!(meta.refcounts.get(&disk.file, c).unwrap(), 1, "cluster {c}");
    }
}

#[test]
fn test_read_only_refuses_writes() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let disk = Qcow2Disk::open(&p, true, None).unwrap();
    // Act + Assert
    assert!(matches!(disk.write_at(0, &[1]), Err(DiskError::ReadOnly)));
    assert!(matches!(disk.discard(0, CS), Err(DiskError::ReadOnly)));
    assert!(matches!(
        disk.write_zeroes(0, 512),
        Err(DiskError::ReadOnly)
    ));
}

#[test]
fn test_access_past_end_is_out_of_range() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    let mut buf = [0u8; 512];
    // Act + Assert
    assert!(matches!(
        disk.read_at(1 << 20, &mut buf),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.write_at(u64::MAX - 3, &buf),
        Err(DiskError::OutOfRange { .. })
    ));
}

#[test]
fn test_second_writer_is_locked_out() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let _a = Qcow2Disk::open(&p, false, None).unwrap();
    // Act
    let err = Qcow2Disk::open(&p, false, None).unwrap_err();
    // Assert
    assert!(matches!(err, DiskError::Locked { .. }));
}

#[test]
fn test_hostile_huge_l1_size_is_refused_without_allocating() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    patch(&p, |h| put32(h, 36, u32::MAX));
    // Act
    let err = open_err(&p);
    // Assert
    assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("L1 table"), "{err}");
}

#[test]
fn test_hostile_l1_offset_beyond_file_is_refused() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    patch(&p, |h| put64(h, 40, 1 << 40));
    // Act
    let err = open_err(&p);
    // Assert
    assert!(
        err.to_string().contains("beyond the end of the file"),
        "{err}"
    );
}

#[test]
fn test_hostile_refcount_table_overlapping_l1_is_refused() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let l1 = header_of(&p).l1_table_offset;
    patch(&p, |h| put64(h, 48, l1));
    // Act
    let err = open_err(&p);
    // Assert
    assert!(err.to_string().contains("overlaps"), "{err}");
}

#[test]
fn test_hostile_huge_refcount_table_is_refused() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    patch(&p, |h| put32(h, 56, u32::MAX));
    // Act
    let err = open_err(&p);
    // Assert
    assert!(err.to_string().contains("refcount table"), "{err}");
}

#[test]
fn test_hostile_cluster_bits_out_of_range_is_refused() {
    for bits in [0u32, 8, 22, 63, u32::MAX] {
        // Arrange
        let d = TempDir::new().unwrap();
        let p = image(d.as_path(), 1 << 20);
        patch(&p, |h| put32(h, 20, bits));
        // Act
        let err = open_err(&p);
        // Assert
        assert!(err.to_string().contains("cluster_bits"), "{bits}: {err}");
    }
}

#[test]
fn test_hostile_l2_offset_beyond_file_is_read_error() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let l1 = header_of(&p).l1_table_offset;
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&((1u64 << 50) | OFLAG_COPIED).to_be_bytes(), l1)
        .unwrap();
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    let mut buf = [0u8; 512];
    // Act
    let read = disk.read_at(0, &mut buf).unwrap_err();
    let write = disk.write_at(0, &buf).unwrap_err();
    // Assert
    assert!(read.to_string().contains("L2 table"), "{read}");
    assert!(matches!(write, DiskError::Corrupt { .. }), "{write}");
}

#[test]
fn test_hostile_data_cluster_beyond_file_and_unaligned_are_errors() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    disk.write_at(0, &[1u8; 512]).unwrap();
    let l2 = disk.lock().l1[0] & L1_OFFSET_MASK;
    drop(disk);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&((1u64 << 45) | OFLAG_COPIED).to_be_bytes(), l2)
        .unwrap();
    f.write_all_at(&(CS + 512).to_be_bytes(), l2 + 8).unwrap();
    let disk = Qcow2Disk::open(&p, true, None).unwrap();
    let mut buf = [0u8; 512];
    // Act
    let beyond = disk.read_at(0, &mut buf).unwrap_err();
    let unaligned = disk.read_at(CS, &mut buf).unwrap_err();
    // Assert
    assert!(beyond.to_string().contains("beyond the end"), "{beyond}");
    assert!(unaligned.to_string().contains("unaligned"), "{unaligned}");
}

#[test]
fn test_hostile_compressed_garbage_is_corrupt_error() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    disk.write_at(0, &[0xffu8; 512]).unwrap();
    let (l2, host) = {
        let mut m = disk.lock();
        let l2 = m.l1[0] & L1_OFFSET_MASK;
        (l2, disk.l2_entry(&mut m, 0).unwrap() & L2_OFFSET_MASK)
    };
    drop(disk);
    // A compressed descriptor pointing at the 0xff-filled cluster (not a deflate stream).
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&(OFLAG_COMPRESSED | host).to_be_bytes(), l2)
        .unwrap();
    let disk = Qcow2Disk::open(&p, true, None).unwrap();
    let mut buf = [0u8; 512];
    // Act
    let err = disk.read_at(0, &mut buf).unwrap_err();
    // Assert
    assert!(err.to_string().contains("compressed cluster"), "{err}");
}

#[test]
fn test_compressed_cluster_written_by_hand_reads_back() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    disk.write_at(CS, &[0u8; 512]).unwrap(); // creates the L2 table
    let l2 = disk.lock().l1[0] & L1_OFFSET_MASK;
    drop(disk);
    let data: Vec<u8> = (0..CS as usize).map(|i| (i / 100) as u8).collect();
    let packed = compress::deflate_cluster(&data);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let at = f.metadata().unwrap().len() + 512; // not cluster aligned, as QEMU packs them
    f.write_all_at(&packed, at).unwrap();
    let x = 62 - (16 - 8);
    let sectors = (at + packed.len() as u64 - 1) / 512 - at / 512;
    let entry = OFLAG_COMPRESSED | (sectors << x) | at;
    f.write_all_at(&entry.to_be_bytes(), l2).unwrap();
    let disk = Qcow2Disk::open(&p, true, None).unwrap();
    let mut back = vec![0u8; CS as usize];
    // Act
    disk.read_at(0, &mut back).unwrap();
    // Assert
    assert_eq!(back, data);
}

#[test]
fn test_dirty_corrupt_and_unknown_feature_bits_are_named() {
    let cases: [(u64, &str); 4] = [
        (INCOMPAT_DIRTY, "dirty"),
        (INCOMPAT_CORRUPT, "corrupt"),
        (1 << 40, "unknown incompatible"),
        (header::INCOMPAT_EXTL2, "extended L2"),
    ];
    for (bit, word) in cases {
        // Arrange
        let d = TempDir::new().unwrap();
        let p = image(d.as_path(), 1 << 20);
        patch(&p, |h| put64(h, 72, bit));
        // Act
        let err = open_err(&p);
        // Assert
        assert!(err.to_string().contains(word), "{word}: {err}");
    }
}

#[test]
fn test_snapshots_force_read_only() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    patch(&p, |h| put32(h, 60, 1));
    // Act
    let rw = Qcow2Disk::open(&p, false, None).unwrap_err();
    let ro = Qcow2Disk::open(&p, true, None);
    // Assert
    assert!(rw.to_string().contains("snapshots"), "{rw}");
    assert!(ro.is_ok());
}

#[test]
fn test_backing_name_too_long_is_refused() {
    // Arrange
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 1 << 20);
    patch(&p, |h| {
        put64(h, 8, 200);
        put32(h, 16, 5000);
    });
    // Act
    let err = open_err(&p);
    // Assert
    assert!(err.to_string().contains("backing file name"), "{err}");
}

#[test]
fn test_backing_chain_loop_is_refused() {
    // Arrange: a -> b -> a.
    let d = TempDir::new().unwrap();
    let a = d.as_path().join("a.qcow2");
    let b = d.as_path().join("b.qcow2");
    let with = |name: &str| CreateOptions {
        backing_file: Some(name.to_string()),
        backing_format: Some("qcow2".into()),
        ..CreateOptions::new(1 << 20)
    };
    new_image(d.as_path(), "a.qcow2", &with("b.qcow2"));
    new_image(d.as_path(), "b.qcow2", &with("a.qcow2"));
    let own = d.as_path().join("self.qcow2");
    new_image(d.as_path(), "self.qcow2", &with("self.qcow2"));
    // Act
    let Err(err) = open_image(&a, false, None) else {
        panic!("loop opened")
    };
    let Err(self_err) = open_image(&own, true, None) else {
        panic!("self loop opened")
    };
    // Assert
    assert!(matches!(err, DiskError::BackingChain { .. }), "{err}");
    assert!(err.to_string().contains("loops"), "{err}");
    assert!(self_err.to_string().contains("loops"), "{self_err}");
    assert!(b.exists());
}

#[test]
fn test_overlay_reads_backing_and_copies_on_write() {
    // Arrange
    let d = TempDir::new().unwrap();
    let base = d.as_path().join("base.raw");
    let base_bytes: Vec<u8> = (0..(1 << 20)).map(|i| (i % 199) as u8).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let opts = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::new(1 << 20)
    };
    let p = new_image(d.as_path(), "top.qcow2", &opts);
    let backing: Arc<dyn DiskBackend> = Arc::new(crate::RawDisk::open(&base, true).unwrap());
    let disk = Qcow2Disk::open(&p, false, Some(backing)).unwrap();
    // Act
    disk.write_at(CS + 10, &[0xaa; 20]).unwrap();
    disk.write_zeroes(3 * CS, CS).unwrap();
    let mut back = vec![0u8; 1 << 20];
    disk.read_at(0, &mut back).unwrap();
    // Assert
    let mut expect = base_bytes.clone();
    expect[(CS + 10) as usize..(CS + 30) as usize].fill(0xaa);
    expect[3 * CS as usize..4 * CS as usize].fill(0);
    assert_eq!(back, expect);
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes);
}

#[test]
fn test_data_ranges_cover_own_clusters_and_the_backing_files_data_only() {
    // Arrange: 8 MiB overlay over a 4 MiB sparse raw base with data at 1 MiB; the overlay
    // writes cluster 5 and a cluster at 6 MiB.
    let d = TempDir::new().unwrap();
    let base = d.as_path().join("base.raw");
    let f = File::create(&base).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
    let opts = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::new(8 << 20)
    };
    let p = new_image(d.as_path(), "top.qcow2", &opts);
    let backing: Arc<dyn DiskBackend> = Arc::new(crate::RawDisk::open(&base, true).unwrap());
    let disk = Qcow2Disk::open(&p, false, Some(backing)).unwrap();
    disk.write_at(5 * CS, &[1u8; 512]).unwrap();
    disk.write_at(6 << 20, &[2u8; 512]).unwrap();

    // Act
    let ranges = disk.data_ranges().unwrap();

    // Assert: every byte with data is covered, and far less than the disk is.
    let covers = |off: u64| ranges.iter().any(|&(s, l)| s <= off && off < s + l);
    assert!(
        covers(5 * CS) && covers(6 << 20) && covers(1 << 20),
        "{ranges:?}"
    );
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(total < 1 << 20, "{ranges:?}");
}

#[test]
fn test_nowait_read_serves_allocated_clusters_and_declines_unallocated() {
    // Arrange: clusters 0 and 1 allocated (and cached: just written), cluster 3 never written.
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 4 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    let data: Vec<u8> = (0..2 * CS as usize).map(|i| (i % 251) as u8).collect();
    disk.write_at(0, &data).unwrap();
    let mem = vm_memory::GuestMemoryMmap::<vm_memory::bitmap::AtomicBitmap>::from_ranges(&[(
        GuestAddress(0),
        4 * CS as usize,
    )])
    .unwrap();
    let across = mem.get_slice(GuestAddress(0), 8192).unwrap();
    let hole = mem.get_slice(GuestAddress(CS), 4096).unwrap();

    // Act: a read that crosses from cluster 0 into cluster 1, and one of cluster 3.
    let served = disk.try_read_to_guest_nowait(CS - 4096, &across).unwrap();
    let declined = !disk.try_read_to_guest_nowait(3 * CS, &hole).unwrap();

    // Assert
    assert!(served);
    assert!(declined, "unallocated clusters go to the blocking path");
    let mut back = vec![0u8; 8192];
    mem.read_slice(&mut back, GuestAddress(0)).unwrap();
    assert_eq!(back, data[(CS - 4096) as usize..(CS + 4096) as usize]);
}

#[test]
fn test_inline_write_updates_allocated_cluster_and_declines_unallocated() {
    // Arrange: cluster 0 allocated, cluster 2 never written.
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    let d = TempDir::new().unwrap();
    let p = image(d.as_path(), 4 << 20);
    let disk = Qcow2Disk::open(&p, false, None).unwrap();
    disk.write_at(0, &[1u8; 4096]).unwrap();
    let size_before = std::fs::metadata(&p).unwrap().len();
    let mem = vm_memory::GuestMemoryMmap::<vm_memory::bitmap::AtomicBitmap>::from_ranges(&[(
        GuestAddress(0),
        0x10000,
    )])
    .unwrap();
    mem.write_slice(&[0xe1; 4096], GuestAddress(0)).unwrap();
    let src = mem.get_slice(GuestAddress(0), 4096).unwrap();

    // Act
    let written = disk.try_write_from_guest_inline(0, &src).unwrap();
    let declined = !disk.try_write_from_guest_inline(2 * CS, &src).unwrap();

    // Assert: in place, no allocation; the unallocated cluster is left to the normal path.
    assert!(written);
    assert!(declined);
    let mut back = [0u8; 4096];
    disk.read_at(0, &mut back).unwrap();
    assert_eq!(back, [0xe1; 4096]);
    disk.read_at(2 * CS, &mut back).unwrap();
    assert_eq!(back, [0u8; 4096]);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), size_before);
}
