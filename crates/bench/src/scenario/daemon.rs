//! The daemon scenario: what `ferrited` adds to a VM start, and how many VMs it brings to
//! userspace on this host in a fixed window.
//!
//! QEMU has no daemon of this kind, so this scenario compares Ferrite with itself: the same
//! guest started by `ferrite run` directly and through `ferrited` (`ferrite vm start`).
//!
//! 1. Start latency, interleaved per iteration: (a) `ferrite run` with the console on a stdout
//!    pipe (the `boot` scenario's method), (b) `ferrite run --console file:LOG` with READY found
//!    by polling LOG every millisecond, (c) `ferrite vm start NAME` with READY found by polling
//!    the daemon's `NAME.console.log` (bytes appended since the iteration began) every
//!    millisecond; the `vm start` command's own duration is the API latency. (b) and (c) use the
//!    same detection, so their ratio is the daemon's cost.
//! 2. Density: many VMs of the same size defined up front, then started one after another (or
//!    `--density-concurrency` at a time) through the same client for the window; READY is
//!    watched in every console log by one thread. Then the daemon's and every VMM's memory.
//!
//! Everything runs under a temporary directory; the daemon, every VMM it started and their
//! cgroups are removed at the end, also on errors, panics and SIGINT/SIGTERM.

use super::interrupt::{check_interrupted, interrupted, SignalGuard};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::child::{CommandSpec, VmmProcess};
use crate::report::{Outcome, Series};
use crate::runner::Plan;
use crate::scenario::{ms_between, wait_ready, RunConfig};
use crate::smaps;
use crate::stats::Summary;
use crate::vmm::{Vmm, VmmKind};

const MIB: f64 = (1u64 << 20) as f64;
/// Console logs are polled this often while a start is timed.
const POLL: Duration = Duration::from_millis(1);
/// Console logs of the density run are polled this often (hundreds of files).
const DENSITY_POLL: Duration = Duration::from_millis(5);
/// Stop the density run after this many failed starts in a row.
const MAX_CONSECUTIVE_FAILURES: usize = 5;
/// How long VMs started in the window may still take to reach READY (reported separately).
const DENSITY_GRACE: Duration = Duration::from_secs(15);

/// How the benchmark asks the daemon to start and kill VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Client {
    /// `ferrite --socket S vm start|kill NAME`.
    Cli,
    /// `curl --unix-socket S -X POST http://ferrited/v1/vms/NAME/start|kill`.
    Curl,
}

impl Client {
    fn label(self) -> &'static str {
        match self {
            Client::Cli => "`ferrite vm start`",
            Client::Curl => "`curl -X POST …/start`",
        }
    }
}

/// Settings of the daemon scenario.
#[derive(Debug, Clone)]
pub struct DaemonPlan {
    /// The `ferrite` binary (VMM and CLI).
    pub ferrite: PathBuf,
    /// The `ferrited` binary.
    pub ferrited: PathBuf,
    /// Start/kill through the CLI or curl.
    pub client: Client,
    /// `ferrited --cpu-overcommit`.
    pub cpu_overcommit: f64,
    /// `ferrited --memory-overcommit`.
    pub memory_overcommit: f64,
    /// Density window (zero: no density run).
    pub density_window: Duration,
    /// VMs defined for the density run (the most it can start).
    pub density_max_vms: usize,
    /// Starts in flight at once during the density run.
    pub density_concurrency: usize,
}

/// Everything the scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonReport {
    /// Command that reproduces this run.
    pub reproduce: String,
    /// Host description.
    pub host: String,
    /// Guest ELF.
    pub guest: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// Counted iterations of the latency part.
    pub iterations: usize,
    /// Warm-up iterations.
    pub warmup: usize,
    /// The client used for `start`/`kill`.
    pub client: Client,
    /// The daemon command line.
    pub daemon_command: String,
    /// The direct command line (file console variant).
    pub direct_command: String,
    /// When the run started (UTC, from `date`).
    pub started_utc: String,
    /// Latency metric id → outcome.
    pub latency: BTreeMap<String, Outcome>,
    /// The density run, or why there is none.
    pub density: Result<Density, String>,
    /// Set when the daemon could not be run at all.
    pub error: Option<String>,
}

