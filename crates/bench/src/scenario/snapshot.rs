//! The snapshot scenario: how big a snapshot is, how long taking it takes, how fast a fresh
//! process continues the guest from it, and how fast many clones of one snapshot come up.
//!
//! Per guest RAM size and iteration, for every VMM in turn (Ferrite, then the QEMU peers):
//!
//! 1. Boot the idle test guest (no `cmds=`) with a control socket (Ferrite `--api-socket`,
//!    QEMU `-qmp`) and wait for READY.
//! 2. Snapshot it. Ferrite: `{"op":"snapshot","path":DIR}`, timed from connect to the reply
//!    line, plus the reply's `write_ms`. QEMU: `migrate` to `exec:cat > FILE.part && mv
//!    FILE.part FILE` (with `max-bandwidth` raised so the default 32 MiB/s cap does not
//!    count), timed from the `migrate` command until `query-migrate` says `completed` and FILE
//!    exists, plus QEMU's own `total-time`. Size on disk: allocated (`st_blocks` × 512) and
//!    apparent size of the snapshot files. The source VM is then killed.
//! 3. Restore it in a new process (Ferrite `run --restore DIR`, QEMU the same command line
//!    with `-incoming "exec:cat FILE"`) with the console input a pipe: `echo R` + CR is written
//!    right after spawn and again every 2 ms until `OK echo R` arrives; spawn → that line is
//!    the time until the restored guest answers on its serial console.
//!
//! Once per size and VMM, a `count-forever 100` guest is snapshotted after its first tick;
//! every iteration restores it with no console input and times spawn → first console byte.
//! After the iterations, one restore of the last idle snapshot alone (its RSS/PSS from
//! `smaps_rollup`), then K restores of it started at once: spawn of the first → the last
//! `OK echo R`, and their summed RSS/PSS.
//!
//! Everything lives in a temporary directory removed at the end (also on errors); every VMM
//! is killed when its handle is dropped (and by `PR_SET_PDEATHSIG` if the harness dies).

use super::interrupt::{interrupted, SignalGuard};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::child::{CommandSpec, VmmProcess};
use crate::report::{Outcome, Series};
use crate::runner::Plan;
use crate::scenario::{ms_between, wait_ready, RunConfig};
use crate::vmm::{GuestSpec, Vmm, VmmKind};

const MIB: f64 = (1u64 << 20) as f64;
/// `echo R` + CR is re-sent this often until the restored guest answers.
const POKE_INTERVAL: Duration = Duration::from_millis(2);
/// The console command the restored guest answers.
const ECHO: &[u8] = b"echo R\r";
/// Its answer.
const ECHO_ANSWER: &str = "OK echo R";
/// Start of the console input in the second restore-latency row: input that is already in
/// the pipe when the VMM starts is treated differently by some VMMs (see the report).
const LATE_INPUT: Duration = Duration::from_millis(10);
/// QEMU's migration bandwidth cap during the snapshot (bytes/s): effectively none.
const QEMU_MAX_BANDWIDTH: u64 = 100 << 30;
/// `query-migrate` is polled this often.
const QMP_POLL: Duration = Duration::from_millis(1);

/// Settings of the snapshot scenario.
#[derive(Debug, Clone)]
pub struct SnapshotPlan {
    /// Guest RAM sizes, MiB.
    pub sizes_mib: Vec<u64>,
    /// Clones restored at once from one snapshot.
    pub clones: usize,
    /// `count-forever` interval of the ticking guest, ms.
    pub tick_ms: u64,
    /// Parent of the temporary directory.
    pub dir: PathBuf,
}

