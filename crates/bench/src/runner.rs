//! Runs every scenario for every VMM, iterations interleaved across VMMs so that load noise on
//! the host hits all of them alike, and collects the samples.

use std::collections::BTreeMap;

use crate::report::{Scenario, Series, VmmReport, METRICS};
use crate::scenario::{boot, exits, idle_memory, RunConfig};
use crate::vmm::Vmm;

const MIB: f64 = (1u64 << 20) as f64;

/// How many boots to do.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Counted iterations per VMM and scenario.
    pub iterations: usize,
    /// Uncounted warm-up iterations before them.
    pub warmup: usize,
}

/// Run `scenarios` on `vmms`; every VMM gets a report, skipped ones say why.
pub fn run_all(
    vmms: &[Vmm],
    scenarios: &[Scenario],
    plan: Plan,
    cfg: &RunConfig,
) -> Vec<VmmReport> {
    let mut series: Vec<BTreeMap<&'static str, Series>> = vec![BTreeMap::new(); vmms.len()];
    let skipped: Vec<Option<String>> = vmms.iter().map(Vmm::unavailable_reason).collect();
    for (vmm, skip) in vmms.iter().zip(&skipped) {
        if let Some(reason) = skip {
            eprintln!("ferrite-bench: skipping {}: {}", vmm.kind.label(), reason);
        }
    }
    for &scenario in scenarios {
        let mut failed = vec![false; vmms.len()];
        for iter in 0..plan.warmup + plan.iterations {
            let counted = iter >= plan.warmup;
            for (i, vmm) in vmms.iter().enumerate() {
                if skipped[i].is_some() || failed[i] {
                    continue;
                }
                let command = |cmdline: &str| vmm.command(&cfg.guest, cmdline);
                let tag = format!(
                    "[{scenario:?} {} {}/{}]",
                    vmm.kind.label(),
                    iter + 1,
                    plan.warmup + plan.iterations
                );
                match run_one(scenario, &command, cfg) {
                    Ok(values) => {
                        eprintln!("{tag} {}", describe(&values));
                        if counted {
                            for (id, v) in values {
                                series[i].entry(id).or_default().push(v);
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("{tag} failed: {e}");
                        failed[i] = true;
                        for def in METRICS.iter().filter(|d| d.scenario == scenario) {
                            series[i].entry(def.id).or_default().fail(&e.to_string());
                        }
                    }
                }
            }
        }
    }
    vmms.iter()
        .zip(series)
        .zip(skipped)
        .map(|((vmm, s), skipped)| VmmReport {
            vmm: vmm.kind,
            label: vmm.kind.label().to_string(),
            command: vmm.command(&cfg.guest, &cfg.cmdline("poweroff")).display(),
            skipped,
            metrics: s
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.outcome()))
                .collect(),
        })
        .collect()
}

type Values = Vec<(&'static str, std::result::Result<f64, String>)>;

fn run_one(
    scenario: Scenario,
    command: &dyn Fn(&str) -> crate::child::CommandSpec,
    cfg: &RunConfig,
) -> crate::error::Result<Values> {
    Ok(match scenario {
        Scenario::Boot => {
            let s = boot::boot_once(command, cfg)?;
            vec![
                ("boot.first_byte", Ok(s.first_byte_ms)),
                ("boot.ready", Ok(s.ready_ms)),
                ("boot.exit", s.exit_ms),
            ]
        }
        Scenario::Exits => {
            let s = exits::exits_once(command, cfg)?;
            vec![
                ("exits.pio_guest", Ok(s.pio_guest / 1e3)),
                ("exits.pio_host", Ok(s.pio_host / 1e3)),
                ("exits.mmio_guest", Ok(s.mmio_guest / 1e3)),
                ("exits.mmio_host", Ok(s.mmio_host / 1e3)),
            ]
        }
        Scenario::Disk => return Err(crate::error::BenchError::Unsupported("disk")),
        Scenario::Net => return Err(crate::error::BenchError::Unsupported("net")),
        Scenario::Daemon => return Err(crate::error::BenchError::Unsupported("daemon")),
        Scenario::Snapshot => return Err(crate::error::BenchError::Unsupported("snapshot")),
        Scenario::Migrate => return Err(crate::error::BenchError::Unsupported("migrate")),
        Scenario::Memory => {
            let idle = idle_memory::memory_once(command, cfg)?;
            let m = idle.memory;
            vec![
                ("memory.idle_cpu", Ok(idle.cpu_ms_per_s)),
                ("memory.rss_vmm", Ok(m.rss_vmm as f64 / MIB)),
                ("memory.pss_vmm", Ok(m.pss_vmm as f64 / MIB)),
                ("memory.private_vmm", Ok(m.private_vmm as f64 / MIB)),
                ("memory.rss_total", Ok(m.rss_total as f64 / MIB)),
                ("memory.pss_total", Ok(m.pss_total as f64 / MIB)),
                ("memory.rss_guest_ram", Ok(m.rss_guest_ram as f64 / MIB)),
            ]
        }
    })
}

fn describe(values: &Values) -> String {
    values
        .iter()
        .map(|(id, v)| match v {
            Ok(x) => format!("{id}={x:.2}"),
            Err(e) => format!("{id}=n/a ({e})"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Outcome;
    use crate::scenario::test_support::config;
    use crate::vmm::VmmKind;
    use std::path::PathBuf;

    fn plan() -> Plan {
        Plan {
            iterations: 2,
            warmup: 1,
        }
    }

    #[test]
    fn test_run_all_missing_binary_skipped_without_metrics() {
        // Arrange
        let vmms = [Vmm {
            kind: VmmKind::QemuMicrovm,
            program: PathBuf::from("/nonexistent/qemu-system-x86_64"),
            machine: "microvm".into(),
            extra_args: vec![],
        }];

        // Act
        let reports = run_all(&vmms, &[Scenario::Boot], plan(), &config());

        // Assert
        assert_eq!(reports.len(), 1);
        assert!(reports[0]
            .skipped
            .as_deref()
            .unwrap_or("")
            .contains("not found"));
        assert!(reports[0].metrics.is_empty());
    }

    #[test]
    fn test_run_all_failing_vmm_every_metric_not_measured() {
        // Arrange: /bin/false exits at once without printing anything.
        let vmms = [Vmm {
            kind: VmmKind::Ferrite,
            program: PathBuf::from("/bin/false"),
            machine: String::new(),
            extra_args: vec![],
        }];

        // Act
        let reports = run_all(&vmms, &[Scenario::Boot], plan(), &config());

        // Assert
        let boot_metrics: Vec<&Outcome> = reports[0].metrics.values().collect();
        assert_eq!(boot_metrics.len(), 3);
        assert!(boot_metrics
            .iter()
            .all(|o| matches!(o, Outcome::NotMeasured { reason } if reason.contains("exited"))));
    }
}
