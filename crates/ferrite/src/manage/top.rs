//! `ferrite top`: per-VM rates from two `/v1/stats` samples.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use api::{VmState, VmStats};
use clap::Args;

use super::{finish, format_bytes, print_json, table, Global, Res};

/// `ferrite top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Seconds between refreshes (and between the two samples of a rate).
    #[arg(long, short = 'i', value_name = "SECONDS", default_value_t = 1.0)]
    pub interval: f64,
    /// Print one table (after two samples) and exit.
    #[arg(long)]
    pub once: bool,
}

/// Run `ferrite top`.
pub fn run_top(g: &Global, a: TopArgs) -> i32 {
    finish(top(g, a))
}

fn top(g: &Global, a: TopArgs) -> Res {
    if !(a.interval.is_finite() && a.interval > 0.0) {
        return Err(super::Failed("--interval must be a positive number".into()));
    }
    let interval = Duration::from_secs_f64(a.interval.max(0.1));
    let c = g.client();
    let mut prev = c.stats()?;
    let mut prev_at = Instant::now();
    let tty = crate::terminal::is_tty(libc::STDOUT_FILENO);
    loop {
        std::thread::sleep(interval);
        let cur = c.stats()?;
        let now = Instant::now();
        let dt = now.duration_since(prev_at).as_secs_f64();
        if g.json {
            print_json(&cur)?;
        } else {
            let text = top_table(&prev, &cur, dt);
            let mut out = std::io::stdout().lock();
            if tty && !a.once {
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(out, "{text}")?;
            out.flush()?;
        }
        if a.once {
            return Ok(());
        }
        prev = cur;
        prev_at = now;
    }
}

fn sum(m: &BTreeMap<String, api::IoCounters>) -> (u64, u64) {
    m.values()
        .fold((0, 0), |(r, w), c| (r + c.read_bytes, w + c.write_bytes))
}

/// A rate between two counters (restarts make counters go back: 0 then).
fn rate(before: u64, after: u64, dt: f64) -> String {
    if dt <= 0.0 {
        return "-".into();
    }
    format!(
        "{}/s",
        format_bytes((after.saturating_sub(before) as f64 / dt) as u64)
    )
}

/// The table of `cur` with rates against `prev`, taken `dt` seconds earlier.
pub(crate) fn top_table(prev: &[VmStats], cur: &[VmStats], dt: f64) -> String {
    let mut rows = vec![[
        "NAME", "STATE", "CPU%", "RSS", "DISK-R/s", "DISK-W/s", "NET-RX/s", "NET-TX/s",
    ]
    .map(String::from)
    .to_vec()];
    for s in cur {
        let state = s.state.unwrap_or(VmState::Stopped);
        let active = state.is_active();
        let p = prev.iter().find(|p| p.name == s.name);
        let dash = || "-".to_string();
        let (dr, dw) = sum(&s.disks);
        let (nr, nw) = sum(&s.nets);
        let (pdr, pdw, pnr, pnw, pcpu) = match p {
            Some(p) => {
                let (a, b) = sum(&p.disks);
                let (c, d) = sum(&p.nets);
                (a, b, c, d, Some(p.process_cpu_seconds))
            }
            None => (dr, dw, nr, nw, None),
        };
        let cpu = match pcpu {
            Some(pc) if active && dt > 0.0 => {
                format!(
                    "{:.1}",
                    ((s.process_cpu_seconds - pc).max(0.0) / dt) * 100.0
                )
            }
            _ => dash(),
        };
        let rates = |b, a| if active { rate(b, a, dt) } else { dash() };
        rows.push(vec![
            s.name.clone(),
            state.as_str().to_string(),
            cpu,
            if active {
                format_bytes(s.rss_bytes)
            } else {
                dash()
            },
            rates(pdr, dr),
            rates(pdw, dw),
            rates(pnr, nr),
            rates(pnw, nw),
        ]);
    }
    table(&rows)
}