/// Metrics measured every iteration: (id, label, unit, decimals).
const METRICS: &[(&str, &str, &str, usize)] = &[
    (
        "boot.ready_ms",
        "cold boot of the source VM: spawn → READY (for reference)",
        "ms",
        1,
    ),
    (
        "snapshot.request_ms",
        "snapshot: request → done, client-measured (QEMU: `migrate` → `completed`, file closed)",
        "ms",
        1,
    ),
    (
        "snapshot.internal_ms",
        "snapshot: the VMM's own figure (Ferrite `write_ms`, QEMU `total-time`)",
        "ms",
        1,
    ),
    (
        "snapshot.allocated_mib",
        "snapshot on disk, allocated (`st_blocks` × 512)",
        "MiB",
        2,
    ),
    (
        "snapshot.apparent_mib",
        "snapshot apparent size (`st_size`)",
        "MiB",
        1,
    ),
    (
        "restore.echo_ms",
        "restore: spawn → `OK echo R` (guest answers on serial)",
        "ms",
        1,
    ),
    (
        "restore.echo_late_ms",
        "restore: spawn → `OK echo R`, input written from 10 ms after spawn on",
        "ms",
        1,
    ),
    (
        "restore.first_byte_ms",
        "restore of a `count-forever 100` guest: spawn → first console byte",
        "ms",
        1,
    ),
];

/// The clone run of one size and VMM.
#[derive(Debug, Clone, Serialize)]
pub struct Clones {
    /// Clones started at once.
    pub k: usize,
    /// Spawn of the first → the last clone's `OK echo R`, ms.
    pub all_answered_ms: f64,
    /// K / that time.
    pub clones_per_s: f64,
    /// Spawn → `OK echo R` of the slowest and fastest clone, ms.
    pub answer_ms_min_max: (f64, f64),
    /// One restored VM alone, MiB (smaps_rollup, after the settle time).
    pub one_rss_mib: f64,
    /// Its PSS, MiB.
    pub one_pss_mib: f64,
    /// The K clones, summed RSS, MiB.
    pub sum_rss_mib: f64,
    /// The K clones, summed PSS, MiB.
    pub sum_pss_mib: f64,
}

/// One VMM at one size.
#[derive(Debug, Clone, Serialize)]
pub struct VmmSize {
    /// Which VMM.
    pub vmm: VmmKind,
    /// Metric id → outcome.
    pub metrics: BTreeMap<String, Outcome>,
    /// The clone run, or why there is none.
    pub clones: Result<Clones, String>,
}

/// Everything measured at one guest RAM size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeReport {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// One entry per VMM that ran.
    pub vmms: Vec<VmmSize>,
}

/// A VMM of the run and the commands it got.
#[derive(Debug, Clone, Serialize)]
pub struct VmmInfo {
    /// Which VMM.
    pub vmm: VmmKind,
    /// Column title.
    pub label: String,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Source VM command (first size).
    pub source_command: String,
    /// Restore command (first size).
    pub restore_command: String,
}

/// The whole scenario.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Command that reproduces this run.
    pub reproduce: String,
    /// Host description.
    pub host: String,
    /// Guest ELF.
    pub guest: String,
    /// Counted iterations.
    pub iterations: usize,
    /// Warm-up iterations.
    pub warmup: usize,
    /// Clones per clone run.
    pub clones: usize,
    /// The VMMs.
    pub vmms: Vec<VmmInfo>,
    /// One entry per size.
    pub sizes: Vec<SizeReport>,
    /// Set when the scenario could not run at all.
    pub error: Option<String>,
}

/// Removes a directory tree when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A snapshot taken by one VMM: the directory (Ferrite) or file (QEMU).
#[derive(Debug, Clone)]
struct Snap {
    path: PathBuf,
}

