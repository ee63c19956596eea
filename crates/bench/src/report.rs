//! Collects samples per VMM and metric and renders them as a Markdown table or JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::stats::Summary;
use crate::vmm::VmmKind;

/// Which measurement a metric belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Boot timeline.
    Boot,
    /// Exits handled per second.
    Exits,
    /// VMM memory overhead and idle CPU use.
    Memory,
    /// virtio-blk throughput on raw and qcow2 images, with the host's fio as the ceiling
    /// (reported in its own table).
    Disk,
    /// UDP echo through virtio-net on a TAP (reported in its own table).
    Net,
    /// Start latency through `ferrited` vs `ferrite run`, and VM density (Ferrite only;
    /// reported in its own tables).
    Daemon,
    /// Snapshot size and creation time, restore latency and clone rate vs QEMU migration to a
    /// file (reported in its own tables).
    Snapshot,
    /// Live migration on this host, Ferrite vs QEMU, idle and dirtying guests, over TCP
    /// loopback, between network namespaces and by same-host handover (reported in its own
    /// tables).
    Migrate,
}

/// One row of the report.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Stable key (JSON).
    pub id: &'static str,
    /// Row title.
    pub label: &'static str,
    /// Unit shown; values are stored in this unit.
    pub unit: &'static str,
    /// Decimals shown.
    pub decimals: usize,
    /// The measurement that produces it.
    pub scenario: Scenario,
}

/// Every metric, in report order.
pub const METRICS: &[MetricDef] = &[
    MetricDef {
        id: "boot.first_byte",
        label: "start → first serial byte",
        unit: "ms",
        decimals: 1,
        scenario: Scenario::Boot,
    },
    MetricDef {
        id: "boot.ready",
        label: "start → `FERRITE-TESTGUEST READY`",
        unit: "ms",
        decimals: 1,
        scenario: Scenario::Boot,
    },
    MetricDef {
        id: "boot.exit",
        label: "start → process exit after `poweroff`",
        unit: "ms",
        decimals: 1,
        scenario: Scenario::Boot,
    },
    MetricDef {
        id: "exits.pio_guest",
        label: "PIO exits/s, CPL0 `out 0x80` (guest clock)",
        unit: "k/s",
        decimals: 1,
        scenario: Scenario::Exits,
    },
    MetricDef {
        id: "exits.pio_host",
        label: "PIO exits/s (host clock, console lines)",
        unit: "k/s",
        decimals: 1,
        scenario: Scenario::Exits,
    },
    MetricDef {
        id: "exits.mmio_guest",
        label: "MMIO exits/s, CPL3 write (guest clock)",
        unit: "k/s",
        decimals: 1,
        scenario: Scenario::Exits,
    },
    MetricDef {
        id: "exits.mmio_host",
        label: "MMIO exits/s (host clock, console lines)",
        unit: "k/s",
        decimals: 1,
        scenario: Scenario::Exits,
    },
    MetricDef {
        id: "memory.idle_cpu",
        label: "CPU used by the VMM while the guest idles",
        unit: "ms/s",
        decimals: 2,
        scenario: Scenario::Memory,
    },
    MetricDef {
        id: "memory.rss_vmm",
        label: "VMM RSS beyond guest RAM",
        unit: "MiB",
        decimals: 2,
        scenario: Scenario::Memory,
    },
    MetricDef {
        id: "memory.pss_vmm",
        label: "VMM PSS beyond guest RAM",
        unit: "MiB",
        decimals: 2,
        scenario: Scenario::Memory,
    },
    MetricDef {
        id: "memory.private_vmm",
        label: "VMM private (USS) beyond guest RAM",
        unit: "MiB",
        decimals: 2,
        scenario: Scenario::Memory,
    },
    MetricDef {
        id: "memory.rss_total",
        label: "total RSS",
        unit: "MiB",
        decimals: 2,
        scenario: Scenario::Memory,
    },
    MetricDef {
        id: "memory.pss_total",
        label: "total PSS",
        unit: "MiB",
        decimals: 2,
        scenario: Scenario::Memory,
    },
    MetricDef {
        id: "memory.rss_guest_ram",
        label: "guest RAM resident (touched pages)",
        unit: "MiB",
        decimals: 2,
        scenario: Scenario::Memory,
    },
];

/// The result of one metric for one VMM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Measured on every counted iteration.
    Measured(Summary),
    /// Not measured; the reason is printed instead of a number.
    NotMeasured {
        /// Why.
        reason: String,
    },
}

/// Samples of one metric for one VMM while the run is going on.
#[derive(Debug, Clone, Default)]
pub struct Series {
    values: Vec<f64>,
    missing: Option<String>,
}

impl Series {
    /// Add one iteration's value, or the reason it has none.
    pub fn push(&mut self, value: std::result::Result<f64, String>) {
        match value {
            Ok(v) => self.values.push(v),
            Err(reason) => {
                self.missing.get_or_insert(reason);
            }
        }
    }

