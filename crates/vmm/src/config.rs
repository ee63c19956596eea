//! What a VM is made of, and the one place where a configuration is checked.
//!
//! Every error names the problem and the fix, so the CLI can print it as one line.

use std::path::{Path, PathBuf};

use arch::cpuid::FeatureMask;
use serde::{Deserialize, Serialize};

pub use crate::devices::balloon::BalloonConfig;
pub use crate::devices::console::ConsoleConfig;
pub use crate::devices::net::NetConfig;
pub use crate::devices::rng::RngConfig;
pub use crate::devices::vsock::VsockConfig;

/// Smallest guest RAM accepted (a bzImage needs room to decompress itself).
pub const MIN_MEMORY: u64 = arch::layout::MIN_MEMORY;
/// Largest guest RAM accepted: guest RAM is mapped lazily, but page tables and the dirty bitmap
/// still grow with it, and the guest-physical address width caps it anyway.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs one VM may have regardless of the host: APIC IDs in the MADT are 8-bit and 0xff
/// is the broadcast ID. The host's `KVM_CAP_MAX_VCPUS` may lower this further.
pub const MAX_VCPUS: u32 = 254;
/// Longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_DISK_ID_LEN: usize = 20;

/// A configuration problem, worded for the person who typed it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--kernel` points nowhere.
    #[error("Kernel image {0} does not exist: pass an existing file to --kernel")]
    KernelMissing(PathBuf),
    /// `--kernel` is not a regular file.
    #[error(
        "Kernel image {0} is not a regular file: pass a vmlinux (PVH ELF) or bzImage to --kernel"
    )]
    KernelNotAFile(PathBuf),
    /// `--initrd` points nowhere.
    #[error("Initrd {0} does not exist: pass an existing file to --initrd")]
    InitrdMissing(PathBuf),
    /// `--initrd` is not a regular file.
    #[error("Initrd {0} is not a regular file: pass an initramfs archive to --initrd")]
    InitrdNotAFile(PathBuf),
    /// `--memory 0`.
    #[error("Memory size must not be zero: use e.g. --memory 512M")]
    MemoryZero,
    /// A memory size that is not a number with an optional K/M/G/T suffix.
    #[error("Invalid memory size {0:?}: use a number of MiB or a size like 512M, 2G")]
    MemoryUnparsable(String),
    /// Below [`MIN_MEMORY`].
    #[error("Memory size {0} MiB is too small: use --memory 128M or more")]
    MemoryTooSmall(u64),
    /// Above [`MAX_MEMORY`].
    #[error("Memory size {0} MiB is too large: use --memory 1T or less")]
    MemoryTooLarge(u64),
    /// Not a whole number of 4 KiB pages.
    #[error("Memory size {0} bytes is not a multiple of 4 KiB: round it, e.g. to whole MiB")]
    MemoryUnaligned(u64),
    /// `--cpus 0`.
    #[error("The VM needs at least one vCPU: use --cpus 1 or more")]
    VcpusZero,
    /// More vCPUs than Ferrite or the host's KVM supports.
    #[error("{requested} vCPUs requested but at most {max} are supported here: use --cpus {max} or fewer")]
    TooManyVcpus {
        /// What was asked for.
        requested: u32,
        /// The limit (Ferrite's or `KVM_CAP_MAX_VCPUS`, whichever is lower).
        max: u32,
    },
    /// The kernel command line does not fit the boot protocol.
    #[error(
        "Kernel command line is {len} bytes, more than the {max}-byte limit: shorten --cmdline"
    )]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Limit, excluding the NUL.
        max: usize,
    },
    /// The kernel command line has a NUL byte.
    #[error("Kernel command line contains a NUL byte: remove it from --cmdline")]
    CmdlineNul,
    /// `--disk` points nowhere.
    #[error("Disk image {0} does not exist: create it first or fix the --disk path")]
    DiskMissing(PathBuf),
    /// A `--disk` option that is not `readonly`, `id=...` or `format=...`.
    #[error("Unknown --disk option {0:?}: use PATH[,readonly][,id=SERIAL][,format=raw|qcow2][,bw=N][,iops=N][,bw-burst=N][,iops-burst=N]")]
    DiskBadOption(String),
    /// `--disk PATH,format=X` with an unknown format.
    #[error("Unknown --disk format {0:?}: use format=raw or format=qcow2")]
    DiskBadFormat(String),
    /// `--disk ""` or `--disk ,readonly`.
    #[error("--disk needs a path: use PATH[,readonly][,id=SERIAL][,format=raw|qcow2]")]
    DiskNoPath,
    /// The same image twice, at least once writable.
    #[error("Disk image {0} is given twice: attach a writable image once, or pass ,readonly to every copy")]
    DiskTwice(PathBuf),
    /// A disk serial longer than virtio-blk allows.
    #[error("Disk id {0:?} is longer than 20 bytes: use a shorter id=")]
    DiskIdTooLong(String),
    /// Two disks with the same serial.
    #[error("Disk id {0:?} is used twice: give each --disk its own id=")]
    DiskIdDuplicate(String),
    /// A device option (`--net`, `--vsock`, `--rng`, `--balloon`, `--virtio-console`,
    /// `--api-socket`) that cannot be used; `message` names the problem and the fix.
    #[error("Invalid {flag}: {message}")]
    Device {
        /// The flag, e.g. "--net".
        flag: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A `--cpu-features` list the platform code rejected.
    #[error("Invalid --cpu-features (use a comma-separated list of -NAME, e.g. -avx512f,-x2apic)")]
    CpuFeatures(#[source] arch::cpuid::Error),
}

/// Whether the VMM repairs instructions the host's KVM failed to emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RepairMode {
    /// Repair when the host needs it (KVM is `kvm_pvm`).
    #[default]
    Auto,
    /// Always repair.
    On,
    /// Never repair: any emulation failure stops the VM.
    Off,
}