impl Snap {
    fn remove(&self) {
        if self.path.is_dir() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What one snapshot measured.
struct Taken {
    snap: Snap,
    boot_ready_ms: f64,
    request_ms: f64,
    internal_ms: f64,
    allocated: u64,
    apparent: u64,
}

/// Run the scenario.
pub fn run(vmms: &[Vmm], plan: Plan, splan: &SnapshotPlan, cfg: &RunConfig) -> SnapshotReport {
    let _signals = SignalGuard::install();
    let mut report = SnapshotReport {
        reproduce: String::new(),
        host: String::new(),
        guest: cfg.guest.kernel.display().to_string(),
        iterations: plan.iterations,
        warmup: plan.warmup,
        clones: splan.clones,
        vmms: Vec::new(),
        sizes: Vec::new(),
        error: None,
    };
    let first_size = splan.sizes_mib.first().copied().unwrap_or(256);
    let guest0 = sized(&cfg.guest, first_size);
    for v in vmms {
        report.vmms.push(VmmInfo {
            vmm: v.kind,
            label: v.kind.label().to_string(),
            skipped: v.unavailable_reason(),
            source_command: source_spec(v, &guest0, "", Path::new("SOCK")).display(),
            restore_command: restore_display(v, &guest0),
        });
    }
    let root = splan
        .dir
        .join(format!("ferrite-bench-snapshot-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&root) {
        report.error = Some(format!("cannot create {}: {e}", root.display()));
        return report;
    }
    let root = TempDir(root);
    let active: Vec<&Vmm> = vmms
        .iter()
        .filter(|v| v.unavailable_reason().is_none())
        .collect();
    for &mib in &splan.sizes_mib {
        let guest = sized(&cfg.guest, mib);
        let mut series: Vec<BTreeMap<&'static str, Series>> = vec![BTreeMap::new(); active.len()];
        let mut idle_last: Vec<Option<Snap>> = vec![None; active.len()];
        let mut ticking: Vec<Result<Snap, String>> = Vec::new();
        for (vi, v) in active.iter().enumerate() {
            let dir = root.0.join(format!("{mib}-{vi}-tick"));
            eprintln!(
                "ferrite-bench: snapshot {mib} MiB {}: ticking guest",
                v.kind.label()
            );
            ticking.push(
                std::fs::create_dir_all(&dir)
                    .map_err(|e| e.to_string())
                    .and_then(|()| take(v, &guest, cfg, splan, &dir, true).map(|t| t.snap)),
            );
        }
        for it in 0..plan.warmup + plan.iterations {
            let counted = it >= plan.warmup;
            for (vi, v) in active.iter().enumerate() {
                if interrupted() {
                    break;
                }
                eprintln!(
                    "ferrite-bench: snapshot {mib} MiB {} iteration {}/{}",
                    v.kind.label(),
                    it + 1,
                    plan.warmup + plan.iterations
                );
                let dir = root.0.join(format!("{mib}-{vi}-{it}"));
                let idle = std::fs::create_dir_all(&dir)
                    .map_err(|e| e.to_string())
                    .and_then(|()| take(v, &guest, cfg, splan, &dir, false));
                let echo = idle.as_ref().map_err(Clone::clone).and_then(|t| {
                    restore_echo(v, &guest, &t.snap, cfg, Duration::ZERO).map(|(_, ms)| ms)
                });
                let echo_late = idle.as_ref().map_err(Clone::clone).and_then(|t| {
                    restore_echo(v, &guest, &t.snap, cfg, LATE_INPUT).map(|(_, ms)| ms)
                });
                let tick = ticking[vi]
                    .as_ref()
                    .map_err(|e| format!("no ticking snapshot: {e}"))
                    .and_then(|s| restore_first_byte(v, &guest, s, cfg));
                if counted {
                    let s = &mut series[vi];
                    let vals: [(&'static str, Result<f64, String>); 8] = [
                        ("boot.ready_ms", map(&idle, |t| t.boot_ready_ms)),
                        ("snapshot.request_ms", map(&idle, |t| t.request_ms)),
                        ("snapshot.internal_ms", map(&idle, |t| t.internal_ms)),
                        (
                            "snapshot.allocated_mib",
                            map(&idle, |t| t.allocated as f64 / MIB),
                        ),
                        (
                            "snapshot.apparent_mib",
                            map(&idle, |t| t.apparent as f64 / MIB),
                        ),
                        ("restore.echo_ms", echo.clone()),
                        ("restore.echo_late_ms", echo_late.clone()),
                        ("restore.first_byte_ms", tick.clone()),
                    ];
                    for (id, val) in vals {
                        s.entry(id).or_default().push(val);
                    }
                }
                for e in [
                    idle.as_ref().err(),
                    echo.as_ref().err(),
                    echo_late.as_ref().err(),
                    tick.as_ref().err(),
                ]
                .into_iter()
                .flatten()
                {
                    eprintln!("ferrite-bench:   {}: {e}", v.kind.label());
                }
                if let Ok(t) = idle {
                    if let Some(old) = idle_last[vi].replace(t.snap) {
                        old.remove();
                    }
                }
            }
        }
        let mut size = SizeReport {
            memory_mib: mib,
            vmms: Vec::new(),
        };
        for (vi, v) in active.iter().enumerate() {
            if interrupted() {
                break;
            }
            eprintln!(
                "ferrite-bench: snapshot {mib} MiB {}: {} clones",
                v.kind.label(),
                splan.clones
            );
            let clones = match &idle_last[vi] {
                Some(snap) => clone_run(v, &guest, snap, cfg, splan.clones),
                None => Err("no snapshot to clone (every snapshot failed)".to_string()),
            };
            if let Err(e) = &clones {
                eprintln!("ferrite-bench:   {}: {e}", v.kind.label());
            }
            let metrics =
                METRICS
                    .iter()
                    .map(|(id, ..)| {
                        let outcome = series[vi].get(id).map(Series::outcome).unwrap_or(
                            Outcome::NotMeasured {
                                reason: "no samples".into(),
                            },
                        );
                        (id.to_string(), outcome)
                    })
                    .collect();
            size.vmms.push(VmmSize {
                vmm: v.kind,
                metrics,
                clones,
            });
        }
        for s in idle_last.iter().flatten() {
            s.remove();
        }
        for s in ticking.iter().flatten() {
            s.remove();
        }
        report.sizes.push(size);
        if interrupted() {
            report.error = Some("interrupted by a signal".to_string());
            break;
        }
    }
    drop(root);
    report
}

fn map(r: &Result<Taken, String>, f: impl Fn(&Taken) -> f64) -> Result<f64, String> {
    r.as_ref().map(f).map_err(Clone::clone)
}

pub(crate) fn sized(guest: &GuestSpec, mib: u64) -> GuestSpec {
    GuestSpec {
        memory_mib: mib,
        ..guest.clone()
    }
}

/// The source VM's command: the usual one plus the control socket.
pub(crate) fn source_spec(v: &Vmm, guest: &GuestSpec, cmdline: &str, sock: &Path) -> CommandSpec {
    let mut spec = v.command(guest, cmdline);
    let sock = sock.display().to_string();
    match v.kind {
        VmmKind::Ferrite => spec.args.extend(["--api-socket".to_string(), sock]),
        VmmKind::QemuMicrovm | VmmKind::QemuQ35 => spec.args.extend([
            "-qmp".to_string(),
            format!("unix:{sock},server=on,wait=off"),
        ]),
    }
    spec
}

/// The restore command of `snap`.
fn restore_spec(v: &Vmm, guest: &GuestSpec, snap: &Snap) -> CommandSpec {
    match v.kind {
        VmmKind::Ferrite => CommandSpec {
            program: v.program.clone(),
            args: vec![
                "run".into(),
                "--restore".into(),
                snap.path.display().to_string(),
            ],
        },
        VmmKind::QemuMicrovm | VmmKind::QemuQ35 => {
            // The boot command line is irrelevant (the guest comes from the stream) but the
            // machine must be the same.
            let mut spec = v.command(guest, "");
            spec.args.extend([
                "-incoming".to_string(),
                format!("exec:cat {}", shell_quote(&snap.path)),
            ]);
            spec
        }
    }
}

/// [`restore_spec`] for the report, with a placeholder path.
fn restore_display(v: &Vmm, guest: &GuestSpec) -> String {
    match v.kind {
        VmmKind::Ferrite => format!("{} run --restore SNAPDIR", v.program.display()),
        VmmKind::QemuMicrovm | VmmKind::QemuQ35 => {
            let mut spec = v.command(guest, "");
            spec.args
                .extend(["-incoming".to_string(), "exec:cat FILE".to_string()]);
            spec.display()
        }
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Boot a guest (idle, or `count-forever` when `ticking`), snapshot it and kill it.
fn take(
    v: &Vmm,
    guest: &GuestSpec,
    cfg: &RunConfig,
    splan: &SnapshotPlan,
    dir: &Path,
    ticking: bool,
) -> Result<Taken, String> {
    let sock = dir.join("ctl.sock");
    let cmds = if ticking {
        format!("count-forever {}", splan.tick_ms)
    } else {
        String::new()
    };
    let spec = source_spec(v, guest, &cfg.cmdline(&cmds), &sock);
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout).map_err(|e| e.to_string())?;
    let ready = wait_ready(&mut p, cfg).map_err(|e| e.to_string())?;
    let boot_ready_ms = ms_between(p.start(), ready.at);
    if ticking {
        p.wait_line(p.start() + cfg.boot_timeout, "the first tick", |l| {
            l.starts_with("tick ")
        })
        .map_err(|e| e.to_string())?;
    }
    let taken = match v.kind {
        VmmKind::Ferrite => ferrite_snapshot(&sock, &dir.join("snap"), cfg),
        VmmKind::QemuMicrovm | VmmKind::QemuQ35 => qemu_snapshot(&sock, &dir.join("snap.mig"), cfg),
    };
    p.kill();
    let (snap, request_ms, internal_ms) =
        taken.map_err(|e| format!("{e}; stderr: {}", p.stderr_tail()))?;
    let (allocated, apparent) = disk_use(&snap.path)?;
    Ok(Taken {
        snap,
        boot_ready_ms,
        request_ms,
        internal_ms,
        allocated,
        apparent,
    })
}

fn ferrite_snapshot(sock: &Path, path: &Path, cfg: &RunConfig) -> Result<(Snap, f64, f64), String> {
    let req = serde_json::json!({"op": "snapshot", "path": path}).to_string();
    let t0 = Instant::now();
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(cfg.command_timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("send snapshot request: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read snapshot reply: {e}"))?;
    let request_ms = ms_between(t0, Instant::now());
    let reply: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("reply {line:?}: {e}"))?;
    if reply["ok"] != serde_json::Value::Bool(true) {
        return Err(format!("snapshot refused: {}", line.trim()));
    }
    let write_ms = reply["snapshot"]["write_ms"]
        .as_f64()
        .ok_or_else(|| format!("no write_ms in {}", line.trim()))?;
    Ok((
        Snap {
            path: path.to_path_buf(),
        },
        request_ms,
        write_ms,
    ))
}

/// A minimal QMP client: one command at a time, events skipped.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(sock: &Path, timeout: Duration) -> Result<Self, String> {
        let s =
            UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Self {
            reader: BufReader::new(s),
            writer,
        };
        let mut greeting = String::new();
        q.reader
            .read_line(&mut greeting)
            .map_err(|e| format!("QMP greeting: {e}"))?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    pub(crate) fn execute(
        &mut self,
        cmd: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let mut req = serde_json::json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| format!("QMP {cmd}: {e}"))?;
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("QMP {cmd}: {e}"))?;
            if n == 0 {
                return Err(format!("QMP {cmd}: connection closed"));
            }
            let v: serde_json::Value =
                serde_json::from_str(line.trim()).map_err(|e| format!("QMP {line:?}: {e}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {e}"));
            }
        }
    }
}

