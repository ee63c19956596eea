//! The network benchmark: UDP echo round trips through each VMM's virtio-net on a TAP, from a
//! network namespace of the harness's own (see `scenario::net`). Iterations interleave the
//! VMMs like every other scenario.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::{Outcome, Series};
use crate::runner::Plan;
use crate::scenario::net::{self, NetPlan, Netns};
use crate::scenario::RunConfig;
use crate::vmm::{Vmm, VmmKind};

/// One VMM's results.
#[derive(Debug, Clone, Serialize)]
pub struct NetColumn {
    /// Title.
    pub label: String,
    /// Why it was not run.
    pub skipped: Option<String>,
    /// `size.pps` / `size.mib_s` / `size.lost` → outcome.
    pub rows: BTreeMap<String, Outcome>,
    /// The command used.
    pub command: String,
}

/// The whole network run.
#[derive(Debug, Clone, Serialize)]
pub struct NetReport {
    /// Command that reproduces this run.
    pub reproduce: String,
    /// Host description.
    pub host: String,
    /// Counted iterations.
    pub iterations: usize,
    /// Warm-up iterations.
    pub warmup: usize,
    /// Datagrams per size.
    pub count: u64,
    /// Datagrams in flight.
    pub window: u64,
    /// Payload sizes.
    pub sizes: Vec<usize>,
    /// One column per VMM.
    pub columns: Vec<NetColumn>,
}

fn no_pci_reason(vmm: &Vmm) -> Option<String> {
    (vmm.kind == VmmKind::QemuMicrovm && !vmm.machine.contains("pcie=on"))
        .then(|| "microvm has no PCI bus (use --microvm-machine microvm,pcie=on,...)".to_string())
}

/// Run the benchmark in a thread of its own that enters a fresh network namespace.
pub fn run(vmms: &[Vmm], plan: Plan, nplan: &NetPlan, cfg: &RunConfig) -> NetReport {
    let skipped: Vec<Option<String>> = vmms
        .iter()
        .map(|v| v.unavailable_reason().or_else(|| no_pci_reason(v)))
        .collect();
    let series = std::thread::scope(|s| {
        s.spawn(|| measure_all(vmms, &skipped, plan, nplan, cfg))
            .join()
            .unwrap_or_else(|_| Err("the network thread panicked".to_string()))
    });
    let (series, ns_error) = match series {
        Ok(s) => (s, None),
        Err(e) => (vec![BTreeMap::new(); vmms.len()], Some(e)),
    };
    let columns = vmms
        .iter()
        .zip(series)
        .zip(&skipped)
        .map(|((vmm, s), skip)| NetColumn {
            label: vmm.kind.label().to_string(),
            skipped: skip.clone().or_else(|| ns_error.clone()),
            rows: s.iter().map(|(k, v)| (k.clone(), v.outcome())).collect(),
            command: nplan
                .command(vmm, cfg, &cfg.cmdline(&nplan.guest_cmds()))
                .display(),
        })
        .collect();
    NetReport {
        reproduce: String::new(),
        host: String::new(),
        iterations: plan.iterations,
        warmup: plan.warmup,
        count: nplan.count,
        window: nplan.window,
        sizes: nplan.sizes.clone(),
        columns,
    }
}

type Columns = Vec<BTreeMap<String, Series>>;

