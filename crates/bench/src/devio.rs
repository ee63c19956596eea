//! The device I/O benchmark: every VMM boots the test guest with a raw and a qcow2 image
//! attached and runs `blk-bench` on each; the host's own fio on the raw image gives the
//! ceiling. Iterations are interleaved (Ferrite, QEMU, fio, Ferrite, …) and every image is
//! written back (`fsync`) between runs so each starts without the previous run's dirty pages.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::{Outcome, Series};
use crate::runner::Plan;
use crate::scenario::disk::{self, DiskPlan, Format, Mode, FORMATS, MODES};
use crate::scenario::RunConfig;
use crate::vmm::{Vmm, VmmKind};

/// Column key of the host's fio.
const FIO: &str = "host fio";

/// One column of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// Title.
    pub label: String,
    /// Why it was not run at all.
    pub skipped: Option<String>,
    /// `format.mode` → outcome.
    pub rows: BTreeMap<String, Outcome>,
    /// `format.mode` → median doorbell writes per request (VMM columns only).
    pub kicks_per_op: BTreeMap<String, f64>,
    /// A command that ran (for the report).
    pub command: String,
}

/// The whole device I/O run.
#[derive(Debug, Clone, Serialize)]
pub struct DevioReport {
    /// Command that reproduces this run.
    pub reproduce: String,
    /// Host description.
    pub host: String,
    /// Guest ELF.
    pub guest: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Counted iterations.
    pub iterations: usize,
    /// Warm-up iterations.
    pub warmup: usize,
    /// Image size, MiB.
    pub size_mib: u64,
    /// Data per sequential row, MiB.
    pub seq_mib: u64,
    /// Data per random row, MiB.
    pub rand_mib: u64,
    /// Queue depth.
    pub qd: u64,
    /// Sequential request size.
    pub seq_bs: u64,
    /// Random request size.
    pub rand_bs: u64,
    /// Columns: the VMMs, then the host's fio.
    pub columns: Vec<Column>,
    /// fio engine that gave the best median per mode.
    pub fio_engines: BTreeMap<String, String>,
}

fn key(format: Format, mode: Mode) -> String {
    format!("{}.{}", format.name(), mode.name())
}

fn median(v: &mut [f64]) -> Option<f64> {
    crate::stats::Summary::of(v).map(|s| s.median)
}

/// Why `vmm` cannot attach virtio-blk-pci disks, if it cannot.
fn no_pci_reason(vmm: &Vmm) -> Option<String> {
    (vmm.kind == VmmKind::QemuMicrovm && !vmm.machine.contains("pcie=on"))
        .then(|| "microvm has no PCI bus (use --microvm-machine microvm,pcie=on,...)".to_string())
}