impl std::str::FromStr for RepairMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "invalid repair mode {other:?}: use on, off or auto"
            )),
        }
    }
}

/// How KVM reports the pages the guest writes (for live migration and diff snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyLogMode {
    /// The per-vCPU dirty ring where the host's KVM offers it, the bitmap otherwise.
    #[default]
    Auto,
    /// Always the dirty ring (`KVM_CAP_DIRTY_LOG_RING`); a host without it refuses the VM.
    Ring,
    /// Always the per-slot bitmap (`KVM_GET_DIRTY_LOG`).
    Bitmap,
}

impl std::str::FromStr for DirtyLogMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "ring" => Ok(Self::Ring),
            "bitmap" => Ok(Self::Bitmap),
            other => Err(format!(
                "invalid dirty log {other:?}: use auto, ring or bitmap"
            )),
        }
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Disk image on the host (raw or qcow2).
    pub path: PathBuf,
    /// The guest may not write.
    pub readonly: bool,
    /// virtio-blk serial (`/dev/disk/by-id/virtio-<id>` in Linux), at most 20 bytes.
    pub id: Option<String>,
    /// Image format; `None` probes the qcow2 magic. Give `format=raw` for raw disks a guest
    /// writes: a guest could write a qcow2 header (naming a host file as backing file) into a
    /// raw disk, and probing would then follow it on the next start.
    #[serde(default)]
    pub format: Option<disk::ImageFormat>,
    /// I/O limits (`bw=`, `iops=`, `bw-burst=`, `iops-burst=`); default unlimited.
    #[serde(default)]
    pub rate_limit: rate_limiter::RateLimitConfig,
}

