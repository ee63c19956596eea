//! `GET /metrics`: host and per-VM figures in the Prometheus text exposition format
//! (version 0.0.4).
//!
//! Written by hand: the format is a few lines of text, and the `prometheus` crates bring a
//! registry and global state the daemon does not need (it renders a fresh snapshot of
//! [`VmStats`] per scrape).

use std::fmt::Write;

use api::{HostInfo, MigrationInfo, MigrationPhase, VmState, VmStats};

/// Every state a VM can be in, for the `ferrite_vm_state` state set.
const STATES: [VmState; 7] = [
    VmState::Stopped,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Crashed,
    VmState::Incoming,
];

/// Every phase of a migration that was started, for the `ferrite_migration_phase` state set.
const PHASES: [MigrationPhase; 8] = [
    MigrationPhase::Connecting,
    MigrationPhase::Copying,
    MigrationPhase::Final,
    MigrationPhase::Postcopy,
    MigrationPhase::Completed,
    MigrationPhase::Failed,
    MigrationPhase::Cancelled,
    MigrationPhase::Unknown,
];

/// Prometheus metric kind.
#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// One metric family being written: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: Kind, help: &str) -> Self {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out, name }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }
}

/// Escape a label value: backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn format_value(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_nan() {
        "NaN".to_string()
    } else {
        format!("{v}")
    }
}

/// A per-VM family: one sample per VM that has a value.
fn per_vm(
    out: &mut String,
    all: &[VmStats],
    name: &'static str,
    kind: Kind,
    help: &str,
    value: impl Fn(&VmStats) -> Option<f64>,
) {
    let mut family = Family::new(out, name, kind, help);
    for vm in all {
        if let Some(v) = value(vm) {
            family.sample(&[("vm", &vm.name)], v);
        }
    }
}

/// I/O counters by device name.
type Devices = std::collections::BTreeMap<String, api::IoCounters>;

fn disks(v: &VmStats) -> &Devices {
    &v.disks
}

fn nets(v: &VmStats) -> &Devices {
    &v.nets
}

/// A per-device family (`disk` or `nic` label) from the VMs' I/O counters.
fn per_device(
    out: &mut String,
    all: &[VmStats],
    devices: fn(&VmStats) -> &Devices,
    label: &str,
    name: &'static str,
    help: &str,
    value: impl Fn(&api::IoCounters) -> u64,
) {
    let mut family = Family::new(out, name, Kind::Counter, help);
    for vm in all {
        for (dev, counters) in devices(vm) {
            family.sample(&[("vm", &vm.name), (label, dev)], value(counters) as f64);
        }
    }
}

/// Render the host figures, every VM's statistics and the last outgoing migration of each VM
/// that had one.
pub fn render(host: &HostInfo, all: &[VmStats], migrations: &[MigrationInfo]) -> String {
    let mut out = String::with_capacity(4096 + all.len() * 2048);
    render_host(&mut out, host, all);
    render_vms(&mut out, all);
    render_migrations(&mut out, migrations);
    out
}

/// A per-migration family: one sample per VM whose migration has a value.
fn per_migration(
    out: &mut String,
    all: &[MigrationInfo],
    name: &'static str,
    help: &str,
    value: impl Fn(&MigrationInfo) -> Option<f64>,
) {
    let mut family = Family::new(out, name, Kind::Gauge, help);
    for m in all {
        if let Some(v) = value(m) {
            family.sample(&[("vm", &m.vm)], v);
        }
    }
}

