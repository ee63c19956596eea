//! Every bad input gives one clear line on stderr and exit status 2, never a panic.

mod common;

use std::path::PathBuf;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrite-cli-bad-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tempdir");
    dir
}

/// The bytes of a file that exists but is no kernel.
const JUNK: &[u8] = b"this is not a kernel image at all, just some text";

/// Assert a usage failure: status 2, exactly one line on stderr containing `needle`.
fn assert_one_line_error(out: &common::RunOutput, needle: &str) {
    assert!(!out.timed_out, "timed out: {out:?}");
    assert_eq!(out.code, Some(2), "{out:?}");
    let stderr = out.stderr.trim_end();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("ferrite: "), "{stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr:?}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{stderr:?} lacks {needle:?}"
    );
}

fn run(args: &[&str]) -> common::RunOutput {
    common::run_ferrite(args, TIMEOUT)
}

/// `ferrite run --kernel FILE EXTRA...` where FILE (in a fresh directory named after `tag`)
/// holds `kernel_bytes`.
fn run_with_kernel_bytes(tag: &str, kernel_bytes: &[u8], extra: &[&str]) -> common::RunOutput {
    let dir = tempdir(tag);
    let kernel = dir.join("kernel.bin");
    std::fs::write(&kernel, kernel_bytes).expect("write kernel");
    let mut args = vec!["run", "--kernel", kernel.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    run(&args)
}

/// `ferrite run` with a file that exists but is no kernel, plus `extra` flags.
fn run_with_junk_kernel(tag: &str, extra: &[&str]) -> common::RunOutput {
    run_with_kernel_bytes(tag, JUNK, extra)
}

#[test]
fn test_missing_kernel_file_is_one_line_error() {
    let out = run(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&out, "does not exist");
}

#[test]
fn test_kernel_that_is_not_a_kernel_is_one_line_error() {
    let out = run_with_junk_kernel("notkernel", &[]);
    assert_one_line_error(&out, "not a kernel");
}

#[test]
fn test_truncated_elf_kernel_error_names_the_loader_cause() {
    // An ELF64 identification and nothing else: too short for an ELF header.
    let out = run_with_kernel_bytes("truncelf", b"\x7fELF\x02\x01\x01", &[]);

    assert_one_line_error(&out, "Invalid ELF kernel");
    assert!(
        out.stderr.contains("Unable to read elf header"),
        "the loader's cause is missing: {out:?}"
    );
}

#[test]
fn test_kernel_that_is_a_directory_is_one_line_error() {
    let dir = tempdir("dirkernel");
    let out = run(&["run", "--kernel", dir.to_str().unwrap()]);
    assert_one_line_error(&out, "not a regular file");
}

#[test]
fn test_memory_zero_is_one_line_error() {
    let out = run_with_junk_kernel("mem0", &["--memory", "0"]);
    assert_one_line_error(&out, "must not be zero");
}

#[test]
fn test_memory_with_bad_suffix_is_one_line_error() {
    let out = run_with_junk_kernel("mem12x", &["--memory", "12X"]);
    assert_one_line_error(&out, "invalid memory size");
}

#[test]
fn test_memory_below_minimum_is_one_line_error() {
    let out = run_with_junk_kernel("memsmall", &["--memory", "64M"]);
    assert_one_line_error(&out, "too small");
}

#[test]
fn test_zero_cpus_is_one_line_error() {
    let out = run_with_junk_kernel("cpus0", &["--cpus", "0"]);
    assert_one_line_error(&out, "at least one vcpu");
}

#[test]
fn test_too_many_cpus_names_the_limit() {
    let out = run_with_junk_kernel("cpusmany", &["--cpus", "5000"]);
    assert_one_line_error(&out, "at most");
    assert!(out.stderr.contains("--cpus"), "{out:?}");
}

#[test]
fn test_non_numeric_cpus_is_one_line_error() {
    let out = run(&["run", "--kernel", "k", "--cpus", "many"]);
    assert_one_line_error(&out, "--cpus");
}

#[test]
fn test_missing_disk_is_one_line_error() {
    let out = run_with_junk_kernel("nodisk", &["--disk", "/nonexistent/disk.img"]);
    assert_one_line_error(&out, "does not exist");
}

#[test]
fn test_bad_disk_option_is_one_line_error() {
    let out = run_with_junk_kernel("diskopt", &["--disk", "x.img,fast"]);
    assert_one_line_error(&out, "unknown --disk option");
}

#[test]
fn test_missing_kernel_flag_is_one_line_error() {
    let out = run(&["run"]);
    assert_one_line_error(&out, "--kernel");
}

#[test]
fn test_unknown_flag_is_one_line_error() {
    let out = run(&["run", "--kernel", "k", "--frobnicate"]);
    assert_one_line_error(&out, "--frobnicate");
}

#[test]
fn test_bad_repair_mode_is_one_line_error() {
    let out = run(&["run", "--kernel", "k", "--repair-emulation", "maybe"]);
    assert_one_line_error(&out, "repair");
}

#[test]
fn test_unknown_cpu_feature_is_one_line_error() {
    let out = run(&["run", "--kernel", "k", "--cpu-features", "-warpdrive"]);
    assert_one_line_error(&out, "warpdrive");
}

#[test]
fn test_help_lists_exit_statuses() {
    let out = run(&["run", "--help"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("Exit status"), "{out:?}");
    assert!(out.stdout.contains("--no-reboot"), "{out:?}");
}

#[test]
fn test_disk_locked_by_another_process_is_one_line_error() {
    let dir = tempdir("locked");
    let kernel = dir.join("junk.bin");
    std::fs::write(&kernel, JUNK).expect("write kernel");
    let disk_path = dir.join("disk.img");
    std::fs::write(&disk_path, vec![0u8; 1 << 20]).expect("write disk");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_path)
        .expect("open disk");
    // SAFETY: flock is plain data; fcntl on a file we own.
    let rc = unsafe {
        use std::os::fd::AsRawFd;
        let mut lock: libc::flock = std::mem::zeroed();
        lock.l_type = libc::F_WRLCK as i16;
        lock.l_whence = libc::SEEK_SET as i16;
        libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock)
    };
    assert_eq!(rc, 0, "could not take the test's own lock");

    let out = run(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        disk_path.to_str().unwrap(),
    ]);

    assert_one_line_error(&out, "locked");
    drop(file);
}