impl DiskConfig {
    /// Parse `PATH[,readonly][,id=SERIAL][,format=raw|qcow2][,bw=N][,iops=N][,bw-burst=N][,iops-burst=N]`
    /// (the `--disk` syntax; N accepts K/M/G binary suffixes).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(ConfigError::DiskNoPath);
        }
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            readonly: false,
            id: None,
            format: None,
            rate_limit: rate_limiter::RateLimitConfig::default(),
        };
        let (mut bw, mut iops, mut bw_burst, mut iops_burst) = (None, None, None, None);
        for opt in parts {
            if opt == "readonly" || opt == "ro" {
                disk.readonly = true;
            } else if let Some(id) = opt.strip_prefix("id=") {
                if id.len() > MAX_DISK_ID_LEN {
                    return Err(ConfigError::DiskIdTooLong(id.to_string()));
                }
                disk.id = Some(id.to_string());
            } else if let Some(fmt) = opt.strip_prefix("format=") {
                disk.format = Some(
                    fmt.parse()
                        .map_err(|_| ConfigError::DiskBadFormat(fmt.to_string()))?,
                );
            } else if let Some((key @ ("bw" | "iops" | "bw-burst" | "iops-burst"), v)) =
                opt.split_once('=')
            {
                let n = rate_limiter::parse_rate(v)
                    .map_err(|_| ConfigError::DiskBadOption(opt.to_string()))?;
                match key {
                    "bw" => bw = Some(n),
                    "iops" => iops = Some(n),
                    "bw-burst" => bw_burst = Some(n),
                    _ => iops_burst = Some(n),
                }
            } else {
                return Err(ConfigError::DiskBadOption(opt.to_string()));
            }
        }
        if (bw_burst.is_some() && bw.is_none()) || (iops_burst.is_some() && iops.is_none()) {
            return Err(ConfigError::DiskBadOption(
                "bw-burst/iops-burst need bw=/iops=".to_string(),
            ));
        }
        disk.rate_limit.bandwidth =
            bw.map(|n| rate_limiter::RateLimitConfig::parse_rate(n, bw_burst));
        disk.rate_limit.ops =
            iops.map(|n| rate_limiter::RateLimitConfig::parse_rate(n, iops_burst));
        Ok(disk)
    }
}

/// Parse `--cpu-features` (`-NAME,-NAME,...`) into the platform's feature mask.
pub fn parse_cpu_features(spec: &str) -> Result<FeatureMask, ConfigError> {
    spec.parse::<FeatureMask>()
        .map_err(ConfigError::CpuFeatures)
}

/// Everything needed to build (and rebuild, after a guest reset) one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel: a PVH ELF (vmlinux) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// Exit instead of restarting the VM when the guest resets.
    pub no_reboot: bool,
    /// Emulation-failure repair.
    pub repair: RepairMode,
    /// Features hidden from the guest's CPUID.
    pub cpu_features: FeatureMask,
    /// virtio-net NICs, in PCI slot order (after the disks).
    pub nets: Vec<NetConfig>,
    /// virtio-vsock.
    pub vsock: Option<VsockConfig>,
    /// virtio-rng.
    pub rng: Option<RngConfig>,
    /// virtio-balloon.
    pub balloon: Option<BalloonConfig>,
    /// virtio-console (hvc0).
    pub virtio_console: Option<ConsoleConfig>,
    /// The per-VM control socket (JSON requests: rate limits, balloon target, statistics).
    pub api_socket: Option<PathBuf>,
    /// Log the pages the guest writes (KVM dirty logging) so snapshots can be diffs, and a VM
    /// restored from a snapshot can be snapshotted again. Costs a write fault per page the
    /// first time it is written after each snapshot.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Back guest RAM with shared memory files (memfd) instead of anonymous memory, so a
    /// same-host migration can hand the memory over by file descriptor instead of copying it
    /// (upgrading Ferrite under a running VM).
    #[serde(default)]
    pub memory_shared: bool,
    /// How dirty pages are tracked: KVM's dirty ring or its bitmap (absent in configurations
    /// and snapshots older than the ring: auto).
    #[serde(default)]
    pub dirty_log: DirtyLogMode,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_bytes: 512 << 20,
            disks: Vec::new(),
            no_reboot: false,
            repair: RepairMode::Auto,
            cpu_features: FeatureMask::empty(),
            nets: Vec::new(),
            vsock: None,
            rng: None,
            balloon: None,
            virtio_console: None,
            api_socket: None,
            track_dirty_pages: false,
            memory_shared: false,
            dirty_log: DirtyLogMode::Auto,
        }
    }
}

