//! Disk throughput: the test guest's `blk-bench` on a raw and a qcow2 image attached as
//! virtio-blk (Ferrite `--disk`, QEMU `-device virtio-blk-pci`), and the host's own `fio` on
//! the raw image as the ceiling.
//!
//! Cache mode: Ferrite opens images buffered (no `O_DIRECT`; the host page cache is used and a
//! guest FLUSH is an `fdatasync`), so QEMU gets `cache=writeback` (its default, the same
//! semantics) and fio `--direct=0 --invalidate=0` (warm page cache, like the VMMs see it).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use crate::child::{CommandSpec, VmmProcess};
use crate::error::{BenchError, Result};
use crate::scenario::{wait_ready, RunConfig};
use crate::vmm::{Vmm, VmmKind};

/// An image format under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Raw image.
    Raw,
    /// qcow2 image (fully allocated by `qemu-img convert` from the raw one).
    Qcow2,
}

impl Format {
    /// Name used in command lines and reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What one row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Sequential reads of `seq_bs`.
    SeqRead,
    /// Sequential writes of `seq_bs`.
    SeqWrite,
    /// Random reads of `rand_bs`.
    RandRead,
    /// Random writes of `rand_bs`.
    RandWrite,
}

impl Mode {
    /// The guest's (and our) name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Mode::SeqRead => "seqread",
            Mode::SeqWrite => "seqwrite",
            Mode::RandRead => "randread",
            Mode::RandWrite => "randwrite",
        }
    }

    /// fio `--rw=` value.
    fn fio_rw(self) -> &'static str {
        match self {
            Mode::SeqRead => "read",
            Mode::SeqWrite => "write",
            Mode::RandRead => "randread",
            Mode::RandWrite => "randwrite",
        }
    }

    /// Sequential rows report MiB/s, random rows kIOPS.
    pub fn sequential(self) -> bool {
        matches!(self, Mode::SeqRead | Mode::SeqWrite)
    }
}

/// Every mode, in the order the guest runs them on each disk (a flush after the writes, so
/// the next row starts without dirty pages of the previous one).
pub const MODES: [Mode; 4] = [
    Mode::SeqRead,
    Mode::SeqWrite,
    Mode::RandRead,
    Mode::RandWrite,
];
/// Both formats, in disk order (disk 0 raw, disk 1 qcow2).
pub const FORMATS: [Format; 2] = [Format::Raw, Format::Qcow2];

/// Settings of the disk benchmark.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    /// Directory holding the images.
    pub dir: PathBuf,
    /// Size of each image in MiB.
    pub size_mib: u64,
    /// Data moved per sequential row, MiB.
    pub seq_mib: u64,
    /// Data moved per random row, MiB.
    pub rand_mib: u64,
    /// Requests in flight.
    pub qd: u64,
    /// Sequential request size in bytes.
    pub seq_bs: u64,
    /// Random request size in bytes.
    pub rand_bs: u64,
    /// QEMU `aio=` (threads, io_uring or native).
    pub qemu_aio: String,
    /// The fio binary.
    pub fio: PathBuf,
    /// fio `--ioengine` values tried; the best is the ceiling.
    pub fio_engines: Vec<String>,
}

impl DiskPlan {
    /// Path of the image of `format`.
    pub fn image(&self, format: Format) -> PathBuf {
        self.dir.join(format!("bench-disk.{}", format.name()))
    }

    fn mib_and_bs(&self, mode: Mode) -> (u64, u64) {
        if mode.sequential() {
            (self.seq_mib, self.seq_bs)
        } else {
            (self.rand_mib, self.rand_bs)
        }
    }

    /// The guest's `cmds=`: every mode on both disks, a flush after each write row, poweroff.
    pub fn guest_cmds(&self) -> String {
        let mut cmds = Vec::new();
        for (d, _) in FORMATS.iter().enumerate() {
            cmds.push(format!("blk-id {d}"));
            for mode in MODES {
                let (mib, bs) = self.mib_and_bs(mode);
                cmds.push(format!(
                    "blk-bench {d} {} {mib} {} {bs}",
                    mode.name(),
                    self.qd
                ));
                if matches!(mode, Mode::SeqWrite | Mode::RandWrite) {
                    cmds.push(format!("blk-flush {d}"));
                }
            }
        }
        cmds.push("poweroff".into());
        cmds.join(";")
    }