/// Run the benchmark; the report has a value or a reason for every cell.
pub fn run(vmms: &[Vmm], plan: Plan, dplan: &DiskPlan, cfg: &RunConfig) -> DevioReport {
    let mut series: Vec<BTreeMap<String, Series>> = vec![BTreeMap::new(); vmms.len()];
    let mut kicks: Vec<BTreeMap<String, Vec<f64>>> = vec![BTreeMap::new(); vmms.len()];
    let mut fio: BTreeMap<String, Series> = BTreeMap::new();
    let mut fio_engine_votes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut skipped: Vec<Option<String>> = vmms
        .iter()
        .map(|v| v.unavailable_reason().or_else(|| no_pci_reason(v)))
        .collect();
    let mut fio_skip = None;
    eprintln!(
        "ferrite-bench: preparing {} MiB raw and qcow2 images in {}",
        dplan.size_mib,
        dplan.dir.display()
    );
    if let Err(e) = disk::prepare_images(dplan) {
        let reason = format!("images not prepared: {e}");
        eprintln!("ferrite-bench: {reason}");
        for s in &mut skipped {
            s.get_or_insert_with(|| reason.clone());
        }
        fio_skip = Some(reason);
    }
    for (vmm, skip) in vmms.iter().zip(&skipped) {
        if let Some(reason) = skip {
            eprintln!("ferrite-bench: skipping {}: {}", vmm.kind.label(), reason);
        }
    }
    let total = plan.warmup + plan.iterations;
    let mut failed = vec![false; vmms.len()];
    let mut fio_failed = fio_skip.is_some();
    for iter in 0..total {
        let counted = iter >= plan.warmup;
        for (i, vmm) in vmms.iter().enumerate() {
            if skipped[i].is_some() || failed[i] {
                continue;
            }
            let tag = format!("[disk {} {}/{}]", vmm.kind.label(), iter + 1, total);
            let result = disk::disk_once(vmm, dplan, cfg);
            disk::sync_images(dplan);
            match result {
                Ok((values, k)) => {
                    eprintln!("{tag} {}", describe(&values));
                    if counted {
                        for (v, k) in values.iter().zip(k) {
                            let id = key(v.format, v.mode);
                            series[i].entry(id.clone()).or_default().push(Ok(v.value));
                            let (mib, bs) = if v.mode.sequential() {
                                (dplan.seq_mib, dplan.seq_bs)
                            } else {
                                (dplan.rand_mib, dplan.rand_bs)
                            };
                            let ops = ((mib << 20).div_ceil(bs)).max(1);
                            kicks[i].entry(id).or_default().push(k as f64 / ops as f64);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("{tag} failed: {e}");
                    failed[i] = true;
                    for f in FORMATS {
                        for m in MODES {
                            series[i].entry(key(f, m)).or_default().fail(&e.to_string());
                        }
                    }
                }
            }
        }
        if fio_failed {
            continue;
        }
        let mut line = Vec::new();
        for mode in MODES {
            match disk::fio_once(dplan, mode) {
                Ok((v, engine)) => {
                    line.push(format!("{}={v:.1}({engine})", mode.name()));
                    if counted {
                        for f in FORMATS {
                            fio.entry(key(f, mode)).or_default().push(Ok(v));
                        }
                        fio_engine_votes
                            .entry(mode.name().to_string())
                            .or_default()
                            .push(engine);
                    }
                }
                Err(e) => {
                    eprintln!("[disk {FIO} {}/{}] failed: {e}", iter + 1, total);
                    fio_failed = true;
                    for f in FORMATS {
                        for m in MODES {
                            fio.entry(key(f, m)).or_default().fail(&e.to_string());
                        }
                    }
                    break;
                }
            }
        }
        if !fio_failed {
            eprintln!("[disk {FIO} {}/{}] {}", iter + 1, total, line.join(" "));
        }
    }
    let mut columns: Vec<Column> = vmms
        .iter()
        .enumerate()
        .map(|(i, vmm)| Column {
            label: vmm.kind.label().to_string(),
            skipped: skipped[i].clone(),
            rows: series[i]
                .iter()
                .map(|(k, s)| (k.clone(), s.outcome()))
                .collect(),
            kicks_per_op: kicks[i]
                .iter_mut()
                .filter_map(|(k, v)| median(v).map(|m| (k.clone(), m)))
                .collect(),
            command: dplan
                .command(vmm, cfg, &cfg.cmdline(&dplan.guest_cmds()))
                .display(),
        })
        .collect();
    let raw = dplan.image(Format::Raw);
    columns.push(Column {
        label: FIO.to_string(),
        skipped: fio_skip,
        rows: fio.iter().map(|(k, s)| (k.clone(), s.outcome())).collect(),
        kicks_per_op: BTreeMap::new(),
        command: format!(
            "{} {}",
            dplan.fio.display(),
            disk::fio_command(dplan, &raw, Mode::RandRead, "ENGINE").join(" ")
        ),
    });
    let fio_engines = fio_engine_votes
        .into_iter()
        .filter_map(|(mode, mut votes)| {
            votes.sort();
            let best = votes
                .iter()
                .max_by_key(|e| votes.iter().filter(|x| x == e).count())
                .cloned()?;
            Some((mode, best))
        })
        .collect();
    DevioReport {
        reproduce: String::new(),
        host: String::new(),
        guest: cfg.guest.kernel.display().to_string(),
        memory_mib: cfg.guest.memory_mib,
        iterations: plan.iterations,
        warmup: plan.warmup,
        size_mib: dplan.size_mib,
        seq_mib: dplan.seq_mib,
        rand_mib: dplan.rand_mib,
        qd: dplan.qd,
        seq_bs: dplan.seq_bs,
        rand_bs: dplan.rand_bs,
        columns,
        fio_engines,
    }
}

fn describe(values: &[disk::RowValue]) -> String {
    values
        .iter()
        .map(|v| format!("{}={:.1}", key(v.format, v.mode), v.value))
        .collect::<Vec<_>>()
        .join(" ")
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

impl DevioReport {
    /// The table of medians and ratios, with footnotes for cells that have no number.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "Guest `{}`, {} MiB, {} counted iterations (+{} warm-up) per column, median (min–max). \
             Images of {} MiB; sequential rows move {} MiB in {} requests, random rows {} MiB in {} \
             requests, {} requests in flight.  \nHost: {}  \nCommand: `{}`\n\n",
            self.guest,
            self.memory_mib,
            self.iterations,
            self.warmup,
            self.size_mib,
            self.seq_mib,
            size(self.seq_bs),
            self.rand_mib,
            size(self.rand_bs),
            self.qd,
            self.host,
            self.reproduce
        );
        let ferrite = self.columns.iter().position(|c| c.label == "Ferrite");
        let fio = self.columns.iter().position(|c| c.label == FIO);
        let peers: Vec<usize> = (0..self.columns.len())
            .filter(|&i| Some(i) != ferrite && Some(i) != fio)
            .collect();
        let mut ratio_cols: Vec<(usize, usize)> = Vec::new();
        if let Some(f) = ferrite {
            ratio_cols.extend(peers.iter().map(|&p| (f, p)));
        }
        if let Some(h) = fio {
            ratio_cols.extend(ferrite.iter().map(|&f| (f, h)));
            ratio_cols.extend(peers.iter().map(|&p| (p, h)));
        }
        let mut header = vec!["image".to_string(), "row".to_string(), "unit".to_string()];
        header.extend(self.columns.iter().map(|c| c.label.clone()));
        header.extend(
            ratio_cols
                .iter()
                .map(|&(a, b)| format!("{} / {}", self.columns[a].label, self.columns[b].label)),
        );
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
        let mut notes: Vec<String> = Vec::new();
        for format in FORMATS {
            for mode in MODES {
                let id = key(format, mode);
                let (label, unit) = match mode {
                    Mode::SeqRead => (format!("sequential read, {}", size(self.seq_bs)), "MiB/s"),
                    Mode::SeqWrite => (format!("sequential write, {}", size(self.seq_bs)), "MiB/s"),
                    Mode::RandRead => (format!("random read, {}", size(self.rand_bs)), "kIOPS"),
                    Mode::RandWrite => (format!("random write, {}", size(self.rand_bs)), "kIOPS"),
                };
                let mut row = vec![format.name().to_string(), label, unit.to_string()];
                for c in &self.columns {
                    row.push(cell(c, &id, &mut notes));
                }
                for &(a, b) in &ratio_cols {
                    row.push(ratio(&self.columns[a], &self.columns[b], &id));
                }
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
        }
        if !notes.is_empty() {
            out.push('\n');
            for (i, n) in notes.iter().enumerate() {
                out.push_str(&format!("{}. {}\n", i + 1, n));
            }
        }
        out.push_str(
            "\nRatios are medians divided: above 1 means the first column is faster. The host fio \
             column is fio on the raw image file (the qcow2 rows repeat it: the ceiling of the \
             same file system and page cache).\n",
        );
        let kicks: Vec<String> = self
            .columns
            .iter()
            .filter(|c| !c.kicks_per_op.is_empty())
            .map(|c| {
                let per: Vec<String> = FORMATS
                    .iter()
                    .flat_map(|f| MODES.iter().map(move |m| key(*f, *m)))
                    .filter_map(|k| c.kicks_per_op.get(&k).map(|v| format!("{k} {v:.2}")))
                    .collect();
                format!("- {}: {}", c.label, per.join(", "))
            })
            .collect();
        if !kicks.is_empty() {
            out.push_str("\nDoorbell writes per request by the guest (median; below 1 means the device suppressed notifications while busy, EVENT_IDX):\n\n");
            out.push_str(&kicks.join("\n"));
            out.push('\n');
        }
        if !self.fio_engines.is_empty() {
            let e: Vec<String> = self
                .fio_engines
                .iter()
                .map(|(m, e)| format!("{m}: {e}"))
                .collect();
            out.push_str(&format!(
                "\nfio engine that gave the ceiling (best of the engines tried): {}\n",
                e.join(", ")
            ));
        }
        out.push_str("\nCommands:\n\n");
        for c in &self.columns {
            out.push_str(&format!("- {}: `{}`\n", c.label, c.command));
        }
        out
    }
}

fn cell(c: &Column, id: &str, notes: &mut Vec<String>) -> String {
    let reason = if let Some(s) = &c.skipped {
        format!("{}: skipped: {s}", c.label)
    } else {
        match c.rows.get(id) {
            Some(Outcome::Measured(s)) => {
                return format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
            }
            Some(Outcome::NotMeasured { reason }) => format!("{}: {reason}", c.label),
            None => format!("{}: not run", c.label),
        }
    };
    let i = match notes.iter().position(|n| *n == reason) {
        Some(i) => i,
        None => {
            notes.push(reason);
            notes.len() - 1
        }
    };
    format!("n/a [{}]", i + 1)
}

fn ratio(a: &Column, b: &Column, id: &str) -> String {
    match (a.rows.get(id), b.rows.get(id)) {
        (Some(Outcome::Measured(x)), Some(Outcome::Measured(y)))
            if a.skipped.is_none() && b.skipped.is_none() && y.median > 0.0 =>
        {
            format!("{:.2}×", x.median / y.median)
        }
        _ => "—".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Summary;

    fn col(label: &str, v: f64) -> Column {
        let mut rows = BTreeMap::new();
        rows.insert(
            "raw.seqread".to_string(),
            Outcome::Measured(Summary {
                median: v,
                min: v,
                max: v,
                n: 1,
            }),
        );
        Column {
            label: label.into(),
            skipped: None,
            rows,
            kicks_per_op: BTreeMap::new(),
            command: "c".into(),
        }
    }

    #[test]
    fn test_markdown_ratios_against_peer_and_ceiling() {
        // Arrange
        let r = DevioReport {
            reproduce: "r".into(),
            host: "h".into(),
            guest: "g".into(),
            memory_mib: 512,
            iterations: 1,
            warmup: 0,
            size_mib: 256,
            seq_mib: 256,
            rand_mib: 32,
            qd: 32,
            seq_bs: 1 << 20,
            rand_bs: 4096,
            columns: vec![
                col("Ferrite", 900.0),
                col("QEMU q35", 600.0),
                col(FIO, 1000.0),
            ],
            fio_engines: BTreeMap::new(),
        };

        // Act
        let md = r.to_markdown();

        // Assert
        let row = md
            .lines()
            .find(|l| l.starts_with("| raw | sequential read, 1 MiB"))
            .expect("row");
        assert!(row.ends_with("| 1.50× | 0.90× | 0.60× |"), "{row}");
        assert!(md.contains("| image | row | unit | Ferrite | QEMU q35 | host fio | Ferrite / QEMU q35 | Ferrite / host fio | QEMU q35 / host fio |"));
    }

    #[test]
    fn test_no_pci_reason_plain_microvm() {
        // Arrange
        let vmm = Vmm {
            kind: VmmKind::QemuMicrovm,
            program: "/q".into(),
            machine: "microvm,x-option-roms=off".into(),
            extra_args: vec![],
        };

        // Act
        let reason = no_pci_reason(&vmm);

        // Assert
        assert!(reason.expect("reason").contains("no PCI"));
    }
}