fn measure_all(
    vmms: &[Vmm],
    skipped: &[Option<String>],
    plan: Plan,
    nplan: &NetPlan,
    cfg: &RunConfig,
) -> Result<Columns, String> {
    let _ns = Netns::enter(&nplan.tap).map_err(|e| format!("network namespace: {e}"))?;
    let mut series: Columns = vec![BTreeMap::new(); vmms.len()];
    let mut failed = vec![false; vmms.len()];
    let total = plan.warmup + plan.iterations;
    for iter in 0..total {
        for (i, vmm) in vmms.iter().enumerate() {
            if skipped[i].is_some() || failed[i] {
                continue;
            }
            let tag = format!("[net {} {}/{}]", vmm.kind.label(), iter + 1, total);
            let result = net::net_once(vmm, nplan, cfg)
                .and_then(|echo| net::oneway_once(vmm, nplan, cfg).map(|oneway| (echo, oneway)));
            match result {
                Ok((results, oneway)) => {
                    let mut text: Vec<String> = results
                        .iter()
                        .map(|r| {
                            format!(
                                "{}B: {:.1} k/s {:.1} MiB/s lost {}",
                                r.size,
                                r.pps / 1e3,
                                r.mib_s,
                                r.lost
                            )
                        })
                        .collect();
                    text.extend(oneway.iter().map(|o| {
                        format!(
                            "{} {}B: {:.1} k/s {:.1} MiB/s lost {}",
                            if o.to_host { "g2h" } else { "h2g" },
                            o.size,
                            o.pps / 1e3,
                            o.mib_s,
                            o.lost
                        )
                    }));
                    eprintln!("{tag} {}", text.join("; "));
                    if iter >= plan.warmup {
                        for r in results {
                            let k = |m: &str| format!("{}.{m}", r.size);
                            series[i].entry(k("pps")).or_default().push(Ok(r.pps / 1e3));
                            series[i].entry(k("mib_s")).or_default().push(Ok(r.mib_s));
                            series[i]
                                .entry(k("lost"))
                                .or_default()
                                .push(Ok(r.lost as f64));
                        }
                        for o in oneway {
                            let dir = if o.to_host { "g2h" } else { "h2g" };
                            let k = |m: &str| format!("{}.{dir}.{m}", o.size);
                            series[i].entry(k("pps")).or_default().push(Ok(o.pps / 1e3));
                            series[i].entry(k("mib_s")).or_default().push(Ok(o.mib_s));
                            series[i]
                                .entry(k("lost"))
                                .or_default()
                                .push(Ok(o.lost as f64));
                        }
                    }
                }
                Err(e) => {
                    eprintln!("{tag} failed: {e}");
                    failed[i] = true;
                    for size in &nplan.sizes {
                        for m in [
                            "pps",
                            "mib_s",
                            "lost",
                            "h2g.pps",
                            "h2g.mib_s",
                            "h2g.lost",
                            "g2h.pps",
                            "g2h.mib_s",
                            "g2h.lost",
                        ] {
                            series[i]
                                .entry(format!("{size}.{m}"))
                                .or_default()
                                .fail(&e.to_string());
                        }
                    }
                }
            }
        }
    }
    Ok(series)
}

impl NetReport {
    /// Table of medians and Ferrite/peer ratios.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "virtio-net on a TAP, host side in a network namespace: one-way UDP floods of {} datagrams \
             per size (host → guest counted by the guest, guest → host by the host), then UDP echo \
             with {} in flight; {} counted iterations (+{} warm-up) per VMM, median (min–max).  \
             \nHost: {}  \nCommand: `{}`\n\n",
            self.count, self.window, self.iterations, self.warmup, self.host, self.reproduce
        );
        let ferrite = self.columns.iter().position(|c| c.label == "Ferrite");
        let peers: Vec<usize> = (0..self.columns.len())
            .filter(|&i| Some(i) != ferrite)
            .collect();
        let mut header = vec!["row".to_string(), "unit".to_string()];
        header.extend(self.columns.iter().map(|c| c.label.clone()));
        if ferrite.is_some() {
            header.extend(
                peers
                    .iter()
                    .map(|&p| format!("Ferrite / {}", self.columns[p].label)),
            );
        }
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
        let mut notes: Vec<String> = Vec::new();
        for size in &self.sizes {
            for (m, label, unit) in [
                (
                    "h2g.pps",
                    format!("host → guest datagrams, {size} B"),
                    "k/s",
                ),
                (
                    "h2g.mib_s",
                    format!("host → guest payload, {size} B"),
                    "MiB/s",
                ),
                ("h2g.lost", format!("host → guest lost, {size} B"), "count"),
                (
                    "g2h.pps",
                    format!("guest → host datagrams, {size} B"),
                    "k/s",
                ),
                (
                    "g2h.mib_s",
                    format!("guest → host payload, {size} B"),
                    "MiB/s",
                ),
                ("g2h.lost", format!("guest → host lost, {size} B"), "count"),
                ("pps", format!("UDP echo round trips, {size} B"), "k/s"),
                (
                    "mib_s",
                    format!("UDP echo payload each way, {size} B"),
                    "MiB/s",
                ),
                ("lost", format!("UDP echo lost, {size} B"), "count"),
            ] {
                let id = format!("{size}.{m}");
                let mut row = vec![label, unit.to_string()];
                for c in &self.columns {
                    row.push(cell(c, &id, &mut notes));
                }
                if let Some(f) = ferrite {
                    for &p in &peers {
                        row.push(if m.ends_with("lost") {
                            "—".to_string()
                        } else {
                            ratio(&self.columns[f], &self.columns[p], &id)
                        });
                    }
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
        out.push_str("\nRatios above 1: Ferrite is faster.\n\nCommands:\n\n");
        for c in &self.columns {
            out.push_str(&format!("- {}: `{}`\n", c.label, c.command));
        }
        out
    }
}

fn cell(c: &NetColumn, id: &str, notes: &mut Vec<String>) -> String {
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

fn ratio(a: &NetColumn, b: &NetColumn, id: &str) -> String {
    match (a.rows.get(id), b.rows.get(id)) {
        (Some(Outcome::Measured(x)), Some(Outcome::Measured(y)))
            if a.skipped.is_none() && b.skipped.is_none() && y.median > 0.0 =>
        {
            format!("{:.2}×", x.median / y.median)
        }
        _ => "—".to_string(),
    }
}