    /// The VMM's command with both images attached.
    pub fn command(&self, vmm: &Vmm, cfg: &RunConfig, cmdline: &str) -> CommandSpec {
        let mut spec = vmm.command(&cfg.guest, cmdline);
        for (d, format) in FORMATS.iter().enumerate() {
            let path = self.image(*format).display().to_string();
            let name = format.name();
            match vmm.kind {
                VmmKind::Ferrite => {
                    spec.args.push("--disk".into());
                    spec.args.push(format!("{path},format={name},id={name}"));
                }
                VmmKind::QemuMicrovm | VmmKind::QemuQ35 => {
                    spec.args.push("-drive".into());
                    spec.args.push(format!(
                        "if=none,id=d{d},file={path},format={name},cache=writeback,aio={}",
                        self.qemu_aio
                    ));
                    spec.args.push("-device".into());
                    spec.args
                        .push(format!("virtio-blk-pci,drive=d{d},serial={name}"));
                }
            }
        }
        spec
    }
}

/// One measured row value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowValue {
    /// Image format.
    pub format: Format,
    /// Mode.
    pub mode: Mode,
    /// MiB/s for sequential rows, thousands of IOPS for random ones.
    pub value: f64,
}

/// A parsed `OK blk-bench disk=D mode=M ... ops=N bytes=N ns=N` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkBenchAnswer {
    /// Disk index.
    pub disk: usize,
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Guest-measured duration.
    pub ns: u64,
    /// Doorbell writes the guest made.
    pub kicks: u64,
}