fn check_file(path: &Path, missing: fn(PathBuf) -> ConfigError) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(_) => Err(missing(path.to_path_buf())),
    }
}

/// Like [`check_file`], and the path must also be a regular file (not a directory or device).
fn check_regular_file(
    path: &Path,
    missing: fn(PathBuf) -> ConfigError,
    not_a_file: fn(PathBuf) -> ConfigError,
) -> Result<(), ConfigError> {
    check_file(path, missing)?;
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Err(not_a_file(path.to_path_buf()));
    }
    Ok(())
}

impl VmConfig {
    /// Check everything that can be checked without KVM. `host_max_vcpus` is the host's
    /// `KVM_CAP_MAX_VCPUS` when known.
    pub fn validate(&self, host_max_vcpus: Option<u32>) -> Result<(), ConfigError> {
        check_regular_file(
            &self.kernel,
            ConfigError::KernelMissing,
            ConfigError::KernelNotAFile,
        )?;
        if let Some(initrd) = &self.initrd {
            check_regular_file(
                initrd,
                ConfigError::InitrdMissing,
                ConfigError::InitrdNotAFile,
            )?;
        }
        validate_memory(self.memory_bytes)?;
        let max = host_max_vcpus.map_or(MAX_VCPUS, |m| m.min(MAX_VCPUS));
        if self.vcpus == 0 {
            return Err(ConfigError::VcpusZero);
        }
        if self.vcpus > max {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max,
            });
        }
        let cmdline_max = arch::layout::CMDLINE_MAX_SIZE - 1;
        if self.cmdline.len() > cmdline_max {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max: cmdline_max,
            });
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let mut ids = std::collections::HashSet::new();
        let mut seen: Vec<(PathBuf, bool)> = Vec::new();
        for disk in &self.disks {
            check_file(&disk.path, ConfigError::DiskMissing)?;
            let real = std::fs::canonicalize(&disk.path).unwrap_or_else(|_| disk.path.clone());
            if seen
                .iter()
                .any(|(p, ro)| *p == real && !(*ro && disk.readonly))
            {
                return Err(ConfigError::DiskTwice(disk.path.clone()));
            }
            seen.push((real, disk.readonly));
            if let Some(id) = &disk.id {
                if id.len() > MAX_DISK_ID_LEN {
                    return Err(ConfigError::DiskIdTooLong(id.clone()));
                }
                if !ids.insert(id.clone()) {
                    return Err(ConfigError::DiskIdDuplicate(id.clone()));
                }
            }
        }
        for net in &self.nets {
            net.validate(self)?;
        }
        if let Some(v) = &self.vsock {
            v.validate(self)?;
        }
        if let Some(r) = &self.rng {
            r.validate(self)?;
        }
        if let Some(b) = &self.balloon {
            b.validate(self)?;
        }
        if let Some(c) = &self.virtio_console {
            c.validate(self)?;
        }
        Ok(())
    }
}

fn validate_memory(bytes: u64) -> Result<(), ConfigError> {
    if bytes == 0 {
        return Err(ConfigError::MemoryZero);
    }
    if !bytes.is_multiple_of(4096) {
        return Err(ConfigError::MemoryUnaligned(bytes));
    }
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(bytes >> 20));
    }
    if bytes > MAX_MEMORY {
        return Err(ConfigError::MemoryTooLarge(bytes >> 20));
    }
    Ok(())
}