fn qemu_snapshot(sock: &Path, file: &Path, cfg: &RunConfig) -> Result<(Snap, f64, f64), String> {
    let mut q = Qmp::connect(sock, cfg.command_timeout)?;
    q.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH })),
    )?;
    let part = file.with_extension("part");
    let uri = format!(
        "exec:cat > {} && mv {} {}",
        shell_quote(&part),
        shell_quote(&part),
        shell_quote(file)
    );
    let deadline = Instant::now() + cfg.command_timeout;
    let t0 = Instant::now();
    q.execute("migrate", Some(serde_json::json!({ "uri": uri })))?;
    let total_ms = loop {
        let r = q.execute("query-migrate", None)?;
        match r["status"].as_str() {
            Some("completed") => break r["total-time"].as_f64().unwrap_or(f64::NAN),
            Some("failed") | Some("cancelled") => {
                return Err(format!("migration {}: {r}", r["status"]));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!(
                "migration not completed after {:?}: {r}",
                cfg.command_timeout
            ));
        }
        thread::sleep(QMP_POLL);
    };
    while !file.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} not written", file.display()));
        }
        thread::sleep(QMP_POLL);
    }
    let request_ms = ms_between(t0, Instant::now());
    Ok((
        Snap {
            path: file.to_path_buf(),
        },
        request_ms,
        total_ms,
    ))
}

