//! Turning an API [`VmSpec`] into the VMM's [`VmConfig`], with every problem reported against
//! the request field that caused it.

use std::path::{Path, PathBuf};

use api::{valid_vm_name, ApiError, Resources, VmSpec};
use vmm::config::{
    parse_cpu_features, BalloonConfig, ConfigError, DiskConfig, NetConfig, RepairMode, RngConfig,
    VsockConfig,
};
use vmm::error::chain_to_line;
use vmm::VmConfig;

/// Most vCPUs a definition may ask for (the host's KVM limit is checked at start).
const MAX_VCPUS: u32 = 255;

fn field_err(field: &str, e: &ConfigError) -> ApiError {
    ApiError::bad_field(field, format!("{field}: {}", chain_to_line(e)))
}

/// Which request field a VMM configuration error is about.
fn config_error_field(e: &ConfigError) -> &'static str {
    use ConfigError::*;
    match e {
        KernelMissing(_) | KernelNotAFile(_) => "kernel",
        InitrdMissing(_) | InitrdNotAFile(_) => "initrd",
        MemoryZero | MemoryUnparsable(_) | MemoryTooSmall(_) | MemoryTooLarge(_)
        | MemoryUnaligned(_) => "memory_mib",
        VcpusZero | TooManyVcpus { .. } => "vcpus",
        CmdlineTooLong { .. } | CmdlineNul => "cmdline",
        DiskMissing(_) | DiskBadOption(_) | DiskBadFormat(_) | DiskNoPath | DiskTwice(_)
        | DiskIdTooLong(_) | DiskIdDuplicate(_) => "disks",
        _ => "spec",
    }
}

/// Check `spec` completely (files exist, device strings parse, limits make sense) and build
/// the VMM configuration, with the control socket at `api_socket`.
pub fn to_vm_config(spec: &VmSpec, api_socket: &Path) -> Result<VmConfig, ApiError> {
    if !valid_vm_name(&spec.name) {
        return Err(ApiError::bad_field(
            "name",
            format!(
                "name {:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
                spec.name
            ),
        ));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(ApiError::bad_field(
            "vcpus",
            format!("vcpus {}: use 1 to {MAX_VCPUS}", spec.vcpus),
        ));
    }
    let memory_bytes = spec.memory_mib.checked_mul(1 << 20).ok_or_else(|| {
        ApiError::bad_field("memory_mib", "memory_mib is too large for this host")
    })?;
    validate_resources(&spec.resources, spec.memory_mib)?;
    let disks = parse_list(&spec.disks, "disks", DiskConfig::parse)?;
    let nets = parse_list(&spec.nets, "nets", NetConfig::parse)?;
    let vsock = parse_opt(spec.vsock.as_deref(), "vsock", VsockConfig::parse)?;
    let rng = parse_opt(spec.rng.as_deref(), "rng", RngConfig::parse)?;
    let balloon = parse_opt(spec.balloon.as_deref(), "balloon", BalloonConfig::parse)?;
    let repair = match spec.repair_emulation.as_deref() {
        None => RepairMode::Auto,
        Some(s) => s
            .parse::<RepairMode>()
            .map_err(|e| ApiError::bad_field("repair_emulation", e))?,
    };
    let cpu_features = match spec.cpu_features.as_deref() {
        None | Some("") => Default::default(),
        Some(s) => parse_cpu_features(s).map_err(|e| field_err("cpu_features", &e))?,
    };
    let config = VmConfig {
        kernel: PathBuf::from(&spec.kernel),
        initrd: spec.initrd.as_ref().map(PathBuf::from),
        cmdline: spec.cmdline.clone(),
        vcpus: spec.vcpus,
        memory_bytes,
        disks,
        no_reboot: false,
        repair,
        cpu_features,
        nets,
        vsock,
        rng,
        balloon,
        virtio_console: None,
        api_socket: Some(api_socket.to_path_buf()),
        track_dirty_pages: false,
        memory_shared: false,
        dirty_log: Default::default(),
    };
    config
        .validate(None)
        .map_err(|e| field_err(config_error_field(&e), &e))?;
    Ok(config)
}

fn parse_list<T>(
    items: &[String],
    field: &str,
    parse: impl Fn(&str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| parse(s).map_err(|e| field_err(&format!("{field}[{i}]"), &e)))
        .collect()
}

fn parse_opt<T>(
    item: Option<&str>,
    field: &str,
    parse: impl Fn(&str) -> Result<T, ConfigError>,
) -> Result<Option<T>, ApiError> {
    item.map(|s| parse(s).map_err(|e| field_err(field, &e)))
        .transpose()
}

/// Check resource limits on their own (also used for live changes).
pub fn validate_resources(r: &Resources, memory_mib: u64) -> Result<(), ApiError> {
    if let Some(q) = r.cpu_quota_pct {
        if !(1..=100 * 1024).contains(&q) {
            return Err(ApiError::bad_field(
                "resources.cpu_quota_pct",
                format!("cpu_quota_pct {q}: use 1 (1% of one CPU) or more, or null for no cap"),
            ));
        }
    }
    if let Some(w) = r.cpu_weight {
        if !(1..=10_000).contains(&w) {
            return Err(ApiError::bad_field(
                "resources.cpu_weight",
                format!("cpu_weight {w}: use 1 to 10000 (default 100)"),
            ));
        }
    }
    if let Some(m) = r.memory_limit_mib {
        if m < memory_mib {
            return Err(ApiError::bad_field(
                "resources.memory_limit_mib",
                format!(
                    "memory_limit_mib {m} is below the guest's {memory_mib} MiB of RAM: the VMM would be killed; give at least {memory_mib} plus some overhead"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kernel: &str) -> VmSpec {
        serde_json::from_value(serde_json::json!({"name": "a", "kernel": kernel})).unwrap()
    }

    #[test]
    fn test_missing_kernel_names_the_kernel_field() {
        let err = to_vm_config(&spec("/nonexistent/kernel"), Path::new("/tmp/s")).unwrap_err();

        assert_eq!(err.field.as_deref(), Some("kernel"));
    }

    #[test]
    fn test_bad_disk_string_names_its_index() {
        let mut s = spec("/bin/sh");
        s.disks = vec!["/bin/sh,readonly".into(), "/bin/sh,bogus=1".into()];

        let err = to_vm_config(&s, Path::new("/tmp/s")).unwrap_err();

        assert_eq!(err.field.as_deref(), Some("disks[1]"));
    }

    #[test]
    fn test_bad_name_and_weight_are_refused() {
        let mut s = spec("/bin/sh");
        s.name = "../etc".into();
        assert_eq!(
            to_vm_config(&s, Path::new("/tmp/s"))
                .unwrap_err()
                .field
                .as_deref(),
            Some("name")
        );
        let mut s = spec("/bin/sh");
        s.resources.cpu_weight = Some(0);
        assert_eq!(
            to_vm_config(&s, Path::new("/tmp/s"))
                .unwrap_err()
                .field
                .as_deref(),
            Some("resources.cpu_weight")
        );
    }

    #[test]
    fn test_valid_spec_builds_config_with_control_socket() {
        let config = to_vm_config(&spec("/bin/sh"), Path::new("/tmp/s")).unwrap();

        assert_eq!(config.api_socket.as_deref(), Some(Path::new("/tmp/s")));
        assert_eq!(config.memory_bytes, 512 << 20);
    }
}