    /// Mark the whole series as not measured.
    pub fn fail(&mut self, reason: &str) {
        self.missing.get_or_insert_with(|| reason.to_string());
    }

    /// The final outcome: a summary only if no iteration lacked a value.
    pub fn outcome(&self) -> Outcome {
        if let Some(reason) = &self.missing {
            return Outcome::NotMeasured {
                reason: reason.clone(),
            };
        }
        match Summary::of(&self.values) {
            Some(s) => Outcome::Measured(s),
            None => Outcome::NotMeasured {
                reason: "no samples".into(),
            },
        }
    }
}

/// Everything measured for one VMM.
#[derive(Debug, Clone, Serialize)]
pub struct VmmReport {
    /// Which VMM.
    pub vmm: VmmKind,
    /// Column title.
    pub label: String,
    /// The command used for the boot timeline (with `cmds="poweroff"`).
    pub command: String,
    /// Set when the VMM was not run at all.
    pub skipped: Option<String>,
    /// Metric id → outcome, for the scenarios that ran.
    pub metrics: BTreeMap<String, Outcome>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Command that reproduces this run.
    pub reproduce: String,
    /// Host description (kernel, CPU).
    pub host: String,
    /// Guest ELF path.
    pub guest: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Counted iterations per VMM and scenario.
    pub iterations: usize,
    /// Uncounted warm-up iterations.
    pub warmup: usize,
    /// Scenarios run.
    pub scenarios: Vec<Scenario>,
    /// One entry per VMM, Ferrite first.
    pub vmms: Vec<VmmReport>,
}

impl Report {
    /// Render as a Markdown table with footnotes for values that could not be measured.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Guest `{}`, {} MiB, {} counted iterations (+{} warm-up) per VMM, median (min–max).  \nHost: {}  \nCommand: `{}`\n\n",
            self.guest, self.memory_mib, self.iterations, self.warmup, self.host, self.reproduce
        ));
        let ferrite = self.vmms.iter().find(|v| v.vmm == VmmKind::Ferrite);
        let peers: Vec<&VmmReport> = self
            .vmms
            .iter()
            .filter(|v| v.vmm != VmmKind::Ferrite)
            .collect();
        let mut header = vec!["metric".to_string(), "unit".to_string()];
        header.extend(self.vmms.iter().map(|v| v.label.clone()));
        if ferrite.is_some() {
            header.extend(peers.iter().map(|p| format!("Ferrite / {}", p.label)));
        }
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
        let mut notes: Vec<String> = Vec::new();
        for def in METRICS
            .iter()
            .filter(|d| self.scenarios.contains(&d.scenario))
        {
            let mut row = vec![def.label.to_string(), def.unit.to_string()];
            for v in &self.vmms {
                row.push(cell(def, v, &mut notes));
            }
            if let Some(f) = ferrite {
                for p in &peers {
                    row.push(ratio(def, f, p));
                }
            }
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        if !notes.is_empty() {
            out.push('\n');
            for (i, note) in notes.iter().enumerate() {
                out.push_str(&format!("{}. {}\n", i + 1, note));
            }
        }
        for warning in self.vmms.iter().flat_map(clock_disagreements) {
            out.push_str(&format!("\n{warning}\n"));
        }
        out.push_str("\nRatios are Ferrite's median divided by the peer's: below 1 is better for times and memory, above 1 is better for exit rates.\n");
        out.push_str("\nCommands (boot timeline):\n\n");
        for v in &self.vmms {
            out.push_str(&format!("- {}: `{}`\n", v.label, v.command));
        }
        out
    }
}

/// Guest-clock and host-clock rates that differ by more than this fraction get a warning.
const CLOCK_TOLERANCE: f64 = 0.10;

/// Warnings for exit rates whose guest-clock median disagrees with the host-clock median: the
/// guest's TSC calibration is off (e.g. no ACPI PM timer to calibrate against).
fn clock_disagreements(v: &VmmReport) -> Vec<String> {
    let pairs = [
        ("bench-pio", "exits.pio_guest", "exits.pio_host"),
        ("bench-mmio", "exits.mmio_guest", "exits.mmio_host"),
    ];
    let mut out = Vec::new();
    for (cmd, guest, host) in pairs {
        if let (Some(Outcome::Measured(g)), Some(Outcome::Measured(h))) =
            (v.metrics.get(guest), v.metrics.get(host))
        {
            if h.median > 0.0 && ((g.median / h.median) - 1.0).abs() > CLOCK_TOLERANCE {
                out.push(format!(
                    "Note: {} `{}` guest-clock rate is {:.2}× the host-clock rate: the guest's TSC calibration is off there; trust the host-clock row.",
                    v.label,
                    cmd,
                    g.median / h.median
                ));
            }
        }
    }
    out
}

