//! `ferrite vm set`: a `PATCH /v1/vms/{name}` body built by hand, since a resource given as
//! `none` must be sent as JSON `null` (clear) and one not given must be absent (keep).

use clap::Args;
use serde_json::{json, Map, Value};

use super::parse_mib;

/// `ferrite vm set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The VM.
    pub name: String,
    /// CPU cap in percent of one host CPU (150 = 1.5 CPUs), or `none` (live).
    #[arg(long, value_name = "PCT|none", value_parser = parse_opt_u32)]
    pub cpu_quota: Option<Clearable<u32>>,
    /// CPU weight 1-10000 (live).
    #[arg(long, value_name = "W")]
    pub cpu_weight: Option<u32>,
    /// Hard memory limit of the VMM process, or `none` (live).
    #[arg(long, value_name = "SIZE|none", value_parser = parse_opt_mib)]
    pub memory_limit: Option<Clearable<u64>>,
    /// Host CPUs to run on (`0-3,6`; `none`: any) (live).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub pin_cpus: Option<CpuList>,
    /// Balloon target: memory the guest should give back (live).
    #[arg(long, value_name = "SIZE", value_parser = parse_balloon)]
    pub balloon: Option<u64>,
    /// Rate limit of a device: `disk0:bw=20M,iops=2000`, `net0.rx:bw=10M`, `rng:bw=1M`
    /// (0 or absent: unlimited; live; repeatable).
    #[arg(long = "rate-limit", value_name = "DEV:bw=N,iops=N", value_parser = parse_rate_limit)]
    pub rate_limits: Vec<(String, Option<u64>, Option<u64>)>,
    /// vCPUs (stopped VMs only).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest RAM (stopped VMs only).
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    pub memory: Option<u64>,
    /// Kernel command line (stopped VMs only).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Start with ferrited.
    #[arg(long, value_name = "true|false")]
    pub autostart: Option<bool>,
    /// Restart after VMM crashes.
    #[arg(long, value_name = "true|false")]
    pub restart_on_crash: Option<bool>,
}

/// A limit or `none` (clap reads `Option<Option<T>>` as an optional value, hence the type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clearable<T>(pub Option<T>);

/// Host CPU numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<u32>);

fn parse_opt_u32(s: &str) -> Result<Clearable<u32>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Clearable(None));
    }
    s.trim_end_matches('%')
        .parse()
        .map(|n| Clearable(Some(n)))
        .map_err(|_| format!("{s:?} is not a number or none"))
}

fn parse_opt_mib(s: &str) -> Result<Clearable<u64>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Clearable(None));
    }
    parse_mib(s).map(|n| Clearable(Some(n)))
}

/// A balloon target in MiB (0 allowed: deflate fully).
fn parse_balloon(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_mib(s)
}

/// `0-3,6` into CPU numbers; `none` or empty: no pinning.
pub(crate) fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(CpuList(Vec::new()));
    }
    let num = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("bad CPU {t:?} in {s:?} (use a list like 0-3,6)"))
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("bad CPU range {part:?}"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(CpuList(out))
}

type RateLimit = (String, Option<u64>, Option<u64>);

/// `DEV:bw=N,iops=N` (`ops=` is a synonym of `iops=`, `pps=` too).
fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    let (dev, opts) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: use DEV:bw=N,iops=N"))?;
    if dev.is_empty() {
        return Err(format!("{s:?}: missing device name"));
    }
    let (mut bw, mut ops) = (None, None);
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| format!("{opt:?}: use bw=N or iops=N"))?;
        let n = rate_limiter::parse_rate(v).map_err(|e| e.to_string())?;
        match k {
            "bw" => bw = Some(n),
            "iops" | "ops" | "pps" => ops = Some(n),
            _ => return Err(format!("unknown rate-limit key {k:?} (use bw or iops)")),
        }
    }
    if bw.is_none() && ops.is_none() {
        return Err(format!("{s:?}: give bw=N and/or iops=N"));
    }
    Ok((dev.to_string(), bw, ops))
}

/// The PATCH body of `a`.
pub(crate) fn update_body(a: &SetArgs) -> Result<Value, String> {
    let mut body = Map::new();
    let mut res = Map::new();
    if let Some(q) = a.cpu_quota {
        res.insert("cpu_quota_pct".into(), json!(q.0));
    }
    if let Some(w) = a.cpu_weight {
        res.insert("cpu_weight".into(), json!(w));
    }
    if let Some(m) = a.memory_limit {
        res.insert("memory_limit_mib".into(), json!(m.0));
    }
    if let Some(p) = &a.pin_cpus {
        res.insert("pin_cpus".into(), json!(p.0));
    }
    if !res.is_empty() {
        body.insert("resources".into(), Value::Object(res));
    }
    if let Some(b) = a.balloon {
        body.insert("balloon_mib".into(), json!(b));
    }
    if !a.rate_limits.is_empty() {
        let mut rl = Map::new();
        for (dev, bw, ops) in &a.rate_limits {
            let mut one = Map::new();
            if let Some(bw) = bw {
                one.insert("bytes_per_s".into(), json!(bw));
            }
            if let Some(ops) = ops {
                one.insert("ops_per_s".into(), json!(ops));
            }
            rl.insert(dev.clone(), Value::Object(one));
        }
        body.insert("rate_limits".into(), Value::Object(rl));
    }
    if let Some(c) = a.cpus {
        body.insert("vcpus".into(), json!(c));
    }
    if let Some(m) = a.memory {
        body.insert("memory_mib".into(), json!(m));
    }
    if let Some(c) = &a.cmdline {
        body.insert("cmdline".into(), json!(c));
    }
    if let Some(v) = a.autostart {
        body.insert("autostart".into(), json!(v));
    }
    if let Some(v) = a.restart_on_crash {
        body.insert("restart_on_crash".into(), json!(v));
    }
    if body.is_empty() {
        return Err(
            "nothing to change: give at least one option (see `ferrite vm set --help`)".into(),
        );
    }
    Ok(Value::Object(body))
}