/// (allocated, apparent) bytes of a file or of the files of a directory.
fn disk_use(path: &Path) -> Result<(u64, u64), String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    let mut allocated = 0;
    let mut apparent = 0;
    for f in files {
        let m = std::fs::metadata(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        if m.is_file() {
            allocated += m.blocks() * 512;
            apparent += m.len();
        }
    }
    Ok((allocated, apparent))
}

/// Writes `echo R` + CR to a VMM's console input every [`POKE_INTERVAL`] until stopped.
struct Poker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Option<ChildStdin>>>,
}

impl Poker {
    /// Start writing `delay` from now.
    fn start(mut stdin: ChildStdin, delay: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            thread::sleep(delay);
            while !flag.load(Ordering::Relaxed) {
                // Only when the VMM has taken the previous command out of the pipe: a VMM that
                // is still loading must not find a backlog of commands (whose answers would
                // cost CPU the other clones need) when its guest starts.
                if pipe_pending(&stdin) == 0 && stdin.write_all(ECHO).is_err() {
                    return None;
                }
                thread::sleep(POKE_INTERVAL);
            }
            Some(stdin)
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop writing; the console input stays open (returned) so the VMM sees no EOF.
    fn finish(mut self) -> Option<ChildStdin> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok().flatten())
    }
}