/// Parse a memory size: a plain number means MiB (`1024` = 1 GiB, like QEMU's `-m`); a suffix
/// `K`, `M`, `G` or `T` (any case, optionally followed by `B` or `iB`) gives binary units.
/// Zero and malformed sizes are errors; range checks happen in [`VmConfig::validate`].
pub fn parse_memory_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::MemoryUnparsable(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let number: u64 = t[..digits_end].parse().map_err(|_| bad())?;
    let suffix = t[digits_end..].to_ascii_lowercase();
    let unit_letter = suffix.trim_end_matches("ib").trim_end_matches('b');
    let shift: u32 = match unit_letter {
        "" if suffix.is_empty() => 20,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    if number == 0 {
        return Err(ConfigError::MemoryZero);
    }
    number.checked_mul(1u64 << shift).ok_or_else(|| {
        ConfigError::MemoryTooLarge(number.saturating_mul(1 << shift.saturating_sub(20)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_memory_size_suffixes_are_binary_units() {
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("2G"), Ok(2 << 30));
        assert_eq!(parse_memory_size("2g"), Ok(2 << 30));
        assert_eq!(parse_memory_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory_size("131072K"), Ok(128 << 20));
        assert_eq!(parse_memory_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn test_parse_memory_size_plain_number_is_mib() {
        assert_eq!(parse_memory_size("1024"), Ok(1 << 30));
    }

    #[test]
    fn test_parse_memory_size_zero_is_error() {
        assert_eq!(parse_memory_size("0"), Err(ConfigError::MemoryZero));
        assert_eq!(parse_memory_size("0G"), Err(ConfigError::MemoryZero));
    }

    #[test]
    fn test_parse_memory_size_garbage_is_error() {
        for s in ["12X", "", "G", "-1", "1.5G", "2GG", "99999999999999999999"] {
            assert!(parse_memory_size(s).is_err(), "{s} accepted");
        }
        assert_eq!(
            parse_memory_size("12X"),
            Err(ConfigError::MemoryUnparsable("12X".into()))
        );
    }

    #[test]
    fn test_parse_memory_size_overflow_is_too_large() {
        assert!(matches!(
            parse_memory_size("99999999999T"),
            Err(ConfigError::MemoryTooLarge(_))
        ));
    }

    #[test]
    fn test_parse_cpu_features_unknown_name_is_error() {
        assert!(parse_cpu_features("-avx2").is_ok());
        assert!(matches!(
            parse_cpu_features("-nosuchfeature"),
            Err(ConfigError::CpuFeatures(_))
        ));
    }

    #[test]
    fn test_disk_parse_options_are_applied() {
        let d = DiskConfig::parse("a.img,readonly,id=root").unwrap();
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("root"));
    }

    #[test]
    fn test_disk_parse_format_option_sets_format() {
        let d = DiskConfig::parse("a.img,format=raw").unwrap();
        assert_eq!(d.format, Some(disk::ImageFormat::Raw));
        let q = DiskConfig::parse("a.qcow2,format=qcow2,ro").unwrap();
        assert_eq!(q.format, Some(disk::ImageFormat::Qcow2));
        assert_eq!(DiskConfig::parse("a.img").unwrap().format, None);
        assert_eq!(
            DiskConfig::parse("a.img,format=vmdk"),
            Err(ConfigError::DiskBadFormat("vmdk".into()))
        );
    }

    #[test]
    fn test_disk_parse_bad_option_is_error() {
        assert_eq!(
            DiskConfig::parse("a.img,rw"),
            Err(ConfigError::DiskBadOption("rw".into()))
        );
        assert_eq!(DiskConfig::parse(",readonly"), Err(ConfigError::DiskNoPath));
        assert!(matches!(
            DiskConfig::parse("a,id=123456789012345678901"),
            Err(ConfigError::DiskIdTooLong(_))
        ));
    }

    fn config_with_kernel() -> VmConfig {
        VmConfig {
            kernel: std::env::current_exe().unwrap(),
            ..VmConfig::default()
        }
    }

    #[test]
    fn test_validate_default_with_kernel_is_ok() {
        assert_eq!(config_with_kernel().validate(Some(1024)), Ok(()));
    }

    #[test]
    fn test_validate_vcpus_beyond_host_limit_names_limit() {
        let cfg = VmConfig {
            vcpus: 100,
            ..config_with_kernel()
        };
        assert_eq!(
            cfg.validate(Some(64)),
            Err(ConfigError::TooManyVcpus {
                requested: 100,
                max: 64
            })
        );
    }

    #[test]
    fn test_validate_memory_bounds_are_enforced() {
        let small = VmConfig {
            memory_bytes: 64 << 20,
            ..config_with_kernel()
        };
        assert_eq!(small.validate(None), Err(ConfigError::MemoryTooSmall(64)));
        let odd = VmConfig {
            memory_bytes: (256 << 20) + 1,
            ..config_with_kernel()
        };
        assert!(matches!(
            odd.validate(None),
            Err(ConfigError::MemoryUnaligned(_))
        ));
    }

    #[test]
    fn test_validate_missing_kernel_is_error() {
        let cfg = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..VmConfig::default()
        };
        assert!(matches!(
            cfg.validate(None),
            Err(ConfigError::KernelMissing(_))
        ));
    }

    #[test]
    fn test_validate_initrd_directory_is_error() {
        let cfg = VmConfig {
            kernel: std::env::current_exe().unwrap(),
            initrd: Some(std::env::temp_dir()),
            ..VmConfig::default()
        };

        let result = cfg.validate(None);

        assert!(matches!(result, Err(ConfigError::InitrdNotAFile(_))));
    }

    #[test]
    fn test_validate_same_writable_disk_twice_is_error() {
        let exe = std::env::current_exe().unwrap();
        let rw = DiskConfig {
            path: exe.clone(),
            readonly: false,
            id: None,
            format: None,
            rate_limit: Default::default(),
        };
        let ro = DiskConfig {
            readonly: true,
            ..rw.clone()
        };
        let twice = VmConfig {
            disks: vec![rw.clone(), ro.clone()],
            ..config_with_kernel()
        };
        assert_eq!(twice.validate(None), Err(ConfigError::DiskTwice(exe)));
        let both_ro = VmConfig {
            disks: vec![ro.clone(), ro],
            ..config_with_kernel()
        };
        assert_eq!(both_ro.validate(None), Ok(()));
    }

    #[test]
    fn test_disk_parse_rate_options_set_buckets() {
        let d = DiskConfig::parse("/x.img,bw=10M,iops=500,bw-burst=1M").unwrap();

        let bw = d.rate_limit.bandwidth.unwrap();
        let ops = d.rate_limit.ops.unwrap();

        assert_eq!(
            (bw.size, bw.one_time_burst, bw.refill_time_ms),
            (10 << 20, 1 << 20, 1000)
        );
        assert_eq!((ops.size, ops.one_time_burst), (500, 0));
        assert!(DiskConfig::parse("/x.img,bw=fast").is_err());
        assert!(DiskConfig::parse("/x.img,iops-burst=5").is_err());
    }

    #[test]
    fn test_validate_duplicate_disk_id_is_error() {
        let exe = std::env::current_exe().unwrap();
        let disk = DiskConfig {
            path: exe,
            readonly: true,
            id: Some("x".into()),
            format: None,
            rate_limit: Default::default(),
        };
        let cfg = VmConfig {
            disks: vec![disk.clone(), disk],
            ..config_with_kernel()
        };
        assert_eq!(
            cfg.validate(None),
            Err(ConfigError::DiskIdDuplicate("x".into()))
        );
    }
}