fn cell(def: &MetricDef, v: &VmmReport, notes: &mut Vec<String>) -> String {
    let reason = if let Some(skip) = &v.skipped {
        format!("{}: skipped: {}", v.label, skip)
    } else {
        match v.metrics.get(def.id) {
            Some(Outcome::Measured(s)) => {
                let d = def.decimals;
                return format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max);
            }
            Some(Outcome::NotMeasured { reason }) => format!("{}: {}", v.label, reason),
            None => format!("{}: not run", v.label),
        }
    };
    let index = match notes.iter().position(|n| *n == reason) {
        Some(i) => i,
        None => {
            notes.push(reason);
            notes.len() - 1
        }
    };
    format!("n/a [{}]", index + 1)
}

fn ratio(def: &MetricDef, ferrite: &VmmReport, peer: &VmmReport) -> String {
    if ferrite.skipped.is_some() || peer.skipped.is_some() {
        return "—".to_string();
    }
    match (ferrite.metrics.get(def.id), peer.metrics.get(def.id)) {
        (Some(Outcome::Measured(f)), Some(Outcome::Measured(p))) if p.median > 0.0 => {
            format!("{:.2}×", f.median / p.median)
        }
        _ => "—".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmm(kind: VmmKind, boot_ready: Outcome) -> VmmReport {
        let mut metrics = BTreeMap::new();
        metrics.insert("boot.ready".to_string(), boot_ready);
        VmmReport {
            vmm: kind,
            label: kind.label().to_string(),
            command: "x".into(),
            skipped: None,
            metrics,
        }
    }

    fn measured(median: f64) -> Outcome {
        Outcome::Measured(Summary {
            median,
            min: median,
            max: median,
            n: 1,
        })
    }

    fn report(vmms: Vec<VmmReport>) -> Report {
        Report {
            reproduce: "r".into(),
            host: "h".into(),
            guest: "g".into(),
            memory_mib: 512,
            iterations: 1,
            warmup: 0,
            scenarios: vec![Scenario::Boot],
            vmms,
        }
    }

    #[test]
    fn test_series_missing_iteration_not_measured() {
        // Arrange
        let mut s = Series::default();

        // Act
        s.push(Ok(1.0));
        s.push(Err("no exit".into()));

        // Assert
        assert_eq!(
            s.outcome(),
            Outcome::NotMeasured {
                reason: "no exit".into()
            }
        );
    }

    #[test]
    fn test_markdown_ratio_ferrite_over_peer() {
        // Arrange
        let r = report(vec![
            vmm(VmmKind::Ferrite, measured(10.0)),
            vmm(VmmKind::QemuMicrovm, measured(40.0)),
        ]);

        // Act
        let md = r.to_markdown();

        // Assert
        let row = md.lines().find(|l| l.contains("READY")).expect("ready row");
        assert!(row.contains("10.0 (10.0–10.0)"));
        assert!(row.ends_with("| 0.25× |"));
    }

    #[test]
    fn test_markdown_skipped_peer_footnote_no_number() {
        // Arrange
        let mut q = vmm(VmmKind::QemuQ35, measured(1.0));
        q.skipped = Some("QEMU q35 not found at /x".into());
        let r = report(vec![vmm(VmmKind::Ferrite, measured(10.0)), q]);

        // Act
        let md = r.to_markdown();

        // Assert
        let row = md.lines().find(|l| l.contains("READY")).expect("ready row");
        let note = md
            .lines()
            .find(|l| l.ends_with("QEMU q35: skipped: QEMU q35 not found at /x"))
            .expect("footnote");
        let number = note.split('.').next().expect("note number");
        assert!(row.ends_with(&format!("| n/a [{number}] | — |")));
    }

    #[test]
    fn test_markdown_guest_clock_off_warned() {
        // Arrange
        let mut v = vmm(VmmKind::QemuMicrovm, measured(1.0));
        v.metrics.insert("exits.pio_guest".into(), measured(92.0));
        v.metrics.insert("exits.pio_host".into(), measured(119.0));
        v.metrics.insert("exits.mmio_guest".into(), measured(39.0));
        v.metrics.insert("exits.mmio_host".into(), measured(40.0));
        let mut r = report(vec![v]);
        r.scenarios = vec![Scenario::Exits];

        // Act
        let md = r.to_markdown();

        // Assert
        assert!(md.contains("QEMU microvm `bench-pio` guest-clock rate is 0.77×"));
        assert!(!md.contains("`bench-mmio` guest-clock"));
    }

    #[test]
    fn test_json_outcome_tagged() {
        // Arrange
        let o = measured(2.0);

        // Act
        let json = serde_json::to_string(&o).expect("json");

        // Assert
        assert_eq!(
            json,
            r#"{"status":"measured","median":2.0,"min":2.0,"max":2.0,"n":1}"#
        );
    }
}