fn render_migrations(out: &mut String, all: &[MigrationInfo]) {
    let mut family = Family::new(
        out,
        "ferrite_migration_phase",
        Kind::Gauge,
        "1 for the phase of the VM's current or last outgoing live migration, 0 for the others.",
    );
    for m in all {
        for phase in PHASES {
            let on = m.phase == phase;
            family.sample(
                &[("vm", &m.vm), ("phase", phase.as_str())],
                if on { 1.0 } else { 0.0 },
            );
        }
    }
    per_migration(
        out,
        all,
        "ferrite_migration_round",
        "The migration's copy round (0: the first full pass).",
        |m| Some(f64::from(m.round)),
    );
    per_migration(
        out,
        all,
        "ferrite_migration_remaining_bytes",
        "Dirty guest memory left to copy at the start of the round, in bytes.",
        |m| Some(m.remaining_bytes as f64),
    );
    per_migration(
        out,
        all,
        "ferrite_migration_sent_bytes",
        "Bytes the migration sent so far.",
        |m| Some(m.sent_bytes as f64),
    );
    per_migration(
        out,
        all,
        "ferrite_migration_rate_bytes_per_second",
        "The migration's achieved rate in bytes per second.",
        |m| Some(m.rate_bytes_per_s as f64),
    );
    per_migration(
        out,
        all,
        "ferrite_migration_throttle_ratio",
        "Share of time auto-converge holds the guest's vCPUs back (0 to 1).",
        |m| Some(f64::from(m.throttle_pct) / 100.0),
    );
    per_migration(
        out,
        all,
        "ferrite_migration_elapsed_seconds",
        "Seconds since the migration started.",
        |m| Some(m.elapsed_ms as f64 / 1000.0),
    );
    per_migration(
        out,
        all,
        "ferrite_migration_downtime_seconds",
        "How long the guest was paused for the switch-over, in seconds (once completed).",
        |m| m.downtime_ms.map(|d| d / 1000.0),
    );
}