impl Drop for Poker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Bytes in the pipe not yet read by the other end (`FIONREAD`; 0 if it cannot be asked).
fn pipe_pending(stdin: &ChildStdin) -> libc::c_int {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on a pipe fd we own writes one c_int through a valid pointer.
    let r = unsafe { libc::ioctl(stdin.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n
    }
}

/// A restored VM that answered, with its console input kept open.
struct Restored {
    p: VmmProcess,
    _stdin: Option<ChildStdin>,
    answered: Instant,
}

fn spawn_restore(
    v: &Vmm,
    guest: &GuestSpec,
    snap: &Snap,
    cfg: &RunConfig,
    delay: Duration,
) -> Result<(VmmProcess, Poker), String> {
    let spec = restore_spec(v, guest, snap);
    let (p, stdin) =
        VmmProcess::spawn_with_stdin(&spec, cfg.hard_timeout).map_err(|e| e.to_string())?;
    Ok((p, Poker::start(stdin, delay)))
}

fn await_echo(mut p: VmmProcess, poker: Poker, cfg: &RunConfig) -> Result<Restored, String> {
    let r = p.wait_line(p.start() + cfg.boot_timeout, "`OK echo R`", |l| {
        l.contains(ECHO_ANSWER)
    });
    let stdin = poker.finish();
    let (line, _) = r.map_err(|e| format!("restore: {e}"))?;
    Ok(Restored {
        p,
        _stdin: stdin,
        answered: line.at,
    })
}

/// Restore `snap` and time spawn → `OK echo R`, the console input written from `delay` after
/// spawn on.
fn restore_echo(
    v: &Vmm,
    guest: &GuestSpec,
    snap: &Snap,
    cfg: &RunConfig,
    delay: Duration,
) -> Result<(Restored, f64), String> {
    let (p, poker) = spawn_restore(v, guest, snap, cfg, delay)?;
    let r = await_echo(p, poker, cfg)?;
    let ms = ms_between(r.p.start(), r.answered);
    Ok((r, ms))
}

/// Restore the ticking guest and time spawn → first console byte (a tick line).
fn restore_first_byte(
    v: &Vmm,
    guest: &GuestSpec,
    snap: &Snap,
    cfg: &RunConfig,
) -> Result<f64, String> {
    let spec = restore_spec(v, guest, snap);
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout).map_err(|e| e.to_string())?;
    let (line, _) = p
        .wait_line(p.start() + cfg.boot_timeout, "a tick after restore", |l| {
            l.contains("tick ")
        })
        .map_err(|e| format!("ticking restore: {e}"))?;
    let first = p.first_byte().unwrap_or(line.at);
    Ok(ms_between(p.start(), first))
}

/// RSS and PSS of a process from `/proc/PID/smaps_rollup`, MiB.
fn rollup(pid: u32) -> Result<(f64, f64), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| format!("smaps_rollup of {pid}: {e}"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .ok_or_else(|| format!("no {key} in smaps_rollup of {pid}"))
    };
    Ok((field("Rss:")?, field("Pss:")?))
}