/// Parse the guest's answer to `blk-bench` for `mode`.
pub fn parse_blk_bench(line: &str, mode: Mode) -> Result<BlkBenchAnswer> {
    let mut words = line.split_whitespace();
    if words.next() != Some("OK") || words.next() != Some("blk-bench") {
        return Err(BenchError::CommandRefused {
            cmd: format!("blk-bench {}", mode.name()),
            line: line.to_string(),
        });
    }
    let mut disk = None;
    let mut seen_mode = None;
    let (mut ops, mut bytes, mut ns, mut kicks) = (None, None, None, 0);
    for word in words {
        match word.split_once('=') {
            Some(("disk", v)) => disk = v.parse::<usize>().ok(),
            Some(("mode", v)) => seen_mode = Some(v),
            Some(("ops", v)) => ops = v.parse::<u64>().ok(),
            Some(("bytes", v)) => bytes = v.parse::<u64>().ok(),
            Some(("ns", v)) => ns = v.parse::<u64>().ok(),
            Some(("kicks", v)) => kicks = v.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    match (disk, seen_mode, ops, bytes, ns) {
        (Some(disk), Some(m), Some(ops), Some(bytes), Some(ns))
            if m == mode.name() && ops > 0 && ns > 0 =>
        {
            Ok(BlkBenchAnswer {
                disk,
                ops,
                bytes,
                ns,
                kicks,
            })
        }
        _ => Err(BenchError::MalformedAnswer(line.to_string())),
    }
}

impl BlkBenchAnswer {
    /// MiB/s (sequential) or kIOPS (random).
    pub fn value(&self, mode: Mode) -> f64 {
        let secs = self.ns as f64 / 1e9;
        if mode.sequential() {
            self.bytes as f64 / (1u64 << 20) as f64 / secs
        } else {
            self.ops as f64 / secs / 1e3
        }
    }
}

/// Boot `vmm` once with both disks and run every row; values in [`FORMATS`] × [`MODES`] order.
pub fn disk_once(vmm: &Vmm, plan: &DiskPlan, cfg: &RunConfig) -> Result<(Vec<RowValue>, Vec<u64>)> {
    let spec = plan.command(vmm, cfg, &cfg.cmdline(&plan.guest_cmds()));
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout)?;
    let out = collect(&mut p, cfg);
    p.kill();
    out
}

fn collect(p: &mut VmmProcess, cfg: &RunConfig) -> Result<(Vec<RowValue>, Vec<u64>)> {
    wait_ready(p, cfg)?;
    let mut values = Vec::new();
    let mut kicks = Vec::new();
    for (d, format) in FORMATS.iter().enumerate() {
        let deadline = Instant::now() + cfg.command_timeout;
        let (id, _) = p.wait_line(deadline, "the answer to blk-id", |l| {
            l.starts_with("OK blk-id") || l.starts_with("ERR blk-id")
        })?;
        let want = format!("OK blk-id {d} id={} ", format.name());
        if !id.text.starts_with(&want) {
            return Err(BenchError::CommandRefused {
                cmd: format!("blk-id {d}"),
                line: id.text,
            });
        }
        for mode in MODES {
            let deadline = Instant::now() + cfg.command_timeout;
            let (line, _) = p.wait_line(deadline, "the answer to blk-bench", |l| {
                l.starts_with("OK blk-bench") || l.starts_with("ERR blk-bench")
            })?;
            let a = parse_blk_bench(&line.text, mode)?;
            if a.disk != d {
                return Err(BenchError::MalformedAnswer(line.text));
            }
            values.push(RowValue {
                format: *format,
                mode,
                value: a.value(mode),
            });
            kicks.push(a.kicks);
            if matches!(mode, Mode::SeqWrite | Mode::RandWrite) {
                let (line, _) = p.wait_line(deadline, "the answer to blk-flush", |l| {
                    l.starts_with("OK blk-flush") || l.starts_with("ERR blk-flush")
                })?;
                if !line.text.starts_with("OK") {
                    return Err(BenchError::CommandRefused {
                        cmd: "blk-flush".into(),
                        line: line.text,
                    });
                }
            }
        }
    }
    Ok((values, kicks))
}

/// Create both images: the raw one filled with non-zero data (so nothing reads as a hole and
/// qemu-img keeps every cluster), the qcow2 one converted from it (fully allocated).
pub fn prepare_images(plan: &DiskPlan) -> Result<()> {
    std::fs::create_dir_all(&plan.dir).map_err(|e| BenchError::Prepare(plan.dir.clone(), e))?;
    let raw = plan.image(Format::Raw);
    let qcow2 = plan.image(Format::Qcow2);
    let mut f = File::create(&raw).map_err(|e| BenchError::Prepare(raw.clone(), e))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..plan.size_mib {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)
            .map_err(|e| BenchError::Prepare(raw.clone(), e))?;
    }
    f.sync_all()
        .map_err(|e| BenchError::Prepare(raw.clone(), e))?;
    let _ = std::fs::remove_file(&qcow2);
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .output()
        .map_err(|e| BenchError::Prepare(qcow2.clone(), e))?;
    if !out.status.success() {
        return Err(BenchError::Tool {
            tool: "qemu-img convert".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    sync_images(plan);
    Ok(())
}

/// Write back every dirty page of both images, so the next measurement starts clean.
pub fn sync_images(plan: &DiskPlan) {
    for format in FORMATS {
        if let Ok(f) = OpenOptions::new().read(true).open(plan.image(format)) {
            let _ = f.sync_all();
        }
    }
}

/// The fio command for `mode` on `file` with `engine`.
pub fn fio_command(plan: &DiskPlan, file: &Path, mode: Mode, engine: &str) -> Vec<String> {
    let (mib, bs) = plan.mib_and_bs(mode);
    vec![
        "--name=ceiling".into(),
        format!("--filename={}", file.display()),
        "--direct=0".into(),
        "--invalidate=0".into(),
        format!("--rw={}", mode.fio_rw()),
        format!("--bs={bs}"),
        format!("--iodepth={}", plan.qd),
        format!("--ioengine={engine}"),
        format!("--size={}M", plan.size_mib),
        format!("--io_size={mib}M"),
        "--randrepeat=1".into(),
        "--output-format=json".into(),
    ]
}

/// MiB/s (sequential) or kIOPS (random) from fio's JSON output.
pub fn parse_fio(json: &str, mode: Mode) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|_| BenchError::MalformedAnswer("fio output is not JSON".into()))?;
    let dir = if matches!(mode, Mode::SeqRead | Mode::RandRead) {
        "read"
    } else {
        "write"
    };
    let job = &v["jobs"][0][dir];
    let value = if mode.sequential() {
        job["bw_bytes"].as_f64().map(|b| b / (1u64 << 20) as f64)
    } else {
        job["iops"].as_f64().map(|i| i / 1e3)
    };
    match value {
        Some(x) if x > 0.0 => Ok(x),
        _ => Err(BenchError::MalformedAnswer(format!(
            "fio reported no {dir} throughput"
        ))),
    }
}

/// The host ceiling of `mode` on the raw image: the best of the configured fio engines.
pub fn fio_once(plan: &DiskPlan, mode: Mode) -> Result<(f64, String)> {
    let file = plan.image(Format::Raw);
    let mut best: Option<(f64, String)> = None;
    let mut last_err = None;
    for engine in &plan.fio_engines {
        let out = Command::new(&plan.fio)
            .args(fio_command(plan, &file, mode, engine))
            .output()
            .map_err(|e| BenchError::Spawn {
                program: plan.fio.display().to_string(),
                source: e,
            })?;
        sync_images(plan);
        if !out.status.success() {
            last_err = Some(BenchError::Tool {
                tool: format!("fio --ioengine={engine}"),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
            continue;
        }
        match parse_fio(&String::from_utf8_lossy(&out.stdout), mode) {
            Ok(v) if best.as_ref().is_none_or(|(b, _)| v > *b) => best = Some((v, engine.clone())),
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    best.ok_or_else(|| {
        last_err.unwrap_or(BenchError::MalformedAnswer(
            "no fio engine configured".into(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> DiskPlan {
        DiskPlan {
            dir: PathBuf::from("/d"),
            size_mib: 256,
            seq_mib: 256,
            rand_mib: 32,
            qd: 32,
            seq_bs: 1 << 20,
            rand_bs: 4096,
            qemu_aio: "threads".into(),
            fio: PathBuf::from("fio"),
            fio_engines: vec!["libaio".into()],
        }
    }

    #[test]
    fn test_parse_blk_bench_sequential_mib_per_s() {
        // Arrange
        let line = "OK blk-bench disk=1 mode=seqread qd=32 bs=1048576 ops=256 bytes=268435456 ns=500000000 tsc=1 kicks=9";

        // Act
        let a = parse_blk_bench(line, Mode::SeqRead).expect("parsed");

        // Assert
        assert_eq!((a.disk, a.ops, a.kicks), (1, 256, 9));
        assert_eq!(a.value(Mode::SeqRead), 512.0);
    }

    #[test]
    fn test_parse_blk_bench_random_kiops() {
        // Arrange
        let line = "OK blk-bench disk=0 mode=randwrite qd=32 bs=4096 ops=8192 bytes=33554432 ns=100000000 tsc=1 kicks=1";

        // Act
        let a = parse_blk_bench(line, Mode::RandWrite).expect("parsed");

        // Assert
        assert_eq!(a.value(Mode::RandWrite), 81.92);
    }

    #[test]
    fn test_parse_blk_bench_other_mode_malformed() {
        // Arrange
        let line = "OK blk-bench disk=0 mode=randread qd=32 bs=4096 ops=1 bytes=4096 ns=1";

        // Act
        let r = parse_blk_bench(line, Mode::RandWrite);

        // Assert
        assert!(matches!(r, Err(BenchError::MalformedAnswer(_))));
    }

    #[test]
    fn test_parse_blk_bench_err_refused() {
        // Arrange
        let line = "ERR blk-bench disk=0 mode=seqread timeout";

        // Act
        let r = parse_blk_bench(line, Mode::SeqRead);

        // Assert
        assert!(matches!(r, Err(BenchError::CommandRefused { .. })));
    }

    #[test]
    fn test_parse_fio_write_bandwidth() {
        // Arrange
        let json = r#"{"jobs":[{"read":{"bw_bytes":0,"iops":0},"write":{"bw_bytes":1048576000,"iops":1000.0}}]}"#;

        // Act
        let v = parse_fio(json, Mode::SeqWrite).expect("value");

        // Assert
        assert_eq!(v, 1000.0);
    }

    #[test]
    fn test_parse_fio_no_throughput_malformed() {
        // Arrange
        let json =
            r#"{"jobs":[{"read":{"bw_bytes":0,"iops":0.0},"write":{"bw_bytes":0,"iops":0.0}}]}"#;

        // Act
        let r = parse_fio(json, Mode::RandRead);

        // Assert
        assert!(r.is_err());
    }

    #[test]
    fn test_guest_cmds_flush_after_writes() {
        // Arrange
        let p = plan();

        // Act
        let cmds = p.guest_cmds();

        // Assert
        assert!(cmds.starts_with(
            "blk-id 0;blk-bench 0 seqread 256 32 1048576;blk-bench 0 seqwrite 256 32 1048576;blk-flush 0;"
        ));
        assert!(cmds.contains("blk-bench 1 randwrite 32 32 4096;blk-flush 1;poweroff"));
    }

    #[test]
    fn test_command_qemu_same_cache_mode_and_serials() {
        // Arrange
        let vmm = Vmm {
            kind: VmmKind::QemuQ35,
            program: PathBuf::from("/q"),
            machine: "q35".into(),
            extra_args: vec![],
        };
        let cfg = crate::scenario::test_support::config();

        // Act
        let line = plan().command(&vmm, &cfg, "x").args.join(" ");

        // Assert
        assert!(line.contains(
            "-drive if=none,id=d0,file=/d/bench-disk.raw,format=raw,cache=writeback,aio=threads -device virtio-blk-pci,drive=d0,serial=raw"
        ));
        assert!(line.contains("format=qcow2,cache=writeback"));
    }

    #[test]
    fn test_command_ferrite_disks_with_format_and_id() {
        // Arrange
        let vmm = Vmm {
            kind: VmmKind::Ferrite,
            program: PathBuf::from("/f"),
            machine: String::new(),
            extra_args: vec![],
        };
        let cfg = crate::scenario::test_support::config();

        // Act
        let line = plan().command(&vmm, &cfg, "x").args.join(" ");

        // Assert
        assert!(line.ends_with(
            "--disk /d/bench-disk.raw,format=raw,id=raw --disk /d/bench-disk.qcow2,format=qcow2,id=qcow2"
        ));
    }
}