fn render_host(out: &mut String, host: &HostInfo, all: &[VmStats]) {
    let gauges: [(&'static str, &str, f64); 8] = [
        ("ferrite_host_cpus", "Host CPUs.", host.cpus as f64),
        (
            "ferrite_host_memory_bytes",
            "Host RAM in bytes.",
            (host.memory_mib << 20) as f64,
        ),
        (
            "ferrite_host_cpu_overcommit_ratio",
            "vCPUs the daemon allows per host CPU.",
            host.cpu_overcommit,
        ),
        (
            "ferrite_host_memory_overcommit_ratio",
            "Guest RAM the daemon allows per byte of host RAM (after the reserve).",
            host.memory_overcommit,
        ),
        (
            "ferrite_host_allocated_vcpus",
            "vCPUs of the active VMs.",
            host.allocated_vcpus as f64,
        ),
        (
            "ferrite_host_allocated_memory_bytes",
            "Guest RAM of the active VMs in bytes.",
            (host.allocated_memory_mib << 20) as f64,
        ),
        ("ferrite_host_vms", "VMs defined.", host.vms as f64),
        (
            "ferrite_host_active_vms",
            "VMs with a VMM process.",
            host.active_vms as f64,
        ),
    ];
    for (name, help, value) in gauges {
        Family::new(out, name, Kind::Gauge, help).sample(&[], value);
    }
    Family::new(
        out,
        "ferrite_host_vm_rss_bytes",
        Kind::Gauge,
        "Resident memory of all VMM processes in bytes.",
    )
    .sample(&[], all.iter().map(|v| v.rss_bytes as f64).sum());
    Family::new(
        out,
        "ferrite_host_vm_cpu_seconds_total",
        Kind::Counter,
        "CPU time of the current VMM processes in seconds.",
    )
    .sample(&[], all.iter().map(|v| v.process_cpu_seconds).sum());
    Family::new(
        out,
        "ferrite_daemon_build_info",
        Kind::Gauge,
        "The daemon's version (always 1).",
    )
    .sample(&[("version", &host.version)], 1.0);
}

fn render_vms(out: &mut String, all: &[VmStats]) {
    let active = |v: &VmStats| v.state.is_some_and(|s| s.is_active());
    per_vm(
        out,
        all,
        "ferrite_vm_up",
        Kind::Gauge,
        "1 when the VM has a VMM process.",
        |v| Some(if active(v) { 1.0 } else { 0.0 }),
    );
    let mut family = Family::new(
        out,
        "ferrite_vm_state",
        Kind::Gauge,
        "1 for the VM's current state, 0 for the others.",
    );
    for vm in all {
        for state in STATES {
            let on = vm.state == Some(state);
            family.sample(
                &[("vm", &vm.name), ("state", state.as_str())],
                if on { 1.0 } else { 0.0 },
            );
        }
    }
    per_vm(
        out,
        all,
        "ferrite_vm_uptime_seconds",
        Kind::Gauge,
        "Seconds since the VM's current run started.",
        |v| active(v).then_some(v.uptime_s),
    );
    let mut family = Family::new(
        out,
        "ferrite_vm_vcpu_seconds_total",
        Kind::Counter,
        "CPU time of each vCPU thread in seconds.",
    );
    for vm in all {
        for (i, secs) in vm.vcpu_seconds.iter().enumerate() {
            family.sample(&[("vm", &vm.name), ("vcpu", &i.to_string())], *secs);
        }
    }
    per_vm(
        out,
        all,
        "ferrite_vm_cpu_seconds_total",
        Kind::Counter,
        "CPU time of the VMM process (vCPUs and device threads) in seconds.",
        |v| active(v).then_some(v.process_cpu_seconds),
    );
    per_vm(
        out,
        all,
        "ferrite_vm_cpu_throttled_seconds_total",
        Kind::Counter,
        "Time the VM's cgroup was throttled by its CPU quota in seconds.",
        |v| active(v).then_some(v.cpu_throttled_seconds),
    );
    let mut family = Family::new(
        out,
        "ferrite_vm_exits_total",
        Kind::Counter,
        "VM exits by reason, summed over the vCPUs.",
    );
    for vm in all {
        for (reason, n) in &vm.exits {
            family.sample(&[("vm", &vm.name), ("reason", reason)], *n as f64);
        }
    }
    per_vm(
        out,
        all,
        "ferrite_vm_rss_bytes",
        Kind::Gauge,
        "Resident memory of the VMM process in bytes.",
        |v| active(v).then_some(v.rss_bytes as f64),
    );
    per_vm(
        out,
        all,
        "ferrite_vm_memory_bytes",
        Kind::Gauge,
        "Guest RAM in bytes.",
        |v| Some(v.memory_bytes as f64),
    );
    per_vm(
        out,
        all,
        "ferrite_vm_balloon_bytes",
        Kind::Gauge,
        "Memory the guest gave back through its balloon in bytes.",
        |v| v.balloon_bytes.map(|b| b as f64),
    );
    per_vm(
        out,
        all,
        "ferrite_vm_balloon_target_bytes",
        Kind::Gauge,
        "The balloon target in bytes.",
        |v| v.balloon_target_bytes.map(|b| b as f64),
    );
    per_vm(
        out,
        all,
        "ferrite_vm_guest_free_bytes",
        Kind::Gauge,
        "Free memory the guest reports through the balloon statistics in bytes.",
        |v| v.guest_free_bytes.map(|b| b as f64),
    );
    per_device(
        out,
        all,
        disks,
        "disk",
        "ferrite_vm_disk_read_bytes_total",
        "Bytes the guest read from the disk.",
        |c| c.read_bytes,
    );
    per_device(
        out,
        all,
        disks,
        "disk",
        "ferrite_vm_disk_written_bytes_total",
        "Bytes the guest wrote to the disk.",
        |c| c.write_bytes,
    );
    per_device(
        out,
        all,
        disks,
        "disk",
        "ferrite_vm_disk_reads_total",
        "Read requests of the guest.",
        |c| c.read_ops,
    );
    per_device(
        out,
        all,
        disks,
        "disk",
        "ferrite_vm_disk_writes_total",
        "Write requests of the guest.",
        |c| c.write_ops,
    );
    per_device(
        out,
        all,
        nets,
        "nic",
        "ferrite_vm_net_rx_bytes_total",
        "Bytes delivered to the guest.",
        |c| c.read_bytes,
    );
    per_device(
        out,
        all,
        nets,
        "nic",
        "ferrite_vm_net_tx_bytes_total",
        "Bytes the guest sent.",
        |c| c.write_bytes,
    );
    per_device(
        out,
        all,
        nets,
        "nic",
        "ferrite_vm_net_rx_packets_total",
        "Packets delivered to the guest.",
        |c| c.read_ops,
    );
    per_device(
        out,
        all,
        nets,
        "nic",
        "ferrite_vm_net_tx_packets_total",
        "Packets the guest sent.",
        |c| c.write_ops,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_vm(name: &str) -> VmStats {
        let mut vm = VmStats {
            name: name.to_string(),
            state: Some(VmState::Running),
            uptime_s: 12.5,
            vcpu_seconds: vec![1.25, 0.5],
            process_cpu_seconds: 2.0,
            rss_bytes: 140 << 20,
            memory_bytes: 128 << 20,
            balloon_bytes: Some(32 << 20),
            balloon_target_bytes: Some(32 << 20),
            guest_free_bytes: Some(90 << 20),
            ..Default::default()
        };
        vm.exits.insert("io".into(), 42);
        vm.disks.insert(
            "disk0".into(),
            api::IoCounters {
                read_bytes: 4096,
                write_bytes: 8192,
                read_ops: 1,
                write_ops: 2,
            },
        );
        vm
    }

    #[test]
    fn test_every_family_has_help_and_type_once() {
        let migration = MigrationInfo {
            vm: "a".into(),
            phase: MigrationPhase::Copying,
            ..Default::default()
        };
        let text = render(
            &HostInfo::default(),
            &[sample_vm("a"), sample_vm("b")],
            &[migration],
        );

        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        assert_eq!(helps.len(), types.len());
        let mut names: Vec<&str> = types.iter().map(|l| l.split(' ').nth(2).unwrap()).collect();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a family is declared twice");
    }

    #[test]
    fn test_vm_samples_carry_the_values() {
        let text = render(&HostInfo::default(), &[sample_vm("web")], &[]);

        assert!(text.contains("ferrite_vm_balloon_target_bytes{vm=\"web\"} 33554432\n"));
        assert!(text.contains("ferrite_vm_vcpu_seconds_total{vm=\"web\",vcpu=\"0\"} 1.25\n"));
        assert!(text.contains("ferrite_vm_exits_total{vm=\"web\",reason=\"io\"} 42\n"));
        assert!(
            text.contains("ferrite_vm_disk_written_bytes_total{vm=\"web\",disk=\"disk0\"} 8192\n")
        );
        assert!(text.contains("ferrite_vm_state{vm=\"web\",state=\"running\"} 1\n"));
        assert!(text.contains("ferrite_vm_state{vm=\"web\",state=\"stopped\"} 0\n"));
    }

    #[test]
    fn test_migration_samples_carry_the_progress() {
        let m = MigrationInfo {
            vm: "web".into(),
            phase: MigrationPhase::Copying,
            round: 3,
            remaining_bytes: 8 << 20,
            rate_bytes_per_s: 100 << 20,
            throttle_pct: 40,
            ..Default::default()
        };

        let text = render(&HostInfo::default(), &[], &[m]);

        assert!(text.contains("ferrite_migration_round{vm=\"web\"} 3\n"));
        assert!(text.contains("ferrite_migration_remaining_bytes{vm=\"web\"} 8388608\n"));
        assert!(text.contains("ferrite_migration_rate_bytes_per_second{vm=\"web\"} 104857600\n"));
        assert!(text.contains("ferrite_migration_throttle_ratio{vm=\"web\"} 0.4\n"));
        assert!(text.contains("ferrite_migration_phase{vm=\"web\",phase=\"copying\"} 1\n"));
        assert!(!text.contains("ferrite_migration_downtime_seconds{"));
    }

    #[test]
    fn test_label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
