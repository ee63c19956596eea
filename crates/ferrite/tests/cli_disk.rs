//! `ferrite disk create|info|convert`: images it makes are accepted by `qemu-img`, info
//! reports format, sizes and backing chains, convert flattens chains into sparse images, and
//! every bad input is one line on stderr with exit status 2 and nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn ferrite(args: &[&str]) -> Out {
    let out = Command::new(common::ferrite_bin())
        .args(args)
        .output()
        .expect("run ferrite");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) -> String {
    let out = ferrite(args);
    assert_eq!(out.code, Some(0), "ferrite {args:?}: {}", out.stderr);
    out.stdout
}

fn assert_usage_error(out: &Out, needle: &str) {
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let stderr = out.stderr.trim_end();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("ferrite: "), "{stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr:?}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{stderr:?} lacks {needle:?}"
    );
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferrite-cli-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
    /// Names of the files in the directory (to see that nothing was left behind).
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

fn qemu_check_clean(img: &str) {
    let out = Command::new("qemu-img")
        .args(["check", img])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("No errors were found"), "{text}");
}

fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let start = json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim_matches('"')
}

#[test]
fn test_disk_create_qcow2_info_json_reports_it() {
    // Arrange
    let d = Dir::new("create");
    let img = d.path("a.qcow2");
    // Act
    ok(&["disk", "create", "--format", "qcow2", &img, "64M"]);
    let json = ok(&["disk", "info", "--json", &img]);
    let text = ok(&["disk", "info", &img]);
    // Assert
    assert_eq!(json.lines().count(), 1, "{json}");
    assert_eq!(json_field(&json, "format"), "qcow2");
    assert_eq!(json_field(&json, "virtual_size"), (64u64 << 20).to_string());
    assert_eq!(json_field(&json, "cluster_size"), "65536");
    assert_eq!(json_field(&json, "dirty"), "false");
    assert_eq!(json_field(&json, "corrupt"), "false");
    assert!(text.contains("format: qcow2"), "{text}");
    assert!(text.contains("67108864 bytes"), "{text}");
    if have_qemu_img() {
        qemu_check_clean(&img);
    }
}

#[test]
fn test_disk_create_raw_is_sparse_with_size() {
    // Arrange
    let d = Dir::new("raw");
    let img = d.path("a.raw");
    // Act
    ok(&["disk", "create", &img, "1G"]);
    let json = ok(&["disk", "info", "--json", &img]);
    // Assert
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert_eq!(json_field(&json, "format"), "raw");
    assert!(json_field(&json, "disk_size").parse::<u64>().unwrap() < 1 << 20);
}

#[test]
fn test_disk_create_overlay_without_size_takes_backing_size_and_chain() {
    // Arrange
    let d = Dir::new("overlay");
    let base = d.path("base.raw");
    std::fs::write(&base, vec![3u8; 3 << 20]).unwrap();
    let mid = d.path("mid.qcow2");
    let top = d.path("top.qcow2");
    // Act
    ok(&[
        "disk",
        "create",
        "--format",
        "qcow2",
        "--backing",
        "base.raw",
        &mid,
    ]);
    ok(&[
        "disk",
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    let text = ok(&["disk", "info", &top]);
    // Assert
    assert!(text.contains("virtual size: 3.0 MiB"), "{text}");
    assert!(text.contains("backing file: mid.qcow2"), "{text}");
    assert!(
        text.contains("backing chain 1:") && text.contains("(qcow2)"),
        "{text}"
    );
    assert!(
        text.contains("backing chain 2:") && text.contains("(raw)"),
        "{text}"
    );
    if have_qemu_img() {
        qemu_check_clean(&top);
    }
}

#[test]
fn test_disk_convert_flattens_chain_sparse() {
    // Arrange
    let d = Dir::new("convert");
    let base = d.path("base.raw");
    let mut data = vec![0u8; 4 << 20];
    data[..4096].fill(0x42);
    data[(3 << 20)..(3 << 20) + 512].fill(0x17);
    std::fs::write(&base, &data).unwrap();
    let top = d.path("top.qcow2");
    ok(&["disk", "create", "-f", "qcow2", "-b", &base, &top]);
    let q = d.path("flat.qcow2");
    let r = d.path("flat.raw");
    // Act
    ok(&["disk", "convert", "-O", "qcow2", &top, &q]);
    ok(&["disk", "convert", &q, &r]);
    // Assert
    assert_eq!(std::fs::read(&r).unwrap(), data);
    let json = ok(&["disk", "info", "--json", &q]);
    assert_eq!(json_field(&json, "backing_file"), "null");
    assert!(json_field(&json, "disk_size").parse::<u64>().unwrap() < 1 << 20);
    if have_qemu_img() {
        qemu_check_clean(&q);
    }
}

#[test]
fn test_disk_existing_destination_needs_force() {
    // Arrange
    let d = Dir::new("force");
    let img = d.path("a.qcow2");
    ok(&["disk", "create", "-f", "qcow2", &img, "1M"]);
    // Act
    let again = ferrite(&["disk", "create", "-f", "qcow2", &img, "2M"]);
    let forced = ferrite(&["disk", "create", "-f", "qcow2", "--force", &img, "2M"]);
    // Assert
    assert_usage_error(&again, "already exists");
    assert_eq!(forced.code, Some(0), "{}", forced.stderr);
    let json = ok(&["disk", "info", "--json", &img]);
    assert_eq!(json_field(&json, "virtual_size"), (2u64 << 20).to_string());
    assert_eq!(d.names(), vec!["a.qcow2".to_string()]);
}

#[test]
fn test_disk_bad_inputs_are_one_line_status_2() {
    // Arrange
    let d = Dir::new("bad");
    let img = d.path("x.img");
    let corrupt = d.path("corrupt.qcow2");
    let mut junk = b"QFI\xfb\0\0\0\x03".to_vec();
    junk.resize(4096, 0xff);
    std::fs::write(&corrupt, &junk).unwrap();
    // Act + Assert
    assert_usage_error(
        &ferrite(&["disk", "create", "-f", "vmdk", &img, "1M"]),
        "vmdk",
    );
    assert_usage_error(&ferrite(&["disk", "create", &img, "lots"]), "not a number");
    assert_usage_error(&ferrite(&["disk", "create", "-f", "qcow2", &img]), "size");
    assert_usage_error(
        &ferrite(&["disk", "create", "-b", "nope", &img, "1M"]),
        "backing",
    );
    assert_usage_error(&ferrite(&["disk", "info", &corrupt]), "corrupt");
    assert_usage_error(&ferrite(&["disk", "info", &d.path("missing")]), "missing");
    let out = d.path("out.raw");
    assert_usage_error(&ferrite(&["disk", "convert", &corrupt, &out]), "corrupt");
    assert_eq!(d.names(), vec!["corrupt.qcow2".to_string()]);
}

#[test]
fn test_disk_convert_of_qemu_compressed_image_matches() {
    if !have_qemu_img() {
        return;
    }
    // Arrange
    let d = Dir::new("compressed");
    let raw = d.path("src.raw");
    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i / 4096) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let comp = d.path("c.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2", &raw, &comp])
        .status()
        .unwrap();
    assert!(st.success());
    let back = d.path("back.raw");
    // Act
    ok(&["disk", "convert", "-O", "raw", &comp, &back]);
    // Assert
    assert_eq!(std::fs::read(Path::new(&back)).unwrap(), data);
}