/// The density run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Density {
    /// The window in seconds.
    pub window_s: f64,
    /// Starts in flight at once.
    pub concurrency: usize,
    /// VMs defined (the cap).
    pub defined: usize,
    /// Seconds defining them took (before the window).
    pub define_s: f64,
    /// Start commands issued in the window.
    pub attempted: usize,
    /// Start commands that succeeded.
    pub started: usize,
    /// Start commands that failed.
    pub failed: usize,
    /// The first few failure messages.
    pub failures: Vec<String>,
    /// VMs whose READY appeared within the window.
    pub ready_in_window: usize,
    /// VMs whose READY appeared after the window (within the grace period).
    pub ready_after_window: usize,
    /// Started VMs that never printed READY (within window + grace).
    pub never_ready: usize,
    /// Seconds from the first start to the last READY inside the window.
    pub last_ready_s: Option<f64>,
    /// Why the run stopped starting VMs.
    pub stopped_because: String,
    /// Per VM: start command issued → READY, ms (VMs that reached READY).
    pub start_to_ready_ms: Option<Summary>,
    /// Per VM: duration of the start command, ms.
    pub start_cmd_ms: Option<Summary>,
    /// Start → READY of the first and the last tenth of the VMs (median ms).
    pub start_to_ready_first_last_tenth_ms: Option<(f64, f64)>,
    /// The daemon's VmRSS / PSS before any VM was defined, MiB.
    pub daemon_idle: Option<ProcMem>,
    /// The daemon's VmRSS / PSS with every VM running, MiB.
    pub daemon_loaded: Option<ProcMem>,
    /// VMM processes whose smaps was read.
    pub vmms_measured: usize,
    /// Per VMM, MiB: whole-process RSS.
    pub vmm_rss_total: Option<Summary>,
    /// Per VMM, MiB: whole-process PSS.
    pub vmm_pss_total: Option<Summary>,
    /// Per VMM, MiB: RSS beyond the guest-RAM mapping.
    pub vmm_rss_overhead: Option<Summary>,
    /// Per VMM, MiB: PSS beyond the guest-RAM mapping.
    pub vmm_pss_overhead: Option<Summary>,
    /// Per VMM, MiB: guest RAM resident.
    pub guest_ram_resident: Option<Summary>,
    /// Sum over VMMs, MiB: RSS.
    pub sum_vmm_rss: f64,
    /// Sum over VMMs, MiB: PSS.
    pub sum_vmm_pss: f64,
    /// Host `MemAvailable` drop from before the window to after it (MiB).
    pub host_mem_available_drop: Option<f64>,
    /// Host `MemAvailable` after the window (MiB).
    pub host_mem_available_after: Option<f64>,
    /// `/proc/loadavg` right after the window.
    pub load_after: String,
    /// `GET /v1/host` after the window (capacity and allocation).
    pub host_api: String,
}

/// RSS (VmRSS) and PSS (smaps_rollup) of one process, MiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcMem {
    /// VmRSS.
    pub rss: f64,
    /// Pss from smaps_rollup.
    pub pss: f64,
}

/// Latency metrics in report order: (id, label).
const LATENCY: &[(&str, &str)] = &[
    (
        "direct_stdio.ready",
        "`ferrite run`, console on a stdout pipe: spawn → READY line",
    ),
    (
        "direct_file.ready",
        "`ferrite run --console file:LOG`: spawn → READY in LOG",
    ),
    (
        "daemon.ready",
        "daemon: start command spawned → READY in `NAME.console.log`",
    ),
    (
        "daemon.api",
        "daemon: duration of the start command (API latency)",
    ),
    ("daemon.kill", "daemon: duration of the kill command"),
];

/// Run the scenario.
pub fn run(plan: Plan, dplan: &DaemonPlan, cfg: &RunConfig) -> DaemonReport {
    let _signals = SignalGuard::install();
    let mut report = DaemonReport {
        reproduce: String::new(),
        host: String::new(),
        guest: cfg.guest.kernel.display().to_string(),
        memory_mib: cfg.guest.memory_mib,
        vcpus: cfg.guest.cpus,
        iterations: plan.iterations,
        warmup: plan.warmup,
        client: dplan.client,
        daemon_command: String::new(),
        direct_command: String::new(),
        started_utc: utc_now(),
        latency: BTreeMap::new(),
        density: Err("not run".to_string()),
        error: None,
    };
    for (what, path) in [("ferrite", &dplan.ferrite), ("ferrited", &dplan.ferrited)] {
        if !path.is_file() {
            report.error = Some(format!("{what} not found at {}", path.display()));
            report.density = Err("the daemon could not be run".to_string());
            return report;
        }
    }
    let daemon = match Daemon::start(dplan) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("[daemon] cannot start ferrited: {e}");
            report.error = Some(e);
            report.density = Err("the daemon could not be run".to_string());
            return report;
        }
    };
    report.daemon_command = daemon.command.clone();
    report.direct_command = direct_file_spec(dplan, cfg, &daemon.root.join("direct.log")).display();
    let daemon_idle = proc_mem(daemon.pid());
    report.latency = latency(&daemon, plan, dplan, cfg)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.outcome()))
        .collect();
    report.density = if dplan.density_window.is_zero() {
        Err("skipped (--density-window-s 0)".to_string())
    } else if interrupted() {
        Err("interrupted".to_string())
    } else {
        density(&daemon, dplan, cfg, daemon_idle)
    };
    if let Err(e) = &report.density {
        eprintln!("[daemon density] {e}");
    }
    eprintln!("[daemon] cleaning up");
    drop(daemon);
    report
}

// ---------------------------------------------------------------------------------------------
// The daemon under test

struct Daemon {
    root: PathBuf,
    socket: PathBuf,
    state: PathBuf,
    cgroup_parent: String,
    ferrite: PathBuf,
    client: Client,
    child: Option<Child>,
    command: String,
}

/// Why a start failed.
enum StartError {
    /// Admission control refused it.
    Capacity(String),
    /// Anything else.
    Other(String),
}

impl StartError {
    fn message(&self) -> &str {
        match self {
            StartError::Capacity(m) | StartError::Other(m) => m,
        }
    }
}

