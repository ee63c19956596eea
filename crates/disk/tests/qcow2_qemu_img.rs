//! qcow2 interoperability with QEMU's own tools: images Ferrite writes pass `qemu-img check`
//! and convert back to the expected bytes; images `qemu-img`/`qemu-io` make (backing chains,
//! compressed clusters) read correctly; unsupported features are refused by name.
//!
//! Every test is skipped (with a message) when `qemu-img` is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use disk::{
    convert_image, create_image, image_info, open_image, CreateSpec, DiskBackend, DiskError,
    ImageFormat,
};
use vmm_sys_util::tempdir::TempDir;

const MIB: u64 = 1 << 20;

/// The tests run one at a time: a `qemu-img` child forked by one test inherits (until its
/// exec) the descriptors another test has open, and with them their OFD locks, so a test that
/// closes an image and reopens it could find it still locked.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        eprintln!("qemu-img not installed: skipping");
    }
    ok
}

fn have_qemu_io() -> bool {
    Command::new("qemu-io").arg("--version").output().is_ok()
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` reports no errors and no leaks.
fn assert_check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", s(img)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img check failed: {text}");
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
}

/// The guest-visible bytes of `img` according to `qemu-img convert -O raw`.
fn qemu_raw_bytes(dir: &Path, img: &Path) -> Vec<u8> {
    let out = dir.join("qemu-out.raw");
    let _ = std::fs::remove_file(&out);
    run("qemu-img", &["convert", "-O", "raw", s(img), s(&out)]);
    std::fs::read(out).unwrap()
}

fn read_all(disk: &dyn DiskBackend) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(0, &mut buf).unwrap();
    buf
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn qcow2_spec(size: Option<u64>) -> CreateSpec {
    CreateSpec {
        format: ImageFormat::Qcow2,
        size,
        backing: None,
        backing_format: None,
        force: false,
    }
}

fn tmp() -> (TempDir, PathBuf) {
    let d = TempDir::new().unwrap();
    let p = d.as_path().to_path_buf();
    (d, p)
}

#[test]
fn test_ferrite_written_qcow2_passes_check_and_converts_to_expected_bytes() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    create_image(&img, &qcow2_spec(Some(8 * MIB))).unwrap();
    let mut expect = vec![0u8; 8 * MIB as usize];
    // Act
    {
        let disk = open_image(&img, false, None).unwrap();
        let writes: [(u64, usize, u8); 6] = [
            (0, 512, 1),
            (65536 - 512, 4096, 2),
            (3 * MIB + 100 * 512, 300 * 512, 3),
            (7 * MIB, MIB as usize, 4),
            (2 * MIB, 65536, 5),
            (100, 10, 6),
        ];
        for (off, len, seed) in writes {
            let data = pattern(seed, len);
            disk.write_at(off, &data).unwrap();
            expect[off as usize..off as usize + len].copy_from_slice(&data);
        }
        disk.write_zeroes(7 * MIB + 65536, 3 * 65536).unwrap();
        expect[(7 * MIB + 65536) as usize..(7 * MIB + 4 * 65536) as usize].fill(0);
        disk.write_zeroes(7 * MIB + 4 * 65536 + 512, 1024).unwrap();
        expect[(7 * MIB + 4 * 65536 + 512) as usize..(7 * MIB + 4 * 65536 + 1536) as usize].fill(0);
        disk.discard(2 * MIB, 65536).unwrap();
        expect[2 * MIB as usize..(2 * MIB + 65536) as usize].fill(0);
        disk.flush().unwrap();
        assert_eq!(read_all(disk.as_ref()), expect);
    }
    // Assert
    assert_check_clean(&img);
    assert_eq!(qemu_raw_bytes(&dir, &img), expect);
}

#[test]
fn test_qemu_io_written_qcow2_reads_same_bytes() {
    let _serial = serial();
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let img = dir.join("q.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0x11 1M 4k",
            "-c",
            "write -P 0x22 3584k 512",
            "-c",
            "write -z 1M 512",
            s(&img),
        ],
    );
    let expect = qemu_raw_bytes(&dir, &img);
    // Act
    let disk = open_image(&img, true, None).unwrap();
    // Assert
    assert_eq!(disk.size(), 4 * MIB);
    assert_eq!(read_all(disk.as_ref()), expect);
}

#[test]
fn test_qemu_compressed_image_reads_and_rewrites_cluster() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let raw = dir.join("src.raw");
    let mut data = pattern(9, 2 * MIB as usize);
    data[MIB as usize..].fill(0x5a);
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&img),
        ],
    );
    // Act
    let read_back = read_all(open_image(&img, true, None).unwrap().as_ref());
    {
        let disk = open_image(&img, false, None).unwrap();
        disk.write_at(MIB + 1000, &[0xee; 3000]).unwrap();
        disk.flush().unwrap();
    }
    data[(MIB + 1000) as usize..(MIB + 4000) as usize].fill(0xee);
    // Assert
    assert_eq!(read_back[..MIB as usize], data[..MIB as usize]);
    assert_check_clean(&img);
    assert_eq!(qemu_raw_bytes(&dir, &img), data);
}

#[test]
fn test_qemu_backing_chain_raw_mid_top_reads_like_qemu() {
    let _serial = serial();
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let base = dir.join("base.raw");
    std::fs::write(&base, pattern(1, 4 * MIB as usize)).unwrap();
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    run("qemu-io", &["-c", "write -P 0x33 64k 128k", s(&mid)]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    run("qemu-io", &["-c", "write -P 0x44 100k 8k", s(&top)]);
    run("qemu-io", &["-c", "write -z 2M 64k", s(&top)]);
    let expect = qemu_raw_bytes(&dir, &top);
    // Act
    let disk = open_image(&top, true, None).unwrap();
    let info = image_info(&top, None).unwrap();
    // Assert
    assert_eq!(read_all(disk.as_ref()), expect);
    assert_eq!(info.backing_chain.len(), 2);
    assert_eq!(info.backing_chain[1].format, ImageFormat::Raw);
}

#[test]
fn test_overlay_write_leaves_raw_base_unchanged() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let base = dir.join("base.raw");
    let base_bytes = pattern(7, 2 * MIB as usize);
    std::fs::write(&base, &base_bytes).unwrap();
    let overlay = dir.join("overlay.qcow2");
    let spec = CreateSpec {
        backing: Some("base.raw".into()),
        ..qcow2_spec(None)
    };
    create_image(&overlay, &spec).unwrap();
    let mut expect = base_bytes.clone();
    // Act
    {
        let disk = open_image(&overlay, false, None).unwrap();
        assert_eq!(disk.size(), 2 * MIB);
        disk.write_at(70000, &[0xcc; 5000]).unwrap();
        disk.write_zeroes(MIB, 65536).unwrap();
        disk.discard(MIB + 65536, 65536).unwrap();
        disk.flush().unwrap();
    }
    expect[70000..75000].fill(0xcc);
    expect[MIB as usize..(MIB + 2 * 65536) as usize].fill(0);
    // Assert
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes);
    assert_check_clean(&overlay);
    assert_eq!(qemu_raw_bytes(&dir, &overlay), expect);
}

#[test]
fn test_convert_qcow2_chain_to_qcow2_and_raw_matches() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let base = dir.join("base.raw");
    let mut data = vec![0u8; 4 * MIB as usize];
    data[..65536].copy_from_slice(&pattern(3, 65536));
    std::fs::write(&base, &data).unwrap();
    let top = dir.join("top.qcow2");
    create_image(
        &top,
        &CreateSpec {
            backing: Some(s(&base).to_string()),
            ..qcow2_spec(None)
        },
    )
    .unwrap();
    {
        let d = open_image(&top, false, None).unwrap();
        d.write_at(3 * MIB, &[9; 512]).unwrap();
    }
    data[3 * MIB as usize..3 * MIB as usize + 512].fill(9);
    let q = dir.join("out.qcow2");
    let r = dir.join("out.raw");
    // Act
    convert_image(&top, None, &q, ImageFormat::Qcow2, false).unwrap();
    convert_image(&top, None, &r, ImageFormat::Raw, false).unwrap();
    // Assert
    assert_check_clean(&q);
    assert_eq!(qemu_raw_bytes(&dir, &q), data);
    assert_eq!(std::fs::read(&r).unwrap(), data);
    let info = image_info(&q, None).unwrap();
    assert!(info.backing_chain.is_empty());
    assert!(
        info.disk_size < 2 * MIB,
        "output not sparse: {}",
        info.disk_size
    );
}

#[test]
fn test_many_random_writes_stay_consistent() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let img = dir.join("r.qcow2");
    let size = 16 * MIB;
    create_image(&img, &qcow2_spec(Some(size))).unwrap();
    let mut expect = vec![0u8; size as usize];
    let mut x: u64 = 0x1234_5678;
    // Act
    {
        let disk = open_image(&img, false, None).unwrap();
        for i in 0..300u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size / 512)) * 512;
            let len = (((x >> 32) % 64 + 1) * 512).min(size - off) as usize;
            match i % 5 {
                0 => {
                    disk.write_zeroes(off, len as u64).unwrap();
                    expect[off as usize..off as usize + len].fill(0);
                }
                1 => {
                    // Discard of whole clusters reads back as zeroes (no backing file).
                    let start = off.div_ceil(65536) * 65536;
                    let end = ((off + len as u64) / 65536) * 65536;
                    disk.discard(off, len as u64).unwrap();
                    if end > start {
                        expect[start as usize..end as usize].fill(0);
                    }
                }
                _ => {
                    let data = pattern(i as u8, len);
                    disk.write_at(off, &data).unwrap();
                    expect[off as usize..off as usize + len].copy_from_slice(&data);
                }
            }
        }
        disk.flush().unwrap();
        assert_eq!(read_all(disk.as_ref()), expect);
    }
    // Assert
    assert_check_clean(&img);
    assert_eq!(qemu_raw_bytes(&dir, &img), expect);
}

fn open_err(img: &Path) -> String {
    match open_image(img, true, None) {
        Ok(_) => panic!("{} opened", img.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn test_unsupported_features_are_named() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let extl2 = dir.join("extl2.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            s(&extl2),
            "1M",
        ],
    );
    let datafile = dir.join("df.qcow2");
    let data_raw = dir.join("df.raw");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s(&data_raw)),
            s(&datafile),
            "1M",
        ],
    );
    let luks = dir.join("luks.qcow2");
    // LUKS creation benchmarks the PBKDF and can fail on a busy machine: test it when QEMU
    // managed to make it, and always test the header's crypt_method field.
    let luks_made = Command::new("qemu-img")
        .args([
            "create",
            "--object",
            "secret,id=sec0,data=abc",
            "-f",
            "qcow2",
            "-o",
        ])
        .arg("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100")
        .arg(&luks)
        .arg("1M")
        .output()
        .unwrap()
        .status
        .success();
    let aes = dir.join("aes.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&aes), "1M"]);
    let f = std::fs::OpenOptions::new().write(true).open(&aes).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &1u32.to_be_bytes(), 32).unwrap();
    // Act + Assert
    assert!(open_err(&extl2).contains("extended L2"));
    assert!(open_err(&datafile).contains("external data file"));
    assert!(open_err(&aes).contains("encryption"));
    if luks_made {
        assert!(open_err(&luks).contains("encryption"));
    }
    let zstd = dir.join("zstd.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o", "compression_type=zstd"])
        .arg(&zstd)
        .arg("1M")
        .output()
        .unwrap();
    if made.status.success() {
        assert!(open_err(&zstd).contains("zstd"));
    }
}

#[test]
fn test_probe_of_raw_with_qcow2_header_is_qcow2_but_forced_raw_stays_raw() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange: a raw disk whose first bytes a guest made look like a qcow2 image.
    let (_d, dir) = tmp();
    let img = dir.join("guest-written.raw");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "1M"]);
    let len = std::fs::metadata(&img).unwrap().len();
    // Act
    let forced = open_image(&img, true, Some(ImageFormat::Raw)).unwrap();
    let probed = open_image(&img, true, None).unwrap();
    // Assert
    assert_eq!(forced.size(), len - len % 512);
    assert_eq!(probed.size(), MIB);
    assert!(matches!(
        open_image(dir.join("missing"), true, None),
        Err(DiskError::Open { .. })
    ));
}

#[test]
fn test_qcow2_v2_image_reads_and_writes() {
    let _serial = serial();
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let img = dir.join("v2.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "compat=0.10", s(&img), "2M"],
    );
    run("qemu-io", &["-c", "write -P 0x61 4k 8k", s(&img)]);
    // Act
    {
        let disk = open_image(&img, false, None).unwrap();
        disk.write_at(MIB, &[0x62; 4096]).unwrap();
        disk.write_zeroes(4096, 4096).unwrap();
        disk.flush().unwrap();
    }
    // Assert
    let info = image_info(&img, None).unwrap();
    assert_eq!(info.qcow2_version, Some(2));
    let mut expect = vec![0u8; 2 * MIB as usize];
    expect[8192..12288].fill(0x61);
    expect[MIB as usize..MIB as usize + 4096].fill(0x62);
    assert_check_clean(&img);
    assert_eq!(qemu_raw_bytes(&dir, &img), expect);
    let disk = open_image(&img, true, None).unwrap();
    assert_eq!(read_all(disk.as_ref()), expect);
}

#[test]
fn test_concurrent_writers_on_distinct_ranges_stay_consistent() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let img = dir.join("mt.qcow2");
    create_image(&img, &qcow2_spec(Some(8 * MIB))).unwrap();
    let disk = open_image(&img, false, None).unwrap();
    // Act: four threads, each writing its own interleaved 4 KiB blocks.
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let disk = disk.clone();
            scope.spawn(move || {
                for i in 0..256u64 {
                    let off = (i * 4 + t) * 8192;
                    disk.write_at(off, &[t as u8 + 1; 4096]).unwrap();
                }
            });
        }
    });
    disk.flush().unwrap();
    drop(disk);
    // Assert
    let mut expect = vec![0u8; 8 * MIB as usize];
    for t in 0..4u64 {
        for i in 0..256u64 {
            let off = ((i * 4 + t) * 8192) as usize;
            expect[off..off + 4096].fill(t as u8 + 1);
        }
    }
    assert_check_clean(&img);
    assert_eq!(qemu_raw_bytes(&dir, &img), expect);
}

#[test]
fn test_backing_file_in_use_by_a_writer_is_locked() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; MIB as usize]).unwrap();
    let top = dir.join("top.qcow2");
    create_image(
        &top,
        &CreateSpec {
            backing: Some("base.raw".into()),
            ..qcow2_spec(None)
        },
    )
    .unwrap();
    let writer = open_image(&base, false, Some(ImageFormat::Raw)).unwrap();
    // Act
    let res = open_image(&top, false, None);
    // Assert
    assert!(matches!(res, Err(DiskError::Locked { .. })));
    drop(writer);
    let overlay = open_image(&top, false, None).unwrap();
    assert!(matches!(
        open_image(&base, false, Some(ImageFormat::Raw)),
        Err(DiskError::Locked { .. })
    ));
    drop(overlay);
}

#[test]
fn test_info_reports_dirty_bit_that_open_refuses() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let img = dir.join("dirty.qcow2");
    create_image(&img, &qcow2_spec(Some(MIB))).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &1u64.to_be_bytes(), 72).unwrap();
    // Act
    let info = image_info(&img, None).unwrap();
    let err = open_err(&img);
    // Assert
    assert!(info.dirty);
    assert!(err.contains("dirty bit"), "{err}");
    assert!(err.contains("qemu-img check -r all"), "{err}");
}

#[test]
fn test_refcount_table_grows_on_small_cluster_qemu_image() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange: 512-byte clusters; QEMU's one-cluster refcount table covers only 8 MiB of file.
    let (_d, dir) = tmp();
    let img = dir.join("small.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            s(&img),
            "16M",
        ],
    );
    let before = image_info(&img, None).unwrap();
    let data = pattern(42, 12 * MIB as usize);
    // Act
    {
        let disk = open_image(&img, false, None).unwrap();
        for (i, chunk) in data.chunks(256 * 1024).enumerate() {
            disk.write_at(i as u64 * 256 * 1024, chunk).unwrap();
        }
        disk.flush().unwrap();
    }
    // Assert
    assert_eq!(before.cluster_size, Some(512));
    assert_check_clean(&img);
    let bytes = qemu_raw_bytes(&dir, &img);
    assert_eq!(bytes[..data.len()], data[..]);
    assert!(bytes[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn test_preallocated_zero_cluster_is_reused_on_write() {
    let _serial = serial();
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    // Arrange: metadata preallocation, then a zero write that keeps the host cluster.
    let (_d, dir) = tmp();
    let img = dir.join("prealloc.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            s(&img),
            "1M",
        ],
    );
    run(
        "qemu-io",
        &["-c", "write -P 0x77 0 64k", "-c", "write -z 0 64k", s(&img)],
    );
    let len_before = std::fs::metadata(&img).unwrap().len();
    // Act
    {
        let disk = open_image(&img, false, None).unwrap();
        disk.write_at(512, &[0x12; 512]).unwrap();
        disk.flush().unwrap();
    }
    // Assert
    let mut expect = vec![0u8; MIB as usize];
    expect[512..1024].fill(0x12);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len_before);
    assert_check_clean(&img);
    assert_eq!(qemu_raw_bytes(&dir, &img), expect);
}

#[test]
fn test_unknown_backing_format_is_named() {
    let _serial = serial();
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let (_d, dir) = tmp();
    let base = dir.join("base.vmdk");
    run("qemu-img", &["create", "-f", "vmdk", s(&base), "1M"]);
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            s(&top),
        ],
    );
    // Act
    let err = open_err(&top);
    // Assert
    assert!(err.contains("backing file format 'vmdk'"), "{err}");
}