fn clone_run(
    v: &Vmm,
    guest: &GuestSpec,
    snap: &Snap,
    cfg: &RunConfig,
    k: usize,
) -> Result<Clones, String> {
    let (one, _) = restore_echo(v, guest, snap, cfg, Duration::ZERO)?;
    thread::sleep(cfg.settle);
    let (one_rss_mib, one_pss_mib) = rollup(one.p.pid())?;
    drop(one);
    let t0 = Instant::now();
    let mut pending = Vec::with_capacity(k);
    for _ in 0..k {
        pending.push(spawn_restore(v, guest, snap, cfg, Duration::ZERO)?);
    }
    // Round robin, so every clone's input stops as soon as it has answered.
    let mut waiting: Vec<Option<(VmmProcess, Poker)>> = pending.into_iter().map(Some).collect();
    let mut running = Vec::with_capacity(k);
    let deadline = t0 + cfg.boot_timeout;
    while running.len() < k {
        for slot in waiting.iter_mut() {
            let Some((p, _)) = slot.as_mut() else {
                continue;
            };
            let soon = (Instant::now() + QMP_POLL).min(deadline);
            match p.wait_line(soon, "`OK echo R`", |l| l.contains(ECHO_ANSWER)) {
                Ok((line, _)) => {
                    if let Some((p, poker)) = slot.take() {
                        running.push(Restored {
                            p,
                            _stdin: poker.finish(),
                            answered: line.at,
                        });
                    }
                }
                Err(crate::error::BenchError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(e) => return Err(format!("clone: {e}")),
            }
        }
    }
    let last = running.iter().map(|r| r.answered).max().unwrap_or(t0);
    let all_answered_ms = ms_between(t0, last);
    let each: Vec<f64> = running
        .iter()
        .map(|r| ms_between(r.p.start(), r.answered))
        .collect();
    thread::sleep(cfg.settle);
    let mut sum_rss_mib = 0.0;
    let mut sum_pss_mib = 0.0;
    for r in &running {
        let (rss, pss) = rollup(r.p.pid())?;
        sum_rss_mib += rss;
        sum_pss_mib += pss;
    }
    Ok(Clones {
        k,
        all_answered_ms,
        clones_per_s: k as f64 / (all_answered_ms / 1e3),
        answer_ms_min_max: (
            each.iter().copied().fold(f64::INFINITY, f64::min),
            each.iter().copied().fold(0.0, f64::max),
        ),
        one_rss_mib,
        one_pss_mib,
        sum_rss_mib,
        sum_pss_mib,
    })
}

impl SnapshotReport {
    /// Render as Markdown: per size, one table of the per-iteration metrics and one of clones.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Snapshot scenario. Guest `{}`, 1 vCPU, {} counted iterations (+{} warm-up) per VMM and size, median (min–max).  \nHost: {}  \nCommand: `{}`\n\n",
            self.guest, self.iterations, self.warmup, self.host, self.reproduce
        ));
        if let Some(e) = &self.error {
            if self.sizes.is_empty() {
                out.push_str(&format!("Not run: {e}\n"));
                return out;
            }
            out.push_str(&format!("Stopped early: {e}\n\n"));
        }
        let mut notes: Vec<String> = Vec::new();
        for v in &self.vmms {
            if let Some(s) = &v.skipped {
                notes.push(format!("{}: skipped: {s}", v.label));
            }
        }
        let labels: BTreeMap<VmmKind, String> =
            self.vmms.iter().map(|v| (v.vmm, v.label.clone())).collect();
        for size in &self.sizes {
            out.push_str(&format!("#### {} MiB guest\n\n", size.memory_mib));
            let ferrite = size.vmms.iter().find(|v| v.vmm == VmmKind::Ferrite);
            let peers: Vec<&VmmSize> = size
                .vmms
                .iter()
                .filter(|v| v.vmm != VmmKind::Ferrite)
                .collect();
            let label = |k: VmmKind| labels.get(&k).cloned().unwrap_or_default();
            let mut header = vec!["metric".to_string(), "unit".to_string()];
            header.extend(size.vmms.iter().map(|v| label(v.vmm)));
            if ferrite.is_some() {
                header.extend(peers.iter().map(|p| format!("Ferrite / {}", label(p.vmm))));
            }
            out.push_str(&format!(
                "| {} |\n|{}\n",
                header.join(" | "),
                "---|".repeat(header.len())
            ));
            for (id, name, unit, d) in METRICS {
                let mut row = vec![name.to_string(), unit.to_string()];
                for v in &size.vmms {
                    row.push(match v.metrics.get(*id) {
                        Some(Outcome::Measured(s)) => {
                            format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = *d)
                        }
                        Some(Outcome::NotMeasured { reason }) => {
                            note(&mut notes, format!("{}: {reason}", label(v.vmm)))
                        }
                        None => "—".into(),
                    });
                }
                if let Some(f) = ferrite {
                    for p in &peers {
                        row.push(match (f.metrics.get(*id), p.metrics.get(*id)) {
                            (Some(Outcome::Measured(a)), Some(Outcome::Measured(b)))
                                if b.median > 0.0 =>
                            {
                                format!("{:.2}×", a.median / b.median)
                            }
                            _ => "—".into(),
                        });
                    }
                }
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
            let k = self.clones;
            type Field = fn(&Clones) -> f64;
            let rows: [(String, &str, usize, Field); 6] = [
                (
                    format!("{k} clones started at once: first spawn → last `OK echo R`"),
                    "ms",
                    1,
                    |c| c.all_answered_ms,
                ),
                ("clone rate".into(), "clones/s", 1, |c| c.clones_per_s),
                ("one restored VM alone: RSS".into(), "MiB", 1, |c| {
                    c.one_rss_mib
                }),
                ("one restored VM alone: PSS".into(), "MiB", 1, |c| {
                    c.one_pss_mib
                }),
                (format!("{k} clones: summed RSS"), "MiB", 1, |c| {
                    c.sum_rss_mib
                }),
                (format!("{k} clones: summed PSS"), "MiB", 1, |c| {
                    c.sum_pss_mib
                }),
            ];
            out.push('\n');
            out.push_str(&format!(
                "| {} |\n|{}\n",
                header.join(" | "),
                "---|".repeat(header.len())
            ));
            for (i, (name, unit, d, f)) in rows.into_iter().enumerate() {
                let mut row = vec![name, unit.to_string()];
                for v in &size.vmms {
                    row.push(match &v.clones {
                        Ok(c) if i == 0 => format!(
                            "{:.d$} (each {:.d$}–{:.d$})",
                            f(c),
                            c.answer_ms_min_max.0,
                            c.answer_ms_min_max.1
                        ),
                        Ok(c) => format!("{:.d$}", f(c)),
                        Err(e) => note(&mut notes, format!("{} clones: {e}", label(v.vmm))),
                    });
                }
                if let Some(fr) = ferrite {
                    for p in &peers {
                        row.push(match (&fr.clones, &p.clones) {
                            (Ok(a), Ok(b)) if f(b) > 0.0 => format!("{:.2}×", f(a) / f(b)),
                            _ => "—".into(),
                        });
                    }
                }
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
            out.push('\n');
        }
        if !notes.is_empty() {
            for (i, n) in notes.iter().enumerate() {
                out.push_str(&format!("{}. {}\n", i + 1, n));
            }
            out.push('\n');
        }
        out.push_str("Commands (first size):\n\n");
        for v in &self.vmms {
            out.push_str(&format!(
                "- {}: source `{}`; restore `{}`\n",
                v.label, v.source_command, v.restore_command
            ));
        }
        out
    }
}

fn note(notes: &mut Vec<String>, reason: String) -> String {
    let i = match notes.iter().position(|n| *n == reason) {
        Some(i) => i,
        None => {
            notes.push(reason);
            notes.len() - 1
        }
    };
    format!("n/a [{}]", i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_disk_use_sparse_file_allocated_below_apparent() {
        // Arrange
        let dir = std::env::temp_dir().join(format!("fb-snap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let _guard = TempDir(dir.clone());
        let f = std::fs::File::create(dir.join("memory.bin")).expect("file");
        f.set_len(64 << 20).expect("sparse");
        std::fs::write(dir.join("state.bin"), [1u8; 4096]).expect("state");

        // Act
        let (allocated, apparent) = disk_use(&dir).expect("disk use");

        // Assert
        assert_eq!(apparent, (64 << 20) + 4096);
        assert!(allocated < 1 << 20);
    }

    #[test]
    fn test_shell_quote_single_quotes_escaped() {
        // Arrange
        let p = Path::new("/tmp/a'b");

        // Act
        let q = shell_quote(p);

        // Assert
        assert_eq!(q, "'/tmp/a'\\''b'");
    }
}