impl Daemon {
    fn start(plan: &DaemonPlan) -> Result<Self, String> {
        let pid = std::process::id();
        let root = std::env::temp_dir().join(format!("ferrite-bench-daemon-{pid}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let mut d = Daemon {
            socket: root.join("api.sock"),
            state: root.join("state"),
            cgroup_parent: format!("ferrite-bench-{pid}"),
            ferrite: plan.ferrite.clone(),
            client: plan.client,
            child: None,
            command: String::new(),
            root,
        };
        let args: Vec<String> = vec![
            "--socket".into(),
            d.socket.display().to_string(),
            "--state-dir".into(),
            d.state.display().to_string(),
            "--run-dir".into(),
            d.root.join("run").display().to_string(),
            "--vmm-binary".into(),
            plan.ferrite.display().to_string(),
            "--cgroup-parent".into(),
            d.cgroup_parent.clone(),
            "--cpu-overcommit".into(),
            plan.cpu_overcommit.to_string(),
            "--memory-overcommit".into(),
            plan.memory_overcommit.to_string(),
        ];
        d.command = CommandSpec {
            program: plan.ferrited.clone(),
            args: args.clone(),
        }
        .display();
        let log_path = d.root.join("ferrited.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&plan.ferrited);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: prctl is async-signal-safe; the daemon dies with the harness.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        d.child = Some(
            cmd.spawn()
                .map_err(|e| format!("cannot run {}: {e}", plan.ferrited.display()))?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = d.api("GET", "/v1/host", None) {
                return Ok(d);
            }
            if let Some(Ok(Some(status))) = d.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "ferrited exited at start ({status}): {}",
                    tail(&std::fs::read_to_string(&log_path).unwrap_or_default())
                ));
            }
            if Instant::now() > deadline {
                return Err("ferrited did not answer within 30 s".to_string());
            }
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(self.root.join("ferrited.log")).unwrap_or_default())
    }

    /// One request through curl: (HTTP status, body).
    fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), String> {
        let out = self
            .curl(method, path, body)
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        parse_curl(&out.stdout)
    }

    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "120", "-X", method, "--unix-socket"])
            .arg(&self.socket)
            .arg(format!("http://ferrited{path}"))
            .args(["-w", "\n%{http_code}"])
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        cmd
    }

    fn define(&self, name: &str, cfg: &RunConfig) -> Result<(), String> {
        let body = serde_json::json!({
            "name": name,
            "vcpus": cfg.guest.cpus,
            "memory_mib": cfg.guest.memory_mib,
            "kernel": cfg.guest.kernel.display().to_string(),
            "cmdline": cfg.cmdline(&cfg.idle_cmds),
        })
        .to_string();
        match self.api("POST", "/v1/vms", Some(&body))? {
            (201, _) | (200, _) => Ok(()),
            (s, b) => Err(format!("POST /v1/vms {name}: HTTP {s}: {}", b.trim())),
        }
    }

    /// The command that does `action` (`start`, `kill`) on VM `name`.
    fn action_command(&self, action: &str, name: &str) -> Command {
        match self.client {
            Client::Cli => {
                let mut cmd = Command::new(&self.ferrite);
                cmd.arg("--socket")
                    .arg(&self.socket)
                    .args(["vm", action, name])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                cmd
            }
            Client::Curl => {
                let mut cmd = self.curl("POST", &format!("/v1/vms/{name}/{action}"), None);
                cmd.stdout(Stdio::piped());
                cmd
            }
        }
    }

    /// Classify a finished action command.
    fn action_result(&self, out: &std::process::Output) -> Result<(), StartError> {
        let (ok, message) = match self.client {
            Client::Cli => (
                out.status.success(),
                format!(
                    "{} {}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
            ),
            Client::Curl => match parse_curl(&out.stdout) {
                Ok((s, body)) => (
                    (200..300).contains(&s),
                    format!("HTTP {s}: {}", body.trim()),
                ),
                Err(e) => (false, e),
            },
        };
        if ok {
            return Ok(());
        }
        let message = message.trim().replace('\n', " | ");
        if message.contains("capacity") {
            Err(StartError::Capacity(message))
        } else {
            Err(StartError::Other(message))
        }
    }

    fn run_action(&self, action: &str, name: &str) -> Result<(), StartError> {
        let out = self
            .action_command(action, name)
            .output()
            .map_err(|e| StartError::Other(format!("cannot run the client: {e}")))?;
        self.action_result(&out)
    }

    fn console_log(&self, name: &str) -> PathBuf {
        self.state.join("logs").join(format!("{name}.console.log"))
    }

    /// Every VMM this daemon started: `... run ...` processes whose command line names our
    /// directory (the daemon passes `--config <run-dir>/vms/NAME/config.json`).
    fn vmm_pids(&self) -> Vec<u32> {
        let needle = self.root.display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == self.pid() {
                continue;
            }
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains(&needle) && cmd.contains("\0run\0") {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The VMMs first (they outlive the daemon by design), then the daemon, then cgroups.
        for _ in 0..3 {
            let pids = self.vmm_pids();
            if pids.is_empty() {
                break;
            }
            for pid in &pids {
                kill_pid(*pid, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut child) = self.child.take() {
            kill_pid(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_cgroups(&self.cgroup_parent);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn kill_pid(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        if pid > 0 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// A live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Remove every cgroup directory named `parent` under /sys/fs/cgroup, children first.
fn remove_cgroups(parent: &str) {
    let mut found = Vec::new();
    find_dirs(Path::new("/sys/fs/cgroup"), parent, 0, &mut found);
    for dir in found {
        for _ in 0..20 {
            if remove_depth_first(&dir) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn find_dirs(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        let path = entry.path();
        if entry.file_name().to_string_lossy() == name {
            out.push(path);
        } else {
            find_dirs(&path, name, depth + 1, out);
        }
    }
}

/// rmdir `dir` and its subdirectories, deepest first; true if `dir` is gone.
fn remove_depth_first(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_depth_first(&entry.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

fn parse_curl(stdout: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(stdout);
    let (body, code) = text
        .rsplit_once('\n')
        .ok_or_else(|| "no answer from the daemon".to_string())?;
    match code.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err("no answer from the daemon".to_string()),
        Ok(c) => Ok((c, body.to_string())),
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

// ---------------------------------------------------------------------------------------------
// Console log watching

/// Bytes appended to a log file since the watch began, searched for the marker.
struct LogWatch {
    path: PathBuf,
    offset: u64,
    seen: Vec<u8>,
}

impl LogWatch {
    /// Watch what is appended to `path` from now on.
    fn from_end(path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        LogWatch {
            path,
            offset,
            seen: Vec::new(),
        }
    }

    /// Read what is new; true once `marker` has appeared.
    fn poll(&mut self, marker: &str) -> bool {
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    self.offset += n as u64;
                    self.seen.extend_from_slice(&buf);
                }
            }
        }
        contains(&self.seen, marker.as_bytes())
    }

    fn tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.seen);
        tail(&text)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Start latency

fn direct_vmm(dplan: &DaemonPlan) -> Vmm {
    Vmm {
        kind: VmmKind::Ferrite,
        program: dplan.ferrite.clone(),
        machine: String::new(),
        extra_args: vec![],
    }
}

fn direct_file_spec(dplan: &DaemonPlan, cfg: &RunConfig, log: &Path) -> CommandSpec {
    let mut spec = direct_vmm(dplan).command(&cfg.guest, &cfg.cmdline(&cfg.idle_cmds));
    spec.args.push("--console".into());
    spec.args.push(format!("file:{}", log.display()));
    spec
}

/// `ferrite run` with the console on stdout: spawn → READY line (ms).
fn direct_stdio_once(dplan: &DaemonPlan, cfg: &RunConfig) -> Result<f64, String> {
    let spec = direct_vmm(dplan).command(&cfg.guest, &cfg.cmdline(&cfg.idle_cmds));
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout).map_err(|e| e.to_string())?;
    let ready = wait_ready(&mut p, cfg).map_err(|e| e.to_string())?;
    p.kill();
    Ok(ms_between(p.start(), ready.at))
}

/// `ferrite run --console file:LOG`: spawn → READY in LOG (ms).
fn direct_file_once(dplan: &DaemonPlan, cfg: &RunConfig, log: &Path) -> Result<f64, String> {
    let _ = std::fs::remove_file(log);
    let spec = direct_file_spec(dplan, cfg, log);
    let mut watch = LogWatch::from_end(log.to_path_buf());
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout).map_err(|e| e.to_string())?;
    let deadline = p.start() + cfg.boot_timeout;
    let result = loop {
        if watch.poll(&cfg.ready_marker) {
            break Ok(ms_between(p.start(), Instant::now()));
        }
        if let Some(exit) = p.wait_exit(Instant::now()) {
            break Err(format!(
                "VMM exited ({}) before READY; stderr: {}",
                exit.status,
                p.stderr_tail()
            ));
        }
        if Instant::now() > deadline {
            break Err(format!("no READY within {:?}", cfg.boot_timeout));
        }
        if interrupted() {
            break Err("interrupted".to_string());
        }
        std::thread::sleep(POLL);
    };
    p.kill();
    result
}

/// One start through the daemon: (start command duration, start → READY), ms.
fn daemon_once(d: &Daemon, name: &str, cfg: &RunConfig) -> Result<(f64, f64), String> {
    let mut watch = LogWatch::from_end(d.console_log(name));
    let mut cmd = d.action_command("start", name);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run the client: {e}"))?;
    // The command's output is collected by a thread so that READY can be seen while it runs.
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        (Instant::now(), out)
    });
    let deadline = start + cfg.boot_timeout;
    let mut ready = None;
    let mut api: Option<Instant> = None;
    let mut waiter = Some(waiter);
    loop {
        if ready.is_none() && watch.poll(&cfg.ready_marker) {
            ready = Some(Instant::now());
        }
        if waiter
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished)
        {
            if let Some(w) = waiter.take() {
                let (at, out) = w.join().map_err(|_| "client thread panicked".to_string())?;
                let out = out.map_err(|e| format!("client: {e}"))?;
                d.action_result(&out)
                    .map_err(|e| format!("start failed: {}", e.message()))?;
                api = Some(at);
            }
        }
        if let (Some(r), Some(a)) = (ready, api) {
            return Ok((ms_between(start, a), ms_between(start, r)));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no READY within {:?} (start command {}); console: {}; daemon: {}",
                cfg.boot_timeout,
                if api.is_some() {
                    "done"
                } else {
                    "still running"
                },
                watch.tail(),
                d.log_tail()
            ));
        }
        check_interrupted()?;
        std::thread::sleep(POLL);
    }
}

fn latency(
    d: &Daemon,
    plan: Plan,
    dplan: &DaemonPlan,
    cfg: &RunConfig,
) -> BTreeMap<&'static str, Series> {
    let mut series: BTreeMap<&'static str, Series> = BTreeMap::new();
    let name = "lat0";
    if let Err(e) = d.define(name, cfg) {
        eprintln!("[daemon latency] define failed: {e}");
        for (id, _) in LATENCY {
            series.entry(id).or_default().fail(&e);
        }
        return series;
    }
    let log = d.root.join("direct.log");
    let total = plan.warmup + plan.iterations;
    let mut failed: BTreeMap<&'static str, bool> = BTreeMap::new();
    for iter in 0..total {
        if interrupted() {
            for (id, _) in LATENCY {
                series.entry(id).or_default().fail("interrupted");
            }
            break;
        }
        let counted = iter >= plan.warmup;
        let tag = format!("[daemon latency {}/{}]", iter + 1, total);
        let mut record = |id: &'static str, v: Result<f64, String>| {
            if let Err(e) = &v {
                failed.insert(id, true);
                series.entry(id).or_default().fail(e);
            } else if counted {
                series.entry(id).or_default().push(v);
            }
        };
        let stdio = direct_stdio_once(dplan, cfg);
        let file = direct_file_once(dplan, cfg, &log);
        let via = daemon_once(d, name, cfg);
        let kill_start = Instant::now();
        let kill = d
            .run_action("kill", name)
            .map(|()| ms_between(kill_start, Instant::now()))
            .map_err(|e| format!("kill failed: {}", e.message()));
        eprintln!(
            "{tag} direct stdio {} | direct file {} | daemon api {} ready {} | kill {}",
            fmt_ms(&stdio),
            fmt_ms(&file),
            fmt_ms(&via.as_ref().map(|v| v.0).map_err(Clone::clone)),
            fmt_ms(&via.as_ref().map(|v| v.1).map_err(Clone::clone)),
            fmt_ms(&kill)
        );
        record("direct_stdio.ready", stdio);
        record("direct_file.ready", file);
        match via {
            Ok((api, ready)) => {
                record("daemon.api", Ok(api));
                record("daemon.ready", Ok(ready));
            }
            Err(e) => {
                record("daemon.api", Err(e.clone()));
                record("daemon.ready", Err(e));
            }
        }
        record("daemon.kill", kill);
        if failed.len() == LATENCY.len() {
            break;
        }
    }
    let _ = std::fs::remove_file(&log);
    series
}

fn fmt_ms(v: &Result<f64, String>) -> String {
    match v {
        Ok(x) => format!("{x:.1} ms"),
        Err(e) => format!("failed ({e})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Density

struct Started {
    name: String,
    watch: LogWatch,
    issued: Instant,
    cmd_ms: Option<f64>,
    failed: bool,
    ready: Option<Instant>,
}

#[derive(Default)]
struct StartLog {
    vms: Vec<Started>,
    failed: usize,
    failures: Vec<String>,
    consecutive_failures: usize,
    stop: Option<String>,
}

fn density(
    d: &Daemon,
    dplan: &DaemonPlan,
    cfg: &RunConfig,
    daemon_idle: Option<ProcMem>,
) -> Result<Density, String> {
    let max = dplan.density_max_vms.max(1);
    let names: Vec<String> = (0..max).map(|i| format!("dens{i:04}")).collect();
    let define_start = Instant::now();
    for (i, name) in names.iter().enumerate() {
        check_interrupted()?;
        d.define(name, cfg)?;
        if (i + 1) % 100 == 0 {
            eprintln!("[daemon density] defined {}/{max}", i + 1);
        }
    }
    let define_s = define_start.elapsed().as_secs_f64();
    eprintln!(
        "[daemon density] {max} VMs defined in {define_s:.1} s; starting for {:?}",
        dplan.density_window
    );
    let avail_before = mem_available_mib();

    let log = Mutex::new(StartLog::default());
    let next = AtomicUsize::new(0);
    let starting = AtomicUsize::new(dplan.density_concurrency.max(1));
    let window_start = Instant::now();
    let window_end = window_start + dplan.density_window;
    std::thread::scope(|s| {
        for _ in 0..dplan.density_concurrency.max(1) {
            s.spawn(|| {
                starter(d, &names, &next, &log, window_end);
                starting.fetch_sub(1, Ordering::SeqCst);
            });
        }
        // The watcher: this thread polls every console log until the window (and the grace
        // period for VMs still booting) is over.
        let mut last_report = Instant::now();
        loop {
            let now = Instant::now();
            let mut pending = 0;
            let (count, ready_count) = {
                let mut l = lock(&log);
                for vm in l.vms.iter_mut().filter(|v| v.ready.is_none() && !v.failed) {
                    if vm.watch.poll(&cfg.ready_marker) {
                        vm.ready = Some(Instant::now());
                    } else {
                        pending += 1;
                    }
                }
                (
                    l.vms.len(),
                    l.vms.iter().filter(|v| v.ready.is_some()).count(),
                )
            };
            if now.duration_since(last_report) >= Duration::from_secs(5) {
                last_report = now;
                eprintln!(
                    "[daemon density] t={:.0} s: {count} started, {ready_count} at READY, load {}",
                    now.duration_since(window_start).as_secs_f64(),
                    loadavg()
                );
            }
            let starters_done = starting.load(Ordering::SeqCst) == 0;
            if starters_done && (pending == 0 || now > grace_end(window_end, &log)) {
                break;
            }
            if interrupted() {
                lock(&log)
                    .stop
                    .get_or_insert_with(|| "interrupted".to_string());
                if starters_done {
                    break;
                }
            }
            std::thread::sleep(DENSITY_POLL);
        }
    });
    let load_after = loadavg();
    let mut l = log.into_inner().unwrap_or_else(|e| e.into_inner());
    check_interrupted()?;
    let stopped_because = l.stop.take().unwrap_or_else(|| {
        if next.load(Ordering::SeqCst) >= max {
            format!("all {max} defined VMs started (raise --density-max-vms)")
        } else {
            "the window ended".to_string()
        }
    });
    eprintln!("[daemon density] stopped: {stopped_because}; measuring memory");
    std::thread::sleep(cfg.settle);

    let first = window_start;
    let in_window: Vec<&Started> = l
        .vms
        .iter()
        .filter(|v| v.ready.is_some_and(|r| r <= window_end))
        .collect();
    let ready_after = l
        .vms
        .iter()
        .filter(|v| v.ready.is_some_and(|r| r > window_end))
        .count();
    let never = l
        .vms
        .iter()
        .filter(|v| v.cmd_ms.is_some() && v.ready.is_none())
        .count();
    let last_ready_s = in_window
        .iter()
        .filter_map(|v| v.ready)
        .max()
        .map(|r| r.duration_since(first).as_secs_f64());
    let mut by_issue: Vec<&Started> = l.vms.iter().filter(|v| v.ready.is_some()).collect();
    by_issue.sort_by_key(|v| v.issued);
    let to_ready: Vec<f64> = by_issue
        .iter()
        .filter_map(|v| v.ready.map(|r| ms_between(v.issued, r)))
        .collect();
    let tenth = (to_ready.len() / 10).max(1);
    let first_last = (to_ready.len() >= 2).then(|| {
        let a = Summary::of(&to_ready[..tenth])
            .map(|s| s.median)
            .unwrap_or(0.0);
        let b = Summary::of(&to_ready[to_ready.len() - tenth..])
            .map(|s| s.median)
            .unwrap_or(0.0);
        (a, b)
    });
    let cmd_ms: Vec<f64> = l.vms.iter().filter_map(|v| v.cmd_ms).collect();

    let daemon_loaded = proc_mem(d.pid());
    let ram = cfg.guest.memory_mib << 20;
    let mut rss_total = Vec::new();
    let mut pss_total = Vec::new();
    let mut rss_over = Vec::new();
    let mut pss_over = Vec::new();
    let mut guest_ram = Vec::new();
    for pid in d.vmm_pids() {
        if let Ok(m) = smaps::measure(pid, ram) {
            rss_total.push(m.rss_total as f64 / MIB);
            pss_total.push(m.pss_total as f64 / MIB);
            rss_over.push(m.rss_vmm as f64 / MIB);
            pss_over.push(m.pss_vmm as f64 / MIB);
            guest_ram.push(m.rss_guest_ram as f64 / MIB);
        }
    }
    let avail_after = mem_available_mib();
    let host_api = d
        .api("GET", "/v1/host", None)
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_else(|e| e);
    let failures = std::mem::take(&mut l.failures);
    Ok(Density {
        window_s: dplan.density_window.as_secs_f64(),
        concurrency: dplan.density_concurrency.max(1),
        defined: max,
        define_s,
        attempted: l.vms.len(),
        started: cmd_ms.len(),
        failed: l.failed,
        failures,
        ready_in_window: in_window.len(),
        ready_after_window: ready_after,
        never_ready: never,
        last_ready_s,
        stopped_because,
        start_to_ready_ms: Summary::of(&to_ready),
        start_cmd_ms: Summary::of(&cmd_ms),
        start_to_ready_first_last_tenth_ms: first_last,
        daemon_idle,
        daemon_loaded,
        vmms_measured: rss_total.len(),
        vmm_rss_total: Summary::of(&rss_total),
        vmm_pss_total: Summary::of(&pss_total),
        vmm_rss_overhead: Summary::of(&rss_over),
        vmm_pss_overhead: Summary::of(&pss_over),
        guest_ram_resident: Summary::of(&guest_ram),
        sum_vmm_rss: rss_total.iter().sum(),
        sum_vmm_pss: pss_total.iter().sum(),
        host_mem_available_drop: avail_before.zip(avail_after).map(|(b, a)| b - a),
        host_mem_available_after: avail_after,
        load_after,
        host_api,
    })
}

/// The end of the grace period: `DENSITY_GRACE` after the last start was issued (at least the
/// window's end).
fn grace_end(window_end: Instant, log: &Mutex<StartLog>) -> Instant {
    let last = lock(log).vms.iter().map(|v| v.issued).max();
    last.map_or(window_end, |l| l.max(window_end)) + DENSITY_GRACE
}

fn lock(log: &Mutex<StartLog>) -> std::sync::MutexGuard<'_, StartLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start VMs one after another until the window ends, the names run out or starting stops.
fn starter(
    d: &Daemon,
    names: &[String],
    next: &AtomicUsize,
    log: &Mutex<StartLog>,
    window_end: Instant,
) {
    loop {
        if Instant::now() >= window_end || interrupted() || lock(log).stop.is_some() {
            return;
        }
        let i = next.fetch_add(1, Ordering::SeqCst);
        let Some(name) = names.get(i) else { return };
        let index = {
            let mut l = lock(log);
            l.vms.push(Started {
                name: name.clone(),
                watch: LogWatch::from_end(d.console_log(name)),
                issued: Instant::now(),
                cmd_ms: None,
                failed: false,
                ready: None,
            });
            l.vms.len() - 1
        };
        let issued = lock(log).vms[index].issued;
        let result = d.run_action("start", name);
        let ms = ms_between(issued, Instant::now());
        let mut l = lock(log);
        match result {
            Ok(()) => {
                l.vms[index].cmd_ms = Some(ms);
                l.consecutive_failures = 0;
            }
            Err(e) => {
                l.vms[index].failed = true;
                l.failed += 1;
                l.consecutive_failures += 1;
                if l.failures.len() < 5 {
                    let line = format!("{}: {}", l.vms[index].name, e.message());
                    l.failures.push(line);
                }
                match e {
                    StartError::Capacity(m) => {
                        l.stop.get_or_insert_with(|| {
                            format!("admission control refused a start: {m}")
                        });
                    }
                    StartError::Other(m) if l.consecutive_failures >= MAX_CONSECUTIVE_FAILURES => {
                        l.stop.get_or_insert_with(|| {
                            format!("{MAX_CONSECUTIVE_FAILURES} starts in a row failed, last: {m}")
                        });
                    }
                    StartError::Other(_) => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host and process figures

fn proc_mem(pid: u32) -> Option<ProcMem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(ProcMem {
        rss: kib_field(&status, "VmRSS:")? / 1024.0,
        pss: kib_field(&rollup, "Pss:")? / 1024.0,
    })
}

/// The value in kB of the first line starting with `key`.
fn kib_field(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
}

fn mem_available_mib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, "MemAvailable:").map(|k| k / 1024.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Report

impl DaemonReport {
    /// Render as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Daemon scenario (Ferrite direct vs through `ferrited`; QEMU has no equivalent daemon), run {}.  \nGuest `{}`, {} MiB, {} vCPU, {} counted iterations (+{} warm-up), median (min–max); client {}.  \nHost: {}  \nCommand: `{}`\n\n",
            self.started_utc,
            self.guest,
            self.memory_mib,
            self.vcpus,
            self.iterations,
            self.warmup,
            self.client.label(),
            self.host,
            self.reproduce
        ));
        if let Some(e) = &self.error {
            out.push_str(&format!("Not measured: {e}\n"));
            return out;
        }
        out.push_str("| start path | unit | median (min–max) | / direct (file console) |\n|---|---|---|---|\n");
        let mut notes: Vec<String> = Vec::new();
        let base = match self.latency.get("direct_file.ready") {
            Some(Outcome::Measured(s)) => Some(s.median),
            _ => None,
        };
        for (id, label) in LATENCY {
            let (cell, ratio) = match self.latency.get(*id) {
                Some(Outcome::Measured(s)) => (
                    format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max),
                    match (base, *id) {
                        (Some(b), "direct_stdio.ready" | "daemon.ready") if b > 0.0 => {
                            format!("{:.2}×", s.median / b)
                        }
                        _ => "—".to_string(),
                    },
                ),
                Some(Outcome::NotMeasured { reason }) => {
                    notes.push(reason.clone());
                    (format!("n/a [{}]", notes.len()), "—".to_string())
                }
                None => ("not run".to_string(), "—".to_string()),
            };
            out.push_str(&format!("| {label} | ms | {cell} | {ratio} |\n"));
        }
        for (i, n) in notes.iter().enumerate() {
            if i == 0 {
                out.push('\n');
            }
            out.push_str(&format!("{}. {}\n", i + 1, n));
        }
        out.push_str(&format!(
            "\nDaemon: `{}`  \nDirect: `{}`\n",
            self.daemon_command, self.direct_command
        ));
        match &self.density {
            Err(e) => out.push_str(&format!("\nDensity: not measured: {e}\n")),
            Ok(dn) => out.push_str(&dn.to_markdown(self.memory_mib, self.client)),
        }
        out
    }
}

fn summary_cell(s: &Option<Summary>, d: usize) -> String {
    match s {
        Some(s) => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max),
        None => "n/a".to_string(),
    }
}

fn mem_cell(m: &Option<ProcMem>) -> String {
    match m {
        Some(m) => format!("{:.2} / {:.2}", m.rss, m.pss),
        None => "n/a".to_string(),
    }
}

impl Density {
    fn to_markdown(&self, memory_mib: u64, client: Client) -> String {
        let mut rows: Vec<(String, String)> = vec![
            (
                "how".into(),
                format!(
                    "{} VMs of {memory_mib} MiB defined up front ({:.1} s), then started {} through {} for {:.0} s",
                    self.defined,
                    self.define_s,
                    if self.concurrency == 1 {
                        "one after another".to_string()
                    } else {
                        format!("{} at a time", self.concurrency)
                    },
                    client.label(),
                    self.window_s
                ),
            ),
            (
                "**VMs at READY within the window**".into(),
                format!("**{}**", self.ready_in_window),
            ),
            (
                "first start → last READY in the window".into(),
                self.last_ready_s
                    .map_or("n/a".into(), |s| format!("{s:.1} s")),
            ),
            (
                "starts issued / succeeded / failed".into(),
                format!("{} / {} / {}", self.attempted, self.started, self.failed),
            ),
            ("stopped starting because".into(), self.stopped_because.clone()),
            (
                "READY after the window / never (15 s grace)".into(),
                format!("{} / {}", self.ready_after_window, self.never_ready),
            ),
            (
                "per VM: start command → READY, ms".into(),
                summary_cell(&self.start_to_ready_ms, 1),
            ),
            (
                "per VM: start → READY, first tenth vs last tenth (median ms)".into(),
                self.start_to_ready_first_last_tenth_ms
                    .map_or("n/a".into(), |(a, b)| format!("{a:.1} → {b:.1}")),
            ),
            (
                "per VM: start command duration, ms".into(),
                summary_cell(&self.start_cmd_ms, 1),
            ),
            (
                "daemon RSS / PSS, idle (no VM defined), MiB".into(),
                mem_cell(&self.daemon_idle),
            ),
            (
                format!("daemon RSS / PSS with {} VMs running, MiB", self.vmms_measured),
                mem_cell(&self.daemon_loaded),
            ),
            (
                "per VMM: RSS beyond guest RAM, MiB".into(),
                summary_cell(&self.vmm_rss_overhead, 2),
            ),
            (
                "per VMM: PSS beyond guest RAM, MiB".into(),
                summary_cell(&self.vmm_pss_overhead, 2),
            ),
            (
                "per VMM: guest RAM resident, MiB".into(),
                summary_cell(&self.guest_ram_resident, 2),
            ),
            (
                "per VMM: total RSS / PSS (median), MiB".into(),
                match (&self.vmm_rss_total, &self.vmm_pss_total) {
                    (Some(r), Some(p)) => format!("{:.2} / {:.2}", r.median, p.median),
                    _ => "n/a".into(),
                },
            ),
            (
                format!("all {} VMMs: sum of RSS / sum of PSS, MiB", self.vmms_measured),
                if self.vmms_measured == 0 {
                    "n/a".to_string()
                } else {
                    format!("{:.1} / {:.1}", self.sum_vmm_rss, self.sum_vmm_pss)
                },
            ),
            (
                "host `MemAvailable` drop over the run / left after, MiB".into(),
                match (self.host_mem_available_drop, self.host_mem_available_after) {
                    (Some(d), Some(a)) => format!("{d:.0} / {a:.0}"),
                    _ => "n/a".into(),
                },
            ),
            ("load average right after the window".into(), self.load_after.clone()),
        ];
        if !self.failures.is_empty() {
            rows.push((
                "first failures".into(),
                self.failures.join("; ").replace('|', "/"),
            ));
        }
        let mut out = String::from("\n| density | value |\n|---|---|\n");
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out.push_str(&format!(
            "\n`GET /v1/host` after the window: `{}`\n",
            self.host_api
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_log_watch_only_new_bytes_count() {
        // Arrange
        let path =
            std::env::temp_dir().join(format!("ferrite-bench-logwatch-{}", std::process::id()));
        std::fs::write(&path, "FERRITE-TESTGUEST READY\n").expect("write");
        let mut w = LogWatch::from_end(path.clone());

        // Act
        let before = w.poll("FERRITE-TESTGUEST READY");
        std::fs::write(
            &path,
            "FERRITE-TESTGUEST READY\nboot\nFERRITE-TESTGUEST READY\n",
        )
        .expect("append");
        let after = w.poll("FERRITE-TESTGUEST READY");
        let _ = std::fs::remove_file(&path);

        // Assert
        assert!(!before);
        assert!(after);
    }

    #[test]
    fn test_parse_curl_status_and_body() {
        // Arrange
        let out = b"{\"code\":\"insufficient-capacity\"}\n409";

        // Act
        let r = parse_curl(out);

        // Assert
        assert_eq!(
            r,
            Ok((409, "{\"code\":\"insufficient-capacity\"}".to_string()))
        );
        assert!(parse_curl(b"\n000").is_err());
    }

    #[test]
    fn test_kib_field_parses_kb() {
        // Arrange
        let text = "Name:\tx\nVmRSS:\t  2048 kB\n";

        // Act
        let v = kib_field(text, "VmRSS:");

        // Assert
        assert_eq!(v, Some(2048.0));
    }
}
